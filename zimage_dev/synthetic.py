"""Random Z-Image weights written in the released files' exact key layouts.

Real weights cannot be downloaded everywhere (CI, this project's machines), so tests, the demo and the
benchmarks write their own: tiny ones for CPU, full-size random bf16 ones for GPU timings.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from zimage_core import keys as K
from zimage_core.config import TINY, TURBO, DiTConfig
from zimage_core.dit import ZImageDiT
from zimage_core.text_encoder import QWEN3_4B, Qwen3Config, Qwen3Encoder
from zimage_core.vae import AutoEncoder, VAEConfig

# Tiny parts that fit together: the DiT's caption width is the text encoder's hidden size; the VAE
# downsamples by 8 like the Flux AE; the vocabulary is Qwen's, so the real tokenizer's ids are valid.
TINY_TEXT = Qwen3Config(hidden=TINY.cap_feat_dim, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=16,
                        ffn_hidden=64, vocab_size=151936)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)


@dataclass(frozen=True)
class SplitFiles:
    """Where ComfyUI keeps each released file, relative to its models/ folder."""
    dit: Path
    text_encoder: Path
    vae: Path


def random_state_dict(module: nn.Module, seed: int, std: float = 0.05,
                      dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Deterministic random values for every tensor; norm weights around 1 so activations keep their scale."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, t in module.state_dict().items():
        noise = torch.randn(t.shape, generator=g) * std
        is_norm = name.endswith("weight") and "norm" in name.rsplit(".", 2)[-2]
        sd[name] = (1 + noise if is_norm else noise).to(dtype).contiguous()
    return sd


def _on_meta(factory):
    with torch.device("meta"):
        return factory()


def dit_weights(cfg: DiTConfig = TINY, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, Tensor]:
    return random_state_dict(_on_meta(lambda: ZImageDiT(cfg)), seed, dtype=dtype)


def text_encoder_weights(cfg: Qwen3Config = TINY_TEXT, seed: int = 1,
                         dtype: torch.dtype = torch.bfloat16) -> dict[str, Tensor]:
    return random_state_dict(_on_meta(lambda: Qwen3Encoder(cfg)), seed, std=0.2, dtype=dtype)


def vae_weights(cfg: VAEConfig = TINY_VAE, seed: int = 2, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    return random_state_dict(_on_meta(lambda: AutoEncoder(cfg)), seed, dtype=dtype)


def to_fp8(sd: dict[str, Tensor], scaled: bool) -> dict[str, Tensor]:
    """The block Linear weights in float8_e4m3fn, as ComfyUI's fp8 releases store them; with `scaled`, each
    with a per-tensor `scale_weight` and the `scaled_fp8` marker (ComfyUI's older scaled-fp8 format)."""
    out = {}
    for name, t in sd.items():
        is_block_linear = t.ndim == 2 and name.split(".")[0] in ("layers", "noise_refiner", "context_refiner")
        if not is_block_linear:
            out[name] = t
            continue
        scale = t.float().abs().max() / 448.0 if scaled else torch.tensor(1.0)
        out[name] = (t.float() / scale).to(torch.float8_e4m3fn)
        if scaled:
            out[name.rsplit(".", 1)[0] + ".scale_weight"] = scale.reshape(())
    if scaled:
        out["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    return out


def write_split_files(models_dir: str | Path, dit_cfg: DiTConfig = TINY, text_cfg: Qwen3Config = TINY_TEXT,
                      vae_cfg: VAEConfig = TINY_VAE, seed: int = 0, name: str = "z_image_turbo_tiny",
                      dtype: torch.dtype = torch.bfloat16) -> SplitFiles:
    """ComfyUI's split files under models/: diffusion_models/, text_encoders/, vae/."""
    models = Path(models_dir)
    files = SplitFiles(models / "diffusion_models" / f"{name}_bf16.safetensors",
                       models / "text_encoders" / f"{name}_qwen3.safetensors",
                       models / "vae" / f"{name}_ae.safetensors")
    for path, sd in ((files.dit, dit_weights(dit_cfg, seed, dtype)),
                     (files.text_encoder, text_encoder_weights(text_cfg, seed + 1, dtype)),
                     (files.vae, vae_weights(vae_cfg, seed + 2))):
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(path))
    return files


SAFETENSORS_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32",
                     torch.float8_e4m3fn: "F8_E4M3", torch.int8: "I8", torch.uint8: "U8"}


def write_dit_file(path: str | Path, cfg: DiTConfig = TURBO, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                   std: float = 0.02, device: str = "cpu") -> Path:
    """A DiT file in ComfyUI's split layout (z_image_turbo_bf16.safetensors' keys, shapes and order), written
    tensor by tensor: a full-size (6.15 B parameter, 12.3 GB in bf16) file costs one tensor of memory."""
    return write_random_file(path, dit_shapes(cfg), seed, dtype, std, device)


def write_text_encoder_file(path: str | Path, cfg: Qwen3Config = QWEN3_4B, seed: int = 1,
                            dtype: torch.dtype = torch.bfloat16, std: float = 0.02, device: str = "cpu") -> Path:
    """A Qwen3 text encoder file in the released qwen_3_4b layout, tensor by tensor as write_dit_file (the full
    Qwen3-4B is 4.0 B parameters, 8 GB in bf16)."""
    return write_random_file(path, cfg.param_shapes(), seed, dtype, std, device)


