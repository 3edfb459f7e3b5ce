#!/usr/bin/env bash
# Runs bench/gpu.py on a lent GPU machine, from the repo root, with .device/ carried (scripts/device_bundle.sh):
# installs the carried wheels beside the machine's own torch, points the benchmark at the carried ComfyUI tree,
# and writes the JSON and the printed log to $OUT (or bench/results/ where $OUT is unset). Arguments go to
# gpu.py, e.g.  bash bench/device_run.sh --sizes 1024 --batches 1 --memory
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .device/wheels ] || { echo "no .device/: run scripts/device_bundle.sh here and carry .device" >&2; exit 1; }
PY=${PYTHON:-python3}
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/zimage-site \
    .device/wheels/*.whl
export PYTHONPATH=/tmp/zimage-site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export ZIMAGE_COMFYUI_TREE=$PWD/.device/ComfyUI-0.30.0
export ZIMAGE_BENCH_RESULTS=${OUT:-$PWD/bench/results}
mkdir -p "$ZIMAGE_BENCH_RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
"$PY" -c "import torch, comfy_kitchen; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'comfy_kitchen', comfy_kitchen.__version__ if hasattr(comfy_kitchen, '__version__') else '?')"
"$PY" bench/gpu.py "$@" 2>&1 | tee "$ZIMAGE_BENCH_RESULTS/gpu-log-$(date -u +%Y%m%d-%H%M%S).txt"
