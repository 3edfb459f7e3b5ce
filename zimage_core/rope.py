"""3-axis rotary position embedding of the Z-Image DiT, and the token position ids it is fed.

Positions: caption row j -> (1 + j, 0, 0); image token (h, w) -> (Lp + 1, h, w) with Lp the padded
caption length; image pad tokens -> (0, 0, 0). Pairs are interleaved (x[2k], x[2k+1]), not rotate_half.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def rope_angles(pos: Tensor, axes_dims: tuple[int, ...], theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation angles for integer positions.

    pos: (..., n_axes) integer ids. Returns two fp32 tensors (..., head_dim / 2).
    Angles are formed in float64 (positions reach thousands; fp32 would lose ~1e-4 rad there).
    """
    parts = []
    for axis, dim in enumerate(axes_dims):
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
        parts.append(pos[..., axis, None].to(torch.float64) * freqs)
    angles = torch.cat(parts, dim=-1)
    return angles.cos().float(), angles.sin().float()


@dataclass
class RopeTable:
    """The rotation of every token: cos and sin (B, L, head_dim / 2) in fp32, and the same rotation as one
    complex number per pair (made on first use, then kept: a table serves every block of every step)."""
    cos: Tensor
    sin: Tensor
    _cis: Tensor | None = None

    @classmethod
    def from_positions(cls, pos: Tensor, axes_dims: tuple[int, ...], theta: float) -> "RopeTable":
        return cls(*rope_angles(pos, axes_dims, theta))

    @property
    def cis(self) -> Tensor:
        if self._cis is None:
            self._cis = torch.complex(self.cos, self.sin)
        return self._cis

    def cat(self, other: "RopeTable") -> "RopeTable":
        """The table of the two token runs one after the other (the joint sequence)."""
        return RopeTable(torch.cat([self.cos, other.cos], 1), torch.cat([self.sin, other.sin], 1))

    def rotate(self, x: Tensor, use_complex: bool = False) -> Tensor:
        return apply_rope_complex(x, self.cis) if use_complex else apply_rope(x, self.cos, self.sin)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs of x. x: (B, L, H, D); cos, sin: (B, L, D/2). Computed in fp32."""
    xf = x.float().unflatten(-1, (-1, 2))                       # (B, L, H, D/2, 2)
    x_even, x_odd = xf[..., 0], xf[..., 1]
    cos, sin = cos[:, :, None], sin[:, :, None]                 # broadcast over heads
    out = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def caption_positions(padded_len: int, device: torch.device | None = None) -> Tensor:
    """(padded_len, 3) ids: (1 + j, 0, 0); pad rows continue the numbering."""
    pos = torch.zeros(padded_len, 3, dtype=torch.long, device=device)
    pos[:, 0] = torch.arange(1, padded_len + 1, device=device)
    return pos


def image_positions(h: int, w: int, padded_len: int, frame: int, device: torch.device | None = None) -> Tensor:
    """(padded_len, 3) ids for an h x w token grid in row-major order at axis-0 index `frame`;
    the rows past h * w (padding) stay (0, 0, 0)."""
    pos = torch.zeros(padded_len, 3, dtype=torch.long, device=device)
    hh, ww = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    pos[: h * w, 0] = frame
    pos[: h * w, 1] = hh.flatten()
    pos[: h * w, 2] = ww.flatten()
    return pos


def apply_rope_complex(x: Tensor, cis: Tensor) -> Tensor:
    """apply_rope as one complex multiply per pair: (e + i o)(cos + i sin) is the same two products and sums,
    so the result is bit-identical, with fewer passes over memory. cis: (B, L, D/2) complex64."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))       # (B, L, H, D/2)
    return torch.view_as_real(xc * cis[:, :, None]).flatten(-2).to(x.dtype)
