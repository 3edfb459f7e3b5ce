"""The Fun ControlNet through real ComfyUI servers against diffusers 0.42.1's ZImageControlNetPipeline and
ZImageControlNetInpaintPipeline on the same files, prompt, noise and sigmas: the pack's node against the rule the
files were trained with, core's node against core's rule, and the distance between the two.

The files: core's ModelPatchLoader builds ZImage_Control at the released width only (dim 3840, 30 heads; its
config comes from key names, never from shapes) and spreads its control layers over 30 main blocks, so the DiT is
the wide fixture (dim 3840, two main blocks) of tests/test_core_nodes.py with its Union 1.0 ControlNet (both
cached once, hard-linked here); the lite and inpaint cases need a layout with inpaint channels, a 2.1-lite
ControlNet written here in the released key names (which core converts on load and diffusers reads as they are).
The text encoder and VAE are a tiny diffusers pipeline's, written in ComfyUI's layouts. Both sides hold bf16
weights and compute in fp32 (zimage_dev/controlnet_reference.py says how diffusers is made to). 64x64 pixels are 16
image tokens, padded to 32: the control tokens' padding is in every case.

Each case compares the final latent (SaveLatent) and the PNG:
- the pack's Z-Image Fun ControlNet (start/end) with the trainer's rule (VideoX-Fun's): diffusers' pipelines as
  they are (control blocks over the control tokens and the caption, hints on the whole sequence, a zero latent for
  an absent inpaint image) plus the 2.x / lite control refiner's hints on the DiT's own noise refiner, the one
  point where diffusers departs from the trainer (controlnet_reference.dit_gets_refiner_hints);
- core's ZImageFunControlnet on the same MODEL with core's rule: the same pipelines with the control stream cut
  to the tokens ComfyUI's patch computes on (controlnet_reference.use_core_token_set): image tokens only, no
  caption, no padding; so both rules are known to rounding, and the distance between them is printed and asserted
  far above rounding, so the day core changes, this test says so.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from zimage_dev import REPO
from zimage_dev.runtime import comfyui_tree
from zimage_dev.diffusers_files import write_diffusers_folder
from zimage_dev.comfy_server import ComfyServer
from zimage_dev.wide_files import CONTROL, WIDE, fixture_files, link
from zimage_dev.diffusers_files import SAME_AS_DIFFUSERS, write_split_from_diffusers

LITE = "zt_fun_controlnet_lite_release_layout.safetensors"
WIDTH = HEIGHT = 64
STEPS, SEED = 2, 31
PROMPT = "a lighthouse at dusk"
SCALE, SHIFT = 0.3611, 0.1159            # the Flux VAE's latent scale and shift (the tiny folder's too)
# fp32 on both sides from the same bf16 weights: the order of sums (attention kernels, fused vs split qkv) leaves
# ~1e-6 per step. A wrong key, channel order, scale or step moves the latent by 1e-2 or more.
LATENT_TOL, PNG_TOL = 1e-4, 1

# name: (layout, strength, start_percent, end_percent, steps, the steps the control acts on, inpaint inputs?)
# At 2 steps and shift 3 the sigmas are 1 and 0.75; start_percent 0.3 is sigma 0.875, so "schedule" skips the first
# step and acts on the second (ending early is tests/test_core_nodes.py's case, by hand with the pack's node).
CASES = {
    "control": ("union_1.0", 0.8, 0.0, 1.0, 1, None, False),
    "two_steps": ("union_1.0", 0.8, 0.0, 1.0, 2, None, False),
    "lite": ("lite", 0.9, 0.0, 1.0, 1, None, False),
    "inpaint": ("lite", 0.9, 0.0, 1.0, 1, None, True),
    "schedule": ("union_1.0", 0.8, 0.3, 1.0, 2, [1], False),
}
# core's node against core's rule. One step only: core's ZImageControlPatch keeps its control stream (temp_data)
# between forwards and clears it only at main block 26 or later (Union 1.0; 21 for lite), which the released
# 30-block DiT reaches and the two-block fixture does not; a second step here would find the first step's state.
# The pack's patch starts its stream at every forward's first noise-refiner block ("two_steps").
CORE_CASES = ("control", "inpaint")
FILES = {"union_1.0": CONTROL, "lite": LITE}


def core_has_fun_controlnet(version: str) -> bool:
    source = comfyui_tree(version) / "comfy_extras" / "nodes_model_patch.py"
    return source.is_file() and "class ZImageFunControlnet" in source.read_text()


def write_inputs(folder):
    """A control image (random 8x8-pixel cells), an image to inpaint (smooth gradient) and a mask whose box edges
    lie on latent cells (pixels 16..48 x 8..40), so core's nearest scaling and diffusers' agree by construction."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(3)
    cells = (torch.rand(3, HEIGHT // 8, WIDTH // 8, generator=g) * 255).byte()
    control = cells.repeat_interleave(8, -1).repeat_interleave(8, -2).movedim(0, -1).numpy()
    Image.fromarray(control).save(folder / "control.png")
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    source = np.stack([x * 4, y * 4, (x + y) * 2], -1).clip(0, 255).astype(np.uint8)
    Image.fromarray(source).save(folder / "inpaint_source.png")
    mask = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    mask[8:40, 16:48] = 255
    Image.fromarray(mask).save(folder / "inpaint_mask.png")


def reference(base, tmp) -> dict:
    """diffusers' results for every case, in a subprocess (controlnet_reference.py) that ends before the server
    starts: it holds the DiT and one ControlNet (the layers the two-block DiT uses) at a time, ~4.5 GB."""
    inputs = base / "input"
    cases = [{"name": "plain", "layout": None, "steps": STEPS}]
    for name, (layout, strength, _, _, steps, steps_on, inpaint) in CASES.items():
        for core_tokens in ((False, True) if name in CORE_CASES else (False,)):
            case = {"name": f"{name}{'_core_tokens' if core_tokens else ''}", "layout": layout, "steps": steps,
                    "strength": strength, "steps_on": steps_on, "core_tokens": core_tokens}
            if inpaint:
                case.update(inpaint=str(inputs / "inpaint_source.png"), mask=str(inputs / "inpaint_mask.png"))
            cases.append(case)
    for case in cases:
        case.update(prompt=PROMPT, seed=SEED, width=WIDTH, height=HEIGHT,
                    control=str(inputs / "control.png"))
    patches = base / "models" / "model_patches"
    job = {"tiny_folder": str(base / "models" / "diffusers" / "tiny"),
           "dit": str(base / "models" / "diffusion_models" / WIDE),
           "controls": {"union_1.0": {"path": str(patches / CONTROL), "core_layout": True},
                        "lite": {"path": str(patches / LITE), "core_layout": False}},
           "cases": cases, "out": str(tmp / "reference.pt")}
    (tmp / "job.json").write_text(json.dumps(job))
    log = tmp / "reference.log"
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "zimage_dev.controlnet_reference", str(tmp / "job.json")],
                              cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=1200)
    assert proc.returncode == 0, log.read_text()[-4000:]
    return torch.load(tmp / "reference.pt", weights_only=False)


