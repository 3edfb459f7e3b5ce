"""Every fast-path option against the plain path on the same weights, with the tolerance in the test."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from zimage_dev.parity import randomize, rel_err
from zimage_core import layers, quant
from zimage_core.config import TINY, TINY_DEEP
from zimage_core.dit import TransformerBlock, ZImageDiT
from zimage_core.fastpath import FAST, PLAIN, FastPath, configure
from zimage_core.sampling import sample, sigma_schedule

EXACT_FP32 = 1e-6         # fast options reorder no arithmetic: in fp32 they agree to rounding (measured 0)
BF16 = 1e-2               # bf16 runs: two roundings of ~4e-3 apart at most (measured 0)
FP8 = 0.1                 # e4m3 has 3 mantissa bits: one fp8 product of random data


def tiny_dit(cfg=TINY, seed=0, dtype=torch.float32) -> ZImageDiT:
    return randomize(ZImageDiT(cfg), seed=seed).eval().to(dtype)


def inputs(cfg=TINY, cap_lens=(7, 40), h=8, w=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(cap_lens), cfg.in_channels, h, w, generator=g)
    t = torch.rand(len(cap_lens), generator=g)
    caps = [torch.randn(n, cfg.cap_feat_dim, generator=g) for n in cap_lens]
    return x, t, caps


OPTIONS = {name: dataclasses.replace(PLAIN, **{field: value})
           for name, field, value in [("fused_norm", "fused_norm", True), ("complex_rope", "complex_rope", True),
                                      ("attention_auto", "attention", "auto")]}
OPTIONS["all"] = FAST


@pytest.mark.parametrize("dtype,tol", [(torch.float32, EXACT_FP32), (torch.bfloat16, BF16)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_option_equals_plain(option, dtype, tol):
    model = tiny_dit(TINY_DEEP, dtype=dtype)
    x, t, caps = inputs(TINY_DEEP, cap_lens=(5, 33, 64))            # mixed lengths: the masked path too
    with torch.no_grad():
        plain = configure(model, PLAIN)(x, t, caps)
        fast = configure(model, OPTIONS[option])(x, t, caps)
    abs_err, rel = rel_err(fast, plain)
    print(f"{option} {dtype}: max abs {abs_err:.2e}, rel {rel:.2e}")
    assert torch.isfinite(fast).all()
    assert rel <= tol


def test_configure_sets_every_module():
    model = configure(tiny_dit(), FAST)
    norms = [m for m in model.modules() if isinstance(m, layers.RMSNorm)]
    attns = [m for m in model.modules() if hasattr(m, "complex_rope")]
    assert norms and all(m.fused for m in norms)
    assert len(attns) == TINY.n_layers + TINY.n_noise_refiner + TINY.n_context_refiner
    assert all(a.complex_rope and a.backend == "auto" for a in attns)
    configure(model, PLAIN)
    assert not any(m.fused for m in norms) and not any(a.complex_rope for a in attns)
    with pytest.raises(ValueError, match="attention must be one of"):
        FastPath(attention="flash4")


def test_rope_complex_is_bit_identical():
    from zimage_core.rope import RopeTable, image_positions
    pos = image_positions(6, 5, 32, 9)[None].expand(2, -1, -1)
    table = RopeTable.from_positions(pos, TINY.axes_dims, TINY.rope_theta)
    x = torch.randn(2, 32, 4, TINY.head_dim)
    assert torch.equal(table.rotate(x, use_complex=True), table.rotate(x, use_complex=False))


# ---- the prompt part made once per run ----------------------------------------------------------------

def counting_contexts(model: ZImageDiT) -> list:
    made = []
    original = model.make_context

    def make(captions, size, *args):
        made.append(size)
        return original(captions, size, *args)
    model.make_context = make
    return made


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_context_reuse_is_exact_and_made_once(cfg_scale):
    model = configure(tiny_dit(), FAST)
    x, _, caps = inputs(cap_lens=(7, 40))
    neg = [torch.randn(3, TINY.cap_feat_dim), torch.randn(12, TINY.cap_feat_dim)]
    negative = neg if cfg_scale != 1.0 else None
    sigmas = sigma_schedule(8)
    made = counting_contexts(model)
    with torch.no_grad():
        plain = sample(lambda *a: model(*a), x, sigmas, caps, negative, cfg_scale)    # a plain callable
        assert len(made) == 8                                       # one per step without reuse
        made.clear()
        reused = sample(model, x, sigmas, caps, negative, cfg_scale)                  # sample() reuses
    assert len(made) == 1                                           # cond (+ uncond) batched: one context
    assert torch.equal(reused, plain)
    assert model._contexts is None                                  # nothing kept after the run


def test_context_is_not_reused_for_other_captions_or_sizes_or_after_in_place_change():
    model = tiny_dit()
    x, t, caps = inputs(cap_lens=(7,))
    made = counting_contexts(model)
    with torch.no_grad(), model.reuse_context():
        a = model(x, t, caps)
        model(x, t, caps)
        assert len(made) == 1
        other = [caps[0].clone()]                                   # equal values, another tensor: new context
        model(x, t, other)
        model(torch.randn(1, 16, 10, 6), t, caps)                   # another size
        assert len(made) == 3
        caps[0].mul_(2)                                             # modified in place: not served stale
        b = model(x, t, caps)
    assert len(made) == 4
    assert not torch.equal(a, b)


# ---- fp16 without overflow ------------------------------------------------------------------------------

def overflowing(model: ZImageDiT) -> ZImageDiT:
    """FFN weights 1000x: the gated product reaches ~1e6, past fp16's 65504."""
    for block in [*model.layers, *model.noise_refiner, *model.context_refiner]:
        block.feed_forward.w1.weight.data *= 1000
        block.feed_forward.w3.weight.data *= 1000
    return model


