"""Building blocks shared by the DiT and the text encoder: RMSNorm, SwiGLU, attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """RMSNorm with a learned weight. Statistics in fp32 whatever the activation dtype, so bf16 and fp16
    runs normalise exactly as fp32 does (the official code uses the activation dtype; diffusers fp32)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(dtype)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases; the names are the checkpoint keys."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """Non-causal scaled-dot-product attention.

    q, k, v: (B, L, H, D); key_mask: (B, L) bool, True where a key may be attended (None: all).
    Returns (B, L, H*D).
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))       # (B, H, L, D)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    B, H, L, D = out.shape
    return out.transpose(1, 2).reshape(B, L, H * D)
