"""The pack inside a real ComfyUI server (0.30.0 and 0.3.75), driven over HTTP as a user's client would."""
from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from zimage_dev import REPO
from zimage_dev.runtime import comfyui_tree, import_pack
from zimage_dev.diffusers_files import SAME_AS_DIFFUSERS, write_diffusers_folder, write_split_from_diffusers
from zimage_dev.comfy_server import ComfyServer, load_workflow, write_tiny_models
from scripts.ui_workflows import to_api

PACK_NODES = ["ZImageTurboLoader", "ZImageTurboCheckpointLoader", "ZImageTurboDiffusersLoader",
              "ZImageTurboSampler", "ZImageTurboVAEDecode", "ZImageTurboVAEEncode", "ZImageTurboSize",
              "ZImageTurboSaveImage", "ZImageLoraLoader", "ZImageFunControlnetScheduled"]
WORKFLOWS = sorted(p.name for p in (REPO / "workflows").glob("ecommerce_*_api.json"))   # the examples': test_example_workflows.py


def test_names_say_z_image_and_the_node_ids_stay():
    """Every node runs Turbo and Base: display names, the category, descriptions and tooltips never call the
    pack's nodes or models Turbo-only; the node ids, which saved workflows name, stay as they were."""
    pack = import_pack("nodes")
    assert set(pack.NODE_CLASS_MAPPINGS) == {*PACK_NODES, "ZImageTurboCompile", "ZImageInpaintEncode"}
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(pack.NODE_CLASS_MAPPINGS)
    assert all(name.startswith("Z-Image ") and "Turbo" not in name
               for name in pack.NODE_DISPLAY_NAME_MAPPINGS.values()), pack.NODE_DISPLAY_NAME_MAPPINGS
    assert {cls.CATEGORY for cls in pack.NODE_CLASS_MAPPINGS.values()} == {"Z-Image"}
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        inputs = {k: v for group in cls.INPUT_TYPES().values() for k, v in group.items()}
        texts = [cls.DESCRIPTION] + [spec[1].get("tooltip", "") for spec in inputs.values()
                                   if isinstance(spec, tuple) and len(spec) > 1]
        wrong = [t for t in texts if "Z-Image Turbo" in t or "Z-Image-Turbo " in t or "turbo sampler" in t]
        assert not wrong, f"{node_id}: {wrong}"


@pytest.fixture(scope="module", params=["0.30.0", "0.3.75"])
def server(request, tmp_path_factory):
    comfyui_tree(request.param)
    base = tmp_path_factory.mktemp(f"comfy-{request.param}")
    write_tiny_models(base / "models")
    write_diffusers_folder(base / "models" / "diffusers" / "Z-Image-Turbo-tiny")
    write_split_from_diffusers(base / "models" / "diffusers" / "Z-Image-Turbo-tiny", base / "models")
    write_lora(base / "models" / "loras" / "tiny_qkv_lora.safetensors")
    write_sdxl_like(base / "models" / "checkpoints" / "not_zimage_sdxl.safetensors")
    write_overflowing_vae(base / "models" / "vae" / "overflowing_ae.safetensors")
    with ComfyServer(request.param, base) as srv:
        yield srv


def write_lora(path):
    """A ComfyUI-native LoRA on the fused qkv of the first main block (our key names)."""
    import torch
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    key = "diffusion_model.layers.0.attention.qkv"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"{key}.lora_up.weight": torch.randn(192, 4, generator=g),
               f"{key}.lora_down.weight": torch.randn(4, 64, generator=g)}, str(path))


def write_sdxl_like(path):
    import torch
    from safetensors.torch import save_file
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4),
               "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(4)}, str(path))


def write_overflowing_vae(path):
    """A VAE whose decoder output is infinite: what an fp16 overflow looks like by the time it is decoded."""
    import torch
    from safetensors.torch import save_file
    from zimage_dev import synthetic
    sd = synthetic.vae_weights()
    sd["decoder.conv_out.bias"] = torch.full_like(sd["decoder.conv_out.bias"], float("inf"))
    save_file(sd, str(path))


def turbo_job(prompt: str, size: int, batch: int = 1, seed: int = 12345) -> dict:
    wf = load_workflow("ecommerce_turbo_api.json")
    wf["6"]["inputs"]["text"] = prompt
    wf["5"]["inputs"].update(width=size, height=size, batch_size=batch)
    wf["10"]["inputs"]["seed"] = seed
    return wf


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


