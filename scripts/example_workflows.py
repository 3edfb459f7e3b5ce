"""The example workflows in example_workflows/: each graph written once here, in API format, and turned into the
canvas format ComfyUI's template browser loads (with titles and notes a user needs).

    python -m scripts.example_workflows OBJECT_INFO_JSON   # rewrites example_workflows/*.json, workflows/NAME_api.json
    python -m scripts.example_workflows --pictures         # docs/images/NAME.png and the NAME.jpg thumbnails

ComfyUI lists every example_workflows/*.json of a pack in Workflow > Browse Templates (a same-named .jpg is its
thumbnail) and loads it onto the canvas, so only canvas files sit there; the API twins (for /prompt, the batch
client and scripts) are workflows/NAME_api.json. ComfyUI serves only the first of a pack's workflow folders it
finds (example_workflows/ before workflows/), so every canvas file of the pack lives in example_workflows/. The widget values of a canvas
file are positional, so the conversion needs the nodes' /object_info (scripts/ui_workflows.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from scripts.ui_workflows import to_api, to_ui
from zimage_dev import REPO
from zimage_dev.wide_files import CONTROL, WIDE

OUT = REPO / "example_workflows"
API = REPO / "workflows"                     # NAME_api.json: the API twins

# The released files (Comfy-Org/z_image_turbo, Comfy-Org/z_image, alibaba-pai's Fun ControlNet Union 1.0).
TURBO_DIT, BASE_DIT = "z_image_turbo_bf16.safetensors", "z_image_bf16.safetensors"
TEXT_ENCODER, VAE = "qwen_3_4b.safetensors", "ae.safetensors"
FUN_CONTROLNET = "Z-Image-Turbo-Fun-Controlnet-Union.safetensors"
NOTE_TYPES = {"MarkdownNote", "Note"}          # frontend-only nodes: not part of the API graph

PROMPT = ("A young woman in a red wool coat stands on a rainy Tokyo side street at dusk, neon signs reflected in "
          "the puddles, shallow depth of field, 35mm photograph")
NEGATIVE = "blurry, low quality, distorted hands, watermark, text"

FILES_NOTE = f"""## Files
Put the released files where ComfyUI keeps them:
- `models/diffusion_models/{{dit}}`
- `models/text_encoders/{TEXT_ENCODER}`
- `models/vae/{VAE}`

