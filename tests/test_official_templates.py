"""ComfyUI's own Z-Image templates (PyPI comfyui-workflow-templates-json, the version ComfyUI 0.30.0 installs) in a
real server with the pack installed: each template converted to its prompt by the real frontend's graphToPrompt
in Chromium (their graphs sit in subgraphs), run with core's loaders and KSampler, with the pack's loader in
their place, and with the pack's loader and Z-Image Sampler (the template's sampler, scheduler, shift, steps and
cfg): the same picture. The 2K upscaler template is not run: it needs an ESRGAN upscale model, which no pack node
touches.

What is not the template's, and why:
- core's CLIPLoader builds Qwen3-4B at its released size only (4 B parameters, 8 GB on the CPU) whatever the
  file: both runs take the text encoder from the pack's loader on a tiny file, the same CLIP for both;
- 64x64 pixels and 2 steps instead of 1024x1024 and 8-25: the DiT is the wide fixture (the released width, two
  main blocks), whose 1024x1024 step takes about a minute on this CPU;
- a node the running ComfyUI lacks is named by the test and replaced by core's plain equivalent.
Everything else (res_multistep or the template's sampler and scheduler, cfg, ModelSamplingAuraFlow's shift, the
negative prompt, QwenImageDiffsynthControlnet, Canny) runs as the template has it."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zimage_dev import RUNTIME
from zimage_dev.runtime import comfyui_tree
from zimage_dev.browser import chromium
from zimage_dev.comfy_server import ComfyServer, write_tiny_models
from zimage_dev.wide_files import CONTROL, WIDE, fixture_files, link

TEMPLATES = {"image_z_image_turbo": "turbo", "image_z_image": "base",
             "image_z_image_turbo_fun_union_controlnet": "controlnet"}
FRONTENDS = {"0.3.75": RUNTIME / "frontend-0.3.75"}    # 0.30.0's frontend is the venv's package
SIZE, STEPS = 64, 2
TINY = "z_image_turbo_tiny"
LOADERS = ("UNETLoader", "CLIPLoader", "VAELoader")
# the files the templates name, with what stands in for them here
DIT_FILES = ("z_image_turbo_bf16.safetensors", "z_image_bf16.safetensors")
VAE_FILE = "ae.safetensors"
CONTROL_FILE = "Z-Image-Turbo-Fun-Controlnet-Union.safetensors"
# nodes some ComfyUI lacks, and the core node that takes their place (inputs mapped by the test)
STAND_INS = {"SaveImageAdvanced": "SaveImage", "ResolutionSelector": None}


def template(name: str) -> dict:
    import comfyui_workflow_templates_json
    path = Path(comfyui_workflow_templates_json.__file__).parent / "templates" / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8"))


def template_inputs(ui: dict) -> list[str]:
    """The images the template's Load Image nodes name (at top level and in subgraphs)."""
    nodes = ui["nodes"] + [n for sg in ui.get("definitions", {}).get("subgraphs", []) for n in sg["nodes"]]
    return [n["widgets_values"][0] for n in nodes if n["type"] == "LoadImage"]


def write_full_size_vae(path: Path) -> None:
    """Random weights for the released Flux AE (core's VAELoader builds it at that size only)."""
    from zimage_core import vae
    from zimage_dev import synthetic
    synthetic.write_random_file(path, vae.expected_shapes(vae.FLUX_AE), seed=5)


@pytest.fixture(scope="module", params=["0.30.0", "0.3.75"])
def server(request, tmp_path_factory):
    version = request.param
    comfyui_tree(version)
    base = tmp_path_factory.mktemp(f"templates-{version}")
    models = base / "models"
    write_tiny_models(models)
    fixtures = fixture_files()
    for name in DIT_FILES:
        link(fixtures / WIDE, models / "diffusion_models" / name)
    (models / "model_patches").mkdir(parents=True, exist_ok=True)
    link(fixtures / CONTROL, models / "model_patches" / CONTROL_FILE)
    write_full_size_vae(models / "vae" / VAE_FILE)
    (base / "input").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    for name in TEMPLATES:
        for image in template_inputs(template(name)):
            y, x = np.mgrid[0:96, 0:128]
            photo = np.stack([x * 2, y * 2, (x + y)], -1) + rng.integers(0, 60, (96, 128, 3))
            Image.fromarray(photo.clip(0, 255).astype(np.uint8)).save(base / "input" / image)
    extra = []
    root = FRONTENDS.get(version)
    if root is not None and (root / "index.html").is_file():
        extra = ["--front-end-root", str(root)]
    with ComfyServer(version, base, extra_args=extra) as srv:
        srv.frontend_ok = root is None or bool(extra)
        yield srv


