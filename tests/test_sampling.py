"""The turbo schedule and sampler against hand-computed values, diffusers' scheduler and ComfyUI's noise."""
from __future__ import annotations

import pytest
import torch

from zimage_dev.runtime import import_comfy
from zimage_core.sampling import initial_noise, sample, sigma_schedule

EIGHT_STEPS = [1.0, 0.954545, 0.9, 0.833333, 0.75, 0.642857, 0.5, 0.3, 0.0]


def test_eight_step_sigmas():
    assert sigma_schedule(8).tolist() == pytest.approx(EIGHT_STEPS, abs=1e-6)


@pytest.mark.parametrize("steps", [1, 4, 8, 9, 20, 50])
def test_sigmas_equal_diffusers_scheduler(steps):
    """diffusers' FlowMatchEulerDiscreteScheduler at shift 3, fed sigmas as ZImagePipeline feeds them."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    sched.sigma_min = 0.0                             # what the Z-Image pipelines do: a terminal sigma of 0
    sched.set_timesteps(sigmas=torch.linspace(1.0, 1.0 / steps, steps).tolist())
    assert sigma_schedule(steps).tolist() == pytest.approx(sched.sigmas.tolist(), abs=1e-6)


def test_denoise_keeps_the_tail_of_a_longer_schedule():
    assert sigma_schedule(4, denoise=0.5).tolist() == pytest.approx(sigma_schedule(8).tolist()[-5:], abs=1e-7)


@pytest.mark.parametrize("steps", [0, 51])
def test_steps_out_of_range(steps):
    with pytest.raises(ValueError, match="steps must be between 1 and 50"):
        sigma_schedule(steps)


def test_noise_is_comfyui_noise():
    import_comfy()
    import comfy.sample
    latent = torch.zeros(3, 16, 12, 20)
    assert torch.equal(initial_noise(tuple(latent.shape), 12345), comfy.sample.prepare_noise(latent, 12345))


def test_euler_reaches_the_clean_image_of_an_exact_model():
    """A model that knows the clean image (u = clean - noise, derived from x and sigma) is followed exactly."""
    clean = torch.randn(1, 4, 6, 6)

    def oracle(x, t, caps):
        sigma = 1 - t[0]
        noise = (x - (1 - sigma) * clean) / sigma
        return clean - noise

    calls = []
    out = sample(oracle, torch.randn(1, 4, 6, 6), sigma_schedule(8), [torch.zeros(1, 1)],
                 callback=lambda i, n, x, d: calls.append((i, n)))
    assert torch.allclose(out, clean, atol=1e-5)
    assert calls == [(i, 8) for i in range(1, 9)]


def test_cfg_batches_cond_and_uncond_in_one_forward():
    seen = []

    def model(x, t, caps):
        seen.append(len(caps))
        return torch.stack([torch.full(x.shape[1:], float(c.sum())) for c in caps])

    pos, neg = [torch.ones(1, 1) * 2], [torch.ones(1, 1) * 1]
    sample(model, torch.zeros(1, 1, 2, 2), sigma_schedule(1), pos, neg, cfg=3.0,
           callback=lambda i, n, x, d: seen.append(d[0, 0, 0, 0].item()))
    # one forward with 2 captions; u = 1 + 3 * (2 - 1) = 4; denoised = x + sigma * u = 0 + 1 * 4
    assert seen == [2, 4.0]


def test_cfg_one_runs_one_pass():
    seen = []
    sample(lambda x, t, c: seen.append(len(c)) or torch.zeros_like(x), torch.zeros(2, 1, 2, 2),
           sigma_schedule(3), [torch.ones(1, 1)] * 2)
    assert seen == [2, 2, 2]


def test_callback_can_stop_sampling():
    class Stop(Exception):
        pass

    def stop_at_two(i, n, x, d):
        if i == 2:
            raise Stop

    steps = []
    with pytest.raises(Stop):
        sample(lambda x, t, c: steps.append(1) or torch.zeros_like(x), torch.zeros(1, 1, 2, 2),
               sigma_schedule(8), [torch.ones(1, 1)], callback=stop_at_two)
    assert len(steps) == 2
