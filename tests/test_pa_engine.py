"""P&A as an engine (PAEngine), per-query pipelines on continuous engines, several proposer models (MoA).

Deterministic fake engines (conftest.FakeEngine): milliseconds, any CPU. The timing tests wait on events,
not on sleeps, so a slow machine makes them slower, never wrong.
"""

import json
import threading

import pytest
from conftest import FakeEngine

from aft.aggregate import (LayerTrace, PAConfig, PAEngine, Query, proposal_counts, propose_and_aggregate,
                           replay_messages)
from aft.engines.base import Request, Result, SamplingParams, derive_seed
from aft.errors import AftError
from aft.prompts import proposer_messages
from aft.sampling import Sampling

Q1 = [{"role": "user", "content": "What is 2 + 2?"}]
Q2 = [{"role": "user", "content": "Name a color."}]
Q3 = [{"role": "user", "content": "Count to three."}]
CFG = PAConfig(n=3, num_aggregation=2, sampling=Sampling(max_tokens=8, temperature=1.0), seed=11)


class Continuous(FakeEngine):
    """The fake engine, taking concurrent calls (as the openai engine and the HF scheduler do)."""

    continuous = True

    def __init__(self, name="fake", **kw):
        super().__init__(**kw)
        self.name = self.model = name
        self.lock = threading.Lock()
        self.events: list[tuple[str, str, str]] = []  # (start|end, role, question) in the order they happened

    def generate(self, requests, on_text=None):
        tags = [(_role(r), r.messages[-1]["content"].splitlines()[-1]) for r in requests]
        with self.lock:
            self.events += [("start", *t) for t in tags]
        try:
            self.wait(tags)
            return super().generate(requests, on_text)
        finally:
            with self.lock:
                self.events += [("end", *t) for t in tags]

    def wait(self, tags):
        pass


def _role(request) -> str:
    return "aggregate" if "aggregat" in request.messages[0]["content"] else "propose"


def texts(results):
    return [[[o.text for o in t.outputs] for t in r.trace] for r in results]


def test_proposals_spread_evenly_first_proposers_write_the_remainder():
    assert proposal_counts(3, 2) == [2, 1]
    assert proposal_counts(4, 2) == [2, 2]
    assert proposal_counts(5, 3) == [2, 2, 1]
    assert proposal_counts(1, 2) == [1, 0]


def test_no_layer_barrier_on_a_continuous_engine():
    """Query A's proposals are held until query B's aggregation has started: with pipelines that happens
    (B does not wait for A's layer); with a layer barrier it could not, and the wait would time out."""

    class SlowForA(Continuous):
        def __init__(self):
            super().__init__()
            self.b_aggregates = threading.Event()
            self.a_waited_for_b = None

        def wait(self, tags):
            if ("aggregate", "Name a color.") in tags:
                self.b_aggregates.set()
            if ("propose", "What is 2 + 2?") in tags:
                self.a_waited_for_b = self.b_aggregates.wait(timeout=10)

    eng = SlowForA()
    out = propose_and_aggregate(eng, [("a", Q1), ("b", Q2)], CFG)
    assert eng.a_waited_for_b is True
    assert all(len(c) == 1 for c in eng.calls)  # each call is one query's layer
    b_aggregates = eng.events.index(("start", "aggregate", "Name a color."))
    assert b_aggregates < eng.events.index(("end", "propose", "What is 2 + 2?"))
    assert [t.role for r in out for t in r.trace] == ["propose", "aggregate", "final"] * 2


def test_pipelines_and_layers_give_the_same_answers_traces_and_seeds():
    layered_engine, piped_engine = FakeEngine(), Continuous()
    layered = propose_and_aggregate(layered_engine, [("a", Q1), ("b", Q2), ("c", Q3)], CFG)
    piped = propose_and_aggregate(piped_engine, [("a", Q1), ("b", Q2), ("c", Q3)], CFG)
    assert len(layered_engine.calls) == 3 and len(piped_engine.calls) == 9  # one per layer / per query and layer
    strip = lambda r: {**r.to_dict(), "trace": [{**t.to_dict(), "batch_seconds": 0} for t in r.trace]}  # noqa: E731
    assert [strip(r) for r in piped] == [strip(r) for r in layered]
    assert len({o.text for r in piped for o in r.trace[0].outputs}) > 3  # really sampled, not constant