@pytest.fixture(scope="module", params=["0.30.0", "0.3.75"])
def setup(request, tmp_path_factory):
    version = request.param
    comfyui_tree(version)
    if not core_has_fun_controlnet(version):
        pytest.skip(f"ComfyUI {version} has no ZImageFunControlnet (nor comfy/ldm/lumina/controlnet.py): core added "
                    "the Z-Image Fun ControlNet after 0.3.75, and the pack's node runs core's ZImage_Control")
    from zimage_dev.controlnet_reference import write_release_file
    cache = fixture_files()
    base = tmp_path_factory.mktemp(f"controlnet-{version}")
    tmp = tmp_path_factory.mktemp(f"controlnet-ref-{version}")
    write_diffusers_folder(base / "models" / "diffusers" / "tiny")
    write_split_from_diffusers(base / "models" / "diffusers" / "tiny", base / "models")
    for sub, name in (("diffusion_models", WIDE), ("model_patches", CONTROL)):
        (base / "models" / sub).mkdir(parents=True, exist_ok=True)
        link(cache / name, base / "models" / sub / name)            # hard links: no copy of 2-3 GB
    write_release_file(base / "models" / "model_patches" / LITE, "lite")
    write_inputs(base / "input")
    ref = reference(base, tmp)
    with ComfyServer(version, base) as srv:
        yield srv, ref


