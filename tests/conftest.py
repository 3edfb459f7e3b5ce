"""Shared fixtures: random weights for tiny models, and access to the ComfyUI trees the runtime installed."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RUNTIME = REPO / ".runtime"
SETUP_HINT = "run scripts/setup_runtime.sh (it installs the ComfyUI trees the tests compare against)"


def comfyui_tree(version: str = "0.30.0") -> Path:
    tree = RUNTIME / f"ComfyUI-{version}"
    if not (tree / "comfy").is_dir():
        pytest.skip(f"ComfyUI {version} is not installed at {tree}: {SETUP_HINT}")
    return tree


def tokenizer_dir() -> Path:
    return comfyui_tree() / "comfy" / "text_encoders" / "qwen25_tokenizer"


def import_comfy(version: str = "0.30.0"):
    """Make ComfyUI's `comfy` package importable as a library (CPU, no argument parsing)."""
    tree = comfyui_tree(version)
    if str(tree) not in sys.path:
        sys.path.insert(0, str(tree))
    argv = sys.argv
    sys.argv = [argv[0], "--cpu"]
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.model_management  # noqa: F401  (reads --cpu now)
    finally:
        sys.argv = argv


def randomize(module: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
    """Every parameter random (norm weights around 1), so no part of a parity test is trivially zero or one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            owner = name.rsplit(".", 2)[-2] if name.count(".") else ""
            p.copy_(1 + noise if "norm" in owner and name.endswith("weight") else noise)
    return module


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max abs error / max abs reference)."""
    diff = (ours.double() - ref.double()).abs().max().item()
    return diff, diff / ref.double().abs().max().item()
