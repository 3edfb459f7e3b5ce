"""The pack's additions to core's Linear, given to core's model as custom operations (ComfyUI's public
`custom_operations` hook, as ComfyUI-GGUF does): the model stays core's NextDiT, only its Linears' product
changes where core has no equivalent.

- fp8 matmul (weight_dtype fp8_e4m3fn_fast): block weights stored in fp8 are multiplied as fp8 x fp8 with the
  activations scaled per token (quant.fp8_matmul). Core's own fp8_e4m3fn_fast casts activations with a scale
  of 1 and clamps them to +-448; per-token scales keep small and large tokens alike.
- the fp16 guard (GPUs without bf16): weights stored in fp16, the model computing in fp32 (residual stream,
  norms, attention), each Linear's product in fp16 on inputs scaled per row by a power of two, so nothing
  overflows fp16's 65504 into a black image. Core runs Z-Image in fp32 there (twice the weight memory).

Everything else, LoRA patches at cast time and weights streamed by ComfyUI's low-VRAM or dynamic modes
included, goes through core's own cast path (cast_bias_weight) unchanged.
"""
from __future__ import annotations

import logging

import comfy.ops
import torch
from torch import Tensor

from ..zimage_core import quant

log = logging.getLogger("ZImageTurbo")

FP16_INPUT_BOUND = 1.0     # inputs scaled to |x| <= 1 per row: a row's outputs then stay within the weight rows' L1


def fp16_guarded_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """linear(x) in fp32, computed as an fp16 product of x divided per row by a power of two (exact in binary
    floating point) and multiplied back in fp32: linear up to fp16 rounding, and never inf. Per row, so one
    token's large activation does not push the other tokens' values towards fp16's subnormals."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(FP16_INPUT_BOUND)
    s = torch.exp2(torch.ceil(torch.log2(amax / FP16_INPUT_BOUND)))
    out = torch.nn.functional.linear((xf / s).half(), weight.half()).float() * s
    return out if bias is None else out + bias.float()


class PackOps(comfy.ops.manual_cast):
    """core's manual_cast operations, with a Linear that knows the two products above."""

    class Linear(comfy.ops.manual_cast.Linear):
        zimage_fp8_matmul = False          # set on the block Linears when fp8_e4m3fn_fast was asked for
        _fp8_failed = False                # once a GPU refuses the fp8 product, stop asking (logged once)

        def forward_comfy_cast_weights(self, input, *args, **kwargs):
            if self.weight_function or self.bias_function:          # a LoRA at cast time: core's path
                return super().forward_comfy_cast_weights(input, *args, **kwargs)
            mode = self.fp8_matmul_mode(input)
            if mode is not None:
                out = self._fp8_product(input, mode)
                if out is not None:
                    return out
            if self.weight.dtype == torch.float16 and input.dtype == torch.float32:
                return self._fp16_guarded(input)
            return super().forward_comfy_cast_weights(input, *args, **kwargs)

        def fp8_matmul_mode(self, input: Tensor) -> str | None:
            """quant.scaled_mm_support's mode for this call, or None where the cast path must run."""
            w = self.weight
            if (not self.zimage_fp8_matmul or PackOps.Linear._fp8_failed or w is None or w.dtype != quant.FP8
                    or self.bias is not None or input.dtype not in (torch.bfloat16, torch.float16)
                    or w.shape[0] % 16 or w.shape[1] % 16):             # the fp8 GEMM's tile constraint
                return None
            return quant.scaled_mm_support(input.device)

        def _fp8_product(self, input: Tensor, mode: str) -> Tensor | None:
            # the weight as stored (fp8), on the input's device: resident, or streamed by core's cast path
            w, b, stream = cast_weight(self, input, dtype=self.weight.dtype)
            try:
                scale = torch.ones((1, self.out_features) if mode == "rowwise" else (), device=input.device)
                return quant.fp8_matmul(input, w, scale, rowwise=mode == "rowwise")
            except (RuntimeError, ValueError) as e:     # torch raises both for _scaled_mm arguments it refuses
                PackOps.Linear._fp8_failed = True
                log.warning("Z-Image: fp8 matmul failed on %s (%s); using fp8 weights with %s matmuls",
                            input.device, e, input.dtype)
                return None
            finally:
                uncast_weight(self, w, b, stream)

        def _fp16_guarded(self, input: Tensor) -> Tensor:
            w, b, stream = cast_weight(self, input, dtype=torch.float16)
            try:
                return fp16_guarded_linear(input, w, b)
            finally:
                uncast_weight(self, w, b, stream)


def cast_weight(module, input: Tensor, dtype: torch.dtype):
    """core's cast_bias_weight with the weight kept in `dtype` on the input's device: (weight, bias, stream)."""
    bias_dtype = torch.float32 if dtype == torch.float16 else input.dtype
    return comfy.ops.cast_bias_weight(module, input, dtype=dtype, bias_dtype=bias_dtype, offloadable=True)


def uncast_weight(module, weight, bias, stream) -> None:
    comfy.ops.uncast_bias_weight(module, weight, bias, stream)


def fp8_matmul_linears(model: torch.nn.Module) -> list[PackOps.Linear]:
    """Mark the block Linears holding fp8 weights for the fp8 product; returns them."""
    marked = []
    for module in model.modules():
        if isinstance(module, PackOps.Linear) and module.weight is not None and module.weight.dtype == quant.FP8:
            module.zimage_fp8_matmul = True
            marked.append(module)
    return marked
