"""End to end: a tiny diffusers ZImagePipeline saved as a diffusers folder, loaded by our loader, run by our
pipeline with the same noise and prompt: same final latent and image."""
from __future__ import annotations

import pytest
import torch

from zimage_dev.parity import rel_err
from zimage_dev.runtime import tokenizer_dir
from zimage_dev.diffusers_files import write_diffusers_folder
from zimage_core.config import check_size
from zimage_core.pipeline import ZImagePipeline, load_zimage

TOL = 1e-4
PROMPT = "一位穿着汉服的女孩站在樱花树下,左侧有一只白猫 — a girl in hanfu under a cherry tree"


@pytest.fixture(scope="module")
def diffusers_pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffusers") / "Z-Image-Turbo-tiny"
    return write_diffusers_folder(folder), folder


@pytest.fixture(scope="module")
def ours(diffusers_pipeline):
    _, folder = diffusers_pipeline
    return ZImagePipeline(load_zimage(folder))


def test_the_folder_loads_in_diffusers_layout(diffusers_pipeline, ours):
    _, folder = diffusers_pipeline
    assert any(folder.glob("transformer/*.index.json")), "the fixture should write a sharded transformer"
    layouts = [r.layout for r in ours.models.reports]
    assert layouts[0] == "diffusers (diffusers folder)" and layouts[2].startswith("diffusers")


@pytest.mark.parametrize("steps,width,height", [(8, 64, 64), (3, 96, 48)])
def test_final_latent_and_image_match_diffusers(diffusers_pipeline, ours, steps, width, height):
    pipe, _ = diffusers_pipeline
    noise = torch.randn(1, 16, height // 8, width // 8, generator=torch.Generator().manual_seed(7))
    ref = pipe(PROMPT, height=height, width=width, num_inference_steps=steps, guidance_scale=0.0,
               latents=noise.clone(), output_type="latent").images
    mine = ours(PROMPT, width=width, height=height, steps=steps, cfg=1.0, noise=noise.clone(), output="latent")
    abs_err, rel = rel_err(mine, ref)
    print(f"pipeline latent {steps} steps {width}x{height}: max abs {abs_err:.2e}, rel {rel:.2e}")
    assert rel <= TOL

    ref_img = pipe(PROMPT, height=height, width=width, num_inference_steps=steps, guidance_scale=0.0,
                   latents=noise.clone(), output_type="pt").images            # (B, 3, H, W) in [0, 1]
    img = ours.decode(mine)
    abs_err, rel = rel_err(img.movedim(-1, 1), ref_img)
    print(f"pipeline image: max abs {abs_err:.2e}")
    assert abs_err <= TOL


def test_cfg_matches_diffusers_guidance(diffusers_pipeline, ours):
    """diffusers guidance s is pos + s (pos - neg); ComfyUI's cfg = s + 1 is the same prediction."""
    pipe, _ = diffusers_pipeline
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(8))
    prompts, negatives = ["a red fox", "一只猫"], ["blurry", "模糊"]
    # Seen with diffusers 0.42.1: its batched CFG call with captions of different lengths is not repeatable
    # (two identical calls came out ~1.2 apart), while one prompt at a time is. So the reference runs per sample
    # and ours runs the whole batch, cond and uncond in one forward.
    settled = torch.cat([pipe(p, negative_prompt=n, height=64, width=64, num_inference_steps=4, guidance_scale=2.5,
                              latents=noise[i:i + 1].clone(), output_type="latent").images
                         for i, (p, n) in enumerate(zip(prompts, negatives))])
    mine = ours(prompts, negatives, width=64, height=64, steps=4, cfg=3.5, noise=noise.clone(), output="latent")
    abs_err, rel = rel_err(mine, settled)
    print(f"pipeline cfg latent: max abs {abs_err:.2e}, rel {rel:.2e}")
    assert rel <= TOL


def test_seeded_batch_is_deterministic_and_distinct(ours):
    a = ours("a cup", width=32, height=32, steps=2, seed=5, batch_size=2, output="latent")
    b = ours("a cup", width=32, height=32, steps=2, seed=5, batch_size=2, output="latent")
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])


def test_img2img_starts_from_the_image(ours):
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    start = ours.encode_image(image)
    kwargs = dict(width=32, height=32, steps=2, seed=3, output="latent")
    light = ours("a cup", denoise=0.02, image=image, **kwargs)
    full = ours("a cup", denoise=1.0, image=image, **kwargs)
    # a light touch stays near the encoded image; full denoising ignores it and equals text-to-image
    assert rel_err(light, start)[1] < 0.5 * rel_err(full, start)[1]
    assert torch.equal(full, ours("a cup", **kwargs))


