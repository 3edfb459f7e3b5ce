#!/usr/bin/env bash
# Packs into .device/ what bench/gpu.py and bench/comfy_nodes.py need on a lent GPU machine, which has python3
# with torch but no ComfyUI and nothing to download from (see bench/README.md, "On a lent GPU"):
#   .device/wheels/           the Python 3.12 x86-64 wheels of core ComfyUI's compiled dependencies
#                             (comfy-kitchen: the fused RoPE/RMSNorm kernels core's Z-Image model uses on CUDA;
#                             comfy-aimdo: imported by its model management), versions as ComfyUI pins them,
#                             and of torchsde, which the pack's import needs and the image does not have
#   .device/ComfyUI-0.30.0/   its source tree without the tokenizer vocabularies but Qwen's, and without the
#                             front-end data, small enough to travel with the repo
# Needs the runtime (scripts/setup_runtime.sh) and PyPI. .device/ is git-ignored; the device tool carries it.
set -euo pipefail
cd "$(dirname "$0")/.."
TREE=.runtime/ComfyUI-0.30.0
[ -d "$TREE/comfy" ] || { echo "no $TREE: run scripts/setup_runtime.sh first" >&2; exit 1; }
OUT=.device
rm -rf "$OUT" && mkdir -p "$OUT/wheels"

pins=$(grep -E '^comfy-(kitchen|aimdo)==' "$TREE/requirements.txt")
# Pure-Python imports of comfy.* that the machine's image lacks (torchsde: comfy.k_diffusion.sampling, which
# the pack's sampler imports through comfy.sample), at the versions the runtime installed.
for dist in torchsde trampoline; do
    pins="$pins $dist==$(.runtime/venv/bin/python -m pip show "$dist" | sed -n 's/^Version: //p')"
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$OUT/wheels" $pins

# Python sources (all: tokenizer folders hold Python packages too) and the small config files beside them, not
# the tokenizer vocabularies (tens of MB) but Qwen's (4.3 MB: bench/comfy_nodes.py tokenizes its prompt through
# core's Z-Image CLIP, as CLIP Text Encode does); not the API nodes, extra nodes, blueprints and tests either:
# the benchmarks import comfy.* and the pack only.
(cd "$TREE" && find . -type d \( -name '__pycache__' -o -name 'tests*' -o -name blueprints \
    -o -name comfy_api_nodes -o -name comfy_extras \) -prune -o -type f \( -name '*.py' -o \( \
    \( \( -name '*.json' -size -64k \) -o -name '*.yaml' \) ! -path '*tokenizer*' \) \) -print) |
    while read -r f; do mkdir -p "$OUT/ComfyUI-0.30.0/$(dirname "$f")"; cp "$TREE/$f" "$OUT/ComfyUI-0.30.0/$f"; done
cp -r "$TREE/comfy/text_encoders/qwen25_tokenizer" "$OUT/ComfyUI-0.30.0/comfy/text_encoders/"

du -sh "$OUT/wheels" "$OUT/ComfyUI-0.30.0"
total=$(du -sm "$OUT" | cut -f1)
# The device tool carries at most 64 MiB with the working tree.
[ "$total" -lt 60 ] || { echo "$OUT is ${total} MB: too large to carry (64 MiB with the repo)" >&2; exit 1; }
echo "ready: carry [\".device\"] and run bash bench/device_run.sh (bench/README.md)"
