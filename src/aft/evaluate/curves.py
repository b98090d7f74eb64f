"""`aft eval curves`: pass@k, BoN@k, majority@k and answer diversity per model, from the samples of a
best-of-N run (`aft eval run --strategies best_of_n:n=32,scorer=verifier`); no model is loaded.

Per question, from its n samples (c correct, by the verifier):

    pass@k      1 - C(n-c, k) / C(n, k): the unbiased estimator of "one of k samples is right" (Chen et al.)
    BoN@k       the expected correctness of the sample the scorer ranks first among k drawn without
                replacement: sum_i correct_i * C(n-1-rank_i, k-1) / C(n, k), ranks by score (ties: the
                earlier sample first, as best-of-N picks). With the ORACLE verifier (score = correct) it
                equals pass@k; with another scorer it is lower.
    majority@k  the mean correctness of the majority vote over `subsets` random k-subsets (seeded; exact
                at k = n), votes as `majority:n=...` counts them (ties: the earlier sample)
    diversity   distinct final answers among the n samples (answers that extract to nothing not counted)

Each value is a mean over questions and run seeds with a bootstrap interval (stats.bootstrap_ci).
Writes <out>/curves.json, curves.md and curves-<task>.png. With pool_seeds, the models labelled
<arm>-s<seed> (one per training seed) are pooled into <arm>: the bootstrap then resamples training
seeds (x run seeds) and questions, so the interval covers the training seed too
(curves-pooled.json, .md, -<task>.png).

With a reference model (`--reference LABEL`), each other model of the task also gets its paired differences
from it, metric by metric and k by k, on the questions both answered (stats.paired_difference: seeds
paired in order where both have as many, else the per-question means): "vs_reference" in the json, a
table in the markdown.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np

from ..bon import all_wrong
from ..errors import AftError
from ..io import read_jsonl, write_json
from .stats import bootstrap_ci, paired_difference
from .strategies import majority_pick
from .tasks import answer_key

log = logging.getLogger(__name__)

KS = (1, 2, 4, 8, 16, 32)
BON_FILE = re.compile(r"^bon-n(\d+)-oracle\.seed(-?\d+)\.jsonl$")


def pass_at_k(n: int, c: int, k: int) -> float:
    return 1.0 - all_wrong(n, n - c, k)


def bon_at_k(scores: list[float | None], correct: list[bool], k: int) -> float:
    """Expected correctness of best-of-k (k of the n samples without replacement, the top score picked)."""
    n = len(scores)
    order = sorted(range(n), key=lambda i: (scores[i] is None, -(scores[i] or 0.0), i))
    return sum(math.comb(n - 1 - rank, k - 1) for rank, i in enumerate(order) if correct[i]) / math.comb(n, k)


def majority_at_k(votes: list[str | None], correct: list[bool], k: int, subsets: int, rng) -> float:
    n = len(votes)
    if k == n:
        draws = [list(range(n))]
    else:
        draws = [sorted(rng.choice(n, size=k, replace=False).tolist()) for _ in range(subsets)]
    return float(np.mean([correct[d[majority_pick([votes[i] for i in d])]] for d in draws]))


def question_curves(rec: dict, ks: tuple[int, ...], subsets: int, rng) -> dict:
    cands = rec["candidates"]
    correct = [c.get("score") == 1.0 for c in cands]
    scores = [c.get("score") for c in cands]
    votes = [answer_key(c["text"], rec.get("question")) for c in cands]
    n, c = len(cands), sum(correct)
    return {"pass": [pass_at_k(n, c, k) for k in ks], "bon": [bon_at_k(scores, correct, k) for k in ks],
            "majority": [majority_at_k(votes, correct, k, subsets, rng) for k in ks],
            "diversity": len({v for v in votes if v is not None})}


TRAINING_SEED = re.compile(r"-s\d+$")


def sample_files(out: Path, pool_seeds: bool = False) -> dict[tuple[str, str], dict[tuple[str, int], Path]]:
    """(label, task) -> {(model label, run seed): the widest oracle best-of-N records file}; with pool_seeds
    the label of <arm>-s<seed> is <arm>."""
    found: dict[tuple[str, str], dict[tuple[str, int], tuple[int, Path]]] = {}
    for path in sorted(out.glob("*/*/bon-n*-oracle.seed*.jsonl")):
        m = BON_FILE.match(path.name)
        if not m:
            continue
        n, seed = int(m.group(1)), int(m.group(2))
        label = path.parent.parent.name
        key = (TRAINING_SEED.sub("", label) if pool_seeds else label, path.parent.name)
        if n > found.setdefault(key, {}).get((label, seed), (0, None))[0]:
            found[key][(label, seed)] = (n, path)
    return {k: {s: p for s, (_, p) in v.items()} for k, v in found.items()}


def compute_curves(out: str | Path, ks: tuple[int, ...] = KS, subsets: int = 200, n_boot: int = 2000,
                   pool_seeds: bool = False, reference: str | None = None) -> list[dict]:
    """One entry per (model label, task): the curves over ks with intervals, and the diversity (and the paired
    differences from `reference`)."""
    out = Path(out)
    files = sample_files(out, pool_seeds)
    if not files:
        raise AftError(f"{out}: no best-of-N samples (run `aft eval run --strategies best_of_n:n=32,scorer=verifier` "
                       f"first)")
    results, cells_of = [], {}
    for (label, task), by_seed in sorted(files.items()):
        per_seed = []
        for seed, path in sorted(by_seed.items()):
            recs = [r for _, r in read_jsonl(path) if "error" not in r and r.get("candidates")]
            per_seed.append({r["id"]: r for r in recs})
        ids = sorted(set.intersection(*(set(s) for s in per_seed)))  # the questions every seed answered
        if not ids:
            continue
        n = min(len(s[q]["candidates"]) for s in per_seed for q in ids)
        use = tuple(k for k in ks if k <= n)
        if len(use) < len(ks):
            log.warning("%s %s: %d samples per question; curves stop at k=%d", label, task, n, max(use))
        rng = np.random.default_rng(0)
        cells = [[question_curves({**s[q], "candidates": s[q]["candidates"][:n]}, use, subsets, rng) for q in ids]
                 for s in per_seed]
        entry = {"label": label, "task": task, "n": n, "questions": len(ids), "k": list(use),
                 "seeds": sorted({s for _, s in by_seed}), "models": sorted({m for m, _ in by_seed})}
        for metric in ("pass", "bon", "majority"):
            entry[metric] = [bootstrap_ci([[q[metric][j] for q in s] for s in cells], n_boot) for j in range(len(use))]
        entry["diversity"] = bootstrap_ci([[q["diversity"] for q in s] for s in cells], n_boot)
        results.append(entry)
        cells_of[label, task] = [dict(zip(ids, s)) for s in cells]
    if reference is not None:
        if reference not in {r["label"] for r in results}:
            raise AftError(f"--reference {reference}: no such model in {out} (models: "
                           f"{', '.join(sorted({r['label'] for r in results}))})")
        for entry in results:
            ref = cells_of.get((reference, entry["task"]))
            if entry["label"] != reference and ref is not None:
                entry["vs_reference"] = _paired(cells_of[entry["label"], entry["task"]], ref, entry["k"], n_boot)
                entry["vs_reference"]["reference"] = reference
    return results


def _paired(mine: list[dict], ref: list[dict], ks: list[int], n_boot: int) -> dict:
    """Paired differences mine - ref per metric and k (the k both have), and of the diversity."""
    ids = sorted(set.intersection(*(set(s) for s in mine + ref)))
    k_ref = len(next(iter(ref[0].values()))["pass"])
    use = list(range(min(len(ks), k_ref)))

    def diff(get) -> tuple[float, float, float]:
        return paired_difference([[get(s[q]) for q in ids] for s in mine], [[get(s[q]) for q in ids] for s in ref],
                                 n_boot)

    out = {"questions": len(ids), "k": [ks[j] for j in use]}
    for metric in ("pass", "bon", "majority"):
        out[metric] = [diff(lambda c, m=metric, j=j: c[m][j]) for j in use]
    out["diversity"] = diff(lambda c: c["diversity"])
    return out


def write_curves(out: str | Path, ks: tuple[int, ...] = KS, subsets: int = 200, n_boot: int = 2000,
                 pool_seeds: bool = False, reference: str | None = None) -> list[dict]:
    out = Path(out)
    results = compute_curves(out, ks, subsets, n_boot, pool_seeds, reference)
    name = "curves-pooled" if pool_seeds else "curves"
    write_json(out / f"{name}.json", results)
    lines = ["# pass@k, BoN@k and majority@k", "",
             "From each model's best-of-N samples (verifier = ORACLE, so BoN@k = pass@k); mean over questions "
             "and run seeds [95% bootstrap interval]. Written by `aft eval curves`.", ""]
    for task in sorted({r["task"] for r in results}):
        rows = [r for r in results if r["task"] == task]
        ks_ = rows[0]["k"]
        lines += [f"## {task}", "", "| model | metric | " + " | ".join(f"k={k}" for k in ks_) + " |",
                  "|---|---|" + "---|" * len(ks_)]
        for r in rows:
            for metric in ("pass", "bon", "majority"):
                vals = " | ".join(f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in r[metric])
                lines.append(f"| {r['label']} | {metric}@k | {vals} |")
        lines += ["", "| model | distinct answers per question (of n samples) | questions | run seeds |",
                  "|---|---|---|---|"]
        for r in rows:
            m, lo, hi = r["diversity"]
            lines.append(f"| {r['label']} | {m:.2f} [{lo:.2f}, {hi:.2f}] of {r['n']} | {r['questions']} | "
                         f"{', '.join(map(str, r['seeds']))} (models: {', '.join(r['models'])}) |")
        lines.append("")
        paired = [r for r in rows if "vs_reference" in r]
        if paired:
            d = paired[0]["vs_reference"]
            lines += [f"Paired differences from **{d['reference']}** on the same questions (seeds paired where "
                      "both have as many) [95% bootstrap interval]:", "",
                      "| model | metric | " + " | ".join(f"k={k}" for k in d["k"]) + " | distinct answers |",
                      "|---|---|" + "---|" * (len(d["k"]) + 1)]
            for r in paired:
                v = r["vs_reference"]
                for metric in ("pass", "majority"):
                    vals = " | ".join(f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]" for m, lo, hi in v[metric])
                    div = "{:+.2f} [{:+.2f}, {:+.2f}]".format(*v["diversity"]) if metric == "pass" else ""
                    lines.append(f"| {r['label']} | {metric}@k | {vals} | {div} |")
            lines.append("")
        plot_curves(rows, out / f"{name}-{task}.png", task)
    (out / f"{name}.md").write_text("\n".join(lines))
    return results


def plot_curves(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, metric, name in zip(axes, ("pass", "bon", "majority"),
                                ("pass@k", "BoN@k (oracle verifier)", "majority@k")):
        for r in rows:
            mean = [v[0] for v in r[metric]]
            ax.plot(r["k"], mean, "o-", label=r["label"])
            ax.fill_between(r["k"], [v[1] for v in r[metric]], [v[2] for v in r[metric]], alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xticks(rows[0]["k"], [str(k) for k in rows[0]["k"]])
        ax.set_xlabel("k (samples)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"accuracy ({title})")
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