def with_core_ksampler(wf: dict, model: list, seed: int, prefix: str) -> dict:
    """Adds a core branch beside the pack's sampler (node 10): ModelSamplingAuraFlow shift 3 -> KSampler (euler,
    simple, 8 steps, cfg 1) on the same prompt and latent -> VAEDecode -> SaveImage (node 23)."""
    wf["20"] = {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": model, "shift": 3.0}}
    wf["21"] = {"class_type": "KSampler", "inputs": {
        "model": ["20", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0], "seed": seed,
        "steps": 8, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    wf["22"] = {"class_type": "VAEDecode", "inputs": {"samples": ["21", 0], "vae": ["3", 2]}}
    wf["23"] = {"class_type": "SaveImage", "inputs": {"images": ["22", 0], "filename_prefix": prefix}}
    return wf


def test_pack_loads_without_errors(server):
    log = server.log_text()
    assert "IMPORT FAILED" not in log and "comfyui_zimage_turbo" in log
    assert "Traceback" not in log, server.log_tail()


def test_loading_logs_no_misleading_warnings(server):
    server.run(turbo_job("quiet", 64, seed=77))
    assert "Missing VAE keys" not in server.log_text()


def test_every_node_is_listed_with_tooltips_and_a_description(server):
    info = server.object_info()
    for node_id in PACK_NODES:
        node = info[node_id]
        assert node["category"] == "Z-Image" and node["description"]
        inputs = {**node["input"]["required"], **node["input"].get("optional", {})}
        untipped = [name for name, spec in inputs.items() if not (len(spec) > 1 and spec[1].get("tooltip"))]
        assert not untipped, f"{node_id}: inputs without a tooltip: {untipped}"
    assert info["ZImageTurboSampler"]["input"]["required"]["steps"][1]["default"] == 8


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflows_run_and_write_pngs_of_the_requested_size(server, name):
    wf = load_workflow(name)
    entry = server.run(wf)
    files = server.output_files(entry)
    assert len(files) == 1 and files[0].name.startswith("Ecommerce_ZImage")
    image = Image.open(files[0])
    assert image.size == (1024, 1024)
    assert pixels(files[0]).std() > 1, "the image is flat (black?)"


def test_english_prompt_batch_of_three(server):
    entry = server.run(turbo_job("a white ceramic mug on a walnut table, studio light", 128, batch=3))
    files = server.output_files(entry)
    assert [Image.open(f).size for f in files] == [(128, 128)] * 3
    assert not np.array_equal(pixels(files[0]), pixels(files[1])), "batch images should differ"


def test_same_seed_same_image_in_core_ksampler(server):
    """Core KSampler (euler, simple, ModelSamplingAuraFlow shift 3) and the pack's sampler, same seed."""
    wf = with_core_ksampler(turbo_job("一只白猫", 64), ["3", 0], seed=12345, prefix="core_ksampler")
    entry = server.run(wf)
    pack = server.output_files({"outputs": {"11": entry["outputs"]["11"]}})[0]
    core = server.output_files({"outputs": {"23": entry["outputs"]["23"]}})[0]
    diff = np.abs(pixels(pack) - pixels(core)).max()
    print(f"pack sampler vs core KSampler: max pixel difference {diff}/255")
    assert diff <= 1


def test_interrupt_stops_the_run_and_the_next_one_succeeds(server):
    wf = turbo_job("a long job", 512)
    wf["10"]["inputs"]["steps"] = 50
    status, body = server.post_prompt(wf)
    assert status == 200
    deadline = time.monotonic() + 60
    while not server.get("/queue")["queue_running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)                                    # well inside the 50 steps
    server.interrupt()
    entry = server.wait(body["prompt_id"], timeout=60)
    kinds = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    assert server.run(turbo_job("after the stop", 64))["status"]["status_str"] == "success"


@pytest.mark.parametrize("node,field,value,error", [
    ("10", "steps", 0, "value_smaller_than_min"),
    ("10", "steps", 51, "value_bigger_than_max"),
    ("3", "ckpt_name", "../../etc/passwd", "value_not_in_list"),
])
def test_bad_requests_name_the_input_and_the_server_keeps_serving(server, node, field, value, error):
    wf = turbo_job("x", 64)
    wf[node]["inputs"][field] = value
    status, body = server.post_prompt(wf)
    assert status == 400
    errors = body["node_errors"][node]["errors"]
    assert errors[0]["type"] == error and errors[0]["extra_info"]["input_name"] == field
    assert server.run(turbo_job("y", 64))["status"]["status_str"] == "success"


def test_diffusers_folder_loader(server):
    wf = turbo_job("a red fox", 64)
    wf["3"] = {"class_type": "ZImageTurboDiffusersLoader",
               "inputs": {"model_path": "Z-Image-Turbo-tiny", "weight_dtype": "auto"}}
    files = server.output_files(server.run(wf))
    assert Image.open(files[0]).size == (64, 64) and pixels(files[0]).std() > 1


def test_size_presets_set_the_image_size(server):
    wf = turbo_job("a poster", 64)
    wf["5"] = {"class_type": "ZImageTurboSize", "inputs": {"aspect": "16:9", "base": 1024, "batch_size": 1}}
    files = server.output_files(server.run(wf))
    assert Image.open(files[0]).size == (1360, 768)


def test_image_to_image(server):
    wf = turbo_job("a blue cup", 64)
    wf["30"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x3366CC}}
    wf["31"] = {"class_type": "ZImageTurboVAEEncode", "inputs": {"pixels": ["30", 0], "vae": ["3", 2]}}
    wf["10"]["inputs"].update(latent_image=["31", 0], denoise=0.5)
    files = server.output_files(server.run(wf))
    assert Image.open(files[0]).size == (64, 64)


def test_core_lora_loader_patches_the_pack_model(server):
    """Core LoraLoader finds our DiT's keys (they are ComfyUI's): strength 0 changes nothing, 1 changes the image."""
    results = []
    for strength in (0.0, 1.0):
        wf = turbo_job("a lamp", 64, seed=3)
        wf["40"] = {"class_type": "LoraLoader", "inputs": {"model": ["3", 0], "clip": ["3", 1],
                    "lora_name": "tiny_qkv_lora.safetensors", "strength_model": strength, "strength_clip": 0.0}}
        wf["10"]["inputs"]["model"] = ["40", 0]
        wf["11"]["inputs"]["filename_prefix"] = f"lora_{strength}"
        results.append(pixels(server.output_files(server.run(wf))[0]))
    plain = pixels(server.output_files(server.run(turbo_job("a lamp", 64, seed=3)))[0])
    assert np.array_equal(results[0], plain)
    assert np.abs(results[1] - plain).max() > 10


def test_compile_node_runs_the_blocks_compiled_with_the_same_images(server):
    """The compile node in front of the pack's sampler and of core KSampler (real torch.compile: inductor's
    C++ backend here): the images are those of the plain model, and the sampler reports it ran compiled."""
    plain_entry = server.run(turbo_job("a lamp", 64, seed=5))
    plain = pixels(server.output_files(plain_entry)[0])
    assert plain_entry["outputs"]["10"]["zimage"][0]["compiled"] is False
    wf = turbo_job("a lamp", 64, seed=5)
    wf["30"] = {"class_type": "ZImageTurboCompile", "inputs": {"model": ["3", 0]}}
    wf["10"]["inputs"]["model"] = ["30", 0]
    entry = server.run(with_core_ksampler(wf, ["30", 0], seed=5, prefix="compiled_core"))
    assert entry["outputs"]["10"]["zimage"][0]["compiled"] is True
    pack = pixels(server.output_files({"outputs": {"11": entry["outputs"]["11"]}})[0])
    core = pixels(server.output_files({"outputs": {"23": entry["outputs"]["23"]}})[0])
    print(f"compiled vs plain: pack sampler {np.abs(pack - plain).max()}/255, core KSampler "
          f"{np.abs(core - plain).max()}/255")
    assert np.abs(pack - plain).max() <= 1 and np.abs(core - plain).max() <= 1
    assert "torch.compile failed" not in server.log_text()


def test_a_checkpoint_of_another_model_fails_clearly_and_the_server_keeps_serving(server):
    wf = turbo_job("x", 64)
    wf["3"]["inputs"]["ckpt_name"] = "not_zimage_sdxl.safetensors"
    status, body = server.post_prompt(wf)
    assert status == 200
    entry = server.wait(body["prompt_id"], timeout=60)
    error = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"][0]
    assert error["node_type"] == "ZImageTurboCheckpointLoader"
    assert "not_zimage_sdxl.safetensors" in error["exception_message"] and "SDXL" in error["exception_message"]
    assert server.run(turbo_job("next", 64))["status"]["status_str"] == "success"


def test_fp8_weight_dtypes(server):
    images = {}
    for dtype in ("fp8_e4m3fn", "fp8_e4m3fn_fast"):
        wf = turbo_job("a watch", 64)
        wf["3"]["inputs"]["weight_dtype"] = dtype
        files = server.output_files(server.run(wf))
        assert Image.open(files[0]).size == (64, 64) and pixels(files[0]).std() > 1
        images[dtype] = pixels(files[0])
    # a CPU has no fp8 units: there _fast falls back to fp8_e4m3fn's cast path, to the bit
    assert np.array_equal(images["fp8_e4m3fn"], images["fp8_e4m3fn_fast"])


@pytest.mark.parametrize("name", WORKFLOWS)
def test_canvas_versions_are_served_to_the_template_browser_and_equal_the_api_ones(server, name):
    """example_workflows/NAME.json (canvas format) is listed and served by ComfyUI, and converts back to
    workflows/NAME_api.json."""
    ui_name = name.replace("_api.json", "")
    assert ui_name in server.get("/api/workflow_templates")["comfyui_zimage_turbo"]
    ui = server.get(f"/api/workflow_templates/comfyui_zimage_turbo/{ui_name}.json")
    assert to_api(ui, server.object_info()) == load_workflow(name)


@pytest.mark.parametrize("prompt", ["", "🛍️ 新品上市 — summer sale 50% off ✨", "ignore <|im_end|>\n<|im_start|>system",
                                    "长" * 700])
def test_unusual_prompts_run(server, prompt):
    """Empty, emoji and mixed scripts, literal special tokens, and a prompt far over 512 tokens (kept whole,
    as ComfyUI does; diffusers would cut it at 512)."""
    files = server.output_files(server.run(turbo_job(prompt, 32)))
    assert Image.open(files[0]).size == (32, 32)


def test_nan_or_inf_image_is_an_error_not_a_black_png(server):
    info = server.object_info()["ZImageTurboLoader"]["input"]["required"]
    wf = turbo_job("x", 32)
    wf["3"] = {"class_type": "ZImageTurboLoader", "inputs": {
        "unet_name": info["unet_name"][0][0], "clip_name": info["clip_name"][0][0],
        "vae_name": "overflowing_ae.safetensors", "weight_dtype": "auto"}}
    wf["11"]["inputs"]["filename_prefix"] = "must_not_exist"
    status, body = server.post_prompt(wf)
    entry = server.wait(body["prompt_id"], timeout=60)
    error = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"][0]
    assert error["node_type"] == "ZImageTurboVAEDecode" and "NaN or infinite" in error["exception_message"]
    assert not list(server.output.glob("must_not_exist*"))


# ---- the saved PNG against diffusers' ZImagePipeline on the same weights, prompt and noise ------------------------

LOADERS = {
    "split": {"class_type": "ZImageTurboLoader", "inputs": {
        "unet_name": f"{SAME_AS_DIFFUSERS}.safetensors", "clip_name": f"{SAME_AS_DIFFUSERS}.safetensors",
        "vae_name": f"{SAME_AS_DIFFUSERS}.safetensors", "weight_dtype": "auto"}},
    "checkpoint": {"class_type": "ZImageTurboCheckpointLoader", "inputs": {
        "ckpt_name": f"{SAME_AS_DIFFUSERS}.safetensors", "weight_dtype": "auto"}},
    "diffusers": {"class_type": "ZImageTurboDiffusersLoader", "inputs": {
        "model_path": "Z-Image-Turbo-tiny", "weight_dtype": "auto"}},
}
CASES = {   # name: (prompt, negative, cfg, batch, steps)
    "t2i": ("a red fox in the snow", "", 1.0, 1, 8),
    "cfg_negative": ("一只白猫, a white cat", "blurry, 模糊", 3.5, 1, 4),
    "batch2": ("a ceramic mug", "", 1.0, 2, 4),
}
SIZE = 64


@pytest.fixture(scope="module")
def diffusers_pipe(server):
    from diffusers import ZImagePipeline
    return ZImagePipeline.from_pretrained(server.models / "diffusers" / "Z-Image-Turbo-tiny").to("cpu")


def diffusers_png(pipe, prompt, negative, cfg, batch, steps, seed) -> np.ndarray:
    """diffusers' images for ComfyUI's noise (one CPU randn of the whole batch from the seed) and cfg (diffusers'
    guidance g is pos + g (pos - neg): ComfyUI's cfg = g + 1), as SaveImage quantises them."""
    import torch
    noise = torch.randn(batch, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed))
    images = pipe([prompt] * batch, negative_prompt=[negative] * batch if cfg != 1.0 else None, height=SIZE,
                  width=SIZE, num_inference_steps=steps, guidance_scale=cfg - 1.0, latents=noise,
                  output_type="pt").images                                           # (B, 3, H, W) in [0, 1]
    return np.clip(255.0 * images.movedim(1, -1).float().numpy(), 0, 255).astype(np.uint8).astype(np.int16)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("loader", LOADERS)
def test_saved_png_matches_diffusers(server, diffusers_pipe, loader, case):
    prompt, negative, cfg, batch, steps = CASES[case]
    seed = 4242
    wf = turbo_job(prompt, SIZE, batch=batch, seed=seed)
    wf["3"] = LOADERS[loader]
    wf["7"]["inputs"]["text"] = negative
    wf["10"]["inputs"].update(cfg=cfg, steps=steps)
    wf["11"]["inputs"]["filename_prefix"] = f"parity_{loader}_{case}"
    saved = np.stack([pixels(f) for f in server.output_files(server.run(wf))])
    reference = diffusers_png(diffusers_pipe, prompt, negative, cfg, batch, steps, seed)
    diff = np.abs(saved - reference)
    print(f"{server.version} {loader} {case}: PNG vs diffusers max {diff.max()}/255, mean {diff.mean():.3f}/255; "
          f"image std {reference.std():.1f}")
    assert saved.shape == reference.shape
    assert reference.std() > 5, "the reference image is flat: the fixture is too weak to compare"
    assert diff.max() <= 2


def test_img2img_png_matches_diffusers(server, diffusers_pipe):
    """Image-to-image: an image through the pack's VAE Encode, the sampler at denoise 0.5 (4 of 8 steps), against
    diffusers' ZImageImg2ImgPipeline at strength 0.5. diffusers samples the image's latent distribution with its
    generator where ComfyUI takes its mean, so the reference is given the start ComfyUI makes: the mean latent
    (diffusers' own VAE) noised to the first sigma with ComfyUI's seed noise."""
    import torch
    from diffusers import ZImageImg2ImgPipeline
    steps, denoise, seed, prompt = 4, 0.5, 99, "a blue cup on a table"
    g = torch.Generator().manual_seed(11)
    source = (torch.rand(1, 3, 8, 8, generator=g).repeat_interleave(8, -1).repeat_interleave(8, -2) * 255).byte()
    (server.base / "input").mkdir(exist_ok=True)
    Image.fromarray(source[0].movedim(0, -1).numpy()).save(server.base / "input" / "img2img_source.png")
    wf = turbo_job(prompt, SIZE, seed=seed)
    wf["3"] = LOADERS["split"]
    wf["30"] = {"class_type": "LoadImage", "inputs": {"image": "img2img_source.png"}}
    wf["31"] = {"class_type": "ZImageTurboVAEEncode", "inputs": {"pixels": ["30", 0], "vae": ["3", 2]}}
    wf["10"]["inputs"].update(latent_image=["31", 0], denoise=denoise, steps=steps)
    wf["11"]["inputs"]["filename_prefix"] = "parity_img2img"
    saved = pixels(server.output_files(server.run(wf))[0])

    pipe = ZImageImg2ImgPipeline(**diffusers_pipe.components)
    image = source.float() / 255 * 2 - 1
    vae = pipe.vae.config
    with torch.no_grad():
        mean = pipe.vae.encode(image).latent_dist.mode()
    start = (mean - vae.shift_factor) * vae.scaling_factor
    noise = torch.randn(start.shape, generator=torch.Generator().manual_seed(seed))
    total = int(steps / denoise)
    kwargs = dict(image=image * 0.5 + 0.5, strength=denoise, height=SIZE, width=SIZE, num_inference_steps=total,
                  guidance_scale=0.0, output_type="pt")
    pipe(prompt, latents=noise, **kwargs)                        # sets the scheduler's sigmas for this call
    sigma0 = pipe.scheduler.sigmas[total - steps]
    images = pipe(prompt, latents=sigma0 * noise + (1 - sigma0) * start, **kwargs).images
    reference = np.clip(255.0 * images[0].movedim(0, -1).float().numpy(), 0, 255).astype(np.uint8).astype(np.int16)
    diff = np.abs(saved - reference)
    print(f"{server.version} img2img: PNG vs diffusers max {diff.max()}/255, mean {diff.mean():.3f}/255 "
          f"(sigma0 {float(sigma0):.4f})")
    t2i = turbo_job(prompt, SIZE, seed=seed)
    t2i["3"] = LOADERS["split"]
    assert np.abs(saved - pixels(server.output_files(server.run(t2i))[0])).max() > 10, "the image did not count"
    assert diff.max() <= 2


# ---- the pack's sampler takes what KSampler takes --------------------------------------------------------------

def masked_source(server) -> str:
    """An RGBA image whose transparent left half is LoadImage's mask (mask = 1 - alpha)."""
    g = np.random.default_rng(4)
    rgba = np.concatenate([g.integers(0, 256, (64, 64, 3)), np.full((64, 64, 1), 255)], axis=-1).astype(np.uint8)
    rgba[:, :32, 3] = 0
    (server.base / "input").mkdir(exist_ok=True)
    Image.fromarray(rgba, "RGBA").save(server.base / "input" / "masked_source.png")
    return "masked_source.png"


@pytest.mark.parametrize("case", ["noise_mask", "differential_diffusion", "batch_index"])
def test_the_sampler_takes_what_ksampler_takes(server, case):
    """Upstream core nodes act on the pack's sampler as on KSampler (euler, simple, ModelSamplingAuraFlow 3):
    a noise mask (SetLatentNoiseMask), a model patch with it (DifferentialDiffusion), a latent picked from a batch
    (LatentFromBatch: its batch_index decides the noise)."""
    wf = with_core_ksampler(turbo_job("a garden", 64, seed=8), ["3", 0], seed=8, prefix=f"ks_{case}")
    if case == "batch_index":
        wf["5"]["inputs"]["batch_size"] = 3
        wf["30"] = {"class_type": "LatentFromBatch", "inputs": {"samples": ["5", 0], "batch_index": 2, "length": 1}}
    else:
        wf["31"] = {"class_type": "LoadImage", "inputs": {"image": masked_source(server)}}
        wf["32"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["31", 0], "vae": ["3", 2]}}
        wf["30"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["32", 0], "mask": ["31", 1]}}
    wf["10"]["inputs"]["latent_image"] = wf["21"]["inputs"]["latent_image"] = ["30", 0]
    if case == "differential_diffusion":
        wf["33"] = {"class_type": "DifferentialDiffusion", "inputs": {"model": ["3", 0]}}
        wf["10"]["inputs"]["model"] = wf["20"]["inputs"]["model"] = ["33", 0]
    entry = server.run(wf)
    pack = pixels(server.output_files({"outputs": {"11": entry["outputs"]["11"]}})[0])
    core = pixels(server.output_files({"outputs": {"23": entry["outputs"]["23"]}})[0])
    plain = pixels(server.output_files(server.run(turbo_job("a garden", 64, seed=8)))[0])
    print(f"{server.version} {case}: pack sampler vs KSampler {np.abs(pack - core).max()}/255, "
          f"vs without it {np.abs(pack - plain).max()}/255")
    assert np.abs(pack - core).max() <= 1
    assert np.abs(pack - plain).max() > 10, f"{case} changed nothing"
    if case == "noise_mask":                      # the kept (opaque) right half stays near the source image
        source = np.asarray(Image.open(server.base / "input" / "masked_source.png"))[..., :3].astype(np.int16)
        assert np.abs(pack[:, 40:] - source[:, 40:]).mean() < np.abs(pack[:, :24] - source[:, :24]).mean()


def test_a_model_shift_other_than_the_sampler_s_is_an_error(server):
    wf = turbo_job("x", 64)
    wf["20"] = {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["3", 0], "shift": 5.0}}
    wf["10"]["inputs"]["model"] = ["20", 0]
    status, body = server.post_prompt(wf)
    entry = server.wait(body["prompt_id"], timeout=60)
    error = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"][0]
    assert error["node_type"] == "ZImageTurboSampler" and "ModelSamplingAuraFlow" in error["exception_message"]
    wf["20"]["inputs"]["shift"] = 3.0                                    # the same shift: accepted
    assert server.run(wf)["status"]["status_str"] == "success"
