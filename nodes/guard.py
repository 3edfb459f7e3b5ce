"""Out of memory in a heavy node: give the memory back, then fail with an error that says what to do.

A shop's server runs unattended; one image too large for the card must not leave the models and the failed
run's activations sitting on the GPU so that every later prompt fails too. ComfyUI's own handler only knows
torch.cuda.OutOfMemoryError and only unloads models; here the generic "out of memory" errors of other
backends count too, the failed call's frames are dropped before the cache is emptied, and the message names
the remedies (smaller size or batch, fp8 weights, --lowvram).
"""
from __future__ import annotations

import gc
import logging
from typing import Callable, TypeVar

import comfy.model_management as mm
import torch

log = logging.getLogger("ZImageTurbo")
T = TypeVar("T")

# What other backends and the CPU allocator say when an allocation fails (CUDA raises its own class).
OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate")


class PackOutOfMemory(torch.cuda.OutOfMemoryError):
    """Our error after memory was released. A subclass of CUDA's OOM error so that ComfyUI (and any client
    logic that looks for OOM) still recognises it as one."""


def is_oom(error: BaseException) -> bool:
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(w in str(error).lower() for w in OOM_WORDS)


def release_memory() -> None:
    """Unload every model ComfyUI holds on the device, collect the dropped tensors, empty the allocator cache.
    The next prompt loads what it needs again."""
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache(True)


def run_guarded(what: str, remedy: str, fn: Callable[..., T], *args, **kwargs) -> T:
    """fn(*args, **kwargs); on out-of-memory, release memory and raise PackOutOfMemory naming `what` failed
    and the `remedy`. Any other error passes through untouched."""
    failure = None
    try:
        return fn(*args, **kwargs)
    except PackOutOfMemory:                 # an inner guard already released memory and wrote the message
        raise
    except Exception as e:  # noqa: BLE001  (only OOM is handled; everything else is re-raised as it is)
        if not is_oom(e):
            raise
        failure = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else 'no details'}"
    # Outside the except block Python has dropped the exception, its traceback and the frames that held the
    # failed call's activations; only now can emptying the cache actually give that memory back.
    release_memory()
    log.warning("Z-Image: out of memory while %s; unloaded the models and emptied the cache", what)
    raise PackOutOfMemory(f"out of memory while {what} ({failure}). The pack released the memory and unloaded "
                          f"the models, so the next run starts clean. To make it fit: {remedy}")


def sampler_remedy(width: int, height: int, batch: int) -> str:
    return (f"lower the size ({width}x{height}) or the batch ({batch}), load the model with weight_dtype "
            f"fp8_e4m3fn, or start ComfyUI with --lowvram")


def vae_remedy(width: int, height: int, batch: int) -> str:
    return (f"lower the size ({width}x{height}) or the batch ({batch}), use core 'VAE Decode (Tiled)', "
            f"or start ComfyUI with --lowvram")