def test_fp16_model_does_not_overflow_where_plain_fp16_does():
    model = overflowing(tiny_dit(seed=3))
    x, t, caps = inputs(cap_lens=(7,))
    with torch.no_grad():
        reference = model(x, t, caps)
        # the chosen weights do overflow fp16: one block run the plain way (fp16 stream) gives inf/NaN
        block: TransformerBlock = model.layers[0]
        h = torch.randn(1, 64, TINY.dim)
        c = torch.randn(1, TINY.adaln_dim)
        rope = model.make_context(caps, (8, 6)).rope
        rope.cos, rope.sin = rope.cos[:, :64], rope.sin[:, :64]
        assert torch.isfinite(block(h, rope, None, c)).all()
        block.half()
        assert not torch.isfinite(block(h.half(), rope, None, c.half())).all(), "weights do not overflow fp16"
        model.half()
        out = model(x, t, caps)
    abs_err, rel = rel_err(out.float(), reference)
    print(f"fp16 model vs fp32: max abs {abs_err:.2e}, rel {rel:.2e}")
    assert torch.isfinite(out).all()
    assert rel <= 5e-3


def test_fp16_linear_is_linear_and_finite():
    lin = nn.Linear(64, 32, bias=False)
    x = torch.randn(5, 64) * 3e4                                   # |x| far past where x @ W overflows fp16
    out = layers.fp16_linear(lin.half(), x)
    ref = x @ lin.weight.float().t()
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert rel_err(out, ref)[1] <= 2e-3
    with pytest.raises(ValueError, match="bias-free"):
        layers.fp16_linear(nn.Linear(4, 4), torch.randn(2, 4))


# ---- fp8 matmul -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_scaled_fp8_linear_is_the_quantised_product(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=False).to(dtype)
    x = torch.randn(3, 10, 64, dtype=dtype)
    fp8 = quant.ScaledFP8Linear(lin, "tensor")                     # the CPU build's _scaled_mm: per tensor
    out = fp8(x)
    q, s = quant.quantize(x.reshape(-1, 64), rowwise=False)
    emulated = ((q.float() * s) @ (fp8.weight.float() * fp8.weight_scale).t()).reshape(3, 10, 48)
    assert out.dtype == dtype and fp8.weight.dtype == quant.FP8
    assert rel_err(out.float(), emulated)[1] <= (1e-6 if dtype == torch.float32 else 2e-2)
    assert rel_err(out.float(), lin(x).float())[1] <= FP8


