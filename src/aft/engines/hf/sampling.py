"""Sampling: each sample draws from its own seeded stream of uniforms (inverse-CDF sampling), so its
draws depend on its seed alone, not on what shares its batch; the vocabulary is sorted only where
top-p/top-k need an order, and then only its few most likely tokens."""

from __future__ import annotations

import torch


def uniform_streams(seeds: list[int | None], length: int, device) -> torch.Tensor:
    """One row of uniforms per sample, from its own seed (unseeded rows use torch's global RNG)."""
    rows = []
    for s in seeds:
        g = torch.Generator().manual_seed(s) if s is not None else None
        rows.append(torch.rand(length, generator=g, dtype=torch.float64))
    return torch.stack(rows).to(device)


NUCLEUS_START = 64  # candidates `topk` starts from for top-p; doubled until they hold the nucleus


def sample(logits: torch.Tensor, temp, top_p, top_k, u) -> torch.Tensor:
    """Next token per row: greedy where temp == 0, else sampling by inverse CDF on the row's uniform `u`.

    Rows without top-p/top-k invert the CDF of the full distribution in vocabulary order
    (no sort). Rows with top-p/top-k invert it over their kept tokens, most likely first.
    """
    sampled = temp > 0
    if not bool(sampled.any()):
        return logits.argmax(-1)
    # argmax only where some row is greedy; row subsets (copies of the logits) only where rows differ
    out = logits.argmax(-1) if not bool(sampled.all()) else torch.empty_like(u, dtype=torch.long)
    truncated = sampled & ((top_p < 1) | (top_k > 0))
    plain = sampled & ~truncated
    for rows, draw in ((plain, _sample_plain), (truncated, _sample_truncated_scaled)):
        if bool(rows.all()):
            return draw(logits, temp, top_p, top_k, u)
        if bool(rows.any()):
            out[rows] = draw(logits[rows], temp[rows], top_p[rows], top_k[rows], u[rows])
    return out


def _sample_plain(logits, temp, top_p, top_k, u) -> torch.Tensor:
    return _invert_cdf(torch.softmax(logits / temp[:, None], dim=-1), u)


def _sample_truncated_scaled(logits, temp, top_p, top_k, u) -> torch.Tensor:
    return sample_truncated(logits / temp[:, None], top_p, top_k, u)


def sample_truncated(lg: torch.Tensor, top_p, top_k, u) -> torch.Tensor:
    """Top-k / top-p (nucleus: the smallest most-likely prefix whose mass reaches p) sampling."""
    probs = torch.softmax(lg, dim=-1)
    V = probs.shape[-1]
    # Candidates: top_k of them where set, else enough to hold the nucleus (a few dozen at most, usually).
    need_k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
    k = min(V, max(int(top_k.max()), NUCLEUS_START))
    while True:
        sp, si = probs.topk(k, dim=-1)  # sorted, most likely first
        cum = sp.cumsum(-1)
        holds = (need_k <= k) | (cum[:, -1] >= top_p) | (k == V)
        if bool(holds.all()):
            break
        k = min(V, 4 * k)
    drop = (cum - sp) >= top_p[:, None]  # keep the prefix whose mass before each token is < p (the first always)
    ranks = torch.arange(k, device=sp.device)[None, :]
    drop |= ranks >= need_k[:, None]
    sp = sp.masked_fill(drop, 0.0)
    return si.gather(-1, _invert_cdf(sp, u)[:, None]).squeeze(-1)


def _invert_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative weight reaches u x total (u in [0, 1))."""
    cdf = weights.double().cumsum(-1)
    target = (u * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target).squeeze(-1).clamp(max=weights.shape[-1] - 1)
