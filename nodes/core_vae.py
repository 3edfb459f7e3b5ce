"""The VAE the loaders return: core ComfyUI's own comfy.sd.VAE over the Flux AE, holding the weights the pack's
strict loader found, checked and (for a diffusers folder) converted.

The released ae.safetensors is handed to core as it is, so core detects it as it detects it for VAELoader (other
sizes: nonrelease_sizes).
"""
from __future__ import annotations

from pathlib import Path

import comfy.sd

from ..zimage_core.loading import prepare_vae
from ..zimage_core.vae import VAEConfig
from . import comfy_compat, nonrelease_sizes


def load_vae(source: str | Path) -> comfy.sd.VAE:
    meta, report, read = prepare_vae(source)                  # strict key/shape check, config from shapes
    cfg: VAEConfig = report.config
    arguments = nonrelease_sizes.vae_arguments(cfg, {key: read(key) for key in meta.state_dict()})
    vae = comfy.sd.VAE(**arguments)
    if "config" in arguments:
        comfy_compat.set_latent_channels(vae, cfg.z_channels)
    vae.throw_exception_if_invalid()
    return vae
