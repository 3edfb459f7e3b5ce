"""Z-Image Save Image in a real ComfyUI (0.30.0 and 0.3.75): the PNG keeps ComfyUI's own `prompt` and
`workflow` chunks and gains an A1111 `parameters` chunk whose values come from the graph that made it."""
from __future__ import annotations

import json
import re
import uuid

import pytest
from PIL import Image

from zimage_dev.runtime import import_pack
from zimage_dev.comfy_server import ComfyServer, execution_error, load_workflow

# A1111's own parser for the last line (modules/infotext_utils.py re_param): key, then a quoted or plain value.
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> tuple[str, str | None, dict]:
    """(prompt, negative, {key: value}) the way A1111's PNG Info reads a `parameters` text."""
    *lines, last = text.split("\n")
    params = {k: (json.loads(v) if v.startswith('"') else v) for k, v in RE_PARAM.findall(last)}
    negative = None
    for i, line in enumerate(lines):
        if line.startswith("Negative prompt:"):
            negative = "\n".join(lines[i:])[len("Negative prompt:"):].strip()
            lines = lines[:i]
            break
    return "\n".join(lines), negative, params


def turbo_job(prompt="a white ceramic mug, studio light", negative="blurry, text", seed=424242, steps=3,
              width=96, height=64, prefix="meta") -> dict:
    wf = load_workflow("ecommerce_turbo_api.json")
    assert wf["11"]["class_type"] == "ZImageTurboSaveImage", "the bundled workflow should use the pack's save node"
    wf["6"]["inputs"]["text"], wf["7"]["inputs"]["text"] = prompt, negative
    wf["5"]["inputs"].update(width=width, height=height, batch_size=1)
    wf["10"]["inputs"].update(seed=seed, steps=steps)
    wf["11"]["inputs"]["filename_prefix"] = prefix
    return wf


def run_with_workflow_chunk(server: ComfyServer, wf: dict, canvas: dict) -> dict:
    """Post as the frontend does: the API prompt plus the canvas workflow in extra_pnginfo."""
    status, body = server.post("/prompt", {"prompt": wf, "client_id": str(uuid.uuid4()),
                                           "extra_data": {"extra_pnginfo": {"workflow": canvas}}})
    assert status == 200, body
    entry = server.wait(body["prompt_id"], timeout=300)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    return entry


def png_text(server: ComfyServer, entry: dict) -> tuple[Image.Image, dict]:
    files = server.output_files(entry)
    assert len(files) == 1, files
    image = Image.open(files[0])
    return image, dict(image.text)


def test_save_node_is_listed_with_tooltips_and_a_description(server):
    node = server.object_info()["ZImageTurboSaveImage"]
    assert node["display_name"] == "Z-Image Save Image" and node["category"] == "Z-Image"
    assert node["output_node"] is True and "parameters" in node["description"]
    assert all(spec[1].get("tooltip") for spec in node["input"]["required"].values())
    assert set(node["input"]["hidden"]) == {"prompt", "extra_pnginfo", "unique_id"}


def test_parameters_chunk_holds_the_exact_values_and_comfyui_chunks_stay(server):
    wf = turbo_job(prompt="a white ceramic mug, studio light\nsecond line: 50% off", negative="blurry, text")
    canvas = {"nodes": [], "links": [], "marker": "canvas-workflow-kept"}
    entry = run_with_workflow_chunk(server, wf, canvas)
    image, text = png_text(server, entry)
    assert image.size == (96, 64)

    prompt, negative, params = parse_parameters(text["parameters"])
    assert prompt == "a white ceramic mug, studio light\nsecond line: 50% off"
    assert negative == "blurry, text"
    assert params["Steps"] == "3" and params["Seed"] == "424242" and params["Size"] == "96x64"
    assert params["Sampler"] == "Euler (Z-Image Turbo)" and params["CFG scale"] == "1"
    assert params["Model"] == "z-image-turbo" and params["Shift"] == "3" and params["Denoise"] == "1"
    assert text["parameters"].endswith(
        "Steps: 3, Sampler: Euler (Z-Image Turbo), CFG scale: 1, Seed: 424242, Size: 96x64, Model: z-image-turbo, "
        "Shift: 3, Denoise: 1, Version: ComfyUI")

    assert json.loads(text["prompt"]) == wf, "ComfyUI's API prompt chunk must be the prompt that ran"
    assert json.loads(text["workflow"])["marker"] == "canvas-workflow-kept"

    ui = entry["outputs"]["11"]["zimage"][0]
    assert (ui["seed"], ui["steps"], ui["width"], ui["height"]) == (424242, 3, 96, 64)
    assert ui["parameters"] == text["parameters"]


