#!/usr/bin/env bash
# THE PREVIOUS DESIGN, kept runnable as an ablation (see docs/results.md, "The previous experiment
# could not show the effect"): the target is the best of the model's own proposals, so the
# aggregator can only learn to select, and its ceiling is oracle best-of-K. The fair design is
# examples/repro/run.sh.
#
#     bash examples/repro/best_target/run.sh            # OUT=runs/repro by default
#
# Every step is resumable: rerun the script after an interruption and finished work is kept
# (data rows, training checkpoints, cached generations). Measured on 2 quiet cores (bf16,
# SmolLM2-135M): data 1.6 min, SFT 1.7 min, AFT 9 min, evaluation of 3 models 8.5 min,
# width x depth sweep (K up to 8, L up to 3) 5 min, report < 1 min: 26 min in all.
# Much longer on a busy machine.
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=${OUT:-runs/repro}
STEPS=${STEPS:-32}          # optimizer steps (x 4 rows = 1 epoch of 130 rows), the same for SFT and AFT
LR=${LR:-3e-4}
SWEEP=${SWEEP:-1}           # 0 skips the width x depth sweep
AFT="python -m aft"
log() { echo "[$(date +%H:%M:%S)] $*"; }
start=$(date +%s)

log "1/6 on-policy data (130 train prompts, M=8 samples, top K=4 by the verifier, best as target)"
$AFT data build --config examples/repro/best_target/data.yaml --out "$OUT/data"

for method in sft aft; do
  n=$([ $method = sft ] && echo 2 || echo 3)
  if [ -f "$OUT/$method/metrics.json" ]; then
    log "$n/6 $method: already trained ($OUT/$method)"; continue
  fi
  log "$n/6 train $method: LoRA r16, $STEPS steps of 4 rows, lr $LR (same rows, targets and steps for both)"
  $AFT train --data "$OUT/data" --mode $method --output_dir "$OUT/$method" --max_steps "$STEPS" \
    --per_device_train_batch_size 4 --gradient_accumulation_steps 1 --learning_rate "$LR" --seed 42
done

log "4/6 evaluate base, SFT and AFT on the 100 held-out questions, 2 seeds"
for label in base sft aft; do
  model=$([ $label = base ] && echo smollm2-135m || echo "$OUT/$label")
  $AFT eval run --config configs/eval_repro.yaml --out "$OUT/eval" --model "$model" --label $label --no-report
done

if [ "$SWEEP" = 1 ]; then
  log "5/6 width x depth sweep of the AFT model (K in 1,2,4,8; L in 0..3; 50 questions, 1 seed)"
  $AFT eval run --config configs/eval_sweep.yaml --out "$OUT/eval" --model "$OUT/aft" --label aft-sweep --no-report
fi

log "6/6 report"
$AFT eval report "$OUT/eval" --title "AFT at small scale: SmolLM2-135M on reasoning-gym basic_arithmetic (1 digit, + -)"
end=$(date +%s)
{
  echo "# Reproduction: AFT at small scale on this machine"
  echo
  echo "Command: \`bash examples/repro/best_target/run.sh\` (OUT=$OUT STEPS=$STEPS LR=$LR SWEEP=$SWEEP)."
  echo "Machine: $(nproc) CPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), no GPU,"
  echo "$(free -g | awk '/Mem:/{print $2}') GiB memory; python $(python -c 'import platform; print(platform.python_version())'),"
  echo "torch $(python -c 'import torch; print(torch.__version__)'), transformers $(python -c 'import transformers; print(transformers.__version__)')."
  echo "Wall time of the whole run: $(( (end - start) / 60 )) min (steps already done before this invocation not counted)."
  echo
  echo "Data card: $OUT/data/data_card.md. Training metrics: $OUT/sft/metrics.json, $OUT/aft/metrics.json."
  echo
  sed -n '2,$p' "$OUT/eval/report.md" | sed "s#](\(acc_vs\|width_depth\)#]($OUT/eval/\1#g"
} > "$OUT/results.md"
log "done in $(( (end - start) / 60 )) min: $OUT/results.md (copy it to docs/results.md with the plots)"
