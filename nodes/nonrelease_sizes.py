"""Sizes no released file has: the small files the tests run on a CPU.

Core ComfyUI builds Z-Image's three parts at the released sizes only: Qwen3-4B with 128-wide heads (a class
attribute), the Flux AE detected by its widths, the DiT's timestep MLP at (256 -> min(dim, 1024) -> 256).
A smaller file of the same architecture gets core's own classes at its sizes here, so every test still runs
core's code. A released file never takes these branches (tests/test_core_model.py checks each one at the
released sizes); nothing else in nodes/ knows about small files.
"""
from __future__ import annotations

import dataclasses

import comfy.sd1_clip
import comfy.text_encoders.llama as llama
import comfy.text_encoders.z_image as z_image
import torch
from comfy.ldm.modules.diffusionmodules.mmdit import TimestepEmbedder

from ..zimage_core.config import DiTConfig
from ..zimage_core.text_encoder import Qwen3Config
from ..zimage_core.vae import FLUX_AE, VAEConfig
from . import comfy_compat

CORE_HEAD_DIM = 128


# ---- text encoder: core sizes its Qwen3 from model_options, all but the head width (a class attribute)

@dataclasses.dataclass
class _SizedConfig(llama.Qwen3_4BConfig):
    head_dim: int = CORE_HEAD_DIM          # a field here, so the file's width can be given


class _SizedQwen3(llama.Qwen3_4B):
    """core's Qwen3_4B with the head width from the file (its constructor, with the sized config)."""

    def __init__(self, config_dict, dtype, device, operations):
        torch.nn.Module.__init__(self)
        config = _SizedConfig(**config_dict)
        self.num_layers = config.num_hidden_layers
        self.model = llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
        self.dtype = dtype


class _SizedQwen3Model(z_image.Qwen3_4BModel):
    def __init__(self, device="cpu", layer="hidden", layer_idx=-2, dtype=None, attention_mask=True, model_options={}):
        comfy.sd1_clip.SDClipModel.__init__(
            self, device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config={}, dtype=dtype,
            special_tokens={"pad": 151643}, layer_norm_hidden_state=False, model_class=_SizedQwen3,
            enable_attention_masks=attention_mask, return_attention_masks=attention_mask,
            model_options=model_options)


def size_text_encoder(cfg: Qwen3Config, options: dict) -> None:
    """A head width other than 128: core's Llama stack through `qwen3_4b_class`, a subclass that sets it."""
    if cfg.head_dim != CORE_HEAD_DIM:
        options["qwen3_4b_model_config"]["head_dim"] = cfg.head_dim
        options["qwen3_4b_class"] = _SizedQwen3Model


# ---- VAE: core detects the Flux AE by its widths; other widths go through VAE's `config` (core's AutoencoderKL)

def vae_arguments(cfg: VAEConfig, sd: dict) -> dict:
    """comfy.sd.VAE's arguments for the file's sizes: the state dict alone at the released sizes; otherwise a
    config, and identity 1x1 quant convs (AutoencoderKL has them, the Flux AE does not)."""
    if _released(cfg):
        return {"sd": sd}
    z = cfg.z_channels
    identity = {"quant_conv.weight": torch.eye(2 * z)[..., None, None], "quant_conv.bias": torch.zeros(2 * z),
                "post_quant_conv.weight": torch.eye(z)[..., None, None], "post_quant_conv.bias": torch.zeros(z)}
    ddconfig = dict(double_z=True, z_channels=z, resolution=256, in_channels=cfg.in_channels,
                    out_ch=cfg.out_channels, ch=cfg.ch, ch_mult=list(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                    attn_resolutions=[], dropout=0.0)
    return {"sd": {**sd, **identity}, "config": {"params": {"embed_dim": z, "ddconfig": ddconfig}}}


def _released(cfg: VAEConfig) -> bool:
    return (cfg.ch, tuple(cfg.ch_mult), cfg.num_res_blocks, cfg.in_channels, cfg.out_channels) == \
        (FLUX_AE.ch, tuple(FLUX_AE.ch_mult), FLUX_AE.num_res_blocks, FLUX_AE.in_channels, FLUX_AE.out_channels)


# ---- DiT: core's timestep MLP is (256 -> min(dim, 1024) -> 256); diffusers-style small files differ below 1024

def size_timestep_embedder(dit: torch.nn.Module, cfg: DiTConfig, dtype: torch.dtype, ops,
                           device=torch.device("meta")) -> None:
    mlp = dit.t_embedder.mlp
    if (mlp[0].in_features, mlp[0].out_features, mlp[2].out_features) == (cfg.t_freq_dim, cfg.t_embed_hidden,
                                                                         cfg.adaln_dim):
        return
    ops = ops or comfy_compat.ops_family(mlp[0])
    dit.t_embedder = TimestepEmbedder(cfg.t_embed_hidden, frequency_embedding_size=cfg.t_freq_dim,
                                      output_size=cfg.adaln_dim, dtype=dtype, device=device, operations=ops)
