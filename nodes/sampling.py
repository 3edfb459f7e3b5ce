"""The turbo sampler node: the engine's Euler flow sampler with ComfyUI's seed noise, progress bar and Stop."""
from __future__ import annotations

import time

import comfy.model_management as mm
import comfy.sample
import comfy.utils
import torch

from ..zimage_core.config import SAMPLING
from ..zimage_core.sampling import sample, sigma_schedule
from . import bridge
from .loaders import CATEGORY


def captions(conditioning, batch: int, what: str) -> list[torch.Tensor]:
    if len(conditioning) != 1:
        raise ValueError(f"{what}: the turbo sampler takes one prompt per conditioning, got {len(conditioning)} "
                         f"combined; write them as one prompt, or use core KSampler for combined conditionings")
    cond = conditioning[0][0]                                   # (1, L, D)
    return [cond[0]] * batch


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
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        if cfg != 1.0 and negative is None:
            raise ValueError("cfg above 1 needs a negative conditioning: connect one, or set cfg to 1")
        mm.load_models_gpu([model])
        device = model.load_device
        fmt = model.model.latent_format
        B = latent.shape[0]
        pos = [c.to(device) for c in captions(positive, B, "positive")]
        neg = None if cfg == 1.0 else [c.to(device) for c in captions(negative, B, "negative")]
        start = fmt.process_in(latent).to(device) if denoise < 1.0 else None
        sigmas = sigma_schedule(steps, shift, denoise)
        bar = comfy.utils.ProgressBar(steps)

        def on_step(i, n, x, denoised):
            bar.update_absolute(i, n)
            mm.throw_exception_if_processing_interrupted()      # the Stop button, checked after every step

        with torch.no_grad():
            out = sample(dit.raw, noise.to(device), sigmas, pos, neg, cfg, start, on_step)
        samples = fmt.process_out(out.to(mm.intermediate_device()))
        # what the canvas shows with the result and the save node writes into PNGs: the values actually used
        info = {"seed": seed, "steps": steps, "cfg": cfg, "shift": shift, "denoise": denoise, "batch": B,
                "width": latent.shape[-1] * 8, "height": latent.shape[-2] * 8,
                "seconds": round(time.perf_counter() - started, 3)}
        return {"ui": {"zimage": [info]}, "result": ({"samples": samples},)}
