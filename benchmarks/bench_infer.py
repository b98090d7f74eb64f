"""Throughput of the transformers engine against plain `model.generate`, side by side.

    python benchmarks/bench_infer.py [--dtype bf16] [--tokens 128] [--repeats 3] [--queries 8] [--generate-batch]
                                     [--out runs/bench_infer.json]

One process, the same weights, dtype and thread count for every side (the `generate` sides
run on a plain copy of the model, as transformers loads it):

  baseline      `model.generate(do_sample=True, temperature=0.7, top_p=0.95, top_k=0,
                num_return_sequences=4)` over the --queries chat prompts (8; left padding, one batch);
  ours-layer0   our engine (HFEngine) on exactly that workload: one request per query with n=4;
  ours-pa       the propose-and-aggregate workload K=4, L=1: layer 0 as above, then one
                aggregator requests (n=1, temperature 0.7, top_p 1.0) whose messages are
                `aft.prompts.aggregator_messages(query, the 4 proposals)`;
  baseline-pa   the same P&A workload done with `generate` (--no-baseline-pa skips it);
  ours-pa-spec  ours-pa with speculative decoding (prompt lookup, --spec_tokens drafts a step) in the
                aggregation layer; ours-pa-spec-all: in both layers (--spec_tokens 0 skips both);
  generate-batch  (with --generate-batch) the baseline's workload through transformers'
                continuous batching, `generate_batch`, on its own plain copy of the model.

--sides picks the sides to run (default: all). The P&A sides also report each layer's tok/s
(layer 0's and the aggregation layer's) and, with speculation, tokens per forward pass and the
acceptance rate of the draft tokens.

Generated tokens are counted up to and excluding EOS/pad (baseline) or from
Completion.tokens (ours); tok/s = generated tokens / wall time of the whole call
(prefill, aggregator prefill and tokenization included). The sides run interleaved, in a
rotated order in every repeat, and the medians are reported, so that other processes on
the machine do not bias one side. The matmul peak (bf16 and fp32) is measured in the same
run, and each tok/s is also given as a fraction of the compute bound peak / (2 x params).

The matmul floor: the forward calls of one ours-pa run (rows x tokens of each) are recorded,
then only the model's linear layers are replayed at those sizes (same weights, same kernels,
nothing else). That time bounds any loop that runs the same forward passes one token a step:
its tok/s can be at most generated tokens / floor seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

QUESTIONS = [
    "What is the capital of France, and why is it famous?",
    "Explain in simple terms what photosynthesis is.",
    "Give three tips for writing clear emails.",
    "Why is the sky blue?",
    "What is the difference between a list and a tuple in Python?",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "How do vaccines help the immune system?",
    "Suggest a healthy breakfast and explain why it is healthy.",
]
K = 4  # proposals per query


def queries(n: int = len(QUESTIONS)) -> list[list[dict]]:
    """n chat queries: the questions in turn (n > 8 repeats them; each request still samples on its own)."""
    return [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(n)]


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """Best observed FLOP/s of an n^3 matmul loop (best of short bursts: the machine is shared)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def count_generated(seqs: torch.Tensor, stop_ids: set[int]) -> tuple[int, list[list[int]]]:
    total, kept = 0, []
    for row in seqs.tolist():
        cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
        total += cut
        kept.append(row[:cut])
    return total, kept


class MatmulFloor:
    """Record the (decoder tokens, logit rows) of every forward call; replay only the linear layers."""

    def __init__(self, lm):
        self.lm, self.calls = lm, []
        self.linears = [m for m in lm.model.modules() if isinstance(m, torch.nn.Linear)]

    def record(self, fn):
        def hook(module, args, kwargs, output):
            ids = kwargs["input_ids"]
            self.calls.append((ids.numel(), output.logits.shape[0] * output.logits.shape[1]))

        handle = self.lm.register_forward_hook(hook, with_kwargs=True)
        try:
            return fn()
        finally:
            handle.remove()

    @torch.inference_mode()
    def replay(self) -> float:
        """Seconds that the recorded calls' matmuls alone take."""
        dtype = self.lm.dtype
        inputs: dict[tuple[int, int], torch.Tensor] = {}

        def x(rows: int, features: int) -> torch.Tensor:
            if (rows, features) not in inputs:
                inputs[rows, features] = torch.randn(rows, features, dtype=dtype)
            return inputs[rows, features]

        head = self.lm.lm_head
        t = time.perf_counter()
        for tokens, logit_rows in self.calls:
            for lin in self.linears:
                torch.nn.functional.linear(x(tokens, lin.in_features), lin.weight)
            torch.nn.functional.linear(x(logit_rows, head.in_features), head.weight)
        return time.perf_counter() - t


