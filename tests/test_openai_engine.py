"""The openai engine against a real HTTP server (aft.serve) backed by a real tiny transformers model.

No mocks: a random-init Llama (hidden 64, 2 layers) with the embedded model's
tokenizer runs in HFEngine behind start_server on 127.0.0.1; the client is the
openai package. Greedy / seeded outputs through the server are compared with
the same engine called directly (the server runs one request at a time,
max_batch=1, so that both see the same batch shapes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from aft.engines import load_engine
from aft.engines.args import EngineArgs
from aft.engines.base import Engine, Request, SamplingParams, derive_seed
from aft.engines.hf import HFEngine
from aft.engines.openai import OpenAIEngine, split_total
from aft.errors import AftError
from aft.models import ModelSpec
from aft.prompts import PromptStyle
from aft.serve import Limits, start_server

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def engine(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return HFEngine(LlamaForCausalLM(cfg), tok, display_name=MODEL)


def _serve(engine):
    server, url = start_server(engine, limits=Limits(max_batch=1))
    yield server, url
    server.close()


class IgnoresN(Engine):
    """The engine behind a server that ignores n (llama.cpp's, some hosted ones): one choice per request."""

    def __init__(self, inner):
        self.inner, self.model, self.context_window = inner, inner.model, inner.context_window

    def generate(self, requests, on_text=None):
        return self.inner.generate([Request(r.messages, dataclasses.replace(r.params, n=1)) for r in requests],
                                   on_text)

    def count_tokens(self, messages):
        return self.inner.count_tokens(messages)


@pytest.fixture(scope="module")
def server(engine):
    yield from _serve(engine)


@pytest.fixture(scope="module")
def server_ignoring_n(engine):
    yield from _serve(IgnoresN(engine))


def msgs(text="Hello there"):
    return [{"role": "user", "content": text}]


def client(url, **kw):
    kw.setdefault("max_retries", 0)
    kw.setdefault("timeout", 30)
    return OpenAIEngine(url, **kw)


def test_model_discovery_and_load_engine(server):
    _, url = server
    assert client(url).model == MODEL  # the server's first model
    eng = load_engine(ModelSpec("openai", url, name=MODEL), max_retries=0, max_concurrency=3)
    assert isinstance(eng, OpenAIEngine) and eng.model == MODEL and eng.max_concurrency == 3
    # through EngineArgs: options of other engines (dtype) are not passed to this one
    eng2, spec = EngineArgs(model=f"{url}#{MODEL}", dtype="bfloat16", max_concurrency=2, max_retries=0,
                            timeout=7.5).open()
    assert spec.kind == "openai" and eng2.max_concurrency == 2 and eng2.timeout == 7.5 and eng2.max_retries == 0
    assert eng.count_tokens(msgs()) is None and eng.context_window is None


def test_n_honoured(engine, server):
    srv, url = server
    eng = client(url, model=MODEL)
    p = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=5)
    before = srv.metrics.count()
    [res] = eng.generate([Request(msgs(), p)])
    assert srv.metrics.count() - before == 1  # one call carries all n samples
    assert eng.honours_n is True
    [direct] = engine.generate([Request(msgs(), p)])  # the server runs the same engine with the same seeds
    assert [c.text for c in res.completions] == [c.text for c in direct.completions]
    assert len(res.completions) == 3 and len({c.text for c in res.completions}) == 3
    assert all(c.tokens > 0 and c.finish_reason in ("stop", "length") for c in res.completions)
    assert [c.finish_reason for c in res.completions] == [c.finish_reason for c in direct.completions]
    assert sum(c.tokens for c in res.completions) == sum(c.tokens for c in direct.completions)  # usage total is exact
    assert res.prompt_tokens == engine.count_tokens(msgs()) > 0


def test_same_seed_same_texts(server):
    eng = client(server[1], model=MODEL)
    req = lambda seed: Request(msgs("Tell me a story"), SamplingParams(n=2, temperature=1.0, max_tokens=6, seed=seed))
    a, b, c = eng.generate([req(1), req(1), req(2)])
    texts = lambda r: [x.text for x in r.completions]
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)


