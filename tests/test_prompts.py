import hashlib
from pathlib import Path

import pytest

from aft.errors import AftError
from aft.prompts import (TRUNCATION_MARK, PromptStyle, aggregator_messages, fit_proposals, proposer_messages,
                         shuffled, validate_messages)

SHARED_REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "aft_prompts.json"


def test_aft_style_is_byte_exact_with_the_released_checkpoints(reference_prompts):
    ex = reference_prompts["example"]
    assert proposer_messages(ex["query"]) == ex["proposer_messages"]
    assert aggregator_messages(ex["query"], ex["proposals"]) == ex["aggregator_messages"]
    style = PromptStyle.get("aft")
    assert style.template == reference_prompts["aft_aggregator_template"]
    assert style.proposer_system == reference_prompts["aft_proposer_system"]


# sha256 of shared/reference/aft_prompts.json, the released checkpoints' prompt strings, as taken
# into tests/fixtures/: pinned here so that the golden check runs on every clone, shared/ beside it or not.
REFERENCE_SHA256 = "815c407f6465a1819bd47026f387247401036e304631ef41244ee3efd0b8786c"


def test_fixture_is_the_released_reference():
    fixture = (Path(__file__).parent / "fixtures" / "aft_prompts.json").read_bytes()
    assert hashlib.sha256(fixture).hexdigest() == REFERENCE_SHA256
    if SHARED_REFERENCE.exists():  # where shared/ is beside the clone, it must still be the same file
        assert SHARED_REFERENCE.read_bytes() == fixture


def test_moa_style_uses_the_moa_template_and_no_proposer_system(reference_prompts):
    style = PromptStyle.get("moa")
    q = [{"role": "user", "content": "hi"}]
    assert proposer_messages(q, style) == q
    system = aggregator_messages(q, ["a", "b"], style)[0]["content"]
    assert system == reference_prompts["moa_aggregator_template"] + "\n1. a\n2. b"


def test_template_file_and_errors(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("Combine these:")
    msgs = aggregator_messages([{"role": "user", "content": "q"}], ["x"], PromptStyle.get(template_file=f))
    assert msgs[0]["content"] == "Combine these:\n1. x"
    with pytest.raises(AftError, match="unknown prompt style"):
        PromptStyle.get("fancy")
    with pytest.raises(AftError, match="missing.txt: no such aggregator template file"):
        PromptStyle.get(template_file=tmp_path / "missing.txt")


def test_multi_turn_and_own_system_message():
    q = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
         {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert proposer_messages(q) == q  # the query's own system message wins over "\n"
    agg = aggregator_messages(q, ["p"])
    assert agg[0]["content"].startswith("Be brief.\n\nYou are a helpful aggregator.")
    assert agg[1:] == q[1:]


def test_shuffle_is_seeded_and_a_permutation():
    props = [f"p{i}" for i in range(6)]
    a, order = shuffled(props, 7)
    assert sorted(a) == props and [props[i] for i in order] == a
    assert shuffled(props, 7) == (a, order)
    assert any(shuffled(props, s)[0] != a for s in range(8, 20))


def count_chars(messages):  # a stand-in tokenizer: one token per character
    return sum(len(m["content"]) for m in messages)


def test_fit_keeps_every_proposal_and_cuts_the_longest_first():
    q = [{"role": "user", "content": "question"}]
    props = ["short answer", "x" * 400, "y" * 200]
    base = count_chars(aggregator_messages(q, ["", "", ""]))
    budget = base + 12 + 150 + 150 + 2 * len(TRUNCATION_MARK)
    fit = fit_proposals(q, props, count_chars, budget)
    assert len(fit.proposals) == 3
    assert fit.proposals[0] == "short answer"  # the short one is untouched
    assert fit.proposals[1].endswith(TRUNCATION_MARK) and fit.proposals[2].endswith(TRUNCATION_MARK)
    assert fit.prompt_tokens <= budget
    assert {t.index for t in fit.truncated} == {1, 2}
    assert fit.truncated[0].from_chars == 400


def test_fit_is_a_no_op_when_it_fits_and_fails_when_the_query_alone_is_too_long():
    q = [{"role": "user", "content": "question"}]
    fit = fit_proposals(q, ["a", "b"], count_chars, 10_000)
    assert fit.proposals == ["a", "b"] and fit.truncated == []
    with pytest.raises(AftError, match="query alone"):
        fit_proposals([{"role": "user", "content": "q" * 5000}], ["a"], count_chars, 1000)


@pytest.mark.parametrize("bad, msg", [
    ([], "non-empty"),
    ([{"role": "user"}], "needs 'role' and 'content'"),
    ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "last message must be from the user"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}, {"role": "user", "content": "z"}],
     "only come first"),
])
def test_validate_messages(bad, msg):
    with pytest.raises(AftError, match=msg):
        validate_messages(bad, "f.jsonl:3: ")
