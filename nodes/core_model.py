"""The MODEL the loaders return: core ComfyUI's own Z-Image (supported_models.ZImage -> model_base.Lumina2 ->
NextDiT), sized from the file's shapes, holding the weights the pack's strict loader found and checked.

Being core's model, everything ComfyUI does to a Z-Image model works on it as on core's: LoRA key maps, model
patches (Fun ControlNet, ScaleROPE), wrappers, partial loading, dynamic VRAM, compile. What the pack adds comes
through public hooks only: custom operations for fp8 matmul and the fp16 guard (pack_ops), the weights read
from memory-mapped files (a bf16 file in bf16 is never copied into anonymous memory), fp8 storage of the block
weights cast tensor by tensor (a scaled fp8 file's values kept with their per-tensor scales), and
the factory ComfyUI calls for a non-dynamic copy (comfy_compat.set_copy_factory).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import comfy.model_management as mm
import comfy.supported_models
import torch

from ..zimage_core.config import DiTConfig
from ..zimage_core.errors import CheckpointMismatch
from ..zimage_core.loading import FP8_DTYPES, prepare_dit
from ..zimage_core.precision import FP8_NAME, choose_dtypes
from ..zimage_core.quant import BLOCKS, FP8, block_linears
from . import comfy_compat, nonrelease_sizes, pack_ops, quantized

log = logging.getLogger("ZImageTurbo")

# What ComfyUI reserves for one sampling call: memory_usage_factor * 0.01 * latent area * dtype size MiB.
# Core's NextDiT peaks at 1.47 of that unit (counted tensor by tensor at Turbo size, tests/test_memory_estimate.py);
# 0.30.0 ships 2.8 after 0.3.75's 1.7 ran out of memory on 12-16 GB cards (Comfy-Org/workflow_templates#340).
# The pack sets 2.8 on every version, so 0.3.75 users get the margin too.
MEMORY_USAGE_FACTOR = 2.8
UNUSED_CORE_KEYS = comfy_compat.UNUSED_CORE_KEYS
BLOCK_LISTS = tuple(prefix.rstrip(".") for prefix in BLOCKS)      # the DiT's block lists, by attribute
LOADER_HINT = ("connect the MODEL of a Z-Image loader (the pack's, or core's Load Diffusion Model with a Z-Image "
               "file), after any LoRA or patch nodes")


def zimage_dit(model, node: str, input_name: str = "model") -> torch.nn.Module:
    """The diffusion model (core's NextDiT) of a Z-Image MODEL, the pack's or core's, or an error naming the
    node, what came in and what to connect. The one check of every pack node that takes a MODEL: core's
    Lumina 2 builds the same NextDiT class, so its model config is what tells Z-Image apart."""
    base = getattr(model, "model", None)
    config = getattr(base, "model_config", None)
    dit = getattr(base, "diffusion_model", None)
    # exactly core's ZImage: its subclasses (0.38's ZImagePixelSpace, MingImage) sample other latents
    if type(config) is comfy.supported_models.ZImage and all(hasattr(dit, n) for n in BLOCK_LISTS):
        return dit
    if config is not None:
        got = f"a {type(config).__name__} model"
    elif base is not None:
        got = f"a MODEL holding a {type(base).__name__}, not a diffusion model ComfyUI knows"
    else:
        got = f"a {type(model).__name__}"
    raise ValueError(f"{node}: {input_name} is {got}, not a Z-Image model: {LOADER_HINT}")


def unet_config(cfg: DiTConfig) -> dict:
    """Every NextDiT argument, from the pack's shape-inferred config. Core hard-codes a few sizes (adaLN and
    final-layer width min(dim, 256), one refiner count); a file that differs is refused, not misread."""
    problems = []
    if cfg.n_noise_refiner != cfg.n_context_refiner:
        problems.append(f"{cfg.n_noise_refiner} noise refiners but {cfg.n_context_refiner} context refiners")
    if cfg.adaln_dim != min(cfg.dim, 256):
        problems.append(f"timestep width {cfg.adaln_dim}, core's Z-Image needs min(dim, 256) = {min(cfg.dim, 256)}")
    if problems:
        raise CheckpointMismatch(f"this Z-Image variant cannot run as ComfyUI's Z-Image model: {'; '.join(problems)}")
    return dict(image_model="lumina2", patch_size=cfg.patch_size, in_channels=cfg.in_channels, dim=cfg.dim,
                n_layers=cfg.n_layers, n_refiner_layers=cfg.n_noise_refiner, n_heads=cfg.n_heads,
                n_kv_heads=cfg.n_heads,
                # FeedForward makes multiple_of * ceil(int(m * dim) / multiple_of): exactly ffn_hidden this way
                multiple_of=cfg.ffn_hidden, ffn_dim_multiplier=cfg.ffn_hidden / cfg.dim, norm_eps=cfg.norm_eps,
                qk_norm=True, cap_feat_dim=cfg.cap_feat_dim, axes_dims=list(cfg.axes_dims),
                axes_lens=list(cfg.axes_lens), rope_theta=cfg.rope_theta, z_image_modulation=True,
                time_scale=cfg.t_scale, pad_tokens_multiple=cfg.seq_multiple)


@dataclass(frozen=True)
class Precision:
    """How the model holds and computes its weights."""
    compute: torch.dtype            # activations, and every weight but the block Linears'
    blocks: torch.dtype             # the block attention and FFN weights (fp8 or fp16 narrower than compute)
    fp8_matmul: bool = False

    @property
    def pack_ops(self) -> bool:
        """Narrower block weights need the pack's operations (core's manual cast, plus the two products)."""
        return self.blocks != self.compute

    @classmethod
    def choose(cls, weight_dtype: str, fp8_file: bool) -> "Precision":
        if weight_dtype == "auto" and fp8_file:
            # an fp8 file's blocks stay fp8 (as core's loader keeps them): users pick one to fit a smaller card
            weight_dtype = FP8_NAME
        dtypes = choose_dtypes(mm.get_torch_device(), weight_dtype)
        if dtypes.dit == torch.float16:          # the fp16 guard: fp16 weights, fp32 everything else
            return cls(torch.float32, torch.float16)
        return cls(dtypes.dit, FP8 if dtypes.dit_fp8 else dtypes.dit, dtypes.dit_fp8_matmul)


def load_model(source: str | Path, weight_dtype: str = "auto", disable_dynamic: bool = False):
    """core's Z-Image MODEL (a ModelPatcher) for a DiT file, all-in-one file or diffusers folder."""
    meta_dit, report, read = prepare_dit(source)            # layout, config, strict key/shape check
    if report.quantization:
        return load_quantized_model(source, weight_dtype, disable_dynamic, meta_dit, report, read)
    blocks = {f"{name}.weight" for _, _, name, _ in block_linears(meta_dit)}
    precision = Precision.choose(weight_dtype, all(report.block_dtypes.get(k) in FP8_DTYPES for k in blocks))
    model = build_core_model(report.config, precision)
    dit = model.diffusion_model
    wanted = {k: v for k, v in expected_tensors(dit).items() if k not in UNUSED_CORE_KEYS}
    sd, scales = {}, {}
    for key in meta_dit.state_dict():
        dtype = precision.blocks if key in blocks else precision.compute
        scaled = read.scaled_fp8(key) if key in blocks and dtype == FP8 else None
        if scaled is not None and scaled[0].dtype == dtype:   # a scaled fp8 file's values, kept with their scale
            sd[key], scales[key.rsplit(".", 1)[0]] = scaled
            continue
        t = read(key)
        sd[key] = t if t.dtype == dtype else t.to(dtype)     # same dtype: the mapped tensor itself, no copy
    _check_against_core(wanted, sd, report.file)
    dit.load_state_dict(sd, strict=False, assign=True)
    del sd
    for layer, scale in scales.items():
        pack_ops.keep_scale(dit.get_submodule(layer), scale)
    _materialise_unused(dit)
    if precision.fp8_matmul:
        pack_ops.fp8_matmul_linears(dit)
    comfy_compat.archive_model_dtypes(dit)
    # 0.30.0's dynamic VRAM patches a LoRA into the stored weight as if it were the real one, and writes it back:
    # right for core's own quantised tensors, wrong for a weight that a scale multiplies afterwards
    patcher = _patcher(model, disable_dynamic or bool(scales))
    comfy_compat.set_copy_factory(patcher, load_model, (str(source), weight_dtype))
    log.info("Z-Image: loaded %s as ComfyUI's Z-Image model (compute %s, blocks %s)", report, precision.compute,
             precision.blocks)
    return patcher