def write_random_file(path: str | Path, shapes: dict[str, tuple[int, ...]], seed: int = 0,
                      dtype: torch.dtype = torch.bfloat16, std: float = 0.02, device: str = "cpu") -> Path:
    """A safetensors file of random tensors (values as random_state_dict's), written tensor by tensor: the header
    first, then each tensor made and written alone, so the file costs one tensor of memory however large it is.
    Written to a temporary name and renamed when complete: a cache never holds a half-written file. device
    "cuda" draws the numbers on the GPU (other values, same distribution): one CPU core draws ~10 B numbers, the
    full DiT and text encoder, in minutes, which a benchmark call on a lent GPU cannot spare."""
    path = Path(path)
    head, _, _ = safetensors_header(shapes, dtype)
    g = torch.Generator(device).manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        f.write(head)
        for name, shape in shapes.items():
            noise = torch.randn(shape, generator=g, device=device) * std
            is_norm = name.endswith("weight") and "norm" in name.rsplit(".", 2)[-2]
            t = (1 + noise if is_norm else noise).to(dtype).cpu()
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())      # its bytes, no copy
            del noise, t
    part.rename(path)
    return path


def safetensors_header(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype | dict[str, torch.dtype],
                       metadata: dict[str, str] | None = None) -> tuple[bytes, int, dict[str, int]]:
    """A safetensors file's first bytes (length, then the JSON header padded so the data starts 8-byte aligned)
    for tensors of `shapes` stored in that order (one dtype, or one per name), the size of the data that follows,
    and each tensor's offset in it."""
    header, offset, offsets = {}, 0, {}
    if metadata:
        header["__metadata__"] = metadata
    for name, shape in shapes.items():
        t_dtype = dtype[name] if isinstance(dtype, dict) else dtype
        n = torch.empty((), dtype=t_dtype).element_size() * math.prod(shape)
        header[name] = {"dtype": SAFETENSORS_DTYPE[t_dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offsets[name] = offset
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob, offset, offsets


def write_hollow_file(path: str | Path, shapes: dict[str, tuple[int, ...]],
                      dtype: torch.dtype | dict[str, torch.dtype] = torch.bfloat16,
                      filled: dict[str, Tensor] | None = None, metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file of all-zero tensors whose data is a hole in the file system: any size in an instant,
    and no disk. For tests of how a loader uses memory, which reads every byte the same whatever its value (the
    page cache fills a page for a hole as for data); never for a test of what a model computes.

    filled: tensors written for real (small ones a loader must parse, such as quantization declarations)."""
    path = Path(path)
    head, data, offsets = safetensors_header(shapes, dtype, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + data)
        for name, t in (filled or {}).items():
            f.seek(len(head) + offsets[name])
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return path


def write_hollow_quantized(kind: str, path: str | Path) -> Path:
    """A full-size quantized file in Comfy-Org's layout, hollow (write_hollow_file): "int8_convrot" as
    z_image_turbo_int8_convrot (the 202 block Linears int8 with per-row scales and a ConvRot declaration, the
    other 251 tensors F32: 857 tensors, as the released file), "fp8_mixed" as qwen_3_4b_fp8_mixed (the
    projections fp8 with a per-tensor scale but the first and last layers', the rest bf16)."""
    if kind == "int8_convrot":
        base, plain, stored = dit_shapes(), torch.float32, torch.int8
        conf = {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256}
        layers = {k[:-7] for k, v in base.items() if len(v) == 2 and k.split(".")[0] in
                  ("layers", "noise_refiner", "context_refiner")}
    elif kind == "fp8_mixed":
        base = {k: tuple(v.shape) for k, v in _on_meta(lambda: Qwen3Encoder(QWEN3_4B)).state_dict().items()}
        plain, stored, conf = torch.bfloat16, torch.float8_e4m3fn, {"format": "float8_e4m3fn"}
        edge = ("model.layers.0.", f"model.layers.{QWEN3_4B.n_layers - 1}.")
        layers = {k[:-7] for k in base if k.endswith("_proj.weight") and not k.startswith(edge)}
    else:
        raise ValueError(f"kind: {kind!r} is not int8_convrot or fp8_mixed")
    declaration = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
    shapes, dtypes, filled = {}, {}, {}
    for name, shape in base.items():
        layer = name[:-len(".weight")]
        shapes[name], dtypes[name] = shape, (stored if layer in layers else plain)
        if layer in layers:
            scale = torch.ones((shape[0], 1) if kind == "int8_convrot" else ())
            for key, t in ((f"{layer}.weight_scale", scale), (f"{layer}.comfy_quant", declaration)):
                shapes[key], dtypes[key], filled[key] = tuple(t.shape), t.dtype, t
    return write_hollow_file(path, shapes, dtypes, filled)


def dit_shapes(cfg: DiTConfig = TURBO) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in the released layout, in the released order."""
    model = _on_meta(lambda: ZImageDiT(cfg))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def write_all_in_one(path: str | Path, dit: dict[str, Tensor], text_encoder: dict[str, Tensor],
                     vae: dict[str, Tensor]) -> Path:
    """One checkpoint with ComfyUI's all-in-one prefixes (what CheckpointLoaderSimple reads)."""
    sd = {K.AIO_DIT + k: v for k, v in dit.items()}
    sd.update({K.AIO_TEXT + k: v for k, v in text_encoder.items()})
    sd.update({K.AIO_VAE + k: v for k, v in vae.items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path
