#!/usr/bin/env bash
# A fair test of AFT at small scale (2 CPU cores, no GPU, offline), one command:
#
#     bash examples/repro/run.sh                 # the full experiment, OUT=runs/fair
#     SMOKE=1 bash examples/repro/run.sh         # the same pipeline on a few questions (OUT=runs/fair-smoke)
#
# Design (docs/results.md): reasoning-gym basic_arithmetic, 2 terms, 1-2 digits, "+"; 400 training
# and 200 held-out questions, split by question text. Proposals: 4 unfiltered samples of the
# embedded model with the evaluation's sampling. Target: the programmatic teacher's correct
# worked solution, which reviews the proposals. Arms, all with the same optimizer steps, rows
# per step, learning rate and teacher solutions, each trained with every seed in SEEDS:
#   sft      query -> the teacher's solution (sft.jsonl)
#   aft      query + 4 proposals -> the teacher's review + solution (aft.jsonl)
#   mix      AFT + SFT: aft.jsonl plus every sft.jsonl row, shuffled (--mode mix --mix_sft_fraction 1)
#   pseudo   pseudo-aggregation: query + 4 proposals -> the solution without the review (aft_pseudo.jsonl)
#   base     the untrained model
# Strategies: greedy, one sample, P&A K=4 L=1, majority of 5 and best-of-5 (verifier ORACLE) at
# P&A's 5 generations, best-of-4 (ORACLE: the ceiling of selection). The report groups the
# labels <arm>-s<seed> across training seeds and pairs every arm with SFT greedy.
# Before any training, step 2 computes what the design can show on the held-out questions
# (teacher target correct, oracle best-of-4 of the base model's proposals).
#
# Time, measured (docs/results.md, run 3): 1 h 48 min on two quiet cores with the defaults
# (training 28 min in bf16 autocast, evaluation 61 min, of which the AFT models' 24 min: their
# aggregations run to max_tokens). Never run two of these steps at once with the default threads:
# two processes each using both cores wait on each other, several times slower.
# Every step is resumable: rerun after an interruption and finished work is kept.
# The previous design (best proposal as target) stays runnable: examples/repro/best_target/run.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
  OUT=${OUT:-runs/fair-smoke}; N_TRAIN=${N_TRAIN:-16}; N_EVAL=${N_EVAL:-12}; STEPS=${STEPS:-2}
  SEEDS=${SEEDS:-"1 2"}; SWEEP=${SWEEP:-0}; PERPLEXITY=${PERPLEXITY:-1}
else
  OUT=${OUT:-runs/fair}; N_TRAIN=${N_TRAIN:-400}; N_EVAL=${N_EVAL:-200}; STEPS=${STEPS:-25}
  SEEDS=${SEEDS:-"1 2 3"}; SWEEP=${SWEEP:-1}; PERPLEXITY=${PERPLEXITY:-1}
fi
LR=${LR:-3e-4}
# LoRA dropout: the arms see each of their 100 rows once, so there is nothing for it to regularize, and on CPU its
# Bernoulli masks cost a quarter of a training step (benchmarks/bench_train.py --lora_dropout 0.05 0). Run 2 used 0.05.
LORA_DROPOUT=${LORA_DROPOUT:-0}
TEACHER_REVIEW=${TEACHER_REVIEW:-last}  # the program teacher's review line: last (solve, review, answer) or first
# bf16 autocast for training where this CPU's bf16 matmuls beat float32 (the engine's dtype probe, cached;
# TRAIN_BF16=1 or 0 forces it)
TRAIN_BF16=${TRAIN_BF16:-auto}
if [ "$TRAIN_BF16" = auto ]; then
  TRAIN_BF16=$(python - <<'PY'
import torch
from transformers import AutoConfig
from aft.dtype_probe import cpu_dtype
from aft.models import embedded_model_dir
print(int(not torch.cuda.is_available() and cpu_dtype(AutoConfig.from_pretrained(embedded_model_dir())) == torch.bfloat16))
PY
)
fi
BF16=$([ "$TRAIN_BF16" = 1 ] && echo --bf16 || echo --no-bf16)
SWEEP_ARM=${SWEEP_ARM:-best}  # the arm whose first seed gets the width x depth sweep (best: highest P&A K=4 L=1)
BATCH=4                     # rows per optimizer step; STEPS x BATCH rows seen by every arm
ARMS=${ARMS:-"sft aft mix pseudo"}
AFT="python -m aft"
SPLIT="--eval_size $N_EVAL --pool_size 1000 --split_seed 0"
log() { echo "[$(date +%H:%M:%S)] $*"; }
start=$(date +%s)
mkdir -p "$OUT"
# after each step: its name, wall seconds since the start, and user/system CPU of all steps so far
# (`times` runs in this shell, not in a $(...) subshell, which would report its own children only)
stamp() { local c; times > "$OUT/.times"; c=$(tail -1 "$OUT/.times" | tr ' ' '/')
  echo "$1 wall_s=$(( $(date +%s) - start )) cpu_user/sys=$c" >> "$OUT/timing.txt"; }

log "1/6 training data: $N_TRAIN questions, 4 unfiltered proposals each, program teacher targets"
$AFT data build --config examples/repro/data.yaml --out "$OUT/data" --n_prompts "$N_TRAIN" $SPLIT \
  --teacher_review "$TEACHER_REVIEW"
stamp data

log "2/6 ceiling, before training: the same build on the $N_EVAL held-out questions"
$AFT data build --config examples/repro/data.yaml --out "$OUT/ceiling" --split eval --n_prompts "$N_EVAL" $SPLIT \
  --teacher_review "$TEACHER_REVIEW" --no-pseudo_aggregation