def test_progress_from_pipelines_is_per_query_and_layer_and_sums_up():
    calls, lock_held = [], []
    lock = threading.Lock()

    def on_layer(layer, seconds, tokens):
        lock_held.append(lock.acquire(blocking=False))  # never two callbacks at once
        calls.append((layer.index, tokens))
        lock.release()

    out = propose_and_aggregate(Continuous(), [(q, m) for q, m in (("a", Q1), ("b", Q2), ("c", Q3))], CFG, on_layer)
    assert sorted(i for i, _ in calls) == [0, 0, 0, 1, 1, 1, 2, 2, 2] and all(lock_held)
    assert sum(t for _, t in calls) == sum(o.tokens for r in out for t in r.trace for o in t.outputs)


def test_an_engine_error_in_one_pipeline_is_raised():
    class Unreachable(Continuous):
        def wait(self, tags):
            if ("aggregate", "Name a color.") in tags:
                raise AftError("cannot reach the server")

    with pytest.raises(AftError, match="cannot reach"):
        propose_and_aggregate(Unreachable(), [("a", Q1), ("b", Q2)], CFG)


class Named(FakeEngine):
    """A fake model with its own name, whose texts differ from another name's (the name is in the seed)."""

    def __init__(self, name, **kw):
        super().__init__(**kw)
        self.name = self.model = name

    def complete(self, messages, seed, j, params):
        c = super().complete(messages, derive_seed(self.model, seed), j, params)
        c.text = f"[{self.model}] {c.text}"
        return c


def test_several_proposers_share_the_proposals_and_the_trace_says_who_wrote_each():
    alpha, beta, judge = Named("alpha"), Named("beta"), Named("judge")
    cfg = PAConfig(n=3, num_aggregation=2, sampling=Sampling(max_tokens=8, temperature=1.0), seed=4)
    out = propose_and_aggregate(judge, [("a", Q1), ("b", Q2)], cfg, proposers=[alpha, beta])
    for rec, q in zip(out, (Q1, Q2)):
        proposals = rec.trace[0].outputs
        assert [o.proposer for o in proposals] == ["alpha", "alpha", "beta"]
        assert [o.text.split()[0] for o in proposals] == ["[alpha]", "[alpha]", "[beta]"]
        assert all(o.proposer is None for t in rec.trace[1:] for o in t.outputs)  # the aggregator's layers
        assert [o.text.split()[0] for t in rec.trace[1:] for o in t.outputs] == ["[judge]"] * 4
        assert rec.trace[0].prompt_tokens == 2 * alpha.count_tokens(proposer_messages(q))  # both requests
    # one call each per layer; alpha wrote 2 per query with the layer's seed (what one model gets), beta 1
    assert [len(alpha.calls), len(beta.calls), len(judge.calls)] == [1, 1, 2]
    layer_seed = derive_seed(derive_seed(4, "a"), 0)
    assert alpha.calls[0][0].params.n == 2 and alpha.calls[0][0].params.seed == layer_seed
    assert beta.calls[0][0].params.n == 1 and beta.calls[0][0].params.seed == derive_seed(layer_seed, "proposer", 1)
    alone = propose_and_aggregate(alpha, [("a", Q1)], cfg)  # alpha as the only model: same first two proposals
    assert [o.text for o in alone[0].trace[0].outputs][:2] == [o.text for o in out[0].trace[0].outputs][:2]
    # the trace, through a file, still rebuilds every message the aggregator received
    stored = [LayerTrace.from_dict(json.loads(json.dumps(t.to_dict()))) for t in out[0].trace]
    assert stored == out[0].trace and stored[0].to_dict()["outputs"][2]["proposer"] == "beta"
    assert replay_messages(Q1, stored, cfg.style)[1:] == [c[0].messages for c in judge.calls]
    assert "proposer" not in propose_and_aggregate(judge, [("a", Q1)], cfg)[0].trace[0].to_dict()["outputs"][0]