def test_fallback_when_server_ignores_n(server_ignoring_n):
    srv, url = server_ignoring_n
    eng = client(url, model=MODEL)
    p = SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=11)
    before = srv.metrics.count()
    [first] = eng.generate([Request(msgs(), p)])
    assert srv.metrics.count() - before == 3  # the probe with n=3 (1 choice back) + 2 single calls
    assert eng.honours_n is False
    assert len(first.completions) == 3 and len({c.text for c in first.completions}) == 3
    assert first.seeds == [11, derive_seed(11, 1), derive_seed(11, 2)]
    assert all(c.tokens > 0 for c in first.completions)
    # Remembered: the next call goes straight to one call per sample, and gives the same samples.
    before = srv.metrics.count()
    [again] = eng.generate([Request(msgs(), p)])
    assert srv.metrics.count() - before == 3
    assert [c.text for c in again.completions] == [c.text for c in first.completions]


def test_max_tokens_gives_length_and_stop_string_gives_stop(server):
    eng = client(server[1], model=MODEL)
    greedy = SamplingParams(temperature=0.0, max_tokens=3)
    [res] = eng.generate([Request(msgs(), greedy)])
    assert res.completions[0].finish_reason == "length" and res.completions[0].tokens == 3
    [long] = eng.generate([Request(msgs(), SamplingParams(temperature=0.0, max_tokens=12))])
    text = long.completions[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    [cut] = eng.generate([Request(msgs(), SamplingParams(temperature=0.0, max_tokens=12, stop=(stop,)))])
    assert cut.completions[0].finish_reason == "stop"
    assert cut.completions[0].text == text[:text.find(stop)]


def test_top_k_reaches_the_server(server):
    eng = client(server[1], model=MODEL)
    greedy = Request(msgs(), SamplingParams(temperature=0.0, max_tokens=6))
    top1 = Request(msgs(), SamplingParams(temperature=1.0, top_k=1, max_tokens=6, seed=3))  # top-1 sampling = greedy
    a, b = eng.generate([greedy, top1])
    assert a.completions[0].text == b.completions[0].text


class WaitsForCompany(Engine):
    """The engine, except that its first call waits (up to 10 s) until a second request is in the server: a
    client that sends two at once is then seen with two in flight, whatever the timing. Records the most
    requests seen in the server at once."""

    def __init__(self, inner):
        self.inner, self.model, self.context_window = inner, inner.model, inner.context_window
        self.server, self.waited, self.max_in_flight = None, False, 0

    def generate(self, requests, on_text=None):
        deadline = time.time() + 10
        while not self.waited and self.server.service.in_server < 2 and time.time() < deadline:
            time.sleep(0.005)
        self.waited = True
        self.max_in_flight = max(self.max_in_flight, self.server.service.in_server)
        return self.inner.generate(requests, on_text)

    def count_tokens(self, messages):
        return self.inner.count_tokens(messages)


def test_concurrency_bounded_and_order_kept(engine):
    gate = WaitsForCompany(engine)
    srv, url = start_server(gate, limits=Limits(max_batch=1))
    gate.server = srv
    try:
        eng = client(url, model=MODEL, max_concurrency=2)
        reqs = [Request(msgs(f"question {i}"), SamplingParams(temperature=0.0, max_tokens=1 + i % 4))
                for i in range(10)]
        results = eng.generate(reqs)
    finally:
        srv.close()
    assert srv.metrics.count() == 10
    assert gate.max_in_flight == 2  # two at once, never more
    expected = [engine.generate([r])[0] for r in reqs]  # one at a time, as the server runs them
    assert [r.completions[0].text for r in results] == [r.completions[0].text for r in expected]
    assert [r.completions[0].tokens for r in results] == [1 + i % 4 for i in range(10)]


def test_concurrent_generate_calls_share_one_bound(engine):
    """The engine is continuous: three threads call generate at once; max_concurrency bounds the calls in
    flight over all of them, each gets its own answers, and on_text receives each whole completion."""
    gate = WaitsForCompany(engine)
    srv, url = start_server(gate, limits=Limits(max_batch=1))
    gate.server = srv
    batches = [[Request(msgs(f"question {b}.{i}"), SamplingParams(temperature=0.0, max_tokens=2 + i))
                for i in range(3)] for b in range(3)]
    streamed: list[dict] = [{} for _ in batches]

    def run(b):
        def on_text(i, j, delta):
            streamed[b][i, j] = streamed[b].get((i, j), "") + delta
        return eng.generate(batches[b], on_text)

    try:
        eng = client(url, model=MODEL, max_concurrency=2)
        assert eng.continuous
        with ThreadPoolExecutor(3) as pool:
            outs = list(pool.map(run, range(3)))
    finally:
        srv.close()
    assert srv.metrics.count() == 9 and gate.max_in_flight == 2
    for batch, out, got in zip(batches, outs, streamed):
        assert [r.completions[0].text for r in out] == [engine.generate([r])[0].completions[0].text for r in batch]
        assert got == {(i, 0): r.completions[0].text for i, r in enumerate(out)}


def test_unknown_model_is_a_clear_error(server):
    _, url = server
    eng = client(url, model="no-such-model")
    with pytest.raises(AftError) as e:
        eng.generate([Request(msgs(), SamplingParams(max_tokens=2))])
    msg = str(e.value)
    assert url in msg and "no-such-model" in msg and "404" in msg and MODEL in msg and "\n" not in msg


def test_a_rejected_request_fails_alone(engine, server, server_ignoring_n):
    """The server answers 400 for one prompt (longer than its model's 512-token context) and for one bad
    parameter: those Results carry the server's reason; the rest of the batch is answered, as without them."""
    url = server[1]
    p = SamplingParams(n=2, temperature=0.0, max_tokens=4)
    long = msgs("word " * 600)
    ok, bad, bad_param = client(url, model=MODEL).generate(
        [Request(msgs(), p), Request(long, p), Request(msgs(), SamplingParams(top_p=0.0, max_tokens=2))])
    assert bad.completions == [] and url in bad.error and "(400)" in bad.error and "context window (512)" in bad.error
    assert bad_param.completions == [] and "top_p" in bad_param.error
    expected = [c.text for c in engine.generate([Request(msgs(), p)])[0].completions]
    assert ok.error is None and [c.text for c in ok.completions] == expected
    # a server that ignores n: each sample is its own call, and every one of the long prompt's is rejected
    eng = client(server_ignoring_n[1], model=MODEL)
    eng.honours_n = False
    bad, ok = eng.generate([Request(long, p), Request(msgs(), p)])
    assert bad.completions == [] and "context window" in bad.error and len(ok.completions) == 2


def test_infer_goes_on_when_the_server_rejects_one_query(server, tmp_path):
    """`aft infer` against that server: the query it rejects is recorded as failed, with the reason."""
    from aft.infer import InferConfig, run_infer

    inp = tmp_path / "q.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "prompt": q}) + "\n"
                           for i, q in enumerate(["Hi", "word " * 600, "What is 2 + 2?"])))
    out = tmp_path / "out.jsonl"
    summary = run_infer(InferConfig(model=f"{server[1]}#{MODEL}", input_file=str(inp), output_file=str(out), n=2,
                                    num_aggregation=1, max_tokens=4))
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary.done == 3 and summary.errors == 1
    assert "response" not in got[1] and got[1]["error"].startswith("layer 0: ") and "(400)" in got[1]["error"]
    assert got[1]["trace"] == []
    assert all("error" not in got[i] and [t["role"] for t in got[i]["trace"]] == ["propose", "final"] for i in (0, 2))
    meta = json.loads((tmp_path / "out.jsonl.config.json").read_text())
    assert PromptStyle(**meta["prompt_style"]) == PromptStyle.get("aft")  # what replay_messages needs


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refused_connection_is_a_clear_error():
    url = f"http://127.0.0.1:{closed_port()}/v1"
    t = time.time()
    eng = client(url, model="m", max_retries=1, timeout=2)
    with pytest.raises(AftError, match="cannot reach") as e:
        eng.generate([Request(msgs(), SamplingParams(max_tokens=2))])
    assert url in str(e.value) and "'m'" in str(e.value)
    with pytest.raises(AftError, match="cannot reach"):  # no model given: asking the server for one fails the same way
        client(url, max_retries=0, timeout=2)
    assert time.time() - t < 5


