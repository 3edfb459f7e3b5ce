"""LoRA files from every Z-Image trainer, rewritten into one form: ComfyUI's own LoRA keys on the DiT's modules
(`diffusion_model.<module>.lora_down.weight` / `.lora_up.weight` / `.alpha`), which core ComfyUI's LoRA loading
maps on every version.

Trainers name the same thing differently:
- prefixes: `diffusion_model.` (ComfyUI, ai-toolkit), `transformer.` (diffusers/PEFT), none (DiffSynth), or the
  underscored `lora_unet_` (musubi-tuner; `lora_unet__` in some files) and `lycoris_` (LyCORIS);
- suffixes: `lora_down`/`lora_up`, PEFT's `lora_A`/`lora_B` (DiffSynth adds `.default`), an optional `.alpha`;
- modules: ComfyUI's fused `attention.qkv` and `attention.out`, or diffusers' `attention.to_q` / `to_k` / `to_v`
  and `to_out.0` (also `to_out_0` once underscored).
Split q/k/v LoRAs are fused onto `qkv` exactly: the downs stacked, the ups placed block-diagonally on their rows,
each part's alpha / rank folded into its up, so the fused LoRA adds the same three deltas.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch
from torch import Tensor

ROLES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up",
         ".lora_A.default.weight": "down", ".lora_B.default.weight": "up", ".alpha": "alpha"}
DOTTED_PREFIXES = ("diffusion_model.", "transformer.", "model.diffusion_model.")
UNDERSCORED = re.compile(r"^(?:lora_unet_+|lycoris_+)(.+)$")
QKV = ("to_q", "to_k", "to_v")
OUT_PREFIX = "diffusion_model."


@dataclass
class Part:
    down: Tensor | None = None
    up: Tensor | None = None
    alpha: float | None = None

    def scaled_up(self) -> Tensor:
        """up x alpha / rank (the scale trainers mean by alpha; none means 1)."""
        rank = self.down.shape[0]
        return self.up.float() * ((self.alpha if self.alpha is not None else rank) / rank)


@dataclass
class Converted:
    state_dict: dict[str, Tensor] = field(default_factory=dict)     # ComfyUI-form keys
    modules: list[str] = field(default_factory=list)                # the DiT modules it patches
    unmatched: list[str] = field(default_factory=list)              # file keys that name nothing in the DiT
    unsupported: list[str] = field(default_factory=list)            # file keys of kinds this does not read


def aliases(linear_names: Iterable[str]) -> dict[str, tuple[str, int | None]]:
    """Every name a trainer may give a Linear of the DiT -> (ComfyUI's module name, q/k/v index or None)."""
    found = {}
    for name in linear_names:
        found[name] = (name, None)
        if name.endswith(".attention.qkv"):
            base = name[: -len("qkv")]
            for i, part in enumerate(QKV):
                found[base + part] = (name, i)
        elif name.endswith(".attention.out"):
            found[name[: -len("out")] + "to_out.0"] = (name, None)
        elif name == "x_embedder":
            found["all_x_embedder.2-1"] = (name, None)
        elif name.startswith("final_layer."):
            found["all_final_layer.2-1." + name[len("final_layer."):]] = (name, None)
    return found


def split_key(key: str) -> tuple[str, str] | None:
    """(module as written, role) for a LoRA tensor key, or None for a key of another kind."""
    for suffix, role in ROLES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def resolve(module: str, names: Mapping[str, tuple[str, int | None]],
            underscored: Mapping[str, str]) -> tuple[str, int | None] | None:
    for prefix in DOTTED_PREFIXES:
        if module.startswith(prefix) and module[len(prefix):] in names:
            return names[module[len(prefix):]]
    if module in names:
        return names[module]
    m = UNDERSCORED.match(module)
    if m and m.group(1) in underscored:
        return names[underscored[m.group(1)]]
    return None


def normalise(sd: Mapping[str, Tensor], linear_names: Iterable[str],
              rows: Mapping[str, int]) -> Converted:
    """The LoRA in ComfyUI's form for a DiT whose Linears are `linear_names` (`rows`: each one's output rows)."""
    names = aliases(linear_names)
    underscored = {alias.replace(".", "_"): alias for alias in names}
    parts: dict[tuple[str, int | None], Part] = {}
    out = Converted()
    for key, value in sd.items():
        split = split_key(key)
        if split is None:
            out.unsupported.append(key)
            continue
        module, role = split
        target = resolve(module, names, underscored)
        if target is None:
            out.unmatched.append(key)
            continue
        part = parts.setdefault(target, Part())
        if role == "alpha":
            part.alpha = float(value.float().reshape(-1)[0])
        else:
            setattr(part, role, value)
    fused: dict[str, dict[int, Part]] = {}
    for (module, index), part in parts.items():
        if part.down is None or part.up is None:
            raise ValueError(f"the LoRA's '{module}' has a {'down' if part.up is None else 'up'} weight without "
                             f"its {'up' if part.up is None else 'down'} weight: the file is incomplete")
        if index is None:
            if module in fused:
                raise ValueError(f"the LoRA patches '{module}' both whole and as split to_q/to_k/to_v")
            _put(out, module, part.down.float(), part.scaled_up())
        else:
            fused.setdefault(module, {})[index] = part
    for module, qkv in fused.items():
        if module in out.modules:
            raise ValueError(f"the LoRA patches '{module}' both whole and as split to_q/to_k/to_v")
        _put(out, module, *_fuse_qkv(qkv, rows[module]))
    return out


def _put(out: Converted, module: str, down: Tensor, up: Tensor) -> None:
    """ComfyUI's keys, with alpha = rank so that core's scale alpha / rank is 1 (the scale is folded into up)."""
    out.state_dict[f"{OUT_PREFIX}{module}.lora_down.weight"] = down.contiguous()
    out.state_dict[f"{OUT_PREFIX}{module}.lora_up.weight"] = up.contiguous()
    out.state_dict[f"{OUT_PREFIX}{module}.alpha"] = torch.tensor(float(down.shape[0]))
    out.modules.append(module)


def _fuse_qkv(qkv: dict[int, Part], total_rows: int) -> tuple[Tensor, Tensor]:
    """One LoRA on the fused qkv adding each split part's delta on its third of the rows (q, k and v are equal
    thirds in Z-Image: n_kv_heads == n_heads)."""
    if total_rows % 3:
        raise ValueError(f"qkv has {total_rows} rows, not three equal parts")
    third = total_rows // 3
    downs, ups = [], []
    for i, part in sorted(qkv.items()):
        up = part.scaled_up()
        if up.shape[0] != third:
            raise ValueError(f"the LoRA's {QKV[i]} up has {up.shape[0]} rows, the model's {QKV[i]} has {third}")
        block = torch.zeros(total_rows, up.shape[1])
        block[i * third:(i + 1) * third] = up
        downs.append(part.down.float())
        ups.append(block)
    return torch.cat(downs), torch.cat(ups, dim=1)
