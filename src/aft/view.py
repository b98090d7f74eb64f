"""`aft view`: one self-contained HTML page to read propose-and-aggregate traces.

    load_runs(paths)        read `aft infer` outputs and `aft eval run` records into
                            one plain view per query (tolerant of missing fields)
    copied_spans(text, sources)
                            which word spans of an aggregation are copied from which
                            proposal: greedy string tiling, longest common word n-grams
                            first, at least MIN_WORDS words (or punctuation runs) each
    build_html(queries)     the page: the queries as inline JSON, the template's CSS and
                            JS (resources/view.html), nothing fetched from anywhere
    page_of_records(records)
                            the same page for records in memory (e.g. P&A results):
                            what `aft serve` can answer with for one request's trace

Everything the page needs is computed here at build time (spans, correctness,
filters, the summary table), so it is testable in Python; the page's script only
draws it, a page of queries at a time, with DOM text nodes (never innerHTML), so a
response containing markup shows as text.
"""

from __future__ import annotations

import heapq
import html
import itertools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import AftError, where
from .io import read_jsonl

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).parent / "resources" / "view.html"
MIN_WORDS = 4  # a shorter common run of words is coincidence more often than copying
MAX_OCCURRENCES = 32  # per n-gram: bounds the work on degenerate, repetitive texts
_WORD = re.compile(r"\w+|[^\w\s]+")  # a word, or a run of punctuation: "magenta." = "magenta" + "."


# ---------------------------------------------------------------- copied spans
@dataclass(frozen=True)
class Span:
    """Characters [start, end) of an aggregation equal characters [src_start, src_end) of proposal `source`
    word for word."""

    start: int
    end: int
    source: int
    src_start: int
    src_end: int

    def to_list(self) -> list[int]:
        return [self.start, self.end, self.source, self.src_start, self.src_end]


def _words(text: str) -> list[re.Match]:
    return list(_WORD.finditer(text or ""))


def copied_spans(text: str, sources: list[str], min_words: int = MIN_WORDS) -> list[Span]:
    """The spans of `text` copied from `sources` (see CopyFinder)."""
    return CopyFinder(sources, min_words).spans(text)


class CopyFinder:
    """Finds the spans of a text copied from `sources`, longest first, no word claimed twice.

    Words are runs of letters and digits, and runs of punctuation (so "42." matches "42"),
    compared exactly. For every position the longest run of words that also occurs in a
    source is a candidate; candidates are taken longest first (ties: earlier in the text,
    then the lower source index); a candidate that runs into an already taken word is
    shortened to its free prefix and queued again if it still has `min_words` words (from
    the lowest source that has it). The sources are indexed once for all the texts (the K
    aggregations of a layer read the same proposals).
    """

    def __init__(self, sources: list[str], min_words: int = MIN_WORDS):
        if min_words < 1:
            raise ValueError("min_words must be >= 1")
        self.min_words = min_words
        self.src = [_words(s) for s in sources]
        self.sw = [[m.group() for m in ms] for ms in self.src]
        self.index: dict[tuple, list[tuple[int, int]]] = {}  # n-gram -> [(source, position)], in that order
        for s, words in enumerate(self.sw):
            for j in range(len(words) - min_words + 1):
                occ = self.index.setdefault(tuple(words[j:j + min_words]), [])
                if len(occ) < MAX_OCCURRENCES:
                    occ.append((s, j))

    def spans(self, text: str) -> list[Span]:
        """The copied spans of `text`, in text order."""
        mw, sw, src = self.min_words, self.sw, self.src
        tw = _words(text)
        t = [m.group() for m in tw]
        # Right to left, so that the match at (i, j) is the one at (i + 1, j + 1) plus one word: linear
        # work even on a looping text whose n-grams recur many times.
        heap, after, runs = [], {}, {}  # runs[i]: {(source, position): words in common from there}
        for i in range(len(t) - mw, -1, -1):
            here, best = {}, None
            for s, j in self.index.get(tuple(t[i:i + mw]), ()):
                n = after.get((s, j + 1))
                if n is not None:
                    n += 1
                else:
                    n, words = mw, sw[s]
                    while i + n < len(t) and j + n < len(words) and t[i + n] == words[j + n]:
                        n += 1
                here[s, j] = n
                if best is None or n > best[0]:
                    best = (n, s, j)
            if best:
                heapq.heappush(heap, (-best[0], i, best[1], best[2]))
            after = runs[i] = here
        taken = [False] * len(t)
        spans = []
        while heap:
            neg, i, s, j = heapq.heappop(heap)
            n = -neg
            free = next((k for k in range(n) if taken[i + k]), n)
            if free < n:
                if free >= mw:  # its free beginning, from the first source that has it
                    s, j = next(sj for sj, m in runs[i].items() if m >= free)
                    heapq.heappush(heap, (-free, i, s, j))
                continue
            for k in range(n):
                taken[i + k] = True
            spans.append(Span(tw[i].start(), tw[i + n - 1].end(), s, src[s][j].start(), src[s][j + n - 1].end()))
        return sorted(spans, key=lambda sp: sp.start)


