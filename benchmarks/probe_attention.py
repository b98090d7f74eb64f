"""The two attention choices of the transformers engine, each against what transformers does.

    python benchmarks/probe_attention.py

1. Decode attention (one query token per row, bf16, the engine's cache layout): SDPA as
   transformers calls it (query heads packed per key/value head, boolean padding mask)
   against `aft.engines.hf.attention.decode_attention`, per layer call, at 32 rows x 200 positions
   (P&A layer 0) and 8 rows x 700 positions (the final layer).
2. Prefill of 8 aggregator-sized prompts (500-670 tokens) on the embedded model: one
   left-padded batch with its mask (what `generate` does) against the engine's prefill
   (prompts grouped by length, no padding, no mask).
"""

import random
import statistics
import time

import torch
import torch.nn.functional as F

from aft.engines.hf import HFEngine, attention
from aft.models import embedded_model_dir


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def decode_attention():
    g = torch.Generator().manual_seed(0)
    for rows, positions in ((32, 200), (8, 700)):
        q = torch.randn(rows, 9, 1, 64, generator=g).bfloat16()  # SmolLM2-135M: 9 query heads, 3 kv heads
        kstore = torch.randn(rows, 3, 64, positions + 128, generator=g).bfloat16()
        k = kstore[..., :positions].transpose(-1, -2)
        v = torch.randn(rows, 3, positions + 128, 64, generator=g).bfloat16()[:, :, :positions]
        mask = torch.ones(rows, 1, 1, positions, dtype=torch.bool)
        mask[0, ..., :50] = False
        sdpa = timed(lambda: F.scaled_dot_product_attention(q.view(rows, 3, 3, 64), k, v, attn_mask=mask), 200)
        ours = timed(lambda: attention.decode_attention(q, k, v, mask, None), 200)
        print(f"decode attention, {rows} rows x {positions} positions: SDPA {sdpa * 1e3:.3f} ms, "
              f"ours {ours * 1e3:.3f} ms a layer ({sdpa / ours:.1f}x)")


@torch.inference_mode()
def prefill():
    eng = HFEngine.load(str(embedded_model_dir()), dtype="bfloat16", device="cpu")
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(n)] for n in (501, 628, 671, 620, 670, 580, 661, 667)]
    L = max(map(len, prompts))
    ids = torch.tensor([[eng.pad_id] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = timed(lambda: eng.lm(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                                  logits_to_keep=1), 3)
    grouped = timed(lambda: eng._prefill(prompts), 3)
    print(f"prefill of 8 prompts ({sum(map(len, prompts))} tokens): one padded batch with a mask {padded:.2f} s, "
          f"grouped by length without padding {grouped:.2f} s ({padded / grouped:.2f}x)")


if __name__ == "__main__":
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    decode_attention()
    prefill()
