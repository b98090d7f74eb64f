"""Does torch.compile speed up one decode step of the embedded model on this CPU?

The final P&A layer decodes a few rows over long aggregator prompts, where a
forward pass's fixed cost dominates; compiling is the usual cure. This times
one decode step (8 rows, 600-token prompts, StaticCache, bf16), eager against
torch.compile, in one run:

    python benchmarks/probe_compile.py [--freezing]

--freezing turns on inductor's weight freezing (prepacked oneDNN weights for CPU linears).
Measured here (2 cores, torch 2.13): eager 38 ms, compiled 116 ms (53 s to compile);
with --freezing eager 47 ms, compiled 137 ms (41 s). Compiling loses either way.
"""

import sys, time, torch
if "--freezing" in sys.argv:
    import torch._inductor.config
    torch._inductor.config.freezing = True
from transformers import AutoModelForCausalLM, StaticCache
from aft.models import embedded_model_dir
torch.manual_seed(0)
m = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.bfloat16).eval()
B, P, T = 8, 600, 700
cache = StaticCache(config=m.config, max_cache_len=T)
ids = torch.randint(0, 49000, (B, P))
with torch.inference_mode():
    m(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1, cache_position=torch.arange(P))
    def step(pos, tok):
        return m(input_ids=tok, past_key_values=cache, use_cache=True, cache_position=pos).logits
    tok = torch.randint(0, 49000, (B, 1))
    def bench(fn, n=20, start=P):
        ts = []
        for i in range(n):
            t = time.perf_counter(); fn(torch.tensor([start + i]), tok); ts.append(time.perf_counter() - t)
        return sorted(ts)[n // 2]
    eager = bench(step)
    print(f"eager step {eager*1e3:.1f} ms", flush=True)
    t = time.perf_counter()
    cstep = torch.compile(step, dynamic=False)
    cstep(torch.tensor([P + 30]), tok)
    print(f"compile {time.perf_counter()-t:.0f} s", flush=True)
    comp = bench(cstep, start=P + 31)
    print(f"compiled step {comp*1e3:.1f} ms  -> {eager/comp:.2f}x", flush=True)
