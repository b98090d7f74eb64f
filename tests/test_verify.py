"""The verifier against a corpus of tricky responses (tests/fixtures/verify/responses.jsonl).

Each record: a question, its reference answer, a response, what must be extracted from it
(null: no answer) and whether it is correct. The corpus holds restated questions, partial
restatements, binary minus, wrong-then-corrected answers, several numbers, empty responses.
"""

import json
from pathlib import Path

import pytest

from aft.data.verify import extract_answer, is_correct, numbers, restates
from aft.evaluate.tasks import answer_key

CORPUS = [json.loads(line) for line in
          (Path(__file__).parent / "fixtures" / "verify" / "responses.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case", CORPUS, ids=[f"{i}-{c['kind']}" for i, c in enumerate(CORPUS)])
def test_corpus(case):
    assert extract_answer(case["response"], case["question"]) == case["extracted"]
    assert is_correct(case["response"], case["answer"], question=case["question"]) is case["correct"]


@pytest.mark.parametrize("case", [c for c in CORPUS if c["question"].startswith("Calculate")],
                         ids=lambda c: c["response"][:30])
def test_corpus_with_reasoning_gym_scoring(case):
    """The same verdicts when reasoning-gym's scorer is the fallback (how data and eval call it)."""
    entry = {"question": case["question"], "answer": case["answer"], "metadata": {}}
    assert is_correct(case["response"], case["answer"], task="basic_arithmetic", entry=entry) is case["correct"]


def test_the_corpus_covers_what_the_verifier_must_refuse():
    kinds = {c["kind"] for c in CORPUS}
    for needed in ("restated question", "partial restatement", "binary minus is not a sign", "wrong then corrected",
                   "several numbers, last one stated", "empty", "thousands separator", "fraction"):
        assert needed in kinds
    refused = [c for c in CORPUS if "restate" in c["kind"] and not c["correct"]]
    assert len(refused) >= 6


def test_operands_and_signs():
    nums = {n["text"]: n["operand"] for n in numbers("0 - 3 = -3 and 2 + -1")}
    assert nums == {"0": True, "3": True, "-3": False, "2": True, "-1": True}
    assert [n["text"] for n in numbers("x = −4")] == ["-4"]


def test_restates_needs_the_question():
    assert restates("Calculate 0 + 9.", "Calculate 0 + 9.")
    assert not restates("Calculate 0 + 9.", None)
    assert not restates("0 + 9 = 9", "Calculate 0 + 9.")


def test_vote_keys_ignore_restatements():
    assert answer_key("Calculate 0 + 9.", "Calculate 0 + 9.") is None
    assert answer_key("0 + 9 = 9", "Calculate 0 + 9.") == "9"