@pytest.fixture(scope="module")
def prompts(server) -> dict:
    """Each template's prompt as the frontend posts it (graphToPrompt), in Chromium."""
    if not server.frontend_ok:
        pytest.skip(f"no frontend for ComfyUI {server.version} at {FRONTENDS[server.version]}: run "
                    f"scripts/setup_runtime.sh")
    status, _ = server.post("/settings/Comfy.TutorialCompleted", True)
    assert status == 200
    out = {}
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(server.url)
        page.wait_for_function("() => window.comfyAPI?.app?.app?.graph && window.LiteGraph "
                               "&& window.comfyAPI.app.app.graph.nodes.length", timeout=120_000)
        for name in TEMPLATES:
            out[name] = page.evaluate("""async (ui) => {
                const app = window.comfyAPI.app.app;
                await app.loadGraphData(ui);
                return (await app.graphToPrompt()).output;
            }""", template(name))
    return out


def by_class(prompt: dict, cls: str) -> list[str]:
    return [nid for nid, n in prompt.items() if n["class_type"] == cls]


def rewire(prompt: dict, old: str, output: int, new: list) -> None:
    for node in prompt.values():
        for key, value in node["inputs"].items():
            if value == [old, output]:
                node["inputs"][key] = list(new)


def for_this_cpu(prompt: dict, known: set[str], ui: dict) -> tuple[dict, list[str]]:
    """The template's prompt at 64x64 and 2 steps, with core's stand-ins for the nodes this ComfyUI lacks; and
    the names of the nodes replaced. (An older frontend posts a node type the server does not list without its
    class_type: the template says which it is.)"""
    prompt = json.loads(json.dumps(prompt))
    types = {str(n["id"]): n["type"] for n in ui["nodes"]}
    for nid, node in prompt.items():
        if not node.get("class_type"):
            node["class_type"] = types[nid]
    replaced = []
    for nid in by_class(prompt, "EmptySD3LatentImage"):
        prompt[nid]["inputs"].update(width=SIZE, height=SIZE, batch_size=1)
    for nid in by_class(prompt, "KSampler"):
        prompt[nid]["inputs"]["steps"] = STEPS
    for nid in by_class(prompt, "ImageScaleToMaxDimension"):
        prompt[nid]["inputs"]["largest_size"] = SIZE
    for nid, node in list(prompt.items()):
        cls = node["class_type"]
        if cls in known:
            continue
        assert cls in STAND_INS, f"ComfyUI lacks {cls}, which the template uses, and the test has no stand-in"
        replaced.append(cls)
        if STAND_INS[cls] is None:                  # its outputs (a size) were set as constants above
            del prompt[nid]
        else:
            prompt[nid] = {"class_type": STAND_INS[cls], "inputs": {
                "images": node["inputs"]["images"], "filename_prefix": "template"}}
    leftover = [(nid, k) for nid, n in prompt.items() for k, v in n["inputs"].items()
                if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[0] not in prompt]
    assert not leftover, f"inputs left without their node: {leftover}"
    return prompt, replaced


