"""example_workflows/: every shipped workflow is listed by ComfyUI's template browser, its canvas file describes
the same graph as its API twin (by the pack's converter, and by the real frontend's graphToPrompt in Chromium),
and the API twin runs over /prompt in a real ComfyUI (0.30.0 and 0.3.75) on tiny random weights: released file
names swapped for the test files, 64x64, at most 2 steps; sampler, cfg, shift, denoise, variant, negative and
graph as shipped. One server per version serves every workflow."""
from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zimage_dev import REPO, RUNTIME
from zimage_dev.runtime import comfyui_tree
from zimage_dev.browser import chromium
from zimage_dev.comfy_server import ComfyServer, write_tiny_models
from zimage_dev.wide_files import CONTROL, WIDE, fixture_files, link      # the ControlNet needs dim 3840
from scripts.example_workflows import (API, BASE_DIT, CONTROL_FILES, CUT, FUN_CONTROLNET, INPUT_IMAGE, NOTE_TYPES,
                                       TEMPLATE_TWINS, TEXT_ENCODER, TINY_FILES, TURBO_DIT, VAE, WORKFLOWS, api_of_canvas,
                                       changed_inputs, for_tiny_weights, plain, write_inputs)

PACK = "comfyui_zimage_turbo"
FOLDER = REPO / "example_workflows"
NAMES = sorted(WORKFLOWS)                              # the e-commerce pair: tests/test_server.py
SIZE = 64
FRONTENDS = {"0.3.75": RUNTIME / "frontend-0.3.75"}    # 0.30.0's frontend is the venv's package
TIMES: dict[str, float] = {}


def shipped(name: str) -> tuple[dict, dict]:
    ui = json.loads((FOLDER / f"{name}.json").read_text(encoding="utf-8"))
    api = json.loads((API / f"{name}_api.json").read_text(encoding="utf-8"))
    return ui, api


@pytest.fixture(scope="module", params=["0.30.0", "0.3.75"])
def server(request, tmp_path_factory):
    version = request.param
    comfyui_tree(version)
    base = tmp_path_factory.mktemp(f"examples-{version}")
    write_tiny_models(base / "models")
    write_inputs(base / "input", SIZE)
    fixtures = fixture_files()                          # written once into the runtime cache, shared
    for sub, name in (("diffusion_models", WIDE), ("model_patches", CONTROL)):
        (base / "models" / sub).mkdir(parents=True, exist_ok=True)
        link(fixtures / name, base / "models" / sub / name)        # a hard link: no copy of 5.3 GB
    extra = []
    root = FRONTENDS.get(version)
    if root is not None and (root / "index.html").is_file():
        extra = ["--front-end-root", str(root)]
    started = time.monotonic()
    with ComfyServer(version, base, extra_args=extra) as srv:
        srv.frontend_ok = root is None or bool(extra)
        TIMES[f"{version} start"] = time.monotonic() - started
        yield srv
    print(f"\nComfyUI {version}: " + ", ".join(f"{k} {v:.1f} s" for k, v in TIMES.items() if k.startswith(version)))


def test_every_workflow_has_an_api_twin_a_thumbnail_and_the_released_files():
    assert len(NAMES) == 8, NAMES
    canvases = sorted(p.stem for p in FOLDER.glob("*.json"))
    assert set(NAMES) <= set(canvases)
    for name in canvases:            # every canvas file the template browser lists has its twin and thumbnail
        assert (API / f"{name}_api.json").is_file(), f"workflows/{name}_api.json is missing"
        assert Image.open(FOLDER / f"{name}.jpg").format == "JPEG", name
    for name in NAMES:
        ui, api = shipped(name)
        assert "nodes" in ui and "links" in ui, f"{name}.json is not a canvas workflow"
        assert all("class_type" in node for node in api.values()), f"workflows/{name}_api.json is not an API workflow"
        thumb = Image.open(FOLDER / f"{name}.jpg")      # the template browser's thumbnail: NAME.jpg
        assert thumb.format == "JPEG" and min(thumb.size) >= 64
        assert any(n["type"] in NOTE_TYPES for n in ui["nodes"]), f"{name}: no note for the user"
        files = {v for node in api.values() for k, v in node["inputs"].items()
                 if k in ("unet_name", "clip_name", "vae_name", "name")}
        assert files <= {TURBO_DIT, BASE_DIT, TEXT_ENCODER, VAE, FUN_CONTROLNET}, (name, files)


