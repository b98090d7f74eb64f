"""The propose-and-aggregate loop on a deterministic fake engine (conftest.FakeEngine): milliseconds, any CPU."""

import json

import pytest
from conftest import FakeEngine

from aft.aggregate import (LayerTrace, PAConfig, generations_per_query, plan, propose_and_aggregate,
                           replay_messages)
from aft.engines.base import Result, emit_whole
from aft.errors import AftError
from aft.prompts import TRUNCATION_MARK, PromptStyle, aggregator_messages, proposer_messages
from aft.sampling import Sampling

Q1 = [{"role": "user", "content": "What is 2 + 2?"}]
Q2 = [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Red."},
      {"role": "user", "content": "Another one?"}]


@pytest.mark.parametrize("n, L, layers, total", [(5, 2, ["propose", "aggregate", "final"], 11),
                                                  (4, 1, ["propose", "final"], 5),
                                                  (3, 0, ["propose", "final"], 4),
                                                  (2, 3, ["propose", "aggregate", "aggregate", "final"], 7)])
def test_official_layer_semantics(n, L, layers, total):
    cfg = PAConfig(n=n, num_aggregation=L)
    p = plan(cfg)
    assert [layer.role for layer in p] == layers
    assert generations_per_query(cfg) == total
    assert p[-1].params.n == 1 and p[-1].params.temperature == cfg.sampling.final_layer_temperature
    assert p[-1].params.top_p == cfg.sampling.final_layer_top_p


def test_loop_is_layer_synchronous_and_feeds_outputs_forward(fake_engine):
    eng = fake_engine
    cfg = PAConfig(n=3, num_aggregation=2, sampling=Sampling(max_tokens=4), seed=5)
    out = propose_and_aggregate(eng, [("a", Q1), ("b", Q2)], cfg)
    assert len(eng.calls) == 3  # one engine call per layer, both queries in it
    assert all(len(c) == 2 for c in eng.calls)
    assert eng.calls[0][0].messages == proposer_messages(Q1)
    for layer in (1, 2):  # each aggregation sees exactly the previous layer's outputs, in order
        for qi, q in enumerate((Q1, Q2)):
            prev = [o.text for o in out[qi].trace[layer - 1].outputs]
            assert eng.calls[layer][qi].messages == aggregator_messages(q, prev)
    assert [r.params.n for r in eng.calls[1]] == [3, 3] and [r.params.n for r in eng.calls[2]] == [1, 1]
    for rec in out:
        assert [t.role for t in rec.trace] == ["propose", "aggregate", "final"]
        assert rec.response == rec.trace[-1].outputs[0].text
        # the engine's token counts and finish reasons are recorded as it returned them (a fake token is a word)
        for o in (o for t in rec.trace for o in t.outputs):
            assert o.tokens == len(o.text.split()) <= 4 and (o.finish_reason == "stop" or o.tokens == 4)
    assert {o.finish_reason for rec in out for t in rec.trace for o in t.outputs} == {"stop", "length"}


def test_same_seed_same_output_and_independent_of_batching(fake_engine):
    """Each query's seeds come from its id, not its place in the batch (the fake's outputs follow the seed)."""
    eng = fake_engine
    cfg = PAConfig(n=2, num_aggregation=1, sampling=Sampling(max_tokens=6), seed=3)
    both = propose_and_aggregate(eng, [("a", Q1), ("b", Q2)], cfg)
    again = propose_and_aggregate(eng, [("a", Q1), ("b", Q2)], cfg)
    alone = propose_and_aggregate(eng, [("b", Q2)], cfg)
    strip = lambda rec: [[o.text for o in t.outputs] for t in rec.trace]  # noqa: E731
    assert strip(both[0]) == strip(again[0]) and strip(both[1]) == strip(again[1])
    assert strip(both[1]) == strip(alone[0])
    other = propose_and_aggregate(eng, [("a", Q1)],
                                  PAConfig(n=2, num_aggregation=1, sampling=Sampling(max_tokens=6), seed=4))
    assert strip(other[0]) != strip(both[0])


def test_long_proposals_are_cut_to_fit_and_recorded():
    cfg = PAConfig(n=3, num_aggregation=1, sampling=Sampling(max_tokens=20, temperature=1.0, top_p=1.0), seed=1)
    eng = FakeEngine()
    proposals = [o.text for o in propose_and_aggregate(eng, [("a", Q1)], cfg)[0].trace[0].outputs]
    whole = eng.count_tokens(aggregator_messages(Q1, proposals))
    eng = FakeEngine(context_window=whole + 20 - 8)  # 8 tokens short of room for the whole proposals
    out = propose_and_aggregate(eng, [("a", Q1)], cfg)
    assert [o.text for o in out[0].trace[0].outputs] == proposals
    final = out[0].trace[1]
    assert final.truncated, "expected a truncation record"
    sent = eng.calls[1][0].messages[0]["content"]
    assert sent.count(TRUNCATION_MARK) == len(final.truncated)
    for t in final.truncated:  # each record names a proposal that was really cut, and by how much
        assert t.from_chars == len(proposals[t.index]) and t.to_chars < t.from_chars
        assert proposals[t.index][:t.to_chars] + TRUNCATION_MARK in sent
    assert all(f"{i}. " in sent for i in (1, 2, 3))  # no proposal dropped
    assert eng.count_tokens(eng.calls[1][0].messages) + 20 <= eng.context_window