On 8-12 GB cards pick `fp8_e4m3fn` in the loader's **weight_dtype** (half the DiT's memory)."""


def loader(dit: str) -> dict:
    return {"class_type": "ZImageTurboLoader",
            "inputs": {"unet_name": dit, "clip_name": TEXT_ENCODER, "vae_name": VAE, "weight_dtype": "auto"}}


def text(prompt: str) -> dict:
    return {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}}


def size(base: int = 1024) -> dict:
    return {"class_type": "ZImageTurboSize",
            "inputs": {"aspect": "1:1", "base": base, "batch_size": 1, "width": 1024, "height": 1024}}


def sampler(model, latent, *, steps=8, cfg=1.0, denoise=1.0, negative=None, variant="turbo", seed=42,
            normalization=0.0, truncation=1.0, sampler_name="euler", scheduler="simple") -> dict:
    inputs = {"model": model, "positive": ["2", 0], "latent_image": latent, "seed": seed, "steps": steps,
              "cfg": cfg, "shift": 3.0, "denoise": denoise}
    if negative:
        inputs["negative"] = negative
    inputs.update(variant=variant, cfg_normalization=normalization, cfg_truncation=truncation,
                  sampler_name=sampler_name, scheduler=scheduler)
    return {"class_type": "ZImageTurboSampler", "inputs": inputs}


def decode(latent) -> dict:
    return {"class_type": "ZImageTurboVAEDecode", "inputs": {"samples": latent, "vae": ["1", 2]}}


def save(images, prefix: str) -> dict:
    return {"class_type": "ZImageTurboSaveImage", "inputs": {"images": images, "filename_prefix": prefix}}


def load_image(name: str = "example.png") -> dict:
    return {"class_type": "LoadImage", "inputs": {"image": name}}


# ---- the six workflows: (API graph, node titles, notes) ----

def turbo_text_to_image():
    api = {"1": loader(TURBO_DIT), "2": text(PROMPT), "3": size(), "4": sampler(["1", 0], ["3", 0]),
           "5": decode(["4", 0]), "6": save(["5", 0], "ZImage_turbo")}
    notes = [FILES_NOTE.format(dit=TURBO_DIT),
             "## Z-Image Turbo\n- **8 steps, cfg 1, shift 3** (the sampler's `turbo` variant). More steps add no "
             "detail.\n- cfg 1 runs one model pass per step and ignores a negative prompt: describe what you want "
             "instead.\n- Size: the *Size* node's presets are about one megapixel (1024 base); sides are multiples "
             "of 16."]
    return api, {"4": "Z-Image Turbo Sampler (8 steps, cfg 1)"}, notes


def base_text_to_image():
    api = {"1": loader(BASE_DIT), "2": text(PROMPT), "3": size(), "7": text(NEGATIVE),
           "4": sampler(["1", 0], ["3", 0], steps=50, cfg=4.0, negative=["7", 0], variant="base"),
           "5": decode(["4", 0]), "6": save(["5", 0], "ZImage_base")}
    notes = [FILES_NOTE.format(dit=BASE_DIT),
             "## Z-Image Base\n- **50 steps (30-50), cfg 4 (3-5), shift 3, with a negative prompt**: the sampler's "
             "`base` variant. Each step runs the prompt and the negative (batched in one forward), so a run takes "
             "about 12x a Turbo one.\n- diffusers' `guidance_scale=g` is `cfg g + 1` here.\n"
             "- `cfg_normalization` (0 = off; diffusers' True is 1) caps the guided prediction's norm; "
             "`cfg_truncation` (1 = off) drops CFG on the late steps. Both act only with cfg > 1.\n"
             "- With the Fun distill LoRA (a LoRA loader between the loader and the sampler) Base runs at 8 steps, "
             "cfg 1."]
    return api, {"4": "Z-Image Base Sampler (50 steps, cfg 4)", "2": "Prompt", "7": "Negative prompt"}, notes


def image_to_image():
    api = {"1": loader(TURBO_DIT), "2": text(PROMPT), "8": load_image(),
           "9": {"class_type": "ZImageTurboVAEEncode", "inputs": {"pixels": ["8", 0], "vae": ["1", 2]}},
           "4": sampler(["1", 0], ["9", 0], denoise=0.6), "5": decode(["4", 0]), "6": save(["5", 0], "ZImage_img2img")}
    notes = [FILES_NOTE.format(dit=TURBO_DIT),
             "## Image to image\n- Load your picture in **Load Image**; the output has its size (cropped to "
             "multiples of 16; about one megapixel is native, resize larger pictures first).\n- **denoise** sets "
             "how much changes: 0.3 keeps the composition and colours, 0.6 (here) redraws details, 1 ignores the "
             "image.\n- Turbo settings stay: 8 steps, cfg 1 (at denoise 0.6 the sampler runs the last 60% of an "
             "8-step schedule)."]
    return api, {"8": "Load Image (the picture to change)", "4": "Z-Image Turbo Sampler (denoise 0.6)"}, notes


def inpaint():
    api = {"1": loader(TURBO_DIT), "2": text("a small white cat sitting on the bench"), "8": load_image(),
           "10": {"class_type": "ZImageInpaintEncode",
                  "inputs": {"pixels": ["8", 0], "vae": ["1", 2], "mask": ["8", 1]}},
           "4": sampler(["1", 0], ["10", 0]), "5": decode(["4", 0]), "6": save(["5", 0], "ZImage_inpaint")}
    notes = [FILES_NOTE.format(dit=TURBO_DIT),
             "## Inpainting\n1. Load your picture in **Load Image**, right-click it > **Open in MaskEditor** and "
             "paint over what should change (painted = repaint, the rest is kept).\n2. Describe what goes in the "
             "painted region in the prompt.\n- Only the masked region changes: the sampler keeps the rest of the "
             "latent as the picture's (diffusers' ZImageInpaintPipeline rule).\n- denoise 1 repaints the region "
             "from scratch; 0.5-0.8 keeps its colours and shapes.\n- Nothing painted: the run repaints nothing "
             "and the encode node says so."]
    return api, {"8": "Load Image (paint the mask in the MaskEditor)"}, notes


def controlnet():
    api = {"1": loader(TURBO_DIT), "2": text(PROMPT), "3": size(),
           "11": {"class_type": "ModelPatchLoader", "inputs": {"name": FUN_CONTROLNET}},
           "12": load_image(),
           "13": {"class_type": "ZImageFunControlnetScheduled",
                  "inputs": {"model": ["1", 0], "model_patch": ["11", 0], "vae": ["1", 2], "strength": 0.75,
                             "start_percent": 0.0, "end_percent": 0.8, "image": ["12", 0]}},
           "4": sampler(["13", 0], ["3", 0]), "5": decode(["4", 0]), "6": save(["5", 0], "ZImage_controlnet")}
    notes = [FILES_NOTE.format(dit=TURBO_DIT) + f"\n- `models/model_patches/{FUN_CONTROLNET}` (alibaba-pai/"
             "Z-Image-Turbo-Fun-Controlnet-Union; the 2.x and lite files load the same way)",
             "## ControlNet (depth or pose)\n- **Load Image** takes the *control image*: a depth map (white = near) "
             "or an OpenPose skeleton, made by a preprocessor (e.g. comfyui_controlnet_aux's Depth Anything or "
             "DWPose) or any tool. Give it the output's aspect: it is scaled to the latent's size and centre-"
             "cropped.\n- **strength 0.75** is alibaba-pai's value for Union 1.0 (0.9 for 2.1).\n- **end_percent "
             "0.8**: the control stops for the last steps, which keeps the texture that full-length control "
             "flattens (0.5-0.8 works; 1 = all steps).\n- The control is computed as its trainer (VideoX-Fun) "
             "computed it: it also reads the prompt, unlike core's ZImageFunControlnet.\n- Needs ComfyUI 0.3.76 "
             "or newer (core's Fun ControlNet model)."]
    return api, {"12": "Control image (depth map or pose)", "11": "Load Model Patch (Fun ControlNet)",
                 "13": "Z-Image Fun ControlNet (ends at 80%)"}, notes


def hires():
    api = {"1": loader(TURBO_DIT), "2": text(PROMPT), "3": size(), "4": sampler(["1", 0], ["3", 0]),
           "5": decode(["4", 0]), "14": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
           "15": {"class_type": "ImageScaleBy", "inputs": {"image": ["5", 0], "upscale_method": "lanczos",
                                                            "scale_by": 2.0}},
           "16": {"class_type": "VAEEncodeTiled", "inputs": {"pixels": ["15", 0], "vae": ["1", 2], "tile_size": 512,
                                                              "overlap": 64, "temporal_size": 64,
                                                              "temporal_overlap": 8}},
           "17": sampler(["1", 0], ["16", 0], denoise=0.4),
           "18": {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["17", 0], "vae": ["1", 2], "tile_size": 512,
                                                              "overlap": 64, "temporal_size": 64,
                                                              "temporal_overlap": 8}},
           "6": save(["18", 0], "ZImage_hires")}
    notes = [FILES_NOTE.format(dit=TURBO_DIT),
             "## Hires: two passes\n1. **Pass 1** makes the picture at 1024x1024 (Turbo: 8 steps, cfg 1).\n"
             "2. It is upscaled 2x in pixels (lanczos) to 2048x2048 and encoded **in tiles**.\n3. **Pass 2** "
             "redraws the detail at denoise **0.4** (0.3 keeps more, 0.5 changes more; above 0.5 the composition "
             "drifts), same seed and prompt.\n4. The 2048x2048 latent is decoded **in tiles** (512 px, overlap "
             "64): untiled, ComfyUI's own estimate for that decode is 17 GiB.\n\n1.5x (1536x1536) halves pass 2's "
             "cost. On a 12 GB card see docs/hires.md of this pack: use `fp8_e4m3fn`, or ComfyUI streams part of "
             "the bf16 model."]
    return api, {"4": "Pass 1: 1024x1024 (Turbo, 8 steps)", "14": "Pass 1 preview",
                 "15": "Upscale 2x (pixels)", "16": "VAE Encode (Tiled) 2048x2048",
                 "17": "Pass 2: 2048x2048, denoise 0.4", "18": "VAE Decode (Tiled)"}, notes


# ---- twins of ComfyUI's official Z-Image templates (comfyui-workflow-templates-json): their settings, the pack's
# nodes. The templates sample with core's KSampler after ModelSamplingAuraFlow(3); the pack's sampler takes the
# same sampler and scheduler (and its shift input is that 3).
TEMPLATE_TURBO_PROMPT = ("Latina female with thick wavy hair, harbor boats and pastel houses behind. Breezy seaside "
                         "light, warm tones, cinematic close-up.")


def turbo_template():
    api = {"1": loader(TURBO_DIT), "2": text(TEMPLATE_TURBO_PROMPT), "3": size(),
           "4": sampler(["1", 0], ["3", 0], sampler_name="res_multistep", scheduler="simple"),
           "5": decode(["4", 0]), "6": save(["5", 0], "z-image-turbo")}
    notes = [FILES_NOTE.format(dit=TURBO_DIT),
             "## ComfyUI's Turbo template, with this pack\nThe settings of ComfyUI's own *Z-Image Turbo* template "
             "(`image_z_image_turbo`): **res_multistep, simple, 8 steps, cfg 1, shift 3**. The same seed gives "
             "the template's picture: the sampler runs ComfyUI's res_multistep as KSampler does. The pack's "
             "other Turbo example samples with euler (as diffusers does)."]
    return api, {"4": "Z-Image Sampler (res_multistep, as the template)"}, notes


def base_template():
    api = {"1": loader(BASE_DIT), "2": text(PROMPT), "3": size(), "7": text(""),
           "4": sampler(["1", 0], ["3", 0], steps=25, cfg=4.0, negative=["7", 0], variant="base",
                        sampler_name="res_multistep", scheduler="simple"),
           "5": decode(["4", 0]), "6": save(["5", 0], "Z_image_base")}
    notes = [FILES_NOTE.format(dit=BASE_DIT),
             "## ComfyUI's Base template, with this pack\nThe settings of ComfyUI's own *Z-Image Base* template "
             "(`image_z_image`): **res_multistep, simple, 25 steps, cfg 4, shift 3, an empty negative** (the "
             "template's note: steps 30-50, cfg 3-5). The canvas marks 25 steps as an edit of the base preset "
             "(50)."]
    return api, {"4": "Z-Image Base Sampler (res_multistep, as the template)", "7": "Negative prompt"}, notes


WORKFLOWS = {
    "zimage_turbo_text_to_image": turbo_text_to_image,
    "zimage_base_text_to_image": base_text_to_image,
    "zimage_turbo_image_to_image": image_to_image,
    "zimage_turbo_inpaint": inpaint,
    "zimage_turbo_controlnet": controlnet,
    "zimage_turbo_hires_2x": hires,
    "zimage_turbo_template": turbo_template,
    "zimage_base_template": base_template,
}
# the official template each twin follows, and its settings: tests/test_example_workflows.py reads them there
TEMPLATE_TWINS = {"zimage_turbo_template": "image_z_image_turbo", "zimage_base_template": "image_z_image"}


def canvas(api: dict, titles: dict, notes: list[str], object_info: dict) -> dict:
    """to_ui's graph, with titles on the nodes a user has to touch and Markdown notes in a row above it."""
    api = {nid: {k: v for k, v in node.items() if k != "_title"} for nid, node in api.items()}
    ui = to_ui(api, object_info)
    for node in ui["nodes"]:
        title = titles.get(str(node["id"]))
        if title:
            node["title"] = title
        node["pos"][1] += 420                       # room for the notes above
        node["properties"]["cnr_id"] = "comfy-core" if node["type"] in CORE else "comfyui_zimage_turbo"
    next_id = ui["last_node_id"]
    for i, text_ in enumerate(notes):
        next_id += 1
        ui["nodes"].append({"id": next_id, "type": "MarkdownNote", "pos": [60 + 520 * i, 40], "size": [480, 340],
                            "flags": {}, "order": len(ui["nodes"]), "mode": 0, "inputs": [], "outputs": [],
                            "title": "Note", "properties": {}, "widgets_values": [text_],
                            "color": "#432", "bgcolor": "#653"})
    ui["last_node_id"] = next_id
    return ui


