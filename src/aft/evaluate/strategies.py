"""Answering strategies, all on the same engine, messages and seeds.

    greedy                       one answer, temperature 0
    sample                       one sampled answer
    pa:k=K,l=L                   propose-and-aggregate, K proposals, L aggregation layers
                                 (official semantics: max(1, L) layers, the final one
                                 included; l=0 here means no aggregation = `sample`)
    best_of_n:n=N,scorer=S       N samples, the one the scorer ranks first; S = verifier
                                 (an ORACLE: it reads the reference answer) or
                                 reward_model (the fair one; needs `reward_model`)
    majority:n=N                 self-consistency: N samples, the most frequent extracted
                                 answer (ties: the answer that came first in sample order)

Every strategy asks with the proposer messages of prompts.py (what `aft data`
trains on and what P&A's first layer sends). A question's seed is
derive_seed(run seed, question id), and its samples come from the request
P&A's proposal layer sends (seed derive_seed(question seed, 0), the same
sampling parameters): `sample` is P&A's first proposal, and the N samples of
best-of-N / majority are P&A's first N proposals. The comparison between
strategies is paired, and with the cache (cache.py) shared samples are
generated once.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, replace

from ..aggregate import PAConfig, PAEngine
from ..data.scorers import failure, score_safely
from ..data.verify import extract_answer
from ..engines.base import Engine, Request, derive_seed, share_seconds
from ..errors import AftError
from ..prompts import PromptStyle, proposer_messages
from ..sampling import Sampling
from .compute import Usage
from .tasks import Task, answer_key

log = logging.getLogger(__name__)

KINDS = ("greedy", "sample", "pa", "best_of_n", "majority")
SCORER_KINDS = ("verifier", "reward_model")


@dataclass(frozen=True)
class Strategy:
    kind: str
    k: int = 1  # P&A width
    l: int = 0  # P&A depth (aggregation layers)
    n: int = 1  # samples (best-of-N, majority)
    scorer: str = ""  # best-of-N

    @property
    def name(self) -> str:
        if self.kind == "pa":
            return f"pa-k{self.k}-l{self.l}"
        if self.kind == "best_of_n":
            return f"bon-n{self.n}-{'oracle' if self.scorer == 'verifier' else 'rm'}"
        if self.kind == "majority":
            return f"majority-n{self.n}"
        return self.kind

    @property
    def label(self) -> str:
        """Human-readable, for reports."""
        return {"greedy": "greedy", "sample": "one sample",
                "pa": f"P&A K={self.k} L={self.l}",
                "best_of_n": f"best-of-{self.n} ({'verifier ORACLE' if self.scorer == 'verifier' else 'reward model'})",
                "majority": f"majority of {self.n}"}[self.kind]

    @property
    def width(self) -> int:
        """Samples in the proposal request (bigger first lets the cache serve the smaller)."""
        return self.k if self.kind == "pa" else self.n

    def to_dict(self) -> dict:
        return {"kind": self.kind, "k": self.k, "l": self.l, "n": self.n, "scorer": self.scorer, "name": self.name,
                "label": self.label}


def parse_strategy(spec: str) -> Strategy:
    """'greedy', 'sample', 'pa:k=4,l=1', 'best_of_n:n=8,scorer=verifier', 'majority:n=8' (also 'bon', 'maj')."""
    text = str(spec).strip()
    kind, _, rest = text.partition(":")
    kind = {"bon": "best_of_n", "best-of-n": "best_of_n", "maj": "majority", "vote": "majority",
            "one_sample": "sample", "p&a": "pa"}.get(kind.strip().lower(), kind.strip().lower())
    if kind not in KINDS:
        raise AftError(f"strategy {spec!r}: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    args: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in re.split(r"[,\s]+", rest))):
        key, eq, value = part.partition("=")
        if not eq:
            raise AftError(f"strategy {spec!r}: expected key=value, got {part!r}")
        args[key.strip().lower()] = value.strip()
    allowed = {"greedy": set(), "sample": set(), "pa": {"k", "l"}, "best_of_n": {"n", "scorer"},
               "majority": {"n"}}[kind]
    if set(args) - allowed:
        raise AftError(f"strategy {spec!r}: unknown argument(s) {sorted(set(args) - allowed)}"
                       f"{'; allowed: ' + ', '.join(sorted(allowed)) if allowed else ''}")
    try:
        ints = {k: int(v) for k, v in args.items() if k in ("k", "l", "n")}
    except ValueError:
        raise AftError(f"strategy {spec!r}: k, l and n must be integers") from None
    if any(v < (0 if k == "l" else 1) for k, v in ints.items()):
        raise AftError(f"strategy {spec!r}: k and n must be >= 1, l >= 0")
    if kind == "pa":
        if "k" not in ints or "l" not in ints:
            raise AftError(f"strategy {spec!r}: P&A needs k and l, e.g. pa:k=4,l=1")
        if ints["l"] == 0:
            return Strategy("sample")  # no aggregation: the first proposal
        return Strategy("pa", k=ints["k"], l=ints["l"])
    if kind in ("best_of_n", "majority"):
        if "n" not in ints:
            raise AftError(f"strategy {spec!r}: needs n, e.g. {kind}:n=8")
        if kind == "majority":
            return Strategy("majority", n=ints["n"])
        scorer = args.get("scorer", "verifier")
        if scorer not in SCORER_KINDS:
            raise AftError(f"strategy {spec!r}: scorer must be one of {', '.join(SCORER_KINDS)}")
        return Strategy("best_of_n", n=ints["n"], scorer=scorer)
    return Strategy(kind)


def question_seed(seed: int, qid: str) -> int:
    return derive_seed(seed, qid)  # = P&A's per-query seed


def proposal_request(query: list[dict], qid: str, n: int, sampling: Sampling, seed: int,
                     style: PromptStyle = PromptStyle()) -> Request:
    """Exactly the request P&A's proposal layer sends for this question (with width n)."""
    return Request(proposer_messages(query, style),
                   replace(sampling.params(n), seed=derive_seed(question_seed(seed, qid), 0)))


