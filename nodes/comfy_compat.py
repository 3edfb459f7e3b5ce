"""The seam with ComfyUI: every place the pack depends on which ComfyUI version runs it, or on something of core's
that core does not publish as a hook. Nothing else in nodes/ probes a version or touches core's private state;
the other modules import public ComfyUI names (model patcher methods, operations, samplers) directly.

Each entry in SEAMS says what it is, which versions behave which way, and when it can go. tests/test_comfy_compat.py
evaluates every probe on each supported ComfyUI (0.30.0, 0.3.75) and fails naming the version when one changes;
upstream-compat.md (../shared/reference) reads them against the newest source.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.quant_ops
import comfy.sd
import comfy.utils
import torch


@dataclass(frozen=True)
class Seam:
    name: str
    kind: str            # "version": a branch between versions; "private": core state core does not publish
    serves: str          # which versions do what
    remove_when: str     # the condition under which the entry can go


SEAMS: list[Seam] = []


def seam(kind: str, serves: str, remove_when: str):
    def register(obj):
        SEAMS.append(Seam(obj.__name__, kind, serves, remove_when))
        return obj
    return register


def comfyui_version() -> str:
    try:
        import comfyui_version as v
        return v.__version__
    except ImportError:
        return "this version"


# ---- version branches ----------------------------------------------------------------------------------------

# 0.3.75's NextDiT has a final RMSNorm no file holds and forward never reads
UNUSED_CORE_KEYS = frozenset({"norm_final.weight"})
SEAMS.append(Seam("UNUSED_CORE_KEYS", "version", "0.3.75 builds an unused norm_final; 0.30.0 does not",
                  "minimum ComfyUI > 0.3.75"))


@seam("version", "0.30.0+ reads the stored dtypes for dynamic VRAM; 0.3.75 has no such function",
      "minimum ComfyUI >= 0.30.0")
def archive_model_dtypes(module: torch.nn.Module) -> None:
    if hasattr(mm, "archive_model_dtypes"):
        mm.archive_model_dtypes(module)


@seam("version", "0.30.0+ has CoreModelPatcher (dynamic VRAM where ComfyUI turned it on); 0.3.75 only ModelPatcher",
      "minimum ComfyUI >= 0.30.0")
def patcher_class(dynamic: bool):
    if not dynamic:
        return comfy.model_patcher.ModelPatcher
    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


@seam("version", "0.30.0+ patchers say whether they are dynamic; 0.3.75's never are", "minimum ComfyUI >= 0.30.0")
def is_dynamic(patcher) -> bool:
    return bool(getattr(patcher, "is_dynamic", lambda: False)())


@seam("private", "0.30.0+ calls a patcher's cached_patcher_init for a non-dynamic copy (core's compile node, hooks, "
      "multi-GPU); 0.3.75 never reads it", "core publishes a way to rebuild a MODEL")
def set_copy_factory(patcher, load, args: tuple) -> None:
    patcher.cached_patcher_init = (load, args)


@seam("version", "0.30.0+ clone takes disable_dynamic (dynamic VRAM cannot trace compiled graphs); 0.3.75's takes "
      "no argument", "minimum ComfyUI >= 0.30.0")
def non_dynamic_clone(model):
    try:
        return model.clone(disable_dynamic=True)
    except TypeError:
        return model.clone()


# 0.30.0+: cast_bias_weight can patch a LoRA in a compute dtype of its own and requantize to the stored one
CAST_TAKES_COMPUTE_DTYPE = "compute_dtype" in inspect.signature(comfy.ops.cast_bias_weight).parameters
SEAMS.append(Seam("CAST_TAKES_COMPUTE_DTYPE", "version", "0.30.0+ cast_bias_weight takes compute_dtype and "
                  "want_requant; 0.3.75's does not", "minimum ComfyUI >= 0.30.0"))

_LOWVRAM_CONVERTS: list[bool] = []


@seam("version", "0.3.75's LowVramPatch runs a layer's convert_weight/set_weight around a cast-time LoRA; 0.30.0's "
      "patches the cast weight as given", "minimum ComfyUI >= 0.30.0")
def lowvram_patch_converts() -> bool:
    """Asked of core's class itself, once, with a convert_weight that doubles and no patches."""
    if not _LOWVRAM_CONVERTS:
        probe = comfy.model_patcher.LowVramPatch("w", {"w": []}, convert_func=lambda w, **_: w * 2, set_func=None)
        _LOWVRAM_CONVERTS.append(bool(probe(torch.ones(1))[0] == 2))
    return _LOWVRAM_CONVERTS[0]


# 0.30.0 reads per-layer quantization declarations (utils.convert_old_quants writes them); 0.3.75 a header
PER_LAYER_QUANT = hasattr(comfy.utils, "convert_old_quants")
SEAMS.append(Seam("PER_LAYER_QUANT", "version", "0.30.0+ reads per-layer .comfy_quant declarations; 0.3.75 reads "
                  "a layer map in the model options", "minimum ComfyUI >= 0.30.0"))


@seam("version", "0.30.0+ registers layouts with get_layout_class (only when comfy_kitchen imported); 0.3.75 "
      "keeps a LAYOUTS dict", "minimum ComfyUI >= 0.30.0")
