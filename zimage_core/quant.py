"""Weight-only fp8 storage for the DiT's transformer blocks: half the memory of bf16, computed in the
activation dtype. Embedders, norms, adaLN and the final layer stay in full precision (they are small and
the most sensitive to rounding)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FP8 = torch.float8_e4m3fn
BLOCKS = ("layers.", "noise_refiner.", "context_refiner.")
QUANTISED = (".attention.qkv", ".attention.out", ".feed_forward.w1", ".feed_forward.w2", ".feed_forward.w3")


class CastLinear(nn.Linear):
    """A Linear whose weight is stored narrower than it computes: cast to the input's dtype on each call."""

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def store_blocks_in_fp8(model: nn.Module) -> list[nn.Linear]:
    """Store the block attention and FFN Linear weights in fp8; returns those modules.

    Plain nn.Linears become CastLinears. A Linear subclass is left as it is: it must cast by itself (the
    ComfyUI adapter's Linears do, once told to)."""
    done = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith(BLOCKS) and name.endswith(QUANTISED):
            module.weight = nn.Parameter(module.weight.detach().to(FP8), requires_grad=False)
            if type(module) is nn.Linear:
                module.__class__ = CastLinear
            done.append(module)
    return done