def load_quantized_model(source, weight_dtype: str, disable_dynamic: bool, meta_dit, report, read):
    """A file whose layers declare their formats (int8 ConvRot, fp8_mixed, NVFP4, MXFP8): core's model with core's
    mixed-precision operations, given the file's tensors as stored, as core's UNETLoader gives them. The pack's
    strict check has matched the file to Z-Image first; weight_dtype picks the compute dtype only (the file's
    own formats decide how the quantized layers are stored)."""
    quantized.check_computable(report.quantization, report.file,
                               "z_image_turbo_bf16.safetensors, or z_image_bf16.safetensors for Base")
    compute = choose_dtypes(mm.get_torch_device(), "auto" if weight_dtype.startswith("fp8") else weight_dtype).dit
    if weight_dtype.startswith("fp8"):
        log.info("Z-Image: %s keeps its own quantization (%s); weight_dtype %s does not apply to it", report.file,
                 report.quantization.describe(), weight_dtype)
    mc = comfy.supported_models.ZImage(unet_config(report.config))
    mc.memory_usage_factor = MEMORY_USAGE_FACTOR
    quantized.configure_model(mc, report.quantization)
    mc.set_inference_dtype(compute, mm.unet_manual_cast(None, mm.get_torch_device(), mc.supported_inference_dtypes))
    model = mc.get_model({}, "")             # core's own operations pick mixed precision from the config
    nonrelease_sizes.size_timestep_embedder(model.diffusion_model, report.config, compute, None, device=None)
    patcher = _patcher(model, disable_dynamic)
    keys = [k for k in meta_dit.state_dict()] + [k for k in read.stored_keys if report.quantization.format_of(k)]
    sd = quantized.stored_tensors(report.quantization, keys, read.stored_many)
    missing, unexpected = model.diffusion_model.load_state_dict(
        sd, strict=False, assign=comfy_compat.is_dynamic(patcher))
    missing = [k for k in missing if k not in UNUSED_CORE_KEYS]
    if missing or unexpected:
        raise CheckpointMismatch(f"{report.file}: ComfyUI's Z-Image model does not take this file's tensors "
                                 f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); this ComfyUI "
                                 f"version builds Z-Image differently: report it with the version")
    del sd
    comfy_compat.set_copy_factory(patcher, load_model, (str(source), weight_dtype))
    log.info("Z-Image: loaded %s as ComfyUI's Z-Image model with its quantized operations (compute %s)", report,
             compute)
    return patcher


