"""Quantized files (int8 ConvRot, fp8_mixed, NVFP4, MXFP8) handed to core's own mixed-precision operations, as
core's loaders hand them: the layers' formats become core's `QuantizedTensor`s, so core's int8 / fp8 / fp4
kernels (or their dequantizing fallbacks) compute them, and the pack never computes with a value it does not
understand.

The two ComfyUI versions the pack runs on take the declaration differently, and this module is the one place
that knows how:
- 0.30.0 and newer: per-layer `<layer>.comfy_quant` tensors in the state dict, and a model config whose
  `quant_config` is set (core's `pick_operations` then builds `mixed_precision_ops`); the text encoder gets
  `model_options["quantization_metadata"]` as core's `llama_detect` gives it.
- 0.3.75: the header form only, `{"layers": {...}}`: `layer_quant_config` on the model config, the JSON string
  for the text encoder; it knows float8_e4m3fn and nothing else.
A format the running ComfyUI cannot compute is refused by name, with the file and what to do.
"""
from __future__ import annotations

import json

import comfy.quant_ops
import torch

from ..zimage_core.errors import UnsupportedFile
from ..zimage_core.formats import LAYER_KEY, Quantization

from .comfy_compat import CLIP_TAKES_STATE_DICT, comfyui_version, computable_quant_formats, kitchen_missing
from .comfy_compat import PER_LAYER_QUANT as PER_LAYER


def check_computable(q: Quantization, file: str, plain_file: str) -> None:
    """Every format the file declares is one this ComfyUI computes, or an error naming it and what to do.
    plain_file: the released full-precision file of the same part, to name as the alternative."""
    missing = sorted(f for f in q.formats() if f not in computable_quant_formats())
    if not missing:
        return
    names = ", ".join(q.label(f) for f in missing)
    kitchen = " (ComfyUI could not import comfy_kitchen: install ComfyUI's requirements)" if kitchen_missing() else ""
    raise UnsupportedFile(f"{file} is quantized as {names}, which ComfyUI {comfyui_version()} cannot compute"
                          f"{kitchen}. Update ComfyUI (0.30 or newer reads int8 ConvRot, NVFP4 and MXFP8), or use "
                          f"the bf16 file ({plain_file})")


def configure_model(model_config, q: Quantization) -> None:
    """Make core's model config pick its mixed-precision operations for this file."""
    if PER_LAYER:
        model_config.quant_config = {"mixed_ops": True}
    else:
        model_config.layer_quant_config = {layer: dict(conf) for layer, conf in q.layers.items()}


def clip_options(q: Quantization) -> dict:
    """The text encoder's model_options entry that makes core's SDClipModel build mixed-precision operations."""
    if PER_LAYER:
        return {"quantization_metadata": {"mixed_ops": True}}
    return {"quantization_metadata": json.dumps({"layers": q.layers})}


def declarations(q: Quantization) -> dict[str, torch.Tensor]:
    """The per-layer `.comfy_quant` tensors core 0.30.0 reads beside each weight (also for a file that declares
    its layers in the header, as core's convert_old_quants writes them); 0.3.75 reads none."""
    if not PER_LAYER:
        return {}
    return {f"{layer}{LAYER_KEY}": torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)
            for layer, conf in q.layers.items()}


def stored_tensors(q: Quantization, keys, read_many) -> dict[str, torch.Tensor]:
    """The file's tensors as core's loader gets them: weights and scales as stored, declarations in the form the
    running ComfyUI reads. keys: the file's keys the model takes; read_many(keys): the file's tensors."""
    sd = read_many([k for k in keys if not k.endswith(LAYER_KEY)])
    sd.update(declarations(q))
    return sd


def build_clip(target, n_params: int, options: dict, sd: dict):
    """core's CLIP holding a quantized text encoder: 0.30.0 takes the state dict at construction (before it moves
    the model, which needs the weights there); 0.3.75 loads it afterwards."""
    import comfy.sd
    if CLIP_TAKES_STATE_DICT:
        return comfy.sd.CLIP(target=target, parameters=n_params, model_options=options, state_dict=[sd])
    clip = comfy.sd.CLIP(target=target, parameters=n_params, model_options=options)
    clip.load_sd(sd)
    return clip


def is_quantized_weight(t) -> bool:
    return isinstance(t, comfy.quant_ops.QuantizedTensor)