def test_server_speaks_openai_json(server):
    _, url = server

    def call(path, body=None):
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    status, models = call("/models")
    assert status == 200 and models["data"][0]["id"] == MODEL
    status, out = call("/chat/completions", {"model": MODEL, "messages": msgs(), "n": 2, "max_completion_tokens": 2,
                                             "stop": "\n", "seed": 1, "temperature": 0.5})
    assert status == 200 and [c["index"] for c in out["choices"]] == [0, 1]
    assert out["choices"][0]["message"]["role"] == "assistant"
    u = out["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["completion_tokens"] > 0
    for body, param in [(b"{not json", None), ({"messages": []}, "messages"), ({"messages": msgs(), "n": 0}, "n"),
                        ({"messages": msgs(), "temperature": -1}, "temperature"),
                        ({"messages": msgs(), "stop": 3}, "stop")]:
        status, err = call("/chat/completions", body)
        assert status == 400 and err["error"]["param"] == param and err["error"]["message"]
    assert call("/nowhere", {})[0] == 404


def test_split_total():
    assert split_total(10, ["aaaa", "a"]) == [8, 2]
    assert split_total(7, ["", "", ""]) == [3, 2, 2]
    assert sum(split_total(13, ["abc", "de", "f"])) == 13


# ------------------------------------------------------- servers of other kinds
# Canned answers on 127.0.0.1 that refuse requests the way llama.cpp's server and
# the hosted OpenAI API do; every request body is recorded.

class FakeServer:
    """Answers /v1/chat/completions with "sample <seed>" choices; `refuse(body)` -> (status, error) or None.
    With stream=true: server-sent events, one word of each choice per event, choices interleaved, then a usage
    event when stream_options.include_usage asks for it (as vLLM does)."""

    def __init__(self, refuse):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        import threading

        fake = self
        self.bodies: list[dict] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.bodies.append(body)
                refusal = refuse(body)
                text = f"sample {body.get('seed')} of {body.get('messages')[-1]['content']}"
                n = body.get("n", 1)
                if not refusal and body.get("stream"):
                    return self.stream(body, [f"{text} #{i}" for i in range(n)])
                if refusal:
                    status, out = refusal[0], {"error": refusal[1]}
                else:
                    out = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                           "choices": [{"index": i, "message": {"role": "assistant", "content": f"{text} #{i}"},
                                        "finish_reason": "stop"} for i in range(n)],
                           "usage": {"prompt_tokens": 5, "completion_tokens": 4 * n, "total_tokens": 5 + 4 * n}}
                    status = 200
                data = json.dumps(out).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def stream(self, body, texts):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                head = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": body["model"]}
                words = [t.split(" ") for t in texts]
                for w in range(max(len(ws) for ws in words)):
                    for i, ws in enumerate(words):
                        if w < len(ws):
                            last = w == len(ws) - 1
                            delta = {"content": ws[w] + ("" if last else " ")}
                            choice = {"index": i, "delta": delta, "finish_reason": "stop" if last else None}
                            self.wfile.write(f"data: {json.dumps({**head, 'choices': [choice]})}\n\n".encode())
                            self.wfile.flush()
                if body.get("stream_options", {}).get("include_usage"):
                    usage = {"prompt_tokens": 5, "completion_tokens": 4 * len(texts), "total_tokens": 5 + 4 * len(texts)}
                    self.wfile.write(f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def llama_cpp(body):
    """llama.cpp's server: n > 1 is an error (HTTP 500), unknown fields are ignored."""
    if body.get("n", 1) != 1:
        return 500, {"code": 500, "message": "Only one completion choice is allowed", "type": "server_error"}


def hosted_openai(body):
    """The hosted API with a reasoning model: no vLLM extensions, no max_tokens, no stop."""
    for name in ("top_k", "repetition_penalty", "min_p"):
        if name in body:
            return 400, {"message": f"Unrecognized request argument supplied: {name}",
                         "type": "invalid_request_error", "param": None, "code": None}
    for name in ("max_tokens", "stop"):
        if name in body:
            return 400, {"message": f"Unsupported parameter: '{name}' is not supported with this model.",
                         "type": "invalid_request_error", "param": name, "code": "unsupported_parameter"}


@pytest.fixture
def fake():
    servers = []

    def start(refuse):
        servers.append(FakeServer(refuse))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_llama_cpp_refusing_n_falls_back_to_single_samples(fake):
    srv = fake(llama_cpp)
    eng = client(srv.url, model="m", max_retries=3)  # the probe is not retried, whatever max_retries is
    p = SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=11)
    [first] = eng.generate([Request(msgs("q"), p)])
    seeds = [11, derive_seed(11, 1), derive_seed(11, 2)]
    assert [b["n"] for b in srv.bodies] == [3, 1, 1, 1]
    assert eng.honours_n is False and first.seeds == seeds
    assert [c.text for c in first.completions] == [f"sample {s} of q #0" for s in seeds]
    # Remembered: the next batch goes straight to single calls and gives the same samples.
    srv.bodies.clear()
    [again, other] = eng.generate([Request(msgs("q"), p), Request(msgs("r"), SamplingParams(n=2, seed=1))])
    assert sorted(b["n"] for b in srv.bodies) == [1] * 5
    assert [c.text for c in again.completions] == [c.text for c in first.completions]
    assert len(other.completions) == 2


