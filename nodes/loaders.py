"""Loader nodes: the released files, picked from ComfyUI's model folders, read and checked by the pack's strict
loader, out as core ComfyUI's own Z-Image MODEL, CLIP and VAE (core_model, core_clip, core_vae)."""
from __future__ import annotations

from pathlib import Path

import comfy.model_management as mm
import folder_paths

from ..zimage_core.errors import ZImageError
from ..zimage_core.precision import FP8_FAST_NAME, FP8_NAME, NAMED, choose_dtypes
from .core_clip import load_clip
from .core_model import load_model
from .core_vae import load_vae

CATEGORY = "Z-Image"
DTYPES = ["auto", *NAMED, FP8_NAME, FP8_FAST_NAME]
DTYPE_TIP = ("Precision of the diffusion model and text encoder. auto: bf16 on GPUs that have it (RTX 30xx and "
             "newer), fp16 with an overflow guard on older GPUs, fp32 on CPU. fp8_e4m3fn stores the diffusion "
             "model's blocks in fp8 (half the memory, slightly less exact). fp8_e4m3fn_fast also multiplies them in "
             "fp8 on GPUs with fp8 units (RTX 40xx/50xx, L4, H100): faster, a little less exact again; elsewhere "
             "it is fp8_e4m3fn. The VAE never runs in fp16. A quantized file (int8 ConvRot, fp8_mixed, NVFP4, MXFP8) "
             "keeps its own format: this sets only its compute dtype.")


def named(input_name: str, load, *args, **kwargs):
    """The engine's file errors name the file; a REST client also needs the node input it came from."""
    try:
        return load(*args, **kwargs)
    except ZImageError as e:
        raise type(e)(f"{input_name}: {e}") from e


def load_parts(dit_path, te_path, vae_path, weight_dtype: str,
               inputs: tuple[str, str, str] = ("unet_name", "clip_name", "vae_name")):
    """inputs: the node inputs the three sources came from, for error messages."""
    text_dtype = choose_dtypes(mm.get_torch_device(), weight_dtype).text_encoder
    model = named(inputs[0], load_model, dit_path, weight_dtype)
    clip = named(inputs[1], load_clip, te_path, text_dtype)
    vae = named(inputs[2], load_vae, vae_path)
    return model, clip, vae


class _LoaderNode:
    """What every loader node shares: ComfyUI's own MODEL, CLIP and VAE out, with the engine inside."""
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"


class ZImageTurboLoader(_LoaderNode):
    DESCRIPTION = ("Loads Z-Image (Turbo or Base) from ComfyUI's split files (diffusion model bf16, fp8 or a quantized "
                   "repack, Qwen3-4B "
                   "text encoder, Flux VAE) as ComfyUI's own Z-Image model, text encoder and VAE: every core node "
                   "works with them.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet_name": (folder_paths.get_filename_list("diffusion_models"),
                          {"tooltip": "The diffusion model in models/diffusion_models: z_image_turbo_bf16.safetensors, "
                                      "a Base file, or a smaller repack (fp8, int8 ConvRot, NVFP4), run as core runs "
                                      "it."}),
            "clip_name": (folder_paths.get_filename_list("text_encoders"),
                          {"tooltip": "The Qwen3-4B text encoder in models/text_encoders: qwen_3_4b.safetensors or "
                                      "qwen_3_4b_fp8_mixed.safetensors."}),
            "vae_name": (folder_paths.get_filename_list("vae"),
                         {"tooltip": "The Flux VAE, ae.safetensors, in models/vae."}),
            "weight_dtype": (DTYPES, {"default": "auto", "tooltip": DTYPE_TIP}),
        }}

    def load(self, unet_name, clip_name, vae_name, weight_dtype):
        return load_parts(folder_paths.get_full_path_or_raise("diffusion_models", unet_name),
                          folder_paths.get_full_path_or_raise("text_encoders", clip_name),
                          folder_paths.get_full_path_or_raise("vae", vae_name), weight_dtype)


class ZImageTurboCheckpointLoader(_LoaderNode):
    DESCRIPTION = ("Loads an all-in-one Z-Image checkpoint, Turbo or Base (diffusion model, text encoder and VAE "
                   "in one file, from models/checkpoints) as ComfyUI's own Z-Image model, text encoder and VAE.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ckpt_name": (folder_paths.get_filename_list("checkpoints"),
                          {"tooltip": "An all-in-one Z-Image (Turbo or Base) .safetensors in models/checkpoints."}),
            "weight_dtype": (DTYPES, {"default": "auto", "tooltip": DTYPE_TIP}),
        }}

    def load(self, ckpt_name, weight_dtype):
        path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        return load_parts(path, path, path, weight_dtype, inputs=("ckpt_name",) * 3)


def diffusers_folders() -> dict[str, Path]:
    """Folders under models/diffusers that hold a diffusers pipeline (a model_index.json), by display name."""
    found = {}
    for root in folder_paths.get_folder_paths("diffusers"):
        root = Path(root)
        if root.is_dir():
            for index in sorted(root.glob("**/model_index.json")):
                found[index.parent.relative_to(root).as_posix()] = index.parent
    return found


class ZImageTurboDiffusersLoader(_LoaderNode):
    DESCRIPTION = ("Loads a Z-Image diffusers folder, Turbo or Base (transformer/ shards, text_encoder/, vae/, "
                   "tokenizer/) from models/diffusers as ComfyUI's own Z-Image model, text encoder and VAE (the "
                   "text is tokenized by ComfyUI's Qwen tokenizer, the same vocabulary).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_path": (sorted(diffusers_folders()),
                           {"tooltip": "A folder in models/diffusers holding model_index.json, e.g. Z-Image-Turbo."}),
            "weight_dtype": (DTYPES, {"default": "auto", "tooltip": DTYPE_TIP}),
        }}

    def load(self, model_path, weight_dtype):
        folders = diffusers_folders()
        if model_path not in folders:                       # only folders found under models/diffusers
            raise ValueError(f"model_path '{model_path}' is not a diffusers folder in models/diffusers; "
                             f"found: {', '.join(folders) or 'none'}")
        folder = folders[model_path]
        return load_parts(folder, folder, folder, weight_dtype, inputs=("model_path",) * 3)
