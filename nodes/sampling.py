"""The Z-Image sampler node: Z-Image's schedule (shifted flow matching, Euler) run through core ComfyUI's
sampling (comfy.sample.sample_custom), so LoRAs, model patches, wrappers, ControlNets, masks, partial loading
and dynamic VRAM act here exactly as in KSampler; seed noise, progress bar and Stop as ComfyUI makes them.

Any other sampler and scheduler from ComfyUI's lists (the official templates use res_multistep) runs as core's
KSampler runs it on the model with ModelSamplingAuraFlow at the sampler's shift: core's sampler object and
core's sigmas; the pack adds its checks, CFG options and progress to it.

Turbo (distilled: 8 steps, cfg 1) and Base (50 steps, real CFG with a negative) share the architecture and the
schedule; the `variant` input only picks the defaults the canvas applies and the warnings. Base's CFG options
(diffusers' cfg_normalization and cfg_truncation) are two of core's public model hooks, set on a clone."""
from __future__ import annotations

import logging
import math
import time

import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import comfy.utils
import torch

from ..zimage_core.config import FLUX_LATENT, SAMPLING, check_size
from ..zimage_core.sampling import sigma_schedule
from . import comfy_compat, guard, speed
from .core_model import zimage_dit
from .loaders import CATEGORY


@torch.no_grad()
def euler_flow(model, x, sigmas, extra_args=None, callback=None, disable=None, truncation=None):
    """Euler steps of the flow ODE in core's sampler interface (model returns the denoised latent). The same
    arithmetic as core's `euler` without noise churn, kept here so the schedule and the steps are the pack's.
    truncation: the run's Truncation, told which step each model call is for."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        if truncation is not None:
            truncation.step = i
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
        raise ValueError(f"latent_image has shape {list(samples.shape)}: the Z-Image sampler takes an image latent "
                         f"(batch, channels, height/8, width/8); connect Empty Latent Image, Z-Image Size or "
                         f"Z-Image VAE Encode")
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
                         f"Z-Image Size)") from None
    return B, w * d, h * d


# The presets the canvas applies when `variant` changes (js/zimage_turbo.js holds the same table).
VARIANTS = {"turbo": {"steps": 8, "cfg": 1.0}, "base": {"steps": 50, "cfg": 4.0}}
log = logging.getLogger("ZImageTurbo")             # one logger for the pack, as the other nodes use


def variant_warnings(variant: str, steps: int, cfg: float, has_lora: bool) -> list[str]:
    """The two settings that give a bad image without any error: Turbo with CFG (it is distilled for cfg 1),
    Base at Turbo's step count (its sampling is not distilled; the Fun distill LoRA is what makes 8 steps work,
    and any LoRA on the model is taken for it, since a file carries no tag saying what it is)."""
    found = []
    if variant == "turbo" and cfg > 1.0:
        found.append(f"Turbo is distilled for cfg 1: cfg {cfg:g} runs the negative too (twice the time) and burns "
                     f"the image; set cfg 1, or variant base if the model is Z-Image Base")
    if variant == "base" and steps <= 8 and not has_lora:
        found.append(f"Z-Image Base at {steps} steps gives an unfinished image: use 30-50 steps (the base preset "
                     f"is 50, cfg 4), or load the Fun distill LoRA for 8 steps at cfg 1")
    return found


def t_norm(sigma: torch.Tensor) -> float:
    """diffusers' normalised time of a step, (1000 - t) / 1000 with t = sigma * 1000 in float32 (0 at the start,
    1 at the end), computed the same way so that a cfg_truncation on a step boundary cuts the same steps.
    sigma: one of the schedule's, on the host (a GPU tensor would be read back: a device sync)."""
    t = sigma.detach().reshape(-1)[0].float() * 1000
    return ((1000 - t) / 1000).item()


class Truncation:
    """diffusers' cfg_truncation for one run: which steps go without CFG, decided once from the schedule the
    sampler node holds on the host. euler_flow sets `step` before each model call, so the guidance functions
    look the answer up instead of reading the step's sigma back from the GPU (a device sync every step)."""

    def __init__(self, sigmas: torch.Tensor, truncation: float):
        self.skip = [truncation < 1.0 and t_norm(sigma) > truncation for sigma in sigmas[:-1].cpu()]
        self.step = 0

    def __call__(self) -> bool:
        return self.skip[self.step]


