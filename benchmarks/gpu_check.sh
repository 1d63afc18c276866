#!/usr/bin/env bash
# One ~10-minute run on one H100 (no network; torch + transformers + accelerate installed):
# weighted-SFT step (bf16, random Qwen2.5-0.5B-shaped model) tokens/s and MFU, and the transformers
# engine's generated tokens/s. Run from the repository root:  bash benchmarks/gpu_check.sh
# Figures go to stdout and to ${OUT:-benchmarks/results}/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
OUTDIR=${OUT:-benchmarks/results}
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
timeout 560 "$PY" benchmarks/gpu_check.py --json "$OUTDIR/gpu_check.json" "$@"
