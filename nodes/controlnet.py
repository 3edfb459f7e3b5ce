"""The Fun ControlNet with a schedule, computed as its trainer computed it (nodes/fun_control.py says how that
differs from core's ZImageFunControlnet). Users cut the control early to keep the texture the control otherwise
flattens; core's node has no such inputs. Outside [start, end] the patch leaves the DiT's tokens as they are."""
from __future__ import annotations

from . import comfy_compat
from .core_model import zimage_dit
from .fun_control import ControlInputs, TrainerControlPatch
from .loaders import CATEGORY



class ScheduledPatch:
    """A model patch that runs `patch` only while the step's sigma is within [sigma_end, sigma_start]."""

    def __init__(self, patch, sigma_start: float, sigma_end: float):
        self.patch, self.sigma_start, self.sigma_end = patch, sigma_start, sigma_end

    def active(self, transformer_options: dict) -> bool:
        sigmas = transformer_options.get("sigmas")
        if sigmas is None:                       # not inside a sampler: nothing to schedule against
            return True
        sigma = float(sigmas.reshape(-1)[0])
        return self.sigma_end <= sigma <= self.sigma_start

    def __call__(self, kwargs):
        if self.active(kwargs.get("transformer_options", {})):
            return self.patch(kwargs)
        return {}                                # no "img": the block's output stays as it is

    def to(self, device_or_dtype):               # ComfyUI moves patches with the model
        self.patch = self.patch.to(device_or_dtype)
        return self

    def models(self):                            # ...and loads the ControlNet's weights with it
        return self.patch.models() if hasattr(self.patch, "models") else []


def zimage_control(model_patch):
    """Core's ZImage_Control inside a MODEL_PATCH, or an error saying what came in and what to do."""
    ZImage_Control = comfy_compat.zimage_control_class()
    if ZImage_Control is None:
        raise ValueError("this ComfyUI has no Z-Image Fun ControlNet (core added it after 0.3.75): update ComfyUI")
    control = getattr(model_patch, "model", None)
    if not isinstance(control, ZImage_Control):
        raise ValueError(f"model_patch: a {type(control).__name__} from Load Model Patch is not a Z-Image Fun "
                         "ControlNet: load a Z-Image-Turbo-Fun-Controlnet-Union file (1.0, 2.x or lite)")
    return control


def as_mask(mask):
    """A MASK ([B, H, W] or [H, W], 1 = repaint) as [B, 1, H, W]."""
    return None if mask is None else mask.reshape(-1, 1, *mask.shape[-2:])


class ZImageFunControlnetScheduled:
    DESCRIPTION = ("A Z-Image Fun ControlNet (Union 1.0, 2.0, 2.1 and lite files from models/model_patches, loaded "
                   "with Load Model Patch), computed as its trainer (VideoX-Fun) computed it, and only between "
                   "start_percent and end_percent of the sampling: ending early keeps the composition and frees the "
                   "texture. Unlike core's ZImageFunControlnet, the control also reads the prompt's tokens and acts "
                   "on them, as during training; a missing control or inpaint image counts as empty (zero), not grey.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A Z-Image model."}),
            "model_patch": ("MODEL_PATCH", {"tooltip": "A Z-Image Fun ControlNet (Union 1.0, 2.x, lite), from Load "
                                                       "Model Patch."}),
            "vae": ("VAE", {"tooltip": "The Z-Image VAE: it encodes the control and inpaint images."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "How strongly the control acts (0.6-0.9 is common for Turbo)."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                        "tooltip": "Where in the sampling the control starts (0 = first step)."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "Where it ends (1 = last step); 0.5-0.8 keeps more texture."}),
        }, "optional": {
            "image": ("IMAGE", {"tooltip": "The control image (pose, depth, canny...). Leave empty for inpainting "
                                           "alone (2.x / lite)."}),
            "inpaint_image": ("IMAGE", {"tooltip": "2.x / lite files: the image to keep outside the mask."}),
            "mask": ("MASK", {"tooltip": "2.x / lite files: where to repaint (white = repaint)."}),
        }}

    def apply(self, model, model_patch, vae, strength, start_percent, end_percent, image=None, inpaint_image=None,
              mask=None):
        dit = zimage_dit(model, "Z-Image Fun ControlNet (start/end)")
        if start_percent > end_percent:
            raise ValueError(f"start_percent {start_percent} is after end_percent {end_percent}: set start below end")
        control = zimage_control(model_patch)
        inputs = ControlInputs(vae, image, inpaint_image, as_mask(mask), inpaint_channels=control.additional_in_dim > 0)
        patch = TrainerControlPatch(model_patch, dit.rope_embedder, inputs, strength)
        sampling = model.get_model_object("model_sampling")
        scheduled = ScheduledPatch(patch, sampling.percent_to_sigma(start_percent),
                                   sampling.percent_to_sigma(end_percent))
        patched = model.clone()
        patched.set_model_noise_refiner_patch(scheduled)
        patched.set_model_double_block_patch(scheduled)
        return (patched,)
