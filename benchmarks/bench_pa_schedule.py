"""P&A with per-query pipelines against layer by layer, side by side, on one continuous engine.

    python benchmarks/bench_pa_schedule.py [--model smollm2-135m] [-k 4] [-l 1] [--queries 8] [--tokens 64]
                                           [--repeats 2] [--out runs/bench_pa_schedule.json]

One process, one engine (the transformers engine with its scheduler, or any `--model`
whose engine is continuous), the same queries, config and seeds for both sides:

  pipelines   `propose_and_aggregate` as it runs on a continuous engine: each query its own
              thread, its aggregation sent as soon as its own proposals are done;
  layers      the same call with the engine marked not continuous: one engine call per layer
              for all queries (the barrier: every aggregation waits for the slowest proposal).

Reported per side (median over repeats; the sides alternate, in rotated order, so other load
on the machine does not bias one): wall seconds of the whole call, generated tokens/s over
it, and the mean and largest time from the start until a query's final answer is done
(`on_layer` of its final layer; layer by layer every query finishes with the last).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from aft.aggregate import PAConfig, propose_and_aggregate
from aft.engines.args import EngineArgs
from aft.infer import SAMPLE_QUESTIONS
from aft.io import read_queries
from aft.sampling import Sampling


def run_once(engine, queries, cfg, continuous: bool) -> dict:
    engine.continuous = continuous  # the instance's own value: the loop reads it to pick the schedule
    t0 = time.perf_counter()
    finished: list[float] = []
    tokens = 0

    def on_layer(layer, seconds, generated):
        nonlocal tokens
        tokens += generated
        if layer.role == "final":
            finished.append(time.perf_counter() - t0)

    out = propose_and_aggregate(engine, queries, cfg, on_layer)
    wall = time.perf_counter() - t0
    if len(finished) == 1:  # layer by layer: one callback for every query's final answer
        finished = finished * len(queries)
    return {"wall_s": wall, "tok_s": tokens / wall, "tokens": tokens, "errors": sum(r.error is not None for r in out),
            "mean_done_s": statistics.mean(finished), "max_done_s": max(finished)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("-l", type=int, default=1)
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="runs/bench_pa_schedule.json")
    args = ap.parse_args()
    engine, _ = EngineArgs(model=args.model).open()
    if not type(engine).continuous:
        raise SystemExit(f"{args.model}: its engine ({engine.name}) is not continuous; nothing to compare")
    items = read_queries(SAMPLE_QUESTIONS)
    queries = [(f"{i}", items[i % len(items)].query) for i in range(args.queries)]
    cfg = PAConfig(n=args.k, num_aggregation=args.l, sampling=Sampling(max_tokens=args.tokens), seed=1)
    runs: dict[str, list[dict]] = {"pipelines": [], "layers": []}
    run_once(engine, queries[:1], cfg, True)  # warm-up
    for r in range(args.repeats):
        for side in (["pipelines", "layers"] if r % 2 == 0 else ["layers", "pipelines"]):
            runs[side].append(run_once(engine, queries, cfg, side == "pipelines"))
            print(side, {k: round(v, 2) for k, v in runs[side][-1].items()}, flush=True)
    summary = {side: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for side, rs in runs.items()}
    result = {"args": vars(args), "runs": runs, "median": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for side, s in summary.items():
        print(f"{side:10s} wall {s['wall_s']:.1f} s  {s['tok_s']:.0f} tok/s  query done: mean {s['mean_done_s']:.1f} s, "
              f"last {s['max_done_s']:.1f} s")
    engine.close()


if __name__ == "__main__":
    main()