def test_core_ksampler_and_split_loader(server):
    """Core KSampler behind ModelSamplingAuraFlow, the split-file loader: sampler/schedule, shift and the
    diffusion model's and VAE's file names come from those nodes."""
    names = server.object_info()["ZImageTurboLoader"]["input"]["required"]
    unet, clip, vae = names["unet_name"][0][0], names["clip_name"][0][0], names["vae_name"][0][0]
    wf = turbo_job(seed=7, width=64, height=64)
    wf["3"] = {"class_type": "ZImageTurboLoader",
               "inputs": {"unet_name": unet, "clip_name": clip, "vae_name": vae, "weight_dtype": "auto"}}
    wf["20"] = {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["3", 0], "shift": 2.5}}
    wf["10"] = {"class_type": "KSampler", "inputs": {
        "model": ["20", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0], "seed": 99,
        "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    _, text = png_text(server, server.run(wf))
    _, negative, params = parse_parameters(text["parameters"])
    assert negative == "blurry, text"
    assert (params["Sampler"], params["Schedule type"], params["Seed"], params["Steps"]) == ("euler", "simple", "99", "2")
    assert params["Shift"] == "2.5" and params["Size"] == "64x64"
    assert params["Model"] == unet.rsplit(".", 1)[0] and params["VAE"] == vae


def test_size_preset_node_gives_the_size(server):
    wf = turbo_job(seed=5, steps=1)
    wf["5"] = {"class_type": "ZImageTurboSize", "inputs": {"aspect": "16:9", "base": 1024, "batch_size": 1}}
    image, text = png_text(server, server.run(wf))
    assert image.size == (1360, 768)
    assert parse_parameters(text["parameters"])[2]["Size"] == "1360x768"
    wf["5"]["inputs"].update(aspect="custom", width=80, height=48)
    image, text = png_text(server, server.run(wf))
    assert image.size == (80, 48)
    assert parse_parameters(text["parameters"])[2]["Size"] == "80x48"


def test_a_graph_without_a_sampler_still_saves(server):
    """Nothing to report but the size: the PNG is written, with no invented fields."""
    wf = {"1": {"class_type": "EmptyImage", "inputs": {"width": 48, "height": 32, "batch_size": 2, "color": 0}},
          "2": {"class_type": "ZImageTurboSaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "nosampler"}}}
    entry = server.run(wf)
    files = server.output_files(entry)
    assert len(files) == 2 and all(f.name.startswith("nosampler") for f in files)
    text = Image.open(files[0]).text
    prompt, negative, params = parse_parameters(text["parameters"])
    assert prompt == "" and negative is None
    assert params == {"Size": "48x32", "Version": "ComfyUI"}
    assert "prompt" in text


# ---- in-process: the graph reading on odd graphs, without a server -------------------------------------

@pytest.fixture(scope="module")
def save():
    return import_pack("nodes.save")


def save_node_graph(**sampler_inputs) -> dict:
    return {
        "1": {"class_type": "ZImageTurboCheckpointLoader", "inputs": {"ckpt_name": "sub/my, model.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 832, "height": 1248, "batch_size": 1}},
        "4": {"class_type": "ZImageTurboSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "latent_image": ["3", 0], "seed": 1, "steps": 8,
            "cfg": 1.0, "shift": 3.0, "denoise": 0.6, **sampler_inputs}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "ZImageTurboSaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "x"}},
    }


@pytest.mark.parametrize("prompt", [None, {}, "not a graph", {"6": "not a node"},
                                    {"6": {"class_type": "ZImageTurboSaveImage", "inputs": {"images": ["9", 0]}}},
                                    {"6": {"class_type": "ZImageTurboSaveImage", "inputs": {"images": ["7", 0]}},
                                     "7": {"class_type": "Loop", "inputs": {"a": ["8", 0]}},
                                     "8": {"class_type": "Loop", "inputs": {"a": ["7", 0]}}}])
def test_odd_graphs_give_the_image_size_only(save, prompt):
    assert save.generation_info(prompt, "6", (64, 48)) == {"width": 64, "height": 48}
    assert save.a1111_parameters({"width": 64, "height": 48}) == "\nSize: 64x48, Version: ComfyUI"


def test_values_through_links_and_quoting(save):
    graph = save_node_graph(seed=["7", 0])
    graph["7"] = {"class_type": "PrimitiveInt", "inputs": {"value": 987654321}}
    info = save.generation_info(graph, "6", (10, 10))
    assert info["seed"] == 987654321 and (info["width"], info["height"]) == (832, 1248)
    assert "negative" not in info                  # no negative connected: no line for it
    text = save.a1111_parameters(info)
    prompt, negative, params = parse_parameters(text)
    assert prompt == "a cat" and negative is None
    assert params["Model"] == "my, model" and params["Denoise"] == "0.6" and params["Seed"] == "987654321"
    assert 'Model: "my, model"' in text              # a value holding a comma is quoted, as A1111 does


@pytest.mark.parametrize("variant, label", [(None, "Turbo"), ("turbo", "Turbo"), ("base", "Base")])
def test_the_sampler_line_names_the_variant_it_ran(save, variant, label):
    """The sampler runs Turbo and Base: the PNG says which the sampler was told (a prompt from before the
    variant input existed ran Turbo's defaults)."""
    graph = save_node_graph(**({"variant": variant} if variant else {}))
    assert save.generation_info(graph, "6", (10, 10))["sampler"] == f"Euler (Z-Image {label})"


def test_the_sampler_line_names_another_sampler_and_its_schedule(save):
    """With one of ComfyUI's samplers picked, the PNG says which (A1111's Sampler and Schedule type fields)."""
    graph = save_node_graph(sampler_name="res_multistep", scheduler="beta", variant="base")
    info = save.generation_info(graph, "6", (10, 10))
    assert (info["sampler"], info["schedule"]) == ("res_multistep (Z-Image Base)", "beta")
    params = parse_parameters(save.a1111_parameters(info))[2]
    assert params["Sampler"] == "res_multistep (Z-Image Base)" and params["Schedule type"] == "beta"
    named_default = save.generation_info(save_node_graph(sampler_name="euler", scheduler="simple"), "6", (10, 10))
    assert named_default["sampler"] == "Euler (Z-Image Turbo)" and "schedule" not in named_default


def test_a_value_computed_by_another_node_is_left_out(save):
    graph = save_node_graph(steps=["7", 0])
    graph["7"] = {"class_type": "SomeMath", "inputs": {"a": ["3", 1], "b": ["3", 2]}}
    info = save.generation_info(graph, "6", (10, 10))
    assert "steps" not in info and info["seed"] == 1
    assert "Steps:" not in save.a1111_parameters(info)


def test_the_png_is_written_even_when_reading_the_graph_fails(save, tmp_path, monkeypatch):
    import folder_paths
    import torch
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    monkeypatch.setattr(save, "generation_info", lambda *a: 1 / 0)
    out = save.ZImageTurboSaveImage().save(torch.rand(1, 32, 48, 3), "fallback", prompt={"x": 1}, unique_id="6")
    files = list(tmp_path.glob("fallback_*.png"))
    assert len(files) == 1 and out["ui"]["images"][0]["filename"] == files[0].name
    text = Image.open(files[0]).text
    assert text["parameters"] == "\nSize: 48x32, Version: ComfyUI" and json.loads(text["prompt"]) == {"x": 1}


def test_disable_metadata_writes_no_text_chunks(save, tmp_path, monkeypatch):
    """--disable-metadata means none at all, ours included (people use it to keep prompts private)."""
    import folder_paths
    import torch
    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    monkeypatch.setattr(save.args, "disable_metadata", True)
    out = save.ZImageTurboSaveImage().save(torch.rand(2, 16, 16, 3), "private", prompt=save_node_graph(),
                                           extra_pnginfo={"workflow": {}}, unique_id="6")
    files = sorted(tmp_path.glob("private_*.png"))
    assert len(files) == 2 and all(Image.open(f).text == {} for f in files)
    assert out["ui"]["zimage"][0]["steps"] == 8           # the canvas still gets the values