def test_rowwise_quantisation_is_closer_than_per_tensor():
    """The CUDA path scales per token and per channel; its arithmetic, emulated, beats one scale when rows
    differ in magnitude (as DiT tokens do)."""
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    x = torch.randn(20, 64) * torch.logspace(-2, 2, 20)[:, None]
    ref = x @ w.t()
    errors = {}
    for rowwise in (False, True):
        qx, sx = quant.quantize(x, rowwise)
        qw, sw = quant.quantize(w, rowwise)
        out = (qx.float() * sx) @ (qw.float() * sw).t()
        errors[rowwise] = ((out - ref).abs() / ref.abs().amax(-1, keepdim=True)).max().item()
    assert errors[True] < errors[False]
    assert errors[True] <= FP8


def test_fp8_matmul_dit_close_to_weight_only_fp8_and_sensitive_layers_kept():
    """A whole (random, tiny) DiT in fp8 matmuls lands as near the fp32 result as fp8 weight storage alone
    does (the path users already take); with random weights both are ~0.1 off, so the bound is relative."""
    x, t, caps = inputs(cap_lens=(7, 20))
    model, weight_only = tiny_dit(seed=5), tiny_dit(seed=5)
    with torch.no_grad():
        reference = model(x, t, caps)
        quant.store_blocks_in_fp8(weight_only)
        stored = weight_only(x, t, caps)
        converted = quant.use_fp8_matmul(model, mode="tensor")     # the CPU build's kernel, per tensor
        out = model(x, t, caps)
    assert len(converted) == 5 * (TINY.n_layers + TINY.n_noise_refiner + TINY.n_context_refiner)
    assert isinstance(model.layers[0].attention.qkv, quant.ScaledFP8Linear)
    for kept in (model.x_embedder, model.cap_embedder[1], model.final_layer.linear, model.t_embedder.mlp[0],
                 model.layers[0].adaLN_modulation[0]):
        assert type(kept) is nn.Linear and kept.weight.dtype == torch.float32
    rel, rel_stored = rel_err(out, reference)[1], rel_err(stored, reference)[1]
    print(f"fp8 matmul DiT vs fp32: rel {rel:.2e}; fp8 weight-only: rel {rel_stored:.2e}")
    assert torch.isfinite(out).all()
    assert rel <= 2 * rel_stored and rel <= 0.25


def test_fp8_matmul_falls_back_to_weight_only_without_support(monkeypatch):
    assert quant.scaled_mm_support(torch.device("cpu")) is None        # CPU: weight-only (its kernel is slow)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert quant.scaled_mm_support(torch.device("cuda")) is None        # Ampere: no fp8 units
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert quant.scaled_mm_support(torch.device("cuda")) == "rowwise"
    model = tiny_dit(seed=6)
    assert quant.use_fp8_matmul(model) == []
    assert type(model.layers[0].feed_forward.w1) is quant.CastLinear
    assert model.layers[0].feed_forward.w1.weight.dtype == quant.FP8


# ---- attention kernel choice ----------------------------------------------------------------------------

