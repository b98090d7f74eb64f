"""Bootstrap intervals for accuracy over seeds and questions.

`scores[s][q]` is 1/0 for seed s and question q (the same questions under every
seed). A bootstrap replicate resamples seeds with replacement and, independently,
questions with replacement, and takes the mean over the chosen cells: the
interval covers both the sampling noise (seeds) and which questions happened to
be asked. With one seed it is the ordinary bootstrap over questions; a greedy
strategy, identical under every seed, gets the same.
"""

from __future__ import annotations

import numpy as np


def bootstrap_ci(scores, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean over all cells and a percentile bootstrap interval."""
    a = np.asarray(scores, dtype=float)
    if a.ndim == 1:
        a = a[None, :]
    if a.size == 0:
        return float("nan"), float("nan"), float("nan")
    n_seeds, n_q = a.shape
    rng = np.random.default_rng(seed)
    s_idx = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    q_idx = rng.integers(0, n_q, size=(n_boot, n_q))
    # mean over the resampled seeds x resampled questions of each replicate
    per_seed = a[:, q_idx].mean(axis=2)  # (n_seeds, n_boot): each seed's mean on the replicate's questions
    reps = np.take_along_axis(per_seed.T, s_idx, axis=1).mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(reps, [alpha, 1 - alpha])
    return float(a.mean()), float(lo), float(hi)


def paired_difference(a, b, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean and interval of accuracy(a) - accuracy(b) on the same seeds and questions (paired)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim == 1:
        a, b = a[None, :], b[None, :]
    if a.shape != b.shape:  # e.g. a greedy run with fewer seeds: compare the per-question means
        a, b = a.mean(axis=0, keepdims=True), b.mean(axis=0, keepdims=True)
    return bootstrap_ci(a - b, n_boot, level, seed)
