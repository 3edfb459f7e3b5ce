"""Quantized Z-Image files written by the running ComfyUI's own quantizer (comfy.quant_ops' layouts, whose
quantize is comfy_kitchen's), in the layouts Comfy-Org publishes: per-layer `.comfy_quant` (0.30.0's form, as
core's own state_dict writes a quantized Linear), or the header `_quantization_metadata` (the form 0.3.75 reads)."""
from __future__ import annotations

import json

import dataclasses
from pathlib import Path

import torch

from zimage_core.config import SMALL

# SMALL with every block Linear's input a multiple of ConvRot's 256-wide rotation groups (as the released widths
# are: 3840, 10240), and sizes core's NextDiT builds as it is
QUANTIZABLE = dataclasses.replace(SMALL, ffn_hidden=768)

# how each format is asked of its layout, as Comfy-Org's repacks are made
LAYOUT_ARGS = {
    "int8_tensorwise": ("TensorWiseINT8Layout", {"per_channel": True, "convrot": True, "convrot_groupsize": 256}),
    "float8_e4m3fn": ("TensorCoreFP8E4M3Layout", {"scale": "recalculate"}),
    "nvfp4": ("TensorCoreNVFP4Layout", {}),
    "mxfp8": ("TensorCoreMXFP8Layout", {}),
    "convrot_w4a4": ("TensorCoreConvRotW4A4Layout", {}),
}


def quantize_layers(sd: dict[str, torch.Tensor], layers: list[str], fmt: str, header: bool = False):
    """(state dict, safetensors metadata): `layers`' weights quantized to `fmt` by core's layouts. Per layer the
    tensors core's _quantized_weight_state_dict writes; with `header`, the declarations in the header instead
    (0.3.75's form, fp8 only there)."""
    import comfy.quant_ops as qo
    out = dict(sd)
    declared = {}
    for layer in layers:
        w = out.pop(f"{layer}.weight").float()
        if hasattr(qo, "get_layout_class"):                                 # 0.30.0: comfy_kitchen's layouts
            layout, kwargs = LAYOUT_ARGS[fmt]
            qt = qo.QuantizedTensor.from_float(w, layout, **kwargs)
            out.update({k: v.contiguous() for k, v in qt.state_dict(f"{layer}.weight").items()})
            conf = {"format": fmt}
            if fmt == "int8_tensorwise":
                conf.update(convrot=True, convrot_groupsize=256)
            elif fmt == "convrot_w4a4":
                conf.update(convrot_groupsize=256)
        else:                                                               # 0.3.75: its one fp8 layout
            assert fmt == "float8_e4m3fn" and header, "0.3.75 writes header-form fp8 only"
            scale = w.abs().max() / torch.finfo(torch.float8_e4m3fn).max
            qdata, params = qo.TensorCoreFP8Layout.quantize(w, scale=scale, dtype=torch.float8_e4m3fn)
            out[f"{layer}.weight"], out[f"{layer}.weight_scale"] = qdata.contiguous(), params["scale"].float()
            conf = {"format": fmt}
        declared[layer] = conf
        if not header:
            out[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)
    metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": declared})} if header else None
    return out, metadata


def block_layers(sd: dict[str, torch.Tensor]) -> list[str]:
    """The DiT's block Linears, adaLN included, as Comfy-Org's int8 repack quantizes them."""
    return sorted(k[:-len(".weight")] for k, v in sd.items() if v.ndim == 2 and k.endswith(".weight")
                  and k.split(".")[0] in ("layers", "noise_refiner", "context_refiner"))


def text_layers(sd: dict[str, torch.Tensor]) -> list[str]:
    """The Qwen3 attention and MLP projections (what fp8_mixed stores in fp8)."""
    return sorted(k[:-len(".weight")] for k, v in sd.items() if v.ndim == 2 and k.endswith("_proj.weight"))


# The released-width files of the server tests: the wide DiT (scripts/model_node_table.py) in each format.
WIDE_FORMATS = {"int8_tensorwise": ("zt_wide_int8_convrot.safetensors", False),
                "float8_e4m3fn": ("zt_wide_fp8_header.safetensors", True),      # the form 0.3.75 reads too
                "nvfp4": ("zt_wide_nvfp4.safetensors", False),
                "mxfp8": ("zt_wide_mxfp8.safetensors", False)}


def wide_quantized(source: Path, folder: Path) -> Path:
    """The wide bf16 DiT `source` quantized once into `folder` in every WIDE_FORMATS format (4 GB; a lock keeps
    two processes from writing at once, a write cut short leaves no "complete" mark)."""
    import fcntl

    from safetensors import safe_open
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = folder / "complete"
        if done.exists():
            return folder
        with safe_open(str(source), framework="pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}                  # memory-mapped, read as quantized
        for fmt, (name, header) in WIDE_FORMATS.items():
            qsd, metadata = quantize_layers(sd, block_layers(sd), fmt, header=header)
            partial = folder / f"{name}.partial"
            save_file(qsd, str(partial), metadata=metadata)
            partial.replace(folder / name)
            del qsd
        done.write_text("written by zimage_dev/quantized_files.py wide_quantized\n")
    return folder
