"""Core nodes on the loaders' MODEL against core's own loader on the same file, in a real server.

Core's UNETLoader detects Z-Image only at the released width (dim 3840), so the file here is Z-Image at full
width and two main layers (1.1 B parameters, 2.2 GB bf16, random), which both loaders read. Each core node that
patches a model (LoraLoader in every format core maps, the Fun ControlNet, ScaleROPE) runs once on the pack's
MODEL and once on core's, same seed and prompt: the saved PNGs must agree, and the node must change the image
(or the fixture would be too weak to tell). The same server reports how much anonymous memory each loader's model
costs (the pack's bf16 weights stay memory-mapped)."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from zimage_dev.runtime import comfyui_tree
from zimage_dev.comfy_server import ComfyServer, write_tiny_models
from zimage_dev.wide_files import CONTROL, LORA_FORMATS, WIDE, fixture_files, link, wide_config, write_loras

SIZE, STEPS, SEED = 64, 2, 31


@pytest.fixture(scope="module")
def wide_files():
    """The wide DiT and a Fun ControlNet (Union 1.0 layout, as core's ModelPatchLoader reads it) for it: written
    once into the runtime's cache (zimage_dev/wide_files.py fixture_files) and hard-linked into each server's
    models folder, so the 5.3 GB exist once on the disk."""
    comfyui_tree()                 # the ControlNet's keys come from core's class: without the tree, a skip
    return fixture_files()


@pytest.fixture(scope="module", params=["0.30.0", "0.3.75"])
def server(request, tmp_path_factory, wide_files):
    comfyui_tree(request.param)
    base = tmp_path_factory.mktemp(f"core-nodes-{request.param}")
    write_tiny_models(base / "models")
    for sub, name in (("diffusion_models", WIDE), ("model_patches", CONTROL)):
        (base / "models" / sub).mkdir(parents=True, exist_ok=True)
        link(wide_files / name, base / "models" / sub / name)             # a hard link: no copy of 2-4 GB
    write_loras(base / "models" / "loras", wide_config().dim)
    with ComfyServer(request.param, base) as srv:
        yield srv


def job(server, side: str, patches: list[dict] | None = None, prefix: str = "x") -> dict:
    """A prompt whose MODEL is the pack's loader (side 'pack') or core's UNETLoader ('core') on the wide file,
    with the pack's text encoder and VAE for both, through `patches` (node dicts taking the MODEL from "m" and
    giving it as their output 0), sampled by the pack's sampler."""
    info = server.object_info()["ZImageTurboLoader"]["input"]["required"]
    tiny = lambda key: next(n for n in info[key][0] if "tiny" in n)   # noqa: E731
    wf = {"1": {"class_type": "ZImageTurboLoader", "inputs": {
              "unet_name": WIDE, "clip_name": tiny("clip_name"), "vae_name": tiny("vae_name"),
              "weight_dtype": "bf16"}},
          "2": {"class_type": "UNETLoader", "inputs": {"unet_name": WIDE, "weight_dtype": "default"}},
          "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["1", 1]}},
          "4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
          "6": {"class_type": "ZImageTurboVAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
          "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"{prefix}_{side}"}}}
    model = ["1", 0] if side == "pack" else ["2", 0]
    for i, node in enumerate(patches or []):
        node = {"class_type": node["class_type"], "inputs": dict(node["inputs"])}
        node["inputs"]["model"] = model
        wf[f"p{i}"] = node
        model = [f"p{i}", 0]
    wf["5"] = {"class_type": "ZImageTurboSampler", "inputs": {
        "model": model, "positive": ["3", 0], "latent_image": ["4", 0], "seed": SEED, "steps": STEPS, "cfg": 1.0,
        "shift": 3.0, "denoise": 1.0}}
    return wf


def image(server, wf) -> np.ndarray:
    files = server.output_files(server.run(wf, timeout=600))
    return np.asarray(Image.open(files[0])).astype(np.int16)


def pack_and_core(server, patches, prefix):
    pack, core = image(server, job(server, "pack", patches, prefix)), image(server, job(server, "core", patches, prefix))
    return pack, core


@pytest.fixture(scope="module")
def plain(server):
    pack, core = pack_and_core(server, [], "plain")
    diff = np.abs(pack - core).max()
    print(f"{server.version} no patch: pack MODEL vs core UNETLoader {diff}/255; image std {pack.std():.1f}")
    assert diff <= 1 and pack.std() > 5
    return pack


# What core maps, per version: 0.3.75 predates the transformer. prefix and DiffSynth's .default. names (core
# says "lora key not loaded" for them, on its own model as on the pack's). The pack's own LoRA loader for every
# format is the issue "Beyond core in the ecosystem".
CORE_MAPS = {"0.3.75": {"comfyui", "ai-toolkit"}}


@pytest.mark.parametrize("fmt", LORA_FORMATS)
def test_core_lora_loader_acts_on_the_pack_model_as_on_core_s(server, plain, fmt):
    lora = {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": f"{fmt}.safetensors", "strength_model": 1.0}}
    log_before = len(server.log_text())
    pack, core = pack_and_core(server, [lora], f"lora_{fmt}")
    effect = np.abs(pack - plain).max()
    print(f"{server.version} LoRA {fmt}: pack vs core {np.abs(pack - core).max()}/255, effect {effect}/255")
    assert np.abs(pack - core).max() <= 1
    ignored = "lora key not loaded" in server.log_text()[log_before:]
    if fmt in CORE_MAPS.get(server.version, set(LORA_FORMATS)):
        assert effect > 10 and not ignored, "the LoRA did not change the image"
    else:                                     # core's own limit on this version, and it says so
        assert effect == 0 and ignored


@pytest.mark.parametrize("node", ["ZImageFunControlnet", "QwenImageDiffsynthControlnet"])
def test_fun_controlnet_acts_on_the_pack_model_as_on_core_s(server, plain, node):
    """Core's own Fun ControlNet nodes (ComfyUI's template uses QwenImageDiffsynthControlnet) on the pack's MODEL."""
    if "ZImageFunControlnet" not in server.object_info():
        pytest.skip(f"ComfyUI {server.version} has no ZImageFunControlnet (added in 0.3.76+)")
    (server.base / "input").mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(3)
    Image.fromarray((torch.rand(SIZE, SIZE, 3, generator=g) * 255).byte().numpy()).save(server.base / "input" / "pose.png")
    nodes = [{"class_type": node, "inputs": {
        "model_patch": ["cn", 0], "vae": ["1", 2], "strength": 1.0, "image": ["img", 0]}}]
    results = []
    for side in ("pack", "core"):
        wf = job(server, side, nodes, f"controlnet_{node}")
        wf["cn"] = {"class_type": "ModelPatchLoader", "inputs": {"name": CONTROL}}
        wf["img"] = {"class_type": "LoadImage", "inputs": {"image": "pose.png"}}
        results.append(image(server, wf))
    pack, core = results
    print(f"{server.version} {node}: pack vs core {np.abs(pack - core).max()}/255, "
          f"effect {np.abs(pack - plain).max()}/255")
    assert np.abs(pack - core).max() <= 1
    assert np.abs(pack - plain).max() > 10, "the ControlNet did not change the image"


def test_scale_rope_acts_on_the_pack_model_as_on_core_s(server, plain):
    if "ScaleROPE" not in server.object_info():
        pytest.skip(f"ComfyUI {server.version} has no ScaleROPE node")
    rope = {"class_type": "ScaleROPE", "inputs": {"scale_x": 2.0, "shift_x": 0.0, "scale_y": 2.0, "shift_y": 0.0,
                                                  "scale_t": 1.0, "shift_t": 0.0}}
    pack, core = pack_and_core(server, [rope], "rope")
    print(f"{server.version} ScaleROPE: pack vs core {np.abs(pack - core).max()}/255, "
          f"effect {np.abs(pack - plain).max()}/255")
    assert np.abs(pack - core).max() <= 1
    assert np.abs(pack - plain).max() > 10, "ScaleROPE did not change the image"


@pytest.mark.parametrize("fmt", ["musubi", "musubi_double_underscore"])
def test_pack_lora_loader_reads_what_core_does_not(server, plain, fmt):
    """musubi-tuner's native keys (ComfyUI issue 11487: "lora key not loaded" in core) through the pack's
    Z-Image LoRA Loader, against the same delta in ComfyUI's form through core's LoraLoader, on the same MODEL."""
    ours = {"class_type": "ZImageLoraLoader", "inputs": {"lora_name": f"{fmt}.safetensors", "strength_model": 1.0}}
    core = {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": f"{fmt}_as_comfyui.safetensors",
                                                           "strength_model": 1.0}}
    log_before = len(server.log_text())
    with_ours = image(server, job(server, "pack", [ours], f"ours_{fmt}"))
    with_core = image(server, job(server, "pack", [core], f"core_{fmt}"))
    print(f"{server.version} {fmt}: pack LoRA loader vs core LoraLoader on the same delta "
          f"{np.abs(with_ours - with_core).max()}/255, effect {np.abs(with_ours - plain).max()}/255")
    assert np.abs(with_ours - with_core).max() <= 1
    assert np.abs(with_ours - plain).max() > 10, "the LoRA did not change the image"
    assert "lora key not loaded" not in server.log_text()[log_before:]


def controlnet_inputs(server) -> dict:
    (server.base / "input").mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(3)
    if not (server.base / "input" / "pose.png").exists():
        Image.fromarray((torch.rand(SIZE, SIZE, 3, generator=g) * 255).byte().numpy()).save(
            server.base / "input" / "pose.png")
    return {"cn": {"class_type": "ModelPatchLoader", "inputs": {"name": CONTROL}},
            "img": {"class_type": "LoadImage", "inputs": {"image": "pose.png"}}}


def test_scheduled_controlnet_acts_on_the_steps_asked(server):
    """The pack's Fun ControlNet (start/end) on the pack's MODEL: ending at 40% of 2 steps equals, by hand, the
    first step sampled with the pack's control over its whole range (KSamplerAdvanced steps 0-1, leftover noise
    kept) and the second without it. (How the control computes is tests/test_controlnet_diffusers.py's.)"""
    if "ZImageFunControlnet" not in server.object_info():
        pytest.skip(f"ComfyUI {server.version} has no ZImageFunControlnet (added in 0.3.76+)")
    cn = {"model_patch": ["cn", 0], "vae": ["1", 2], "strength": 1.0, "image": ["img", 0]}

    def ksampler(model, start, end, add_noise, leftover, latent, node_id):
        return {node_id: {"class_type": "KSamplerAdvanced", "inputs": {
            "model": model, "add_noise": add_noise, "noise_seed": SEED, "steps": STEPS, "cfg": 1.0,
            "sampler_name": "euler", "scheduler": "simple", "positive": ["3", 0], "negative": ["neg", 0],
            "latent_image": latent, "start_at_step": start, "end_at_step": end,
            "return_with_leftover_noise": leftover}}}

    def run(extra: dict, samples, prefix):
        wf = job(server, "pack", [], prefix)
        wf.update(controlnet_inputs(server))
        wf["neg"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}}
        wf.update(extra)
        wf["6"]["inputs"]["samples"] = samples
        return image(server, wf)

    def scheduled(end):
        return {"class_type": "ZImageFunControlnetScheduled",
                "inputs": {**cn, "model": ["1", 0], "start_percent": 0.0, "end_percent": end}}
    ours_whole = run({"s": scheduled(1.0), **ksampler(["s", 0], 0, 10000, "enable", "disable", ["4", 0], "k")},
                     ["k", 0], "sched_whole")
    ours_early = run({"s": scheduled(0.4), **ksampler(["s", 0], 0, 10000, "enable", "disable", ["4", 0], "k")},
                     ["k", 0], "sched_early")
    by_hand = run({"s": scheduled(1.0), **ksampler(["s", 0], 0, 1, "enable", "enable", ["4", 0], "k1"),
                   **ksampler(["1", 0], 1, 10000, "disable", "disable", ["k1", 0], "k2")}, ["k2", 0], "by_hand")
    print(f"{server.version} scheduled ControlNet: end 40% vs by hand {np.abs(ours_early - by_hand).max()}/255; "
          f"ending early changed {np.abs(ours_early - ours_whole).max()}/255")
    assert np.abs(ours_early - by_hand).max() <= 1
    assert np.abs(ours_early - ours_whole).max() > 10, "ending the control early changed nothing"
    assert np.abs(ours_early - ours_whole).max() > 10, "ending the control early changed nothing"
