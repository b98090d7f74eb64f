"""`aft eval report <out>`: tables and plots from the cached records (no engine, no generation).

Reads every <out>/<label>/<task>/<strategy>.seed<S>.jsonl (see run.py) and writes

    <out>/report.md                       a table per task: accuracy (mean, 95% bootstrap interval
                                          over seeds and questions) and compute per query
    <out>/summary.json                    the same numbers, for scripts
    <out>/acc_vs_tokens-<task>.png        accuracy versus tokens per query, one point per strategy
    <out>/acc_vs_flops-<task>.png         accuracy versus FLOPs per query
    <out>/width_depth-<label>-<task>.png  the K x L heat map (when a sweep was run)

Only questions answered under every seed of a (model, task, strategy) count, so a
partly finished run reports what it has, consistently.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

from ..errors import AftError
from ..io import read_jsonl, write_json
from .compute import flops
from .stats import bootstrap_ci, paired_difference

log = logging.getLogger(__name__)

_FILE = re.compile(r"^(?P<strategy>.+)\.seed(?P<seed>-?\d+)\.jsonl$")
_ARM = re.compile(r"^(?P<arm>.+)-s(?P<seed>\d+)$")  # label of one training seed of an arm: "aft-s2"
_PA = re.compile(r"^pa-k(\d+)-l(\d+)$")


def load_records(out: str | Path) -> dict:
    """{(label, task, strategy): {"seeds": {seed: {id: record}}, "meta": meta, "run": run.json}}"""
    out = Path(out)
    if not out.is_dir():
        raise AftError(f"{out}: no such folder")
    found: dict = {}
    for run_json in sorted(out.glob("*/run.json")):
        label_dir = run_json.parent
        run = json.loads(run_json.read_text())
        for path in sorted(label_dir.glob("*/*.jsonl")):
            m = _FILE.match(path.name)
            if not m:
                continue
            meta_path = path.with_name(path.name.replace(".jsonl", ".meta.json"))
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            key = (label_dir.name, path.parent.name, m["strategy"])
            entry = found.setdefault(key, {"seeds": {}, "meta": meta, "run": run})
            entry["seeds"][int(m["seed"])] = {str(r["id"]): r for _, r in read_jsonl(path)}
    if not found:
        raise AftError(f"{out}: no cached evaluation records (expected <label>/<task>/<strategy>.seed<S>.jsonl)")
    return found


def summarize(found: dict, n_boot: int = 2000) -> list[dict]:
    rows = []
    for (label, task, strategy), entry in sorted(found.items()):
        seeds = sorted(entry["seeds"])
        common = set.intersection(*(set(entry["seeds"][s]) for s in seeds))
        ids = sorted(common)
        if not ids:
            continue
        recs = [[entry["seeds"][s][i] for i in ids] for s in seeds]
        scores = [[1.0 if r.get("correct") else 0.0 for r in row] for row in recs]
        mean, lo, hi = bootstrap_ci(scores, n_boot=n_boot)
        flat = [r for row in recs for r in row]
        n = len(flat)
        params = entry["meta"].get("num_parameters") or entry["run"].get("num_parameters")
        u = {k: sum(r["usage"][k] for r in flat) / n
             for k in ("prompt_tokens", "completion_tokens", "generations", "seconds")}
        fl = flops(u["prompt_tokens"], u["completion_tokens"], params)
        strat = entry["meta"].get("strategy", {})
        rows.append({
            "label": label, "task": task, "strategy": strategy, "strategy_label": strat.get("label", strategy),
            "kind": strat.get("kind", strategy.split("-")[0]), "k": strat.get("k"), "l": strat.get("l"),
            "n": strat.get("n"), "oracle": strat.get("scorer") == "verifier",
            "accuracy": mean, "ci_low": lo, "ci_high": hi, "seeds": seeds, "questions": len(ids),
            "prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
            "total_tokens": u["prompt_tokens"] + u["completion_tokens"], "generations": u["generations"],
            "seconds": u["seconds"], "num_parameters": params, **fl,
            "truncated": sum(r.get("finish_reason") == "length" for r in flat) / n,
            "no_answer": (sum(r.get("extracted") is None for r in flat) / n
                          if entry["meta"].get("task", {}).get("kind") in ("rg", "gsm8k") else None),
            **pa_diagnostics(flat),
            "errors": sum("error" in r for r in flat),
            "_scores": scores, "_ids": ids,
        })
    return rows


def _group(correct: list[bool]) -> str:
    c = sum(correct)
    return "0" if c == 0 else "all" if c == len(correct) else "1" if c == 1 else "2+"


def pa_diagnostics(records: list[dict]) -> dict:
    """P&A records only: accuracy grouped by how many of the first layer's proposals were correct
    (0, 1, 2+ but not all, all), and how often the final answer is one of the proposals' answers."""
    recs = [r for r in records if r.get("proposals_correct")]
    if not recs:
        return {}
    groups: dict = {}
    for r in recs:
        g = groups.setdefault(_group(r["proposals_correct"]), [0, 0])
        g[0] += 1
        g[1] += bool(r.get("correct"))
    answered = [r for r in recs if r.get("final_in_proposals") is not None]
    new = [r for r in answered if not r["final_in_proposals"]]
    return {"pa_by_correct": {k: {"questions": v[0], "accuracy": v[1] / v[0]} for k, v in groups.items()},
            "final_in_proposals": sum(r["final_in_proposals"] for r in answered) / len(answered) if answered else None,
            "final_new": len(new), "final_new_correct": sum(bool(r.get("correct")) for r in new)}


