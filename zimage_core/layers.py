"""Building blocks shared by the DiT and the text encoder: RMSNorm, SwiGLU, attention."""
from __future__ import annotations

import functools
import importlib.util
import inspect
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel


class RMSNorm(nn.Module):
    """RMSNorm with a learned weight. Statistics in fp32 whatever the activation dtype, so bf16 and fp16
    runs normalise exactly as fp32 does (the official code uses the activation dtype; diffusers fp32).

    `fused` (a fast-path option): the same fp32 arithmetic in fewer passes over the activations (_fast)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.fused = False

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            return self._fast(x)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(dtype)

    def _fast(self, x: Tensor) -> Tensor:
        """The same fp32 arithmetic, bit for bit, in fewer passes. On CUDA torch's rms_norm kernel (given fp32
        tensors: with a bf16 input it falls back to unfused ops). On CPU, where rms_norm is decomposed under
        inference mode anyway, the plain ops reusing one fp32 buffer (measured 25-50% faster per norm)."""
        if x.is_cuda:
            return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)
        xf = x.float() if x.dtype != torch.float32 else x.clone()      # a buffer of our own to work in
        inv = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(self.eps))
        return xf.mul_(inv).mul_(self.weight.float()).to(x.dtype)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases; the names are the checkpoint keys."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def forward_fp16(self, x: Tensor) -> Tensor:
        """fp16 matmuls, fp32 in between and out: the gated product is where fp16 overflows first."""
        return fp16_linear(self.w2, F.silu(fp16_linear(self.w1, x)) * fp16_linear(self.w3, x))


# ---- fp16 without overflow ----------------------------------------------------------------------------

FP16_INPUT_BOUND = 1.0      # inputs scaled to |x| <= 1 per row: a row's outputs then stay within the weight rows' L1


def fp16_input_scale(x: Tensor) -> Tensor:
    """Per row, the power of two s (exact in binary floating point) with |x / s| <= FP16_INPUT_BOUND. Per row, so
    one token's large activation does not push the other tokens' values towards fp16's subnormals. s stays a
    tensor: no device sync."""
    amax = x.abs().amax(dim=-1, keepdim=True).clamp_min(FP16_INPUT_BOUND)
    return torch.exp2(torch.ceil(torch.log2(amax / FP16_INPUT_BOUND)))


def fp16_linear(linear: nn.Module, x: Tensor) -> Tensor:
    """A bias-free linear(x) computed in fp16 without overflow, returned in fp32: the fp16 matmul runs on x / s
    (fp16_input_scale) and its output is multiplied back by s in fp32. The map being linear, this is linear(x) up
    to fp16 rounding, and never inf. The module itself is called, so ComfyUI's Linears still cast or stream
    their weights."""
    if getattr(linear, "bias", None) is not None:
        raise ValueError("fp16_linear serves bias-free Linears (the DiT blocks' attention and FFN)")
    xf = x.float()
    s = fp16_input_scale(xf)
    return linear((xf / s).half()).float() * s


def fp16_guarded_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """fp16_linear's rule on a weight tensor (what ComfyUI's cast path hands the pack's operations), with an
    fp32 bias added after the product."""
    xf = x.float()
    s = fp16_input_scale(xf)
    out = torch.nn.functional.linear((xf / s).half(), weight.half()).float() * s
    return out if bias is None else out + bias.float()


# ---- attention ----------------------------------------------------------------------------------------

ATTENTION_CHOICES = ("default", "auto")
_HAS_FA3 = importlib.util.find_spec("flash_attn_interface") is not None


def sdpa_priority(device: torch.device) -> list[SDPBackend] | None:
    """The SDPA kernels to try first on a device, best first, or None for torch's own order.

    Hopper: cuDNN's fused attention, then flash (FA2). Other GPUs: flash first. A kernel that cannot take the
    inputs (a key mask, an odd dtype) is skipped by torch for the next one, down to the math kernel.
    On CPU torch's own choice (its flash kernel for CPU) is already the best it has."""
    if device.type != "cuda":
        return None
    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if torch.cuda.get_device_capability(device) >= (9, 0):
        order.insert(0, SDPBackend.CUDNN_ATTENTION)
    return order


def use_flash3(q: Tensor, key_mask: Tensor | None) -> bool:
    """FlashAttention-3 (the `flash_attn_interface` package) where it is installed and fits: Hopper, half
    precision, no key mask."""
    return (_HAS_FA3 and key_mask is None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and torch.cuda.get_device_capability(q.device) >= (9, 0))


def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, backend: str = "default") -> Tensor:
    """Non-causal scaled-dot-product attention.

    q, k, v: (B, L, H, D); key_mask: (B, L) bool, True where a key may be attended (None: all).
    backend: 'default' (torch's choice of SDPA kernel) or 'auto' (sdpa_priority, FA3 when installed).
    Returns (B, L, H*D).
    """
    B, L, H, D = q.shape
    if backend == "auto" and use_flash3(q, key_mask):
        import flash_attn_interface
        out = flash_attn_interface.flash_attn_func(q, k, v)          # takes and returns (B, L, H, D)
        out = out[0] if isinstance(out, tuple) else out
        return out.reshape(B, L, H * D)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))       # (B, H, L, D)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    order = sdpa_priority(q.device) if backend == "auto" else None
    with kernel_order(order) if order else nullcontext():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(B, L, H * D)


def kernel_order(order: list[SDPBackend]):
    """sdpa_kernel trying `order` first to last. Its set_priority argument arrived in torch 2.6: before it,
    the context can only restrict torch to these kernels (each still tried, in torch's own order), which
    still keeps every one of them and the math kernel as the last resort."""
    if _takes_priority(sdpa_kernel):
        return sdpa_kernel(order, set_priority=True)
    return sdpa_kernel(order)


@functools.lru_cache(maxsize=None)
def _takes_priority(context) -> bool:
    # asked of the function itself, not of torch's version string: nightlies and vendor builds carry odd ones
    try:
        return "set_priority" in inspect.signature(context).parameters
    except (TypeError, ValueError):               # no signature to read: assume the old one, which always works
        return False
