"""Random weights for parity tests, and the one error measure every parity test reports."""
from __future__ import annotations

import torch


def randomize(module: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
    """Every parameter random (norm weights around 1), so no part of a parity test is trivially zero or one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            owner = name.rsplit(".", 2)[-2] if name.count(".") else ""
            p.copy_(1 + noise if "norm" in owner and name.endswith("weight") else noise)
    return module


def released_like(module: torch.nn.Module, seed: int, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random bf16 weights with a (meta) module's names and shapes, std `std`, norm weights around 1: a file in a
    released layout, for models whose classes only core or diffusers builds (the Fun ControlNet's)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in module.state_dict().items():
        noise = torch.randn(t.shape, generator=g) * std
        out[name] = (1 + noise if "norm" in name and name.endswith("weight") else noise).to(torch.bfloat16)
    return out


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max abs error / max abs reference)."""
    diff = (ours.double() - ref.double()).abs().max().item()
    return diff, diff / ref.double().abs().max().item()
