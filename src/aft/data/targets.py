"""Targets: the aggregation the model learns to write.

    teacher    any engine answers exactly the aggregator messages the student
               will see at inference (`prompts.aggregator_messages`)
    best       the best-scored of the K proposals (cheap; for verifiable tasks)
    reference  the dataset's own reference answer ("pseudo-aggregation" ablation)

The `no-proposals` ablation is not a target but a prompt variant (query ->
the same target): see build.py.
"""

from __future__ import annotations

import math

from ..engines.base import Engine, Request, SamplingParams
from ..prompts import PromptStyle, aggregator_messages, fit_proposals
from .sources import Proposal

TARGETS = ("teacher", "best", "reference")


def best_index(proposals: list[Proposal]) -> int | None:
    """The highest-scored proposal (ties: the earlier one); None when none is scored."""
    scored = [(p.score, -i) for i, p in enumerate(proposals) if p.score is not None and not math.isnan(p.score)]
    return -max(scored)[1] if scored else None


def training_prompt(query: list[dict], texts: list[str], style: PromptStyle, engine: Engine | None,
                    max_tokens: int) -> tuple[list[dict], list[str], list[dict]]:
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
