"""The turbo sampler: shifted flow-matching schedule, seeded noise as ComfyUI makes it, Euler steps, CFG.

Flow matching: x_sigma = (1 - sigma) * clean + sigma * noise. The DiT's raw output u estimates
(clean - noise), so the velocity dx/dsigma is -u and the clean estimate is x + sigma * u.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Protocol

import torch
from torch import Tensor

from .config import SAMPLING


class DenoiseModel(Protocol):
    def __call__(self, x: Tensor, t: Tensor, captions: list[Tensor]) -> Tensor: ...


# callback(step, total_steps, x, denoised): after each step; raising from it stops sampling (Stop button).
StepCallback = Callable[[int, int, Tensor, Tensor], None]


def check_steps(steps: int) -> None:
    if not SAMPLING.min_steps <= steps <= SAMPLING.max_steps:
        raise ValueError(f"steps must be between {SAMPLING.min_steps} and {SAMPLING.max_steps}, got {steps}; "
                         f"Z-Image-Turbo is distilled for {SAMPLING.steps}")


def shift_sigma(s: Tensor, shift: float) -> Tensor:
    """Time shift of the flow schedule: shift * s / (1 + (shift - 1) * s)."""
    return shift * s / (1 + (shift - 1) * s)


def sigma_schedule(steps: int = SAMPLING.steps, shift: float = SAMPLING.shift,
                   denoise: float = SAMPLING.denoise) -> Tensor:
    """steps + 1 sigmas from the start down to a terminal 0.

    denoise < 1 keeps the last `steps` of a schedule of int(steps / denoise) steps, as ComfyUI's KSampler does.
    """
    check_steps(steps)
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    total = int(steps / denoise)
    s = 1 - torch.arange(total, dtype=torch.float64) / total
    sigmas = torch.cat([shift_sigma(s, shift), torch.zeros(1, dtype=torch.float64)])
    return sigmas[-(steps + 1):].float()


def initial_noise(shape: tuple[int, ...], seed: int) -> Tensor:
    """Gaussian noise for a whole batch from one seed, drawn exactly as ComfyUI core draws it
    (one fp32 CPU generator seeded with `seed`, one randn call), so one seed gives one image in both."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, dtype=torch.float32, generator=generator, device="cpu")


def sample(model: DenoiseModel, noise: Tensor, sigmas: Tensor, positive: list[Tensor],
           negative: list[Tensor] | None = None, cfg: float = SAMPLING.cfg, latent: Tensor | None = None,
           callback: StepCallback | None = None) -> Tensor:
    """Euler-integrate from sigmas[0] to sigmas[-1]; returns the final latent (fp32, model space).

    cfg == 1 runs one pass per step; cfg != 1 runs cond and uncond in one batched forward and combines them
    as ComfyUI does: uncond + cfg * (cond - uncond). `latent` is the image to start from when sigmas[0] < 1.
    """
    if cfg != 1.0 and negative is None:
        raise ValueError("cfg other than 1 needs a negative conditioning")
    x = noise.float() * sigmas[0]
    if latent is not None:
        x = x + (1 - sigmas[0]) * latent.float()
    total = len(sigmas) - 1
    with reused_prompt_context(model):
        for i in range(total):
            sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
            u = predict(model, x, sigma, positive, negative, cfg)
            denoised = x + sigma * u
            x = x + (sigma_next - sigma) * -u
            if callback is not None:
                callback(i + 1, total, x, denoised)
    return x


def reused_prompt_context(model: DenoiseModel):
    """The DiT's reuse_context() for the run (the prompt part once, not once per step), when the model, or the
    object a bound method such as the ComfyUI adapter's `raw` belongs to, has one."""
    owner = getattr(model, "__self__", model)
    reuse = getattr(owner, "reuse_context", None)
    return reuse() if callable(reuse) else nullcontext()


def predict(model: DenoiseModel, x: Tensor, sigma: float, positive: list[Tensor],
            negative: list[Tensor] | None, cfg: float) -> Tensor:
    """The (guided) network output u at one sigma, in fp32."""
    B = x.shape[0]
    t = torch.full((B,), 1.0 - sigma, dtype=torch.float32, device=x.device)
    if cfg == 1.0:
        return model(x, t, positive).float()
    u = model(torch.cat([x, x]), torch.cat([t, t]), list(positive) + list(negative)).float()
    cond, uncond = u[:B], u[B:]
    return uncond + cfg * (cond - uncond)
