#!/usr/bin/env bash
# Runs a benchmark on a lent GPU machine, from the repo root, with .device/ carried (scripts/device_bundle.sh):
# installs the carried wheels beside the machine's own torch, points the benchmark at the carried ComfyUI tree,
# and writes the JSON and the printed log to $OUT (or bench/results/ where $OUT is unset). A first argument
# `comfy_nodes` runs bench/comfy_nodes.py (the loader and sampler nodes vs core's); otherwise bench/gpu.py runs.
# The other arguments go to the script, e.g.  bash bench/device_run.sh --sizes 1024 --batches 1 --memory
#                                             bash bench/device_run.sh comfy_nodes --sizes 768 1536
set -euo pipefail
cd "$(dirname "$0")/.."
SCRIPT=gpu
if [ "${1:-}" = comfy_nodes ]; then SCRIPT=comfy_nodes; shift; fi
DEVICE=${ZIMAGE_DEVICE_DIR:-.device}                # the bundle; another folder only for tests of this script
[ -d "$DEVICE/wheels" ] || { echo "no $DEVICE/: run scripts/device_bundle.sh here and carry .device" >&2; exit 1; }
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || { echo "no $PY on this machine: set PYTHON to its Python 3 interpreter" >&2; exit 1; }

# The compiled wheels fit one CPython (their cpXY tag). pip --target on another one aborts with a resolver
# message that does not say so, and a wheel forced in would fail at import: say what does not match first.
have=$("$PY" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
tags=$(ls "$DEVICE/wheels" | sed -n 's/.*-\(cp[0-9]*\)-\(cp[0-9]*\|abi3\)-.*\.whl$/\1/p' | sort -u | tr '\n' ' ')
if [ -n "$tags" ] && ! grep -qw "$have" <<<"$tags"; then
    echo "the carried wheels in $DEVICE/wheels are built for ${tags% } (CPython $(sed 's/cp\([0-9]\)\([0-9]*\)/\1.\2/g' <<<"${tags% }")), but" \
         "$PY here is $("$PY" -c 'import sys; print(sys.version.split()[0])') ($have). Point PYTHON at a matching" \
         "interpreter, or make the bundle for this one (scripts/device_bundle.sh downloads with --python-version)." >&2
    exit 1
fi
# The machine's own torch runs everything (the bundle carries none); core's fused kernels (comfy-kitchen) are
# compiled against one torch and CUDA, and elsewhere fall back without a word, which would time core wrongly.
"$PY" - <<'CHECK' || exit 1
import sys
try:
    import torch
except ImportError:
    sys.exit("this machine's Python has no torch: the bundle carries none, the benchmark needs the image's own")
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} here sees no CUDA device (built for CUDA {torch.version.cuda}): "
             f"the benchmark is for a GPU machine")
CHECK
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/zimage-site \
    "$DEVICE"/wheels/*.whl
export PYTHONPATH=/tmp/zimage-site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
"$PY" - <<'CHECK' || [ "${ZIMAGE_ALLOW_KITCHEN_FALLBACK:-0}" = 1 ] || exit 1
import sys
import torch
import comfy_kitchen
cuda = comfy_kitchen.list_backends().get("cuda", {})
if not cuda.get("available"):
    sys.exit(f"comfy-kitchen's CUDA kernels do not load with this machine's torch {torch.__version__} "
             f"(CUDA {torch.version.cuda}): {cuda.get('unavailable_reason')}. The carried wheel was built for the "
             f"torch ComfyUI pins (2.9, CUDA 12.8); core's timings would run without its fused kernels. Use a "
             f"machine with that torch, or set ZIMAGE_ALLOW_KITCHEN_FALLBACK=1 to time core without them.")
CHECK
export ZIMAGE_COMFYUI_TREE=$(cd "$DEVICE" && pwd)/ComfyUI-0.30.0
export ZIMAGE_BENCH_RESULTS=${OUT:-$PWD/bench/results}
mkdir -p "$ZIMAGE_BENCH_RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
"$PY" -c "import torch, comfy_kitchen; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'comfy_kitchen', comfy_kitchen.__version__ if hasattr(comfy_kitchen, '__version__') else '?')"
"$PY" -m "bench.$SCRIPT" "$@" 2>&1 | tee "$ZIMAGE_BENCH_RESULTS/$SCRIPT-log-$(date -u +%Y%m%d-%H%M%S).txt"
