"""Errors whose messages are written for the person at the ComfyUI canvas: what is wrong, where, what to do."""
from __future__ import annotations


class ZImageError(Exception):
    """Base of every error the engine raises on purpose."""


class UnsupportedFile(ZImageError, ValueError):
    """Not a file we will open (pickle formats, a path outside the allowed folders, a missing file)."""


class CorruptFile(ZImageError, ValueError):
    """A .safetensors file whose header or data cannot be read."""


class UnknownCheckpoint(ZImageError, ValueError):
    """A readable file that is not the Z-Image part we were asked to load."""


class CheckpointMismatch(ZImageError, ValueError):
    """A Z-Image file whose keys or shapes do not fit the model they describe."""


def first(items, n: int = 5) -> str:
    items = sorted(items)
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(str(i) for i in items[:n]) + more
