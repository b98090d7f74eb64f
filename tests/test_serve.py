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
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from conftest import FakeEngine, StreamingFake

from aft.aggregate import LayerTrace, PAConfig
from aft.prompts import MOA_AGGREGATOR_TEMPLATE
from aft.sampling import Sampling
from aft.serve import Limits, Server, make_service

USER = [{"role": "user", "content": "What is 2 + 3?"}]


@contextlib.contextmanager
def serving(engine, pa: PAConfig | None = None, api_key=None, **limits):
    limits.setdefault("max_tokens", 64)
    with Server(make_service(engine, pa, name="m", limits=Limits(**limits), api_key=api_key)) as srv:
        try:
            yield srv
        finally:  # their kept-alive connections would make the server wait 0.1 s for them as it closes
            while CLIENTS:
                CLIENTS.pop().close()


CLIENTS: list[openai.OpenAI] = []


def client(srv, **kw) -> openai.OpenAI:
    c = openai.OpenAI(base_url=srv.base_url, api_key=kw.pop("api_key", "none"), max_retries=0, timeout=30, **kw)
    CLIENTS.append(c)
    return c


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
    engine = StreamingFake(continuous=continuous)
    with serving(engine) as srv:
        c = client(srv)
        expected = [c.chat.completions.create(model="m", messages=USER, seed=i).choices[0].message.content
                    for i in range(16)]
        engine.calls.clear()
        engine.delay = 0.002  # the streams overlap: each word takes a while

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
    with serving(StreamingFake(first_delay=0.3), keepalive=0.05) as srv:
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
    with serving(StreamingFake(first_delay=0.6), max_queue=1, request_timeout=0.3) as srv:
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
        deadline = time.time() + 5
        while not engine.requests and time.time() < deadline:  # the first call has begun (and sleeps 0.4 s)
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
    srv = Server(make_service(StreamingFake(first_delay=5.0), limits=Limits(shutdown_grace=0.15)))
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(post, srv, {"messages": USER, "stream": True})
        while srv.service.in_server == 0:
            time.sleep(0.01)
        t0 = time.time()
        srv.close()
        status, _, lines = fut.result(timeout=10)
    assert time.time() - t0 < 3 and not srv.thread.is_alive()
    assert status == 200 and "shutting down" in events(lines)[-1]["error"]["message"]


# ---------------------------------------------------------------- the command
def test_serve_takes_the_model_engine_sampling_and_pa_options_of_infer():
    from aft import cli

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    flags = {name: {s for a in commands[name]._actions for s in a.option_strings} for name in ("infer", "serve")}
    infer_only = {"--input_file", "--input-file", "-i", "--output_file", "--output-file", "-o", "--batch_size",
                  "--batch-size", "--dry-run", "--dry_run", "--retry_failed", "--retry-failed", "--no-retry_failed",
                  "--no-retry-failed"}
    assert flags["infer"] - infer_only <= flags["serve"]
    assert {"-k", "-l", "--max_tokens", "--host", "--port", "--served_model_name", "--api_key", "--config"} <= \
        flags["serve"]


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "--port must be in [0, 65535], got 70000"),
    (["-k", "0"], "--n must be >= 1"),
    (["--keepalive", "0"], "--keepalive must be > 0"),
])
def test_bad_options_are_one_line_errors(argv, message, capsys):
    from aft.cli import main

    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aft serve: error: ") and message in err and err.count("\n") == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_aft_serve_starts_answers_and_stops_on_sigterm(tiny_model_dir, tmp_path):
    """The command itself, in a second process: a YAML config and flags, P&A and plain answers, a port already
    in use refused in one line, and SIGTERM ending it cleanly."""
    port = free_port()
    (tmp_path / "serve.yaml").write_text(f"model: {tiny_model_dir}\nn: 2\nnum_aggregation: 1\nmax_tokens: 8\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "aft", "serve", "--config", str(tmp_path / "serve.yaml"), "--port", str(port),
           "--served_model_name", "tiny"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                assert time.time() < deadline
                time.sleep(0.2)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in c.models.list().data] == ["tiny", "tiny-plain"]
        answer = c.chat.completions.create(model="tiny", messages=USER, seed=1, extra_body={"return_trace": True})
        trace = answer.model_extra["aft"]["answers"][0]["trace"]
        assert [t["role"] for t in trace] == ["propose", "final"] and len(trace[0]["outputs"]) == 2
        assert answer.choices[0].message.content == trace[-1]["outputs"][0]["text"]
        whole = c.chat.completions.create(model="tiny-plain", messages=USER, seed=1)
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="tiny-plain", messages=USER, seed=1, stream=True) if ch.choices)
        assert streamed == whole.choices[0].message.content
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)  # the port is taken
        assert second.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in second.stderr
        assert second.stderr.count("aft serve: error:") == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        finally:
            proc.kill()
    assert code == 0


