"""The turbo sampler node: the engine's Euler flow sampler with ComfyUI's seed noise, progress bar and Stop."""
from __future__ import annotations

import math
import time

import comfy.model_management as mm
import comfy.sample
import comfy.utils
import torch

from ..zimage_core.config import FLUX_LATENT, SAMPLING
from ..zimage_core.pipeline import check_size
from ..zimage_core.sampling import sample, sigma_schedule
from . import bridge, guard, speed
from .loaders import CATEGORY


def captions(conditioning, batch: int, what: str) -> list[torch.Tensor]:
    if len(conditioning) != 1:
        raise ValueError(f"{what}: the turbo sampler takes one prompt per conditioning, got {len(conditioning)} "
                         f"combined; write them as one prompt, or use core KSampler for combined conditionings")
    cond = conditioning[0][0]                                   # (1, L, D)
    return [cond[0]] * batch


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


def memory_to_keep(model, latent_shape, cfg: float) -> dict:
    """What to ask ComfyUI to keep free for sampling, as core's samplers ask: the model's estimate for the batch
    one forward runs (doubled when cfg > 1 batches cond and uncond), and for the plain batch as the least that
    must fit (below it ComfyUI loads the weights partially). Without it ComfyUI keeps only its fixed ~1 GB,
    short of what 2048² or a batch of 4 needs on a full GPU."""
    batch = latent_shape[0] * (2 if cfg != 1.0 else 1)
    return {"memory_required": model.model.memory_required([batch, *latent_shape[1:]]),
            "minimum_memory_required": model.model.memory_required(list(latent_shape))}


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
                "model": ("MODEL", {"tooltip": "From a Z-Image Turbo loader node."}),
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
        dit = bridge.engine_dit(model)
        check_numbers(cfg=cfg, shift=shift, denoise=denoise)
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        B, width, height = check_latent(latent)
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        if cfg != 1.0 and negative is None:
            raise ValueError("cfg above 1 needs a negative conditioning: connect one, or set cfg to 1")
        mm.load_models_gpu([model], **memory_to_keep(model, latent.shape, cfg))
        device = model.load_device
        fmt = model.model.latent_format
        pos = [c.to(device) for c in captions(positive, B, "positive")]
        neg = None if cfg == 1.0 else [c.to(device) for c in captions(negative, B, "negative")]
        start = fmt.process_in(latent).to(device) if denoise < 1.0 else None
        sigmas = sigma_schedule(steps, shift, denoise)
        bar = comfy.utils.ProgressBar(steps)

        def on_step(i, n, x, denoised):
            bar.update_absolute(i, n)
            mm.throw_exception_if_processing_interrupted()      # the Stop button, checked after every step

        with torch.no_grad(), dit.compiled_blocks(speed.wants_compiled(model)):
            out = guard.run_guarded("sampling", guard.sampler_remedy(width, height, B),
                                    sample, dit.raw, noise.to(device), sigmas, pos, neg, cfg, start, on_step)
        samples = fmt.process_out(out.to(mm.intermediate_device()))
        # what the canvas shows with the result and the save node writes into PNGs: the values actually used
        info = {"seed": seed, "steps": steps, "cfg": cfg, "shift": shift, "denoise": denoise, "batch": B,
                "width": width, "height": height,
                "seconds": round(time.perf_counter() - started, 3),
                "compiled": speed.wants_compiled(model) and not dit.compile_failed}
        return {"ui": {"zimage": [info]}, "result": ({"samples": samples},)}
