"""Targets: the aggregation the model learns to write.

    teacher    any engine answers exactly the aggregator messages the student
               will see at inference (`prompts.aggregator_messages`); or, with
               `--teacher program`, `ProgramTeacher` writes it for reasoning-gym
               tasks (a correct worked solution that reviews the proposals)
    best       the best-scored of the K proposals (cheap; for verifiable tasks;
               its ceiling is oracle best-of-K: it can only select)
    reference  the dataset's own reference answer

The `no-proposals` ablation is not a target but a prompt variant (query ->
the same target): see build.py.
"""

from __future__ import annotations

import math

from ..engines.base import Engine, Request, SamplingParams
from ..prompts import Cut, PromptStyle, aggregator_messages, fit_proposals
from .sources import Item, Proposal, ranked
from .verify import extract_answer, is_correct

TARGETS = ("teacher", "best", "reference")
PROGRAM = "program"  # the --teacher value of the programmatic teacher


def best_index(proposals: list[Proposal], seed: int) -> int | None:
    """The highest-scored proposal that was not cut at max_tokens (ties: drawn with `seed`); None when there is
    no such scored proposal."""
    usable = [i for i in ranked(proposals, seed)
              if proposals[i].finish_reason != "length" and proposals[i].score is not None
              and not math.isnan(proposals[i].score)]
    return usable[0] if usable else None


class ProgramTeacher:
    """A teacher that knows the answer: for reasoning-gym items (their reference answer and expression).

    `aggregate(item, proposals)` writes a short, correct worked solution in the embedded model's own
    style ("4 + 5 = 9"), ending with "Answer: x", with one line that reviews the proposals: which reach
    the right answer, which answer something else (and that the right value is x), which give none.
    `review_at` places that line: "first" (review, then solve: the line names the answer before the
    worked step computes it) or "last" (solve, then review, then "Answer: x").
    `solve(item)` writes the same solution without the review: the pseudo-aggregation and SFT target.
    It stands in for a strong teacher model; a model behind an endpoint takes its place through the same
    --teacher option.
    """

    model = PROGRAM
    REVIEW_AT = ("first", "last")

    def __init__(self, review_at: str = "first"):
        if review_at not in self.REVIEW_AT:
            raise ValueError(f"review_at must be one of {self.REVIEW_AT}, not {review_at!r}")
        self.review_at = review_at

    def steps(self, item: Item) -> str:
        """The worked solution without its final "Answer:" line."""
        meta = _rg_meta(item)
        answer = item.answer
        if isinstance(meta.get("answer_cot"), str) and meta["answer_cot"].strip():  # gsm_symbolic: its own steps
            steps = meta["answer_cot"].strip()
        elif meta.get("expression"):
            steps = f"{meta['expression']} = {answer}"
        else:
            steps = f"The answer is {answer}."
        return steps

    def solve(self, item: Item) -> str:
        return f"{self.steps(item)}\nAnswer: {item.answer}"

    def review(self, item: Item, proposals: list[str]) -> str:
        question = item.meta.get("question")
        task, entry, cfg = item.meta.get("task"), _entry(item), item.meta.get("task_config")
        right, none, wrong = [], [], {}
        for j, text in enumerate(proposals, 1):
            if is_correct(text, item.answer, task, entry, cfg, question=question):
                right.append(j)
                continue
            got = extract_answer(text, question)
            if got is None:
                none.append(j)
            else:
                wrong.setdefault(got, []).append(j)
        parts = []
        if right:
            parts.append(f"{_names(right)} {'gets' if len(right) == 1 else 'get'} {item.answer}, which is right.")
        else:
            parts.append("None of the responses is right.")
        for got, js in wrong.items():
            parts.append(f"{_names(js)} {'gets' if len(js) == 1 else 'get'} {got}, but the answer is {item.answer}.")
        if none:
            parts.append(f"{_names(none)} {'gives' if len(none) == 1 else 'give'} no answer.")
        return " ".join(parts)

    def aggregate(self, item: Item, proposals: list[str]) -> str:
        if self.review_at == "last":
            return f"{self.steps(item)}\n{self.review(item, proposals)}\nAnswer: {item.answer}"
        return self.review(item, proposals) + "\n" + self.solve(item)

    def describe(self) -> dict:
        return {"engine": "program", "model": PROGRAM, "review_at": self.review_at}

    def close(self) -> None:
        pass


def _names(js: list[int]) -> str:
    if len(js) == 1:
        return f"Response {js[0]}"
    return "Responses " + ", ".join(map(str, js[:-1])) + f" and {js[-1]}"


def _rg_meta(item: Item) -> dict:
    import json

    raw = item.meta.get("rg_metadata")
    return json.loads(raw) if raw else {}


def _entry(item: Item) -> dict | None:
    if not item.meta.get("task"):
        return None
    from .reasoning_gym import rg_entry

    return rg_entry(item.meta)


def training_prompt(query: list[dict], texts: list[str], style: PromptStyle, engine: Engine | None,
                    max_tokens: int) -> tuple[list[dict], list[str], list[Cut]]:
    """The aggregator messages for `texts` (proposals cut to fit the teacher's context if needed,
    as `aggregate.layer_messages` does at inference): (messages, proposals used, truncation info)."""
    window = engine.context_window if engine is not None else None
    if window:
        n = engine.count_tokens(aggregator_messages(query, texts, style))
        if n is not None and n + max_tokens > window:
            fit = fit_proposals(query, texts, engine.count_tokens, window - max_tokens, style)
            return aggregator_messages(query, fit.proposals, style), fit.proposals, fit.truncated
    return aggregator_messages(query, texts, style), texts, []


def teacher_requests(prompts: list[list[dict]], params: SamplingParams, seeds: list[int]) -> list[Request]:
    from dataclasses import replace

    return [Request(m, replace(params, n=1, seed=s)) for m, s in zip(prompts, seeds)]
