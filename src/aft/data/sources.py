"""Where prompts and proposals come from.

Every source yields, in input order, either an `Item` or a `RowError` (a bad
row: its file:line and what is wrong), so the builder can skip it or stop, as
the user chose, and count it in the data card.

Off-policy schemas (several responses per prompt):
  * ultrafeedback: {"instruction", "completions": [{"response", "model",
    "overall_score", "annotations": {aspect: {"Rating": "4", ...}}}]}
  * generic: {"prompt": str | "messages": [...], "responses": [str | {"text"|"response", ...}],
    "scores": [float] (optional), "reference" (optional)}
Plain prompts (for on-policy proposals): {"query"|"messages"|"prompt"|"instruction"},
optional "reference"/"answer". Files: .jsonl / .json lines, .parquet; anything
else that is not a local path is tried as a hub dataset name (needs a hub).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import AftError, where
from ..io import parse_query, read_jsonl, record_id

SCHEMAS = ("auto", "ultrafeedback", "generic", "prompts")
UF_ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")


@dataclass
class Proposal:
    text: str
    id: str
    score: float | None = None
    model: str | None = None
    tokens: int | None = None
    finish_reason: str | None = None
    seed: int | None = None


@dataclass
class Item:
    id: str
    query: list[dict]
    responses: list[Proposal] | None = None  # off-policy proposals from the dataset
    answer: str | None = None  # short reference answer (for the verifier)
    reference: str | None = None  # reference response (target mode `reference`)
    meta: dict = field(default_factory=dict)  # source, line, task, question, rg_metadata


@dataclass
class RowError:
    loc: str  # "file:line: "
    message: str
    kind: str = "bad row"

    def __str__(self) -> str:
        return f"{self.loc}{self.message}"


# ------------------------------------------------------------------ reading rows
def iter_records(path: str, split: str = "train") -> Iterator[tuple[str, int, dict]]:
    """(source name, line or row number, record) for a local JSONL / parquet file or a hub dataset."""
    p = Path(path).expanduser()
    if p.exists():
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(p)
            except Exception as e:
                raise AftError(f"{p}: cannot read parquet: {e}") from None
            for i, rec in enumerate(table.to_pylist(), 1):
                yield str(p), i, rec
            return
        for line, rec in read_jsonl(p, bad_lines="yield"):
            yield str(p), line, rec
        return
    if "/" in path and not path.startswith((".", "/")) and p.suffix not in (".jsonl", ".json", ".parquet"):
        try:
            from datasets import load_dataset

            ds = load_dataset(path, split=split)
        except Exception as e:
            reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise AftError(f"{path}: no such file, and not loadable as a hub dataset ({reason})") from None
        for i, rec in enumerate(ds, 1):
            yield path, i, rec
        return
    raise AftError(f"{path}: no such file")


def detect_schema(rec: dict) -> str | None:
    if "completions" in rec and ("instruction" in rec or "prompt" in rec):
        return "ultrafeedback"
    if "responses" in rec:
        return "generic"
    if any(k in rec for k in ("query", "messages", "prompt", "instruction")):
        return "prompts"
    return None


def read_items(path: str, schema: str = "auto", score_field: str = "auto", split: str = "train",
               limit: int | None = None) -> Iterator[Item | RowError]:
    """Items (or RowErrors) of a file in one of the schemas; `limit` counts rows read."""
    seen: set[str] = set()
    fixed = None if schema == "auto" else schema
    for n, (name, line, rec) in enumerate(iter_records(path, split)):
        if limit is not None and n >= limit:
            return
        loc = where(name, line)
        if isinstance(rec, AftError):  # a line that is not UTF-8 or not a JSON object
            yield RowError(loc, str(rec).removeprefix(loc), "unreadable line")
            continue
        kind = fixed or detect_schema(rec)
        if kind is None:
            yield RowError(loc, "unknown schema: expected 'instruction'+'completions' (UltraFeedback), "
                                "'prompt'/'messages'+'responses' (generic) or a prompt field", "unknown schema")
            continue
        try:
            item = _PARSERS[kind](rec, loc, score_field)
        except AftError as e:
            yield RowError(loc, str(e).removeprefix(loc), _kind_of(str(e)))
            continue
        try:
            rid = record_id(rec.get("id", rec.get("prompt_id", rec.get("question_id"))), loc)
        except AftError as e:
            yield RowError(loc, str(e).removeprefix(loc), "bad id")
            continue
        item.id = rid if rid is not None else f"{Path(name).stem}-{line}"
        if item.id in seen:
            yield RowError(loc, f'field "id": duplicate id {item.id!r}', "duplicate id")
            continue
        seen.add(item.id)
        item.meta.update({"source": name, "source_line": line})
        yield item


def _kind_of(msg: str) -> str:
    for key in ("no usable query", "fewer than", "not a number", "no responses"):
        if key in msg:
            return {"no usable query": "no prompt", "not a number": "non-numeric score"}.get(key, key)
    return "bad row"


def _score(value, loc: str, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise AftError(f"{loc}{what}: {value!r} is not a number")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise AftError(f"{loc}{what}: {value!r} is not a number") from None
    if math.isnan(x) or math.isinf(x):
        raise AftError(f"{loc}{what}: {value!r} is not a number")
    return x


def _parse_ultrafeedback(rec: dict, loc: str, score_field: str) -> Item:
    text = rec.get("instruction", rec.get("prompt"))
    query = parse_query({"prompt": text} if isinstance(text, str) else {}, loc)
    comps = rec.get("completions")
    if not isinstance(comps, list) or not comps:
        raise AftError(f'{loc}field "completions": no responses')
    props = []
    for i, c in enumerate(comps):
        if not isinstance(c, dict) or not isinstance(c.get("response"), str):
            raise AftError(f'{loc}field "completions[{i}].response": missing or not text')
        if score_field in ("auto", "overall_score"):
            score = _score(c.get("overall_score"), loc, f'field "completions[{i}].overall_score"')
        elif score_field == "fine_grained":
            ann = c.get("annotations") or {}
            vals = [_score((ann.get(a) or {}).get("Rating"), loc, f'field "completions[{i}].annotations.{a}.Rating"')
                    for a in UF_ASPECTS if a in ann]
            vals = [v for v in vals if v is not None]
            score = sum(vals) / len(vals) if vals else None
        else:
            score = _score(c.get(score_field), loc, f'field "completions[{i}].{score_field}"')
        props.append(Proposal(c["response"], f"r{i}", score, c.get("model")))
    return Item("", query, props, reference=_ref(rec), answer=_ans(rec))


def _parse_generic(rec: dict, loc: str, score_field: str) -> Item:
    query = parse_query(rec, loc)
    resp = rec.get("responses")
    if not isinstance(resp, list) or not resp:
        raise AftError(f'{loc}field "responses": no responses')
    scores = rec.get("scores" if score_field in ("auto", "scores") else score_field)
    if scores is not None and (not isinstance(scores, list) or len(scores) != len(resp)):
        raise AftError(f'{loc}field "scores": expected a list of {len(resp)} numbers (one per response)')
    props = []
    for i, r in enumerate(resp):
        model = None
        if isinstance(r, dict):
            model = r.get("model")
            r = r.get("text", r.get("response", r.get("content")))
        if not isinstance(r, str):
            raise AftError(f'{loc}field "responses[{i}]": not text')
        s = _score(scores[i], loc, f'field "scores[{i}]"') if scores is not None else None
        props.append(Proposal(r, f"r{i}", s, model))
    return Item("", query, props, reference=_ref(rec), answer=_ans(rec))


def _parse_prompt(rec: dict, loc: str, score_field: str) -> Item:
    return Item("", parse_query(rec, loc), None, reference=_ref(rec), answer=_ans(rec))


def _ref(rec: dict) -> str | None:
    r = rec.get("reference", rec.get("reference_response"))
    return r if isinstance(r, str) and r.strip() else None


def _ans(rec: dict) -> str | None:
    a = rec.get("answer", rec.get("reference_answer"))
    return str(a) if a is not None and not isinstance(a, (dict, list)) else None


_PARSERS = {"ultrafeedback": _parse_ultrafeedback, "generic": _parse_generic, "prompts": _parse_prompt}


# ------------------------------------------------------------------ selection
SELECT = ("top", "random", "all")


def select(proposals: list[Proposal], k: int, mode: str, seed: int) -> list[int]:
    """Indices of the proposals to keep, in their original order.

    top: the k best scores (ties broken at random with `seed`; unscored count as worst);
    random: k drawn with `seed`; all: every one. Kept in original (sample) order
    so the position of a proposal says nothing about its score, as at inference.
    """
    n = len(proposals)
    if mode == "all":
        return list(range(n))
    if n < k:
        raise AftError(f"fewer than k={k} responses ({n})")
    if mode == "random":
        return sorted(random.Random(seed).sample(range(n), k))
    if mode == "top":
        if all(p.score is None for p in proposals):
            raise AftError("top-K selection needs scores: give a scorer or a dataset with scores")
        return sorted(ranked(proposals, seed)[:k])
    raise AftError(f"unknown selection {mode!r}; choose one of {', '.join(SELECT)}")


def ranked(proposals: list[Proposal], seed: int) -> list[int]:
    """Indices from the best score to the worst; equal scores in a random order drawn with `seed`
    (not sample order: that would favour the first samples)."""
    tie = list(range(len(proposals)))
    random.Random(seed).shuffle(tie)

    def score(p: Proposal) -> float:
        return -math.inf if p.score is None or math.isnan(p.score) else p.score

    return sorted(range(len(proposals)), key=lambda i: (-score(proposals[i]), tie[i]))


def shard_slice(seq: list, shard: str) -> tuple[list, int, int]:
    """The i-th of n contiguous blocks of `seq` ("i/n", 0-based), so shards concatenate in order."""
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise AftError(f"--shard expects i/n (e.g. 0/4), got {shard!r}") from None
    if n < 1 or not 0 <= i < n:
        raise AftError(f"--shard {shard}: need 0 <= i < n")
    N = len(seq)
    return seq[i * N // n:(i + 1) * N // n], i, n
