"""Speculative aggregation: the aggregation layer with and without prompt-lookup speculation, side by side.

    python benchmarks/bench_spec.py [--model smollm2-135m] [--dtype bfloat16] [--tokens 128] [--spec_tokens 8 ...]
                                    [--queries 8] [--repeats 2] [--greedy] [--questions FILE]

--model takes what `aft infer` takes locally (an adapter folder of `aft train` too); --questions an input
JSONL as `aft infer --input_file` reads it (default: bench_infer.py's 8 questions), e.g. questions of the
task an AFT adapter was trained on.

The proposals (K=4 per query, bench_infer.py's questions, T 0.7, top-p 0.95) are generated once; then
the aggregation layer (one request per query, n=1, T 0.7 top-p 1.0 as P&A's final layer, or greedy
with --greedy) runs on the same engine model with spec_tokens 0 and each value of --spec_tokens,
interleaved, in a rotated order each repeat. Prints per side: tok/s (median), tokens per forward pass, acceptance.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from bench_infer import K, QUESTIONS, queries

from aft.engines.base import Request, SamplingParams
from aft.engines.hf import HFEngine
from aft.io import parse_query, read_jsonl
from aft.models import resolve
from aft.prompts import aggregator_messages, proposer_messages


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--spec_tokens", type=int, nargs="+", default=[8], help="most drafts per row and step; "
                    "several values: one side each")
    ap.add_argument("--queries", type=int, default=len(QUESTIONS))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--questions", default=None, help="input JSONL as aft infer reads it (default: bench_infer's)")
    args = ap.parse_args()
    model = resolve(args.model)
    plain = HFEngine.load(model.path, adapter=model.adapter, dtype=args.dtype, device="cpu")
    if args.questions:
        qs = [parse_query(rec, f"{args.questions}:{line}: ") for line, rec in read_jsonl(args.questions)][:args.queries]
    else:
        qs = queries()[:args.queries]
    sp0 = SamplingParams(n=K, temperature=0.7, top_p=0.95, max_tokens=args.tokens, seed=1)
    props = [[c.text for c in r.completions] for r in plain.generate([Request(proposer_messages(q), sp0) for q in qs])]
    sp1 = SamplingParams(n=1, temperature=0.0 if args.greedy else 0.7, top_p=1.0, max_tokens=args.tokens, seed=2)
    reqs = [Request(aggregator_messages(q, p), sp1) for q, p in zip(qs, props)]
    print(f"{args.model} {plain.lm.dtype}, {len(qs)} queries, {args.tokens} tokens, load {os.getloadavg()[0]:.1f}")
    sides = {"plain": plain}
    sides.update({f"spec{k}": HFEngine(plain.lm, plain.tok, display_name=f"spec{k}", spec_tokens=k)
                  for k in args.spec_tokens})
    runs: dict[str, list] = {name: [] for name in sides}
    for rep in range(args.repeats):
        for name in list(sides)[rep % len(sides):] + list(sides)[:rep % len(sides)]:
            t = time.perf_counter()
            res = sides[name].generate(reqs)
            dt = time.perf_counter() - t
            tokens = sum(c.tokens for r in res for c in r.completions)
            s = [r.speculation for r in res if r.speculation]
            fw, dr, ac = (sum(getattr(x, k) for x in s) for k in ("forwards", "drafted", "accepted"))
            runs[name].append((tokens / dt, tokens / fw if fw else 1.0, ac / dr if dr else 0.0))
            print(f"  repeat {rep + 1} {name:7s} {tokens:5d} tokens {dt:6.1f} s {tokens / dt:6.1f} tok/s"
                  + (f"  {tokens / fw:.2f} tokens/forward, acceptance {ac / max(1, dr):.2f}" if fw else ""), flush=True)
    base = statistics.median(r[0] for r in runs["plain"])
    for name, rs in runs.items():
        med = statistics.median(r[0] for r in rs)
        print(f"{name:7s} {med:6.1f} tok/s ({med / base:.2f}x plain), {statistics.median(r[1] for r in rs):.2f} "
              f"tokens/forward, acceptance {statistics.median(r[2] for r in rs):.2f}")


if __name__ == "__main__":
    main()