def diffusers_cfg(normalization: float, truncated: Truncation):
    """(sampler_cfg_function, sampler_calc_cond_batch_function) doing diffusers' ZImagePipeline guidance:
    pred = pos + g * (pos - neg) with g = cfg - 1; with normalization k > 0 the prediction's norm (per image) is
    capped at k times the positive's; no guidance at all on steps whose t_norm exceeds the truncation.

    core hands the CFG function `cond` and `uncond` as x - denoised, i.e. sigma times the flow velocity: the same
    image-wide factor on both, so the norm ratio diffusers tests on the velocity is the same number here."""
    def cfg_function(args):
        cond, uncond = args["cond"], args["uncond"]
        if truncated():
            return cond
        pred = cond + (args["cond_scale"] - 1.0) * (cond - uncond)
        if normalization > 0.0:
            dims = tuple(range(1, pred.ndim))
            cap = torch.linalg.vector_norm(cond, dim=dims, keepdim=True) * normalization
            norm = torch.linalg.vector_norm(pred, dim=dims, keepdim=True)
            pred = torch.where(norm > cap, pred * (cap / norm), pred)
        return pred

    def calc_cond_batch(args):
        # a truncated step runs the positive alone, as diffusers does: no second pass to throw away
        conds = args["conds"]
        if conds[1] is not None and truncated():
            out = comfy.samplers.calc_cond_batch(args["model"], [conds[0]], args["input"], args["sigma"],
                                                 args["model_options"])
            return [out[0], out[0]]
        return comfy.samplers.calc_cond_batch(args["model"], conds, args["input"], args["sigma"],
                                              args["model_options"])
    return cfg_function, calc_cond_batch


def with_guidance(model, cfg: float, normalization: float, truncation: float, sigmas: torch.Tensor):
    """(the model to sample, the run's Truncation or None): the model itself when core's own CFG is already
    diffusers' (cfg 1, or neither option set), else a clone carrying the two hooks (the input model, shared with
    other nodes, is left as it was). sigmas: the run's schedule, which the truncation is decided on."""
    if cfg == 1.0 or (normalization <= 0.0 and truncation >= 1.0):
        return model, None
    taken = [k for k in ("sampler_cfg_function", "sampler_calc_cond_batch_function") if k in model.model_options]
    if taken:
        raise ValueError(f"the model already carries a {taken[0]} from another node (e.g. RenormCFG or Skip Layer "
                         f"Guidance): set cfg_normalization 0 and cfg_truncation 1 here, or remove that node")
    truncated = Truncation(sigmas, truncation)
    cfg_function, calc_cond_batch = diffusers_cfg(normalization, truncated)
    model = model.clone()
    model.set_model_sampler_cfg_function(cfg_function)
    model.set_model_sampler_calc_cond_batch_function(calc_cond_batch)
    return model, truncated


def check_model_shift(model, shift: float) -> None:
    """The schedule is the sampler's (its shift input). A ModelSampling node upstream (ModelSamplingAuraFlow,
    ModelSamplingSD3) sets the model's own shift, which KSampler would use: a different value is an error, not
    silently overruled."""
    if not comfy_compat.has_model_sampling_patch(model):
        return
    model_shift = getattr(model.get_model_object("model_sampling"), "shift", None)
    if model_shift is not None and not math.isclose(float(model_shift), shift, rel_tol=1e-6):
        raise ValueError(f"shift is {shift}, but a ModelSampling node upstream (e.g. ModelSamplingAuraFlow) set the "
                         f"model's shift to {float(model_shift):g}: set the sampler's shift to {float(model_shift):g}, "
                         f"or remove that node")


