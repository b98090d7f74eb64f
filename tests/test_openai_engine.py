"""The openai engine against a real HTTP server (aft.serve) backed by a real tiny transformers model.

No mocks: a random-init Llama (hidden 64, 2 layers) with the embedded model's
tokenizer runs in HFEngine behind start_server on 127.0.0.1; the client is the
openai package. Greedy / seeded outputs through the server are compared with
the same engine called directly.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import pytest
import torch

from aft.engines import load_engine
from aft.engines.base import Request, SamplingParams, derive_seed
from aft.engines.hf import HFEngine
from aft.engines.openai import OpenAIEngine, split_total
from aft.errors import AftError
from aft.models import ModelSpec
from aft.serve import start_server

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def engine():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from aft.models import embedded_model_dir

    try:
        tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    except AftError as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return HFEngine(LlamaForCausalLM(cfg), tok, display_name=MODEL)


def _serve(engine, **opts):
    server, url = start_server(engine, **opts)
    yield server, url
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def server(engine):
    yield from _serve(engine)


@pytest.fixture(scope="module")
def server_ignoring_n(engine):
    yield from _serve(engine, honour_n=False)


def msgs(text="Hello there"):
    return [{"role": "user", "content": text}]


def client(url, **kw):
    kw.setdefault("max_retries", 0)
    kw.setdefault("timeout", 30)
    return OpenAIEngine(url, **kw)


def test_model_discovery_and_load_engine(server):
    _, url = server
    assert client(url).model == MODEL  # the server's first model
    eng = load_engine(ModelSpec("openai", url, name=MODEL), max_retries=0, dtype="bfloat16", max_concurrency=3)
    assert isinstance(eng, OpenAIEngine) and eng.model == MODEL and eng.max_concurrency == 3
    assert eng.count_tokens(msgs()) is None and eng.context_window is None


def test_n_honoured(engine, server):
    srv, url = server
    eng = client(url, model=MODEL)
    p = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=5)
    before = srv.stats["requests"]
    [res] = eng.generate([Request(msgs(), p)])
    assert srv.stats["requests"] - before == 1  # one call carries all n samples
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
    before = srv.stats["requests"]
    [first] = eng.generate([Request(msgs(), p)])
    assert srv.stats["requests"] - before == 3  # the probe with n=3 (1 choice back) + 2 single calls
    assert eng.honours_n is False
    assert len(first.completions) == 3 and len({c.text for c in first.completions}) == 3
    assert first.seeds == [11, derive_seed(11, 1), derive_seed(11, 2)]
    assert all(c.tokens > 0 for c in first.completions)
    # Remembered: the next call goes straight to one call per sample, and gives the same samples.
    before = srv.stats["requests"]
    [again] = eng.generate([Request(msgs(), p)])
    assert srv.stats["requests"] - before == 3
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


def test_concurrency_bounded_and_order_kept(engine, server):
    srv, url = server
    eng = client(url, model=MODEL, max_concurrency=2)
    reqs = [Request(msgs(f"question {i}"), SamplingParams(temperature=0.0, max_tokens=1 + i % 4)) for i in range(10)]
    srv.stats["max_in_flight"] = 0
    before = srv.stats["requests"]
    results = eng.generate(reqs)
    assert srv.stats["requests"] - before == 10
    assert 1 <= srv.stats["max_in_flight"] <= 2
    expected = [engine.generate([r])[0] for r in reqs]  # one at a time, as the server runs them
    assert [r.completions[0].text for r in results] == [r.completions[0].text for r in expected]
    assert [r.completions[0].tokens for r in results] == [1 + i % 4 for i in range(10)]


def test_unknown_model_is_a_clear_error(server):
    _, url = server
    eng = client(url, model="no-such-model")
    with pytest.raises(AftError) as e:
        eng.generate([Request(msgs(), SamplingParams(max_tokens=2))])
    msg = str(e.value)
    assert url in msg and "no-such-model" in msg and "404" in msg and MODEL in msg and "\n" not in msg


def test_bad_request_is_a_clear_error(server):
    eng = client(server[1], model=MODEL)
    with pytest.raises(AftError, match="top_p"):
        eng.generate([Request(msgs(), SamplingParams(top_p=0.0, max_tokens=2))])


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
                        ({"messages": msgs(), "stream": True}, "stream"), ({"messages": msgs(), "stop": 3}, "stop")]:
        status, err = call("/chat/completions", body)
        assert status == 400 and err["error"]["param"] == param and err["error"]["message"]
    assert call("/nowhere", {})[0] == 404


def test_split_total():
    assert split_total(10, ["aaaa", "a"]) == [8, 2]
    assert split_total(7, ["", "", ""]) == [3, 2, 2]
    assert sum(split_total(13, ["abc", "de", "f"])) == 13
