"""Quantized diffusion models through a real server, on both ComfyUI versions: the pack's loader against core's
UNETLoader on the same file, as a new user would pick either.

The files are the wide Z-Image (the released width, two main layers: core's UNETLoader detects Z-Image at that
width only) quantized by ComfyUI 0.30.0's own quantizer (tests/quantized_files.py) in each format Comfy-Org
publishes: int8 ConvRot and NVFP4 and MXFP8 declared per layer, fp8 declared in the header (the one form and
format 0.3.75 reads; its fp8 arithmetic is 0.30.0's: weight / (absmax / 448) in e4m3). Where the running ComfyUI
computes the format, the saved PNGs of the two loaders agree within 1/255; where it does not, the pack refuses
the file by name, through /prompt, and the server keeps serving."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from zimage_dev import quantized_files as qf
from zimage_dev import REPO
from zimage_dev.runtime import comfyui_tree, import_comfy
from zimage_dev.comfy_server import ComfyServer, execution_error, write_tiny_models
from zimage_dev.wide_files import WIDE, fixture_files, link

SIZE, STEPS, SEED = 64, 2, 31
CACHE = REPO / ".runtime" / "cache" / "quantized"
COMPUTES = {"0.30.0": set(qf.WIDE_FORMATS), "0.3.75": {"float8_e4m3fn"}}


@pytest.fixture(scope="module")
def quantized_files():
    import_comfy()                                       # the quantizer is 0.30.0's (comfy.quant_ops)
    return qf.wide_quantized(fixture_files() / WIDE, CACHE)


@pytest.fixture(scope="module", params=["0.30.0", "0.3.75"])
def server(request, tmp_path_factory, quantized_files):
    comfyui_tree(request.param)
    base = tmp_path_factory.mktemp(f"quantized-{request.param}")
    write_tiny_models(base / "models")
    for name, _ in qf.WIDE_FORMATS.values():
        link(quantized_files / name, base / "models" / "diffusion_models" / name)     # hard links, no copies
    write_q_lora(base / "models" / "loras")
    with ComfyServer(request.param, base) as srv:
        yield srv


def write_q_lora(folder, rank: int = 4, dim: int = 3840) -> None:
    """One LoRA on layers.0's query, in ai-toolkit's names (the pack's loader converts them) and the same delta in
    core's own fused-qkv names (what core's LoraLoaderModelOnly reads on every version)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    down, up = torch.randn(rank, dim, generator=g) * 0.05, torch.randn(dim, rank, generator=g) * 0.05
    save_file({"diffusion_model.layers.0.attention.to_q.lora_A.weight": down,
               "diffusion_model.layers.0.attention.to_q.lora_B.weight": up}, str(folder / "q_ai_toolkit.safetensors"))
    save_file({"diffusion_model.layers.0.attention.qkv.lora_down.weight": down,
               "diffusion_model.layers.0.attention.qkv.lora_up.weight": torch.cat([up, torch.zeros(2 * dim, rank)])},
              str(folder / "q_comfyui.safetensors"))


def job(server, unet: str, side: str, lora: dict | None = None) -> dict:
    """The pack's loader (side 'pack') or core's UNETLoader ('core') on `unet`, the pack's tiny text encoder and
    VAE for both, the pack's sampler; `lora` a node taking the MODEL."""
    info = server.object_info()["ZImageTurboLoader"]["input"]["required"]
    tiny = lambda key: next(n for n in info[key][0] if "tiny" in n)   # noqa: E731
    wf = {"1": {"class_type": "ZImageTurboLoader", "inputs": {
              "unet_name": unet, "clip_name": tiny("clip_name"), "vae_name": tiny("vae_name"), "weight_dtype": "auto"}},
          "2": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
          "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["1", 1]}},
          "4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
          "6": {"class_type": "ZImageTurboVAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
          "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"q_{side}"}}}
    model = ["1", 0] if side == "pack" else ["2", 0]
    if side == "core":                       # only the core side: the pack's loader would refuse an int8 file
        wf["1"]["inputs"]["unet_name"] = next(n for n in info["unet_name"][0] if "tiny" in n)
    if lora is not None:
        wf["l"] = {"class_type": lora["class_type"], "inputs": dict(lora["inputs"], model=model)}
        model = ["l", 0]
    wf["5"] = {"class_type": "ZImageTurboSampler", "inputs": {
        "model": model, "positive": ["3", 0], "latent_image": ["4", 0], "seed": SEED, "steps": STEPS, "cfg": 1.0,
        "shift": 3.0, "denoise": 1.0}}
    return wf


def image(server, wf) -> np.ndarray:
    files = server.output_files(server.run(wf, timeout=900))
    server.post("/free", {"unload_models": True, "free_memory": True})   # two 1-2 GB models per job: let them go
    return np.asarray(Image.open(files[0])).astype(np.int16)


@pytest.mark.parametrize("fmt", sorted(qf.WIDE_FORMATS))
def test_the_pack_loads_each_format_as_core_s_unet_loader_or_refuses_it(server, fmt):
    name = qf.WIDE_FORMATS[fmt][0]
    if fmt not in COMPUTES[server.version]:
        status, body = server.post_prompt(job(server, name, "pack"))
        assert status == 200, body
        entry = server.wait(body["prompt_id"], timeout=300)
        message = execution_error(entry)
        print(f"{server.version} {fmt}: refused: {message}")
        assert entry["status"]["status_str"] == "error"
        assert all(s in message for s in (name, fmt, f"ComfyUI {server.version} cannot compute", "Update ComfyUI",
                                          "bf16 file")), message
        assert server.alive()
        return
    pack, core = image(server, job(server, name, "pack")), image(server, job(server, name, "core"))
    diff = np.abs(pack - core).max()
    print(f"{server.version} {fmt}: pack loader vs core UNETLoader {diff}/255, image std {pack.std():.1f}")
    assert diff <= 1 and pack.std() > 5


@pytest.mark.parametrize("fmt", ["int8_tensorwise", "float8_e4m3fn"])
def test_the_lora_loader_on_core_s_quantized_model_matches_core_s(server, fmt):
    """core's UNETLoader on a quantized file, then the pack's LoRA loader (ai-toolkit names) or core's
    LoraLoaderModelOnly (core's names, the same delta): the same picture, and the LoRA changes it."""
    if fmt not in COMPUTES[server.version]:
        pytest.skip(f"ComfyUI {server.version} cannot load {fmt} files: core's UNETLoader cannot either")
    name = qf.WIDE_FORMATS[fmt][0]
    ours = image(server, job(server, name, "core", {"class_type": "ZImageLoraLoader", "inputs": {
        "lora_name": "q_ai_toolkit.safetensors", "strength_model": 1.0}}))
    theirs = image(server, job(server, name, "core", {"class_type": "LoraLoaderModelOnly", "inputs": {
        "lora_name": "q_comfyui.safetensors", "strength_model": 1.0}}))
    plain = image(server, job(server, name, "core"))
    print(f"{server.version} LoRA on core's {fmt} model: pack vs core {np.abs(ours - theirs).max()}/255, "
          f"effect {np.abs(ours - plain).max()}/255")
    assert np.abs(ours - theirs).max() <= 1 and np.abs(ours - plain).max() > 10