class Baseline:
    """Plain `generate`: one left-padded batch, num_return_sequences samples per prompt.

    On its own copy of the model, loaded as transformers loads it (HFEngine switches its model's
    CPU decode attention to `aft_sdpa`).
    """

    def __init__(self, engine, path: str):
        from transformers import AutoModelForCausalLM

        self.engine, self.tok = engine, engine.tok
        self.lm = AutoModelForCausalLM.from_pretrained(path, dtype=engine.lm.dtype).eval()
        self.stop_ids = set(engine.eos_ids) | {engine.pad_id}

    @torch.inference_mode()
    def run(self, message_lists: list[list[dict]], n: int, top_p: float, tokens: int, seed: int):
        torch.manual_seed(seed)
        self.tok.padding_side = "left"
        enc = self.tok([self.engine.render(m) for m in message_lists], return_tensors="pt", padding=True,
                       add_special_tokens=False)
        out = self.lm.generate(**enc, do_sample=True, temperature=0.7, top_p=top_p, top_k=0,
                               num_return_sequences=n, max_new_tokens=tokens, pad_token_id=self.engine.pad_id)
        total, kept = count_generated(out[:, enc["input_ids"].shape[1]:], self.stop_ids)
        texts = [self.tok.decode(k, skip_special_tokens=True) for k in kept]
        return total, [texts[i * n:(i + 1) * n] for i in range(len(message_lists))]


