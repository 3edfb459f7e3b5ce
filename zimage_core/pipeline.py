"""A plain Python Z-Image pipeline over the core: prompt(s) -> images. No ComfyUI needed.

Used by the tests, the benchmarks and the demo; the ComfyUI nodes call the same pieces one by one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .config import FLUX_LATENT, SAMPLING, check_size
from .dit import ZImageDiT
from .loading import LoadReport, Source, load_dit, load_text_encoder, load_vae
from .memory import check_policy, decode_tiled, empty_cache, stream_dit_blocks, stream_text_encoder
from .precision import choose_dtypes
from .sampling import StepCallback, initial_noise, sample, sigma_schedule
from .text_encoder import Qwen3Encoder, encode_prompts
from .tokenizer import PromptTokenizer
from .vae import AutoEncoder, from_model_space, to_model_space

@dataclass
class ZImageModels:
    dit: ZImageDiT
    text_encoder: Qwen3Encoder
    vae: AutoEncoder
    tokenizer: PromptTokenizer
    reports: list[LoadReport] = field(default_factory=list)


def load_zimage(dit: Source, text_encoder: Source | None = None, vae: Source | None = None,
                tokenizer: str | Path | None = None, dtype: str = "auto",
                device: str | torch.device = "cpu") -> ZImageModels:
    """Load every part. With only `dit`, it must be an all-in-one file or a diffusers folder holding them all;
    the tokenizer defaults to a diffusers folder's tokenizer/. dtype: 'auto', 'bf16', 'fp16' or 'fp32' for the
    DiT and text encoder, or 'fp8_e4m3fn' (the DiT's blocks stored in fp8, cast as they are read); the VAE
    follows precision.choose_dtypes (never fp16). With 'auto' an fp8 DiT file keeps its blocks in fp8."""
    te_source = text_encoder if text_encoder is not None else dit
    vae_source = vae if vae is not None else dit
    if tokenizer is None:
        tokenizer = Path(dit) / "tokenizer" if isinstance(dit, (str, Path)) else None
        if tokenizer is None or not tokenizer.is_dir():
            raise FileNotFoundError("no tokenizer folder given and none found next to the weights: pass the "
                                    "folder holding vocab.json and merges.txt (or tokenizer.json)")
    dtypes = choose_dtypes(device, dtype)
    d, rd = load_dit(dit, dtypes.dit, device, fp8_blocks=True if dtypes.dit_fp8 else None if dtype == "auto" else False)
    te, rt = load_text_encoder(te_source, dtypes.text_encoder, device)
    ae, rv = load_vae(vae_source, dtypes.vae, device)
    return ZImageModels(d, te, ae, PromptTokenizer.from_dir(tokenizer), [rd, rt, rv])


class ZImagePipeline:
    """memory: 'keep', 'swap' or 'lowvram' (zimage_core.memory). With 'swap' and 'lowvram' the text encoder
    stays in CPU memory and streams its layers to the device while encoding, and the VAE decodes in tiles;
    'lowvram' also streams the DiT's blocks. close() hands the streamed weights back (then move the models)."""

    def __init__(self, models: ZImageModels, device: str | torch.device = "cpu", memory: str = "keep",
                 vae_tile: int = 64):
        self.models = models
        self.device = torch.device(device)
        self.memory = check_policy(memory)
        self.vae_tile = vae_tile
        self.home = torch.device("cpu")
        self.streamer = self.te_streamer = None          # the DiT's and the text encoder's BlockStreamers
        if memory != "keep":
            models.text_encoder.to(self.home)
            self.te_streamer = stream_text_encoder(models.text_encoder, self.device)
            empty_cache(self.device)
        if memory == "lowvram":
            self.streamer = stream_dit_blocks(models.dit, self.device)
            models.vae.to(self.device)
            empty_cache(self.device)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[Tensor]:
        return encode_prompts(self.models.text_encoder, self.models.tokenizer, prompts, self.device)

    def close(self) -> None:
        """Remove the streaming hooks (the weights stay in CPU memory: move the models to put them back)."""
        for streamer in (self.streamer, self.te_streamer):
            if streamer is not None:
                streamer.close()
        self.streamer = self.te_streamer = None

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative: str | list[str] = "", width: int = 1024,
                 height: int = 1024, steps: int = SAMPLING.steps, cfg: float = SAMPLING.cfg, seed: int = 0,
                 batch_size: int = 1, shift: float = SAMPLING.shift, denoise: float = SAMPLING.denoise,
                 image: Tensor | None = None, noise: Tensor | None = None,
                 callback: StepCallback | None = None, output: str = "image") -> Tensor:
        """Images (B, H, W, 3) in [0, 1] (ComfyUI's IMAGE layout), or the final model-space latent when
        output='latent'. A list of prompts gives one image each; batch_size repeats a single prompt."""
        check_size(width, height)
        prompts = [prompt] * batch_size if isinstance(prompt, str) else list(prompt)
        negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
        positive = self.encode(prompts)
        negative_caps = self.encode(negatives) if cfg != 1.0 else None

        shape = (len(prompts), FLUX_LATENT.channels, height // FLUX_LATENT.downscale, width // FLUX_LATENT.downscale)
        noise = initial_noise(shape, seed) if noise is None else noise
        start = None if image is None else self.encode_image(image)
        sigmas = sigma_schedule(steps, shift, denoise if image is not None else 1.0)
        latent = sample(self.models.dit, noise.to(self.device), sigmas, positive, negative_caps, cfg,
                        start, callback)
        return latent if output == "latent" else self.decode(latent)

    def encode_image(self, image: Tensor) -> Tensor:
        """(B, H, W, 3) in [0, 1] -> model-space latent."""
        vae = self.models.vae
        dtype = next(vae.parameters()).dtype
        pixels = image.movedim(-1, 1).to(self.device, dtype) * 2 - 1
        return to_model_space(vae.encode(pixels).float())

    def decode(self, latent: Tensor) -> Tensor:
        """Model-space latent -> (B, H, W, 3) in [0, 1]."""
        vae = self.models.vae
        dtype = next(vae.parameters()).dtype
        z = from_model_space(latent).to(self.device, dtype)
        if self.memory != "keep":              # the whole 1024² decode holds ~1.5 GB more than a tile's
            pixels = decode_tiled(vae.decode, z, tile=self.vae_tile, overlap=self.vae_tile // 4).float()
        else:
            pixels = vae.decode(z).float()
        return (pixels / 2 + 0.5).clamp(0, 1).movedim(1, -1)
