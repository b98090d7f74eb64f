"""The data stage's unbiased selection and the programmatic teacher, with a deterministic fake proposer.

The fake answers every reasoning-gym question with scripted samples (right, off by one, a restated
question, a right answer cut at max_tokens), so which proposals are right is known exactly.
"""

import json
import re
from collections import Counter

import pytest

from aft.data.build import DataConfig, Resources, run_build
from aft.data.reasoning_gym import split_prompts
from aft.data.sources import Proposal, select
from aft.data.targets import ProgramTeacher, best_index
from aft.data.verify import is_correct
from aft.engines.base import Completion, Engine, Result, emit_whole
from aft.errors import AftError

TASK = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+", "-"],
        "allow_negation": False, "allow_parentheses": False}


def _solve(question: str) -> tuple[str, int]:
    a, op, b = re.search(r"Calculate (\d+) ([+-]) (\d+)\.", question).groups()
    expr = f"{a} {op} {b}"
    return expr, int(a) + int(b) if op == "+" else int(a) - int(b)


class ScriptedEngine(Engine):
    """Sample j of a question: j % 4 == 0 right, 1 off by one, 2 the question restated, 3 right but cut."""

    name = "scripted"
    model = "scripted"

    def __init__(self, script=(0, 1, 2, 3)):
        self.script = script
        self.requests = []

    def generate(self, requests, on_text=None):
        self.requests += requests
        out = []
        for r in requests:
            question = r.messages[-1]["content"].splitlines()[0]
            expr, ans = _solve(question)
            texts = {0: (f"{expr} = {ans}", "stop"), 1: (f"{expr} = {ans + 1}", "stop"), 2: (question, "stop"),
                     3: (f"{expr} = {ans}, and then", "length")}
            picks = [texts[self.script[j % len(self.script)]] for j in range(r.params.n)]
            comps = [Completion(text, 6, finish) for text, finish in picks]
            out.append(Result(comps, prompt_tokens=12, seeds=[None] * r.params.n))
        return emit_whole(out, on_text)

    def count_tokens(self, messages):
        return 12


def _cfg(tmp_path, **kw):
    base = dict(out=str(tmp_path / "data"), task="basic_arithmetic", task_config=TASK, n_prompts=8, eval_size=20,
                proposals="on_policy", k=4, m=4, select="all", target="teacher", teacher="program",
                max_tokens=16)
    return DataConfig(**{**base, **kw})


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- selection
def test_top_k_ties_are_broken_at_random_with_the_seed():
    props = [Proposal(f"t{i}", f"r{i}", 1.0) for i in range(4)] + [Proposal("w", "w", 0.0)]
    picks = Counter(tuple(select(props, 2, "top", seed)) for seed in range(200))
    assert len(picks) == 6  # every pair of the four tied proposals is drawn
    assert select(props, 2, "top", 5) == select(props, 2, "top", 5)
    assert all(4 not in p for p in picks)  # a lower score never beats a tie


def test_best_target_is_a_random_tied_proposal_never_a_truncated_one():
    props = [Proposal("a", "a", 1.0, finish_reason="length"), Proposal("b", "b", 1.0, finish_reason="stop"),
             Proposal("c", "c", 1.0, finish_reason="stop"), Proposal("d", "d", 0.0, finish_reason="stop")]
    chosen = Counter(best_index(props, seed) for seed in range(100))
    assert set(chosen) == {1, 2} and min(chosen.values()) > 20
    assert best_index([Proposal("a", "a", 1.0, finish_reason="length")], 0) is None


# ---------------------------------------------------------------- the program teacher
def test_program_teacher_reviews_the_proposals_and_ends_with_the_answer():
    train, _ = split_prompts("basic_arithmetic", 3, 5, TASK)
    item = train[0]
    expr, ans = _solve(item.meta["question"])
    proposals = [f"{expr} = {ans + 1}", item.meta["question"], f"{expr} = {ans}", f"so {ans + 1}"]
    text = ProgramTeacher().aggregate(item, proposals)
    assert text.splitlines()[0] == (f"Response 3 gets {ans}, which is right. Responses 1 and 4 get {ans + 1}, "
                                    f"but the answer is {ans}. Response 2 gives no answer.")
    assert text.splitlines()[1:] == [f"{expr} = {ans}", f"Answer: {ans}"]
    assert is_correct(text, item.answer, question=item.meta["question"])
    all_wrong = ProgramTeacher().aggregate(item, [f"{expr} = {ans + 1}"] * 2)
    assert all_wrong.startswith("None of the responses is right. Responses 1 and 2 get")
    assert ProgramTeacher().solve(item) == f"{expr} = {ans}\nAnswer: {ans}"
    last = ProgramTeacher("last").aggregate(item, proposals)  # solve first, then review, then the answer
    assert last.splitlines() == [f"{expr} = {ans}", text.splitlines()[0], f"Answer: {ans}"]
    assert is_correct(last, item.answer, question=item.meta["question"])


