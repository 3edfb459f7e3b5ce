"""The Z-Image LoRA loader: LoRA files from every trainer (ComfyUI, ai-toolkit, diffusers/PEFT, DiffSynth,
LyCORIS, musubi-tuner native with split q/k/v, the `lora_unet__` variant), rewritten into ComfyUI's own LoRA
keys (zimage_core.lora) and applied by core's LoRA loading, so strength, stacking with core's LoRA loaders,
offloading and dynamic VRAM all work as for any LoRA. Keys that patch nothing are never silently dropped: the
node names them on the canvas and in the console; a file that patches nothing at all is an error."""
from __future__ import annotations

import logging
from pathlib import Path

import comfy.sd
import comfy.utils
import folder_paths
import torch

from ..zimage_core.lora import normalise
from .core_model import zimage_dit
from .loaders import CATEGORY

log = logging.getLogger("ZImageTurbo")
SHOWN = 5                   # ignored keys named in a warning; the count says how many more


def dit_linears(model) -> dict[str, int]:
    """The Z-Image DiT's Linear modules and their output rows; a clear error for a MODEL of another kind."""
    dit = zimage_dit(model, "Z-Image LoRA Loader")
    return {name: m.out_features for name, m in dit.named_modules() if is_linear(m)}


def is_linear(module: torch.nn.Module) -> bool:
    """A Linear as core's LoRA patching sees one: torch's, or any module with a 2-D weight and in/out widths (core's
    mixed-precision Linear of a quantized file is a plain Module holding a QuantizedTensor; under dynamic VRAM a
    weight may not be loaded yet)."""
    if isinstance(module, torch.nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return (hasattr(module, "in_features") and hasattr(module, "out_features")
            and (weight is None or getattr(weight, "ndim", 0) == 2))


class ZImageLoraLoader:
    DESCRIPTION = ("Applies a Z-Image LoRA from any trainer: ComfyUI, ai-toolkit, diffusers/PEFT, DiffSynth, LyCORIS, "
                   "musubi-tuner (native, split q/k/v) and their variants, through ComfyUI's own LoRA patching. "
                   "Keys that match nothing in the model are listed on the node instead of being dropped silently.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A Z-Image model, from a loader or another LoRA loader."}),
            "lora_name": (folder_paths.get_filename_list("loras"),
                          {"tooltip": "A Z-Image LoRA (.safetensors) in models/loras, from any trainer."}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -20.0, "max": 20.0, "step": 0.01,
                                         "tooltip": "How strongly the LoRA acts; 0 leaves the model as it is."}),
        }}

    def load(self, model, lora_name, strength_model):
        linears = dit_linears(model)
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        if Path(path).suffix.lower() != ".safetensors":
            raise ValueError(f"lora_name: {lora_name} is not a .safetensors file; only safetensors are loaded "
                             f"(other formats can run code when opened): convert it, or get the .safetensors")
        converted = normalise(comfy.utils.load_torch_file(path, safe_load=True), linears, linears)
        ignored = converted.unmatched + converted.unsupported
        if not converted.modules:
            raise ValueError(f"lora_name: {lora_name} patches nothing in this Z-Image model: none of its "
                             f"{len(ignored)} keys names a Z-Image layer (first: {', '.join(ignored[:3])}). It is a "
                             f"LoRA for another model, or a kind this loader does not read (LoHa, LoKr)")
        info = {"lora": lora_name, "patched": len(converted.modules), "ignored": len(ignored),
                "ignored_first": ignored[:SHOWN]}
        if ignored:
            log.warning("Z-Image LoRA %s: %d keys match nothing in the model and are not applied: %s%s", lora_name,
                        len(ignored), ", ".join(ignored[:SHOWN]), " ..." if len(ignored) > SHOWN else "")
        if strength_model == 0:
            return {"ui": {"zimage_lora": [info]}, "result": (model,)}
        patched, _ = comfy.sd.load_lora_for_models(model, None, converted.state_dict, strength_model, 0)
        return {"ui": {"zimage_lora": [info]}, "result": (patched,)}