# ---------------------------------------------------------------- P&A
PA = PAConfig(n=3, num_aggregation=2, sampling=Sampling(max_tokens=16, temperature=1.0), seed=5)


def test_models_lists_the_pa_model_and_the_plain_one():
    with serving(StreamingFake(), PA) as srv:
        cards = client(srv).models.list().data
    assert [c.id for c in cards] == ["m", "m-plain"]
    assert cards[0].model_extra["aft"] == {"propose_and_aggregate": True, "k": 3, "num_aggregation": 2}
    assert cards[1].model_extra["aft"] == {"propose_and_aggregate": False}


def test_pa_usage_counts_every_layer_and_the_trace_is_the_infer_schema():
    engine = StreamingFake()
    with serving(engine, PA) as srv:
        out = client(srv).chat.completions.create(model="m", messages=USER, n=2, seed=4,
                                                  extra_body={"return_trace": True})
        plain = client(srv).chat.completions.create(model="m-plain", messages=USER, seed=4)
    answers = out.model_extra["aft"]["answers"]
    traces = [[LayerTrace.from_dict(t) for t in a["trace"]] for a in answers]
    assert [[(t.role, len(t.outputs)) for t in tr] for tr in traces] == [[("propose", 3), ("aggregate", 3),
                                                                          ("final", 1)]] * 2
    assert [c.message.content for c in out.choices] == [tr[-1].outputs[0].text for tr in traces]
    assert out.choices[0].message.content != out.choices[1].message.content  # n independent runs
    assert out.usage.prompt_tokens == sum(t.prompt_tokens for tr in traces for t in tr)
    assert out.usage.completion_tokens == sum(o.tokens for tr in traces for t in tr for o in t.outputs)
    assert out.usage.completion_tokens > sum(c.message.content.count(" ") + 1 for c in out.choices)  # not just the answers
    assert answers[0]["layers"][1] == {"layer": 1, "role": "aggregate", "prompt_tokens": traces[0][1].prompt_tokens,
                                       "completion_tokens": sum(o.tokens for o in traces[0][1].outputs), "outputs": 3}
    assert "aft" not in plain.model_extra and plain.usage.prompt_tokens == engine.count_tokens(USER)
    assert len(engine.requests) == 2 * 3 + 1  # 2 runs x 3 layers, then the plain pass


