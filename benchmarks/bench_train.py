"""Training throughput and peak memory: LoRA vs full fine-tuning on the embedded model (CPU or GPU).

    python benchmarks/bench_train.py --data runs/show/data/train --steps 6
    python benchmarks/bench_train.py --data tests/fixtures/train/data --steps 4 --bf16   # bf16 autocast
    python benchmarks/bench_train.py --data runs/fair/data --steps 4 --bf16 --only lora+bf16 --all_positions \
        --lora_dropout 0.05 0      # what gathering the labelled positions and LoRA dropout cost on CPU

Each configuration runs in a fresh subprocess (peak RSS is per process) through `aft train`; the first
step (warm-up) is excluded from tokens/s. Prints one line per configuration and writes
runs/bench/train.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time, resource
from aft.train import load_config, run_train
from transformers import TrainerCallback
cfg = load_config(None, json.loads(sys.argv[1]))
import aft.train as T
if sys.argv[2] == "all":  # TRL's own CPU behaviour: the LM head projects every position, not only labelled ones
    T.score_loss_positions_only = lambda: None
stamps = []
class Clock(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        stamps.append(time.time())
orig = T.build_trainer
def build(*a, **k):
    tr = orig(*a, **k)
    tr.add_callback(Clock())
    return tr
T.build_trainer = build
res = run_train(cfg)
m = res.metrics
per_step_tokens = m["train_tokens_this_run"] / max(1, m["steps_this_run"])
timed = stamps[-1] - stamps[0] if len(stamps) > 1 else m["wall_s"]
print(json.dumps({"steps": m["steps"], "tokens_per_s": per_step_tokens * (len(stamps) - 1) / timed,
                  "s_per_step": timed / max(1, len(stamps) - 1), "peak_rss_mb": m["peak_rss_mb"],
                  "peak_gpu_mb": m["peak_gpu_mb"], "trainable_params": m["trainable_params"],
                  "first_loss": m["first_loss"], "last_loss": m["last_loss"]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="tests/fixtures/train/data")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--bf16", action="store_true", help="also measure bf16 autocast")
    ap.add_argument("--only", nargs="+", help="these configurations only (lora, full, lora+bf16, full+bf16)")
    ap.add_argument("--all_positions", action="store_true",
                    help="also run each configuration with the LM head over every position (TRL's CPU default)")
    ap.add_argument("--lora_dropout", type=float, nargs="+", default=[0.05], help="one run per value (LoRA)")
    ap.add_argument("--out", default="runs/bench/train.json")
    a = ap.parse_args()
    runs = [("lora", True, False), ("full", False, False)]
    if a.bf16:
        runs += [("lora+bf16", True, True), ("full+bf16", False, True)]
    runs = [r for r in runs if not a.only or r[0] in a.only]
    sides = []
    for name, peft, bf16 in runs:
        for dropout in a.lora_dropout if peft else [0.05]:
            for positions in ("labelled", "all") if a.all_positions else ("labelled",):
                label = name + (f" dropout {dropout:g}" if len(a.lora_dropout) > 1 and peft else "")
                sides.append((label + (f", {positions} positions" if a.all_positions else ""), peft, bf16,
                              dropout, positions))
    results = {}
    for name, peft, bf16, dropout, positions in sides:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = dict(model=a.model, data=a.data, output_dir=tmp, use_peft=peft, bf16=bf16, max_steps=a.steps,
                       per_device_train_batch_size=a.batch, logging_steps=1, save_steps=10_000, resume=False,
                       learning_rate=2e-4 if peft else 2e-5, lora_dropout=dropout)
            p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), positions], capture_output=True,
                               text=True)
            if p.returncode:
                print(p.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"{name} failed")
            r = json.loads(p.stdout.strip().splitlines()[-1])
        results[name] = r
        print(f"{name:36s} {r['tokens_per_s']:8.0f} tok/s  {r['s_per_step']:6.2f} s/step  peak RSS "
              f"{r['peak_rss_mb']:6.0f} MiB  trainable {r['trainable_params'] / 1e6:6.2f} M  "
              f"loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "results": results}, indent=2))


if __name__ == "__main__":
    main()
