"""Z-Image at the released width (dim 3840, two main layers, random bf16), a Fun ControlNet for it and LoRAs in
every format core maps: the files core's own loaders accept (UNETLoader detects Z-Image by width only), written
once into the runtime's cache (5.3 GB) and hard-linked into each server's models folder."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from zimage_dev import RUNTIME

FIXTURES = RUNTIME / "cache" / "model_node_table"        # the cache's name predates this module; kept, not rewritten
WIDE = "zt_wide_bf16.safetensors"                        # Z-Image at the released width (dim 3840), two layers
CONTROL = "zt_fun_controlnet_union.safetensors"          # a Fun ControlNet for it, Union 1.0 layout
LORA_FORMATS = ("comfyui", "ai-toolkit", "diffusers-peft", "diffsynth")


def wide_config():
    from zimage_core.config import DiTConfig
    from zimage_dev.synthetic import TINY_TEXT
    return DiTConfig(n_layers=2, cap_feat_dim=TINY_TEXT.hidden)      # the released widths, two main layers


def fixture_files(folder: Path = FIXTURES) -> Path:
    """The wide DiT, the ControlNet and the LoRAs, written once and shared by every test and script that needs
    them. A lock keeps two processes from writing at once; a write cut short leaves no "complete" mark, so the
    next caller writes again."""
    import fcntl
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "complete"
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            from safetensors.torch import save_file
            from zimage_dev import synthetic
            for name, weights in ((WIDE, lambda: synthetic.dit_weights(wide_config(), seed=21)),
                                  (CONTROL, controlnet_weights)):
                partial = folder / f"{name}.partial"
                save_file(weights(), str(partial))
                partial.replace(folder / name)
            write_loras(folder / "loras", wide_config().dim)
            done.write_text("written by zimage_dev/wide_files.py fixture_files\n")
    return folder


def link(src: Path, dst: Path) -> None:
    """A hard link (no copy of GBs), or a copy where the two are on different file systems."""
    try:
        dst.hardlink_to(src)
    except OSError:
        shutil.copyfile(src, dst)


def controlnet_weights(seed: int = 22) -> dict[str, torch.Tensor]:
    """Random weights with the keys and shapes of core's ZImage_Control (v1.0: six control layers)."""
    from zimage_dev import comfy_tree
    from zimage_dev.parity import released_like
    comfy_tree.import_comfy(cpu=True)
    import comfy.ldm.lumina.controlnet as controlnet
    import comfy.ops
    with torch.device("meta"):
        module = controlnet.ZImage_Control(operations=comfy.ops.disable_weight_init, device="meta")
    return released_like(module, seed)


def write_loras(folder, dim: int, rank: int = 4) -> None:
    """One LoRA on the first main block's attention, in each format core maps for Z-Image."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(5)

    def pair(rows):
        return torch.randn(rows, rank, generator=g) * 0.05, torch.randn(rank, dim, generator=g) * 0.05
    up_q, down_q = pair(dim)
    up_o, down_o = pair(dim)
    for name, prefix, a, b in (("ai-toolkit", "diffusion_model.", "lora_A.weight", "lora_B.weight"),
                               ("diffusers-peft", "transformer.", "lora_A.weight", "lora_B.weight"),
                               ("diffsynth", "", "lora_A.default.weight", "lora_B.default.weight")):
        save_file({f"{prefix}layers.0.attention.to_q.{a}": down_q, f"{prefix}layers.0.attention.to_q.{b}": up_q,
                   f"{prefix}layers.0.attention.to_out.0.{a}": down_o,
                   f"{prefix}layers.0.attention.to_out.0.{b}": up_o}, str(folder / f"{name}.safetensors"))
    up3, down3 = pair(3 * dim)
    save_file({"diffusion_model.layers.0.attention.qkv.lora_up.weight": up3,
               "diffusion_model.layers.0.attention.qkv.lora_down.weight": down3}, str(folder / "comfyui.safetensors"))
    write_musubi_pair(folder, dim, rank)


def write_musubi_pair(folder, dim: int, rank: int) -> None:
    """musubi-tuner's native LoRA (split q/k/v, alpha = rank / 2), its lora_unet__ variant without alpha, and each
    one's delta written by hand in ComfyUI's fused form, which core's LoraLoader reads."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(6)
    # twice the other fixtures' scale: alpha = rank / 2 halves it back, and q/k/v alone move the image less
    parts = {n: (torch.randn(rank, dim, generator=g) * 0.1, torch.randn(dim, rank, generator=g) * 0.1)
             for n in ("to_q", "to_k", "to_v")}
    for name, prefix, alpha in (("musubi", "lora_unet_", rank / 2), ("musubi_double_underscore", "lora_unet__", None)):
        sd = {}
        for n, (down, up) in parts.items():
            key = f"{prefix}layers_0_attention_{n}"
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down.clone(), up.clone()
            if alpha is not None:
                sd[f"{key}.alpha"] = torch.tensor(float(alpha))
        save_file(sd, str(folder / f"{name}.safetensors"))
        scale = (alpha if alpha is not None else rank) / rank
        up = torch.block_diag(*[p[1] * scale for p in parts.values()])           # each part on its own rows
        save_file({"diffusion_model.layers.0.attention.qkv.lora_up.weight": up.contiguous(),
                   "diffusion_model.layers.0.attention.qkv.lora_down.weight": torch.cat([p[0] for p in parts.values()]),
                   "diffusion_model.layers.0.attention.qkv.alpha": torch.tensor(float(3 * rank))},
                  str(folder / f"{name}_as_comfyui.safetensors"))