def build_core_model(cfg: DiTConfig, precision: Precision):
    """core's Lumina2 BaseModel with its NextDiT, on the meta device: nothing allocated, the file's tensors go in."""
    mc = comfy.supported_models.ZImage(unet_config(cfg))
    mc.memory_usage_factor = MEMORY_USAGE_FACTOR
    if precision.pack_ops:
        mc.set_inference_dtype(precision.compute, None)
        mc.custom_operations = pack_ops.PackOps
    else:
        load_device = mm.get_torch_device()
        mc.set_inference_dtype(precision.compute,
                               mm.unet_manual_cast(precision.compute, load_device, mc.supported_inference_dtypes))
    model = mc.get_model({}, "", device=torch.device("meta"))
    comfy_compat.forget_build_device(model)  # built on meta, which is not a device to use
    nonrelease_sizes.size_timestep_embedder(model.diffusion_model, cfg, precision.compute, mc.custom_operations)
    return model


def _patcher(model, disable_dynamic: bool):
    """0.30.0's CoreModelPatcher (dynamic VRAM where ComfyUI turned it on) unless a non-dynamic copy is asked."""
    cls = comfy_compat.patcher_class(dynamic=not disable_dynamic)
    return cls(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def expected_tensors(module: torch.nn.Module) -> dict[str, tuple]:
    """Every tensor key core's model takes, with its shape. Under 0.30.0's dynamic VRAM core's Linears are made
    without weights (filled from the state dict, unchecked): their keys and shapes come from their sizes."""
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear) and m.weight is None:
            shapes[f"{name}.weight"] = (m.out_features, m.in_features)
            if comfy_compat.lazy_bias(m):
                shapes[f"{name}.bias"] = (m.out_features,)
    return shapes


def _check_against_core(wanted: dict, sd: dict, name: str) -> None:
    """The pack's check already matched the file to its own DiT; this one matches it to core's, so a core
    version that builds differently fails here with names instead of computing with missing weights."""
    missing = sorted(set(wanted) - set(sd))
    unexpected = sorted(set(sd) - set(wanted))
    wrong = [k for k in set(wanted) & set(sd) if tuple(sd[k].shape) != wanted[k]]
    if missing or unexpected or wrong:
        raise CheckpointMismatch(f"{name}: ComfyUI's Z-Image model does not take this file's tensors "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {wrong[:3]}); "
                                 f"this ComfyUI version builds Z-Image differently: report it with the version")


def _materialise_unused(dit: torch.nn.Module) -> None:
    """Parameters no file holds (0.3.75's unused norm_final) stay on the meta device otherwise, where moving
    the model fails; they are never read."""
    for module in dit.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                setattr(module, name, torch.nn.Parameter(torch.ones(p.shape, dtype=p.dtype), requires_grad=False))
    leftover = [n for n, b in dit.named_buffers() if b.is_meta]
    if leftover:
        raise RuntimeError(f"ComfyUI's Z-Image model kept buffers no file fills: {leftover[:3]}")

