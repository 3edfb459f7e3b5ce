"""The ComfyUI adapter in-process: the pack's DiT with ComfyUI's Linears computes what the engine's does,
also when ComfyUI streams weights (its low-VRAM cast path)."""
from __future__ import annotations

import pytest
import torch

from conftest import import_pack, rel_err
from zimage_core.config import TINY
from zimage_core.dit import ZImageDiT
from zimage_core.synthetic import random_state_dict


@pytest.fixture(scope="module")
def bridge():
    return import_pack("nodes.bridge")


def test_every_linear_is_comfyui_castable(bridge):
    import comfy.ops
    dit = bridge.ComfyZImageDiT(TINY)
    linears = [m for m in dit.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is comfy.ops.disable_weight_init.Linear for m in linears)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("streamed", [False, True])
def test_comfy_dit_equals_the_engine(bridge, streamed, dtype):
    """fp16 too: its overflow guard calls the Linears with fp16 inputs, which ComfyUI's cast path must follow."""
    engine = ZImageDiT(TINY).eval()
    sd = random_state_dict(engine, seed=4)
    engine.load_state_dict(sd)
    comfy_dit = bridge.ComfyZImageDiT(TINY).eval()
    comfy_dit.load_state_dict(sd)
    engine.to(dtype)
    comfy_dit.to(dtype)
    if streamed:                                   # what ComfyUI switches on for weights it leaves off the GPU
        for m in comfy_dit.modules():
            if hasattr(m, "comfy_cast_weights"):
                m.comfy_cast_weights = True
    x, t = torch.randn(1, 16, 6, 4), torch.tensor([0.3])
    cap = torch.randn(1, 9, TINY.cap_feat_dim)
    with torch.no_grad():
        ours = engine(x, t, [cap[0]])
        theirs = -comfy_dit(x, 1 - t, cap, num_tokens=9)        # ComfyUI's call: sigma in, -u out
    assert rel_err(theirs, ours)[1] <= 1e-6


def test_overlong_prompt_is_refused_with_the_limit(bridge):
    from conftest import tokenizer_dir
    from zimage_core.tokenizer import PromptTokenizer
    adapter = bridge._TokenizerAdapter(PromptTokenizer.from_dir(tokenizer_dir()))
    ok = adapter.tokenize_with_weights("word " * 600)                # past diffusers' 512: kept whole
    assert len(ok[bridge.TOKEN_KEY][0]) > 600
    with pytest.raises(ValueError, match=r"text: the prompt is \d+ tokens long, over this pack's limit of 4096"):
        adapter.tokenize_with_weights("word " * 5000)
