"""The turbo sampler node: Turbo's exact schedule (shifted flow matching, Euler) run through core ComfyUI's
sampling (comfy.sample.sample_custom), so LoRAs, model patches, wrappers, ControlNets, masks, partial loading
and dynamic VRAM act here exactly as in KSampler; seed noise, progress bar and Stop as ComfyUI makes them."""
from __future__ import annotations

import math
import time

import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import comfy.utils
import torch

from ..zimage_core.config import FLUX_LATENT, SAMPLING
from ..zimage_core.pipeline import check_size
from ..zimage_core.sampling import sigma_schedule
from . import guard, speed
from .loaders import CATEGORY


@torch.no_grad()
def euler_flow(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Euler steps of the flow ODE in core's sampler interface (model returns the denoised latent). The same
    arithmetic as core's `euler` without noise churn, kept here so the schedule and the steps are the pack's."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


def check_numbers(**values: float) -> None:
    """ComfyUI's min/max checks let NaN and inf through (every comparison with NaN is false); they would only
    come out at the end as a black image."""
    for name, v in values.items():
        if not math.isfinite(v):
            raise ValueError(f"{name} is {v}: send a finite number (Turbo's default is {getattr(SAMPLING, name)})")


def check_latent(samples: torch.Tensor) -> tuple[int, int, int]:
    """(batch, width, height) in pixels of a Z-Image latent, or a clear error. Core Empty Latent Image allows
    multiples of 8 and sizes far above what fits, so the size is checked here, before anything is allocated."""
    if samples.ndim != 4:
        raise ValueError(f"latent_image has shape {list(samples.shape)}: the turbo sampler takes an image latent "
                         f"(batch, channels, height/8, width/8); connect Empty Latent Image, Z-Image Turbo Size or "
                         f"Z-Image Turbo VAE Encode")
    B, C, h, w = samples.shape
    if B == 0:
        raise ValueError("latent_image holds 0 images: set batch_size to 1 or more")
    if C != FLUX_LATENT.channels:
        raise ValueError(f"latent_image has {C} channels, Z-Image's (Flux VAE) latent has {FLUX_LATENT.channels}: "
                         f"encode images with the Z-Image VAE, or start from an empty latent")
    d = FLUX_LATENT.downscale
    try:
        check_size(w * d, h * d)
    except ValueError as e:
        raise ValueError(f"latent_image is {w * d}x{h * d} pixels: {e} (set it in Empty Latent Image, or use "
                         f"Z-Image Turbo Size)") from None
    return B, w * d, h * d


def progress(steps: int):
    """core's sample_custom callback: the progress bar, and the Stop button checked after every step."""
    bar = comfy.utils.ProgressBar(steps)

    def on_step(step, x0, x, total):
        bar.update_absolute(step + 1, total)
        mm.throw_exception_if_processing_interrupted()
    return on_step


class ZImageTurboSampler:
    DESCRIPTION = ("Samples Z-Image-Turbo with its distilled schedule: shifted flow matching, Euler, 8 steps, "
                   "cfg 1 (one pass per step). Same seed, same noise as core KSampler.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        d = SAMPLING
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A Z-Image model: from a Z-Image Turbo loader node, core's loaders, "
                                               "or after LoRA, ControlNet and other model patches."}),
                "positive": ("CONDITIONING", {"tooltip": "The prompt, from CLIP Text Encode."}),
                "latent_image": ("LATENT", {"tooltip": "An empty latent (sets size and batch) or an encoded image "
                                                       "for image-to-image with denoise < 1."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "The same seed gives the same image, here and in core KSampler."}),
                "steps": ("INT", {"default": d.steps, "min": d.min_steps, "max": d.max_steps,
                                  "tooltip": "Turbo is distilled for 8; 4-8 is the useful range."}),
                "cfg": ("FLOAT", {"default": d.cfg, "min": 1.0, "max": 10.0, "step": 0.1,
                                  "tooltip": "Keep 1 for Turbo (one pass per step, the negative is unused). Above 1 "
                                             "runs the negative too, twice the time, and burns the image quickly."}),
                "shift": ("FLOAT", {"default": d.shift, "min": 0.1, "max": 20.0, "step": 0.1,
                                    "tooltip": "Time shift of the schedule; 3 is what Turbo was trained with."}),
                "denoise": ("FLOAT", {"default": d.denoise, "min": 0.01, "max": 1.0, "step": 0.01,
                                      "tooltip": "1 for text-to-image; lower keeps more of the input latent."}),
            },
            "optional": {
                "negative": ("CONDITIONING", {"tooltip": "Only used when cfg > 1."}),
            },
        }

    def run(self, model, positive, latent_image, seed, steps, cfg, shift, denoise, negative=None):
        started = time.perf_counter()
        check_numbers(cfg=cfg, shift=shift, denoise=denoise)
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        B, width, height = check_latent(latent)
        if cfg != 1.0 and negative is None:
            raise ValueError("cfg above 1 needs a negative conditioning: connect one, or set cfg to 1")
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        sigmas = sigma_schedule(steps, shift, denoise)
        # at cfg 1 core never evaluates the negative (its cfg-1 shortcut); an empty list stands for it
        samples = guard.run_guarded(
            "sampling", guard.sampler_remedy(width, height, B), comfy.sample.sample_custom,
            model, noise, cfg, comfy.samplers.KSAMPLER(euler_flow), sigmas, positive,
            negative if negative is not None else [], latent, noise_mask=latent_image.get("noise_mask"),
            callback=progress(steps), disable_pbar=True, seed=seed)
        # what the canvas shows with the result and the save node writes into PNGs: the values actually used
        info = {"seed": seed, "steps": steps, "cfg": cfg, "shift": shift, "denoise": denoise, "batch": B,
                "width": width, "height": height,
                "seconds": round(time.perf_counter() - started, 3),
                "compiled": speed.ran_compiled(model)}
        out = latent_image.copy()
        out["samples"] = samples
        out.pop("noise_mask", None)
        out.pop("downscale_ratio_spacial", None)
        return {"ui": {"zimage": [info]}, "result": (out,)}
