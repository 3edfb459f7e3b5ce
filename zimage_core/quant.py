"""Weight-only fp8 storage for the DiT's transformer blocks: half the memory of bf16, computed in the
activation dtype. Embedders, norms, adaLN and the final layer stay in full precision (they are small and
the most sensitive to rounding)."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FP8 = torch.float8_e4m3fn
log = logging.getLogger(__name__)

BLOCKS = ("layers.", "noise_refiner.", "context_refiner.")
QUANTISED = (".attention.qkv", ".attention.out", ".feed_forward.w1", ".feed_forward.w2", ".feed_forward.w3")


class CastLinear(nn.Linear):
    """A Linear whose weight is stored narrower than it computes: cast to the input's dtype on each call."""

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def block_linears(model: nn.Module) -> list[tuple[nn.Module, str, str, nn.Linear]]:
    """The block attention and FFN Linears, as (parent, attribute name, full name, module)."""
    found = []
    for parent_name, parent in model.named_modules():
        for attr, child in parent.named_children():
            name = f"{parent_name}.{attr}" if parent_name else attr
            if isinstance(child, nn.Linear) and name.startswith(BLOCKS) and name.endswith(QUANTISED):
                found.append((parent, attr, name, child))
    return found


def store_blocks_in_fp8(model: nn.Module) -> list[nn.Linear]:
    """Store the block attention and FFN Linear weights in fp8; returns those modules.

    Plain nn.Linears become CastLinears. A Linear subclass is left as it is: it must cast by itself (the
    ComfyUI adapter's Linears do, once told to)."""
    done = []
    for _, _, _, module in block_linears(model):
        module.weight = nn.Parameter(module.weight.detach().to(FP8), requires_grad=False)
        if type(module) is nn.Linear:
            module.__class__ = CastLinear
        done.append(module)
    return done


# ---- fp8 matmul (weights and activations in fp8) --------------------------------------------------------

FP8_MAX = torch.finfo(FP8).max          # 448


def scaled_mm_support(device: torch.device) -> str | None:
    """How torch._scaled_mm can scale on a device, where it is worth using: 'rowwise' (per token and per output
    channel: CUDA Ada and Hopper), or None (weight-only fp8 there). The CPU build has a per-tensor
    _scaled_mm, but a reference one: measured ~5000x slower than the bf16 matmul on this project's Xeon, so it
    is only used by the tests (mode 'tensor'), to check the arithmetic."""
    if device.type == "cuda":
        return "rowwise" if torch.cuda.get_device_capability(device) >= (8, 9) else None
    return None


def quantize(x: Tensor, rowwise: bool) -> tuple[Tensor, Tensor]:
    """fp8 values and their fp32 scale(s), x ~= q * scale: one scale per row, or one for the whole tensor."""
    # |x| and its max are exact in x's own dtype; the one fp32 copy is then divided and clamped in place, so
    # a bf16 activation costs 4 bytes per value on top of itself here, not 12 (the same arithmetic)
    amax = (x.abs().amax(dim=-1, keepdim=True) if rowwise else x.abs().amax()).float()
    scale = amax.clamp_min(1e-12) / FP8_MAX
    return x.to(torch.float32, copy=True).div_(scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_matmul(x: Tensor, weight: Tensor, weight_scale: Tensor, rowwise: bool) -> Tensor:
    """x @ (weight * weight_scale).t() as an fp8 x fp8 product: x is quantised here (per token when rowwise,
    else per tensor), `weight` is fp8 with its fp32 scale ((1, out) rowwise, () per tensor). Output in x's
    dtype, shape (..., out)."""
    rows = x.reshape(-1, x.shape[-1])
    q, scale = quantize(rows, rowwise)
    out = torch._scaled_mm(q, weight.t(), scale_a=scale, scale_b=weight_scale, out_dtype=x.dtype)
    out = out[0] if isinstance(out, tuple) else out          # torch < 2.4 also returned the output's amax
    return out.reshape(*x.shape[:-1], weight.shape[0])


# What a refused fp8 product raises. torch reports most _scaled_mm argument problems (a scale's shape or dtype,
# a layout it has no kernel for) with TORCH_CHECK_VALUE, a ValueError in Python since 2.x, and the rest
# (no kernel for this GPU or build, the CPU's per-tensor-only assert) as RuntimeError. Both mean: compute it
# another way. Callers outside the engine (the ComfyUI adapter) catch the same tuple.
SCALED_MM_ERRORS = (RuntimeError, ValueError)


class ScaledFP8Linear(nn.Module):
    """A bias-free Linear computed as an fp8 x fp8 matmul (fp8_matmul) with fp32 scales, output in the input's
    dtype. The weight is quantised once (per output channel where the device scales rowwise); activations per
    call (per token, or per tensor)."""

    def __init__(self, linear: nn.Linear, mode: str):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("ScaledFP8Linear serves the bias-free block Linears")
        self.in_features, self.out_features, self.mode = linear.in_features, linear.out_features, mode
        weight = linear.weight.detach()
        q, scale = quantize(weight.float() if weight.dtype == FP8 else weight, rowwise=mode == "rowwise")
        self.weight = nn.Parameter(q, requires_grad=False)
        self.register_buffer("weight_scale", scale.reshape(1, -1) if mode == "rowwise" else scale)

    # devices whose _scaled_mm refused a product: they take the dequantised path from then on (logged once)
    _refused: set[torch.device] = set()

    def forward(self, x: Tensor) -> Tensor:
        if x.device not in ScaledFP8Linear._refused:
            try:
                return fp8_matmul(x, self.weight, self.weight_scale, rowwise=self.mode == "rowwise")
            except SCALED_MM_ERRORS as e:
                ScaledFP8Linear._refused.add(x.device)
                log.warning("Z-Image: fp8 matmul refused on %s (%s: %s); multiplying the fp8 weights in %s "
                            "instead", x.device, type(e).__name__, e, x.dtype)
        return F.linear(x, self.dequantized(x.dtype))

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        """The weight the fp8 product stands for (weight * its scale), in `dtype`: the fallback's operand."""
        scale = self.weight_scale.reshape(-1, 1) if self.mode == "rowwise" else self.weight_scale
        return (self.weight.float() * scale).to(dtype)


def use_fp8_matmul(model: nn.Module, mode: str | None = None) -> list[str]:
    """Turn the block attention and FFN Linears into ScaledFP8Linears where the device can (or in `mode`,
    'rowwise' or 'tensor', when given), else store them in fp8 weight-only (store_blocks_in_fp8). Embedders,
    norms, adaLN and the final layer keep their dtype. Returns the names converted to fp8 matmul (empty when
    it fell back)."""
    mode = mode or scaled_mm_support(next(model.parameters()).device)
    if mode is None:
        store_blocks_in_fp8(model)
        return []
    done = []
    for parent, attr, name, linear in block_linears(model):
        setattr(parent, attr, ScaledFP8Linear(linear, mode))
        done.append(name)
    return done