def job(case: str | None, prefix: str, steps: int = STEPS, node: str = "ZImageFunControlnetScheduled") -> dict:
    """The wide DiT (bf16 weights, fp32 compute) from one loader; the text encoder and VAE from a second one at
    'auto' (fp32 on the CPU, as diffusers' reference runs them: 'bf16' would make the text encoder bf16 too, a
    5.7e-4 latent difference on its own). The second loader's DiT is the tiny one, unused."""
    name = f"{SAME_AS_DIFFUSERS}.safetensors"
    wf = {
        "1": {"class_type": "ZImageTurboLoader", "inputs": {"unet_name": WIDE, "clip_name": name, "vae_name": name,
                                                            "weight_dtype": "bf16"}},
        "0": {"class_type": "ZImageTurboLoader", "inputs": {"unet_name": name, "clip_name": name, "vae_name": name,
                                                            "weight_dtype": "auto"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["0", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": WIDTH, "height": HEIGHT, "batch_size": 1}},
        "5": {"class_type": "ZImageTurboSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "latent_image": ["4", 0], "seed": SEED, "steps": steps,
            "cfg": 1.0, "shift": 3.0, "denoise": 1.0}},
        "6": {"class_type": "ZImageTurboVAEDecode", "inputs": {"samples": ["5", 0], "vae": ["0", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"latents/{prefix}"}},
    }
    if case is None:
        return wf
    layout, strength, start, end, steps, _, inpaint = CASES[case]
    wf["5"]["inputs"]["steps"] = steps
    wf["cn"] = {"class_type": "ModelPatchLoader", "inputs": {"name": FILES[layout]}}
    wf["img"] = {"class_type": "LoadImage", "inputs": {"image": "control.png"}}
    wf["c"] = {"class_type": node, "inputs": {
        "model": ["1", 0], "model_patch": ["cn", 0], "vae": ["0", 2], "strength": strength, "image": ["img", 0]}}
    if node == "ZImageFunControlnetScheduled":
        wf["c"]["inputs"].update(start_percent=start, end_percent=end)
    if inpaint:
        wf["src"] = {"class_type": "LoadImage", "inputs": {"image": "inpaint_source.png"}}
        wf["mask"] = {"class_type": "LoadImageMask", "inputs": {"image": "inpaint_mask.png", "channel": "red"}}
        wf["c"]["inputs"].update(inpaint_image=["src", 0], mask=["mask", 0])
    wf["5"]["inputs"]["model"] = ["c", 0]
    return wf


def pack_result(server, case, prefix, steps=STEPS, node="ZImageFunControlnetScheduled"):
    """(PNG pixels int16 HxWx3, the final latent in the model's space, as diffusers returns it)."""
    from safetensors.torch import load_file
    entry = server.run(job(case, prefix, steps, node), timeout=600)
    png, saved = entry["outputs"]["7"]["images"][0], entry["outputs"]["8"]["latents"][0]
    pixels = np.asarray(Image.open(server.output / png["subfolder"] / png["filename"])).astype(np.int16)
    raw = load_file(str(server.output / saved["subfolder"] / saved["filename"]))["latent_tensor"]
    return pixels, (raw.float() - SHIFT) * SCALE


def compare(ours, ref) -> tuple[float, int]:
    png, latent = ours
    rel = ((latent - ref["latent"]).abs().max() / ref["latent"].abs().max()).item()
    return rel, int(np.abs(png - ref["png"].astype(np.int16)).max())


@pytest.fixture(scope="module")
def plain(setup):
    """No ControlNet, at 1 and 2 steps (what each case's effect is measured against). At 2 steps it is checked
    against diffusers' ZImagePipeline: the wide DiT, text encoder and VAE agree to rounding (else nothing below
    could)."""
    server, ref = setup
    ours = {steps: pack_result(server, None, f"plain_{steps}", steps) for steps in (1, 2)}
    rel, png = compare(ours[STEPS], ref["plain"])
    print(f"\n{server.version} no control, {STEPS} steps: pack vs diffusers latent rel. {rel:.2e}, PNG max {png}/255")
    assert rel <= LATENT_TOL and png <= PNG_TOL
    return ours


@pytest.mark.parametrize("case", CASES)
def test_pack_fun_controlnet_is_the_trainer_s_rule(setup, plain, case):
    server, ref = setup
    ours = pack_result(server, case, case)
    rel, png = compare(ours, ref[case])
    base = plain[CASES[case][4]]
    effect = ((ours[1] - base[1]).abs().max() / base[1].abs().max()).item()
    effect_png = int(np.abs(ours[0] - base[0]).max())
    print(f"{server.version} {case}: pack vs the trainer's rule (diffusers + refiner hints): latent rel. {rel:.2e}, "
          f"PNG max {png}/255; effect of the control: latent rel. {effect:.2e}, PNG max {effect_png}/255")
    assert rel <= LATENT_TOL and png <= PNG_TOL
    assert effect > 100 * LATENT_TOL and effect_png > 10, "the ControlNet did not change the image"


@pytest.mark.parametrize("case", CORE_CASES)
def test_core_fun_controlnet_is_core_s_rule_far_from_the_trainer_s(setup, case):
    server, ref = setup
    core = pack_result(server, case, f"core_{case}", node="ZImageFunControlnet")
    rel, png = compare(core, ref[f"{case}_core_tokens"])
    rel_t, png_t = compare(core, ref[case])
    print(f"{server.version} {case}: core's node vs core's rule (diffusers on core's token set): latent rel. "
          f"{rel:.2e}, PNG max {png}/255; vs the trainer's rule: latent rel. {rel_t:.2e}, PNG max {png_t}/255")
    assert rel <= LATENT_TOL and png <= PNG_TOL
    assert rel_t > 100 * LATENT_TOL, "core's control now follows the trainer's rule: update the notes above"