CORE = {"CLIPTextEncode", "LoadImage", "ModelPatchLoader", "PreviewImage", "ImageScaleBy", "VAEEncodeTiled",
        "VAEDecodeTiled"}


def api_of_canvas(ui: dict, object_info: dict) -> dict:
    """The API graph a canvas file describes (notes dropped), by the same positional rule as the frontend."""
    return to_api({**ui, "nodes": [n for n in ui["nodes"] if n["type"] not in NOTE_TYPES]}, object_info)


def graphs(name: str) -> tuple[dict, dict, list[str]]:
    api, titles, notes = WORKFLOWS[name]()
    for nid, title in list(titles.items()):
        api[nid]["_title"] = title
    for node in api.values():                      # /prompt takes _meta.title as the canvas' node title
        title = node.pop("_title", None)
        if title:
            node["_meta"] = {"title": title}
    return api, titles, notes


# What running a workflow on tiny random weights may change; everything else (sampler, cfg, shift, denoise,
# variant, negative, seed, prompts, upscale factor, node graph) runs as shipped.
CUT = {("ZImageTurboLoader", "unet_name"), ("ZImageTurboLoader", "weight_dtype"), ("ZImageTurboLoader", "clip_name"), ("ZImageTurboLoader", "vae_name"),
       ("ModelPatchLoader", "name"), ("LoadImage", "image"), ("ZImageTurboSize", "aspect"),
       ("ZImageTurboSize", "width"), ("ZImageTurboSize", "height"), ("ZImageTurboSampler", "steps"),
       ("VAEEncodeTiled", "tile_size"), ("VAEEncodeTiled", "overlap"), ("VAEDecodeTiled", "tile_size"),
       ("VAEDecodeTiled", "overlap")}


