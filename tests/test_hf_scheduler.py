"""The transformers engine's continuous batching (src/aft/engines/hf/scheduler.py), streaming, and the
fallback to plain `generate` for architectures the custom loop has not been checked on.

Tiny random-init models over the small tokenizer (1024 tokens, conftest.py) in float32, greedy: the texts
are compared exactly across schedules, which holds in fp32 on these models (a row's logits differ across batch
shapes only in the last bits; see test_batched_logits_agree_with_alone_up_to_rounding).
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

from aft.engines.base import CANCELLED, Request, SamplingParams  # noqa: E402
from aft.engines.hf import HFEngine  # noqa: E402
from aft.errors import AftError  # noqa: E402

SHORT = ["Hi", "What is the capital of France? Answer in one word."]
LONG = ["Write a long story about a dragon who learns to bake bread in a small village, with three chapters.",
        "Ok"]


def build(tokenizer, arch: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, initializer_range=0.3)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=1024, **{
            k: v for k, v in common.items() if k != "max_position_embeddings"})
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
        cfg = cls[0](hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, tie_word_embeddings=False, **common)
        model = cls[1](cfg)
    model = model.to(torch.float32).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@pytest.fixture(scope="module")
def engine(small_tokenizer):
    return HFEngine(build(small_tokenizer), small_tokenizer, display_name="tiny")


def req(q: str, **sp) -> Request:
    return Request([{"role": "system", "content": "\n"}, {"role": "user", "content": q}],
                   SamplingParams(**{"temperature": 0, "max_tokens": 24, **sp}))


def texts(results) -> list[list[str]]:
    return [[c.text for c in r.completions] for r in results]


def a_then_b(engine, a_reqs, on_a, b_reqs, b_go: threading.Event) -> tuple[dict, list, float]:
    """Call A here (streaming to `on_a`) and call B in another thread once `b_go` is set: their results
    ({"a": ..., "b": ...}), the engine's step log over both, and when A returned."""
    got: dict[str, list] = {}

    def call_b():
        b_go.wait(60)
        got["b"] = engine.generate(b_reqs)

    engine.step_log = []
    try:
        b = threading.Thread(target=call_b)
        b.start()
        got["a"] = engine.generate(a_reqs, on_text=on_a)
        returned = time.monotonic()
        b.join(60)
        log = engine.step_log
    finally:
        engine.step_log = None
    assert not b.is_alive()
    return got, log, returned


def test_a_call_joining_a_running_batch_gets_the_texts_it_gets_alone(engine):
    """Call A decodes; call B (one prompt longer than A's batch, one shorter) joins it after a few steps:
    some decode steps carry rows of both calls, and each call's texts are the ones it gets alone."""
    a_reqs = [req(q, max_tokens=40) for q in SHORT] + [req(SHORT[0], n=2, temperature=1.0, seed=3, max_tokens=40)]
    b_reqs = [req(q, max_tokens=12) for q in LONG]
    alone_a, alone_b = engine.generate(a_reqs), engine.generate(b_reqs)
    started = threading.Event()

    def on_a(i, j, delta):
        if engine.step_log and sum(1 for s in engine.step_log if "prefill" not in s) >= 3:
            started.set()

    got, log, _ = a_then_b(engine, a_reqs, on_a, b_reqs, started)
    assert started.is_set()
    mixed = [s for s in log if "prefill" not in s and len(s) == 2]
    assert mixed and max(sum(s.values()) for s in mixed) == 6  # A's 4 rows and B's 2 in one forward pass
    assert log[0] == {"prefill": 4} and {"prefill": 2} in log[1:]  # B's rows joined A's running batch
    # Greedy texts are compared exactly; the sampled request (last) only rides along: across batch shapes its
    # logits may differ by rounding, which can flip a sampled token on another CPU (hf package docstring).
    assert texts(got["a"])[:-1] == texts(alone_a)[:-1] and texts(got["b"]) == texts(alone_b)
    assert len(got["a"][-1].completions) == 2
    assert engine.scheduler.batch.rows == [] and engine.scheduler.batch.cache is None  # idle: no memory held
    assert [c.tokens for r in got["a"][:-1] for c in r.completions] == [
        c.tokens for r in alone_a[:-1] for c in r.completions]