def sampler_settings(api: dict) -> list[dict]:
    return [n["inputs"] for _, n in sorted(api.items(), key=lambda kv: int(kv[0]))
            if n["class_type"] == "ZImageTurboSampler"]


def test_the_presets_are_the_variants_settings():
    """Turbo 8 steps / cfg 1 / shift 3 without a negative; Base 50 / 4 / 3 with one; the hires second pass at
    denoise 0.3-0.5 on a 1.5-2x upscale through tiled VAE encode and decode."""
    for name in NAMES:
        api = shipped(name)[1]
        for s in sampler_settings(api):
            assert s["shift"] == 3.0
            if name in TEMPLATE_TWINS:                   # the official templates' own: the next test
                continue
            assert (s["sampler_name"], s["scheduler"]) == ("euler", "simple"), name
            if s["variant"] == "turbo":
                assert (s["steps"], s["cfg"], "negative" in s) == (8, 1.0, False), name
            else:
                assert (s["steps"], s["cfg"], "negative" in s) == (50, 4.0, True), name
    base = sampler_settings(shipped("zimage_base_text_to_image")[1])
    assert [s["variant"] for s in base] == ["base"]
    first, second = sampler_settings(shipped("zimage_turbo_hires_2x")[1])
    assert first["denoise"] == 1.0 and 0.3 <= second["denoise"] <= 0.5
    kinds = {n["class_type"]: n["inputs"] for n in shipped("zimage_turbo_hires_2x")[1].values()}
    assert 1.5 <= kinds["ImageScaleBy"]["scale_by"] <= 2.0
    assert {"VAEEncodeTiled", "VAEDecodeTiled"} <= kinds.keys()


def official_template(name: str) -> dict:
    """ComfyUI's own template, from the PyPI package ComfyUI installs (comfyui-workflow-templates-json)."""
    import importlib.util
    spec = importlib.util.find_spec("comfyui_workflow_templates_json")
    if spec is None:
        pytest.skip("comfyui-workflow-templates-json is not installed (ComfyUI's requirements install it)")
    folder = Path(spec.submodule_search_locations[0]) / "templates"
    return json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))


def template_nodes(ui: dict) -> dict[str, list]:
    """Each node type's widget values in a template, subgraphs included (the templates keep their graph in one)."""
    found = {}
    for graph in [ui, *ui.get("definitions", {}).get("subgraphs", [])]:
        for node in graph.get("nodes", []):
            found.setdefault(node["type"], node.get("widgets_values"))
    return found


@pytest.mark.parametrize("name", sorted(TEMPLATE_TWINS))
def test_the_template_twins_carry_the_official_templates_settings(name):
    """zimage_*_template: the official template's sampler, scheduler, steps, cfg, shift, size and denoise, read
    from the template file ComfyUI ships, on the pack's nodes."""
    nodes = template_nodes(official_template(TEMPLATE_TWINS[name]))
    seed, _, steps, cfg, sampler_name, scheduler, denoise = nodes["KSampler"]
    (ours,) = sampler_settings(shipped(name)[1])
    assert (ours["sampler_name"], ours["scheduler"], ours["steps"], ours["cfg"], ours["denoise"]) == \
        (sampler_name, scheduler, steps, cfg, denoise)
    assert ours["shift"] == nodes["ModelSamplingAuraFlow"][0]
    size = next(n["inputs"] for n in shipped(name)[1].values() if n["class_type"] == "ZImageTurboSize")
    assert [size["width"], size["height"]] == nodes["EmptySD3LatentImage"][:2]
    assert ("negative" in ours) == (cfg > 1)