def progress(steps: int, truncation: Truncation | None = None):
    """core's sample_custom callback: the progress bar, and the Stop button checked after every step. With core's
    samplers (which may call the model more than once a step) it also tells the truncation the next step."""
    bar = comfy.utils.ProgressBar(steps)

    def on_step(step, x0, x, total):
        bar.update_absolute(step + 1, total)
        if truncation is not None:
            truncation.step = min(step + 1, len(truncation.skip) - 1)
        mm.throw_exception_if_processing_interrupted()
    return on_step


# The pack's own Euler on its own schedule: what the sampler ran before it took a sampler name (the same picture
# as core's euler + simple within rounding; kept exactly, so saved workflows give the same bits).
PACK_EULER = ("euler", "simple")


def core_sampling(model, sampler_name: str, scheduler: str, steps: int, shift: float, denoise: float):
    """(the model with its sampling at `shift`, core's sampler object, core's sigmas), as core's KSampler makes
    them after ModelSamplingAuraFlow(shift): the model's flow sampling set to the shift (unless a node upstream
    already did, checked equal), the sigmas from core's scheduler with KSampler's denoise rule."""
    current = getattr(model.get_model_object("model_sampling"), "shift", None)
    if current is None or not math.isclose(float(current), shift, rel_tol=1e-6):
        from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow
        model = ModelSamplingAuraFlow().patch_aura(model, shift)[0]
    sigmas = comfy.samplers.KSampler(model, steps, "cpu", sampler_name, scheduler, denoise).sigmas
    return model, comfy.samplers.sampler_object(sampler_name), sigmas