def run_strategy(engine: Engine, task: Task, items: list, strategy: Strategy, sampling: Sampling, seed: int,
                 scorer=None, style: PromptStyle = PromptStyle(), proposers: list[Engine] | None = None) -> list[dict]:
    """Answer `items` (aft.data.sources.Item) with `strategy`; one record per item, in order.
    `proposers`: P&A's proposal models (default: `engine`, which writes everything else).

    A record: id, response, extracted, correct, reference, usage (measured tokens and seconds),
    and what the strategy saw: candidates (best-of-N, majority) or the P&A trace.
    """
    if strategy.kind == "majority" and not task.has_answers:
        raise AftError(f"majority vote needs extractable answers; task {task.name} ({task.kind}) has none")
    if strategy.kind == "best_of_n" and strategy.scorer == "verifier" and task.kind == "open":
        raise AftError("best_of_n with the verifier needs checkable answers; open-ended questions need "
                       "scorer=reward_model")
    if strategy.kind == "pa":
        records = _run_pa(engine, items, strategy, sampling, seed, style, proposers)
    else:
        if strategy.kind == "greedy":
            reqs = [Request(proposer_messages(it.query, style),
                            replace(sampling.greedy_params(), seed=question_seed(seed, it.id)))
                    for it in items]
        else:
            n = 1 if strategy.kind == "sample" else strategy.n
            reqs = [proposal_request(it.query, it.id, n, sampling, seed, style) for it in items]
        t0 = time.perf_counter()
        results = engine.generate(reqs)
        share_seconds(results, time.perf_counter() - t0)
        records = []
        for it, res in zip(items, results):
            usage = Usage()
            usage.add_result(res)
            rec = {"id": it.id, "usage": usage}
            if res.error is not None:  # this question alone failed
                rec.update(error=res.error, response=None)
            elif strategy.kind in ("greedy", "sample"):
                rec["response"] = res.completions[0].text
                rec["finish_reason"] = res.completions[0].finish_reason
            else:
                rec["candidates"] = [{"text": c.text, "tokens": c.tokens, "finish_reason": c.finish_reason}
                                     for c in res.completions]
            records.append(rec)
        if strategy.kind == "best_of_n" and strategy.scorer != "verifier":
            _reward_scores(items, records, scorer)
    return [finish_record(task, it, rec, strategy) for it, rec in zip(items, records)]