def test_pa_stream_sends_the_final_layer_as_it_is_written():
    with serving(StreamingFake(), PA) as srv:
        c = client(srv)
        whole = c.chat.completions.create(model="m", messages=USER, seed=9, extra_body={"return_trace": True})
        chunks = list(c.chat.completions.create(model="m", messages=USER, seed=9, stream=True,
                                                stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) > 1  # word by word
    assert chunks[-1].usage == whole.usage  # every layer's tokens, as without streaming
    final = next(ch for ch in chunks if ch.choices and ch.choices[0].finish_reason)
    assert final.model_extra["aft"]["answers"][0]["layers"] == whole.model_extra["aft"]["answers"][0]["layers"]


def test_keep_alive_while_the_proposals_are_written():
    with serving(StreamingFake(first_delay=0.15), PA, keepalive=0.05) as srv:
        status, _, lines = post(srv, {"model": "m", "messages": USER, "stream": True})
    first_text = next(i for i, line in enumerate(lines) if '"content": "' in line and '"content": ""' not in line)
    assert status == 200 and sum(line == ": keep-alive" for line in lines[:first_text]) >= 4  # 2 layers of 0.15 s
    assert lines[-1] == "data: [DONE]"


def test_a_request_may_change_k_l_and_style_within_the_caps():
    engine = StreamingFake()
    with serving(engine, PA, max_k=4, max_num_aggregation=2) as srv:
        c = client(srv)
        out = c.chat.completions.create(model="m", messages=USER, seed=1,
                                        extra_body={"k": 2, "num_aggregation": 1, "style": "moa"})
        layers = out.model_extra["aft"]["answers"][0]["layers"]
        assert [(x["role"], x["outputs"]) for x in layers] == [("propose", 2), ("final", 1)]
        assert out.model_extra["aft"]["k"] == 2 and out.model_extra["aft"]["num_aggregation"] == 1
        proposer, aggregator = engine.requests[-2:]
        assert proposer.messages == USER and aggregator.messages[0]["content"].startswith(MOA_AGGREGATOR_TEMPLATE)
        for extra, param in (({"k": 5}, "k"), ({"num_aggregation": 3}, "num_aggregation"), ({"style": "x"}, "style")):
            status, _, err = post(srv, {"model": "m", "messages": USER, **extra})
            assert status == 400 and err["error"]["param"] == param


def test_a_prompt_whose_aggregation_cannot_fit_is_refused_with_the_counts():
    """The proposers' prompt fits the window, but the aggregator prompt of K proposals plus max_tokens does not."""
    engine = StreamingFake(context_window=120)
    with serving(engine, PA) as srv:
        status, _, err = post(srv, {"model": "m", "messages": USER, "max_tokens": 60})
        assert status == 400 and "aggregator prompt of 3 proposals needs at least" in err["error"]["message"]
        assert "context window (120)" in err["error"]["message"] and engine.requests == []
        assert post(srv, {"model": "m-plain", "messages": USER, "max_tokens": 60})[0] == 200  # one pass fits


def test_concurrent_pa_requests_share_engine_calls():
    """A non-continuous engine: P&A requests that arrive together run as one batch, layer by layer."""
    engine = StreamingFake(continuous=False)
    with serving(engine, PA) as srv:
        c = client(srv)
        alone = [c.chat.completions.create(model="m", messages=USER, seed=i).choices[0].message.content
                 for i in range(6)]
        engine.calls.clear()
        engine.first_delay = 0.05  # each engine call takes a while: the requests that arrive meanwhile wait together
        with ThreadPoolExecutor(6) as pool:
            together = list(pool.map(lambda i: c.chat.completions.create(model="m", messages=USER, seed=i)
                                     .choices[0].message.content, range(6)))
    assert together == alone
    assert len(engine.calls) < 6 * 3 and sum(map(len, engine.calls)) == 6 * 3


def test_several_proposer_models_write_the_proposals():
    proposer = StreamingFake()
    proposer.name = proposer.model = "other"
    aggregator = StreamingFake()
    with Server(make_service(aggregator, PA, "m", Limits(max_tokens=64), proposers=[aggregator, proposer])) as srv:
        out = client(srv).chat.completions.create(model="m", messages=USER, seed=2, extra_body={"return_trace": True})
    trace = out.model_extra["aft"]["answers"][0]["trace"]
    assert [o["proposer"] for o in trace[0]["outputs"]] == ["fake", "fake", "other"]
    assert len(proposer.requests) == 1 and len(aggregator.requests) == 3


def test_stream_equals_whole_on_a_real_tiny_model(tiny_engine):
    """The transformers engine behind the server: the streamed deltas make the same text as the whole answer."""
    pa = PAConfig(n=2, num_aggregation=1, sampling=Sampling(max_tokens=8, temperature=1.0))
    with serving(tiny_engine, pa, max_tokens=8) as srv:
        c = client(srv)
        for model in ("m", "m-plain"):
            whole = c.chat.completions.create(model=model, messages=USER, seed=3, temperature=1.0)
            streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
                model=model, messages=USER, seed=3, temperature=1.0, stream=True) if ch.choices)
            assert streamed == whole.choices[0].message.content and whole.usage.completion_tokens > 0


def _leave(srv, body: dict, until) -> None:
    """POST `body` on a raw connection, read lines until `until(line)` (streams; None: send and wait for nothing),
    then drop the connection as a client that goes away does."""
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    if until is not None:
        resp = conn.getresponse()
        while not until(resp.fp.readline().decode()):
            pass
    else:
        until_busy = time.monotonic() + 30
        while sum("prefill" not in s for s in srv.service.engine.step_log) < 3 and time.monotonic() < until_busy:
            time.sleep(0.005)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()