def collect():
    """An on_text that gathers the deltas of each completion (and counts them)."""
    got: dict = {}

    def on_text(i, j, delta):
        got.setdefault((i, j), []).append(delta)

    return got, on_text


def test_streamed_texts_arrive_in_pieces_and_add_up(fake):
    srv = fake(lambda body: None)
    eng = client(srv.url, model="m")
    got, on_text = collect()
    reqs = [Request(msgs("q"), SamplingParams(n=2, seed=3, max_tokens=8)), Request(msgs("r"), SamplingParams(seed=4))]
    res = eng.generate(reqs, on_text)
    assert all(b["stream"] and b["stream_options"] == {"include_usage": True} for b in srv.bodies)
    assert {k: "".join(v) for k, v in got.items()} == {(i, j): c.text for i, r in enumerate(res)
                                                       for j, c in enumerate(r.completions)}
    assert all(len(v) > 1 for v in got.values())  # streamed word by word, not whole
    assert res[0].completions[0].text == "sample 3 of q #0" and res[0].prompt_tokens == 5
    assert [c.tokens for c in res[0].completions] == split_total(8, ["sample 3 of q #0", "sample 3 of q #1"])
    assert eng.generate(reqs)[0].completions == res[0].completions  # the same answers without streaming


def test_streaming_falls_back_where_the_server_refuses_n_or_stop(fake):
    srv = fake(llama_cpp)
    got, on_text = collect()
    [res] = client(srv.url, model="m").generate([Request(msgs("q"), SamplingParams(n=2, seed=3))], on_text)
    assert {k: "".join(v) for k, v in got.items()} == {(0, j): c.text for j, c in enumerate(res.completions)}
    srv = fake(hosted_openai)  # refuses stop: the texts are cut here, then passed on whole
    got, on_text = collect()
    [res] = client(srv.url, model="m").generate([Request(msgs("q"), SamplingParams(seed=3, stop=(" of",)))], on_text)
    assert res.completions[0].text == "sample 3" and got == {(0, 0): ["sample 3"]}