def test_a_cancelled_call_leaves_the_batch_at_once_and_the_others_go_on(engine):
    """Call A (two requests, max_tokens 500) decodes; call B joins it; A is cancelled mid-decode (its requests'
    `cancel` events): A returns at once, each request CANCELLED, no later forward pass carries its rows, and B
    gets the texts it gets alone."""
    b_reqs = [req(q, max_tokens=16) for q in SHORT]
    alone_b = texts(engine.generate(b_reqs))
    cancel = threading.Event()
    a_reqs = [Request(r.messages, r.params, cancel) for r in (req(LONG[0], max_tokens=500),
                                                              req(SHORT[1], n=2, temperature=1.0, seed=1,
                                                                  max_tokens=500))]
    b_started, at = threading.Event(), []

    def decode_steps():
        return [s for s in engine.step_log if "prefill" not in s]

    def on_a(i, j, delta):
        steps = decode_steps()
        if len(steps) >= 3:
            b_started.set()
        if not cancel.is_set() and steps and len(steps[-1]) == 2 and sum(steps[-1].values()) == 5:
            at.append((len(engine.step_log), time.monotonic()))  # A's 3 rows and B's 2 in the last pass
            cancel.set()

    got, log, returned = a_then_b(engine, a_reqs, on_a, b_reqs, b_started)
    assert at
    a_id = next(iter(log[1]))  # the first decode step: A's alone
    assert [r.error for r in got["a"]] == [CANCELLED, CANCELLED] and all(not r.completions for r in got["a"])
    assert returned - at[0][1] < 2.0  # (a decode step of this model takes milliseconds; the machine is loaded)
    assert all(a_id not in s for s in log[at[0][0]:])  # no forward pass after the cancel carries A's rows
    assert sum(a_id in s for s in log) < 40  # far from the 500 tokens it asked for
    assert texts(got["b"]) == alone_b
    assert engine.scheduler.batch.rows == [] and not engine.scheduler.queue


def test_a_cancelled_request_waiting_in_the_queue_is_dropped(engine):
    """A request cancelled before its rows are admitted never runs; the call's other request is answered."""
    cancel = threading.Event()
    cancel.set()
    engine.step_log = []
    try:
        out = engine.generate([req(SHORT[0], max_tokens=6), Request(req(SHORT[1]).messages, req(SHORT[1]).params,
                                                                    cancel)])
        log = engine.step_log
    finally:
        engine.step_log = None
    assert out[1].error == CANCELLED and out[0].completions and out[0].error is None
    assert log[0] == {"prefill": 1}


def test_padded_prefill_blocks_join_like_grouped_ones(small_tokenizer):
    """The GPU's prefill (one left-padded batch: a block with a mask) gives the CPU's texts (grouped by length)."""
    eng = HFEngine(build(small_tokenizer), small_tokenizer, display_name="tiny")
    requests = [req(q, max_tokens=16) for q in SHORT + LONG] + [req(SHORT[0], n=2, temperature=1.0, seed=2)]
    grouped = texts(eng.generate(requests))
    eng.group_prefill = False
    eng.step_log = []
    assert texts(eng.generate(requests))[:-1] == grouped[:-1]  # greedy ones exactly (the sampled one: rounding)
    assert eng.step_log[0] == {"prefill": 6}


def test_concurrent_calls_answer_each_their_own(engine):
    """Four threads at once; each gets exactly its alone texts (greedy, fp32)."""
    calls = [[req(q, max_tokens=8 + 4 * k)] for k, q in enumerate(SHORT + LONG)]
    alone = [texts(engine.generate(c)) for c in calls]
    out: list = [None] * len(calls)

    def run(k):
        out[k] = texts(engine.generate(calls[k]))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert out == alone


def test_streamed_deltas_concatenate_to_the_final_texts_with_stop_strings_cut(engine):
    (full,) = engine.generate([req(LONG[0], max_tokens=30)])
    text = full.completions[0].text
    stop = text[len(text) // 2: len(text) // 2 + 4]  # mid-text, likely across tokens
    assert stop.strip() and text.find(stop) > 0
    requests = [req(LONG[0], max_tokens=30, stop=(stop,)), req(SHORT[1], n=2, temperature=1.0, seed=5, max_tokens=16),
                req(LONG[0], max_tokens=30, stop=("never there", text[:3] + "\u2603"))]
    deltas: dict[tuple[int, int], list[str]] = {}
    res = engine.generate(requests, on_text=lambda i, j, d: deltas.setdefault((i, j), []).append(d))
    assert res[0].completions[0].text == text[:text.find(stop)] and res[0].completions[0].finish_reason == "stop"
    for i, r in enumerate(res):
        for j, c in enumerate(r.completions):
            assert "".join(deltas[(i, j)]) == c.text
            assert all(deltas[(i, j)])  # no empty deltas
    assert len(deltas[(2, 0)]) > 5  # token by token, not once at the end
    assert res[2].completions[0].text == text  # a stop prefix held back, then sent when it is not a stop


def test_out_of_memory_on_a_decode_step_sends_rows_back_and_they_resume(small_tokenizer):
    """torch raises OutOfMemoryError only on a GPU; here the model raises it once on a decode step of more than
    4 rows. The newest half of the requests waits and resumes from its tokens: the same texts in the end."""
    eng = HFEngine(build(small_tokenizer), small_tokenizer, display_name="tiny")
    requests = [req(q, n=2, max_tokens=10) for q in SHORT + LONG[:1]]
    ref = texts(eng.generate(requests))
    raised = []

    def small_gpu(module, args, kwargs):
        if kwargs["input_ids"].shape == (6, 1) and not raised:
            raised.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory")

    hook = eng.lm.register_forward_pre_hook(small_gpu, with_kwargs=True)
    eng.step_log = []
    try:
        got = texts(eng.generate(requests))
    finally:
        hook.remove()
    assert raised and got == ref
    decode = [sum(s.values()) for s in eng.step_log if "prefill" not in s]
    assert decode[0] == 2 and max(decode) <= 4  # after the error: the oldest request alone, then fewer rows


def test_out_of_memory_admits_fewer_rows_then_names_a_single_request(small_tokenizer):
    eng = HFEngine(build(small_tokenizer), small_tokenizer, display_name="tiny")

    def small_gpu(module, args, kwargs):
        if kwargs["input_ids"].shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory")

    requests = [req(f"q{i}", n=2, max_tokens=3) for i in range(5)]
    ref = texts(eng.generate(requests))
    hook = eng.lm.register_forward_pre_hook(small_gpu, with_kwargs=True)
    eng.step_log = []
    try:
        assert texts(eng.generate(requests)) == ref
        assert max(sum(s.values()) for s in eng.step_log) <= 4
        with pytest.raises(AftError, match=r"out of GPU memory on a single request \(6 samples") as e:
            eng.generate([req("q", n=6, max_tokens=3)])
        assert "\n" not in str(e.value)
        assert texts(eng.generate(requests[:1])) == ref[:1]  # the engine still answers
    finally:
        hook.remove()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_checked_architectures_take_the_custom_loop_and_equal_generate(small_tokenizer, arch):
    eng = HFEngine(build(small_tokenizer, arch), small_tokenizer, display_name=arch)
    assert eng.custom and eng.continuous
    requests = [req(q, max_tokens=16) for q in SHORT + LONG]
    res = eng.generate(requests)
    for r, rq in zip(res, requests):
        ids = torch.tensor([eng.encode(rq.messages)])
        impl = eng.lm.config._attn_implementation
        eng.lm.set_attn_implementation("sdpa")
        try:
            with torch.inference_mode():
                out = eng.lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=16, pad_token_id=eng.pad_id)
        finally:
            eng.lm.set_attn_implementation(impl)
        new = out[0, ids.shape[1]:].tolist()
        new = new[:next((k for k, t in enumerate(new) if t in eng.eos_ids), len(new))]
        assert r.completions[0].text == eng.tok.decode(new, skip_special_tokens=True)


