"""The data card: what a built data set holds, from its files alone.

Reads <out>/aft.jsonl (each row's meta), skipped.jsonl and input_errors.json and
writes data_card.json (the numbers), data_card.md (the same for people) and
data_card.png (histograms of proposal / target lengths and scores). Because it
reads the files, a resumed or merged build gets the card of the whole set.

Scores are kept apart by scale (meta.score_source: the scorer's name, or
"dataset" for a preference dataset's own ratings): a verifier's 0/1 and a
dataset's 1-10 are never averaged together, and only a verifier's scores are
called accuracy. Accuracy is reported over every prompt sampled (skipped.jsonl
keeps the scores of prompts dropped after scoring, e.g. by min_target_score)
and over the rows kept, apart.

Diversity of one row's K proposals: the mean pairwise Jaccard distance between
their sets of word bigrams (0 = identical texts, 1 = no bigram in common).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections import Counter
from itertools import combinations
from pathlib import Path

from ..io import read_jsonl, write_json

log = logging.getLogger(__name__)


def _bigrams(text: str) -> set:
    w = text.lower().split()
    return set(zip(w, w[1:])) if len(w) > 1 else set((x,) for x in w)


def diversity(texts: list[str]) -> float | None:
    """Mean pairwise Jaccard distance of word-bigram sets; None for fewer than 2 texts."""
    if len(texts) < 2:
        return None
    sets = [_bigrams(t) for t in texts]
    d = []
    for a, b in combinations(sets, 2):
        union = a | b
        d.append(1.0 - (len(a & b) / len(union)) if union else 0.0)
    return sum(d) / len(d)


def stats(values) -> dict | None:
    v = sorted(x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x)))
    if not v:
        return None

    def q(p):
        return v[min(len(v) - 1, int(p * (len(v) - 1) + 0.5))]

    return {"n": len(v), "mean": round(statistics.fmean(v), 4), "std": round(statistics.pstdev(v), 4),
            "min": v[0], "p50": q(0.5), "p90": q(0.9), "max": v[-1]}


def compute_card(rows: list[dict], skipped: list[dict], input_errors: list[dict], config: dict | None = None) -> dict:
    metas = [r.get("meta", {}) for r in rows]
    props = [c for m in metas for c in m.get("candidates", []) if c["id"] in set(m.get("proposals", []))]
    cands = [c for m in metas for c in m.get("candidates", [])]
    targets = [m.get("target", {}) for m in metas]
    cmp = [(t.get("score"), t.get("best_proposal_score")) for t in targets
           if t.get("score") is not None and t.get("best_proposal_score") is not None]
    card = {
        "counts": {
            "rows": len(rows),
            "skipped_while_building": len(skipped),
            "skipped_reasons": dict(Counter(s.get("reason", "?") for s in skipped)),
            "input_errors": len(input_errors),
            "input_error_kinds": dict(Counter(e.get("kind", "?") for e in input_errors)),
            "prompts_seen": len(rows) + len(skipped) + len(input_errors),
        },
        "setup": {
            "proposal_source": dict(Counter(m.get("proposal_source") for m in metas)),
            "target_mode": dict(Counter(t.get("mode") for t in targets)),
            "teacher": dict(Counter(m.get("teacher") for m in metas if m.get("teacher"))),
            "scorer": dict(Counter(m.get("scorer") for m in metas if m.get("scorer"))),
            "k": stats(m.get("k") for m in metas),
            "candidates_per_prompt": stats(len(m.get("candidates", [])) for m in metas),
        },
        "lengths": {
            "proposal_words": stats(c["words"] for c in props),
            "proposal_chars": stats(c["chars"] for c in props),
            "proposal_tokens": stats(c.get("tokens") for c in props),
            "target_words": stats(t.get("words") for t in targets),
            "target_chars": stats(t.get("chars") for t in targets),
            "target_tokens": stats(t.get("tokens") for t in targets),
            "proposals_cut_by_max_tokens": sum(c.get("finish_reason") == "length" for c in props),
            "targets_cut_by_max_tokens": sum(t.get("finish_reason") == "length" for t in targets),
            "rows_with_truncated_proposals": sum(bool(m.get("truncated")) for m in metas),
        },
        "scores": {
            "candidate": stats(c.get("score") for c in cands),
            "proposal": stats(c.get("score") for c in props),
            "best_proposal": stats(t.get("best_proposal_score") for t in targets),
            "target": stats(t.get("score") for t in targets),
        },
        "diversity": stats(m.get("diversity") for m in metas),
        "target_vs_best_proposal": {
            "compared": len(cmp),
            "beats": sum(t > b for t, b in cmp),
            "ties": sum(t == b for t, b in cmp),
            "worse": sum(t < b for t, b in cmp),
            "beats_rate": round(sum(t > b for t, b in cmp) / len(cmp), 4) if cmp else None,
            "at_least_as_good_rate": round(sum(t >= b for t, b in cmp) / len(cmp), 4) if cmp else None,
        },
    }
    sources = [score_source(m) for m in metas]
    by_source = {}
    for src in sorted({s for s in sources if s}):
        ms = [m for m, s in zip(metas, sources) if s == src]
        by_source[src] = _score_stats(ms)
    card["scores"]["by_source"] = by_source
    if len(by_source) > 1:  # several scales: no mean across them
        for key in ("candidate", "proposal", "best_proposal", "target"):
            card["scores"][key] = None
        card["target_vs_best_proposal"]["note"] = "rows compared on their own scale each"
    if "verifier" in by_source:
        kept = [m for m, s in zip(metas, sources) if s == "verifier"]
        sampled = [[c.get("score") for c in m.get("candidates", [])] for m in kept]
        sampled += [s["scores"]["candidates"] for s in skipped
                    if (s.get("scores") or {}).get("source") == "verifier"]
        card["scores"]["verifier"] = {
            "prompts_kept": len(kept),
            "candidate_accuracy": by_source["verifier"]["candidate"]["mean"] if by_source["verifier"]["candidate"]
            else None,
            "prompts_with_a_correct_candidate": _share_correct(
                [[c.get("score") for c in m.get("candidates", [])] for m in kept]),
            "prompts_with_a_correct_proposal": round(
                sum((m.get("target", {}).get("best_proposal_score") or 0) >= 1 for m in kept) / len(kept), 4),
            "target_accuracy": by_source["verifier"]["target"]["mean"] if by_source["verifier"]["target"] else None,
            "sampled": {"prompts": len(sampled),
                        "candidate_accuracy": (stats(x for sc in sampled for x in sc) or {}).get("mean"),
                        "prompts_with_a_correct_candidate": _share_correct(sampled)},
        }
    if config is not None:
        card["config"] = config
    return card


def score_source(meta: dict) -> str | None:
    """The scale of a row's scores (rows built before score_source was recorded: the scorer's, else the dataset's)."""
    if "score_source" in meta:
        return meta["score_source"]
    if not any(c.get("score") is not None for c in meta.get("candidates", [])):
        return None
    return meta.get("scorer") or "dataset"