class ZImageTurboSampler:
    DESCRIPTION = ("Samples Z-Image (Turbo or Base) with its schedule: shifted flow matching, Euler. Turbo: 8 steps, "
                   "cfg 1 (one pass per step). Base: 50 steps, cfg 4 with a negative (both passes batched), with "
                   "diffusers' cfg_normalization and cfg_truncation. Same seed, same noise as core KSampler.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        d = SAMPLING
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A Z-Image model (Turbo or Base): from a Z-Image loader node, "
                                               "core's loaders, or after LoRA, ControlNet and other model patches."}),
                "positive": ("CONDITIONING", {"tooltip": "The prompt, from CLIP Text Encode."}),
                "latent_image": ("LATENT", {"tooltip": "An empty latent (sets size and batch) or an encoded image "
                                                       "for image-to-image with denoise < 1."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "The same seed gives the same image, here and in core KSampler."}),
                "steps": ("INT", {"default": d.steps, "min": d.min_steps, "max": d.max_steps,
                                  "tooltip": "Turbo is distilled for 8 (4-8 is the useful range); Base wants 30-50, "
                                             "or 8 with the Fun distill LoRA."}),
                "cfg": ("FLOAT", {"default": d.cfg, "min": 1.0, "max": 10.0, "step": 0.1,
                                  "tooltip": "Turbo: keep 1 (one pass per step, the negative is unused). Base: 3-5 "
                                             "with a negative (runs both, batched). diffusers' guidance_scale g is "
                                             "cfg g + 1 here."}),
                "shift": ("FLOAT", {"default": d.shift, "min": 0.1, "max": 20.0, "step": 0.1,
                                    "tooltip": "Time shift of the schedule; 3 is what Z-Image was trained with."}),
                "denoise": ("FLOAT", {"default": d.denoise, "min": 0.01, "max": 1.0, "step": 0.01,
                                      "tooltip": "1 for text-to-image; lower keeps more of the input latent."}),
            },
            "optional": {
                "negative": ("CONDITIONING", {"tooltip": "Only used when cfg > 1."}),
                # appended after `negative`, optional with defaults that change nothing: saved workflows and
                # API prompts without them run as before
                "variant": (list(VARIANTS), {"default": "turbo",
                                             "tooltip": "Which Z-Image the model is (the files carry no tag): on "
                                                        "the canvas, picking one sets steps and cfg (turbo: 8 "
                                                        "steps, cfg 1; base: 50 steps, cfg 4). Used only for "
                                                        "those defaults and the warnings."}),
                "cfg_normalization": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.05,
                                                "tooltip": "diffusers' cfg_normalization: above 0, the guided "
                                                           "prediction's norm is capped at this multiple of the "
                                                           "positive's (diffusers' True is 1). 0: off. Only with "
                                                           "cfg > 1."}),
                "cfg_truncation": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05,
                                             "tooltip": "diffusers' cfg_truncation: steps whose normalised time "
                                                        "(1 - sigma) is above this run without CFG (positive "
                                                        "only, one pass). 1: CFG on every step."}),
                "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {
                    "default": PACK_EULER[0],
                    "tooltip": "ComfyUI's samplers. euler with simple is Z-Image's own (as diffusers samples it); "
                               "ComfyUI's official Z-Image templates use res_multistep. Any choice gives the same "
                               "picture as KSampler with ModelSamplingAuraFlow at this shift, same seed."}),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {
                    "default": PACK_EULER[1],
                    "tooltip": "ComfyUI's schedulers; simple is Z-Image's shifted schedule (the templates use it)."}),
            },
        }

    def run(self, model, positive, latent_image, seed, steps, cfg, shift, denoise, negative=None, variant="turbo",
            cfg_normalization=0.0, cfg_truncation=1.0, sampler_name=PACK_EULER[0], scheduler=PACK_EULER[1]):
        started = time.perf_counter()
        zimage_dit(model, "Z-Image Sampler")     # another model would run with Z-Image's schedule, wrongly
        check_numbers(cfg=cfg, shift=shift, denoise=denoise)
        for name, value in (("cfg_normalization", cfg_normalization), ("cfg_truncation", cfg_truncation)):
            if not math.isfinite(value):
                raise ValueError(f"{name} is {value}: send a finite number (0 and 1 turn the two options off)")
        if variant not in VARIANTS:
            raise ValueError(f"variant is {variant!r}: send one of {', '.join(VARIANTS)}")
        for name, value, known in (("sampler_name", sampler_name, comfy.samplers.KSampler.SAMPLERS),
                                   ("scheduler", scheduler, comfy.samplers.KSampler.SCHEDULERS)):
            if value not in known:
                raise ValueError(f"{name} is {value!r}: send one of ComfyUI's ({', '.join(known)})")
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        B, width, height = check_latent(latent)
        if cfg != 1.0 and negative is None:
            raise ValueError("cfg above 1 needs a negative conditioning: connect one, or set cfg to 1")
        warnings = variant_warnings(variant, steps, cfg, has_lora=comfy_compat.has_weight_patches(model))
        for text in warnings:
            log.warning("Z-Image sampler: %s", text)
        check_model_shift(model, shift)
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        pack_euler = (sampler_name, scheduler) == PACK_EULER
        if pack_euler:
            sigmas = sigma_schedule(steps, shift, denoise)
        else:
            model, sampler, sigmas = core_sampling(model, sampler_name, scheduler, steps, shift, denoise)
        model, truncation = with_guidance(model, cfg, cfg_normalization, cfg_truncation, sigmas)
        if pack_euler:
            sampler = comfy.samplers.KSAMPLER(euler_flow, extra_options={"truncation": truncation})
        # at cfg 1 core never evaluates the negative (its cfg-1 shortcut); an empty list stands for it
        samples = guard.run_guarded(
            "sampling", guard.sampler_remedy(width, height, B), comfy.sample.sample_custom,
            model, noise, cfg, sampler, sigmas, positive,
            negative if negative is not None else [], latent, noise_mask=latent_image.get("noise_mask"),
            callback=progress(steps, None if pack_euler else truncation), disable_pbar=True, seed=seed)
        # what the canvas shows with the result and the save node writes into PNGs: the values actually used
        info = {"seed": seed, "steps": steps, "cfg": cfg, "shift": shift, "denoise": denoise, "batch": B,
                "variant": variant, "cfg_normalization": cfg_normalization, "cfg_truncation": cfg_truncation,
                "sampler_name": sampler_name, "scheduler": scheduler,
                "warnings": warnings,
                "width": width, "height": height,
                "seconds": round(time.perf_counter() - started, 3),
                "compiled": speed.ran_compiled(model)}
        out = latent_image.copy()
        out["samples"] = samples
        out.pop("noise_mask", None)
        out.pop("downscale_ratio_spacial", None)
        return {"ui": {"zimage": [info]}, "result": (out,)}