def copied_share(text: str, spans: list[Span], n_sources: int) -> list[float]:
    """The fraction of `text`'s words copied from each source (sums to at most 1)."""
    total = len(_words(text))
    share = [0] * n_sources
    for sp in spans:
        share[sp.source] += len(_words(text[sp.start:sp.end]))
    return [round(c / total, 3) if total else 0.0 for c in share]


# ---------------------------------------------------------------- reading runs
class _Checker:
    """Correctness of any response to one eval file's questions, the way `aft eval run` judged its answers.

    The task is rebuilt from the file's .meta.json (its spec and split settings); when it
    cannot be (e.g. a gsm8k file that has moved), answers are compared to the record's
    reference (numeric or normalised text match) and the question is not shown.
    """

    def __init__(self, path: Path | None, tasks: dict):
        """`path`: the record file (None: records in memory); `tasks`: the tasks already rebuilt
        (evaluate.tasks.task_of_meta's cache), shared between files."""
        from .evaluate.tasks import task_of_meta

        self.task, self.items = None, {}
        if path is None:
            return
        meta_path = path.with_name(path.name.replace(".jsonl", ".meta.json"))
        try:
            self.task, self.items = task_of_meta(json.loads(meta_path.read_text()), tasks)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, AftError, ImportError) as e:
            log.warning("%s: cannot rebuild the task from %s (%s); answers are checked against the recorded "
                        "reference", path, meta_path.name, e)

    def question(self, qid: str) -> str | None:
        """What the model was asked (the last user message)."""
        item = self.items.get(qid)
        return _last_user(item.query) if item else None

    def check(self, qid: str, reference, text: str | None) -> tuple[bool | None, str | None]:
        """(correct, extracted answer) of `text`."""
        from .data.verify import extract_answer, is_correct

        item = self.items.get(qid)
        if item is not None:
            ok = self.task.check(item, text)
            extracted = extract_answer(text, item.meta.get("question")) if self.task.has_answers else None
            return (None if ok is None else bool(ok)), extracted
        if reference is None:
            return None, extract_answer(text)
        return is_correct(text, str(reference)), extract_answer(text)


def _last_user(messages) -> str | None:
    if isinstance(messages, str):
        return messages
    if isinstance(messages, list):
        for m in reversed(messages):
            if isinstance(m, dict) and m.get("role", "user") == "user":
                return str(m.get("content", ""))
    return None


def _question(rec: dict) -> str | None:
    for key in ("query", "messages"):
        if key in rec:
            return _last_user(rec[key])
    for key in ("prompt", "instruction"):
        if isinstance(rec.get(key), str):
            extra = rec.get("input") if key == "instruction" else None
            return rec[key] + (f"\n\n{extra}" if isinstance(extra, str) and extra.strip() else "")
    return None


def _kind(rec: dict) -> str | None:
    if "strategy" in rec and ("correct" in rec or "usage" in rec):
        return "eval"
    if "id" in rec and ("trace" in rec or "error" in rec):
        return "infer"
    return None


def _output(o, loc: str) -> dict:
    if isinstance(o, str):  # tolerate a bare text
        o = {"text": o}
    if not isinstance(o, dict):
        raise AftError(f"{loc}expected an object per output, got {type(o).__name__}")
    return {"text": str(o.get("text") or ""), "tokens": o.get("tokens"), "finish_reason": o.get("finish_reason"),
            "seed": o.get("seed"), "proposer": o.get("proposer")}


def _layers(trace, loc: str) -> list[dict]:
    if not isinstance(trace, list):
        raise AftError(f'{loc}field "trace": expected a list of layers, got {type(trace).__name__}')
    layers = []
    for k, layer in enumerate(trace):
        if not isinstance(layer, dict) or not isinstance(layer.get("outputs"), list):
            raise AftError(f'{loc}field "trace": layer {k} has no "outputs" list')
        layers.append({
            "layer": layer.get("layer", k), "role": layer.get("role") or ("propose" if k == 0 else "aggregate"),
            "prompt_tokens": layer.get("prompt_tokens"), "seconds": layer.get("batch_seconds", layer.get("seconds")),
            "order": layer.get("order"), "truncated": layer.get("truncated") or [],
            "outputs": [_output(o, f"{loc}layer {k}: ") for o in layer["outputs"]],
        })
    return layers


