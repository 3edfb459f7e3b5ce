"""The pack inside a real ComfyUI server (0.30.0 and 0.3.75), driven over HTTP as a user's client would."""
from __future__ import annotations

import copy
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, comfyui_tree, write_diffusers_folder

sys.path.insert(0, str(REPO / "scripts"))
from comfy_server import ComfyServer, load_workflow, write_tiny_models  # noqa: E402

PACK_NODES = ["ZImageTurboLoader", "ZImageTurboCheckpointLoader", "ZImageTurboDiffusersLoader",
              "ZImageTurboSampler", "ZImageTurboVAEDecode", "ZImageTurboVAEEncode", "ZImageTurboSize"]
WORKFLOWS = sorted(p.name for p in (REPO / "workflows").glob("*_api.json"))


@pytest.fixture(scope="module", params=["0.30.0", "0.3.75"])
def server(request, tmp_path_factory):
    comfyui_tree(request.param)
    base = tmp_path_factory.mktemp(f"comfy-{request.param}")
    write_tiny_models(base / "models")
    write_diffusers_folder(base / "models" / "diffusers" / "Z-Image-Turbo-tiny")
    with ComfyServer(request.param, base) as srv:
        yield srv


def turbo_job(prompt: str, size: int, batch: int = 1, seed: int = 12345) -> dict:
    wf = load_workflow("ecommerce_turbo_api.json")
    wf["6"]["inputs"]["text"] = prompt
    wf["5"]["inputs"].update(width=size, height=size, batch_size=batch)
    wf["10"]["inputs"]["seed"] = seed
    return wf


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


def test_pack_loads_without_errors(server):
    log = server.log_text()
    assert "IMPORT FAILED" not in log and "comfyui_zimage_turbo" in log
    assert "Traceback" not in log, server.log_tail()


def test_every_node_is_listed_with_tooltips_and_a_description(server):
    info = server.object_info()
    for node_id in PACK_NODES:
        node = info[node_id]
        assert node["category"] == "Z-Image Turbo" and node["description"]
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
    wf = turbo_job("一只白猫", 64)
    wf["20"] = {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["3", 0], "shift": 3.0}}
    wf["21"] = {"class_type": "KSampler", "inputs": {
        "model": ["20", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0], "seed": 12345,
        "steps": 8, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    wf["22"] = {"class_type": "VAEDecode", "inputs": {"samples": ["21", 0], "vae": ["3", 2]}}
    wf["23"] = {"class_type": "SaveImage", "inputs": {"images": ["22", 0], "filename_prefix": "core_ksampler"}}
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
