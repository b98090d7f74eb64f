"""`aft_sdpa`: SDPA, except that a decode step's attention (one query token per row, or a few with a
mask: a speculative step's verification) runs as two batched matmuls over the key/value heads, reading
the cache's transposed keys in place (CPU only; registered with transformers' AttentionInterface by
the engine)."""

from __future__ import annotations

import functools

import torch

ATTENTION = "aft_sdpa"
FEW_QUERIES = 16  # query tokens per row up to which a masked step uses the matmul path


@functools.cache
def register_attention() -> str:
    """Register `aft_sdpa` with transformers: SDPA, except decode steps (one query token, or a few with a
    mask), done as two matmuls."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        few = query.shape[2] == 1 or (query.shape[2] <= FEW_QUERIES and attention_mask is not None)
        if not few or dropout or kwargs.get("position_bias") is not None or kwargs.get("softcap"):
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        return decode_attention(query, key, value, attention_mask, scaling), None

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return ATTENTION


def decode_attention(query, key, value, mask, scaling):
    """Attention of a few query tokens per row: query (B, H, Q, D), key/value (B, Hkv, T, D) -> (B, Q, H, D).

    The H query heads are grouped by the key/value head they read (grouped-query attention without
    copying the cache), scores and softmax in float32. `mask` (B, 1, Q, T): True = attend (bool), or
    additive (float); needed where Q > 1 (it carries the causal order).
    """
    B, H, Q, D = query.shape
    Hkv = key.shape[1]
    G = H // Hkv
    scale = D ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query.reshape(B, Hkv, G * Q, D), key.transpose(-1, -2)).float() * scale
    if mask is not None:
        scores = scores.view(B, Hkv, G, Q, -1)
        m = mask[:, :, None]
        scores = scores.masked_fill(~m, float("-inf")) if mask.dtype == torch.bool else scores + m
    probs = torch.softmax(scores, dim=-1).to(value.dtype).view(B, Hkv, G * Q, -1)
    return torch.matmul(probs, value).view(B, H, Q, D).transpose(1, 2)