def continuous_batching(path: str, engine, message_lists, tokens: int):
    """The baseline's workload through `generate_batch`, on a plain copy of the model; returns a side."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    lm = AutoModelForCausalLM.from_pretrained(path, dtype=engine.lm.dtype).eval()
    inputs = [engine.encode(m) for m in message_lists]
    config = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.95, top_k=0, num_return_sequences=K,
                              max_new_tokens=tokens, eos_token_id=engine.eos_ids, pad_token_id=engine.pad_id)

    def run(seed: int) -> int:
        torch.manual_seed(seed)
        out = lm.generate_batch(inputs=inputs, generation_config=config)  # runs its own thread; no inference_mode
        if len(out) != len(inputs) * K:
            raise RuntimeError(f"generate_batch returned {len(out)} of {len(inputs) * K} sequences")
        return sum(len([t for t in o.generated_tokens if t not in engine.eos_ids]) for o in out.values())

    return run


def summarize(args, path, engine, params, peaks, runs) -> dict:
    """Medians, ratios and fractions of the compute bound, as written to --out."""
    peak = peaks["bf16" if engine.lm.dtype == torch.bfloat16 else "fp32"]
    bound = peak / (2 * params)
    summary = {}
    for name, rs in runs.items():
        if rs:
            med = statistics.median(r["tok_s"] for r in rs)
            summary[name] = {"median_tok_s": med, "fraction_of_compute_bound": med / bound,
                             "median_tokens": statistics.median(r["tokens"] for r in rs), "runs": len(rs)}
            for key in sorted(set(rs[0]) - {"tokens", "seconds", "tok_s", "load_average"}):  # per-layer figures
                summary[name][f"median_{key}"] = statistics.median(r[key] for r in rs)
    ratios = {}
    if "baseline" in summary:
        b = summary["baseline"]["median_tok_s"]
        ratios = {f"{name} / baseline": s["median_tok_s"] / b for name, s in summary.items() if name != "baseline"}
    if "baseline-pa" in summary and "ours-pa" in summary:
        ratios["ours-pa / baseline-pa"] = summary["ours-pa"]["median_tok_s"] / summary["baseline-pa"]["median_tok_s"]
    return {
        "model": path, "params": params, "dtype": str(engine.lm.dtype), "threads": torch.get_num_threads(),
        "max_new_tokens": args.tokens, "repeats": args.repeats, "prompts": args.queries, "samples_per_prompt": K,
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "machine": platform.processor() or platform.machine(), "load_average_end": os.getloadavg(),
        "matmul_peak_flops": peaks, "compute_bound_tok_s": bound, "runs": runs, "summary": summary, "ratios": ratios,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="transformers folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "bfloat16", "float32"])
    ap.add_argument("--tokens", type=int, default=128, help="max new tokens per sample (both layers)")
    ap.add_argument("--queries", type=int, default=len(QUESTIONS), help="queries (default 8: the questions once; "
                                                                        "more repeat them)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-baseline-pa", action="store_true", help="skip the P&A workload done with generate")
    ap.add_argument("--generate-batch", action="store_true",
                    help="also time transformers' continuous batching (generate_batch) on the baseline workload")
    ap.add_argument("--spec_tokens", type=int, default=8, help="draft tokens a step for the -spec sides (0: no such sides)")
    ap.add_argument("--no-floor", action="store_true", help="skip the matmul floor (one more P&A run a repeat)")
    ap.add_argument("--sides", default=None, help="comma-separated sides to run (default: all)")
    ap.add_argument("--out", default="runs/bench_infer.json")
    args = ap.parse_args(argv)

    from aft.engines.base import Request, SamplingParams
    from aft.engines.hf import HFEngine
    from aft.prompts import aggregator_messages, proposer_messages

    path = args.model
    if path is None:
        from aft.models import embedded_model_dir

        path = str(embedded_model_dir())
    dtype = {"bf16": "bfloat16", "fp32": "float32"}.get(args.dtype, args.dtype)
    engine = HFEngine.load(path, dtype=dtype, device="cpu")
    params = engine.num_parameters()
    qs = queries(args.queries)
    prop_msgs = [proposer_messages(q) for q in qs]  # system "\n" + the user question
    base = Baseline(engine, path)

    spec = HFEngine(engine.lm, engine.tok, display_name=path, spec_tokens=args.spec_tokens)

    def ours_layer0(seed: int, eng=engine):
        sp = SamplingParams(n=K, temperature=0.7, top_p=0.95, max_tokens=args.tokens, seed=seed)
        res = eng.generate([Request(m, sp) for m in prop_msgs])
        return sum(c.tokens for r in res for c in r.completions), [[c.text for c in r.completions] for r in res], res

    def ours_pa(seed: int, eng0=engine, eng1=engine):
        t = time.perf_counter()
        n0, props, res0 = ours_layer0(seed, eng0)
        t0 = time.perf_counter() - t
        sp = SamplingParams(n=1, temperature=0.7, top_p=1.0, max_tokens=args.tokens, seed=seed + 1)
        t = time.perf_counter()
        res = eng1.generate([Request(aggregator_messages(q, p), sp) for q, p in zip(qs, props)])
        t1 = time.perf_counter() - t
        n1 = sum(c.tokens for r in res for c in r.completions)
        return n0 + n1, {"layer0_tok_s": n0 / t0, "aggregation_tok_s": n1 / t1, **spec_stats("layer0", res0, n0),
                         **spec_stats("aggregation", res, n1)}

    def spec_stats(layer: str, results, tokens: int) -> dict:
        specs = [r.speculation for r in results if r.speculation]
        if not specs:
            return {}
        forwards, drafted = sum(s.forwards for s in specs), sum(s.drafted for s in specs)
        return {f"{layer}_tokens_per_forward": tokens / forwards,
                f"{layer}_acceptance": sum(s.accepted for s in specs) / max(1, drafted)}

    def baseline_layer0(seed: int):
        return base.run(prop_msgs, K, 0.95, args.tokens, seed)

    def baseline_pa(seed: int):
        n0, props = baseline_layer0(seed)
        n1, _ = base.run([aggregator_messages(q, p) for q, p in zip(qs, props)], 1, 1.0, args.tokens, seed + 1)
        return n0 + n1

    sides = {
        "baseline": lambda s: baseline_layer0(s)[0],
        "ours-layer0": lambda s: ours_layer0(s)[0],
        "ours-pa": ours_pa,
    }
    if args.spec_tokens:
        sides["ours-pa-spec"] = lambda s: ours_pa(s, engine, spec)
        sides["ours-pa-spec-all"] = lambda s: ours_pa(s, spec, spec)
    if not args.no_baseline_pa:
        sides["baseline-pa"] = baseline_pa
    if args.generate_batch:
        sides["generate-batch"] = continuous_batching(path, engine, prop_msgs, args.tokens)
    if args.sides:
        unknown = set(args.sides.split(",")) - set(sides)
        if unknown:
            ap.error(f"--sides: unknown {sorted(unknown)}; choose from {list(sides)}")
        sides = {k: v for k, v in sides.items() if k in args.sides.split(",")}

    print(f"model {path} ({params / 1e6:.1f}M params), {engine.lm.dtype}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    # warm-up (allocator, kernels) outside the timings
    engine.generate([Request(prop_msgs[0], SamplingParams(n=2, max_tokens=8, seed=0))])
    base.run(prop_msgs[:1], 2, 0.95, 8, 0)

    peaks = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    floor = MatmulFloor(engine.lm)
    floor_tokens = None if args.no_floor else floor.record(lambda: ours_pa(1000)[0])
    floor_runs = []
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    names = list(sides)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for rep in range(args.repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            t = time.perf_counter()
            n = sides[name](1000 + rep)
            dt = time.perf_counter() - t
            n, extra = n if isinstance(n, tuple) else (n, {})
            runs[name].append({"tokens": n, "seconds": dt, "tok_s": n / dt, "load_average": os.getloadavg()[0],
                               **extra})
            print(f"  repeat {rep + 1}/{args.repeats} {name:16s} {n:5d} tokens {dt:7.1f} s {n / dt:7.1f} tok/s"
                  + "".join(f"  {k} {v:.2f}" for k, v in extra.items()), flush=True)
            # after every run, so that an interrupted benchmark still leaves its data
            out.write_text(json.dumps(summarize(args, path, engine, params, peaks, runs), indent=2))
        if floor_tokens:
            floor_runs.append(floor.replay())
    # a second look at the peak, after the runs (take the better: the machine is shared)
    peaks = {k: max(v, matmul_peak({"bf16": torch.bfloat16, "fp32": torch.float32}[k])) for k, v in peaks.items()}
    report = summarize(args, path, engine, params, peaks, runs)
    if floor_tokens:
        floor_s = statistics.median(floor_runs)
        report["matmul_floor"] = {"workload": "ours-pa, seed 1000", "forward_calls": len(floor.calls),
                                  "generated_tokens": floor_tokens, "seconds": floor_runs,
                                  "max_tok_s": floor_tokens / floor_s}
        if "baseline" in report["summary"]:
            report["ratios"]["matmul floor / baseline"] = (floor_tokens / floor_s
                                                          / report["summary"]["baseline"]["median_tok_s"])
    out.write_text(json.dumps(report, indent=2))

    print(f"\nmatmul peak: bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s, fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s; "
          f"compute bound ({engine.lm.dtype}) {report['compute_bound_tok_s']:.0f} tok/s")
    print(f"{'side':14s} {'tok/s (median)':>15s} {'tokens':>8s} {'of bound':>9s}")
    for name, s in report["summary"].items():
        print(f"{name:14s} {s['median_tok_s']:15.1f} {s['median_tokens']:8.0f} {s['fraction_of_compute_bound']:9.1%}")
    for name, sm in report["summary"].items():
        extra = {k.removeprefix("median_"): v for k, v in sm.items() if k.startswith("median_") and k not in
                 ("median_tok_s", "median_tokens")}
        if extra:
            print(f"{name:16s} " + "  ".join(f"{k} {v:.2f}" for k, v in extra.items()))
    if floor_tokens:
        print(f"matmul floor of ours-pa ({len(floor.calls)} forward calls, {floor_tokens} tokens): its linear "
              f"layers alone take {floor_s:.1f} s, so at most {floor_tokens / floor_s:.0f} tok/s")
    for k, v in report["ratios"].items():
        print(f"{k:28s} {v:.2f}x")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