def _diagnostics_section(trows: list[dict]) -> list[str]:
    rows = [r for r in trows if r.get("pa_by_correct")]
    if not rows:
        return []
    lines = ["P&A diagnostics (pooled over seeds): accuracy by how many of the K proposals were correct "
             "[records], and how often the final answer equals some proposal's answer:", "",
             "| model | strategy | 0 correct | 1 correct | 2+ (not all) | all correct | final = a proposal's answer "
             "| new answers (correct) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for g in ("0", "1", "2+", "all"):
            v = r["pa_by_correct"].get(g)
            cells.append(f"{v['accuracy']:.2f} [{v['questions']}]" if v else "-")
        fin = "-" if r["final_in_proposals"] is None else f"{r['final_in_proposals']:.0%}"
        lines.append(f"| {r['label']} | {r['strategy_label']} | {' | '.join(cells)} | {fin} | "
                     f"{r['final_new']} ({r['final_new_correct']}) |")
    return lines + [""]


def arms(trows: list[dict]) -> dict:
    """{(arm, strategy): [rows]}: labels "<arm>-s<training seed>" grouped into their arm (other labels are an
    arm of one), when at least one label names a training seed."""
    if not any(_ARM.match(r["label"]) for r in trows):
        return {}
    out: dict = {}
    for r in trows:
        m = _ARM.match(r["label"])
        out.setdefault((m["arm"] if m else r["label"], r["strategy"]), []).append(r)
    return out


def _stack(rows: list[dict]) -> tuple[list[str], list[list[float]]]:
    """The scores of several runs on their common questions: one row per (training seed, eval seed)."""
    common = sorted(set.intersection(*(set(r["_ids"]) for r in rows)))
    stacked = []
    for r in rows:
        idx = {q: i for i, q in enumerate(r["_ids"])}
        stacked += [[row[idx[q]] for q in common] for row in r["_scores"]]
    return common, stacked


def _arms_section(trows: list[dict], n_boot: int, arm_ref: str | None = None) -> list[str]:
    """Each arm over its training seeds: accuracy with a bootstrap over training seeds and questions, and the
    paired difference of each arm and strategy from SFT greedy (the baseline the paper's claim is about), or,
    with `arm_ref`, from that arm's same strategy."""
    groups = arms(trows)
    if not groups:
        return []
    from .stats import bootstrap_ci, paired_difference

    what = "SFT greedy" if arm_ref is None else f"{arm_ref}, same strategy"
    lines = ["Across training seeds (labels <arm>-s<seed>): accuracy [95% bootstrap interval resampling training "
             f"seeds and questions]; paired difference from {what} on the same questions:", "",
             f"| arm | strategy | training seeds | accuracy [95% CI] | no answer | minus {what} [95% CI] |",
             "|---|---|---|---|---|---|"]
    for (arm, strategy), rows in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[1][0]["total_tokens"])):
        ids, scores = _stack(rows)
        mean, lo, hi = bootstrap_ci(scores, n_boot=n_boot)
        seeds = [(_ARM.match(r["label"]) or {"seed": "-"})["seed"] for r in rows]
        na = [r["no_answer"] for r in rows if r.get("no_answer") is not None]
        diff = "-"
        key = ("sft", "greedy") if arm_ref is None else (arm_ref, strategy)
        base = groups.get(key)
        if base and (arm, strategy) != key:
            base_ids, base_scores = _stack(base)
            common = sorted(set(ids) & set(base_ids))
            a = [[row[ids.index(q)] for q in common] for row in scores]
            b = [[row[base_ids.index(q)] for q in common] for row in base_scores]
            if len(a) != len(b):
                a, b = (a * len(b), b) if len(a) == 1 else (a, b * len(a)) if len(b) == 1 else (a, b)
            d, dlo, dhi = paired_difference(a, b, n_boot=n_boot)
            diff = f"{d:+.3f} [{dlo:+.3f}, {dhi:+.3f}]"
        lines.append(f"| {arm} | {rows[0]['strategy_label']} | {', '.join(seeds)} | {mean:.3f} [{lo:.3f}, {hi:.3f}] | "
                     f"{'-' if not na else format(sum(na) / len(na), '.0%')} | {diff} |")
    return lines + [""]


