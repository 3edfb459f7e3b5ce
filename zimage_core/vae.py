"""The FLUX.1 autoencoder ("ae") used by Z-Image, in the key layout of ComfyUI/BFL `ae.safetensors`.

Module names mirror the LDM checkpoint keys (`encoder.down.0.block.1.conv1.weight`, `decoder.up.3.upsample.conv`,
`*.mid.attn_1.q` as 1x1 convs, ...), so `state_dict()` is the file's key set and loading needs no renaming.
Diffusers `AutoencoderKL` weights are renamed by `diffusers_to_ldm`. The config is inferred from shapes.

Latent spaces: the VAE works in "raw" latents; the DiT works in model space `(raw - shift) * scale`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import FLUX_LATENT

Shapes = Mapping[str, Sequence[int]]

NORM_EPS = 1e-6  # GroupNorm eps of every norm in the Flux AE


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2            # encoder blocks per level; the decoder has one more per level
    z_channels: int = 16
    in_channels: int = 3
    out_channels: int = 3
    norm_groups: int = 32              # not visible in shapes; every released Flux-family AE uses 32
    scale: float = FLUX_LATENT.scale
    shift: float = FLUX_LATENT.shift

    def __post_init__(self) -> None:
        if not self.ch_mult:
            raise ValueError("ch_mult must have at least one level")
        for width in {self.ch * m for m in self.ch_mult}:
            if width % self.norm_groups:
                raise ValueError(f"channel width {width} is not divisible by norm_groups {self.norm_groups}")

    @property
    def downscale(self) -> int:
        """Pixels per latent cell: every level but the last halves the resolution."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_shapes(cls, shapes: Shapes) -> "VAEConfig":
        """Infer the config from an `ae.safetensors`-layout state dict's shapes (values: tensors or shapes).

        Raises ValueError when a key is missing, extra, or has a shape the inferred config does not produce.
        """
        try:
            ch, in_channels = _shape(shapes, "encoder.conv_in.weight")[:2]
            n_levels = _count_indices(shapes, "encoder.down.")
            widths = [_shape(shapes, f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(n_levels)]
            num_res_blocks = _count_indices(shapes, "encoder.down.0.block.")
            z_channels = _shape(shapes, "decoder.conv_in.weight")[1]
            out_channels = _shape(shapes, "decoder.conv_out.weight")[0]
        except KeyError as e:
            raise ValueError(f"not a Flux-AE (LDM layout) state dict: missing {e}") from None
        if any(w % ch for w in widths):
            raise ValueError(f"level widths {widths} are not multiples of conv_in width {ch}")
        cfg = cls(ch=ch, ch_mult=tuple(w // ch for w in widths), num_res_blocks=num_res_blocks,
                  z_channels=z_channels, in_channels=in_channels, out_channels=out_channels)
        _check_shapes(shapes, expected_shapes(cfg))
        return cfg


FLUX_AE = VAEConfig()


def _shape(shapes: Shapes, key: str) -> tuple[int, ...]:
    value = shapes[key]
    return tuple(value.shape) if isinstance(value, Tensor) else tuple(value)


def _count_indices(shapes: Shapes, prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".", 1)[0]) for k in shapes if k.startswith(prefix)}
    if not ids or ids != set(range(len(ids))):
        raise ValueError(f"indices under '{prefix}' are missing or not contiguous: {sorted(ids)}")
    return len(ids)


