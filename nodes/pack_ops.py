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
import weakref

import comfy.ops
import torch
from torch import Tensor

from ..zimage_core import quant
from ..zimage_core.layers import fp16_guarded_linear
from .comfy_compat import CAST_TAKES_COMPUTE_DTYPE, lowvram_patch_converts

log = logging.getLogger("ZImageTurbo")

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

        def weight_scale(self, device: torch.device) -> Tensor | None:
            """The per-tensor scale the stored weight is multiplied by (a scaled fp8 file's), or None."""
            return None

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
                scale = self.weight_scale(input.device)
                scale = torch.ones((), device=input.device) if scale is None else scale
                if mode == "rowwise":                                   # one scale per output row
                    scale = scale.reshape(1, 1).expand(1, self.out_features).contiguous()
                return quant.fp8_matmul(input, w, scale, rowwise=mode == "rowwise")
            except quant.SCALED_MM_ERRORS as e:        # torch raises both for _scaled_mm arguments it refuses
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


class FileScaledFP8Linear(PackOps.Linear):
    """A block Linear of a scaled fp8 file (ComfyUI's `scale_weight`, or `weight_scale` + `comfy_quant`): the fp8
    values as stored, and their per-tensor scale in the `scale_weight` buffer; the weight it stands for is
    weight * scale. Storing the dequantised weight in fp8 again instead drops the scale, and weights smaller
    than fp8's normal range (2^-6) lose most of their bits (tests/test_core_model.py measures both).

    core's LoRA patching sees the real weight through the two hooks it looks up on a layer (get_key_weight):
    convert_weight (stored -> real) and set_weight (real -> stored)."""
    # (the patched Parameter, its scale) after core baked a LoRA in: a LoRA can take the weight past the range
    # of the file's scale, so the patched weight gets a scale of its own. Core restores the weight from its
    # backup (a new Parameter) when the LoRA goes: the file's scale applies again, with nothing to undo here.
    _patched: tuple[weakref.ref, Tensor] | None = None

    def weight_scale(self, device: torch.device) -> Tensor:
        scale = self.scale_weight
        if self._patched is not None and self._patched[0]() is self.weight:
            scale = self._patched[1]
        return scale.to(device=device, dtype=torch.float32, non_blocking=True)

    def forward_comfy_cast_weights(self, input, *args, **kwargs):
        if not (self.weight_function or self.bias_function):
            mode = self.fp8_matmul_mode(input)
            if mode is not None:
                out = self._fp8_product(input, mode)
                if out is not None:
                    return out
            weight_functions = []
        elif lowvram_patch_converts():
            weight_functions = []       # core's cast-time LoRA works in stored units (convert/set_weight below)
        else:
            # core's cast-time LoRA patches the weight as cast, taken as the real one (a newer core dequantises
            # its own quantised weights in the cast): cast without it, scale, then patch
            weight_functions = self.weight_function
        saved = self.weight_function
        if weight_functions:
            self.weight_function = []
        try:
            w, b, stream = comfy.ops.cast_bias_weight(self, input, offloadable=True)
        finally:
            self.weight_function = saved
        try:
            real = w * self.weight_scale(w.device)
            for f in weight_functions:
                real = f(real)
            return torch.nn.functional.linear(input, real, b)
        finally:
            uncast_weight(self, w, b, stream)

    def convert_weight(self, weight: Tensor, inplace: bool = False, **kwargs) -> Tensor:
        scale = self.weight_scale(weight.device)
        return weight.mul_(scale) if inplace else weight.float() * scale

    def set_weight(self, weight: Tensor, inplace_update: bool = False, seed=None, return_weight: bool = False,
                   **kwargs):
        if return_weight:       # a cast-time patch (0.3.75), multiplied by the same scale next: not rounded
            return weight / self.weight_scale(weight.device)
        import comfy.float
        with torch.no_grad():   # ComfyUI patches under inference mode; a script or test calling it may not
            if inplace_update:
                # core's weight hooks copy their backup back into this same Parameter: the scale cannot change
                # (values past its range saturate, as in core's own scaled fp8 Linear)
                scale = self.weight_scale(weight.device)
            else:
                # the file's scale, or a larger one where the LoRA took the weight past its range
                scale = torch.maximum(self.scale_weight.to(weight.device, torch.float32),
                                      weight.abs().amax().float() / quant.FP8_MAX)
            stored = comfy.float.stochastic_rounding(weight.float() / scale, self.weight.dtype, seed=seed or 0)
            if inplace_update:
                self.weight.data.copy_(stored)
                return
        self.weight = torch.nn.Parameter(stored, requires_grad=False)     # core keeps the old one as its backup
        self._patched = (weakref.ref(self.weight), scale.reshape(()))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._patched is not None and self._patched[0]() is self.weight:     # a saved patched model
            destination[prefix + "scale_weight"] = self._patched[1].detach()


def keep_scale(linear: PackOps.Linear, scale: Tensor) -> None:
    """Make a loaded block Linear a FileScaledFP8Linear holding `scale` (a 0-dim fp32 tensor)."""
    linear.__class__ = FileScaledFP8Linear
    linear.register_buffer("scale_weight", scale.reshape(()).float())


def cast_weight(module, input: Tensor, dtype: torch.dtype):
    """core's cast_bias_weight with the weight kept in `dtype` on the input's device: (weight, bias, stream).

    Where core takes a compute dtype (0.30.0+), a LoRA that dynamic VRAM patches in while casting is computed in
    core's LoRA compute dtype and the result cast back to `dtype`, as core's own fp8 Linear asks; without it the
    patch would be summed in fp8."""
    bias_dtype = torch.float32 if dtype == torch.float16 else input.dtype
    extra = {}
    if dtype != input.dtype and CAST_TAKES_COMPUTE_DTYPE:
        import comfy.model_management as mm
        extra = {"compute_dtype": mm.lora_compute_dtype(input.device), "want_requant": True}
    return comfy.ops.cast_bias_weight(module, input, dtype=dtype, bias_dtype=bias_dtype, offloadable=True, **extra)



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