def _fmt_flops(x):
    return "-" if x is None else f"{x / 1e9:.1f}"


def reference_label(found: dict, labels: list[str]) -> str:
    """The model the others are compared with by default: the first whose model is not an `aft train` output
    (the untrained base), else the first label."""
    for label in labels:
        model = next(e["run"].get("model") or "" for (lb, _, _), e in found.items() if lb == label)
        folder = Path(model).expanduser()
        if not any((folder / f).exists() for f in ("metrics.json", "adapter_config.json", "aft_base_model.txt")):
            return label
    return labels[0]


def write_report(out: str | Path, n_boot: int = 2000, title: str = "Evaluation report",
                 reference: str | None = None) -> Path:
    """report.md, plots and summary.json from the cached records; other models are compared with `reference`
    (a label; default: the untrained model, see reference_label). `reference` may also name an arm (labels
    <arm>-s<seed>): then each arm and strategy is paired with that arm's same strategy across training seeds,
    and the models with the default reference."""
    out = Path(out)
    found = load_records(out)
    rows = summarize(found, n_boot)
    if not rows:
        raise AftError(f"{out}: records found but no question answered under every seed yet")
    tasks = sorted({r["task"] for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    arm_ref = reference if reference and reference not in labels and any(
        (m := _ARM.match(lb)) and m["arm"] == reference for lb in labels) else None
    if arm_ref:
        reference = None
    ref = reference or reference_label(found, labels)
    if ref not in labels:
        raise AftError(f"{out}: no model labelled {ref!r} to compare with (labels: {', '.join(labels)})")
    labels = [ref] + [lb for lb in labels if lb != ref]
    lines = [f"# {title}", "",
             f"Rebuilt from the cached records in `{out}` on {time.strftime('%Y-%m-%d %H:%M')} "
             f"(`aft eval report {out}`).", "",
             "Accuracy: mean over seeds x questions, [95% bootstrap interval resampling seeds and questions]. "
             "Compute per query, measured: prompt tokens processed (prefill; a request's n samples share one), "
             "generated tokens (decode), GFLOPs = 2 x parameters x tokens, wall seconds as measured when generated. "
             "No answer: the share of responses from which the verifier extracts no answer. "
             "Best-of-N with the verifier is an ORACLE (it reads the reference answer): an upper bound, not a "
             "deployable method.", ""]
    for label in labels:
        run = next(e["run"] for (lb, _, _), e in found.items() if lb == label)
        eng = run.get("engine", {})
        cfg = run.get("config", {})
        lines.append(f"- **{label}**: model `{run.get('model')}` ({eng.get('engine', '?')} engine"
                     f"{', ' + format(run['num_parameters'], ',') + ' parameters' if run.get('num_parameters') else ''}); "
                     f"sampling T={cfg.get('temperature')} top-p={cfg.get('top_p')} top-k={cfg.get('top_k')}, "
                     f"max_tokens={cfg.get('max_tokens')}, P&A final layer T={cfg.get('final_layer_temperature')}")
    if len(labels) > 1:
        why = "as asked" if reference else "the untrained model"
        lines += ["", f"The other models are compared with **{ref}** ({why}; `aft eval report --reference LABEL` "
                      f"to choose)."]
    lines.append("")
    for task in tasks:
        trows = [r for r in rows if r["task"] == task]
        lines += [f"## {task}", "",
                  "| model | strategy | accuracy [95% CI] | seeds x questions | generations | prompt tok | gen tok | "
                  "total tok | prefill GFLOP | decode GFLOP | wall s | cut at max_tokens | no answer |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(trows, key=lambda r: (labels.index(r["label"]), r["total_tokens"])):
            name = r["strategy_label"].replace("ORACLE", "**ORACLE**")
            lines.append(
                f"| {r['label']} | {name} | {r['accuracy']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | "
                f"{len(r['seeds'])} x {r['questions']} | {r['generations']:.1f} | {r['prompt_tokens']:.0f} | "
                f"{r['completion_tokens']:.0f} | {r['total_tokens']:.0f} | {_fmt_flops(r['prefill_flops'])} | "
                f"{_fmt_flops(r['decode_flops'])} | {r['seconds']:.2f} | {r['truncated']:.0%} | "
                f"{'-' if r['no_answer'] is None else format(r['no_answer'], '.0%')} |")
        lines.append("")
        lines += _diagnostics_section(trows)
        lines += _arms_section(trows, n_boot, arm_ref)
        lines += _paired_section(trows, labels)
        for kind, fname in (("tokens", f"acc_vs_tokens-{task}.png"), ("flops", f"acc_vs_flops-{task}.png")):
            if _plot_compute(trows, out / fname, kind, task):
                lines.append(f"![accuracy versus {kind}: {task}]({fname})")
        for label in labels:
            fname = f"width_depth-{label}-{task}.png"
            if _plot_heatmap([r for r in trows if r["label"] == label], out / fname, f"{label} / {task}"):
                lines.append(f"![width x depth: {label} / {task}]({fname})")
        lines.append("")
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_json(out / "summary.json", [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows])
    return out / "report.md"


def _paired_section(trows: list[dict], labels: list[str]) -> list[str]:
    """Paired differences: each strategy vs its model's greedy; each model vs the reference (labels[0]), same
    strategy."""
    lines = []
    by = {(r["label"], r["strategy"]): r for r in trows}
    pairs = []
    for r in trows:
        g = by.get((r["label"], "greedy"))
        if g is not None and r["strategy"] != "greedy":
            pairs.append((r, g))
    if len(labels) > 1:
        for r in trows:
            b = by.get((labels[0], r["strategy"]))
            if b is not None and r["label"] != labels[0]:
                pairs.append((r, b))
    if not pairs:
        return lines
    lines += ["Paired differences (same questions; seeds paired where both have them):", "",
              "| A | B | A - B [95% CI] |", "|---|---|---|"]
    for a, b in pairs:
        common = sorted(set(a["_ids"]) & set(b["_ids"]))
        if not common:
            continue
        ia, ib = {q: i for i, q in enumerate(a["_ids"])}, {q: i for i, q in enumerate(b["_ids"])}
        sa = [[row[ia[q]] for q in common] for row in a["_scores"]]
        sb = [[row[ib[q]] for q in common] for row in b["_scores"]]
        if len(sa) != len(sb) and (len(sa) == 1 or len(sb) == 1):  # a deterministic run vs several seeds
            sa = sa * len(sb) if len(sa) == 1 else sa
            sb = sb * len(sa) if len(sb) == 1 else sb
        d, lo, hi = paired_difference(sa, sb)
        lines.append(f"| {a['label']} {a['strategy_label']} | {b['label']} {b['strategy_label']} | "
                     f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    return lines + [""]


_COLORS = {"greedy": "tab:blue", "sample": "tab:gray", "pa": "tab:red", "best_of_n": "tab:green",
           "majority": "tab:purple"}
_MARKERS = "osD^vP*Xhp<>d"


_LABEL_OFFSETS = [(4, 3), (4, -10), (4, 12), (4, -19), (4, 21), (4, -28), (4, 30)]


def _place_labels(fig, ax, notes) -> None:
    """Move each point's label to the first offset where it overlaps no label placed before it and no
    marker, so labels of close points stack instead of printing over each other; a label with no free
    place is hidden (its point's colour and marker still say what it is)."""
    renderer = fig.canvas.get_renderer()  # text extents need no full draw (a draw costs as much as savefig)
    ax.get_xlim(), ax.get_ylim()  # settles autoscaled limits, which transData maps through
    markers = [ax.transData.transform(n.xy) for n in notes]
    placed = []
    for note in notes:
        for dx, dy in _LABEL_OFFSETS + [(-4 - len(note.get_text()) * 4, 3)]:
            note.set_position((dx, dy))
            box = note.get_window_extent(renderer).expanded(1.02, 1.1)
            if not any(box.overlaps(b) for b in placed) and not any(box.contains(x, y) for x, y in markers):
                placed.append(box)
                break
        else:  # no free place near its point: the point keeps its colour and marker, the label goes
            note.set_visible(False)


def _plot_compute(trows, path: Path, kind: str, task: str) -> bool:
    key = "total_tokens" if kind == "tokens" else "flops"
    pts = [r for r in trows if r.get(key)]
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["label"] for r in pts))
    fig, ax = plt.subplots(figsize=(7.5, 5))
    notes = []
    for r in pts:
        mk = _MARKERS[labels.index(r["label"]) % len(_MARKERS)]
        color = _COLORS.get(r["kind"], "black")
        ax.errorbar(r[key], r["accuracy"], yerr=[[r["accuracy"] - r["ci_low"]], [r["ci_high"] - r["accuracy"]]],
                    fmt=mk, color=color, mfc="none" if r["oracle"] else color, capsize=3)
        notes.append(ax.annotate(r["strategy"] + (" (oracle)" if r["oracle"] else ""), (r[key], r["accuracy"]),
                                 fontsize=7, xytext=(4, 3), textcoords="offset points"))
    ax.set_xscale("log")
    ax.set_xlabel("tokens processed per query (prompt + generated)" if kind == "tokens"
                  else "FLOPs per query (2 x parameters x tokens)")
    ax.set_ylabel("accuracy (95% CI)")
    ax.set_title(f"{task}: accuracy versus compute")
    ax.grid(alpha=0.3)
    # One legend entry per model (marker) and per strategy kind (colour), beside the axes, never on points.
    from matplotlib.lines import Line2D

    kinds = list(dict.fromkeys(r["kind"] for r in pts))
    handles = [Line2D([], [], ls="", marker="o", color=_COLORS.get(k, "black"), label=k) for k in kinds]
    handles += [Line2D([], [], ls="", marker=_MARKERS[i % len(_MARKERS)], color="black", mfc="none", label=lab)
                for i, lab in enumerate(labels)]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
              title="hollow = oracle; labels\nhidden where they would\ncover others", title_fontsize=6)
    fig.tight_layout()
    _place_labels(fig, ax, notes)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_heatmap(lrows, path: Path, title: str) -> bool:
    cells = {}
    sample = next((r for r in lrows if r["strategy"] == "sample"), None)
    for r in lrows:
        m = _PA.match(r["strategy"])
        if m:
            cells[(int(m[1]), int(m[2]))] = r
    if len(cells) < 2:
        return False
    ks = sorted({k for k, _ in cells})
    ls = sorted({l for _, l in cells})
    if sample is not None:
        ls = [0] + ls
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.full((len(ls), len(ks)), np.nan)
    for i, l in enumerate(ls):
        for j, k in enumerate(ks):
            r = sample if l == 0 else cells.get((k, l))
            if r is not None:
                grid[i, j] = r["accuracy"]
    fig, ax = plt.subplots(figsize=(1.3 * len(ks) + 2.5, 1.0 * len(ls) + 1.8))
    im = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto", vmin=0.0, vmax=1.0)
    for i, l in enumerate(ls):
        for j, k in enumerate(ks):
            r = sample if l == 0 else cells.get((k, l))
            if r is not None:
                ax.text(j, i, f"{r['accuracy']:.2f}\n{r['total_tokens']:.0f} tok", ha="center", va="center",
                        fontsize=7, color="white" if r["accuracy"] < 0.6 else "black")
    ax.set_xticks(range(len(ks)), [str(k) for k in ks])
    ax.set_yticks(range(len(ls)), [f"{l}" + (" (1 sample)" if l == 0 else "") for l in ls])
    ax.set_xlabel("width K (proposals per layer)")
    ax.set_ylabel("depth L (aggregation layers)")
    ax.set_title(f"{title}: accuracy (and tokens/query)", fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def table_rows(out: str | Path, n_boot: int = 2000) -> list[dict]:
    """The summary rows (without the raw scores), for scripts and tests."""
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in summarize(load_records(out), n_boot)]


__all__ = ["load_records", "summarize", "table_rows", "write_report"]
