"""`aft train`: AFT / SFT / mix training with TRL + PEFT (see aft.train)."""

from __future__ import annotations

from .. import config as cfglib
from . import flags_given


def add_parser(sub) -> None:
    from ..train import TrainConfig

    p = sub.add_parser(
        "train", help="fine-tune on `aft data` output (LoRA or full; aft, sft or mix)",
        description="Fine-tune a model with TRL's SFTTrainer on the rows `aft data build` writes; loss on the "
                    "target only. The YAML's keys are the flags below plus any TRL SFTConfig field; flags override "
                    "it. Multi-GPU: accelerate launch --config_file configs/accelerate/zero3.yaml -m aft train "
                    "--config configs/train_full_gpu.yaml")
    p.add_argument("--config", "-c", help="YAML config (our keys + TRL SFTConfig fields)")
    cfglib.add_arguments(p, TrainConfig)
    p.set_defaults(handler=main)


def main(args) -> int:
    from ..train import load_config, run_train

    cfg = load_config(args.config, flags_given(args))
    res = run_train(cfg)
    if not res.main_process:  # one of several training processes: the first one reports
        return 0
    m = res.metrics
    if res.finished_before:
        print(f"{res.output_dir}: this run already finished (its model and measurements are kept; --no-resume "
              f"trains again). It measured:")
    print(f"{m['method']} {m['mode']} training: {m['steps']} steps on {m['train_rows']} rows in {m['wall_s']:.0f}s "
          f"({m['tokens_per_s'] or 0:.0f} tokens/s), {loss_summary(m)}, peak RSS {m['peak_rss_mb']:.0f} MiB")
    print(f"model: {res.output_dir}  (aft infer --model {res.output_dir})")
    if res.merged_dir:
        print(f"merged model: {res.merged_dir}")
    print(f"metrics: {res.output_dir / 'metrics.json'}  loss curve: {res.output_dir / 'loss.png'}  "
          f"config: {res.output_dir / 'config.yaml'}")
    return 0


def loss_summary(m: dict) -> str:
    """'loss 2.31 (step 1) -> 1.02 (step 8)'; one logged value is shown as one, not as a first and a last."""
    losses = m.get("losses") or []
    if not losses:
        return "no loss logged (raise max_steps or lower logging_steps)"
    if len(losses) == 1:
        return f"loss {losses[0][1]:.3f} at step {losses[0][0]} (logged once: lower --logging_steps for a curve)"
    (s0, l0), (s1, l1) = losses[0], losses[-1]
    return f"loss {l0:.3f} (step {s0}) -> {l1:.3f} (step {s1})"
