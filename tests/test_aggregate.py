import pytest

from aft.aggregate import PAConfig, generations_per_query, plan, propose_and_aggregate
from aft.engines.base import Engine
from aft.errors import AftError
from aft.prompts import TRUNCATION_MARK, aggregator_messages, proposer_messages


class Recording(Engine):
    """The real tiny engine, with every request it received kept for inspection."""

    def __init__(self, inner, context_window=None):
        self.inner, self.calls = inner, []
        self.context_window = context_window or inner.context_window

    def generate(self, requests):
        self.calls.append(requests)
        return self.inner.generate(requests)

    def count_tokens(self, messages):
        return self.inner.count_tokens(messages)


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
    assert p[-1].params.n == 1 and p[-1].params.temperature == cfg.final_layer_temperature
    assert p[-1].params.top_p == cfg.final_layer_top_p


def test_loop_is_layer_synchronous_and_feeds_outputs_forward(tiny_engine):
    eng = Recording(tiny_engine)
    cfg = PAConfig(n=3, num_aggregation=2, max_tokens=8, seed=5)
    out = propose_and_aggregate(eng, [("a", Q1), ("b", Q2)], cfg)
    assert len(eng.calls) == 3  # one engine call per layer, both queries in it
    assert all(len(c) == 2 for c in eng.calls)
    assert eng.calls[0][0].messages == proposer_messages(Q1)
    for layer in (1, 2):  # each aggregation sees exactly the previous layer's outputs, in order
        for qi, q in enumerate((Q1, Q2)):
            prev = [o["text"] for o in out[qi]["trace"][layer - 1]["outputs"]]
            assert eng.calls[layer][qi].messages == aggregator_messages(q, prev)
    assert [r.params.n for r in eng.calls[1]] == [3, 3] and [r.params.n for r in eng.calls[2]] == [1, 1]
    for rec in out:
        assert [t["role"] for t in rec["trace"]] == ["propose", "aggregate", "final"]
        assert rec["response"] == rec["trace"][-1]["outputs"][0]["text"]
        assert all(o["tokens"] <= 8 and o["finish_reason"] in ("stop", "length") for t in rec["trace"]
                   for o in t["outputs"])


def test_same_seed_same_output_and_independent_of_batching(tiny_engine):
    cfg = PAConfig(n=2, num_aggregation=1, max_tokens=6, seed=3)
    both = propose_and_aggregate(tiny_engine, [("a", Q1), ("b", Q2)], cfg)
    again = propose_and_aggregate(tiny_engine, [("a", Q1), ("b", Q2)], cfg)
    alone = propose_and_aggregate(tiny_engine, [("b", Q2)], cfg)
    strip = lambda rec: [[o["text"] for o in t["outputs"]] for t in rec["trace"]]  # noqa: E731
    assert strip(both[0]) == strip(again[0]) and strip(both[1]) == strip(again[1])
    assert strip(both[1]) == strip(alone[0])
    other = propose_and_aggregate(tiny_engine, [("a", Q1)], PAConfig(n=2, num_aggregation=1, max_tokens=6, seed=4))
    assert strip(other[0]) != strip(both[0])


def test_long_proposals_are_cut_to_fit_and_recorded(tiny_engine):
    floor = tiny_engine.count_tokens(aggregator_messages(Q1, ["", "", ""]))
    window = floor + 20 + 15  # room for about 15 proposal tokens; 3 proposals of 20 tokens are sampled
    eng = Recording(tiny_engine, context_window=window)
    cfg = PAConfig(n=3, num_aggregation=1, max_tokens=20, temperature=1.0, top_p=1.0, seed=1)
    out = propose_and_aggregate(eng, [("a", Q1)], cfg)
    final = out[0]["trace"][1]
    assert final["truncated"], "expected a truncation record"
    sent = eng.calls[1][0].messages[0]["content"]
    assert sent.count(TRUNCATION_MARK) == len(final["truncated"])
    assert all(f"{i}. " in sent for i in (1, 2, 3))  # no proposal dropped
    assert tiny_engine.count_tokens(eng.calls[1][0].messages) + 20 <= window


def test_a_query_that_does_not_fit_fails_alone(tiny_engine):
    eng = Recording(tiny_engine, context_window=400)
    long_q = [{"role": "user", "content": "word " * 500}]
    out = propose_and_aggregate(eng, [("long", long_q), ("ok", Q1)], PAConfig(n=2, num_aggregation=1, max_tokens=4))
    assert "error" in out[0] and "context window" in out[0]["error"]
    assert "response" in out[1]
    assert all(len(c) == 1 for c in eng.calls)  # the failed query was never sent


def test_bad_width():
    with pytest.raises(AftError, match="n"):
        plan(PAConfig(n=0))
