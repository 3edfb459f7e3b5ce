"""Core ComfyUI as a library, for the tests and the benchmarks (never for the pack, which ComfyUI imports):
where the source trees that scripts/setup_runtime.sh installs are, importing their `comfy` package in this
process, importing this repo as ComfyUI imports a custom node pack, and building core's own Z-Image model for a
DiT config, the reference the pack is compared with."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from zimage_dev import REPO, RUNTIME


def comfyui_tree(version: str = "0.30.0") -> Path:
    """Core ComfyUI's source tree: the runtime's, or ZIMAGE_COMFYUI_TREE (the copy scripts/device_bundle.sh
    packs for a lent GPU machine, which has no runtime). FileNotFoundError, naming the fix, when it is missing."""
    tree = Path(os.environ.get("ZIMAGE_COMFYUI_TREE") or RUNTIME / f"ComfyUI-{version}")
    if not (tree / "comfy").is_dir():
        raise FileNotFoundError(f"ComfyUI {version} is not installed at {tree}: run scripts/setup_runtime.sh")
    return tree


def import_comfy(version: str = "0.30.0", cpu: bool | None = None) -> str:
    """Make core ComfyUI's `comfy` package importable, its device chosen as on the command line: `--cpu` when
    `cpu` (default: when CUDA is absent). Returns the name of the attention function ComfyUI picked."""
    tree = comfyui_tree(version)
    # ComfyUI is an application, not a package: its `comfy` imports resolve only with its tree on the path.
    # This is the harness's one path edit, made here for every caller.
    if str(tree) not in sys.path:
        sys.path.insert(0, str(tree))
    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    argv = sys.argv
    sys.argv = [argv[0]] + (["--cpu"] if cpu else [])
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.model_management  # noqa: F401  (reads the arguments now)
        import comfy.ldm.modules.attention as attention
    finally:
        sys.argv = argv
    return attention.optimized_attention.__name__


def import_pack(submodule: str = "nodes", version: str = "0.30.0", cpu: bool | None = None):
    """This repo imported as ComfyUI imports a custom node pack (a package named after its folder, here
    `zimage_pack`), so its relative imports work; returns `zimage_pack.<submodule>`. Imports `comfy` first."""
    import importlib
    import importlib.util
    if "comfy.model_management" not in sys.modules:
        import_comfy(version, cpu)
    if "zimage_pack" not in sys.modules:
        spec = importlib.util.spec_from_file_location("zimage_pack", REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["zimage_pack"] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"zimage_pack.{submodule}")


def comfy_nextdit(cfg, device="cpu", dtype: torch.dtype = torch.float32):
    """Core ComfyUI's Z-Image model (NextDiT with z_image_modulation) for a zimage_core DiTConfig, with
    ComfyUI's weight-init-free ops, as ComfyUI builds it when the weights fit on the device. Its state-dict
    keys are the pack's, so either loads the other's weights as they are."""
    import comfy.ops
    from comfy.ldm.lumina.model import NextDiT
    return NextDiT(patch_size=cfg.patch_size, in_channels=cfg.in_channels, dim=cfg.dim, n_layers=cfg.n_layers,
                   n_refiner_layers=cfg.n_noise_refiner, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads,
                   multiple_of=1, ffn_dim_multiplier=cfg.ffn_hidden / cfg.dim + 1e-9, norm_eps=cfg.norm_eps,
                   qk_norm=True, cap_feat_dim=cfg.cap_feat_dim, axes_dims=list(cfg.axes_dims),
                   axes_lens=list(cfg.axes_lens), rope_theta=cfg.rope_theta, z_image_modulation=True,
                   time_scale=cfg.t_scale, pad_tokens_multiple=cfg.seq_multiple,
                   operations=comfy.ops.disable_weight_init, dtype=dtype, device=device)
