"""Save node: PNGs in ComfyUI's output folder with ComfyUI's own metadata plus an A1111-style `parameters` text,
the chunk civitai, A1111/Forge "PNG Info" and exiftool read. The values come from the workflow graph itself."""
from __future__ import annotations

import json
import logging
import os
from pathlib import PurePath

import folder_paths
import numpy as np
from comfy.cli_args import args
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .image import ASPECTS, preset_size
from .loaders import CATEGORY

TURBO_SAMPLER = "ZImageTurboSampler"
SAMPLERS = {TURBO_SAMPLER, "KSampler", "KSamplerAdvanced"}
# loader class -> the input naming the model file (the DiT for split loaders)
MODEL_FILES = {"ZImageTurboLoader": "unet_name", "ZImageTurboCheckpointLoader": "ckpt_name",
               "ZImageTurboDiffusersLoader": "model_path", "CheckpointLoaderSimple": "ckpt_name",
               "UNETLoader": "unet_name"}
VAE_FILES = {"ZImageTurboLoader": "vae_name", "VAELoader": "vae_name"}
EMPTY_LATENTS = {"EmptyLatentImage", "EmptySD3LatentImage", "ZImageTurboSize"}
log = logging.getLogger(__name__)
MAX_WALK = 200          # nodes visited per search: a bound against odd graphs, far above any real workflow


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))


class Graph:
    """The API-format prompt ComfyUI hands to output nodes (hidden input PROMPT), read defensively: any
    node, input or link may be missing or odd, and every lookup then answers None."""

    def __init__(self, prompt):
        self.nodes = prompt if isinstance(prompt, dict) else {}

    def node(self, nid) -> dict | None:
        node = self.nodes.get(str(nid))
        return node if isinstance(node, dict) and isinstance(node.get("inputs"), dict) else None

    def source(self, node: dict | None, name: str) -> dict | None:
        """The node feeding input `name` of `node`, if it is a link."""
        value = node["inputs"].get(name) if node else None
        return self.node(value[0]) if is_link(value) else None

    def upstream(self, start: dict | None, wanted, through: tuple[str, ...] | None = None) -> dict | None:
        """Breadth-first from `start`'s inputs (only those named in `through`, at the first hop) to the first
        node whose class_type is in `wanted`."""
        if start is None:
            return None
        queue, seen = [], set()
        for name, value in start["inputs"].items():
            if is_link(value) and (through is None or name in through):
                queue.append(str(value[0]))
        while queue and len(seen) < MAX_WALK:
            nid = queue.pop(0)
            if nid in seen:
                continue
            seen.add(nid)
            node = self.node(nid)
            if node is None:
                continue
            if node.get("class_type") in wanted:
                return node
            queue.extend(str(v[0]) for v in node["inputs"].values() if is_link(v))
        return None

    def scalar(self, node: dict | None, name: str):
        """A widget value; through a link, the value of a primitive-like node (its same-named or `value`
        input). None when it is computed by some other node."""
        if node is None:
            return None
        value = node["inputs"].get(name)
        if is_link(value):
            src = self.node(value[0])
            if src is None:
                return None
            for key in (name, "value", "seed", "noise_seed", "int", "float"):
                v = src["inputs"].get(key)
                if v is not None and not is_link(v):
                    return v
            return None
        return value

    def text(self, node: dict | None, name: str) -> str | None:
        """The prompt text behind a conditioning input: the nearest node upstream with a string `text`."""
        src = self.source(node, name)
        hops = 0
        while src is not None and hops < MAX_WALK:
            text = self.scalar(src, "text")
            if isinstance(text, str):
                return text
            links = [v for v in src["inputs"].values() if is_link(v)]
            if not links:
                return None
            src, hops = self.node(links[0][0]), hops + 1          # follow the first conditioning-like input
        return None


