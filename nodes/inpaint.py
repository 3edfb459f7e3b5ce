"""Inpainting: an image and a mask into a latent whose noise_mask makes core's masked sampling do what diffusers'
ZImageInpaintPipeline does.

Core's masked sampling (KSamplerX0Inpaint) already follows diffusers' per-step blend: every step the model sees the
kept region as the image noised to the current sigma with the seed's noise, and the kept region of the result is the
image itself. What differs is the mask: core scales any mask to the latent with bilinear interpolation, so a seam
gets fractional weights, where diffusers binarises the mask at 0.5 in pixels and takes the nearest latent cell. This
node makes that mask (binary, at the latent's size, so core's rescale is the identity on it)."""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..zimage_core.config import FLUX_LATENT
from . import guard
from .image import MULTIPLE, check_finite
from .loaders import CATEGORY

log = logging.getLogger("ZImageTurbo")
EMPTY_MASK = ("the mask is empty (nothing >= 0.5), so nothing is repainted and the image comes back as it was: "
              "paint the area to change in Load Image's mask editor (right-click the image, Open in MaskEditor), or "
              "load a mask image (white = repaint)")


def latent_mask(mask: torch.Tensor, image_height: int, image_width: int, height: int, width: int) -> torch.Tensor:
    """(B, 1, height/8, width/8) of 0 and 1 from a ComfyUI MASK (B, H, W) or (H, W): a mask of another size than
    the image (Load Image's 64x64 placeholder, a mask drawn at another resolution) is first scaled to the image
    bilinearly, as core's inpaint nodes scale theirs; then 1 where it is >= 0.5 (diffusers' binarisation), cropped
    as the image is to multiples of 16, and the nearest latent cell (diffusers' interpolation mode)."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"mask has shape {list(mask.shape)}: connect a MASK (from Load Image, Load Image (as "
                         f"Mask) or the mask editor)")
    mask = mask.float()
    if not torch.isfinite(mask).all():
        raise ValueError("mask holds NaN or infinite values: it is not a mask; connect Load Image's mask or a mask "
                         "image (white = repaint, black = keep)")
    if tuple(mask.shape[-2:]) != (image_height, image_width):
        mask = F.interpolate(mask[:, None], size=(image_height, image_width), mode="bilinear")[:, 0]
    binary = (mask[:, :height, :width] >= 0.5).float()
    d = FLUX_LATENT.downscale
    return F.interpolate(binary[:, None], size=(height // d, width // d), mode="nearest")


class ZImageInpaintEncode:
    DESCRIPTION = ("Encodes an image and a mask for inpainting with the Z-Image sampler (denoise 1 repaints the "
                   "masked region from scratch, lower keeps more of it). Only the masked region changes; the mask is "
                   "binarised and mapped to the latent as diffusers' ZImageInpaintPipeline does.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "pixels": ("IMAGE", {"tooltip": "The image to inpaint; cropped to multiples of 16 pixels."}),
            "vae": ("VAE", {"tooltip": "The VAE from the loader."}),
            "mask": ("MASK", {"tooltip": "White (>= 0.5) = repaint, black = keep: Load Image's mask editor, or "
                                         "Load Image (as Mask). Another size than the image is scaled to it, as "
                                         "core's inpaint nodes do."}),
        }}

    def encode(self, pixels, vae, mask):
        B = pixels.shape[0]
        h, w = (pixels.shape[1] // MULTIPLE) * MULTIPLE, (pixels.shape[2] // MULTIPLE) * MULTIPLE
        if h == 0 or w == 0:
            raise ValueError(f"pixels is a {pixels.shape[2]}x{pixels.shape[1]} image: it must be at least 16x16 "
                             f"pixels; upscale or pad it first")
        noise_mask = latent_mask(mask, pixels.shape[1], pixels.shape[2], h, w)
        if noise_mask.shape[0] not in (1, B):
            raise ValueError(f"mask holds {noise_mask.shape[0]} masks for {B} images: send one mask, or one per image")
        # Load Image gives an empty 64x64 mask for an image without alpha: most often a forgotten mask. The run goes
        # on (core's inpaint nodes run too) and says why the picture did not change.
        warnings = [] if noise_mask.any() else [EMPTY_MASK]
        for text in warnings:
            log.warning("Z-Image Inpaint Encode: %s", text)
        latent = guard.run_guarded("encoding with the VAE", guard.vae_remedy(w, h, B), vae.encode,
                                   pixels[:, :h, :w, :3])
        check_finite(latent, "encoded latent")
        return {"ui": {"zimage": [{"warnings": warnings}]}, "result": ({"samples": latent, "noise_mask": noise_mask},)}
