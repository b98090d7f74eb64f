"""`aft serve` against the official openai client and raw HTTP, on 127.0.0.1 (a free port).

Where the engine is not the subject (errors, concurrency, keep-alive, shutdown)
a deterministic fake engine streams its words with chosen delays; streaming
equals the whole answer on a random-init tiny Llama; P&A runs the real PAEngine
over the fake engine.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from conftest import FakeEngine

from aft.aggregate import PAConfig
from aft.serve import Limits, Server, make_service

USER = [{"role": "user", "content": "What is 2 + 3?"}]


class StreamingFake(FakeEngine):
    """FakeEngine that streams each completion a word at a time: `first_delay` seconds before a call's first
    word (slow proposals), `delay` between words; `fail_after` words: raise, as a broken engine would."""

    def __init__(self, continuous=True, first_delay=0.0, delay=0.0, fail_after=None, context_window=None):
        super().__init__(context_window)
        self.continuous, self.first_delay, self.delay, self.fail_after = continuous, first_delay, delay, fail_after
        self.lock = threading.Lock()

    def generate(self, requests, on_text=None):
        with self.lock:
            results = super().generate(requests)
        time.sleep(self.first_delay)
        sent = 0
        for i, res in enumerate(results):
            for j, c in enumerate(res.completions):
                for piece in re.split(r"(?<= )", c.text):
                    if self.fail_after is not None and sent >= self.fail_after:
                        raise RuntimeError("the engine broke")
                    if on_text and piece:
                        on_text(i, j, piece)
                    sent += 1
                    time.sleep(self.delay)
        return results


@contextlib.contextmanager
def serving(engine, pa: PAConfig | None = None, api_key=None, **limits):
    limits.setdefault("max_tokens", 64)
    with Server(make_service(engine, pa, name="m", limits=Limits(**limits), api_key=api_key)) as srv:
        yield srv


def client(srv, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url, api_key=kw.pop("api_key", "none"), max_retries=0, timeout=30, **kw)


def post(srv, body, path="/v1/chat/completions", headers=None):
    """Raw POST: (status, headers, parsed JSON or the SSE lines)."""
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    raw = resp.read().decode()
    conn.close()
    if resp.getheader("content-type", "").startswith("text/event-stream"):
        return resp.status, resp, [line for line in raw.split("\n") if line]
    return resp.status, resp, json.loads(raw)


def events(lines):
    """The JSON of the data: lines of an SSE stream, [DONE] as the string."""
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines if line.startswith("data: ")]


# ---------------------------------------------------------------- plain model
def test_stream_and_whole_answers_agree_and_n_streams_each_choice():
    with serving(StreamingFake()) as srv:
        c = client(srv)
        whole = c.chat.completions.create(model="m", messages=USER, n=2, seed=7, temperature=1.0)
        texts = ["", ""]
        finish = [None, None]
        stream = c.chat.completions.create(model="m", messages=USER, n=2, seed=7, temperature=1.0, stream=True)
        chunks = list(stream)
        for ch in chunks:
            for choice in ch.choices:
                texts[choice.index] += choice.delta.content or ""
                finish[choice.index] = choice.finish_reason or finish[choice.index]
    assert texts == [ch.message.content for ch in whole.choices] and texts[0] != texts[1]
    assert finish == [ch.finish_reason for ch in whole.choices]
    assert [ch.delta.role for ch in chunks[0].choices] == ["assistant", "assistant"]  # the first chunk: the role
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) > 4  # word by word, not one piece
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens > 0


def test_usage_chunk_and_done_line():
    with serving(StreamingFake()) as srv:
        status, resp, lines = post(srv, {"model": "m", "messages": USER, "stream": True, "seed": 1,
                                         "stream_options": {"include_usage": True}})
        whole = client(srv).chat.completions.create(model="m", messages=USER, seed=1)
    ev = events(lines)
    assert status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    assert ev[-1] == "[DONE]" and ev[-2]["choices"] == [] and ev[-2]["usage"] == whole.usage.model_dump(
        exclude_none=True)
    assert all(e["usage"] is None for e in ev[:-2])  # include_usage: null in every chunk but the last
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == ev[0]["id"] for e in ev[:-1])


@pytest.mark.parametrize("continuous", [True, False])
def test_sixteen_concurrent_streams_all_complete(continuous):
    engine = StreamingFake(continuous=continuous, delay=0.002)
    with serving(engine) as srv:
        c = client(srv)
        expected = [c.chat.completions.create(model="m", messages=USER, seed=i).choices[0].message.content
                    for i in range(16)]
        engine.calls.clear()

        def stream(i):
            return "".join(ch.choices[0].delta.content or "" for ch in
                           c.chat.completions.create(model="m", messages=USER, seed=i, stream=True) if ch.choices)

        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(stream, range(16)))
        assert got == expected
        assert srv.metrics.count("m", 200) == 32 and srv.metrics.running == srv.metrics.waiting == 0
    if not continuous:  # one engine call at a time: the requests that waited went in together
        assert len(engine.calls) < 16 and sum(map(len, engine.calls)) == 16


@pytest.mark.parametrize("body, status, param, says", [
    (b"{not json", 400, None, "not valid JSON"),
    ([], 400, None, "object"),
    ({"model": "m"}, 400, "messages", "Field required"),
    ({"model": "m", "messages": "hi"}, 400, "messages", "array"),
    ({"model": "m", "messages": []}, 400, "messages", "at least 1"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages", "'wizard'"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages", "'text'"),
    ({"model": "m", "messages": USER, "n": 0}, 400, "n", "greater than or equal to 1"),
    ({"model": "m", "messages": USER, "n": 9}, 400, "n", "<= 8"),
    ({"model": "m", "messages": USER, "n": "2"}, 400, "n", "integer"),
    ({"model": "m", "messages": USER, "temperature": 2.5}, 400, "temperature", "less than or equal to 2"),
    ({"model": "m", "messages": USER, "top_p": 0}, 400, "top_p", "greater than 0"),
    ({"model": "m", "messages": USER, "max_tokens": 65}, 400, "max_tokens", "<= 64"),
    ({"model": "m", "messages": USER, "stop": 3}, 400, "stop", ""),
    ({"model": "m", "messages": USER, "k": 2}, 400, "k", "P&A model"),
    ({"model": "m", "messages": USER, "min_p": 0.1}, 400, "min_p", "not supported"),
    ({"model": "other", "messages": USER}, 404, "model", "does not exist"),
    ({"model": "m", "messages": [{"role": "user", "content": "word " * 40}]}, 400, "messages", "context window (32)"),
])
def test_bad_requests_get_openai_errors(body, status, param, says):
    with serving(StreamingFake(context_window=32)) as srv:
        got, _, out = post(srv, body)
        assert got == status and out["error"]["param"] == param and says in out["error"]["message"]
        assert "\n" not in out["error"]["message"] and srv.metrics.count(status=status) == 1
        if isinstance(body, dict) and body.get("messages"):  # the same, asked for as a stream: JSON, not SSE
            assert post(srv, {**body, "stream": True})[0] == status


def test_sdk_raises_the_errors():
    with serving(StreamingFake()) as srv:
        c = client(srv)
        with pytest.raises(openai.BadRequestError, match="wizard"):
            c.chat.completions.create(model="m", messages=[{"role": "wizard", "content": "hi"}])
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model="nope", messages=USER)


def test_api_key():
    with serving(StreamingFake(), api_key="sesame") as srv:
        with pytest.raises(openai.AuthenticationError):
            client(srv, api_key="wrong").chat.completions.create(model="m", messages=USER)
        assert post(srv, {"model": "m", "messages": USER})[0] == 401  # no header at all
        with pytest.raises(openai.AuthenticationError):
            client(srv).models.list()
        assert client(srv, api_key="sesame").chat.completions.create(model="m", messages=USER).choices
        conn = http.client.HTTPConnection(srv.host, srv.port)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200  # health and metrics need no key


def test_metrics_move():
    with serving(StreamingFake()) as srv:
        c = client(srv)
        c.chat.completions.create(model="m", messages=USER, seed=1)
        list(c.chat.completions.create(model="m", messages=USER, seed=2, stream=True))
        post(srv, b"{")
        conn = http.client.HTTPConnection(srv.host, srv.port)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    values = dict(re.findall(r"^(\S+) (\S+)$", text, re.MULTILINE))
    assert values['aft_requests_total{model="m",status="200"}'] == "2"
    assert values['aft_requests_total{model="",status="400"}'] == "1"
    assert int(values['aft_generation_tokens_total{model="m"}']) > 0
    assert int(values['aft_prompt_tokens_total{model="m"}']) == 2 * FakeEngine().count_tokens(USER)
    assert values['aft_request_latency_seconds_count{model="m"}'] == "2"
    assert values['aft_time_to_first_token_seconds_count{model="m"}'] == "2"
    assert values['aft_request_latency_seconds_bucket{model="m",le="+Inf"}'] == "2"
    assert values["aft_requests_running"] == values["aft_requests_waiting"] == "0"


def test_keep_alive_while_nothing_is_written():
    with serving(StreamingFake(first_delay=0.6), keepalive=0.1) as srv:
        status, _, lines = post(srv, {"model": "m", "messages": USER, "stream": True})
    first_text = next(i for i, line in enumerate(lines) if '"content": "' in line and '"content": ""' not in line)
    assert status == 200 and lines[0].startswith("data: ")  # the role chunk at once
    assert sum(line == ": keep-alive" for line in lines[:first_text]) >= 3
    assert lines[-1] == "data: [DONE]"


def test_an_error_mid_stream_ends_it_with_an_error_event():
    with serving(StreamingFake(fail_after=3)) as srv:
        status, _, lines = post(srv, {"model": "m", "messages": USER, "stream": True})
        with pytest.raises(openai.APIError, match="the engine broke"):
            list(client(srv).chat.completions.create(model="m", messages=USER, stream=True))
        assert post(srv, {"model": "m", "messages": USER})[0] == 500  # not streamed: a 500 JSON
        assert client(srv).models.list().data  # the server goes on
    ev = events(lines)
    assert status == 200 and sum("content" in e["choices"][0]["delta"] for e in ev[1:-1]) == 3  # text was sent
    assert "[DONE]" not in ev and "the engine broke" in ev[-1]["error"]["message"]


def test_full_server_answers_429_and_a_slow_request_times_out():
    with serving(StreamingFake(first_delay=1.0), max_queue=1, request_timeout=0.5) as srv:
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(post, srv, {"model": "m", "messages": USER})
            deadline = time.time() + 5
            while srv.service.in_server == 0 and time.time() < deadline:
                time.sleep(0.01)
            status, resp, out = post(srv, {"model": "m", "messages": USER})
            assert status == 429 and resp.getheader("retry-after") == "1" and "full" in out["error"]["message"]
            status, _, out = slow.result()
        assert status == 504 and "timeout" in out["error"]["message"]


def test_a_client_that_leaves_does_not_harm_the_server():
    """One engine call at a time: a client leaves mid-stream, another leaves while it waits for the engine;
    the first call finishes, the waiting request is never run, and the server answers the next client."""
    engine = StreamingFake(continuous=False, first_delay=0.4, delay=0.01)
    with serving(engine) as srv:
        def leave_after(lines):
            conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
            conn.request("POST", "/v1/chat/completions", json.dumps({"model": "m", "messages": USER, "stream": True}),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            for _ in range(lines):
                resp.fp.readline()
            conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()

        first = threading.Thread(target=leave_after, args=(1,))
        first.start()
        while srv.metrics.running == 0:
            time.sleep(0.01)
        leave_after(1)  # its request waits behind the first one's engine call, and is dropped there
        first.join()
        answer = client(srv).chat.completions.create(model="m", messages=USER, seed=3)
        assert answer.choices[0].message.content
        deadline = time.time() + 5
        while srv.metrics.count(status=499) < 2 and time.time() < deadline:
            time.sleep(0.01)
        assert srv.metrics.count(status=499) == 2 and srv.metrics.count(status=200) == 1
    assert len(engine.requests) == 2  # the first stream's and the last request: the one that left waiting never ran


def test_shutdown_ends_a_stream_in_flight_with_an_error():
    srv = Server(make_service(StreamingFake(first_delay=5.0), limits=Limits(shutdown_grace=0.3)))
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(post, srv, {"messages": USER, "stream": True})
        while srv.service.in_server == 0:
            time.sleep(0.01)
        t0 = time.time()
        srv.close()
        status, _, lines = fut.result(timeout=10)
    assert time.time() - t0 < 3 and not srv.thread.is_alive()
    assert status == 200 and "shutting down" in events(lines)[-1]["error"]["message"]