def test_canvas_files_are_served_to_the_template_browser_and_describe_the_api_graph(server):
    """Listed by /workflow_templates, served with their thumbnails under the pack's template route, and
    converted back by the widgets' positions (scripts/ui_workflows.py) into the API twin."""
    listed = server.get("/workflow_templates")[PACK]
    info = server.object_info()
    for name in NAMES:
        assert name in listed
        ui = server.get(f"/api/workflow_templates/{PACK}/{name}.json")
        assert api_of_canvas(ui, info) == plain(shipped(name)[1]), name
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/{PACK}/{name}.jpg", timeout=30) as r:
            assert r.status == 200 and r.read(3) == b"\xff\xd8\xff"


def png_parameters(path) -> str:
    return Image.open(path).info.get("parameters", "")


@pytest.mark.parametrize("name", NAMES)
def test_workflow_runs_over_prompt_and_writes_a_real_image(server, name):
    api = plain(shipped(name)[1])
    if name == "zimage_turbo_controlnet" and "ZImageFunControlnet" not in server.object_info():
        pytest.skip(f"ComfyUI {server.version} has no core ZImageFunControlnet (added in 0.3.76), whose model "
                    f"the pack's scheduled ControlNet runs")
    files = CONTROL_FILES if name == "zimage_turbo_controlnet" else TINY_FILES
    # the wide DiT (2.2 GB in bf16) in bf16: "auto" is fp32 on a CPU, twice that next to a 3.1 GB ControlNet
    wf = for_tiny_weights(api, files, INPUT_IMAGE.get(name, "tiny_photo.png"), SIZE,
                          weight_dtype="bf16" if name == "zimage_turbo_controlnet" else None)
    assert changed_inputs(api, wf) <= CUT
    started = time.monotonic()
    entry = server.run(wf, timeout=600)
    TIMES[f"{server.version} {name}"] = time.monotonic() - started
    if name == "zimage_turbo_controlnet":
        server.post("/free", {"unload_models": True, "free_memory": True})     # 5 GB of wide weights
    saved = {nid: out["images"] for nid, out in entry["outputs"].items()
             if api[nid]["class_type"] == "ZImageTurboSaveImage"}
    assert len(saved) == 1 and len(next(iter(saved.values()))) == 1
    (save_id, images), = saved.items()
    path = server.output / images[0].get("subfolder", "") / images[0]["filename"]
    assert path.name.startswith(api[save_id]["inputs"]["filename_prefix"])
    scale = next((n["inputs"]["scale_by"] for n in api.values() if n["class_type"] == "ImageScaleBy"), 1)
    image = Image.open(path)
    assert image.format == "PNG" and image.size == (round(SIZE * scale),) * 2
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert np.isfinite(pixels).all() and pixels.std() > 1, f"{name}: a flat image (std {pixels.std():.2f})"
    # the settings the image was made with, as the save node read them from the run's graph
    last = sampler_settings(wf)[-1]
    params = png_parameters(path)
    assert f"Steps: {last['steps']}," in params and f"CFG scale: {last['cfg']:g}," in params, params
    assert f"Denoise: {last['denoise']:g}" in params, params
    negative = wf[last["negative"][0]]["inputs"]["text"] if "negative" in last else ""
    assert ("Negative prompt:" in params) == bool(negative), params          # an empty one gets no line