def test_proposals_that_cannot_be_cut_to_fit_fail_their_query():
    eng = FakeEngine()
    floor = eng.count_tokens(aggregator_messages(Q1, ["", "", ""]))
    eng.context_window = floor + 20 + 2  # the empty proposals fit, but not three truncation marks
    out = propose_and_aggregate(eng, [("a", Q1)],
                                PAConfig(n=3, num_aggregation=1, sampling=Sampling(max_tokens=20), seed=1))
    assert "cannot be cut" in out[0].error and len(eng.calls) == 1


def test_a_query_that_does_not_fit_fails_alone():
    eng = FakeEngine(context_window=400)
    long_q = [{"role": "user", "content": "word " * 500}]
    out = propose_and_aggregate(eng, [("long", long_q), ("ok", Q1)],
                                PAConfig(n=2, num_aggregation=1, sampling=Sampling(max_tokens=4)))
    assert out[0].response is None and "context window" in out[0].error
    assert out[1].error is None and isinstance(out[1].response, str)
    assert all(len(c) == 1 for c in eng.calls)  # the failed query was never sent


def test_bad_width():
    with pytest.raises(AftError, match="n"):
        plan(PAConfig(n=0))


def test_the_trace_rebuilds_the_exact_messages_of_every_layer():
    """Shuffled and truncated proposals: query + trace + prompt style give back what the engine received."""
    style = PromptStyle.get("moa")
    cfg = PAConfig(n=3, num_aggregation=2, sampling=Sampling(max_tokens=20, temperature=1.0, top_p=1.0), seed=2,
                   shuffle=True, style=style)
    eng = FakeEngine()
    proposals = [o.text for o in propose_and_aggregate(eng, [("a", Q2)], cfg)[0].trace[0].outputs]
    eng = FakeEngine(context_window=eng.count_tokens(aggregator_messages(Q2, proposals, style)) + 20 - 8)
    trace = propose_and_aggregate(eng, [("a", Q2)], cfg)[0].trace
    assert [t.role for t in trace] == ["propose", "aggregate", "final"]
    assert any(c.to_chars > 0 for t in trace for c in t.truncated or []) and all(t.order for t in trace[1:])
    assert any(t.order != sorted(t.order) for t in trace[1:])  # else "order ignored" would pass too
    stored = [LayerTrace.from_dict(json.loads(json.dumps(t.to_dict()))) for t in trace]  # through a file
    assert stored == trace
    assert replay_messages(Q2, stored, style) == [call[0].messages for call in eng.calls]
    assert replay_messages(Q2, stored, PromptStyle.get("aft")) != [call[0].messages for call in eng.calls]


def test_trace_json_is_unchanged():
    """A layer as aft infer wrote it before the trace was a dataclass reads back and writes the same JSON."""
    old = {"layer": 1, "role": "final", "seed": 7, "prompt_tokens": 90,
           "outputs": [{"text": "4", "tokens": 2, "finish_reason": "stop", "seed": 11}], "batch_seconds": 0.25,
           "order": [1, 0], "truncated": [{"index": 0, "from_chars": 300, "to_chars": 120}]}
    assert LayerTrace.from_dict(old).to_dict() == old
    plain = {k: v for k, v in old.items() if k not in ("order", "truncated")}
    assert LayerTrace.from_dict(plain).to_dict() == plain


class RejectsOne(FakeEngine):
    """The fake engine, failing every request whose prompt mentions `bad` (as a server's 400 would)."""

    def __init__(self, bad):
        super().__init__()
        self.bad = bad

    def generate(self, requests, on_text=None):
        out = super().generate(requests)
        return emit_whole([Result.failed("rejected (400): bad prompt") if self.bad in str(r.messages) else res
                           for r, res in zip(requests, out)], on_text)


def test_a_failed_request_fails_only_its_query():
    """The engine fails one query's request: that query records why, at which layer; the others finish."""
    eng = RejectsOne("Name a color")
    out = propose_and_aggregate(eng, [("a", Q1), ("b", Q2)], PAConfig(n=2, num_aggregation=2))
    assert out[0].error is None and out[0].response is not None and len(out[0].trace) == 3
    assert out[1].response is None and out[1].error == "layer 0: rejected (400): bad prompt" and out[1].trace == []
    assert out[1].to_dict() == {"id": "b", "error": out[1].error, "trace": []}
    assert [len(c) for c in eng.calls] == [2, 1, 1]  # the failed query is not sent again
