"""The DiT's fast path: options over the plain path, each tested equal to it (tests/test_fastpath.py).

    fused_norm     torch's rms_norm kernel for every RMSNorm (same fp32 arithmetic, one pass)
    complex_rope   the RoPE rotation as a complex multiply (bit-identical, fewer passes)
    attention      'auto': the best SDPA kernel per device (cuDNN then flash on Hopper, FA3 when installed);
                   'default': torch's own choice
    compile        torch.compile each transformer block (ZImageDiT.blocks). Per block, not the whole model: a
                   whole-model graph would hold the caption's Python-side work (per-caption padding, masks),
                   while a block sees only tensors. Its token count is traced as a symbol (marked dynamic), so
                   neither prompt length nor size compiles a new graph; dynamo treating parameters as inputs,
                   one graph serves all blocks of a kind, and t being a tensor input, every step. Per run
                   instead of per model: `with model.compiled_blocks():` (the ComfyUI compile node)

Reusing the prompt part across steps (context refiner, RoPE tables, masks) is ZImageDiT.reuse_context();
cfg 1 runs one pass and cfg > 1 one batched pass (sampling.predict); fp8 matmul is quant.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .dit import Attention, ZImageDiT
from .layers import ATTENTION_CHOICES, RMSNorm


@dataclass(frozen=True)
class FastPath:
    fused_norm: bool = True
    complex_rope: bool = True
    attention: str = "auto"
    compile: bool = False

    def __post_init__(self):
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got '{self.attention}'")


PLAIN = FastPath(fused_norm=False, complex_rope=False, attention="default", compile=False)
FAST = FastPath()


def configure(model: nn.Module, fast: FastPath = FAST) -> nn.Module:
    """Switch a DiT (or any module holding our RMSNorm / Attention) to `fast`'s options, in place."""
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.fused = fast.fused_norm
        if isinstance(module, Attention):
            module.complex_rope = fast.complex_rope       # traced by torch.compile, the real rotation runs
            module.backend = fast.attention
    if isinstance(model, ZImageDiT):
        model.compiled = fast.compile
    return model