def test_a_bad_request_with_n_is_not_taken_for_a_refusal_of_n(server):
    eng = client(server[1], model=MODEL)
    [res] = eng.generate([Request(msgs(), SamplingParams(n=2, top_p=0.0, max_tokens=2))])
    assert res.completions == [] and "top_p" in res.error  # the request fails alone
    assert eng.honours_n is None  # the 400 named top_p, not n


def test_hosted_api_refused_parameters_are_dropped_and_remembered(fake):
    srv = fake(hosted_openai)
    eng = client(srv.url, model="o-model")
    p = SamplingParams(n=2, temperature=1.0, top_k=5, max_tokens=7, seed=3, stop=(" of",))
    [res] = eng.generate([Request(msgs("q"), p)])
    assert eng.refused == {"top_k", "repetition_penalty", "min_p", "max_tokens", "stop"}
    last = srv.bodies[-1]
    assert last["max_completion_tokens"] == 7 and last["temperature"] == 1.0 and last["seed"] == 3
    assert not {"max_tokens", "top_k", "stop", "repetition_penalty", "min_p"} & set(last)
    # The stop string the server would not take is applied here.
    assert [c.text for c in res.completions] == ["sample 3", "sample 3"]
    assert [c.finish_reason for c in res.completions] == ["stop", "stop"]
    # Remembered: the next call is accepted at once.
    calls = len(srv.bodies)
    eng.generate([Request(msgs("q"), p)])
    assert len(srv.bodies) == calls + 1
    assert eng.describe()["refused_parameters"] == ["max_tokens", "min_p", "repetition_penalty", "stop", "top_k"]