@pytest.mark.parametrize("w,h", [(904, 1024), (0, 64), (64, -16)])
def test_bad_sizes_are_named(w, h):
    with pytest.raises(ValueError, match="multiple of 16"):
        check_size(w, h)


def test_precision_policy():
    from zimage_core.precision import choose_dtypes
    cpu = choose_dtypes("cpu")
    assert (cpu.dit, cpu.text_encoder, cpu.vae) == (torch.float32,) * 3
    half = choose_dtypes("cpu", "fp16")
    assert half.dit == torch.float16 and half.vae == torch.float32      # the VAE is never fp16
    assert half.text_encoder == torch.float32                          # only the DiT has the fp16 guard
    assert choose_dtypes("cpu", "bf16").vae == torch.bfloat16
    fp8 = choose_dtypes("cpu", "fp8_e4m3fn")
    assert fp8.dit_fp8 and fp8.dit == torch.float32 and fp8.text_encoder == torch.float32
    assert not fp8.dit_fp8_matmul
    fast = choose_dtypes("cpu", "fp8_e4m3fn_fast")
    assert fast.dit_fp8 and fast.dit_fp8_matmul and fast.dit == torch.float32
    with pytest.raises(ValueError, match="weight dtype must be"):
        choose_dtypes("cpu", "int4")


@pytest.mark.parametrize("bf16,expected", [(True, (torch.bfloat16,) * 3),
                                           (False, (torch.float16, torch.float32, torch.float32))])
def test_precision_policy_on_gpus(monkeypatch, bf16, expected):
    """GPUs without bf16 (Turing, Volta) get the fp16-guarded DiT, not fp32's double memory."""
    from zimage_core import precision
    monkeypatch.setattr(precision, "has_bf16", lambda device: bf16)
    d = precision.choose_dtypes("cuda")
    assert (d.dit, d.text_encoder, d.vae) == expected


def test_pre_ampere_gpus_get_the_fp16_path_even_where_torch_says_bf16(monkeypatch):
    """A T4 (7.5) in cuda:0 next to an A100 (8.0) in cuda:1. torch >= 2.3 answers is_bf16_supported() True on
    the T4 too (it can emulate bf16), and about the current device whatever device is asked: both are faked as
    torch answers them, so only the capability of the *given* device may decide."""
    from zimage_core import precision
    capabilities = {0: (7, 5), 1: (8, 0)}
    asked = []

    def capability(device=None):
        index = torch.device(device).index if device is not None else 0
        asked.append(index)
        return capabilities[index or 0]
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)     # the A100 is current; the T4 is asked
    turing = precision.choose_dtypes("cuda:0")
    assert (turing.dit, turing.text_encoder, turing.vae) == (torch.float16, torch.float32, torch.float32)
    assert precision.choose_dtypes("cuda:0", "fp8_e4m3fn").dit == torch.float16    # fp8 computes in fp16 there
    ampere = precision.choose_dtypes("cuda:1")
    assert (ampere.dit, ampere.text_encoder, ampere.vae) == (torch.bfloat16,) * 3
    assert 0 in asked and 1 in asked


# Two copies of the same fp32 weights in different memory: CPU kernels may still round a few ulps apart (they
# took different paths by the weight's address mod 64 until loading gave every weight aligned memory of its own,
# measured 5e-7 apart then; a BLAS may also split a reduction by the threads it gets on a loaded machine). The
# bound is a few fp32 ulps of the output's scale; a wrong or swapped weight moves it by orders more.
ROUND_TRIP = 1e-5


def test_diffusers_folder_and_split_files_give_identical_outputs(ours, tmp_path):
    """Round trip: what we loaded from the diffusers folder, written as ComfyUI split files, loads back with
    every weight bit for bit equal, and computes the same images to fp32 rounding (ROUND_TRIP)."""
    from safetensors.torch import save_file
    m = ours.models
    paths = [tmp_path / n for n in ("dit.safetensors", "te.safetensors", "ae.safetensors")]
    for module, path in zip((m.dit, m.text_encoder, m.vae), paths):
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    split = ZImagePipeline(load_zimage(*paths, tokenizer=tokenizer_dir()))
    assert [r.layout for r in split.models.reports] == ["comfyui (file)", "file", "comfyui/bfl (file)"]
    for a, b in zip((m.dit, m.text_encoder, m.vae), (split.models.dit, split.models.text_encoder, split.models.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    kwargs = dict(width=32, height=48, steps=2, seed=9)
    for output in ("latent", "image"):
        abs_err, rel = rel_err(split(PROMPT, output=output, **kwargs), ours(PROMPT, output=output, **kwargs))
        print(f"round trip {output}: max abs {abs_err:.1e}, rel {rel:.1e}")
        assert rel <= ROUND_TRIP