def finish_record(task: Task, item, rec: dict, strategy: Strategy) -> dict:
    """Everything a record's verdict depends on, from its generated texts: the pick of majority vote and of
    best-of-N with the verifier, the extracted answer, `correct`, and for P&A which proposals were correct
    and whether the final answer is one of theirs. `aft eval rescore` calls this again on cached records.
    A record with `error` (its request or its scorer failed) is not correct; a checker that raises on this
    question's answers gives it that error, and the other questions go on."""
    question = item.meta.get("question")
    rec["reference"] = item.answer
    try:
        if strategy.kind == "majority" and "error" not in rec:
            votes = [answer_key(c["text"], question) for c in rec["candidates"]]
            for c, v in zip(rec["candidates"], votes):
                c["vote"] = v
            _pick(rec, majority_pick(votes))
        elif strategy.kind == "best_of_n" and "error" not in rec:
            if strategy.scorer == "verifier":
                for c in rec["candidates"]:
                    c["score"] = 1.0 if task.check(item, c["text"]) else 0.0
            _pick(rec, best_pick([c.get("score") for c in rec["candidates"]]))
        response = rec.get("response")
        rec["extracted"] = extract_answer(response, question) if task.has_answers else None
        ok = task.check(item, response) if "error" not in rec else False
        rec["correct"] = None if ok is None else bool(ok)
        if strategy.kind == "pa" and rec.get("trace") and task.has_answers:
            proposals = [o["text"] for o in rec["trace"][0]["outputs"]]
            rec["proposals_correct"] = [bool(task.check(item, t)) for t in proposals]
            final = answer_key(response, question) if response is not None else None
            rec["final_in_proposals"] = None if final is None else final in {answer_key(t, question)
                                                                             for t in proposals}
    except Exception as e:  # a checker that fails on some answer fails only this question
        log.warning("checking the answers of %s failed", item.id, exc_info=True)
        rec.update(error=failure("checking the answers", e), response=None, extracted=None, correct=False)
    return rec


def _pick(rec: dict, pick: int) -> None:
    rec["picked"] = pick
    rec["response"] = rec["candidates"][pick]["text"]
    rec["finish_reason"] = rec["candidates"][pick]["finish_reason"]


def majority_pick(votes: list[str | None]) -> int:
    """Index of the sample to answer with: the first sample of the most frequent non-empty vote.

    Ties go to the answer that appeared first in sample order; no votes at all -> sample 0.
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, v in enumerate(votes):
        if v is None:
            continue
        counts[v] = counts.get(v, 0) + 1
        first.setdefault(v, i)
    if not counts:
        return 0
    best = max(counts.values())
    return min(first[v] for v, c in counts.items() if c == best)


def _reward_scores(items, records, scorer) -> None:
    """Best-of-N with a reward model: each candidate's score (the pick is made in finish_record)."""
    if scorer is None:
        raise AftError("best_of_n with scorer=reward_model needs `reward_model` (a sequence-classification "
                       "model folder)")
    answered = [(it, rec) for it, rec in zip(items, records) if "error" not in rec]
    texts = [[c["text"] for c in rec["candidates"]] for _, rec in answered]
    scores, errors = score_safely(scorer, [it for it, _ in answered], texts)
    for (it, rec), ts, sc, err in zip(answered, texts, scores, errors):
        if err is not None:  # the scorer failed on this question alone
            rec.update(error=err, response=None)
            continue
        counts = [scorer.count_tokens(it.query, t) for t in ts]
        if None not in counts:
            rec["scorer_tokens"] = sum(counts)
        for c, v in zip(rec["candidates"], sc):
            c["score"] = v


def best_pick(scores: list[float | None]) -> int:
    """Index of the highest score (None = unscored, ranked last); ties go to the earliest sample."""
    best, idx = None, 0
    for i, s in enumerate(scores):
        if s is not None and (best is None or s > best):
            best, idx = s, i
    return idx


def _run_pa(engine: Engine, items, strategy: Strategy, sampling: Sampling, seed: int, style: PromptStyle,
            proposers: list[Engine] | None = None) -> list[dict]:
    pa = PAConfig(n=strategy.k, num_aggregation=strategy.l, sampling=sampling, seed=seed, style=style)
    out = PAEngine(engine, pa, proposers).run([(it.id, it.query) for it in items])
    records = []
    for qr in out:
        usage = Usage(seconds=qr.seconds)
        usage.add_trace(qr.trace)
        r = {"id": qr.id, "usage": usage, "trace": [t.to_dict() for t in qr.trace]}
        if qr.error is not None:
            r["error"] = qr.error
            r["response"] = None
        else:
            r["response"] = qr.response
            r["finish_reason"] = qr.trace[-1].outputs[0].finish_reason
        records.append(r)
    return records