def test_neutral_sampling_values_are_sent_when_the_user_set_none(fake):
    # vllm serve fills an omitted top_k, repetition_penalty or min_p from generation_config.json.
    srv = fake(lambda body: None)
    eng = client(srv.url, model="m")
    eng.generate([Request(msgs(), SamplingParams(temperature=0.7, top_p=0.9)),
                  Request(msgs(), SamplingParams(top_k=50))])
    off, k50 = sorted(srv.bodies, key=lambda b: b["top_k"])
    assert off["top_k"] == -1 and off["repetition_penalty"] == 1.0 and off["min_p"] == 0.0
    assert off["temperature"] == 0.7 and off["top_p"] == 0.9 and off["max_tokens"] == SamplingParams.max_tokens
    assert k50["top_k"] == 50


# ------------------------------------------------- cancellation, the pool-wide warning (aft serve upstream)
UP = [{"role": "user", "content": "Count for me."}]


def test_a_cancelled_request_is_given_up_at_once_and_its_neighbour_is_answered():
    """Against `aft serve` streaming a word every 0.015 s: request A's cancel event is set at its first word (it
    is streamed, as every cancellable request is): generate stops waiting for it and closes its stream (the
    upstream server counts a client that left); request B of the same call gets its whole answer."""
    from conftest import StreamingFake

    from aft.engines.base import CANCELLED
    from aft.serve import Server, make_service

    with Server(make_service(StreamingFake(delay=0.015), name="up")) as srv:
        eng = OpenAIEngine(srv.base_url, model="up", max_retries=0)
        want = eng.generate([Request(UP, SamplingParams(seed=2, max_tokens=64))])[0].completions[0].text
        cancel = threading.Event()
        first = []

        def on_text(i, j, delta):
            if i == 0 and not cancel.is_set():
                first.append(time.monotonic())
                cancel.set()

        out = eng.generate([Request(UP, SamplingParams(seed=1, max_tokens=64), cancel),
                            Request(UP, SamplingParams(seed=2, max_tokens=64))], on_text=on_text)
        deadline = time.monotonic() + 5
        while (srv.metrics.count(status=499), srv.metrics.count(status=200)) < (1, 2) and time.monotonic() < deadline:
            time.sleep(0.01)  # the server counts a stream once it has sent its end, maybe after the client read it
        assert srv.metrics.count(status=499) == 1 and srv.metrics.count(status=200) == 2  # A left; B and `want`
        eng.close()
    assert out[0].error == CANCELLED and not out[0].completions
    assert out[1].error is None and out[1].completions[0].text == want


def test_a_request_cancelled_before_it_is_sent_is_never_sent():
    from conftest import StreamingFake

    from aft.engines.base import CANCELLED
    from aft.serve import Server, make_service

    upstream = StreamingFake()
    with Server(make_service(upstream, name="up")) as srv:
        eng = OpenAIEngine(srv.base_url, model="up", max_retries=0)
        cancel = threading.Event()
        cancel.set()
        out = eng.generate([Request(UP, SamplingParams(seed=1), cancel), Request(UP, SamplingParams(seed=2))])
        eng.close()
    assert out[0].error == CANCELLED and out[1].completions and len(upstream.requests) == 1


def test_unanswered_requests_get_one_warning_per_period_for_the_whole_engine(caplog):
    """Eight concurrent generate calls (per-query pipelines make many) wait 1.2 s on a slow server; with a
    warning period of 0.5 s (timeout / 3) the engine logs once per period for all of them, naming how many
    wait and for how long, not once per call."""
    from conftest import StreamingFake

    from aft.serve import Server, make_service

    with Server(make_service(StreamingFake(first_delay=1.2), name="up")) as srv:
        eng = OpenAIEngine(srv.base_url, model="up", max_retries=0, timeout=1.5)
        with caplog.at_level(logging.WARNING, logger="aft.engines.openai"), ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda k: eng.generate([Request(UP, SamplingParams(seed=k))]), range(8)))
        eng.close()
    assert all(o[0].completions for o in outs)
    said = [r.getMessage() for r in caplog.records if "unanswered" in r.getMessage()]
    times = [r.created for r in caplog.records if "unanswered" in r.getMessage()]
    assert said and all(b - a >= 0.45 for a, b in zip(times, times[1:])), said  # one per period, for all calls
    assert int(re.search(r": (\d+) requests? unanswered, the oldest for 0\.[5-9] s", said[0])[1]) > 1, said