def test_a_proposer_that_fails_a_request_fails_that_query_naming_it():
    class RejectsColors(Named):
        def generate(self, requests, on_text=None):
            out = super().generate(requests, on_text)
            return [Result.failed("rejected (400)") if "color" in str(r.messages) else res
                    for r, res in zip(requests, out)]

    out = propose_and_aggregate(Named("judge"), [("a", Q1), ("b", Q2)], PAConfig(n=2, num_aggregation=1),
                                proposers=[Named("alpha"), RejectsColors("beta")])
    assert out[0].error is None and len(out[0].trace) == 2
    assert out[1].error == "layer 0: proposer beta: rejected (400)" and out[1].trace == []


def test_pa_engine_answers_requests_with_n_independent_runs():
    eng = FakeEngine()
    pa = PAEngine(eng, CFG)
    params = pa.default_params(n=2, seed=7)
    assert params.temperature == CFG.sampling.final_layer_temperature and params.max_tokens == 8
    streamed: dict = {}
    lock = threading.Lock()

    def on_text(i, j, delta):
        with lock:
            streamed[i, j] = streamed.get((i, j), "") + delta

    short = SamplingParams(n=1, temperature=0.0, max_tokens=3, seed=5)
    res = pa.generate([Request(Q1, params), Request(Q2, short)], on_text)
    assert [len(r.completions) for r in res] == [2, 1] and res[0].seeds == [7, derive_seed(7, 1)]
    assert streamed == {(i, j): c.text for i, r in enumerate(res) for j, c in enumerate(r.completions)}
    # run j is exactly P&A of the query with seed `seeds[j]`: what aft infer does for a query with that seed
    direct = propose_and_aggregate(FakeEngine(), [Query("x", Q1, 7), Query("y", Q1, derive_seed(7, 1))], CFG)
    assert [c.text for c in res[0].completions] == [d.response for d in direct]
    assert [[t.to_dict()["outputs"] for t in tr] for tr in res[0].traces] == \
           [[t.to_dict()["outputs"] for t in d.trace] for d in direct]
    # the request's own sampling is the final layer's; the other layers keep the config's
    finals = [r for r in eng.requests if r.params.n == 1]
    assert {(r.params.temperature, r.params.max_tokens) for r in finals} == {(CFG.sampling.final_layer_temperature, 8),
                                                                             (0.0, 3)}
    assert all(len(c.text.split()) <= 3 for c in res[1].completions)
    # usage counts every layer of every run
    for r in res:
        layers = [t for tr in r.traces for t in tr]
        assert r.usage() == (sum(t.prompt_tokens for t in layers), sum(o.tokens for t in layers for o in t.outputs))
        assert r.usage()[1] > sum(c.tokens for c in r.completions)
        assert r.prompt_tokens == r.traces[0][0].prompt_tokens


def test_pa_engine_unseeded_requests_get_fresh_recorded_seeds():
    pa = PAEngine(FakeEngine(), CFG)
    a, b = pa.generate([Request(Q1, pa.default_params(n=1)), Request(Q1, pa.default_params(n=1))])
    assert a.seeds != b.seeds and a.completions[0].text != b.completions[0].text
    again = pa.generate([Request(Q1, pa.default_params(n=1, seed=a.seeds[0]))])[0]
    assert again.completions[0].text == a.completions[0].text  # the recorded seed reproduces the answer


def test_pa_engine_failed_run_fails_the_request_and_keeps_the_traces():
    """A long query's proposals fit the context window, its aggregation cannot: that request fails at layer 1,
    with the proposals it cost in its trace and usage; the other request is answered."""
    long_q = [{"role": "user", "content": "word " * 150}]
    eng = FakeEngine()
    eng.context_window = eng.count_tokens(proposer_messages(long_q)) + 10
    pa = PAEngine(eng, PAConfig(n=2, num_aggregation=1, sampling=Sampling(max_tokens=4)))
    ok, bad = pa.generate([Request(Q1, pa.default_params(seed=1)), Request(long_q, pa.default_params(seed=1))])
    assert ok.error is None and len(ok.completions) == 1
    assert bad.error.startswith("layer 1: ") and bad.completions == [] and bad.seeds == []
    assert [t.role for t in bad.traces[0]] == ["propose"]
    assert bad.usage()[1] == sum(o.tokens for o in bad.traces[0][0].outputs) > 0