def number(value) -> str:
    """1.0 -> '1', 0.55 -> '0.55', as A1111 writes them."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def quoted(value: str) -> str:
    """A1111 quotes a value that holds its separators (a comma or colon) as a JSON string."""
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ',:"\n') else value


def latent_size(graph: Graph, latent: dict | None) -> tuple[int, int] | None:
    if latent is None:
        return None
    kind = latent.get("class_type")
    if kind == "ZImageTurboSize":
        aspect, base = graph.scalar(latent, "aspect"), graph.scalar(latent, "base")
        if aspect in ASPECTS:
            return preset_size(aspect, base) if isinstance(base, int) else None
        # aspect 'custom' (or a newer option): the width/height inputs, as the node reads them
    width, height = graph.scalar(latent, "width"), graph.scalar(latent, "height")
    if isinstance(width, int) and isinstance(height, int):
        return width, height
    return None


def generation_info(prompt, unique_id, image_size: tuple[int, int]) -> dict:
    """What made the image, found by walking the graph upstream from this node's `images` input. Fields that
    cannot be found are left out."""
    graph = Graph(prompt)
    me = graph.node(unique_id)
    sampler = graph.upstream(me, SAMPLERS, through=("images",))
    info: dict = {}
    if sampler is not None:
        kind = sampler["class_type"]
        info["positive"] = graph.text(sampler, "positive")
        info["negative"] = graph.text(sampler, "negative")
        info["steps"] = graph.scalar(sampler, "steps")
        info["cfg"] = graph.scalar(sampler, "cfg")
        info["seed"] = graph.scalar(sampler, "noise_seed" if kind == "KSamplerAdvanced" else "seed")
        if kind == TURBO_SAMPLER:
            # the variant the sampler was told (the files carry no tag); prompts from before it existed: turbo
            base = graph.scalar(sampler, "variant") == "base"
            label = f"Z-Image {'Base' if base else 'Turbo'}"
            # the sampler's own Euler unless another of ComfyUI's was picked (prompts from before: its own)
            name, schedule = graph.scalar(sampler, "sampler_name"), graph.scalar(sampler, "scheduler")
            if (name or "euler", schedule or "simple") == ("euler", "simple"):
                info["sampler"] = f"Euler ({label})"
            elif isinstance(name, str) and isinstance(schedule, str):
                info["sampler"], info["schedule"] = f"{name} ({label})", schedule
            info["shift"] = graph.scalar(sampler, "shift")
        else:
            name, schedule = graph.scalar(sampler, "sampler_name"), graph.scalar(sampler, "scheduler")
            info["sampler"] = name if isinstance(name, str) else None
            info["schedule"] = schedule if isinstance(schedule, str) else None
            aura = graph.upstream(sampler, {"ModelSamplingAuraFlow"}, through=("model",))
            info["shift"] = graph.scalar(aura, "shift")
        if kind != "KSamplerAdvanced":
            info["denoise"] = graph.scalar(sampler, "denoise")
        size = latent_size(graph, graph.upstream(sampler, EMPTY_LATENTS, through=("latent_image",)))
        info["width"], info["height"] = size or image_size      # an encoded image's latent: the image's size
        loader = graph.upstream(sampler, set(MODEL_FILES), through=("model",))
        if loader is not None:
            model = graph.scalar(loader, MODEL_FILES[loader["class_type"]])
            info["model"] = model if isinstance(model, str) else None
            vae_key = VAE_FILES.get(loader["class_type"])
            vae = graph.scalar(loader, vae_key) if vae_key else None
            info["vae"] = vae if isinstance(vae, str) else None
    else:
        info["width"], info["height"] = image_size
    return {k: v for k, v in info.items() if v is not None}


def a1111_parameters(info: dict) -> str:
    """The `parameters` text: prompt, 'Negative prompt: …', then one 'Key: value, …' line."""
    lines = [info.get("positive", "")]
    if info.get("negative"):
        lines.append(f"Negative prompt: {info['negative']}")
    fields = []
    if "steps" in info:
        fields.append(("Steps", number(info["steps"])))
    if "sampler" in info:
        fields.append(("Sampler", info["sampler"]))
    if "schedule" in info:
        fields.append(("Schedule type", info["schedule"]))
    if "cfg" in info:
        fields.append(("CFG scale", number(info["cfg"])))
    if "seed" in info:
        fields.append(("Seed", number(info["seed"])))
    fields.append(("Size", f"{info['width']}x{info['height']}"))
    if "model" in info:
        # A1111 writes the checkpoint's name without extension; its UI and civitai match either form
        fields.append(("Model", PurePath(info["model"]).stem))
    if "vae" in info:
        fields.append(("VAE", PurePath(info["vae"]).name))
    if "shift" in info:
        fields.append(("Shift", number(info["shift"])))
    if "denoise" in info:
        fields.append(("Denoise", number(info["denoise"])))
    fields.append(("Version", "ComfyUI"))
    lines.append(", ".join(f"{key}: {quoted(str(value))}" for key, value in fields))
    return "\n".join(lines)


class ZImageTurboSaveImage:
    DESCRIPTION = ("Saves PNGs to ComfyUI's output folder like Save Image (the workflow stays embedded) and adds "
                   "the generation parameters (prompt, negative, steps, sampler, cfg, seed, size, model) in the "
                   "A1111 'parameters' format that civitai, A1111/Forge PNG Info and exiftool read.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The images to save, from a VAE decode."}),
                "filename_prefix": ("STRING", {"default": "ZImageTurbo",
                                               "tooltip": "File name prefix; may hold a subfolder and ComfyUI's "
                                                          "%date:yyyy-MM-dd% style variables."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "unique_id": "UNIQUE_ID"},
        }

    def save(self, images, filename_prefix="ZImageTurbo", prompt=None, extra_pnginfo=None, unique_id=None):
        out_dir = folder_paths.get_output_directory()
        height, width = int(images.shape[1]), int(images.shape[2])
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out_dir,
                                                                              width, height)
        try:
            info = generation_info(prompt, unique_id, (width, height))
            parameters = a1111_parameters(info)
        except Exception:                                      # metadata must never cost the user the image
            log.warning("Z-Image Save Image: could not read the parameters from the workflow; saving "
                        "with the size only", exc_info=True)
            info = {"width": width, "height": height}
            parameters = a1111_parameters(info)
        results = []
        for index, image in enumerate(images):
            pixels = np.clip(image.cpu().numpy() * 255.0, 0, 255).astype(np.uint8)
            meta = None
            if not args.disable_metadata:
                meta = PngInfo()
                meta.add_text("parameters", parameters)
                if prompt is not None:
                    meta.add_text("prompt", json.dumps(prompt))
                for key, value in (extra_pnginfo or {}).items():
                    meta.add_text(key, json.dumps(value))
            file = f"{name.replace('%batch_num%', str(index))}_{counter:05}_.png"
            Image.fromarray(pixels).save(os.path.join(folder, file), pnginfo=meta, compress_level=4)
            results.append({"filename": file, "subfolder": subfolder, "type": "output"})
            counter += 1
        shown = {k: v for k, v in info.items() if k not in ("positive", "negative")}
        shown["parameters"] = parameters
        return {"ui": {"images": results, "zimage": [shown]}}
