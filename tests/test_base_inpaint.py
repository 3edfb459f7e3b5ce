"""Z-Image Base's guidance and inpainting with the pack's nodes, against diffusers 0.42.1 on the same weights.

In a real ComfyUI server (0.30.0 and 0.3.75) over /prompt: the sampler with CFG and a negative, with diffusers'
cfg_normalization and cfg_truncation, against ZImagePipeline; Z-Image Inpaint Encode + the sampler against
ZImageInpaintPipeline. Each compares the final latent (SaveLatent) and the saved PNG. In-process: the guided steps
run cond and uncond as one batch, the truncated ones a single pass, and the variant warnings.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from zimage_dev.runtime import comfyui_tree, import_pack
from zimage_dev.diffusers_files import write_diffusers_folder
from zimage_dev.comfy_server import ComfyServer
from zimage_dev.diffusers_files import SAME_AS_DIFFUSERS, write_split_from_diffusers

SIZE = 64
FOLDER = "Z-Image-tiny"
SCALE, SHIFT = 0.3611, 0.1159            # the Flux VAE's latent scale and shift (the tiny folder's too)


@pytest.fixture(scope="module", params=["0.30.0", "0.3.75"])
def server(request, tmp_path_factory):
    comfyui_tree(request.param)
    base = tmp_path_factory.mktemp(f"base-inpaint-{request.param}")
    write_diffusers_folder(base / "models" / "diffusers" / FOLDER)
    write_split_from_diffusers(base / "models" / "diffusers" / FOLDER, base / "models")
    with ComfyServer(request.param, base) as srv:
        yield srv


@pytest.fixture(scope="module")
def pipe(server):
    from diffusers import ZImagePipeline
    return ZImagePipeline.from_pretrained(server.models / "diffusers" / FOLDER).to("cpu")


def job(prompt: str, negative: str, seed: int, prefix: str, **sampler) -> dict:
    """Split-file loader -> prompts -> the pack's sampler -> decode -> SaveImage, and SaveLatent of the result."""
    name = f"{SAME_AS_DIFFUSERS}.safetensors"
    inputs = {"seed": seed, "steps": 8, "cfg": 1.0, "shift": 3.0, "denoise": 1.0, "model": ["1", 0],
              "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0]}
    inputs.update(sampler)
    return {
        "1": {"class_type": "ZImageTurboLoader", "inputs": {"unet_name": name, "clip_name": name, "vae_name": name,
                                                            "weight_dtype": "auto"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "5": {"class_type": "ZImageTurboSampler", "inputs": inputs},
        "6": {"class_type": "ZImageTurboVAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"latents/{prefix}"}},
    }


def results(server, entry, image_node="7", latent_node="8"):
    """(PNG pixels as int16 HxWx3, the saved latent in the model's space (diffusers' latents))."""
    from safetensors.torch import load_file
    out = entry["outputs"]
    png = out[image_node]["images"][0]
    saved = out[latent_node]["latents"][0]
    pixels = np.asarray(Image.open(server.output / png["subfolder"] / png["filename"])).astype(np.int16)
    raw = load_file(str(server.output / saved["subfolder"] / saved["filename"]))["latent_tensor"]
    return pixels, (raw.float() - SHIFT) * SCALE


def decode(pipe, latents) -> np.ndarray:
    """diffusers' own decode of model-space latents, quantised as SaveImage does."""
    with torch.no_grad():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    image = (image / 2 + 0.5).clamp(0, 1)[0].movedim(0, -1).numpy()
    return np.clip(255.0 * image, 0, 255).astype(np.uint8).astype(np.int16)


def comfy_noise(seed: int) -> torch.Tensor:
    """ComfyUI's seed noise for one 64x64 latent: one CPU randn from the seed."""
    return torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed))


def compare(label, ours_png, ours_latent, ref_png, ref_latent):
    lat = ((ours_latent - ref_latent).abs().max() / ref_latent.abs().max()).item()
    png = int(np.abs(ours_png - ref_png).max())
    print(f"{label}: final latent rel. error {lat:.2e}, PNG max {png}/255 (image std {ref_png.std():.1f})")
    return lat, png


# ---- Base: CFG with a negative, cfg_normalization, cfg_truncation ------------------------------------------------

PROMPT, NEGATIVE = "一只白猫, a white cat on a red sofa", "blurry, 模糊, low quality"
CFG_CASES = {   # name: (steps, cfg, cfg_normalization, cfg_truncation)
    "base_preset": (50, 4.0, 0.0, 1.0),
    "normalization": (12, 4.0, 1.0, 1.0),
    "truncation": (12, 4.0, 0.0, 0.5),
    "both": (12, 5.0, 1.3, 0.7),
}
# fp32 on both sides; the only differences are the order of sums (core's attention kernel, x - denoised
# round trips), ~1e-6 per step. A wrong guidance formula, a norm over the wrong axes or a truncation one step off
# moves the latent by 1e-2 or more (the effects asserted below).
LATENT_TOL, PNG_TOL = 1e-4, 2


def diffusers_cfg_latent(pipe, steps, cfg, normalization, truncation, seed):
    return pipe(PROMPT, negative_prompt=NEGATIVE, height=SIZE, width=SIZE, num_inference_steps=steps,
                guidance_scale=cfg - 1.0, cfg_normalization=normalization, cfg_truncation=truncation,
                latents=comfy_noise(seed), output_type="latent").images


@pytest.mark.parametrize("case", CFG_CASES)
def test_base_cfg_matches_diffusers(server, pipe, case):
    steps, cfg, normalization, truncation = CFG_CASES[case]
    seed = 777
    wf = job(PROMPT, NEGATIVE, seed, f"base_{case}", steps=steps, cfg=cfg, variant="base",
             cfg_normalization=normalization, cfg_truncation=truncation)
    ours_png, ours_latent = results(server, server.run(wf))
    ref_latent = diffusers_cfg_latent(pipe, steps, cfg, normalization, truncation, seed)
    lat, png = compare(f"{server.version} base {case}", ours_png, ours_latent, decode(pipe, ref_latent), ref_latent)
    assert ours_latent.shape == ref_latent.shape
    assert lat <= LATENT_TOL and png <= PNG_TOL
    if normalization > 0 or truncation < 1:
        # the option acted: plain CFG at the same settings is far from it (in diffusers and here alike)
        plain = diffusers_cfg_latent(pipe, steps, cfg, 0.0, 1.0, seed)
        effect = ((plain - ref_latent).abs().max() / ref_latent.abs().max()).item()
        print(f"{server.version} base {case}: effect of the options on the latent {effect:.2e}")
        assert effect > 100 * LATENT_TOL


def test_old_prompts_without_the_new_inputs_still_run_the_same(server):
    """An API prompt saved before variant/cfg_normalization/cfg_truncation existed: same image as with their
    defaults, i.e. core's plain CFG."""
    old = job(PROMPT, NEGATIVE, 5, "old_prompt", steps=6, cfg=3.0)
    new = job(PROMPT, NEGATIVE, 5, "new_defaults", steps=6, cfg=3.0, variant="turbo", cfg_normalization=0.0,
              cfg_truncation=1.0)
    a, b = results(server, server.run(old)), results(server, server.run(new))
    assert np.array_equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_variant_warnings_reach_the_canvas(server):
    entry = server.run(job(PROMPT, NEGATIVE, 1, "warn_turbo", steps=4, cfg=2.0))
    warnings = entry["outputs"]["5"]["zimage"][0]["warnings"]
    assert len(warnings) == 1 and "cfg 1" in warnings[0]
    entry = server.run(job(PROMPT, NEGATIVE, 1, "warn_base", steps=8, cfg=4.0, variant="base"))
    warnings = entry["outputs"]["5"]["zimage"][0]["warnings"]
    assert len(warnings) == 1 and "8 steps" in warnings[0] and "distill LoRA" in warnings[0]
    entry = server.run(job(PROMPT, NEGATIVE, 1, "warn_none", steps=20, cfg=4.0, variant="base"))
    assert entry["outputs"]["5"]["zimage"][0]["warnings"] == []


@pytest.mark.parametrize("field,value,error", [("variant", "edit", "value_not_in_list"),
                                               ("cfg_truncation", 1.5, "value_bigger_than_max"),
                                               ("cfg_normalization", -1, "value_smaller_than_min")])
def test_bad_new_inputs_are_named(server, field, value, error):
    status, body = server.post_prompt(job(PROMPT, NEGATIVE, 1, "bad", **{field: value}))
    assert status == 400
    err = body["node_errors"]["5"]["errors"][0]
    assert err["type"] == error and err["extra_info"]["input_name"] == field


# ---- inpainting ------------------------------------------------------------------------------------------------

# A rectangle whose edges fall inside latent cells (pixels 12..40 x 20..52): diffusers takes each cell's top-left
# pixel (nearest), core's bilinear scaling the mean of its two middle ones, so cells at x 1, x 5 and y 2 differ
# (0 vs 0.5, 1 vs 0, 0 vs 0.5); and a faint stroke (0.3, kept by diffusers' binarisation) along the bottom.
MASK_BOX = (12, 20, 41, 53)
FAINT = 77
INPAINT_CASES = {   # name: (steps, denoise, cfg, cfg_normalization)
    "full": (8, 1.0, 1.0, 0.0),
    "denoise_0.5": (4, 0.5, 1.0, 0.0),
    "cfg_norm": (8, 1.0, 4.0, 1.0),
}


def write_inputs(server):
    g = torch.Generator().manual_seed(21)
    source = (torch.rand(3, 8, 8, generator=g).repeat_interleave(8, -1).repeat_interleave(8, -2) * 255).byte()
    mask = np.zeros((SIZE, SIZE, 3), np.uint8)
    x0, y0, x1, y1 = MASK_BOX
    mask[y0:y1, x0:x1] = 255
    mask[56:, :] = FAINT
    folder = server.base / "input"
    folder.mkdir(exist_ok=True)
    Image.fromarray(source.movedim(0, -1).numpy()).save(folder / "inpaint_source.png")
    Image.fromarray(mask).save(folder / "inpaint_mask.png")
    return Image.open(folder / "inpaint_source.png").convert("RGB"), Image.open(folder / "inpaint_mask.png")


def inpaint_job(seed, prefix, encode="pack", **sampler):
    wf = job("a golden teapot", NEGATIVE, seed, prefix, **sampler)
    wf["30"] = {"class_type": "LoadImage", "inputs": {"image": "inpaint_source.png"}}
    wf["31"] = {"class_type": "LoadImageMask", "inputs": {"image": "inpaint_mask.png", "channel": "red"}}
    if encode == "pack":
        wf["32"] = {"class_type": "ZImageInpaintEncode", "inputs": {"pixels": ["30", 0], "vae": ["1", 2],
                                                                    "mask": ["31", 0]}}
        wf["5"]["inputs"]["latent_image"] = ["32", 0]
    else:   # core's own: VAE Encode + Set Latent Noise Mask (the mask scaled bilinearly to the latent)
        wf["32"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["30", 0], "vae": ["1", 2]}}
        wf["33"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["32", 0], "mask": ["31", 0]}}
        wf["5"]["inputs"]["latent_image"] = ["33", 0]
    wf["34"] = {"class_type": "SaveLatent", "inputs": {"samples": ["32", 0], "filename_prefix": f"latents/{prefix}_src"}}
    return wf


