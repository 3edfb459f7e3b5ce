"""Key layouts of the released Z-Image files: how to recognise each and map it onto our module names.

Ours are ComfyUI's split-file names, so `z_image_turbo_bf16.safetensors` maps as the identity. The mappings
are exact renames (anchored patterns), plus one transform: diffusers' separate to_q/to_k/to_v are fused.
Functions here work on any mapping of names (tensors, meta tensors or header shapes).
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping, TypeVar

T = TypeVar("T")

# All-in-one checkpoint prefixes (ComfyUI's CheckpointLoaderSimple layout).
AIO_DIT = "model.diffusion_model."
AIO_TEXT = "text_encoders.qwen3_4b.transformer."
AIO_VAE = "vae."

# diffusers transformer names -> ours. Applied to the whole key, in order; the first match wins.
_DIT_FROM_DIFFUSERS: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^all_x_embedder\.2-1\.(weight|bias)$"), r"x_embedder.\1"),
    (re.compile(r"^all_final_layer\.2-1\.(.+)$"), r"final_layer.\1"),
    (re.compile(r"^(.+\.attention)\.to_out\.0\.weight$"), r"\1.out.weight"),
    (re.compile(r"^(.+\.attention)\.norm_q\.weight$"), r"\1.q_norm.weight"),
    (re.compile(r"^(.+\.attention)\.norm_k\.weight$"), r"\1.k_norm.weight"),
]
_QKV = re.compile(r"^(.+\.attention)\.to_([qkv])\.weight$")

# Keys some files carry that hold no weight of ours: ComfyUI's unused Lumina-2 norm and the old fp8 marker.
DIT_IGNORED = {"norm_final.weight", "scaled_fp8"}
# Per-layer quantisation extras (ComfyUI scaled-fp8, old and new naming, and the scales of core's quantized
# formats): consumed by the fp8 loader or handed to core's operations with the weight (formats.py).
QUANT_SUFFIXES = (".scale_weight", ".weight_scale", ".scale_input", ".input_scale", ".comfy_quant",
                  ".weight_scale_2", ".pre_quant_scale")


def is_quant_extra(key: str) -> bool:
    return key.endswith(QUANT_SUFFIXES)


def detect_dit_layout(keys: Iterable[str]) -> str:
    """'comfyui' (fused qkv) or 'diffusers' (to_q/to_k/to_v); 'unknown' when neither signature is there."""
    keys = set(keys)
    if "all_x_embedder.2-1.weight" in keys or "layers.0.attention.to_q.weight" in keys:
        return "diffusers"
    if "x_embedder.weight" in keys and "layers.0.attention.qkv.weight" in keys:
        return "comfyui"
    return "unknown"


def dit_from_diffusers(sd: Mapping[str, T], fuse: Callable[[list[T]], T]) -> dict[str, T]:
    """Rename a diffusers transformer state dict to ours; `fuse` concatenates [q, k, v] along rows."""
    out: dict[str, T] = {}
    qkv: dict[str, dict[str, T]] = {}
    for key, value in sd.items():
        m = _QKV.match(key)
        if m:
            qkv.setdefault(m.group(1), {})[m.group(2)] = value
            continue
        for pattern, repl in _DIT_FROM_DIFFUSERS:
            if pattern.match(key):
                key = pattern.sub(repl, key)
                break
        out[key] = value
    for prefix, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            missing = sorted({"q", "k", "v"} - set(parts))
            raise KeyError(f"{prefix}: to_{'/to_'.join(missing)} missing, cannot fuse qkv")
        out[f"{prefix}.qkv.weight"] = fuse([parts["q"], parts["k"], parts["v"]])
    return out


def strip_prefix(sd: Mapping[str, T], prefix: str) -> dict[str, T]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def split_all_in_one(keys: Iterable[str]) -> dict[str, str]:
    """Which parts an all-in-one checkpoint holds: {'dit'|'text'|'vae': prefix}."""
    keys = list(keys)
    parts = {}
    for name, prefix in (("dit", AIO_DIT), ("text", AIO_TEXT), ("vae", AIO_VAE)):
        if any(k.startswith(prefix) for k in keys):
            parts[name] = prefix
    return parts
