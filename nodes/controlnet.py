"""The Fun ControlNet with a schedule: core's ZImageFunControlnet patch, acting only between a start and an end
percent of the sampling. Users cut the control early to keep the texture the control otherwise flattens; core's
node has no such inputs. Core builds the patch (all three layouts it loads: Union 1.0, 2.x, lite; image,
inpaint image, mask); the pack wraps it so that outside the range it leaves the image tokens as they are."""
from __future__ import annotations

from .core_model import zimage_dit
from .loaders import CATEGORY

PATCH_KINDS = ("noise_refiner", "double_block")


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
        if hasattr(self.patch, "temp_data"):     # the control's per-forward state must not outlive the skip
            self.patch.temp_data = None
        return {}                                # no "img": the block's output stays as it is

    def to(self, device_or_dtype):               # ComfyUI moves patches with the model
        self.patch = self.patch.to(device_or_dtype)
        return self

    def models(self):                            # ...and loads the ControlNet's weights with it
        return self.patch.models() if hasattr(self.patch, "models") else []


def core_fun_controlnet():
    try:
        from comfy_extras.nodes_model_patch import ZImageFunControlnet
    except ImportError:
        ZImageFunControlnet = None
    if ZImageFunControlnet is None:
        raise ValueError("this ComfyUI has no Z-Image Fun ControlNet (core added it after 0.3.75): update ComfyUI")
    return ZImageFunControlnet()


def schedule(model, before, sigma_start: float, sigma_end: float):
    """Wrap the Z-Image control patches `model` has and `before` had not (in place; model is a fresh clone)."""
    old = before.model_options.get("transformer_options", {}).get("patches", {})
    patches = model.model_options.get("transformer_options", {}).get("patches", {})
    wrapped = 0
    for kind in PATCH_KINDS:
        existing = [id(p) for p in old.get(kind, [])]
        new_list = []
        for p in patches.get(kind, []):
            if id(p) not in existing:
                p = ScheduledPatch(p, sigma_start, sigma_end)
                wrapped += 1
            new_list.append(p)
        if kind in patches:
            patches[kind] = new_list
    return wrapped


class ZImageFunControlnetScheduled:
    DESCRIPTION = ("Core's Z-Image Fun ControlNet (Union 1.0, 2.x and lite files from models/model_patches, loaded "
                   "with Load Model Patch) applied only between start_percent and end_percent of the sampling: "
                   "ending early keeps the composition and frees the texture.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A Z-Image model."}),
            "model_patch": ("MODEL_PATCH", {"tooltip": "A Z-Image Fun ControlNet, from Load Model Patch."}),
            "vae": ("VAE", {"tooltip": "The Z-Image VAE: it encodes the control image."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "How strongly the control acts (0.6-0.9 is common for Turbo)."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                        "tooltip": "Where in the sampling the control starts (0 = first step)."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "Where it ends (1 = last step); 0.5-0.8 keeps more texture."}),
        }, "optional": {
            "image": ("IMAGE", {"tooltip": "The control image (pose, depth, canny...)."}),
            "inpaint_image": ("IMAGE", {"tooltip": "For the 2.x inpaint layout: the image to keep."}),
            "mask": ("MASK", {"tooltip": "For the 2.x inpaint layout: where to paint."}),
        }}

    def apply(self, model, model_patch, vae, strength, start_percent, end_percent, image=None, inpaint_image=None,
              mask=None):
        zimage_dit(model, "Z-Image Fun ControlNet (start/end)")
        if start_percent > end_percent:
            raise ValueError(f"start_percent {start_percent} is after end_percent {end_percent}: set start below end")
        (patched,) = core_fun_controlnet().diffsynth_controlnet(model, model_patch, vae, image=image, strength=strength,
                                                                inpaint_image=inpaint_image, mask=mask)
        sampling = model.get_model_object("model_sampling")
        if schedule(patched, model, sampling.percent_to_sigma(start_percent), sampling.percent_to_sigma(end_percent)) == 0:
            raise ValueError("model_patch: core added no Z-Image control patch: connect a Z-Image Fun ControlNet")
        return (patched,)
