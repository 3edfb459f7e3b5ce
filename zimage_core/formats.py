"""What a file's tensors are stored as, read before anything is computed with them.

ComfyUI's quantized files declare each quantized layer's format: per layer, a `<layer>.comfy_quant` tensor (UTF-8
JSON bytes, e.g. {"format": "int8_tensorwise", "convrot": true}), or for the whole file a header entry
`_quantization_metadata` ({"layers": {layer: {"format": ...}}}). The weight is then stored in the format's own
dtype and shape, with its scales beside it (`weight_scale`, `weight_scale_2`, `input_scale`, `pre_quant_scale`).

This module reads those declarations and checks every tensor's dtype against them. A tensor whose dtype the pack
does not understand is refused with its name, never cast: an int8 weight cast to bf16 without its scale and
rotation computes a wrong picture without a word. Whether the running ComfyUI can compute a declared format is
the nodes' question (nodes/quantized.py): this module never imports ComfyUI.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from .checkpoint import Checkpoint
from .errors import CheckpointMismatch, UnsupportedFile

HEADER_KEY = "_quantization_metadata"
LAYER_KEY = ".comfy_quant"
# Tensors a quantized layer carries besides its weight (core's QUANT_ALGOS parameters).
SCALE_SUFFIXES = (".weight_scale", ".weight_scale_2", ".input_scale", ".pre_quant_scale")

# Plain floating-point weights: cast to the compute dtype, exactly or by ordinary rounding.
FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}
# Unscaled fp8 (and scaled fp8 in ComfyUI's older `scale_weight` form): every value is exact in bf16 and fp32.
FP8_DTYPES = {"F8_E4M3", "F8_E5M2"}

# The formats whose layout the pack knows, as core's quant_ops stores them: the weight's dtypes on disk (fp8
# files written by older tools hold the fp8 bytes as U8) and how the stored weight's columns relate to the
# layer's input width (4-bit formats pack two values in a byte).
FORMATS = {
    "float8_e4m3fn": ({"F8_E4M3", "U8"}, 1),
    "float8_e5m2": ({"F8_E5M2", "U8"}, 1),
    "mxfp8": ({"F8_E4M3"}, 1),
    "nvfp4": ({"U8"}, 2),
    "int8_tensorwise": ({"I8"}, 1),
    "convrot_w4a4": ({"I8"}, 2),
}
READABLE_NAMES = {"int8_tensorwise": "int8", "float8_e4m3fn": "fp8 e4m3, as in fp8_mixed",
                  "float8_e5m2": "fp8 e5m2", "nvfp4": "NVFP4", "mxfp8": "MXFP8", "convrot_w4a4": "ConvRot W4A4"}


@dataclass
class Quantization:
    """A file's declared per-layer formats (empty: a plain file)."""
    layers: dict[str, dict] = field(default_factory=dict)     # layer name (the file's, prefix removed) -> config
    declared_by: str = ""                                       # "per-layer .comfy_quant" or the header entry

    def __bool__(self) -> bool:
        return bool(self.layers)

    def formats(self) -> set[str]:
        return {conf.get("format") for conf in self.layers.values()}

    def format_of(self, key: str) -> str | None:
        """The format of the layer a tensor key belongs to, or None."""
        conf = self.layers.get(key.rsplit(".", 1)[0])
        return None if conf is None else conf.get("format")

    def label(self, fmt: str) -> str:
        """A format's name with what a person would call it: 'int8_tensorwise (int8 ConvRot)'."""
        convrot = any(c.get("convrot") or (c.get("params") or {}).get("convrot")
                      for c in self.layers.values() if c.get("format") == fmt)
        return f"{fmt} ({READABLE_NAMES.get(fmt, fmt)}{' ConvRot' if convrot else ''})"

    def describe(self) -> str:
        counts = {}
        for conf in self.layers.values():
            counts[conf.get("format")] = counts.get(conf.get("format"), 0) + 1
        return ", ".join(f"{n} layers {f}" for f, n in sorted(counts.items()))


def is_quant_extra(key: str) -> bool:
    """A layer's format declaration or one of its scales: not a weight of the model."""
    return key.endswith(LAYER_KEY) or key.endswith(SCALE_SUFFIXES)