def with_loaders(prompt: dict, side: str, tiny: dict) -> dict:
    """core's three loaders ("core": CLIPLoader only replaced, by the pack's tiny CLIP) or the pack's loader in
    their place ("pack": the DiT in bf16 as UNETLoader keeps it, the VAE at auto as VAELoader keeps it)."""
    prompt = json.loads(json.dumps(prompt))
    prompt["zt_clip"] = {"class_type": "ZImageTurboLoader", "inputs": {**tiny, "weight_dtype": "auto"}}
    for nid in by_class(prompt, "CLIPLoader"):
        rewire(prompt, nid, 0, ["zt_clip", 1])
        del prompt[nid]
    if side == "pack":
        (unet,) = {prompt[nid]["inputs"]["unet_name"] for nid in by_class(prompt, "UNETLoader")}
        prompt["zt_dit"] = {"class_type": "ZImageTurboLoader", "inputs": {**tiny, "unet_name": unet,
                                                                          "weight_dtype": "bf16"}}
        prompt["zt_vae"] = {"class_type": "ZImageTurboLoader", "inputs": {**tiny, "vae_name": VAE_FILE,
                                                                          "weight_dtype": "auto"}}
        for cls, new in (("UNETLoader", ["zt_dit", 0]), ("VAELoader", ["zt_vae", 2])):
            for nid in by_class(prompt, cls):
                rewire(prompt, nid, 0, new)
                del prompt[nid]
    return prompt


def with_pack_sampler(prompt: dict) -> dict:
    """ModelSamplingAuraFlow + KSampler replaced by the Z-Image Sampler with the template's settings (its shift,
    sampler, scheduler, steps, cfg, seed, denoise, prompts)."""
    prompt = json.loads(json.dumps(prompt))
    for k in by_class(prompt, "KSampler"):
        ks = prompt.pop(k)["inputs"]
        shift_node = prompt.get(ks["model"][0])
        assert shift_node is not None and shift_node["class_type"] == "ModelSamplingAuraFlow", ks["model"]
        prompt[k] = {"class_type": "ZImageTurboSampler", "inputs": {
            "model": shift_node["inputs"]["model"], "shift": shift_node["inputs"]["shift"],
            **{key: ks[key] for key in ("positive", "negative", "latent_image", "seed", "steps", "cfg", "denoise",
                                        "sampler_name", "scheduler")}}}
    for nid in by_class(prompt, "ModelSamplingAuraFlow"):
        if not any(v == [nid, 0] for n in prompt.values() for v in n["inputs"].values()):
            del prompt[nid]
    return prompt


def run(server, prompt: dict) -> np.ndarray:
    """The picture the prompt's Save Image node wrote (a template may preview others)."""
    entry = server.run(prompt, timeout=900)
    (saved,) = [img for out in entry["outputs"].values() for img in out.get("images", [])
                if img.get("type") == "output"]
    return np.asarray(Image.open(server.output / saved["subfolder"] / saved["filename"])).astype(np.int16)


@pytest.mark.parametrize("name", TEMPLATES)
def test_official_template_with_the_pack_s_loader_is_core_s_picture(server, prompts, name):
    info = server.object_info()
    if name.endswith("controlnet") and "ZImageFunControlnet" not in info:
        pytest.skip(f"ComfyUI {server.version} has no Z-Image Fun ControlNet model (core added it in 0.3.76): "
                    "its Load Model Patch cannot read the template's file")
    tiny = {"unet_name": f"{TINY}_bf16.safetensors", "clip_name": f"{TINY}_qwen3.safetensors",
            "vae_name": f"{TINY}_ae.safetensors"}
    prompt, replaced = for_this_cpu(prompts[name], set(info), template(name))
    assert all(cls in prompt[nid]["class_type"] for cls in ("KSampler",) for nid in by_class(prompt, cls))
    (sampler,) = [prompt[nid]["inputs"] for nid in by_class(prompt, "KSampler")]
    started = time.monotonic()
    core = run(server, with_loaders(prompt, "core", tiny))
    pack = run(server, with_loaders(prompt, "pack", tiny))
    both = run(server, with_pack_sampler(with_loaders(prompt, "pack", tiny)))
    diff, diff_both = int(np.abs(core - pack).max()), int(np.abs(core - both).max())
    print(f"\n{server.version} {name}: {sampler['sampler_name']}/{sampler['scheduler']} cfg {sampler['cfg']}, "
          f"replaced {replaced or 'nothing'}; vs core's loaders and KSampler: the pack's loader {diff}/255, the "
          f"pack's loader and Z-Image Sampler {diff_both}/255; image std {core.std():.1f} "
          f"({time.monotonic() - started:.0f} s)")
    assert diff <= 1 and diff_both <= 1
    assert core.std() > 5, "the template made a flat image"