def _score_stats(metas: list[dict]) -> dict:
    props = [c for m in metas for c in m.get("candidates", []) if c["id"] in set(m.get("proposals", []))]
    return {"rows": len(metas),
            "candidate": stats(c.get("score") for m in metas for c in m.get("candidates", [])),
            "proposal": stats(c.get("score") for c in props),
            "best_proposal": stats(m.get("target", {}).get("best_proposal_score") for m in metas),
            "target": stats(m.get("target", {}).get("score") for m in metas)}


def _share_correct(prompts: list[list]) -> float | None:
    """Share of prompts with at least one candidate scored >= 1 (among prompts with any score)."""
    known = [[x for x in sc if x is not None] for sc in prompts]
    known = [sc for sc in known if sc]
    return round(sum(max(sc) >= 1 for sc in known) / len(known), 4) if known else None


def _fmt(s: dict | None, key: str = "mean") -> str:
    if not s:
        return "-"
    x = s[key]
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def render_markdown(card: dict) -> str:
    c, lg, sc, tv = card["counts"], card["lengths"], card["scores"], card["target_vs_best_proposal"]
    setup = card["setup"]
    lines = ["# AFT data card", ""]
    cfg = card.get("config", {}).get("config", {})
    if cfg:
        src = cfg.get("task") and f"reasoning-gym {cfg['task']} ({cfg.get('split')})" or cfg.get("input_file")
        lines += [f"- source: {src}", f"- proposals: {setup['proposal_source']}, select {cfg.get('select')} "
                  f"k={cfg.get('k')}" + (f" of m={cfg.get('m')}" if "on_policy" in setup["proposal_source"] else ""),
                  f"- target: {setup['target_mode']}" + (f", teacher {setup['teacher']}" if setup["teacher"] else ""),
                  f"- scorer: {setup['scorer'] or 'none'}", f"- config hash: {card['config'].get('config_hash')}", ""]
    lines += ["## Counts", "", "| | n |", "|---|---|", f"| rows written | {c['rows']} |",
              f"| skipped while building | {c['skipped_while_building']} |",
              f"| bad input rows | {c['input_errors']} |", f"| prompts seen | {c['prompts_seen']} |", ""]
    for title, key in (("skip reasons", "skipped_reasons"), ("bad input kinds", "input_error_kinds")):
        if c[key]:
            lines += [f"{title}: " + ", ".join(f"{k} ({v})" for k, v in c[key].items()), ""]
    lines += ["## Lengths", "", "| | mean | p50 | p90 | max |", "|---|---|---|---|---|"]
    for key in ("proposal_words", "proposal_tokens", "target_words", "target_tokens"):
        s = lg[key]
        if s:
            lines.append(f"| {key.replace('_', ' ')} | {_fmt(s)} | {_fmt(s, 'p50')} | {_fmt(s, 'p90')} | "
                         f"{_fmt(s, 'max')} |")
    lines += ["", f"Cut by max_tokens: {lg['proposals_cut_by_max_tokens']} proposals, "
              f"{lg['targets_cut_by_max_tokens']} targets; rows whose proposals were shortened to fit the "
              f"teacher's context: {lg['rows_with_truncated_proposals']}.", ""]
    lines += ["## Scores", "", "Each scale apart (verifier: 0/1 correct; dataset: the preference data's own "
              "ratings; reward_model, judge: theirs).", "",
              "| scale | rows | | n | mean | min | max |", "|---|---|---|---|---|---|---|"]
    for src, block in sc.get("by_source", {}).items():
        for key in ("candidate", "proposal", "best_proposal", "target"):
            s = block[key]
            if s:
                lines.append(f"| {src} | {block['rows']} | {key.replace('_', ' ')} | {s['n']} | {_fmt(s)} | "
                             f"{_fmt(s, 'min')} | {_fmt(s, 'max')} |")
    if "verifier" in sc:
        v = sc["verifier"]
        lines += ["", f"Verifier, over all {v['sampled']['prompts']} prompts it scored: candidate accuracy "
                  f"{v['sampled']['candidate_accuracy']}, prompts with a correct candidate "
                  f"{v['sampled']['prompts_with_a_correct_candidate']}. Over the {v['prompts_kept']} rows kept: "
                  f"candidate accuracy {v['candidate_accuracy']}, prompts with a correct candidate "
                  f"{v['prompts_with_a_correct_candidate']}, with a correct proposal among the K "
                  f"{v['prompts_with_a_correct_proposal']}, target accuracy {v['target_accuracy']}."]
    lines += ["", "## Target vs best proposal", ""]
    if tv["compared"]:
        lines.append(f"Of {tv['compared']} rows scored, the target beats the best proposal in {tv['beats']} "
                     f"({tv['beats_rate']:.1%}), ties in {tv['ties']}, is worse in {tv['worse']}.")
    else:
        lines.append("No scorer: not measured.")
    d = card["diversity"]
    lines += ["", "## Diversity", "", f"Mean pairwise word-bigram Jaccard distance across the K proposals: "
              f"{_fmt(d)} (0 = identical, 1 = disjoint; {d['n'] if d else 0} rows).", "",
              "![histograms](data_card.png)", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no data_card.png")
        return False
    metas = [r.get("meta", {}) for r in rows]
    pw = [c["words"] for m in metas for c in m.get("candidates", []) if c["id"] in set(m.get("proposals", []))]
    tw = [m.get("target", {}).get("words") for m in metas]
    ps = [s for m in metas for s in m.get("proposal_scores", []) if s is not None]
    ts = [m.get("target", {}).get("score") for m in metas if m.get("target", {}).get("score") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].hist([pw, [x for x in tw if x is not None]], bins=20, label=["proposals", "targets"])
    axes[0].set_xlabel("length (words)")
    axes[0].set_ylabel("count")
    axes[0].legend()
    if ps or ts:
        axes[1].hist([ps, ts], bins=20, label=["proposals", "targets"])
        axes[1].set_xlabel("score")
        axes[1].legend()
    else:
        axes[1].text(0.5, 0.5, "no scores", ha="center", va="center")
        axes[1].set_axis_off()
    fig.suptitle(f"AFT data: {len(rows)} rows")
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.14, top=0.87, wspace=0.13)  # fixed: a layout pass costs a draw
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_card(out: str | Path) -> dict:
    """Compute the card of the data set in `out` and write data_card.{json,md,png}."""
    out = Path(out)
    rows = [r for _, r in read_jsonl(out / "aft.jsonl")] if (out / "aft.jsonl").exists() else []
    skipped = [r for _, r in read_jsonl(out / "skipped.jsonl")] if (out / "skipped.jsonl").exists() else []
    errors = json.loads((out / "input_errors.json").read_text()) if (out / "input_errors.json").exists() else []
    config = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else None
    card = compute_card(rows, skipped, errors, config)
    write_json(out / "data_card.json", card)
    (out / "data_card.md").write_text(render_markdown(card), encoding="utf-8")
    plot(rows, out / "data_card.png")
    return card
