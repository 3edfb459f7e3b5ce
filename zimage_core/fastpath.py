"""The DiT's fast path: options over the plain path, each tested equal to it (tests/test_fastpath.py).

    fused_norm     torch's rms_norm kernel for every RMSNorm (same fp32 arithmetic, one pass)
    complex_rope   the RoPE rotation as a complex multiply (bit-identical, fewer passes)
    attention      'auto': the best SDPA kernel per device (cuDNN then flash on Hopper, FA3 when installed);
                   'default': torch's own choice

Reusing the prompt part across steps (context refiner, RoPE tables, masks) is ZImageDiT.reuse_context();
cfg 1 runs one pass and cfg > 1 one batched pass (sampling.predict); fp8 matmul is quant.py. torch.compile is
the ComfyUI node's (nodes/speed.py, over core's model), not an option here.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .dit import Attention
from .layers import ATTENTION_CHOICES, RMSNorm


@dataclass(frozen=True)
class FastPath:
    fused_norm: bool = True
    complex_rope: bool = True
    attention: str = "auto"

    def __post_init__(self):
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got '{self.attention}'")


PLAIN = FastPath(fused_norm=False, complex_rope=False, attention="default")
FAST = FastPath()


def configure(model: nn.Module, fast: FastPath = FAST) -> nn.Module:
    """Switch a DiT (or any module holding our RMSNorm / Attention) to `fast`'s options, in place."""
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.fused = fast.fused_norm
        if isinstance(module, Attention):
            module.complex_rope = fast.complex_rope
            module.backend = fast.attention
    return model
