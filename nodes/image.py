"""Size and VAE nodes: presets that fit the model, and decoding that never saves a silent black image."""
from __future__ import annotations

import comfy.model_management as mm
import torch

from ..zimage_core.config import FLUX_LATENT
from . import bridge
from .loaders import CATEGORY

ASPECTS = {"1:1": (1, 1), "4:3": (4, 3), "3:4": (3, 4), "3:2": (3, 2), "2:3": (2, 3), "16:9": (16, 9),
           "9:16": (9, 16), "21:9": (21, 9)}
BASES = [1024, 1280, 1536]
MULTIPLE = 16


def preset_size(aspect: str, base: int) -> tuple[int, int]:
    """About base x base pixels at the aspect ratio, each side a multiple of 16."""
    a, b = ASPECTS[aspect]
    width = (base * base * a / b) ** 0.5
    height = width * b / a
    return round(width / MULTIPLE) * MULTIPLE, round(height / MULTIPLE) * MULTIPLE


class ZImageTurboSize:
    DESCRIPTION = "An empty Z-Image latent at a preset size (aspect ratio and base), sides multiples of 16."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT", "INT", "INT")
    RETURN_NAMES = ("latent", "width", "height")
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "aspect": (list(ASPECTS), {"default": "1:1", "tooltip": "Width:height of the image."}),
            "base": (BASES, {"default": 1024, "tooltip": "About base x base pixels in total; 1024 is Turbo's "
                                                         "native size, larger costs time and memory."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images per run."}),
        }}

    def make(self, aspect, base, batch_size):
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
        bridge.check_finite(samples["samples"], "latent")
        images = vae.decode(samples["samples"])
        if images.ndim == 5:                                    # some ComfyUI versions keep a frame axis
            images = images.reshape(-1, *images.shape[-3:])
        bridge.check_finite(images, "decoded image")
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
            raise ValueError(f"the image is {pixels.shape[2]}x{pixels.shape[1]}: it must be at least 16x16 pixels")
        latent = vae.encode(pixels[:, :h, :w, :3])
        bridge.check_finite(latent, "encoded latent")
        return ({"samples": latent},)
