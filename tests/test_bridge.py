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


# ---- fp8_e4m3fn_fast: fp8 matmul inside ComfyUI's Linear -----------------------------------------------------

def fp8_linear_pair(bridge, seed=0):
    """A ComfyUI Linear holding an fp8 block weight (as fp8_e4m3fn loads it) and its fp8-matmul twin."""
    import comfy.ops
    torch.manual_seed(seed)
    plain = comfy.ops.disable_weight_init.Linear(64, 48, bias=False)
    plain.weight = torch.nn.Parameter((torch.randn(48, 64) * 0.5).to(torch.float8_e4m3fn), requires_grad=False)
    plain.comfy_cast_weights = True
    fast = comfy.ops.disable_weight_init.Linear(64, 48, bias=False)
    fast.weight, fast.comfy_cast_weights = plain.weight, True
    bridge.use_fp8_matmul_linears([fast])
    return plain, fast


def test_fp8_fast_linear_is_the_cast_path_where_there_is_no_fp8_matmul(bridge):
    """On this CPU (and on GPUs without fp8 units) fp8_e4m3fn_fast computes exactly what fp8_e4m3fn does."""
    plain, fast = fp8_linear_pair(bridge)
    x = torch.randn(2, 32, 64, dtype=torch.bfloat16)
    assert type(fast) is bridge.FP8MatmulLinear and fast.fp8_matmul_mode(x) is None
    with torch.no_grad():
        assert torch.equal(fast(x), plain(x))


def test_fp8_fast_linear_multiplies_in_fp8(bridge, monkeypatch):
    """Where fp8 matmul is granted, the product is the fp8 one: the activations quantised (per tensor with the
    CPU build's kernel, forced here; per token on Ada/Hopper), the stored fp8 weight as it is."""
    quant = bridge.quant                          # the pack's own copy of the module (imported as ComfyUI does)
    plain, fast = fp8_linear_pair(bridge, seed=1)
    monkeypatch.setattr(quant, "scaled_mm_support", lambda device: "tensor")
    x = torch.randn(2, 32, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        out = fast(x)
        reference = plain(x)                                        # bf16 activations x the same fp8 weight
    q, s = quant.quantize(x.reshape(-1, 64), rowwise=False)
    emulated = ((q.float() * s) @ fast.weight.float().t()).reshape(2, 32, 48)
    assert out.dtype == torch.bfloat16 and out.shape == reference.shape
    assert rel_err(out.float(), emulated)[1] <= 1e-2                 # it is the fp8 x fp8 product (bf16 out)
    assert 0 < rel_err(out.float(), reference.float())[1] <= 0.1     # within fp8's rounding of the activations
    fast.weight_function = [lambda w: w]                            # a LoRA applied at cast time: cast path
    assert fast.fp8_matmul_mode(x) is None
    with torch.no_grad():
        assert torch.equal(fast(x), plain(x))


def test_fp8_fast_linear_falls_back_once_when_the_gpu_refuses(bridge, monkeypatch, caplog):
    quant = bridge.quant
    plain, fast = fp8_linear_pair(bridge, seed=2)
    monkeypatch.setattr(quant, "scaled_mm_support", lambda device: "rowwise")
    monkeypatch.setattr(bridge.FP8MatmulLinear, "_failed", False)

    def refuse(*args, **kwargs):
        raise RuntimeError("no kernel image is available")
    monkeypatch.setattr(quant, "fp8_matmul", refuse)
    x = torch.randn(1, 16, 64, dtype=torch.bfloat16)
    with torch.no_grad(), caplog.at_level("WARNING"):
        assert torch.equal(fast(x), plain(x))
        assert torch.equal(fast(x), plain(x))
    assert bridge.FP8MatmulLinear._failed
    assert sum("fp8 matmul failed" in r.getMessage() for r in caplog.records) == 1


# ---- the compile node ---------------------------------------------------------------------------------------

def test_compile_node_patches_a_clone_and_refuses_other_models(bridge):
    import comfy.model_patcher
    speed = import_pack("nodes.speed")
    model = bridge.make_model(bridge.ComfyZImageDiT(TINY))
    (patched,) = speed.ZImageTurboCompile().patch(model)
    assert speed.wants_compiled(patched) and not speed.wants_compiled(model)     # the loaded MODEL is untouched
    assert patched.model is model.model                                          # same weights, no copy
    other = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), load_device=torch.device("cpu"),
                                             offload_device=torch.device("cpu"))
    with pytest.raises(ValueError, match="Z-Image Turbo Loader"):
        speed.ZImageTurboCompile().patch(other)
