"""Configurations of the Z-Image parts (Turbo and Base share them), their presets, and the sampling defaults.

The single source of truth for hyperparameters. Loaders infer a config from tensor shapes
(`*.from_shapes`), so a tiny test checkpoint builds a tiny model with the same code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

Shapes = Mapping[str, Sequence[int]]


def default_axes_dims(head_dim: int) -> tuple[int, int, int]:
    """RoPE split of one head over (caption/frame, height, width): 1/4, 3/8, 3/8.

    The released model uses (32, 48, 48) for head_dim 128; tiny checkpoints get the same proportions.
    """
    if head_dim % 8:
        raise ValueError(f"head_dim {head_dim} must be a multiple of 8 to split RoPE over three axes")
    return (head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8)


@dataclass(frozen=True)
class DiTConfig:
    dim: int = 3840
    n_layers: int = 30
    n_noise_refiner: int = 2
    n_context_refiner: int = 2
    n_heads: int = 30
    ffn_hidden: int = 10240             # int(dim / 3 * 8)
    in_channels: int = 16
    patch_size: int = 2
    cap_feat_dim: int = 2560            # Qwen3-4B hidden size
    adaln_dim: int = 256                # min(dim, 256) in the official code
    t_embed_hidden: int = 1024          # hard-coded in the official code; a field so tiny configs stay tiny
    t_freq_dim: int = 256               # width of the timestep sinusoid
    t_scale: float = 1000.0             # the model gets t in [0, 1] and multiplies it by this
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1536, 512, 512)  # released config, not diffusers' class default
    rope_theta: float = 256.0
    norm_eps: float = 1e-5
    seq_multiple: int = 32              # caption and image token runs are each padded to this

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if sum(self.axes_dims) != self.head_dim:
            raise ValueError(f"sum(axes_dims) {sum(self.axes_dims)} != head_dim {self.head_dim}")
        if any(d % 2 for d in self.axes_dims):
            raise ValueError(f"every RoPE axis dim must be even, got {self.axes_dims}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_channels

    @classmethod
    def from_shapes(cls, shapes: Shapes) -> "DiTConfig":
        """Infer the config from a ComfyUI-layout state dict's shapes (names as in our module tree)."""
        dim, cap_feat_dim = shapes["cap_embedder.1.weight"]
        head_dim = shapes["layers.0.attention.q_norm.weight"][0]
        patch_dim = shapes["x_embedder.weight"][1]
        patch_size = 2                                   # the only patch size Z-Image was released with
        return cls(
            dim=dim,
            n_layers=_count_blocks(shapes, "layers."),
            n_noise_refiner=_count_blocks(shapes, "noise_refiner."),
            n_context_refiner=_count_blocks(shapes, "context_refiner."),
            n_heads=dim // head_dim,
            ffn_hidden=shapes["layers.0.feed_forward.w1.weight"][0],
            in_channels=patch_dim // (patch_size * patch_size),
            patch_size=patch_size,
            cap_feat_dim=cap_feat_dim,
            adaln_dim=shapes["t_embedder.mlp.2.weight"][0],
            t_embed_hidden=shapes["t_embedder.mlp.0.weight"][0],
            t_freq_dim=shapes["t_embedder.mlp.0.weight"][1],
            axes_dims=default_axes_dims(head_dim),
        )


def _count_blocks(shapes: Shapes, prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".", 1)[0]) for k in shapes if k.startswith(prefix)}
    if ids != set(range(len(ids))):
        raise ValueError(f"block indices under '{prefix}' are not contiguous: {sorted(ids)}")
    return len(ids)


TURBO = DiTConfig()

# Small presets for tests: the same code paths, well under a million parameters. TINY and TINY_DEEP use the
# sizes diffusers hard-codes (t-embedder hidden 1024, ffn int(dim / 3 * 8), adaLN min(dim, 256)).
TINY = DiTConfig(dim=64, n_layers=2, n_noise_refiner=1, n_context_refiner=1, n_heads=4, ffn_hidden=170,
                 cap_feat_dim=32, adaln_dim=64, axes_dims=(4, 6, 6))
TINY_DEEP = DiTConfig(dim=96, n_layers=3, n_noise_refiner=2, n_context_refiner=2, n_heads=3, ffn_hidden=256,
                      cap_feat_dim=24, adaln_dim=96, axes_dims=(8, 12, 12))
# dim >= 256 and t-embedder hidden min(dim, 1024): the sizes ComfyUI core's NextDiT hard-codes.
SMALL = DiTConfig(dim=256, n_layers=2, n_noise_refiner=1, n_context_refiner=1, n_heads=8, ffn_hidden=682,
                  cap_feat_dim=48, adaln_dim=256, t_embed_hidden=256, axes_dims=(8, 12, 12))


@dataclass(frozen=True)
class SamplingDefaults:
    """Turbo defaults, in one place for the sampler, the pipeline and the node schemas."""
    steps: int = 8
    cfg: float = 1.0
    shift: float = 3.0
    denoise: float = 1.0
    min_steps: int = 1
    max_steps: int = 50


SAMPLING = SamplingDefaults()


@dataclass(frozen=True)
class LatentFormat:
    """The Flux AE latent space and the model's normalised space: model = (vae - shift) * scale."""
    channels: int = 16
    scale: float = 0.3611
    shift: float = 0.1159
    downscale: int = 8


FLUX_LATENT = LatentFormat()


# ---- image sizes: what every stage accepts (the nodes check them before sampling) ----

PIXELS_PER_TOKEN = FLUX_LATENT.downscale * 2          # VAE /8, then 2x2 patches


# Largest side accepted: 4096 px is 65,536 image tokens (16x Turbo's native 1024² and its 4,096 tokens). Attention
# cost grows with the square of that, so one 4096² image already needs far more memory and time than any card
# this model targets; larger pictures are better made at <= 2048 and upscaled.
MAX_SIDE = 4096


def check_size(width: int, height: int) -> None:
    """Each side a multiple of 16 (VAE /8, then 2x2 patches) from 16 to MAX_SIDE; the message says what to use."""
    m = PIXELS_PER_TOKEN
    for name, v in (("width", width), ("height", height)):
        if v <= 0:
            raise ValueError(f"{name} {v} is too small: it must be a multiple of {m} from {m} to {MAX_SIDE}; "
                             f"use {m} or more")
        if v > MAX_SIDE:
            raise ValueError(f"{name} {v} is above the maximum of {MAX_SIDE} pixels per side (a multiple of {m} "
                             f"from {m} to {MAX_SIDE}): use {MAX_SIDE} or less and upscale the image afterwards")
        if v % m:
            lower, upper = v // m * m, min(MAX_SIDE, (v // m + 1) * m)
            use = f"{lower} or {upper}" if lower else f"{upper}"
            raise ValueError(f"{name} {v} is not a multiple of {m}: use {use}")