def inpaint_pipe(pipe):
    """ZImageInpaintPipeline on the same components, except that its VAE's posterior has no spread: diffusers
    samples the image latent with its generator where ComfyUI takes the mean. Only the log-variance half of the
    encoder's last conv changes (ComfyUI never reads it), so the mean, the decoder and all else are the same."""
    from diffusers import ZImageInpaintPipeline
    vae = copy.deepcopy(pipe.vae)
    conv = vae.encoder.conv_out
    half = conv.out_channels // 2
    with torch.no_grad():
        conv.weight[half:] = 0
        conv.bias[half:] = -30.0                        # std exp(-15) = 3e-7: the sample is the mean
    return ZImageInpaintPipeline(**{**pipe.components, "vae": vae})


@pytest.mark.parametrize("case", INPAINT_CASES)
def test_inpaint_matches_diffusers(server, pipe, case):
    steps, denoise, cfg, normalization = INPAINT_CASES[case]
    seed = 4321
    source, mask = write_inputs(server)
    entry = server.run(inpaint_job(seed, f"inpaint_{case}", steps=steps, denoise=denoise, cfg=cfg,
                                   cfg_normalization=normalization))
    ours_png, ours_latent = results(server, entry)
    _, image_latent = results(server, entry, latent_node="34")

    ref_pipe = inpaint_pipe(pipe)
    noise = comfy_noise(seed)
    total = int(steps / denoise)
    kwargs = dict(image=source, mask_image=mask, strength=denoise, height=SIZE, width=SIZE,
                  num_inference_steps=total, guidance_scale=cfg - 1.0, cfg_normalization=normalization,
                  negative_prompt=NEGATIVE if cfg > 1 else None, output_type="latent")
    # ComfyUI's start: the image latent noised to the first sigma with the seed's noise (the noise itself at
    # denoise 1). diffusers takes it as `latents` and draws its blending noise first from the generator: the
    # same seed gives the same noise.
    ref_pipe("a golden teapot", latents=noise, generator=torch.Generator().manual_seed(seed), **kwargs)
    sigma0 = ref_pipe.scheduler.sigmas[total - steps]
    start = sigma0 * noise + (1 - sigma0) * image_latent
    ref_latent = ref_pipe("a golden teapot", latents=start, generator=torch.Generator().manual_seed(seed),
                          **kwargs).images
    lat, png = compare(f"{server.version} inpaint {case}", ours_png, ours_latent, decode(pipe, ref_latent),
                       ref_latent)
    assert lat <= LATENT_TOL and png <= PNG_TOL

    # only the masked region changed: outside it the result is the image's latent; inside, it is not
    keep = torch.nn.functional.interpolate((torch.from_numpy(np.asarray(mask)[..., 0] >= 128).float())[None, None],
                                           size=(SIZE // 8, SIZE // 8), mode="nearest") == 0
    keep = keep.expand_as(ours_latent)
    outside = (ours_latent - image_latent).abs()[keep].max().item() / image_latent.abs().max().item()
    inside = (ours_latent - image_latent).abs()[~keep].max().item() / image_latent.abs().max().item()
    print(f"{server.version} inpaint {case}: change outside the mask {outside:.2e}, inside {inside:.2e}")
    assert outside <= LATENT_TOL and inside > 0.1


def test_core_set_latent_noise_mask_is_not_diffusers_at_the_seams(server, pipe):
    """Why the pack has its own encode node: the same job with core's VAE Encode + Set Latent Noise Mask (the mask
    scaled bilinearly, so seam cells are blended fractionally) against the pack's node. Printed, and asserted to
    differ, so that the day core's rule becomes diffusers' this test says the node is no longer needed."""
    write_inputs(server)
    ours = results(server, server.run(inpaint_job(4321, "seam_pack", steps=8)))
    core = results(server, server.run(inpaint_job(4321, "seam_core", encode="core", steps=8)))
    rel = ((ours[1] - core[1]).abs().max() / ours[1].abs().max()).item()
    print(f"{server.version} inpaint: core SetLatentNoiseMask vs the pack's node: latent {rel:.2e}, "
          f"PNG max {np.abs(ours[0] - core[0]).max()}/255")
    assert rel > 100 * LATENT_TOL


def test_an_empty_mask_runs_with_a_warning_and_a_mask_of_another_size_is_scaled(server):
    """Load Image's placeholder (an empty mask) runs, nothing repainted, and the node and the console say why; a
    mask of another size is scaled to the image as core's inpaint nodes scale theirs (a solid 32x32 mask acts as
    the solid 64x64 one)."""
    write_inputs(server)
    wf = inpaint_job(1, "empty_mask")
    wf["31"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": SIZE, "height": SIZE}}
    log_before = len(server.log_text())
    entry = server.run(wf, timeout=300)
    warnings = entry["outputs"]["32"]["zimage"][0]["warnings"]
    assert len(warnings) == 1 and "the mask is empty" in warnings[0] and "MaskEditor" in warnings[0]
    assert "the mask is empty" in server.log_text()[log_before:]
    png, latent = results(server, entry)
    source = load_latent(server, entry, "34")
    assert (latent - source).abs().max() <= 1e-6 * source.abs().max()          # nothing repainted
    runs = []
    for side in (32, SIZE):
        wf = inpaint_job(1, f"solid_{side}")
        wf["31"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": side, "height": side}}
        entry = server.run(wf, timeout=300)
        assert entry["outputs"]["32"]["zimage"][0]["warnings"] == []
        runs.append(results(server, entry))
    assert np.array_equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def load_latent(server, entry, node):
    from safetensors.torch import load_file
    saved = entry["outputs"][node]["latents"][0]
    raw = load_file(str(server.output / saved["subfolder"] / saved["filename"]))["latent_tensor"]
    return (raw.float() - SHIFT) * SCALE


def test_a_mask_that_is_not_a_mask_is_an_error_naming_it():
    inpaint = import_pack("nodes.inpaint")
    with pytest.raises(ValueError, match="mask has shape"):
        inpaint.latent_mask(torch.zeros(1, 1, 8, 8), 8, 8, 8, 8)
    with pytest.raises(ValueError, match="NaN or infinite"):
        inpaint.latent_mask(torch.full((1, 8, 8), float("nan")), 8, 8, 8, 8)


# ---- in-process: what one guided step costs ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def parts(tiny_files):
    loaders = import_pack("nodes.loaders")
    return loaders.load_parts(tiny_files.dit, tiny_files.text_encoder, tiny_files.vae, "auto")


def model_calls(parts, **sampler):
    """The batch size of every forward of the DiT during one run of the pack's sampler (core's public
    model_function_wrapper sees each call), with the result."""
    model, clip, _ = parts
    sampling = import_pack("nodes.sampling")
    encode = lambda text: clip.encode_from_tokens_scheduled(clip.tokenize(text))  # noqa: E731
    sizes = []

    def count(apply_model, args):
        sizes.append(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])
    watched = model.clone()
    watched.set_model_unet_function_wrapper(count)
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    out = sampling.ZImageTurboSampler().run(watched, encode("a cat"), latent, 3, sampler.pop("steps"),
                                            sampler.pop("cfg"), 3.0, 1.0, negative=encode("blurry"), **sampler)
    return sizes, out


def test_cfg_runs_cond_and_uncond_as_one_batch_and_truncated_steps_once(parts):
    sizes, _ = model_calls(parts, steps=6, cfg=4.0)
    assert sizes == [2] * 6                                   # one forward per step, both prompts in it
    sizes, _ = model_calls(parts, steps=6, cfg=4.0, cfg_truncation=0.5)
    # sigmas 1, .94, .86, .75, .6, .38 at shift 3: t_norm = 1 - sigma exceeds 0.5 on the last step only
    assert sizes == [2] * 5 + [1]
    sizes, _ = model_calls(parts, steps=6, cfg=1.0, cfg_normalization=1.0)
    assert sizes == [1] * 6                                   # cfg 1: the options have nothing to act on


def test_cfg_truncation_never_reads_the_step_sigma(monkeypatch):
    """The truncated steps are decided once from the schedule the sampler node holds on the host; the guidance
    functions never read the step's sigma (on a GPU each read is a device sync). Here it is on the meta
    device, where any read fails; the steps cut are the ones t_norm gives."""
    import comfy.samplers
    sampling = import_pack("nodes.sampling")
    from zimage_core.sampling import sigma_schedule
    sigmas = sigma_schedule(6, 3.0, 1.0)
    truncated = sampling.Truncation(sigmas, 0.5)
    cfg_function, calc_cond_batch = sampling.diffusers_cfg(0.0, truncated)
    passes = []
    monkeypatch.setattr(comfy.samplers, "calc_cond_batch",
                        lambda model, conds, x, sigma, options: passes.append(len(conds)) or [None] * len(conds))
    unreadable = torch.empty(1, device="meta")
    guided = []
    for step in range(6):
        truncated.step = step                              # what euler_flow does before each model call
        calc_cond_batch({"conds": [["pos"], ["neg"]], "model": None, "input": None, "sigma": unreadable,
                         "model_options": {}})
        out = cfg_function({"cond": torch.ones(1), "uncond": torch.zeros(1), "cond_scale": 4.0, "sigma": unreadable})
        guided.append(out.item())
    assert passes == [2] * 5 + [1] and guided == [4.0] * 5 + [1.0]
    assert truncated.skip == [sampling.t_norm(s) > 0.5 for s in sigmas[:-1]]


def test_the_input_model_is_left_unpatched(parts):
    model = parts[0]
    model_calls(parts, steps=2, cfg=4.0, cfg_normalization=1.0, cfg_truncation=0.5)
    assert "sampler_cfg_function" not in model.model_options
    assert "sampler_calc_cond_batch_function" not in model.model_options


def test_a_model_with_another_cfg_function_is_refused_by_name(parts):
    model, clip, _ = parts
    sampling = import_pack("nodes.sampling")
    other = model.clone()
    other.set_model_sampler_cfg_function(lambda args: args["cond"])
    with pytest.raises(ValueError, match="cfg_normalization 0 and cfg_truncation 1"):
        sampling.with_guidance(other, 4.0, 1.0, 1.0, torch.ones(3))
    assert sampling.with_guidance(other, 4.0, 0.0, 1.0, torch.ones(3)) == (other, None)   # options off: core's path


@pytest.mark.parametrize("variant,steps,cfg,lora,expected", [
    ("turbo", 8, 1.0, False, []), ("turbo", 8, 1.5, False, ["cfg 1"]), ("base", 50, 4.0, False, []),
    ("base", 8, 4.0, False, ["distill LoRA"]), ("base", 8, 1.0, True, []), ("base", 9, 4.0, False, []),
])
def test_variant_warnings(variant, steps, cfg, lora, expected):
    sampling = import_pack("nodes.sampling")
    found = sampling.variant_warnings(variant, steps, cfg, lora)
    assert len(found) == len(expected) and all(e in f for e, f in zip(expected, found))