def test_the_inpaint_workflow_runs_as_shipped_on_comfyui_s_own_example_image(server):
    """A new user's first run: a stock input folder (ComfyUI's own example.png, no alpha, nothing painted) and the
    shipped inpaint workflow with only the model files swapped, at its own size and steps. Load Image gives a
    64x64 empty placeholder mask: the run gives a picture, and the encode node says the mask is empty. Then with
    a square painted out (alpha, as the MaskEditor saves it), the result's latent outside the square is the
    image's own (two SaveLatent nodes added to read it; nothing else changes)."""
    stock = comfyui_tree(server.version) / "input" / "example.png"
    (server.base / "input").mkdir(exist_ok=True)
    (server.base / "input" / "example.png").write_bytes(stock.read_bytes())
    api = plain(shipped("zimage_turbo_inpaint")[1])
    wf = json.loads(json.dumps(api))
    loader = next(n["inputs"] for n in wf.values() if n["class_type"] == "ZImageTurboLoader")
    for key in ("unet_name", "clip_name", "vae_name"):
        loader[key] = TINY_FILES[loader[key]]
    assert changed_inputs(api, wf) == {("ZImageTurboLoader", k) for k in ("unet_name", "clip_name", "vae_name")}
    encode = next(nid for nid, n in wf.items() if n["class_type"] == "ZImageInpaintEncode")
    sampler = next(nid for nid, n in wf.items() if n["class_type"] == "ZImageTurboSampler")
    entry = server.run(wf, timeout=900)
    warnings = entry["outputs"][encode]["zimage"][0]["warnings"]
    assert len(warnings) == 1 and "the mask is empty" in warnings[0], warnings
    (images,) = [out["images"] for out in entry["outputs"].values() if "images" in out]
    width, height = Image.open(stock).size
    assert Image.open(server.output / images[0]["subfolder"] / images[0]["filename"]).size == \
        (width // 16 * 16, height // 16 * 16)

    photo = np.asarray(Image.open(stock).convert("RGB"))
    alpha = np.full(photo.shape[:2], 255, np.uint8)
    box = (height // 4 // 8 * 8, height // 2 // 8 * 8, width // 4 // 8 * 8, width // 2 // 8 * 8)   # on latent cells
    alpha[box[0]:box[1], box[2]:box[3]] = 0
    Image.fromarray(np.dstack([photo, alpha]), "RGBA").save(server.base / "input" / "example_painted.png")
    next(n for n in wf.values() if n["class_type"] == "LoadImage")["inputs"]["image"] = "example_painted.png"
    wf["s1"] = {"class_type": "SaveLatent", "inputs": {"samples": [encode, 0], "filename_prefix": "latents/src"}}
    wf["s2"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0], "filename_prefix": "latents/out"}}
    entry = server.run(wf, timeout=900)
    assert entry["outputs"][encode]["zimage"][0]["warnings"] == []
    source, result = (latent_of(server, entry, node) for node in ("s1", "s2"))
    keep = torch.ones_like(source, dtype=torch.bool)
    keep[..., box[0] // 8:box[1] // 8, box[2] // 8:box[3] // 8] = False
    outside = ((result - source).abs()[keep].max() / source.abs().max()).item()
    inside = ((result - source).abs()[~keep].max() / source.abs().max()).item()
    print(f"{server.version} shipped inpaint on example.png: outside the mask {outside:.1e}, inside {inside:.2f}")
    assert outside <= 1e-6 and inside > 0.1


def test_the_image_to_image_workflow_runs_as_shipped_on_comfyui_s_example_image(server):
    """The other workflow whose Load Image names example.png, with only the model files swapped: a picture at
    the image's size (cropped to multiples of 16)."""
    stock = comfyui_tree(server.version) / "input" / "example.png"
    (server.base / "input").mkdir(exist_ok=True)
    (server.base / "input" / "example.png").write_bytes(stock.read_bytes())
    api = plain(shipped("zimage_turbo_image_to_image")[1])
    assert next(n for n in api.values() if n["class_type"] == "LoadImage")["inputs"]["image"] == "example.png"
    wf = json.loads(json.dumps(api))
    loader = next(n["inputs"] for n in wf.values() if n["class_type"] == "ZImageTurboLoader")
    for key in ("unet_name", "clip_name", "vae_name"):
        loader[key] = TINY_FILES[loader[key]]
    entry = server.run(wf, timeout=900)
    (images,) = [out["images"] for out in entry["outputs"].values() if "images" in out]
    width, height = Image.open(stock).size
    image = Image.open(server.output / images[0]["subfolder"] / images[0]["filename"])
    assert image.size == (width // 16 * 16, height // 16 * 16) and np.asarray(image).std() > 1


def latent_of(server, entry, node):
    from safetensors.torch import load_file
    saved = entry["outputs"][node]["latents"][0]
    return load_file(str(server.output / saved["subfolder"] / saved["filename"]))["latent_tensor"].float()


def graph_to_prompt(page, ui: dict) -> dict:
    return page.evaluate("""async (ui) => {
        const app = window.comfyAPI.app.app;
        await app.loadGraphData(ui);
        return (await app.graphToPrompt()).output;
    }""", ui)


def test_the_frontend_turns_each_canvas_file_into_its_api_twin(server):
    """ComfyUI's own frontend, in headless Chromium: load each canvas file and ask it for the prompt it would
    post (graphToPrompt). That is the conversion a user's Queue button does."""
    if not server.frontend_ok:
        pytest.skip(f"no frontend for ComfyUI {server.version} at {FRONTENDS[server.version]}: run "
                    f"scripts/setup_runtime.sh")
    status, _ = server.post("/settings/Comfy.TutorialCompleted", True)     # no template browser over the canvas
    assert status == 200
    started = time.monotonic()
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(server.url)
        page.wait_for_function("() => window.comfyAPI?.app?.app?.graph && window.LiteGraph "
                               "&& LiteGraph.registered_node_types.ZImageTurboSampler "
                               "&& window.comfyAPI.app.app.graph.nodes.length", timeout=120_000)
        for name in NAMES:
            ui, api = shipped(name)
            got = graph_to_prompt(page, ui)
            assert {nid: {"inputs": n["inputs"], "class_type": n["class_type"]} for nid, n in got.items()} \
                == plain(api), name
            titles = {nid: n["_meta"]["title"] for nid, n in api.items() if "_meta" in n}
            assert {nid: got[nid]["_meta"]["title"] for nid in titles} == titles, name
    TIMES[f"{server.version} frontend"] = time.monotonic() - started


def test_hires_doc_states_the_recomputed_figures():
    """docs/hires.md's tables are what scripts/hires_memory.py computes now (ComfyUI's accounting from its tree,
    activations counted on the meta device), for the tiles and sizes the shipped hires workflow uses; and the
    claims it makes from them hold: under the 12 GB budget ComfyUI streams part of the bf16 DiT in pass 2 and
    keeps the fp8 one whole, both under the free memory, and only the tiled VAE decode fits."""
    from scripts import hires_memory as hm
    api = shipped("zimage_turbo_hires_2x")[1]
    by_kind = {n["class_type"]: n["inputs"] for n in api.values()}
    first = next(n["inputs"] for n in api.values() if n["class_type"] == "ZImageTurboSize")
    assert first["aspect"] == "1:1" and first["base"] * by_kind["ImageScaleBy"]["scale_by"] == 2048
    assert by_kind["VAEDecodeTiled"]["tile_size"] == by_kind["VAEEncodeTiled"]["tile_size"] == hm.TILE
    f = hm.figures()
    doc = (REPO / "docs" / "hires.md").read_text(encoding="utf-8")
    missing = [row for row in hm.tables(f) if row not in doc]
    assert not missing, "docs/hires.md differs from scripts/hires_memory.py:\n" + "\n".join(missing)
    second = f["stages"]["pass 2 (2048²)"]
    assert not second["bf16"]["full"] and second["bf16"]["streamed"] > 0
    assert second["fp8"]["full"]
    assert second["fp8"]["peak"] < second["bf16"]["peak"] < f["free"]
    assert f"{(f['free'] - second['bf16']['peak']) / hm.GIB:.2f} GiB under" in doc
    assert f["vae"]["decode_whole"] > f["free"] > f["vae"]["tiled_peak"]
    assert second["reserved"] > second["activations"], "ComfyUI would reserve less than the pass counts"