def test_pa_engine_is_continuous_when_its_engines_are_and_closes_each_once():
    closed = []

    class Closing(Continuous):
        def close(self):
            closed.append(self.model)

    agg, prop = Closing("agg"), Closing("prop")
    assert PAEngine(agg, CFG, [prop, prop]).continuous
    assert not PAEngine(agg, CFG, [FakeEngine()]).continuous
    PAEngine(agg, CFG, [agg, prop, prop]).close()
    assert sorted(closed) == ["agg", "prop"]


def test_eval_run_with_several_proposers(tmp_path):
    """`aft eval run` with proposers: P&A's proposals come from them (each model its own cache), the other
    strategies from --model; the proposers are part of what the P&A records file was written with."""
    from aft.evaluate.run import load_config, run_eval
    from conftest import FIXTURES

    flags = {"out": str(tmp_path / "ev"), "model": "judge", "tasks": [f"gsm8k:{FIXTURES / 'eval' / 'gsm8k_sample.jsonl'}"],
             "limit": 2, "max_tokens": 4, "strategies": ["sample", "pa:k=3,l=1"], "proposers": ["alpha", "beta"],
             "report": False}
    judge, alpha, beta = Named("judge"), Named("alpha"), Named("beta")
    s = run_eval(load_config(None, flags), engine=judge, proposers=[alpha, beta])
    assert s.answered == 4 and s.failed == 0
    folder = tmp_path / "ev" / "judge" / "gsm8k-gsm8k_sample"
    pa = [json.loads(line) for line in (folder / "pa-k3-l1.seed0.jsonl").open()]
    for rec in pa:
        assert [o["proposer"] for o in rec["trace"][0]["outputs"]] == ["alpha", "alpha", "beta"]
        assert rec["response"].startswith("[judge]")
    sample = [json.loads(line) for line in (folder / "sample.seed0.jsonl").open()]
    assert all(r["response"].startswith("[judge]") for r in sample)
    assert len(list((tmp_path / "ev" / "cache").glob("*.jsonl"))) == 3  # one per model
    meta = json.loads((folder / "pa-k3-l1.seed0.meta.json").read_text())
    assert len(meta["settings"]["proposer_fingerprints"]) == 2
    assert "proposer_fingerprints" not in json.loads((folder / "sample.seed0.meta.json").read_text())["settings"]
    # all done: nothing to answer; other proposers are refused for the P&A file only
    assert run_eval(load_config(None, flags), engine=judge, proposers=[alpha, beta]).answered == 0
    with pytest.raises(AftError, match="proposer_fingerprints"):
        run_eval(load_config(None, {**flags, "proposers": ["beta", "alpha"]}), engine=judge, proposers=[beta, alpha])
    assert run_eval(load_config(None, {**flags, "proposers": ["beta", "alpha"], "strategies": ["sample"]}),
                    engine=judge, proposers=[beta, alpha]).answered == 0


def test_the_eval_cache_keeps_pipelines_and_serves_them_back(tmp_path):
    """`aft eval run` puts a cache in front of the engine: on a continuous engine it stays continuous (P&A runs
    in pipelines through it, concurrent calls storing under its lock), and a rerun is served from the file."""
    from aft.evaluate.cache import CachedEngine

    queries = [("a", Q1), ("b", Q2), ("c", Q3)]
    inner = Continuous()
    cached = CachedEngine(inner, tmp_path / "c.jsonl", "fp")
    assert cached.continuous
    first = PAEngine(cached, CFG).run(queries)
    assert len(inner.calls) == 9  # one call per query and layer: pipelines
    cached.close()
    again = CachedEngine(Continuous(), tmp_path / "c.jsonl", "fp")
    second = PAEngine(again, CFG).run(queries)
    assert again.inner.calls == [] and again.hits == 9
    assert texts(second) == texts(first) == texts(propose_and_aggregate(FakeEngine(), queries, CFG))