def computable_quant_formats() -> set[str]:
    """The quantization formats the running ComfyUI computes: in its QUANT_ALGOS, with the layout registered."""
    algos = getattr(comfy.quant_ops, "QUANT_ALGOS", {})
    get_layout = getattr(comfy.quant_ops, "get_layout_class", None)
    layouts = getattr(comfy.quant_ops, "LAYOUTS", None)
    found = set()
    for name, conf in algos.items():
        layout = conf.get("comfy_tensor_layout")
        if get_layout is not None:
            if get_layout(layout) is None:
                continue
        elif layouts is not None and layout not in layouts:
            continue
        found.add(name)
    return found


@seam("private", "0.30.0 sets quant_ops._CK_AVAILABLE when comfy_kitchen failed to import; 0.3.75 has no kitchen",
      "core reports comfy_kitchen's absence itself")
def kitchen_missing() -> bool:
    return not getattr(comfy.quant_ops, "_CK_AVAILABLE", True)


# 0.30.0+ CLIP takes the state dict at construction (it moves the model, which needs the weights there)
CLIP_TAKES_STATE_DICT = "state_dict" in inspect.signature(comfy.sd.CLIP.__init__).parameters
SEAMS.append(Seam("CLIP_TAKES_STATE_DICT", "version", "0.30.0+ CLIP(state_dict=...); 0.3.75 load_sd afterwards",
                  "minimum ComfyUI >= 0.30.0"))


@seam("version", "0.3.76+ has core's Z-Image Fun ControlNet model (comfy.ldm.lumina.controlnet); 0.3.75 has none",
      "minimum ComfyUI > 0.3.75")
def zimage_control_class():
    try:
        from comfy.ldm.lumina.controlnet import ZImage_Control
    except ImportError:
        return None
    return ZImage_Control


@seam("version", "some versions' VAE.decode keeps a frame axis (5-D)",
      "core's decode is 4-D on every supported version")
def decoded_images(images: torch.Tensor) -> torch.Tensor:
    return images.reshape(-1, *images.shape[-3:]) if images.ndim == 5 else images


# ---- private state ---------------------------------------------------------------------------------------------

@seam("private", "BaseModel keeps the device it was built on; the pack builds on meta", "core builds on meta itself")
def forget_build_device(model) -> None:
    model.device = None


@seam("private", "0.30.0's dynamic VRAM makes Linears without weights, flagging a bias to come", "core lists the "
      "tensors a weightless model takes")
def lazy_bias(linear: torch.nn.Module) -> bool:
    return bool(getattr(linear, "comfy_need_lazy_init_bias", False))


@seam("private", "core's operation families are told apart by their Linear class", "core exposes a module's ops")
def ops_family(linear: torch.nn.Module):
    for family in (comfy.ops.manual_cast, comfy.ops.disable_weight_init):
        if type(linear) is family.Linear:
            return family
    return comfy.ops.disable_weight_init


@seam("private", "a ModelSampling node upstream shows as an object patch named model_sampling", "never: stable")
def has_model_sampling_patch(model) -> bool:
    return "model_sampling" in getattr(model, "object_patches", {})


@seam("private", "weight patches (LoRAs) on a ModelPatcher live in its patches dict", "never: stable")
def has_weight_patches(model) -> bool:
    return bool(getattr(model, "patches", None))


@seam("private", "the APPLY_MODEL wrappers a ModelPatcher holds, by key", "core publishes a getter by key")
def wrappers_with_key(model, kind, key: str) -> list:
    return model.wrappers.get(kind, {}).get(key, [])


@seam("private", "a wrapper's executor holds the BaseModel it runs as class_obj", "never: stable")
def executor_model(executor):
    return executor.class_obj


@seam("private", "core's VAE reads latent_channels; a VAE built from a config keeps the default 4", "fixtures at "
      "the released VAE size (issue 22, item 5)")
def set_latent_channels(vae, channels: int) -> None:
    vae.latent_channels = channels


@seam("private", "every core VAE has first_stage_model.decoder, whose output still shows NaN/inf before core clamps",
      "core reports a non-finite decode")
def vae_decoder(vae):
    decoder = getattr(getattr(vae, "first_stage_model", None), "decoder", None)
    return decoder if isinstance(decoder, torch.nn.Module) else None


def probe_report() -> dict:
    """Every version probe's value on the running ComfyUI (for tests/test_comfy_compat.py)."""
    return {"version": comfyui_version(),
            "archive_model_dtypes": hasattr(mm, "archive_model_dtypes"),
            "CoreModelPatcher": hasattr(comfy.model_patcher, "CoreModelPatcher"),
            "CAST_TAKES_COMPUTE_DTYPE": CAST_TAKES_COMPUTE_DTYPE,
            "lowvram_patch_converts": lowvram_patch_converts(),
            "PER_LAYER_QUANT": PER_LAYER_QUANT,
            "CLIP_TAKES_STATE_DICT": CLIP_TAKES_STATE_DICT,
            "zimage_control_class": zimage_control_class() is not None,
            "clone_takes_disable_dynamic": "disable_dynamic" in inspect.signature(
                comfy.model_patcher.ModelPatcher.clone).parameters,
            "computable_quant_formats": sorted(computable_quant_formats()),
            "seams": [s.name for s in SEAMS]}