def _annotate(layers: list[dict], min_words: int) -> None:
    """Mark cut proposals and compute each aggregation's copied spans against what it was shown."""
    for prev, layer in itertools.pairwise(layers):
        seen = [o["text"] for o in prev["outputs"]]
        order = layer["order"] if isinstance(layer["order"], list) else None
        for cut in layer["truncated"]:
            try:
                pos = int(cut["index"])
                original = order[pos] if order else pos
                out = prev["outputs"][original]
                to_chars = int(cut["to_chars"])
            except (KeyError, IndexError, TypeError, ValueError):
                continue
            out["cut"] = {"to_chars": to_chars, "from_chars": cut.get("from_chars"), "by_layer": layer["layer"]}
            seen[original] = seen[original][:to_chars]
        finder = CopyFinder(seen, min_words)
        for o in layer["outputs"]:
            spans = finder.spans(o["text"])
            o["spans"] = [sp.to_list() for sp in spans]
            o["copied"] = copied_share(o["text"], spans, len(seen))


def _truncated(q: dict) -> bool:
    outs = [o for layer in q["layers"] for o in layer["outputs"]] + q["candidates"]
    return q.get("finish_reason") == "length" or any(o.get("finish_reason") == "length" for o in outs)


def _flags(q: dict) -> list[str]:
    """The filters this query passes (the page's "show only" menu)."""
    flags = []
    if q.get("error"):
        flags.append("error")
    if _truncated(q):
        flags.append("truncated")
    if q.get("cut"):
        flags.append("cut")
    pool = q["layers"][0]["outputs"] if q["layers"] else q["candidates"]
    marks = [o.get("correct") for o in pool]
    if q["kind"] == "eval" and marks and all(m is not None for m in marks):
        if q.get("correct") is False and any(marks):
            flags.append("final_wrong_proposal_right")
        if not any(marks):
            flags.append("all_proposals_wrong")
    if q.get("correct") is False:
        flags.append("wrong")
    return flags


def _query(source: str, line: int, rec: dict, kind: str, checker: _Checker, min_words: int) -> dict:
    loc = where(source, line)
    qid = str(rec.get("id", rec.get("question_id", line)))
    q = {"file": source, "line": line, "id": qid, "kind": kind, "question": _question(rec),
         "response": rec.get("response"), "error": rec.get("error"), "finish_reason": rec.get("finish_reason"),
         "layers": _layers(rec["trace"], loc) if rec.get("trace") is not None else [], "candidates": []}
    if kind == "eval":
        q.update({k: rec.get(k) for k in ("task", "strategy", "seed", "label", "extracted", "reference", "correct",
                                         "picked")})
        q["usage"] = rec.get("usage") if isinstance(rec.get("usage"), dict) else {}
        if q["question"] is None:
            q["question"] = checker.question(qid)
        cands = rec.get("candidates") or []
        if not isinstance(cands, list):
            raise AftError(f'{loc}field "candidates": expected a list')
        for c in cands:
            out = _output(c, loc)
            if isinstance(c, dict):
                out.update({k: c[k] for k in ("vote", "score") if k in c})
            q["candidates"].append(out)
    else:
        q["strategy"] = None
    if q["layers"] and q["finish_reason"] is None and q["layers"][-1]["outputs"] and q["response"] is not None:
        q["finish_reason"] = q["layers"][-1]["outputs"][0]["finish_reason"]
    _annotate(q["layers"], min_words)
    q["cut"] = any("cut" in o for layer in q["layers"] for o in layer["outputs"])
    if kind == "eval":
        for o in [o for layer in q["layers"] for o in layer["outputs"]] + q["candidates"]:
            o["correct"], o["extracted"] = checker.check(qid, q["reference"], o["text"])
    q["flags"] = _flags(q)
    return q


def load_runs(paths: list[str | Path], min_words: int = MIN_WORDS) -> list[dict]:
    """Every query of every file, as the page shows it. Raises AftError for a missing file, malformed JSONL,
    or a file none of whose records is an `aft infer` output or an `aft eval run` record."""
    if not paths:
        raise AftError("no files given")
    queries, tasks = [], {}
    for p in paths:
        path = Path(p)
        if path.is_dir():
            raise AftError(f"{path}: is a folder; give the .jsonl files (e.g. {path}/*/*/*.jsonl)")
        checker, found = None, 0
        for line, rec in read_jsonl(path):
            if checker is None and _kind(rec) == "eval":
                checker = _Checker(path, tasks)
            queries.append(_view(str(path), line, rec, checker, min_words))
            found += 1
        if not found:
            raise AftError(f"{path}: no records")
    return queries