@pytest.mark.parametrize("model, stream", [("m-plain", True), ("m-plain", False), ("m", True)])
def test_a_client_that_leaves_frees_its_rows_at_once(tiny_engine, model, stream):
    """The transformers engine behind the server, max_tokens 1500: a client leaves a few tokens into its answer
    (a stream after three text chunks, a whole answer after three decode steps; the P&A model while its
    proposals are written, after the first keep-alive): its rows leave the decode batch within a few steps,
    the P&A aggregation never starts, and the gauges fall to zero."""
    pa = PAConfig(n=2, num_aggregation=1, sampling=Sampling(max_tokens=1500, temperature=1.0))
    body = {"model": model, "messages": USER, "stream": stream, "max_tokens": 1500, "seed": 5, "temperature": 1.0}
    texts = 0

    def until(line: str) -> bool:
        nonlocal texts
        texts += '"content": "' in line and '"content": ""' not in line
        return texts >= 3 or (model == "m" and line.startswith(": keep-alive"))

    tiny_engine.step_log = []
    try:
        with serving(tiny_engine, pa, max_tokens=1500, keepalive=0.05) as srv:
            _leave(srv, body, until if stream else None)
            left, deadline = len(tiny_engine.step_log), time.monotonic() + 10
            while (srv.metrics.running or tiny_engine.scheduler.batch.rows) and time.monotonic() < deadline:
                time.sleep(0.005)
            freed = len(tiny_engine.step_log)
            assert srv.metrics.running == srv.metrics.waiting == 0 and not tiny_engine.scheduler.batch.rows
            assert not tiny_engine.scheduler.queue
            deadline = time.monotonic() + 5
            while srv.metrics.count(status=499) < 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert srv.metrics.count(status=499) == 1 and srv.service.in_server == 0
        log = tiny_engine.step_log
    finally:
        tiny_engine.step_log = None
    decode = [s for s in log if "prefill" not in s]
    assert 1 <= len(decode) < 200  # the work had started; far from the 1500 tokens asked for
    assert freed - left < 50  # the steps between the client leaving and its rows leaving
    assert [s for s in log if "prefill" in s] == [{"prefill": 2 if model == "m" else 1}]  # no aggregation


# ---------------------------------------------------------------- lm-evaluation-harness
@pytest.mark.slow  # six P&A requests: about 10 s on a loaded 2-core machine
def test_lm_eval_local_chat_completions_gets_the_pa_answers(tiny_engine):
    """lm-evaluation-harness's `local-chat-completions` model (its own HTTP client, aiohttp with num_concurrent > 1)
    asks the server's P&A model the questions of examples/lm_eval/arith.jsonl, as `lm_eval --tasks aft_arith`
    would: each answer is the one the openai SDK gets for the same request (lm-eval sends seed 1234,
    temperature 0, its stop strings and max_gen_toks)."""
    pytest.importorskip("aiohttp")
    pytest.importorskip("tenacity")
    from lm_eval.api.instance import Instance
    from lm_eval.models.api_models import JsonChatStr
    from lm_eval.models.openai_completions import LocalChatCompletion

    rows = [json.loads(line) for line in (Path(__file__).parents[1] / "examples/lm_eval/arith.jsonl").open()][:3]
    chats = [[{"role": "user", "content": r["question"]}] for r in rows]
    gen = {"until": ["Question:"], "max_gen_toks": 8, "do_sample": False, "temperature": 0}
    pa = PAConfig(n=2, num_aggregation=1, sampling=Sampling(max_tokens=8, temperature=1.0))
    with serving(tiny_engine, pa, max_tokens=8) as srv:
        lm = LocalChatCompletion(base_url=f"{srv.base_url}/chat/completions", model="m", num_concurrent=1,
                                 max_retries=1, timeout=60)
        got = lm.generate_until([Instance("generate_until", {}, (JsonChatStr(json.dumps(chat)), dict(gen)), k)
                                 for k, chat in enumerate(chats)], disable_tqdm=True)
        c = client(srv)
        want = [c.chat.completions.create(model="m", messages=chat, seed=1234, temperature=0, max_tokens=8,
                                          stop=["Question:"]).choices[0].message.content for chat in chats]
        assert srv.metrics.count(model="m", status=200) == 2 * len(chats)
    assert got == want and any(want)