python examples/repro/ceiling.py "$OUT/ceiling" | tee "$OUT/ceiling.json"
stamp ceiling

log "3/6 train arms ($ARMS) x seeds ($SEEDS): $STEPS steps of $BATCH rows, lr $LR, LoRA dropout $LORA_DROPOUT, $BF16"
for seed in $SEEDS; do
  for arm in $ARMS; do
    dir="$OUT/$arm-s$seed"
    if [ -f "$dir/metrics.json" ]; then log "  $arm-s$seed: already trained"; continue; fi
    case $arm in
      sft) mode=(--mode sft) ;;
      aft) mode=(--mode aft) ;;
      mix) mode=(--mode mix --mix_sft_fraction 1.0) ;;
      pseudo) mode=(--mode aft --aft_file "$OUT/data/aft_pseudo.jsonl") ;;
      *) echo "unknown arm $arm" >&2; exit 2 ;;
    esac
    log "  train $arm-s$seed"
    $AFT train --data "$OUT/data" "${mode[@]}" --output_dir "$dir" --max_steps "$STEPS" \
      --per_device_train_batch_size $BATCH --gradient_accumulation_steps 1 --learning_rate "$LR" --seed "$seed" $BF16 \
      --lora_dropout "$LORA_DROPOUT"
    stamp "train-$arm-s$seed"
  done
done

log "4/6 evaluate every model on the $N_EVAL held-out questions"
labels="base"
for seed in $SEEDS; do for arm in $ARMS; do labels="$labels $arm-s$seed"; done; done
for label in $labels; do
  model=$([ "$label" = base ] && echo smollm2-135m || echo "$OUT/$label")
  $AFT eval run --config configs/eval_fair.yaml --out "$OUT/eval" --model "$model" --label "$label" \
    $SPLIT --no-report
  stamp "eval-$label"
done
if [ "$SWEEP" = 1 ]; then
  first=${SEEDS%% *}
  if [ "$SWEEP_ARM" = best ]; then  # the trained arm whose P&A K=4 L=1, over its training seeds, scored highest
    $AFT eval report "$OUT/eval" > /dev/null
    SWEEP_ARM=$(python - "$OUT/eval/summary.json" <<'PY'
import json, re, statistics, sys
by_arm = {}
for r in json.load(open(sys.argv[1])):
    m = re.fullmatch(r"(.+)-s\d+", r["label"])
    if m and r["strategy"] == "pa-k4-l1":
        by_arm.setdefault(m[1], []).append(r["accuracy"])
print(max(by_arm, key=lambda arm: statistics.mean(by_arm[arm])))
PY
)
  fi
  log "   width x depth sweep of $SWEEP_ARM-s$first (K 1,2,4,8 x L 0,1,2; 50 questions)"
  $AFT eval run --config configs/eval_fair.yaml --out "$OUT/eval" --model "$OUT/$SWEEP_ARM-s$first" \
    --label "$SWEEP_ARM-sweep" \
    $SPLIT --strategies sample --sweep --sweep_k 1 2 4 8 --sweep_l 0 1 2 --limit 50 --no-report
  stamp sweep
fi

if [ "$PERPLEXITY" = 1 ]; then
  first=${SEEDS%% *}
  log "5/6 perplexity of the held-out targets (they cannot be copied from the proposals)"
  $AFT analyze perplexity --data "$OUT/ceiling" --model smollm2-135m "$OUT/sft-s$first" "$OUT/aft-s$first" \
    --max_rows 100 --output_dir "$OUT/perplexity"
  stamp perplexity
fi

log "6/6 report"
$AFT eval report "$OUT/eval" --title "A fair test of AFT at small scale: SmolLM2-135M, basic_arithmetic 1-2 digits +"
end=$(date +%s)
times > "$OUT/.times"; cpu=$(tail -1 "$OUT/.times")   # user and system CPU time of every step
{
  echo "# A fair test of AFT at small scale: measured on this machine"
  echo
  echo "Command: \`SMOKE=$SMOKE bash examples/repro/run.sh\` (OUT=$OUT N_TRAIN=$N_TRAIN N_EVAL=$N_EVAL STEPS=$STEPS"
  echo "SEEDS=\"$SEEDS\" ARMS=\"$ARMS\" LR=$LR LORA_DROPOUT=$LORA_DROPOUT SWEEP=$SWEEP SWEEP_ARM=$SWEEP_ARM TEACHER_REVIEW=$TEACHER_REVIEW"
  echo "TRAIN_BF16=$TRAIN_BF16)."
  echo "Machine: $(nproc) CPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)),"
  echo "$(free -g | awk '/Mem:/{print $2}') GiB memory; python $(python -c 'import platform; print(platform.python_version())'),"
  echo "torch $(python -c 'import torch; print(torch.__version__)'), transformers $(python -c 'import transformers; print(transformers.__version__)')."
  echo "Wall time of this invocation: $(( (end - start) / 60 )) min (steps done before it not counted; per step: $OUT/timing.txt);"
  echo "CPU time of its steps: user $(echo "$cpu" | cut -d' ' -f1), system $(echo "$cpu" | cut -d' ' -f2)."
  echo
  echo "Ceiling, computed before training on the held-out questions:"
  echo '```'
  cat "$OUT/ceiling.json"
  echo '```'
  echo
  sed -n '2,$p' "$OUT/eval/report.md" | sed "s#](\(acc_vs\|width_depth\)#]($OUT/eval/\1#g"
  if [ -f "$OUT/perplexity/perplexity.json" ]; then echo; echo "Perplexity: $OUT/perplexity/"; fi
} > "$OUT/results.md"
log "done in $(( (end - start) / 60 )) min (CPU: $cpu): $OUT/results.md"