def _view(source: str, line: int, rec: dict, checker: _Checker | None, min_words: int) -> dict:
    kind = _kind(rec)
    if kind is None:
        raise AftError(f"{where(source, line)}not an `aft infer` output or `aft eval run` record "
                       f"(expected the fields id and trace, or strategy and correct)")
    return _query(source, line, rec, kind, checker or _Checker(None, {}), min_words)


def page_of_records(records: list[dict], source: str = "request", title: str = "aft view") -> str:
    """The page for records already in memory: a P&A result ({"id", "response", "trace"}, as
    aggregate.propose_and_aggregate returns it), an `aft infer` row or an eval record. This is what a
    server (`aft serve`) can answer with for one request's trace. Eval records are checked against their
    recorded reference (there is no .meta.json beside them to rebuild the task from)."""
    return build_html([_view(source, i, rec, None, MIN_WORDS) for i, rec in enumerate(records, 1)], title)


def summary_rows(queries: list[dict]) -> list[dict]:
    """One row per (file kind, label, task, strategy): what the table at the top of the page shows."""
    groups: dict[tuple, list[dict]] = {}
    for q in queries:
        key = (q.get("label") or "", q.get("task") or "", q.get("strategy") or "infer") if q["kind"] == "eval" \
            else ("", Path(q["file"]).name, "infer")
        groups.setdefault(key, []).append(q)
    rows = []
    for (label, task, strategy), qs in groups.items():
        judged = [q for q in qs if q.get("correct") is not None]
        any_right = [q for q in judged if (q["layers"] and q["layers"][0]["outputs"]) or q["candidates"]]
        tokens = [_tokens(q) for q in qs]
        secs = [_seconds(q) for q in qs]
        rows.append({
            "label": label, "task": task, "strategy": strategy, "queries": len(qs),
            "accuracy": round(sum(q["correct"] for q in judged) / len(judged), 3) if judged else None,
            "proposal_any_right": round(sum(_any_right(q) for q in any_right) / len(any_right), 3)
            if any_right else None,
            "final_wrong_proposal_right": sum("final_wrong_proposal_right" in q["flags"] for q in qs),
            "truncated": sum("truncated" in q["flags"] for q in qs),
            "errors": sum(bool(q.get("error")) for q in qs),
            "mean_tokens": round(sum(tokens) / len(tokens), 1) if tokens else None,
            "mean_seconds": round(sum(secs) / len(secs), 3) if secs else None,
        })
    return rows


def _any_right(q: dict) -> bool:
    pool = q["layers"][0]["outputs"] if q["layers"] else q["candidates"]
    return any(o.get("correct") for o in pool)


def _tokens(q: dict) -> int:
    if q.get("usage", {}).get("completion_tokens") is not None:
        return q["usage"]["completion_tokens"]
    outs = [o for layer in q["layers"] for o in layer["outputs"]] + q["candidates"]
    return sum(o.get("tokens") or 0 for o in outs)


def _seconds(q: dict) -> float:
    if q.get("usage", {}).get("seconds") is not None:
        return q["usage"]["seconds"]
    return sum(layer.get("seconds") or 0 for layer in q["layers"])


# ---------------------------------------------------------------- the page
def _script_json(obj) -> str:
    """JSON that is safe inside <script>: no '<', '>' or '&' (so no '</script>' or '<!--'), no U+2028/9."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                    ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def build_html(queries: list[dict], title: str = "aft view") -> str:
    """The self-contained page for `queries` (from load_runs): no server, no network."""
    data = {"queries": queries, "summary": summary_rows(queries), "min_words": MIN_WORDS}
    values = {"TITLE": html.escape(title), "DATA": _script_json(data)}
    page = TEMPLATE.read_text(encoding="utf-8")
    return re.sub(r"\{\{(TITLE|DATA)\}\}", lambda m: values[m.group(1)], page)


def write_view(paths: list[str | Path], out: str | Path | None = None) -> tuple[Path, int]:
    """Read `paths`, write the page to `out` (default: the first file with .html); (page path, queries)."""
    queries = load_runs(paths)
    out = Path(out) if out else Path(paths[0]).with_suffix(".html")
    title = "aft view: " + ", ".join(Path(p).name for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(build_html(queries, title), encoding="utf-8")
    except OSError as e:
        raise AftError(f"{out}: cannot write: {e.strerror}") from None
    return out, len(queries)