def read_quantization(ckpt: Checkpoint) -> Quantization:
    """The formats a file declares, per layer or in its header; a declaration that cannot be read is an error
    naming the layer (computing with a weight whose format is unknown would be a guess)."""
    declared = ckpt.read_many([key for key in ckpt.keys() if key.endswith(LAYER_KEY)], copy=True)
    layers = {key[:-len(LAYER_KEY)]: _parse(t.numpy().tobytes(), f"{ckpt.name}: {key}") for key, t in declared.items()}
    if layers:
        return Quantization(layers, "per-layer .comfy_quant")
    header = ckpt.metadata.get(HEADER_KEY)
    if header is None:
        return Quantization()
    conf = _parse(header.encode(), f"{ckpt.name}: header {HEADER_KEY}")
    if not isinstance(conf.get("layers"), dict):
        raise CheckpointMismatch(f"{ckpt.name}: the header's {HEADER_KEY} has no 'layers' table: the file is "
                                 f"damaged, or written by a tool this pack does not know; use the bf16 file")
    prefix = ckpt.prefix                       # an all-in-one file's header names layers with the part's prefix
    for name, layer_conf in conf["layers"].items():
        layers[name[len(prefix):] if prefix and name.startswith(prefix) else name] = dict(layer_conf)
    return Quantization(layers, f"header {HEADER_KEY}")


def _parse(raw: bytes, where: str) -> dict:
    try:
        conf = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointMismatch(f"{where}: the quantization declaration is not JSON ({e}); the file is damaged: "
                                 f"download it again, or use the bf16 file") from e
    if not isinstance(conf, dict):
        raise CheckpointMismatch(f"{where}: the quantization declaration is not a JSON object; the file is damaged")
    return conf


def check_formats_known(q: Quantization, file: str) -> None:
    """Every declared format is one whose layout the pack knows (whether ComfyUI computes it is asked later)."""
    unknown = sorted(str(f) for f in q.formats() if f not in FORMATS)
    if unknown:
        layers = [name for name, conf in q.layers.items() if conf.get("format") in unknown]
        raise UnsupportedFile(f"{file} is quantized in a format this pack does not know: {', '.join(unknown)} "
                              f"(layers {', '.join(sorted(layers)[:3])}). Update the pack and ComfyUI, or use the "
                              f"bf16 file (z_image_turbo_bf16.safetensors)")


def check_dtypes(ckpt: Checkpoint, q: Quantization) -> None:
    """Every tensor is stored in a dtype the loader understands for it: plain floats (cast), fp8 (exact in wider
    floats; its scale applied where the file gives one), a declared format's own storage dtype for that layer's
    weight, and the declared layers' scales. Anything else is refused with the tensor's name and dtype."""
    for key, dtype in ckpt.dtypes.items():
        fmt = q.format_of(key)
        if key.endswith(LAYER_KEY) or (fmt is not None and key.endswith(SCALE_SUFFIXES)):
            continue                                     # read by core's loader with the format's own rules
        if fmt is not None and key.endswith(".weight"):
            if dtype not in FORMATS[fmt][0]:
                raise CheckpointMismatch(
                    f"{ckpt.name}: {key} is declared {fmt} but stored as {dtype} (that format stores "
                    f"{'/'.join(sorted(FORMATS[fmt][0]))}); the file is damaged: download it again")
            continue
        if dtype in FLOAT_DTYPES or dtype in FP8_DTYPES:
            continue
        hint = " without a quantization declaration (.comfy_quant)" if dtype in ("I8", "U8") else ""
        raise UnsupportedFile(
            f"{ckpt.name}: tensor {key} is stored as {dtype}, which this loader does not compute with{hint}; it is "
            f"not cast, since that would give a wrong picture. Use the bf16 file, or a quantized file as ComfyUI "
            f"writes it (each quantized layer declares its format)")


def logical_shape(fmt: str | None, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The layer's (out, in) from a stored weight's shape: 4-bit formats hold two input columns per byte."""
    if fmt is None or len(shape) != 2:
        return shape
    return (shape[0], shape[1] * FORMATS[fmt][1])