def test_sdpa_priority_per_device(monkeypatch):
    from torch.nn.attention import SDPBackend
    assert layers.sdpa_priority(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert layers.sdpa_priority(torch.device("cuda"))[:2] == [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert layers.sdpa_priority(torch.device("cuda"))[0] == SDPBackend.FLASH_ATTENTION
    assert SDPBackend.MATH in layers.sdpa_priority(torch.device("cuda"))      # always something that runs


@pytest.mark.parametrize("torch_has", ["set_priority", "no set_priority"])
def test_attention_auto_runs_with_and_without_sdpa_kernels_set_priority(monkeypatch, torch_has):
    """torch < 2.6's sdpa_kernel has no set_priority: asking for it raised TypeError on every CUDA attention call
    in 'auto' mode. The CPU is given a priority list here so the kernel context is really entered; the old
    torch is its real sdpa_kernel behind the old signature."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    monkeypatch.setattr(layers, "sdpa_priority", lambda device: [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
    if torch_has == "no set_priority":
        entered = []

        def sdpa_kernel_before_2_6(backends):
            entered.append(backends)
            return sdpa_kernel(backends)
        monkeypatch.setattr(layers, "sdpa_kernel", sdpa_kernel_before_2_6)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 40, 4, 16, generator=g) for _ in range(3))
    mask = torch.arange(40)[None] < torch.tensor([40, 29])[:, None]
    for key_mask in (None, mask):
        auto = layers.attention(q, k, v, key_mask, backend="auto")
        default = layers.attention(q, k, v, key_mask, backend="default")
        assert rel_err(auto, default)[1] <= EXACT_FP32
    if torch_has == "no set_priority":
        assert len(entered) == 2


def test_scaled_fp8_linear_falls_back_when_the_fp8_product_is_refused(monkeypatch, caplog):
    """A refused _scaled_mm computes the same product from the dequantised weight, logged once per device.
    RuntimeError: the CPU build's real refusal of rowwise scales. ValueError: what torch 2.9 raises for
    _scaled_mm argument errors on CUDA (TORCH_CHECK_VALUE); faked, there is no CUDA here to raise it."""
    monkeypatch.setattr(quant.ScaledFP8Linear, "_refused", set())
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    x = torch.randn(3, 10, 64, dtype=torch.bfloat16)
    rowwise = quant.ScaledFP8Linear(lin, "rowwise")
    with caplog.at_level("WARNING"):
        first, second = rowwise(x), rowwise(x)                      # the CPU refuses rowwise scales for real
    expected = x @ rowwise.dequantized(torch.bfloat16).t()
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert rel_err(first.float(), lin(x).float())[1] <= FP8
    refusals = [r.getMessage() for r in caplog.records if "fp8 matmul refused" in r.getMessage()]
    assert len(refusals) == 1 and "RuntimeError" in refusals[0]

    monkeypatch.setattr(quant.ScaledFP8Linear, "_refused", set())
    per_tensor = quant.ScaledFP8Linear(lin, "tensor")
    works = per_tensor(x)                                           # the CPU's per-tensor kernel runs

    def value_error(*args, **kwargs):
        raise ValueError("scale_b must have 48 elements")
    monkeypatch.setattr(torch, "_scaled_mm", value_error)
    fallback = per_tensor(x)
    assert torch.equal(fallback, x @ per_tensor.dequantized(torch.bfloat16).t())
    assert rel_err(fallback.float(), works.float())[1] <= FP8


def test_fp8_matmul_takes_the_old_tuple_return(monkeypatch):
    """torch < 2.4's _scaled_mm returned (out, amax)."""
    real = torch._scaled_mm
    w, scale = quant.quantize(torch.randn(48, 64), rowwise=False)
    x = torch.randn(5, 64)
    new = quant.fp8_matmul(x, w, scale, rowwise=False)
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: (real(*a, **kw), torch.zeros(())))
    assert torch.equal(quant.fp8_matmul(x, w, scale, rowwise=False), new)


def test_fa3_serves_every_block_when_it_fits(monkeypatch):
    """FlashAttention-3 (a C extension, not on this machine) stood in for by a function of its signature, on a
    CPU told that FA3 fits: every block's attention goes through it, and the output is SDPA's."""
    import sys
    import types
    calls = []

    def flash_attn_func(q, k, v):                    # (B, L, H, D) in and out, as FA3's
        calls.append(q.shape)
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                               v.transpose(1, 2))
        return out.transpose(1, 2), None
    model = configure(tiny_dit(), FAST)
    x, t, caps = inputs(cap_lens=(7,))
    with torch.no_grad():
        sdpa = model(x, t, caps)
        monkeypatch.setitem(sys.modules, "flash_attn_interface", types.SimpleNamespace(flash_attn_func=flash_attn_func))
        monkeypatch.setattr(layers, "use_flash3", lambda q, key_mask: key_mask is None)
        fa3 = model(x, t, caps)
    assert len(calls) == TINY.n_layers + TINY.n_noise_refiner + TINY.n_context_refiner
    assert rel_err(fa3, sdpa)[1] <= EXACT_FP32