def for_tiny_weights(api: dict, files: dict[str, str], image: str, size: int = 64, max_steps: int = 2,
                     tile: int = 64, weight_dtype: str | None = None) -> dict:
    """The workflow with the released file names swapped for `files` (released name -> test file), its size
    cut to size x size, at most max_steps steps, VAE tiles of `tile` px (so a small image still spans tiles) and
    `image` in every Load Image; weight_dtype, when given, for the loader (bf16 keeps a wide test DiT at its
    file's size on the CPU, where auto means fp32). Only the inputs in CUT change."""
    out = json.loads(json.dumps(api))
    for node in out.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "ZImageTurboLoader":
            for key in ("unet_name", "clip_name", "vae_name"):
                inputs[key] = files[inputs[key]]
            if weight_dtype:
                inputs["weight_dtype"] = weight_dtype
        elif kind == "ModelPatchLoader":
            inputs["name"] = files[inputs["name"]]
        elif kind == "LoadImage":
            inputs["image"] = image
        elif kind == "ZImageTurboSize":
            inputs.update(aspect="custom", width=size, height=size)
        elif kind == "ZImageTurboSampler":
            inputs["steps"] = min(inputs["steps"], max_steps)
        elif kind in ("VAEEncodeTiled", "VAEDecodeTiled"):
            inputs.update(tile_size=tile, overlap=tile // 4)
    return out


def changed_inputs(before: dict, after: dict) -> set[tuple[str, str]]:
    assert before.keys() == after.keys()
    return {(before[nid]["class_type"], key) for nid in before for key in before[nid]["inputs"]
            if before[nid]["inputs"][key] != after[nid]["inputs"].get(key)}


def plain(api: dict) -> dict:
    """The graph without the optional _meta titles (the canvas keeps them as node titles)."""
    return {nid: {"inputs": node["inputs"], "class_type": node["class_type"]} for nid, node in api.items()}


# The test files each released name is run on (the ControlNet needs the wide DiT: dim 3840), and the Load Image
# file each workflow reads.
TINY = "z_image_turbo_tiny"
TINY_FILES = {TURBO_DIT: f"{TINY}_bf16.safetensors", BASE_DIT: f"{TINY}_bf16.safetensors",
              TEXT_ENCODER: f"{TINY}_qwen3.safetensors", VAE: f"{TINY}_ae.safetensors"}
CONTROL_FILES = {**TINY_FILES, TURBO_DIT: WIDE, FUN_CONTROLNET: CONTROL}
INPUT_IMAGE = {"zimage_turbo_inpaint": "tiny_inpaint.png", "zimage_turbo_controlnet": "tiny_depth.png"}


def write_inputs(folder: Path, size: int) -> None:
    """The Load Image files: a photo-like gradient, the same with a transparent square (Load Image's mask is
    1 - alpha: the square is repainted), and a radial depth map."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(7)
    photo = np.stack([x, y, 1 - x * y], -1) * 200 + rng.integers(0, 40, (size, size, 3))
    Image.fromarray(photo.astype(np.uint8)).save(folder / "tiny_photo.png")
    alpha = np.full((size, size), 255, np.uint8)
    alpha[size // 4:3 * size // 4, size // 4:3 * size // 4] = 0
    Image.fromarray(np.dstack([photo.astype(np.uint8), alpha]), "RGBA").save(folder / "tiny_inpaint.png")
    depth = 255 * np.clip(1 - np.hypot(x - 0.5, y - 0.5) * 2, 0, 1)
    Image.fromarray(np.repeat(depth[..., None], 3, -1).astype(np.uint8)).save(folder / "tiny_depth.png")


def main(object_info_path: str) -> None:
    """Every canvas file: the examples' from their graphs here (with notes and titles), every other API twin in
    workflows/ (the e-commerce pair) converted as it is."""
    object_info = json.loads(Path(object_info_path).read_text())
    for path in sorted(API.glob("*_api.json")):
        name = path.name.removesuffix("_api.json")
        if name not in WORKFLOWS:
            target = OUT / f"{name}.json"
            ui = to_ui(json.loads(path.read_text(encoding="utf-8")), object_info)
            target.write_text(json.dumps(ui, ensure_ascii=False, indent=1), encoding="utf-8")
            print(target)
    for name in WORKFLOWS:
        api, titles, notes = graphs(name)
        graph = plain(api)
        ui = canvas(graph, titles, notes, object_info)
        assert api_of_canvas(ui, object_info) == graph, name
        (OUT / f"{name}.json").write_text(json.dumps(ui, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        (API / f"{name}_api.json").write_text(json.dumps(api, ensure_ascii=False, indent=1) + "\n",
                                                  encoding="utf-8")
        print(OUT / f"{name}.json")




def pictures(version: str = "0.30.0", size: int = 256) -> None:
    """docs/images/NAME.png (128 px) and the template thumbnails example_workflows/NAME.jpg (256 px): each API
    twin run on the tiny random weights (TINY_FILES, CONTROL_FILES), at size x size with the
    shipped steps (the ControlNet's wide test DiT in bf16). They show that the graph runs, not what Z-Image
    draws."""
    import tempfile
    from PIL import Image
    from zimage_dev.comfy_server import ComfyServer, write_tiny_models
    from zimage_dev.wide_files import fixture_files, link
    docs = REPO / "docs" / "images"
    docs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        write_tiny_models(base / "models")
        write_inputs(base / "input", size)
        for sub, name in (("diffusion_models", WIDE), ("model_patches", CONTROL)):
            (base / "models" / sub).mkdir(parents=True, exist_ok=True)
            link(fixture_files() / name, base / "models" / sub / name)
        with ComfyServer(version, base) as srv:
            for name in WORKFLOWS:
                api = plain(json.loads((API / f"{name}_api.json").read_text(encoding="utf-8")))
                files = CONTROL_FILES if name == "zimage_turbo_controlnet" else TINY_FILES
                wf = for_tiny_weights(api, files, INPUT_IMAGE.get(name, "tiny_photo.png"), size, max_steps=50,
                                      tile=size // 2,
                                      weight_dtype="bf16" if name == "zimage_turbo_controlnet" else None)
                entry = srv.run(wf, timeout=900)
                prefix = next(n["inputs"]["filename_prefix"] for n in api.values()
                              if n["class_type"] == "ZImageTurboSaveImage")
                saved = [p for p in srv.output_files(entry) if p.name.startswith(prefix)]
                image = Image.open(saved[0]).convert("RGB")
                # small: coloured noise does not compress, and the README shows six of them
                image.resize((128, 128), Image.LANCZOS).save(docs / f"{name}.png", optimize=True)
                image.resize((256, 256), Image.LANCZOS).save(OUT / f"{name}.jpg", quality=85)
                print(name, image.size, float(np.asarray(image).std()))
                srv.post("/free", {"unload_models": True, "free_memory": True})


if __name__ == "__main__":
    if sys.argv[1:2] == ["--pictures"]:
        pictures(*sys.argv[2:])
    else:
        main(*sys.argv[1:])
