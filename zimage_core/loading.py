"""One way in for every released Z-Image file: read headers -> detect layout -> map keys -> build on meta
-> strict check -> read tensors one at a time, cast to the target dtype, assign.

Accepted: ComfyUI split files (DiT bf16 / fp8 e4m3fn with or without scales, qwen_3_4b, ae), an all-in-one
checkpoint, a diffusers folder (or its transformer/, text_encoder/, vae/ subfolders).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from . import formats
from . import keys as K
from . import quant
from .checkpoint import Checkpoint, open_checkpoint
from .config import DiTConfig
from .dit import ZImageDiT
from .errors import CheckpointMismatch, UnknownCheckpoint, UnsupportedFile, first
from .fastpath import FAST, FastPath, configure
from .text_encoder import Qwen3Config, Qwen3Encoder
from .vae import AutoEncoder, VAEConfig, diffusers_to_ldm, is_diffusers_layout

Source = str | Path | Checkpoint
DIFFUSERS_SUBFOLDER = {"dit": "transformer", "text": "text_encoder", "vae": "vae"}
AIO_PREFIX = {"dit": K.AIO_DIT, "text": K.AIO_TEXT, "vae": K.AIO_VAE}
PART_NAME = {"dit": "diffusion model", "text": "text encoder (Qwen3)", "vae": "VAE (Flux AE)"}
EXPECTED_FILE = {"dit": "z_image_turbo_bf16.safetensors in models/diffusion_models",
                 "text": "qwen_3_4b.safetensors in models/text_encoders",
                 "vae": "ae.safetensors in models/vae"}
FP8_DTYPES = {"F8_E4M3", "F8_E5M2"}


@dataclass
class LoadReport:
    file: str
    part: str
    layout: str
    config: object
    dtype: torch.dtype
    source_dtypes: Counter = field(default_factory=Counter)
    ignored: list[str] = field(default_factory=list)
    block_dtypes: dict[str, str] = field(default_factory=dict)      # DiT: our key -> the file's dtype name
    fp8_blocks: bool = False                                          # DiT: block weights kept in fp8
    quantization: formats.Quantization = field(default_factory=formats.Quantization)   # declared formats

    def __str__(self) -> str:
        src = ", ".join(f"{n} {d}" for d, n in self.source_dtypes.most_common())
        blocks = ", blocks fp8" if self.fp8_blocks else ""
        quantized = f", {self.quantization.describe()}" if self.quantization else ""
        return f"{self.file}: {PART_NAME[self.part]}, {self.layout} layout, {src} -> {self.dtype}{blocks}{quantized}"


def open_part(source: Source, part: str) -> tuple[Checkpoint, str]:
    """The tensors of one part, and how they were found ('file', 'all-in-one', 'diffusers folder')."""
    if isinstance(source, Checkpoint):
        ckpt, how = source, "file"
    else:
        path = Path(source)
        sub = path / DIFFUSERS_SUBFOLDER[part]
        if path.is_dir() and sub.is_dir():
            path = sub
        ckpt, how = open_checkpoint(path), ("diffusers folder" if path.is_dir() else "file")
    prefix = AIO_PREFIX[part]
    if any(k.startswith(prefix) for k in ckpt.shapes):
        return ckpt.view(prefix), "all-in-one"
    return ckpt, how


def describe(keys: list[str]) -> str:
    """A guess at what a state dict is, for error messages."""
    ks = set(keys)
    def has(fragment: str) -> bool:
        return any(fragment in k for k in ks)
    if has("input_blocks.") and has("conditioner.embedders"):
        return "looks like an SDXL checkpoint"
    if has("input_blocks.") or has("cond_stage_model."):
        return "looks like a Stable Diffusion 1.x/2.x checkpoint"
    if has("double_blocks.") or has("single_blocks."):
        return "looks like a Flux diffusion model"
    if has("self_attn.q_norm"):
        return "looks like a Qwen3 text encoder"
    if has("decoder.conv_in") or has("decoder.up_blocks"):
        return "looks like a VAE"
    if has("attention.qkv") or has("attention.to_q") or has("all_x_embedder"):
        return "looks like a Z-Image diffusion model"
    return "is not a model this pack knows"


def _unknown(ckpt: Checkpoint, part: str) -> UnknownCheckpoint:
    return UnknownCheckpoint(f"{ckpt.name} is not a Z-Image {PART_NAME[part]}: it {describe(ckpt.all_keys())} "
                             f"(first keys: {first(ckpt.all_keys(), 3)}). Expected {EXPECTED_FILE[part]}.")


def check_keys(expected: Mapping[str, tuple], found: Mapping[str, tuple], ckpt: Checkpoint, part: str,
               layout: str) -> None:
    """Strict: every key present, nothing extra, every shape equal. Names the file, layout and first keys."""
    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected)
    wrong = [f"{k} {list(found[k])} (expected {list(expected[k])})"
             for k in sorted(set(expected) & set(found)) if tuple(found[k]) != tuple(expected[k])]
    if not (missing or unexpected or wrong):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {first(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} wrong shapes: {', '.join(wrong[:3])}")
    raise CheckpointMismatch(f"{ckpt.name} looked like a Z-Image {PART_NAME[part]} ({layout} layout) but does "
                             f"not fit one: {'; '.join(problems)}. The file is damaged or another variant: "
                             f"use {EXPECTED_FILE[part]}.")


def _build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return factory()


def _materialise(model: nn.Module, read: Callable[[str], Tensor], dtype: torch.dtype, device,
                 stored: Mapping[str, torch.dtype] | None = None) -> None:
    """Read each tensor once, cast, move, and assign it in place of the meta parameter (no second copy).

    stored: keys kept in another dtype than `dtype` (fp8 block weights), cast here, tensor by tensor, so the
    largest thing ever held besides the model is one tensor as read. CPU tensors get memory of their own, not
    a view of the file's mapping: CPU kernels round differently with the weight's address mod 64 (the file's
    header length decided it, so the same weights from two files computed different bits), and a model tied
    to a mapped file would fault if that file were replaced on disk."""
    sd = {}
    for key in model.state_dict():
        src = read(key)
        t = src.to(device=device, dtype=(stored or {}).get(key, dtype))
        if t.device.type == "cpu" and t.untyped_storage().data_ptr() == src.untyped_storage().data_ptr():
            t = t.clone(memory_format=torch.contiguous_format)
        sd[key] = t
        del src, t
    model.load_state_dict(sd, strict=True, assign=True)
    model.eval().requires_grad_(False)


def _checked_model(model_cls: type, config_cls: type, shapes: Mapping[str, tuple], ckpt: Checkpoint, part: str,
                   layout: str) -> tuple[nn.Module, object]:
    """Config from the shapes, the model built on meta, then the strict key/shape check against it."""
    cfg = _config_from(config_cls.from_shapes, shapes, ckpt, part, layout)
    model = _build_on_meta(lambda: model_cls(cfg))
    check_keys({k: tuple(v.shape) for k, v in model.state_dict().items()}, shapes, ckpt, part, layout)
    return model, cfg


def _load(prepared: tuple[nn.Module, "LoadReport", Callable[[str], Tensor]], dtype: torch.dtype, device,
          stored: Mapping[str, torch.dtype] | None = None):
    model, report, read = prepared
    _materialise(model, read, dtype, device, stored)
    report.dtype = dtype
    return model, report


def _config_from(factory: Callable, shapes: Mapping[str, tuple], ckpt: Checkpoint, part: str, layout: str):
    try:
        return factory(shapes)
    except (KeyError, ValueError, IndexError, ZeroDivisionError) as e:
        raise CheckpointMismatch(f"{ckpt.name} looked like a Z-Image {PART_NAME[part]} ({layout} layout) but its "
                                 f"shapes describe no valid model ({type(e).__name__}: {e}). Use "
                                 f"{EXPECTED_FILE[part]}.") from e


# ---- DiT -------------------------------------------------------------------------------------------------

def dit_plan(ckpt: Checkpoint) -> tuple[str, dict[str, str | tuple[str, ...]], list[str]]:
    """(layout, our key -> source key(s), ignored keys). Several source keys are fused along rows."""
    layout = K.detect_dit_layout(ckpt.keys())
    if layout == "unknown":
        raise _unknown(ckpt, "dit")
    names = {k: k for k in ckpt.keys() if k not in K.DIT_IGNORED and not K.is_quant_extra(k)}
    ignored = sorted(set(ckpt.keys()) - set(names))
    if layout == "diffusers":
        names = K.dit_from_diffusers(names, fuse=tuple)
    return layout, names, ignored


def _dit_reader(ckpt: Checkpoint, plan: Mapping[str, str | tuple[str, ...]],
               q: formats.Quantization) -> Callable[[str], Tensor]:
    """read(our key) -> the weight's value, in a dtype that holds it exactly: as stored, or fp32 where an fp8
    weight has a scale to apply. A weight in a declared format is never read as a value (read.stored_many gives the
    file's tensors as they are, for core's operations)."""
    def read(key: str) -> Tensor:
        src = plan[key]
        _refuse_quantized(ckpt, q, (src,) if isinstance(src, str) else src)
        if isinstance(src, tuple):
            parts = [_dequantized(ckpt, s) for s in src]
            if len({p.dtype for p in parts}) > 1:                # fused q, k, v stored differently: widen
                parts = [p.float() for p in parts]
            return torch.cat(parts)
        return _dequantized(ckpt, src)

    def scaled_fp8(key: str) -> tuple[Tensor, Tensor] | None:
        """(the fp8 tensor as stored, its fp32 scale) where the file holds one fp8 tensor with one per-tensor
        scale (ComfyUI's scaled fp8: `scale_weight`, or `weight_scale` with `comfy_quant`); else None. Storing
        the dequantised value in fp8 again, without the scale, loses it: small weights fall into fp8's subnormals."""
        src = plan[key]
        if isinstance(src, tuple) or ckpt.dtypes[src] not in FP8_DTYPES:
            return None
        scale = _scale_of(ckpt, src)
        if scale is None or scale.numel() != 1:
            return None
        return ckpt.read(src), scale.reshape(())
    read.scaled_fp8 = scaled_fp8
    read.stored_many, read.stored_keys = ckpt.read_many, ckpt.keys()
    return read


def _refuse_quantized(ckpt: Checkpoint, q: formats.Quantization, keys) -> None:
    for key in keys:
        if q.format_of(key) is not None:
            raise UnsupportedFile(f"{ckpt.name}: {key} is stored as {q.format_of(key)}; its values are computed "
                                  f"with by ComfyUI's quantized operations only (the Z-Image loader nodes), not "
                                  f"read as plain weights")


def _scale_of(ckpt: Checkpoint, key: str) -> Tensor | None:
    layer = key.rsplit(".", 1)[0]
    for scale_key in (f"{layer}.scale_weight", f"{layer}.weight_scale"):
        if scale_key in ckpt.shapes:
            return ckpt.read(scale_key).float()
    return None


def _dequantized(ckpt: Checkpoint, key: str) -> Tensor:
    """fp8 weights times their scale (ComfyUI's scale_weight / weight_scale), in fp32; others, and unscaled fp8
    weights, as stored (every fp8 value is exact in bf16 and fp32: the cast to the target dtype is lossless,
    and fp8 storage keeps them without ever widening them)."""
    t = ckpt.read(key)
    if ckpt.dtypes[key] not in FP8_DTYPES:
        return t
    scale = _scale_of(ckpt, key)
    if scale is None:
        return t
    return t.float() * (scale if scale.ndim == 0 else scale.reshape(-1, *[1] * (t.ndim - 1)))


def load_dit(source: Source, dtype: torch.dtype = torch.float32, device="cpu",
             model_cls: type[ZImageDiT] = ZImageDiT, fast: FastPath = FAST,
             fp8_blocks: bool | None = False) -> tuple[ZImageDiT, LoadReport]:
    """model_cls: ZImageDiT or a subclass with the same parameters (the ComfyUI adapter). fast: the fast-path
    options it runs with (fastpath.PLAIN for the reference path).

    fp8_blocks: store the block attention and FFN weights in fp8 (quant.store_blocks_in_fp8), cast to fp8
    tensor by tensor as they are read: loading then holds the fp8 model plus one tensor, never the whole model
    in `dtype` first (12.3 GB in bf16, 24.6 in fp32 for Turbo). True: always; None: where the file stores them
    in fp8 (an fp8 release keeps its size); False: everything in `dtype`. report.fp8_blocks says which it was.
    Plain nn.Linears holding fp8 become quant.CastLinears; a Linear subclass must cast by itself (ComfyUI's,
    once told to: set comfy_cast_weights on quant.block_linears' modules)."""
    model, report, read = prepare_dit(source, model_cls)
    if report.quantization:
        raise UnsupportedFile(f"{report.file} is quantized ({report.quantization.describe()}): the reference engine "
                              f"reads plain and fp8 files; load it with the Z-Image loader nodes in ComfyUI")
    weights = {f"{name}.weight" for _, _, name, _ in quant.block_linears(model)}
    if fp8_blocks is None:
        fp8_blocks = all(report.block_dtypes.get(k) in FP8_DTYPES for k in weights)
    stored = dict.fromkeys(weights, quant.FP8) if fp8_blocks else None
    model, report = _load((model, report, read), dtype, device, stored)
    if fp8_blocks:
        quant.store_blocks_in_fp8(model)          # already fp8: only the CastLinear class is set
    report.fp8_blocks = bool(fp8_blocks)
    return configure(model, fast), report


def prepare_dit(source: Source, model_cls: type[ZImageDiT] = ZImageDiT
                ) -> tuple[ZImageDiT, LoadReport, Callable[[str], Tensor]]:
    """Everything but reading the data: layout, config, a meta model that passed the strict check."""
    ckpt, how = open_part(source, "dit")
    q = _quantization(ckpt)
    layout, plan, ignored = dit_plan(ckpt)
    if q and layout != "comfyui":
        raise UnsupportedFile(f"{ckpt.name}: quantized layers ({q.describe()}) in the {layout} layout; ComfyUI's "
                              f"quantized files use its own key names. Use ComfyUI's file, or the bf16 one")
    shapes = {k: _plan_shape(ckpt, v, q) for k, v in plan.items()}
    model, cfg = _checked_model(model_cls, DiTConfig, shapes, ckpt, "dit", layout)
    _check_declared_layers(q, set(plan), ckpt, "dit")
    report = _report(ckpt, "dit", f"{layout} ({how})", cfg, None, [k for k in ignored if q.format_of(k) is None])
    report.block_dtypes = {k: _plan_dtype(ckpt, v) for k, v in plan.items()}
    report.quantization = q
    return model, report, _dit_reader(ckpt, plan, q)


def _quantization(ckpt: Checkpoint) -> formats.Quantization:
    """The file's declared formats, each known to the pack, and every tensor's dtype understood."""
    q = formats.read_quantization(ckpt)
    formats.check_formats_known(q, ckpt.name)
    formats.check_dtypes(ckpt, q)
    return q


def _check_declared_layers(q: formats.Quantization, weights: set[str], ckpt: Checkpoint, part: str) -> None:
    """A declaration for a layer the model does not have would be dropped by core without a word."""
    stray = sorted(layer for layer in q.layers if f"{layer}.weight" not in weights)
    if stray:
        raise CheckpointMismatch(f"{ckpt.name} declares quantized layers that a Z-Image {PART_NAME[part]} does not "
                                 f"have: {first(stray, 3)}. The file is damaged or another model's")


def _plan_dtype(ckpt: Checkpoint, src: str | tuple[str, ...]) -> str:
    """The file's dtype name for one of our keys ('mixed' where fused parts differ)."""
    names = {ckpt.dtypes[s] for s in ((src,) if isinstance(src, str) else src)}
    return names.pop() if len(names) == 1 else "mixed"


def _plan_shape(ckpt: Checkpoint, src: str | tuple[str, ...],
                q: formats.Quantization = formats.Quantization()) -> tuple[int, ...]:
    if isinstance(src, str):
        return formats.logical_shape(q.format_of(src), ckpt.shapes[src])
    shapes = [ckpt.shapes[s] for s in src]
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def _report(ckpt: Checkpoint, part: str, layout: str, cfg, dtype, ignored=()) -> LoadReport:
    return LoadReport(ckpt.name, part, layout, cfg, dtype, Counter(ckpt.dtypes.values()), list(ignored))


# ---- text encoder ------------------------------------------------------------------------------------------

def load_text_encoder(source: Source, dtype: torch.dtype = torch.float32,
                      device="cpu") -> tuple[Qwen3Encoder, LoadReport]:
    return _load(prepare_text_encoder(source), dtype, device)


def prepare_text_encoder(source: Source) -> tuple[Qwen3Encoder, LoadReport, Callable[[str], Tensor]]:
    ckpt, how = open_part(source, "text")
    q = _quantization(ckpt)
    names = text_encoder_names([k for k in ckpt.keys() if not (formats.is_quant_extra(k) and q.format_of(k))])
    if "model.layers.0.self_attn.q_norm.weight" not in names or "model.embed_tokens.weight" not in names:
        raise _unknown(ckpt, "text")
    shapes = {ours: formats.logical_shape(q.format_of(src), ckpt.shapes[src]) for ours, src in names.items()}
    model, cfg = _checked_model(Qwen3Encoder, Qwen3Config, shapes, ckpt, "text", how)
    _check_declared_layers(q, set(names.values()), ckpt, "text")
    ignored = set(ckpt.keys()) - set(names.values()) - {k for k in ckpt.keys() if q.format_of(k)}
    report = _report(ckpt, "text", how, cfg, None, ignored)
    report.quantization = q

    def read(key: str) -> Tensor:
        _refuse_quantized(ckpt, q, (names[key],))
        return ckpt.read(names[key])
    read.stored_many, read.stored_keys, read.names = ckpt.read_many, ckpt.keys(), names
    return model, report, read


def text_encoder_names(keys: list[str]) -> dict[str, str]:
    """Our key -> file key. ComfyUI's file and Qwen3ForCausalLM exports name tensors `model.…`; a saved
    Qwen3Model (what diffusers' text_encoder/ can hold) names them bare. An lm_head is unused here."""
    bare = "embed_tokens.weight" in keys and "model.embed_tokens.weight" not in keys
    return {("model." + k if bare else k): k for k in keys if k != "lm_head.weight"}


# ---- VAE -----------------------------------------------------------------------------------------------------

def load_vae(source: Source, dtype: torch.dtype = torch.float32, device="cpu") -> tuple[AutoEncoder, LoadReport]:
    return _load(prepare_vae(source), dtype, device)


def prepare_vae(source: Source) -> tuple[AutoEncoder, LoadReport, Callable[[str], Tensor]]:
    ckpt, how = open_part(source, "vae")
    q = _quantization(ckpt)
    if q:
        raise UnsupportedFile(f"{ckpt.name}: a quantized VAE ({q.describe()}); the VAE is read in bf16/fp16/fp32 "
                              f"only: use ae.safetensors")
    keys = ckpt.keys()
    if is_diffusers_layout(keys):
        layout = "diffusers"
        try:
            sd = diffusers_to_ldm({k: ckpt.read(k) for k in keys})     # 0.3 GB at most: read whole
        except (KeyError, ValueError) as e:
            raise CheckpointMismatch(f"{ckpt.name} (diffusers VAE layout): {e}") from e
        read, shapes = sd.__getitem__, {k: tuple(v.shape) for k, v in sd.items()}
    elif "decoder.conv_in.weight" in ckpt.shapes:
        layout, read, shapes = "comfyui/bfl", ckpt.read, dict(ckpt.shapes)
    else:
        raise _unknown(ckpt, "vae")
    model, cfg = _checked_model(AutoEncoder, VAEConfig, shapes, ckpt, "vae", layout)
    return model, _report(ckpt, "vae", f"{layout} ({how})", cfg, None), read