def test_build_passes_teacher_review_to_the_program_teacher(tmp_path):
    run_build(_cfg(tmp_path, teacher_review="last"), Resources(proposer=ScriptedEngine(script=(1, 2))))
    for a in _rows(tmp_path / "data" / "aft.jsonl"):
        lines = a["completion"][0]["content"].splitlines()
        assert lines[1].startswith("None of the responses is right.") and lines[-1].startswith("Answer: ")


def test_build_with_program_teacher_keeps_rows_where_every_proposal_is_wrong(tmp_path):
    eng = ScriptedEngine(script=(1, 2))  # every proposal wrong or no answer
    s = run_build(_cfg(tmp_path, pseudo_aggregation=True), Resources(proposer=eng))
    out = tmp_path / "data"
    aft, sft, pseudo = _rows(out / "aft.jsonl"), _rows(out / "sft.jsonl"), _rows(out / "aft_pseudo.jsonl")
    assert s.rows == 8 and s.skipped == 0 and len(aft) == len(sft) == len(pseudo) == 8
    for a, b, p in zip(aft, sft, pseudo):
        target = a["completion"][0]["content"]
        assert target.startswith("None of the responses is right.")
        assert is_correct(target, a["meta"]["answer"], question=a["meta"]["question"])
        assert p["prompt"] == a["prompt"]  # pseudo-aggregation: the same AFT inputs ...
        assert p["completion"] == b["completion"]  # ... and SFT's target: the solution without the review
        assert "Response" not in p["completion"][0]["content"]
        assert p["completion"][0]["content"] in target
        assert a["meta"]["teacher"] == "program" and a["meta"]["k"] == 4


def test_inference_matched_proposals_are_unfiltered_samples(tmp_path):
    eng = ScriptedEngine()
    run_build(_cfg(tmp_path, temperature=0.7, top_p=0.95, top_k=50, max_tokens=16), Resources(proposer=eng))
    aft = _rows(tmp_path / "data" / "aft.jsonl")
    assert all(len(r["meta"]["proposals"]) == 4 for r in aft)
    # the restated and the truncated samples stay among the proposals, as they would at inference
    assert all("length" in [c["finish_reason"] for c in r["meta"]["candidates"]] for r in aft)
    p = eng.requests[0].params
    assert (p.n, p.temperature, p.top_p, p.top_k, p.max_tokens) == (4, 0.7, 0.95, 50, 16)


class EchoTeacher(ScriptedEngine):
    """A teacher model: solves the question it is asked, whether with proposals or alone."""

    def generate(self, requests, on_text=None):
        self.requests += requests
        out = []
        for r in requests:
            expr, ans = _solve(r.messages[-1]["content"].splitlines()[0])
            review = "Reviewed.\n" if "aggregator" in r.messages[0]["content"] else ""
            out.append(Result([Completion(f"{review}{expr} = {ans}\nAnswer: {ans}", 9, "stop")], 20, [None]))
        return emit_whole(out, on_text)


def test_pseudo_aggregation_with_a_teacher_model_asks_it_the_query_alone(tmp_path):
    teacher = EchoTeacher()
    s = run_build(_cfg(tmp_path, teacher="some-model", pseudo_aggregation=True),
                  Resources(proposer=ScriptedEngine(), teacher=teacher))
    out = tmp_path / "data"
    aft, sft, pseudo = _rows(out / "aft.jsonl"), _rows(out / "sft.jsonl"), _rows(out / "aft_pseudo.jsonl")
    assert s.rows == 8 and len(teacher.requests) == 16  # an aggregation and a solution per row
    for a, b, p in zip(aft, sft, pseudo):
        assert a["completion"][0]["content"].startswith("Reviewed.")
        assert p["prompt"] == a["prompt"] and p["completion"] == b["completion"]
        assert "Reviewed" not in p["completion"][0]["content"]


def test_pseudo_aggregation_needs_a_teacher(tmp_path):
    with pytest.raises(AftError, match="pseudo_aggregation needs --target teacher"):
        run_build(_cfg(tmp_path, target="best", pseudo_aggregation=True), Resources(proposer=ScriptedEngine()))


def test_ceiling_of_the_fair_design_on_known_proposals(tmp_path):
    """examples/repro/ceiling.py on rows whose proposals are known: samples right, off by one, restated, cut."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "ceiling", Path(__file__).resolve().parents[1] / "examples" / "repro" / "ceiling.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    run_build(_cfg(tmp_path, scorer="verifier"), Resources(proposer=ScriptedEngine(script=(1, 2, 0, 3))))
    c = mod.ceiling(tmp_path / "data")
    # right and right-but-cut are correct: 2 of 4 per question
    assert c == {"questions": 8, "teacher_target_correct": 1.0, "target_copies_a_proposal": 0.0,
                 "oracle_best_of_4": 1.0, "by_correct_proposals": {"0": 0, "1": 0, "2+": 8, "all": 0}}
    run_build(_cfg(tmp_path, out=str(tmp_path / "wrong"), scorer="verifier"),
              Resources(proposer=ScriptedEngine(script=(1, 2))))
    c = mod.ceiling(tmp_path / "wrong")
    assert c["oracle_best_of_4"] == 0.0 and c["teacher_target_correct"] == 1.0
    assert c["by_correct_proposals"]["0"] == 8
