"""Where the aggregation layer's time goes: cProfile of one aggregation call of bench_infer's P&A workload.

    python benchmarks/profile_aggregation.py [--dtype bfloat16] [--tokens 128] [--top 15]

Layer 0 (8 prompts x K=4 samples) runs first, unprofiled; then the 8 aggregator requests (n=1, temperature 0.7)
run under cProfile, and the functions with the most time of their own are printed (torch's linear, matmul and
SDPA calls show the matmul, decode-attention and prefill-attention shares).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from bench_infer import K, queries

from aft.engines.base import Request, SamplingParams
from aft.engines.hf import HFEngine
from aft.models import embedded_model_dir
from aft.prompts import aggregator_messages, proposer_messages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    eng = HFEngine.load(str(embedded_model_dir()), dtype=args.dtype, device="cpu")
    qs = queries()
    sp = SamplingParams(n=K, temperature=0.7, top_p=0.95, max_tokens=args.tokens, seed=1)
    props = [[c.text for c in r.completions] for r in eng.generate([Request(proposer_messages(q), sp) for q in qs])]
    msgs = [aggregator_messages(q, p) for q, p in zip(qs, props)]
    print("aggregator prompt tokens:", [len(eng.encode(m)) for m in msgs])
    sp1 = SamplingParams(n=1, temperature=0.7, top_p=1.0, max_tokens=args.tokens, seed=2)
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    res = eng.generate([Request(m, sp1) for m in msgs])
    prof.disable()
    dt = time.perf_counter() - t
    n = sum(c.tokens for r in res for c in r.completions)
    print(f"aggregation call: {dt:.1f} s, {n} tokens, {n / dt:.1f} tok/s (under cProfile)")
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
