"""The runtime's ComfyUI trees as the tests use them: a missing tree is a skip that names the setup script (the
tests' reference is missing, not wrong), never an error."""
from __future__ import annotations

from pathlib import Path

import pytest

from zimage_dev import comfy_tree

SETUP_HINT = "run scripts/setup_runtime.sh (it installs the ComfyUI trees the tests compare against)"


def comfyui_tree(version: str = "0.30.0") -> Path:
    try:
        return comfy_tree.comfyui_tree(version)
    except FileNotFoundError as e:
        pytest.skip(f"{e} ({SETUP_HINT})")


def tokenizer_dir() -> Path:
    """Qwen's tokenizer files, from ComfyUI's tree."""
    return comfyui_tree() / "comfy" / "text_encoders" / "qwen25_tokenizer"


def import_comfy(version: str = "0.30.0") -> None:
    """Make ComfyUI's `comfy` package importable as a library, on the CPU."""
    comfyui_tree(version)
    comfy_tree.import_comfy(version, cpu=True)


def import_pack(submodule: str = "nodes"):
    """This repo imported as ComfyUI imports a custom node pack (comfy_tree.import_pack), ComfyUI on the CPU."""
    import_comfy()
    return comfy_tree.import_pack(submodule)
