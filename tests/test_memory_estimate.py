"""What ComfyUI reserves for sampling with the loaders' MODEL against what that model really holds.

ComfyUI frees `memory_required` bytes before a sampling call; too little and a full GPU runs out of memory
mid-run (Z-Image's "second run OOM" on 12-16 GB cards with ComfyUI 0.3.75). The DiT is run here at Turbo size
on the meta device (shapes only, no memory, no GPU) under a dispatch mode that adds up the bytes of every
tensor it makes while alive, with the attention as the fused GPU kernels compute it (bench/meta_memory.py)."""
from __future__ import annotations


import pytest
import torch

from zimage_dev.runtime import import_comfy, import_pack
from zimage_core.config import TURBO

from bench.meta_memory import peak_bytes

CAPTION_TOKENS = 128
MARGIN = 1.9          # ComfyUI 0.30.0's reservation for core's NextDiT over core's own count (2.8 / 1.47)


def gpu_reservation(factor: float, area: int) -> float:
    """ComfyUI's memory_required on an NVIDIA GPU (flash attention) for bf16, in bytes."""
    return area * 2 * 0.01 * factor * 2 ** 20


@pytest.mark.parametrize("size,batch", [(1024, 1), (1024, 4), (2048, 1)])
def test_comfyui_reserves_enough_for_the_loaders_model(size, batch, monkeypatch):
    """The loaders' MODEL is core's NextDiT built from the file's shapes (nodes/core_model.py), counted here at
    Turbo size with the attention as the fused GPU kernels compute it."""
    core_model = import_pack("nodes.core_model")
    import comfy.ldm.lumina.model as lumina
    import comfy.ops
    import comfy.ldm.modules.attention as attention
    monkeypatch.setattr(lumina, "optimized_attention_masked", attention.attention_pytorch)   # as on a GPU
    with torch.device("meta"):
        dit = lumina.NextDiT(**core_model.unet_config(TURBO), device="meta", dtype=torch.bfloat16,
                             operations=comfy.ops.disable_weight_init)
    h = w = size // 8
    x = torch.empty(batch, TURBO.in_channels, h, w, device="meta", dtype=torch.bfloat16)
    ctx = torch.empty(batch, CAPTION_TOKENS, TURBO.cap_feat_dim, device="meta", dtype=torch.bfloat16)
    peak = peak_bytes(lambda: dit(x, torch.empty(batch, device="meta"), ctx, num_tokens=CAPTION_TOKENS))
    needed = peak / gpu_reservation(1.0, batch * h * w)
    factor = core_model.MEMORY_USAGE_FACTOR
    print(f"{size}² batch {batch}: the model holds {peak / 2 ** 20:.0f} MiB at most = factor {needed:.2f}; "
          f"reserved with {factor}: {gpu_reservation(factor, batch * h * w) / 2 ** 20:.0f} MiB")
    assert factor >= MARGIN * needed - 0.05


def test_the_loaded_model_carries_the_factor(tmp_path):
    """Core's samplers (and the pack's, which runs through them) reserve model.memory_required(...), which
    reads the factor the loader set: 2.8 on every ComfyUI version (0.3.75 ships 1.7)."""
    from zimage_dev import synthetic
    core_model = import_pack("nodes.core_model")
    files = synthetic.write_split_files(tmp_path)
    model = core_model.load_model(files.dit)
    assert model.model.memory_usage_factor == core_model.MEMORY_USAGE_FACTOR == 2.8
    assert model.model.memory_required([2, 16, 128, 128]) > model.model.memory_required([1, 16, 128, 128]) > 0


def test_core_nextdit_count_matches_the_reservation_core_chose(monkeypatch):
    """The unit of the margin: core's own NextDiT, counted the same way, against the 2.8 ComfyUI 0.30.0 gives
    it. If this count moved, MARGIN (and the pack's factor) would need looking at again."""
    import_comfy()
    import comfy.ldm.lumina.model as lumina
    import comfy.ops  # noqa: F401
    import comfy.ldm.modules.attention as attention
    from zimage_dev.comfy_tree import comfy_nextdit
    monkeypatch.setattr(lumina, "optimized_attention_masked", attention.attention_pytorch)   # as on a GPU
    with torch.device("meta"):
        core = comfy_nextdit(TURBO, device="meta", dtype=torch.bfloat16)
    x = torch.empty(1, TURBO.in_channels, 128, 128, device="meta", dtype=torch.bfloat16)
    ctx = torch.empty(1, CAPTION_TOKENS, TURBO.cap_feat_dim, device="meta", dtype=torch.bfloat16)
    peak = peak_bytes(lambda: core(x, torch.empty(1, device="meta"), ctx, num_tokens=CAPTION_TOKENS))
    counted = peak / gpu_reservation(1.0, 128 * 128)
    print(f"core NextDiT 1024²: {peak / 2 ** 20:.0f} MiB = factor {counted:.2f} (ComfyUI 0.30.0 reserves 2.8)")
    assert 2.8 / counted == pytest.approx(MARGIN, abs=0.1)
