"""Opening weight files: safetensors only, header first, tensors one at a time.

A `Checkpoint` is one .safetensors file, or a folder of them (diffusers shards through their index json),
seen as one name -> tensor mapping. Shapes and dtypes come from the headers, so a 12 GB file can be
inspected without reading its data.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import CorruptFile, UnsupportedFile

# Formats that can run code when opened. Refused by name, never opened.
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}


@dataclass
class Checkpoint:
    path: Path
    files: dict[str, Path] = field(default_factory=dict)            # tensor name -> file holding it
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)             # safetensors dtype names: BF16, F8_E4M3...
    prefix: str = ""                                                 # names are seen with this prefix removed
    file_keys: tuple[str, ...] = ()                                  # every name in the file(s), for messages
    metadata: dict[str, str] = field(default_factory=dict)          # the header's __metadata__ (all shards')

    @property
    def name(self) -> str:
        return self.path.name

    def keys(self) -> list[str]:
        return list(self.shapes)

    def view(self, prefix: str) -> "Checkpoint":
        """The tensors under `prefix`, with it removed (a part of an all-in-one file)."""
        n = len(prefix)
        pick = [k for k in self.shapes if k.startswith(prefix)]
        return Checkpoint(self.path, {k[n:]: self.files[k] for k in pick}, {k[n:]: self.shapes[k] for k in pick},
                          {k[n:]: self.dtypes[k] for k in pick}, self.prefix + prefix, self.all_keys(),
                          self.metadata)

    def all_keys(self) -> tuple[str, ...]:
        return self.file_keys or tuple(self.shapes)

    def read_many(self, keys: list[str], copy: bool = False) -> dict[str, torch.Tensor]:
        """Many tensors with one open per file: a header is parsed once, not per tensor (~1 ms each for a
        1000-tensor header). Without `copy` they are views of the file's mapping, kept as long as they are (for
        tensors held as stored); with it, no mapping outlives the call (for small tensors parsed here)."""
        out = {}
        for path in {self.files[k] for k in keys}:
            try:
                with safe_open(path, framework="pt", device="cpu") as f:
                    for k in keys:
                        if self.files[k] == path:
                            t = f.get_tensor(self.prefix + k)
                            out[k] = t.clone() if copy else t
            except Exception as e:  # safetensors raises its own types for truncated data
                raise CorruptFile(f"{path.name} cannot be read ({e}). The file is probably truncated or damaged: "
                                  f"download it again.") from e
        return out

    def read(self, key: str) -> torch.Tensor:
        path = self.files[key]
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                return f.get_tensor(self.prefix + key)
        except Exception as e:  # safetensors raises its own types for truncated data
            raise CorruptFile(f"{path.name}: tensor '{self.prefix + key}' cannot be read ({e}). The file is "
                              f"probably truncated or damaged: download it again.") from e


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsupportedFile(f"{path.name} is a pickle checkpoint ({path.suffix}). Only .safetensors files are "
                              f"loaded, because pickle files can run code when opened. Use the .safetensors "
                              f"release of this model.")
    if not path.exists():
        raise UnsupportedFile(f"{path}: no such file or folder. Put the model file in ComfyUI's models folder "
                              f"and pick it from the list.")
    ckpt = Checkpoint(path)
    for file in _weight_files(path):
        _read_header(file, ckpt)
    if not ckpt.shapes:
        raise UnsupportedFile(f"{path.name} holds no tensors. Pick a Z-Image .safetensors file or folder.")
    return ckpt


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise UnsupportedFile(f"{path.name}: only .safetensors files are loaded, got '{path.suffix}'.")
        return [path]
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        return _files_from_index(indexes[0])
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UnsupportedFile(f"{path}: the folder holds no .safetensors files.")
    return files


def _files_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError) as e:
        raise CorruptFile(f"{index.name}: not a valid safetensors index ({e}).") from e
    files = []
    for name in sorted(set(weight_map.values())):
        # The index names shards in its own folder; anything else (a path, '..') is refused.
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise UnsupportedFile(f"{index.name} points at '{name}', outside its folder; refusing to open it.")
        if not (index.parent / name).is_file():
            raise CorruptFile(f"{index.name} lists shard '{name}', which is missing from {index.parent}.")
        files.append(index.parent / name)
    return files


def _read_header(file: Path, ckpt: Checkpoint) -> None:
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            ckpt.metadata.update(f.metadata() or {})
            for key in f.keys():
                s = f.get_slice(key)
                ckpt.files[key] = file
                ckpt.shapes[key] = tuple(s.get_shape())
                ckpt.dtypes[key] = s.get_dtype()
    except Exception as e:
        raise CorruptFile(f"{file.name} is not a readable .safetensors file ({e}). It may be truncated or "
                          f"damaged: download it again.") from e
