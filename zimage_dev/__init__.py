"""The developer harness: what the tests, the scripts and the benchmarks share, in one place.

Real ComfyUI servers and core ComfyUI as a library (`comfy_server`, `comfy_tree`), Redis (`redis_server`), random
weights in the released layouts (`synthetic`, `wide_files`, `quantized_files`, `diffusers_files`), the references
the tests compare with (`controlnet_reference`, `parity`). It is not shipped: the nodes and `zimage_core` never
import it, and `pyproject.toml` does not package it. Import it from the repository root (pytest's `pythonpath`,
or `python -m scripts.NAME` / `python -m bench.NAME`), never through `sys.path` edits.
"""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNTIME = REPO / ".runtime"                 # what scripts/setup_runtime.sh installs: venv, ComfyUI trees, caches