def expected_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the model `cfg` describes (built on meta, so free)."""
    with torch.device("meta"):
        model = AutoEncoder(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_shapes(shapes: Shapes, expected: Mapping[str, tuple[int, ...]]) -> None:
    missing = sorted(expected.keys() - shapes.keys())
    extra = sorted(shapes.keys() - expected.keys())
    wrong = [f"{k}: {_shape(shapes, k)} != {s}" for k, s in expected.items()
             if k in shapes and _shape(shapes, k) != s]
    if missing or extra or wrong:
        parts = [f"{name} ({len(items)}): {items[:5]}" for name, items in
                 (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)) if items]
        raise ValueError("state dict is inconsistent with the inferred Flux-AE config; " + "; ".join(parts))


# ----------------------------------------------------------------------------------------------------------------
# Model. Attribute names are the checkpoint keys.
# ----------------------------------------------------------------------------------------------------------------

def _norm(cfg: VAEConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, channels, eps=NORM_EPS)


class ResnetBlock(nn.Module):
    def __init__(self, cfg: VAEConfig, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = _norm(cfg, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(cfg, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        # Only present (and only in the checkpoint) where the width changes.
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        # The same arithmetic with fewer full-size maps alive at once (each is 0.5 GB at 1024² in bf16): the
        # activation runs in place on the norm's fresh output, and each intermediate is dropped as soon as the
        # next exists. Counted on the meta device (bench/meta_memory.py) the 1024² decode peaks at 1.48 GB,
        # not 1.61.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = F.silu(self.norm2(h), inplace=True)
        h = self.conv2(h)                       # dropout is 0 in the Flux AE
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return h.add_(skip)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions; q/k/v/proj_out are 1x1 convs in the checkpoint."""

    def __init__(self, cfg: VAEConfig, channels: int):
        super().__init__()
        self.norm = _norm(cfg, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1 head, H*W, C); SDPA's default 1/sqrt(C) scaling is the LDM one. Made contiguous:
        # the transposed view has stride H*W in its last dim, and CUDA's flash, mem-efficient and cuDNN kernels
        # all refuse such inputs, leaving the math kernel and its (H*W)^2 score matrix (8 GiB at 2048²).
        q, k, v = (t.reshape(B, 1, C, H * W).transpose(-1, -2).contiguous()
                   for t in (self.q(h), self.k(h), self.v(h)))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # Asymmetric pad (right and bottom only), as the weights were trained with it.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, cfg: VAEConfig, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(cfg, channels, channels)
        self.attn_1 = AttnBlock(cfg, channels)
        self.block_2 = ResnetBlock(cfg, channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: `block.{j}` resnets, then an optional `downsample` or `upsample`."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, resample_name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        # Registered under its checkpoint name only (an alias attribute would duplicate the keys).
        self.resample_name = resample_name if resample is not None else None
        if resample is not None:
            self.add_module(resample_name, resample)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.resample_name is None else getattr(self, self.resample_name)(x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        levels, c_in = [], cfg.ch
        for i, width in enumerate(widths):
            blocks = [ResnetBlock(cfg, c_in if j == 0 else width, width) for j in range(cfg.num_res_blocks)]
            levels.append(Level(blocks, Downsample(width) if i != last else None, "downsample"))
            c_in = width
        self.down = nn.ModuleList(levels)
        self.mid = MidBlock(cfg, widths[-1])
        self.norm_out = _norm(cfg, widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)   # mean and logvar

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(cfg, widths[-1])
        # `up.{i}` is level i (same resolution as `down.{i}`); it runs from the deepest level up, so it is
        # built in reverse and stored by level index.
        levels: list[Level] = [None] * len(widths)  # type: ignore[list-item]
        c_in = widths[-1]
        for i in reversed(range(len(widths))):
            width = widths[i]
            blocks = [ResnetBlock(cfg, c_in if j == 0 else width, width) for j in range(cfg.num_res_blocks + 1)]
            levels[i] = Level(blocks, Upsample(width) if i != 0 else None, "upsample")
            c_in = width
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cfg, widths[0])
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class AutoEncoder(nn.Module):
    """Flux AE. `encode`/`decode` work in raw latents; see `to_model_space`/`from_model_space`."""

    def __init__(self, cfg: VAEConfig = FLUX_AE):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    def encode(self, image: Tensor) -> Tensor:
        """Image in [-1, 1], (B, in_channels, H, W) with H, W multiples of `cfg.downscale` -> raw latent.

        Returns the posterior mean (deterministic); the logvar half of the encoder output is dropped.
        """
        moments = self.encoder(image.to(self.dtype))
        return moments[:, : self.cfg.z_channels]

    def decode(self, z_raw: Tensor) -> Tensor:
        """Raw latent (B, z_channels, h, w) -> image (B, out_channels, h*8, w*8), nominally in [-1, 1]."""
        return self.decoder(z_raw.to(self.dtype))

    def to_model_space(self, z_raw: Tensor) -> Tensor:
        return to_model_space(z_raw, self.cfg.scale, self.cfg.shift)

    def from_model_space(self, z: Tensor) -> Tensor:
        return from_model_space(z, self.cfg.scale, self.cfg.shift)


def to_model_space(z_raw: Tensor, scale: float = FLUX_LATENT.scale, shift: float = FLUX_LATENT.shift) -> Tensor:
    """Raw VAE latent -> the DiT's normalised latent."""
    return (z_raw - shift) * scale


def from_model_space(z: Tensor, scale: float = FLUX_LATENT.scale, shift: float = FLUX_LATENT.shift) -> Tensor:
    """The DiT's normalised latent -> raw VAE latent (what `decode` takes)."""
    return z / scale + shift


# ----------------------------------------------------------------------------------------------------------------
# Diffusers AutoencoderKL -> ae.safetensors keys
# ----------------------------------------------------------------------------------------------------------------

# Leaf renames inside a resnet and inside the mid attention. The attention also accepts the names of old
# diffusers checkpoints (query/key/value/proj_attn), which diffusers itself still converts on load.
_RESNET_LEAVES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                  "conv_shortcut": "nin_shortcut"}
_ATTN_LEAVES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_ATTN_TARGETS = frozenset(_ATTN_LEAVES.values()) - {"norm"}   # Linear in diffusers, 1x1 conv for us


def _alt(names: Mapping[str, str]) -> str:
    return "(?P<leaf>" + "|".join(re.escape(n) for n in names) + ")"


