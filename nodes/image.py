"""Size and VAE nodes: presets that fit the model, and decoding that never saves a silent black image."""
from __future__ import annotations

from contextlib import contextmanager

import comfy.model_management as mm
import torch

from ..zimage_core.config import FLUX_LATENT, MAX_SIDE, check_size
from . import comfy_compat, guard
from .loaders import CATEGORY

ASPECTS = {"1:1": (1, 1), "4:3": (4, 3), "3:4": (3, 4), "3:2": (3, 2), "2:3": (2, 3), "16:9": (16, 9),
           "9:16": (9, 16), "21:9": (21, 9)}
CUSTOM = "custom"                   # appended last: saved workflows keep their aspect values
BASES = [1024, 1280, 1536]
MULTIPLE = 16


def preset_size(aspect: str, base: int) -> tuple[int, int]:
    """About base x base pixels at the aspect ratio, each side a multiple of 16."""
    a, b = ASPECTS[aspect]
    width = (base * base * a / b) ** 0.5
    height = width * b / a
    return round(width / MULTIPLE) * MULTIPLE, round(height / MULTIPLE) * MULTIPLE


NONFINITE_HINT = ("a black image would have been saved. The values overflowed: load the model with weight_dtype "
                  "bf16 or fp32 (not fp16) and keep cfg near 1")


def check_finite(t: torch.Tensor, what: str) -> None:
    """Before ComfyUI clamps inf into a flat white or black image."""
    if not torch.isfinite(t).all():
        raise ValueError(f"the {what} contains NaN or infinite values; {NONFINITE_HINT}")


@contextmanager
def watch_decoder(vae):
    """Yields a list that gets an entry when the VAE's decoder outputs NaN or inf. Core's VAE clamps its output
    into [0, 1], where inf is a flat white image and NaN black: only the decoder's own output still shows it.
    A torch forward hook on the decoder module (every core VAE has one; tiled decoding calls it too)."""
    seen: list[bool] = []
    decoder = comfy_compat.vae_decoder(vae)
    if decoder is None:
        yield seen
        return

    def check(module, args, output):
        if isinstance(output, torch.Tensor) and not torch.isfinite(output).all():
            seen.append(True)
    handle = decoder.register_forward_hook(check)
    try:
        yield seen
    finally:
        handle.remove()


class ZImageTurboSize:
    DESCRIPTION = ("An empty Z-Image latent at a preset size (aspect ratio and base), or at width x height with "
                   f"aspect 'custom'; sides multiples of 16 up to {MAX_SIDE}.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT", "INT", "INT")
    RETURN_NAMES = ("latent", "width", "height")
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "aspect": ([*ASPECTS, CUSTOM], {"default": "1:1", "tooltip": "Width:height of the image; 'custom' uses "
                                                                         "the width and height inputs."}),
            "base": (BASES, {"default": 1024, "tooltip": "About base x base pixels in total; 1024 is Z-Image's "
                                                         "native size, larger costs time and memory."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images per run."}),
        }, "optional": {          # optional, so API prompts written before they existed stay valid
            "width": ("INT", {"default": 1024, "min": MULTIPLE, "max": MAX_SIDE, "step": MULTIPLE,
                              "tooltip": "Used with aspect 'custom': a multiple of 16."}),
            "height": ("INT", {"default": 1024, "min": MULTIPLE, "max": MAX_SIDE, "step": MULTIPLE,
                               "tooltip": "Used with aspect 'custom': a multiple of 16."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None):
        """Checked at /prompt, so a REST client gets HTTP 400 naming the input and the sizes to use instead.
        Naming width/height here replaces ComfyUI's own min/max check for them, so this covers it."""
        try:
            check_size(MULTIPLE if width is None else width, MULTIPLE if height is None else height)
        except ValueError as e:
            return str(e)
        return True

    def make(self, aspect, base, batch_size, width=None, height=None):
        if aspect == CUSTOM:
            width, height = width or 1024, height or 1024
            check_size(width, height)           # also when the values come from a link (not seen at /prompt)
        else:
            width, height = preset_size(aspect, base)
        d = FLUX_LATENT.downscale
        samples = torch.zeros(batch_size, FLUX_LATENT.channels, height // d, width // d,
                              device=mm.intermediate_device())
        return ({"samples": samples}, width, height)


class ZImageTurboVAEDecode:
    DESCRIPTION = ("Decodes a latent with the Flux VAE (tiled automatically when it would not fit) and stops "
                   "with a clear error instead of saving a black image when the result is NaN or infinite.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT", {"tooltip": "The sampler's output."}),
            "vae": ("VAE", {"tooltip": "The VAE from the loader."}),
        }}

    def decode(self, samples, vae):
        latent = samples["samples"]
        check_finite(latent, "latent")
        channels = getattr(vae, "latent_channels", None)
        if latent.ndim != 4 or (channels is not None and latent.shape[1] != channels):
            raise ValueError(f"samples has shape {list(latent.shape)}, this VAE decodes (batch, {channels}, height/8, "
                             f"width/8): connect the Z-Image Sampler's (or KSampler's) output, not an empty "
                             f"latent or one from another model")
        d = FLUX_LATENT.downscale
        with watch_decoder(vae) as nonfinite:
            images = guard.run_guarded("decoding with the VAE", guard.vae_remedy(
                latent.shape[-1] * d, latent.shape[-2] * d, latent.shape[0]), vae.decode, latent)
        if nonfinite:
            raise ValueError(f"the decoded image contains NaN or infinite values; {NONFINITE_HINT}")
        images = comfy_compat.decoded_images(images)
        check_finite(images, "decoded image")
        return (images,)


class ZImageTurboVAEEncode:
    DESCRIPTION = "Encodes an image with the Flux VAE into a latent for image-to-image (sampler denoise < 1)."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pixels": ("IMAGE", {"tooltip": "The image to start from; cropped to multiples of 16 pixels."}),
            "vae": ("VAE", {"tooltip": "The VAE from the loader."}),
        }}

    def encode(self, pixels, vae):
        h, w = (pixels.shape[1] // MULTIPLE) * MULTIPLE, (pixels.shape[2] // MULTIPLE) * MULTIPLE
        if h == 0 or w == 0:
            raise ValueError(f"pixels is a {pixels.shape[2]}x{pixels.shape[1]} image: it must be at least 16x16 "
                             f"pixels; upscale or pad it first")
        latent = guard.run_guarded("encoding with the VAE", guard.vae_remedy(w, h, pixels.shape[0]),
                                   vae.encode, pixels[:, :h, :w, :3])
        check_finite(latent, "encoded latent")
        return ({"samples": latent},)
