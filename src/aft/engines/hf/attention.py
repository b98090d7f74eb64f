"""`aft_sdpa`: SDPA, except that a decode step's attention (one query token per row) runs as two
batched matmuls over the key/value heads, reading the cache's transposed keys in place (CPU only;
registered with transformers' AttentionInterface by the engine)."""

from __future__ import annotations

import functools

import torch

ATTENTION = "aft_sdpa"


@functools.cache
def register_attention() -> str:
    """Register `aft_sdpa` with transformers: SDPA, except one-token (decode) steps, done as two matmuls."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if query.shape[2] != 1 or dropout or kwargs.get("position_bias") is not None or kwargs.get("softcap"):
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        return decode_attention(query, key, value, attention_mask, scaling), None

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return ATTENTION


def decode_attention(query, key, value, mask, scaling):
    """Attention of one query token per row: query (B, H, 1, D), key/value (B, Hkv, T, D) -> (B, 1, H, D).

    The H query heads are grouped by the key/value head they read (grouped-query attention without
    copying the cache), scores and softmax in float32.
    """
    B, H, _, D = query.shape
    Hkv = key.shape[1]
    scale = D ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query.view(B, Hkv, H // Hkv, D), key.transpose(-1, -2)).float() * scale
    if mask is not None:  # (B, 1, 1, T): True = attend (bool), or additive (float)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(probs, value).view(B, 1, H, D)