# (pattern over the module path, template, leaf map). Patterns are matched in full; `{up}` is the reversed
# decoder level index, `{leaf}` the mapped leaf name, other fields are the match's groups.
_RULES: list[tuple[re.Pattern[str], str, Mapping[str, str] | None]] = [
    (re.compile(p), t, m) for p, t, m in [
        (r"(?P<side>encoder|decoder)\.conv_in", "{side}.conv_in", None),
        (r"(?P<side>encoder|decoder)\.conv_out", "{side}.conv_out", None),
        (r"(?P<side>encoder|decoder)\.conv_norm_out", "{side}.norm_out", None),
        (r"encoder\.down_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\." + _alt(_RESNET_LEAVES),
         "encoder.down.{i}.block.{j}.{leaf}", _RESNET_LEAVES),
        (r"encoder\.down_blocks\.(?P<i>\d+)\.downsamplers\.0\.conv", "encoder.down.{i}.downsample.conv", None),
        (r"decoder\.up_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\." + _alt(_RESNET_LEAVES),
         "decoder.up.{up}.block.{j}.{leaf}", _RESNET_LEAVES),
        (r"decoder\.up_blocks\.(?P<i>\d+)\.upsamplers\.0\.conv", "decoder.up.{up}.upsample.conv", None),
        (r"(?P<side>encoder|decoder)\.mid_block\.resnets\.0\." + _alt(_RESNET_LEAVES),
         "{side}.mid.block_1.{leaf}", _RESNET_LEAVES),
        (r"(?P<side>encoder|decoder)\.mid_block\.resnets\.1\." + _alt(_RESNET_LEAVES),
         "{side}.mid.block_2.{leaf}", _RESNET_LEAVES),
        (r"(?P<side>encoder|decoder)\.mid_block\.attentions\.0\." + _alt(_ATTN_LEAVES),
         "{side}.mid.attn_1.{leaf}", _ATTN_LEAVES),
    ]
]
_PARAM = re.compile(r"(?P<path>.+)\.(?P<param>weight|bias)")
_UP_BLOCK = re.compile(r"decoder\.up_blocks\.(\d+)\.")

# Keys a diffusers AutoencoderKL can have that the Flux AE has no place for; named in the error.
_HINTS = {"quant_conv": "this VAE uses quant_conv/post_quant_conv (SD-style); the Flux AE has none",
          "post_quant_conv": "this VAE uses quant_conv/post_quant_conv (SD-style); the Flux AE has none"}


def _rename(key: str, n_up: int) -> str | None:
    """The LDM name of one diffusers key, or None if no rule covers it."""
    m = _PARAM.fullmatch(key)
    if m is None:
        return None
    for pattern, template, leaves in _RULES:
        r = pattern.fullmatch(m["path"])
        if r is None:
            continue
        fields = r.groupdict()
        if leaves is not None:
            fields["leaf"] = leaves[fields["leaf"]]
        if "i" in fields:
            fields["up"] = str(n_up - 1 - int(fields["i"]))
        return f"{template.format(**fields)}.{m['param']}"
    return None


def _as_conv1x1(t: Tensor) -> Tensor:
    """Linear [C_out, C_in] -> 1x1 conv [C_out, C_in, 1, 1] (a view; works on meta tensors too)."""
    return t[:, :, None, None] if t.ndim == 2 else t


def _unknown_key_error(keys: list[str]) -> ValueError:
    hints = sorted({_HINTS[k.split(".")[0]] for k in keys if k.split(".")[0] in _HINTS})
    listed = ", ".join(repr(k) for k in keys[:10]) + (f" (+{len(keys) - 10} more)" if len(keys) > 10 else "")
    return ValueError(f"diffusers_to_ldm: no Flux-AE mapping for key(s) {listed}"
                      + (f"; {'; '.join(hints)}" if hints else ""))


def diffusers_to_ldm(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a diffusers `AutoencoderKL` state dict (a checkpoint's `vae/` folder) to `ae.safetensors` keys.

    Values are passed through (attention Linear weights become 1x1-conv views), so this works on real,
    memory-mapped and meta tensors alike. Raises ValueError naming any key it does not understand.
    """
    # Diffusers numbers decoder up-blocks from the deepest level; LDM numbers them by resolution level.
    up_ids = {int(m.group(1)) for k in sd if (m := _UP_BLOCK.match(k))}
    n_up = max(up_ids) + 1 if up_ids else 0
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        new = _rename(key, n_up)
        if new is None:
            unknown.append(key)
            continue
        if new in out:
            raise ValueError(f"diffusers_to_ldm: two keys map to {new!r} (the second is {key!r})")
        is_attn_weight = ".mid.attn_1." in new and new.endswith(".weight") and new.split(".")[-2] in _ATTN_TARGETS
        out[new] = _as_conv1x1(value) if is_attn_weight else value
    if unknown:
        raise _unknown_key_error(unknown)
    return out


def is_diffusers_layout(keys: Sequence[str] | Mapping[str, object]) -> bool:
    """True for diffusers AutoencoderKL names, False for ae.safetensors names."""
    return any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys)

