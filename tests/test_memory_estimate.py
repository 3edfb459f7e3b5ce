"""What ComfyUI reserves for sampling with the pack's MODEL against what the pack's DiT really holds.

ComfyUI frees `memory_required` bytes before a sampling call; too little and a full GPU runs out of memory
mid-run (Z-Image's "second run OOM" on 12-16 GB cards with ComfyUI 0.3.75). The DiT is run here at Turbo size
on the meta device (shapes only, no memory, no GPU) under a dispatch mode that adds up the bytes of every
tensor it makes while alive, with the attention as the fused GPU kernels compute it (bench/meta_memory.py)."""
from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO, import_comfy, import_pack
from zimage_core.config import TURBO
from zimage_core.dit import ZImageDiT
from zimage_core.fastpath import FAST, configure

sys.path.insert(0, str(REPO / "bench"))
from meta_memory import peak_bytes  # noqa: E402

CAPTION_TOKENS = 128
MARGIN = 1.9          # ComfyUI 0.30.0's reservation for core's NextDiT over core's own count (2.8 / 1.47)


def gpu_reservation(factor: float, area: int) -> float:
    """ComfyUI's memory_required on an NVIDIA GPU (flash attention) for bf16, in bytes."""
    return area * 2 * 0.01 * factor * 2 ** 20


@pytest.mark.parametrize("size,batch", [(1024, 1), (1024, 4), (2048, 1)])
def test_comfyui_reserves_enough_for_the_pack_dit(size, batch):
    bridge = import_pack("nodes.bridge")
    with torch.device("meta"):
        dit = configure(ZImageDiT(TURBO), FAST).to(torch.bfloat16)
    h = w = size // 8
    x = torch.empty(batch, TURBO.in_channels, h, w, device="meta", dtype=torch.bfloat16)
    caps = [torch.empty(CAPTION_TOKENS, TURBO.cap_feat_dim, device="meta", dtype=torch.bfloat16)] * batch
    peak = peak_bytes(lambda: dit(x, torch.empty(batch, device="meta"), caps))
    needed = peak / gpu_reservation(1.0, batch * h * w)
    reserved = gpu_reservation(bridge.MEMORY_USAGE_FACTOR, batch * h * w)
    print(f"{size}² batch {batch}: the pack's DiT holds {peak / 2 ** 20:.0f} MiB at most = factor {needed:.2f}; "
          f"reserved with {bridge.MEMORY_USAGE_FACTOR}: {reserved / 2 ** 20:.0f} MiB")
    assert bridge.MEMORY_USAGE_FACTOR >= MARGIN * needed
    # and the MODEL the loaders hand ComfyUI carries it
    from zimage_core.config import TINY
    model = bridge.make_model(bridge.ComfyZImageDiT(TINY))
    assert model.model.memory_usage_factor == bridge.MEMORY_USAGE_FACTOR


def test_core_nextdit_count_matches_the_reservation_core_chose(monkeypatch):
    """The unit of the margin: core's own NextDiT, counted the same way, against the 2.8 ComfyUI 0.30.0 gives
    it. If this count moved, MARGIN (and the pack's factor) would need looking at again."""
    import_comfy()
    import comfy.ldm.lumina.model as lumina
    import comfy.ldm.modules.attention as attention
    from comfy_tree import comfy_nextdit
    monkeypatch.setattr(lumina, "optimized_attention_masked", attention.attention_pytorch)   # as on a GPU
    with torch.device("meta"):
        core = comfy_nextdit(TURBO, device="meta", dtype=torch.bfloat16)
    x = torch.empty(1, TURBO.in_channels, 128, 128, device="meta", dtype=torch.bfloat16)
    ctx = torch.empty(1, CAPTION_TOKENS, TURBO.cap_feat_dim, device="meta", dtype=torch.bfloat16)
    peak = peak_bytes(lambda: core(x, torch.empty(1, device="meta"), ctx, num_tokens=CAPTION_TOKENS))
    counted = peak / gpu_reservation(1.0, 128 * 128)
    print(f"core NextDiT 1024²: {peak / 2 ** 20:.0f} MiB = factor {counted:.2f} (ComfyUI 0.30.0 reserves 2.8)")
    assert 2.8 / counted == pytest.approx(MARGIN, abs=0.1)


@pytest.mark.parametrize("cfg,runs", [(1.0, 1), (3.0, 2)])
def test_the_pack_sampler_asks_comfyui_to_keep_that_free(cfg, runs):
    """The pack's sampler reserves as core's samplers do (the model's estimate for the batch one forward runs),
    not ComfyUI's fixed default that load_models_gpu falls back to."""
    from zimage_core.config import TINY
    bridge, sampling = import_pack("nodes.bridge"), import_pack("nodes.sampling")
    model = bridge.make_model(bridge.ComfyZImageDiT(TINY))
    asked = sampling.memory_to_keep(model, (2, 16, 256, 256), cfg)
    assert asked["memory_required"] == model.model.memory_required([2 * runs, 16, 256, 256])
    assert asked["minimum_memory_required"] == model.model.memory_required([2, 16, 256, 256])
    assert asked["memory_required"] >= asked["minimum_memory_required"] > 0
