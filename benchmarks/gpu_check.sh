#!/usr/bin/env bash
# The GPU checks, one prepared run of under 8 minutes on one H100/H200 (no network; torch,
# transformers and accelerate installed). Run from anywhere:  bash benchmarks/gpu_check.sh
#  1. benchmarks/gpu_speed.py (timeout 450 s): the engine's decoding paths (standard / static KV
#     cache + torch.compile / continuous batching), 1,024 completions x 256 tokens at batch 256, on
#     the SmolLM2-135M and Qwen2.5-0.5B shapes; the weighted-SFT step (Qwen2.5-0.5B shape) current
#     vs packing vs Liger fused linear cross-entropy vs regional torch.compile vs all three: tokens/s,
#     MFU, losses compared (bf16 tolerance). Liger needs liger-kernel: put its wheel in .whl/ (see
#     docs/benchmarks.md); without it that row records why it could not run.
#  2. FULL=1 also runs the earlier checks (about 9 more minutes): benchmarks/gpu_check.py (drift's
#     loss vs full logits; engine vs one-at-a-time) and benchmarks/gpu_fsdp_check.py (FSDP + resume).
# Figures go to stdout and to ${OUT:-benchmarks/results}/gpu_speed.json (and gpu_check.json,
# gpu_fsdp_check.json with FULL=1).
# drift_core needs pydantic; on an image without it, set DRIFT_WHEELS to a directory holding the
# pydantic, pydantic_core (for this Python), annotated_types, typing_extensions and
# typing_inspection wheels: they are unpacked into a temporary directory (no pip, no network).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUTDIR=${OUT:-benchmarks/results}
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c "import sys, torch, transformers, accelerate; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
DEPS=$(mktemp -d)
unpack() {  # unpack wheels (pure Python, or for this Python) into $DEPS: no pip, no network
  "$PY" - "$DEPS" "$@" <<'PYEOF'
import sys, zipfile
from pathlib import Path
tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
for whl in sys.argv[2:]:
    name = Path(whl).name
    if "-cp" in name and f"-{tag}-" not in name:
        continue
    zipfile.ZipFile(whl).extractall(sys.argv[1])
    print("unpacked", name)
PYEOF
}
if ! "$PY" -c "import pydantic" 2>/dev/null; then
  if [ -z "${DRIFT_WHEELS:-}" ]; then echo "gpu_check: pydantic is missing (pip install pydantic, or set DRIFT_WHEELS)"; exit 2; fi
  unpack "$DRIFT_WHEELS"/*.whl
fi
if ! "$PY" -c "import liger_kernel" 2>/dev/null && ls .whl/liger_kernel-*.whl >/dev/null 2>&1; then
  unpack .whl/liger_kernel-*.whl
fi
export PYTHONPATH="$PWD:$DEPS${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
status=0
timeout 450 "$PY" benchmarks/gpu_speed.py --json "$OUTDIR/gpu_speed.json" "$@" || status=$?
if [ "${FULL:-0}" = 1 ]; then
  timeout 320 "$PY" benchmarks/gpu_check.py --json "$OUTDIR/gpu_check.json" || status=$?
  timeout 240 "$PY" benchmarks/gpu_fsdp_check.py --json "$OUTDIR/gpu_fsdp_check.json" || status=$?
fi
exit $status
