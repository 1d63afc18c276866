#!/usr/bin/env bash
# The GPU checks, sized for one run of a few minutes on one H100 (no network; torch, transformers
# and accelerate installed). Run from anywhere:  bash benchmarks/gpu_check.sh
#  1. benchmarks/gpu_check.py: weighted-SFT step (bf16, random Qwen2.5-0.5B-shaped model) tokens/s
#     and MFU, drift's loss against full logits; the transformers engine's generated tokens/s.
#  2. benchmarks/gpu_fsdp_check.py: the trainer under configs/accelerate/fsdp.yaml against a plain
#     single-process run, and a kill + resume from a sharded FSDP checkpoint.
# Figures go to stdout and to ${OUT:-benchmarks/results}/gpu_check.json and gpu_fsdp_check.json.
# drift_core needs pydantic; on an image without it, set DRIFT_WHEELS to a directory holding the
# pydantic, pydantic_core (for this Python), annotated_types, typing_extensions and
# typing_inspection wheels: they are unpacked into a temporary directory (no pip, no network).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
OUTDIR=${OUT:-benchmarks/results}
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c "import sys, torch, transformers, accelerate; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
if ! "$PY" -c "import pydantic" 2>/dev/null; then
  if [ -z "${DRIFT_WHEELS:-}" ]; then echo "gpu_check: pydantic is missing (pip install pydantic, or set DRIFT_WHEELS)"; exit 2; fi
  DEPS=$(mktemp -d)
  "$PY" - "$DRIFT_WHEELS" "$DEPS" <<'PYEOF'
import sys, zipfile
from pathlib import Path
tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
for whl in sorted(Path(sys.argv[1]).glob("*.whl")):
    if whl.name.startswith("pydantic_core") and f"-{tag}-" not in whl.name:
        continue
    zipfile.ZipFile(whl).extractall(sys.argv[2])
    print("unpacked", whl.name)
PYEOF
  export PYTHONPATH="$DEPS${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
status=0
timeout 320 "$PY" benchmarks/gpu_check.py --json "$OUTDIR/gpu_check.json" "$@" || status=$?
timeout 240 "$PY" benchmarks/gpu_fsdp_check.py --json "$OUTDIR/gpu_fsdp_check.json" || status=$?
exit $status
