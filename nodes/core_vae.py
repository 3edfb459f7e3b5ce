"""The VAE the loaders return: core ComfyUI's own comfy.sd.VAE over the Flux AE, holding the weights the pack's
strict loader found, checked and (for a diffusers folder) converted.

The released ae.safetensors is handed to core as it is, so core detects it as it detects it for VAELoader.
Core detects only the released sizes; a smaller AE of the same architecture (the pack's test files) is given
its sizes through VAE's `config` argument (core's AutoencoderKL), with identity 1x1 quant convs, which the
Flux AE does not have.
"""
from __future__ import annotations

from pathlib import Path

import comfy.sd
import torch

from ..zimage_core.loading import prepare_vae
from ..zimage_core.vae import VAEConfig
from . import comfy_compat

RELEASED = VAEConfig()


def load_vae(source: str | Path) -> comfy.sd.VAE:
    meta, report, read = prepare_vae(source)                  # strict key/shape check, config from shapes
    cfg: VAEConfig = report.config
    sd = {key: read(key) for key in meta.state_dict()}
    if _core_detects(cfg):
        vae = comfy.sd.VAE(sd=sd)
    else:
        vae = comfy.sd.VAE(sd={**sd, **_identity_quant_convs(cfg.z_channels)}, config=_config(cfg))
        comfy_compat.set_latent_channels(vae, cfg.z_channels)
    vae.throw_exception_if_invalid()
    return vae


def _core_detects(cfg: VAEConfig) -> bool:
    return (cfg.ch, tuple(cfg.ch_mult), cfg.num_res_blocks, cfg.in_channels, cfg.out_channels) == \
        (RELEASED.ch, tuple(RELEASED.ch_mult), RELEASED.num_res_blocks, RELEASED.in_channels, RELEASED.out_channels)


def _config(cfg: VAEConfig) -> dict:
    ddconfig = dict(double_z=True, z_channels=cfg.z_channels, resolution=256, in_channels=cfg.in_channels,
                    out_ch=cfg.out_channels, ch=cfg.ch, ch_mult=list(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                    attn_resolutions=[], dropout=0.0)
    return {"params": {"embed_dim": cfg.z_channels, "ddconfig": ddconfig}}


def _identity_quant_convs(z: int) -> dict[str, torch.Tensor]:
    return {"quant_conv.weight": torch.eye(2 * z)[..., None, None], "quant_conv.bias": torch.zeros(2 * z),
            "post_quant_conv.weight": torch.eye(z)[..., None, None], "post_quant_conv.bias": torch.zeros(z)}
