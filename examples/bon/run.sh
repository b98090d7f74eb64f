#!/usr/bin/env bash
# Best-of-N-aware fine-tuning (Chow et al., arXiv 2412.15287) against SFT at small scale, one command:
#
#     bash examples/bon/run.sh                 # the experiment, OUT=runs/bon
#     SMOKE=1 bash examples/bon/run.sh         # the same pipeline on a few questions (OUT=runs/bon-smoke)
#
# Design (docs/train.md, "Best-of-N-aware training"): the embedded model, reasoning-gym basic_arithmetic
# 2 terms 1-2 digits "+" (the task of examples/repro), N_TRAIN training questions, N_EVAL held-out ones.
# ONE sampling pass: M candidates per training question, each scored by the verifier
# (<OUT>/data/candidates.jsonl). Arms, each trained on those same candidates with the same optimizer
# steps, rows per step and learning rate, with every seed in SEEDS:
#   rft       SFT on every correct candidate (rejection-sampling fine-tuning), weight 1
#   bon-sft   the BoN-aware imitation objective for N = BON_N: correct candidates weighted e_N(p)
#   bon-rl    the BoN-aware policy gradient for N = BON_N: correct and wrong candidates, leave-one-out
#   base      the untrained model
# Beyond the paper (step 4): P&A K=4 L=1 on N_PA held-out questions with one fixed aggregator, the base
# model, over the proposals of each model (`--proposers`): do BoN-aware proposals (N = K = 4) make a
# better set to aggregate than SFT's? Report: <OUT>/eval_pa/report.md.
# Evaluation: NMAX samples per held-out question for every model; `aft eval curves` gives pass@k,
# BoN@k (verifier ORACLE, = pass@k), majority@k for k = 1..NMAX and the distinct answers per question,
# with intervals over questions and the training seeds (labels <arm>-s<seed> pooled per arm:
# <OUT>/eval/curves-pooled.md and curves-pooled-add12.png).
# Time (docs/train.md, "Measured: the full run"): 54 min on 2 CPU cores (79 min user CPU), of which
# sampling 1.4, training 20, curve samples 9, P&A 23 min; SMOKE=1 about 4 min. NMAX=32 (curves to
# k=32) doubles the curve samples.
# Every step is resumable: rerun after an interruption and finished work is kept.
set -euo pipefail
cd "$(dirname "$0")/../.."
SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
  OUT=${OUT:-runs/bon-smoke}; N_TRAIN=${N_TRAIN:-6}; M=${M:-4}; N_EVAL=${N_EVAL:-4}; NMAX=${NMAX:-8}
  STEPS=${STEPS:-2}; SEEDS=${SEEDS:-"1"}; BON_N=${BON_N:-2}; N_PA=${N_PA:-4}
else
  OUT=${OUT:-runs/bon}; N_TRAIN=${N_TRAIN:-64}; M=${M:-8}; N_EVAL=${N_EVAL:-24}; NMAX=${NMAX:-16}
  STEPS=${STEPS:-16}; SEEDS=${SEEDS:-"1 2 3"}; BON_N=${BON_N:-4}; N_PA=${N_PA:-100}
fi
LR=${LR:-1e-4}
BATCH=${BATCH:-8}          # rows (candidates) per optimizer step; STEPS x BATCH rows for every arm
ROUNDS=${ROUNDS:-1}        # >1: on-policy rounds (each samples the training questions again)
ARMS=${ARMS:-"rft bon-sft bon-rl"}
AFT="python -m aft"
SPLIT="--eval_size 200 --pool_size 1000 --split_seed 0"
log() { echo "[$(date +%H:%M:%S)] $*"; }
start=$(date +%s)
mkdir -p "$OUT"
# after each step: its name, wall seconds since the start, and user/system CPU seconds of all steps so far
# (`times` runs in this shell: a $(...) subshell would report its own children only)
stamp() { local c; times > "$OUT/.times"; c=$(tail -1 "$OUT/.times" | tr ' ' '/')
  echo "$1 wall_s=$(( $(date +%s) - start )) cpu_user/sys=$c" >> "$OUT/timing.txt"; }

log "1/5 sampling: $N_TRAIN training questions x $M candidates, verifier scores"
$AFT data build --config examples/bon/data.yaml --out "$OUT/data" --n_prompts "$N_TRAIN" --m "$M" \
  --k "$(( M < 4 ? M : 4 ))" $SPLIT
stamp data

log "2/5 train arms ($ARMS) x seeds ($SEEDS): $STEPS steps of $BATCH rows, lr $LR, N=$BON_N, rounds $ROUNDS"
for seed in $SEEDS; do
  for arm in $ARMS; do
    dir="$OUT/$arm-s$seed"
    log "  train $arm-s$seed"
    $AFT train --data "$OUT/data" --mode "$arm" --bon_n "$BON_N" --rounds "$ROUNDS" --output_dir "$dir" \
      --max_steps "$STEPS" --per_device_train_batch_size "$BATCH" --learning_rate "$LR" --seed "$seed" \
      --logging_steps 1
    stamp "train-$arm-s$seed"
  done
done

log "3/5 $NMAX samples per held-out question ($N_EVAL) for every model"
labels="base"
for seed in $SEEDS; do for arm in $ARMS; do labels="$labels $arm-s$seed"; done; done
for label in $labels; do
  model=$([ "$label" = base ] && echo smollm2-135m || echo "$OUT/$label")
  $AFT eval run --config examples/bon/eval.yaml --out "$OUT/eval" --model "$model" --label "$label" \
    --strategies "best_of_n:n=$NMAX,scorer=verifier" --limit "$N_EVAL" $SPLIT
  stamp "eval-$label"
done

log "4/5 P&A K=4 L=1 on $N_PA held-out questions: each model's proposals, one fixed aggregator (the base model)"
for label in $labels; do
  $AFT eval run --config examples/bon/eval.yaml --out "$OUT/eval_pa" --model smollm2-135m \
    --proposers "$([ "$label" = base ] && echo smollm2-135m || echo "$OUT/$label")" --label "$label" \
    --strategies "pa:k=4,l=1" --limit "$N_PA" $SPLIT
  stamp "pa-$label"
done
$AFT eval report "$OUT/eval_pa" --reference rft --title "P&A K=4 L=1, base-model aggregator, proposals from each arm"

log "5/5 curves"
ks=""; k=1; while [ "$k" -le "$NMAX" ]; do ks="$ks $k"; k=$(( k * 2 )); done
$AFT eval curves "$OUT/eval" --ks $ks                 # per model
$AFT eval curves "$OUT/eval" --ks $ks --pool_seeds --reference rft   # per arm, training seeds pooled; paired with rft
stamp curves
log "done in $(( $(date +%s) - start )) s: $OUT/eval/curves-pooled.md, curves-pooled-add12.png, curves.md, $OUT/timing.txt"