def test_an_unchecked_architecture_falls_back_to_generate_with_one_log_line(small_tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger="aft.engines.hf.engine"):
        eng = HFEngine(build(small_tokenizer, "gpt2"), small_tokenizer, display_name="tiny-gpt2")
    assert [r.getMessage() for r in caplog.records] == [
        "tiny-gpt2: model type 'gpt2' is not checked with the engine's own decode loop; using transformers' generate"]
    assert not eng.custom and not eng.continuous
    streamed = []
    res = eng.generate([req(SHORT[1], max_tokens=8), req(SHORT[0], n=2, temperature=1.0, seed=1, max_tokens=8)],
                       on_text=lambda i, j, d: streamed.append((i, j, d)))
    assert [len(r.completions) for r in res] == [1, 2]
    assert all(c.tokens > 0 and c.finish_reason in ("stop", "length") for r in res for c in r.completions)
    assert sorted(streamed) == sorted((i, j, c.text) for i, r in enumerate(res) for j, c in enumerate(r.completions))
    again = eng.generate([req(SHORT[0], n=2, temperature=1.0, seed=1, max_tokens=8)])
    assert texts(again) == texts(res[1:])  # a sample's text follows its seed


def test_pa_pipelines_step_in_lockstep_whatever_the_thread_timing(engine, monkeypatch):
    """P&A runs each query as its own pipeline (thread); with the engine in lockstep with them, the rows of
    every forward pass follow from the work alone. Random sleeps in the pipelines between their calls, and
    in a caller's thread as its call returns (a thread slow to wake up), must not change the sequence of
    forward passes (their shapes and each row's position), so neither can they change a text, in any dtype."""
    import random

    from aft.aggregate import PAConfig, propose_and_aggregate
    from aft.sampling import Sampling

    # a stop string ends rows at different steps: calls finish while others decode, and pipelines rejoin
    cfg = PAConfig(n=2, num_aggregation=1, sampling=Sampling(max_tokens=16, stop=("e",)), seed=7)
    queries = [(f"q{i}", [{"role": "user", "content": f"Question {i}: {'why ' * (i % 3)}?"}]) for i in range(6)]
    calls: list[tuple] = []

    def record(module, args, kwargs):
        ids, pos = kwargs["input_ids"], kwargs.get("position_ids")
        calls.append((tuple(ids.shape), None if pos is None else tuple(pos[:, 0].tolist())))

    def jitter(layer=None, seconds=None, tokens=None):  # on_layer: in the pipelines' threads, between calls
        time.sleep(random.random() * 0.02)

    run = engine.scheduler._run

    def slow_return(job):  # the call is done; its thread gets back to its caller late
        run(job)
        jitter()

    monkeypatch.setattr(engine.scheduler, "_run", slow_return)

    runs = []
    handle = engine.lm.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for _ in range(3):
            calls.clear()
            out = propose_and_aggregate(engine, queries, cfg, on_layer=jitter)
            runs.append((list(calls), [r.response for r in out]))
    finally:
        handle.remove()
    assert len(runs[0][0]) > 10 and all(r == runs[0] for r in runs[1:])
