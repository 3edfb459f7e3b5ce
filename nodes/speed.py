"""The compile node: a Z-Image MODEL whose transformer blocks run through torch.compile.

Done the way core's own compile helper does it (comfy_api.torch_helpers): an APPLY_MODEL wrapper swaps the
compiled modules into the model for the duration of each call, so the state dict, LoRA patching and offloading
only ever see the plain modules. Two things core's helper lacks are added: per block (a whole-model graph would
recompile with every caption length), and a compile that fails is logged once with the backend's own error and
the model runs eager, instead of the prompt failing.
"""
from __future__ import annotations

import logging

import comfy.patcher_extension
import comfy.utils
import torch

from . import comfy_compat
from .core_model import BLOCK_LISTS, zimage_dit
from .loaders import CATEGORY

log = logging.getLogger("ZImageTurbo")
WRAPPER_KEY = "zimage.compile"
# What a compiled call raises when compiling, not the model, failed: the backend (no C++ compiler, no Triton),
# dynamo itself, or its recompile limit under fullgraph (FailOnRecompileLimitHit is no TorchDynamoException).
COMPILE_ERRORS = (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit)


def _skip_transformer_options(guard_entries):
    """Guards on transformer_options (patches, wrappers, the block index) would recompile per prompt."""
    return [("transformer_options" not in entry.name) for entry in guard_entries]


class CompiledBlocks:
    """The APPLY_MODEL wrapper. Holds the compiled blocks (made on first use, per loaded module) and whether
    compiling failed; shared by the clones of one compile node's MODEL."""

    def __init__(self, backend: str = "inductor"):
        self.backend = backend
        self.compiled: dict[str, tuple[torch.nn.Module, torch.nn.Module]] = {}   # key -> (plain, compiled)
        self.failed = False
        self.ran = False

    def keys(self, base_model) -> list[str]:
        dit = base_model.diffusion_model
        return [f"diffusion_model.{name}.{i}" for name in BLOCK_LISTS for i in range(len(getattr(dit, name, [])))]

    def compiled_for(self, key: str, plain: torch.nn.Module) -> torch.nn.Module:
        held = self.compiled.get(key)
        if held is None or held[0] is not plain:                  # a reloaded model has new modules
            options = {"guard_filter_fn": _skip_transformer_options}
            held = self.compiled[key] = (plain, torch.compile(plain, backend=self.backend, options=options))
        return held[1]

    def __call__(self, executor, *args, **kwargs):
        if self.failed:
            return executor(*args, **kwargs)
        base = comfy_compat.executor_model(executor)
        plain = {key: comfy.utils.get_attr(base, key) for key in self.keys(base)}
        try:
            for key, module in plain.items():
                comfy.utils.set_attr(base, key, self.compiled_for(key, module))
            out = executor(*args, **kwargs)
            self.ran = True
            return out
        except COMPILE_ERRORS as e:
            _restore(base, plain)
            self.failed = True
            reason = getattr(e, "inner_exception", None) or e          # the backend's own error
            log.warning("Z-Image: torch.compile failed (%s: %s); running without it from now on",
                        type(reason).__name__, reason)
            return executor(*args, **kwargs)
        finally:
            _restore(base, plain)


def _restore(base, plain: dict) -> None:
    for key, module in plain.items():
        comfy.utils.set_attr(base, key, module)


def compiled_blocks(model) -> CompiledBlocks | None:
    found = comfy_compat.wrappers_with_key(model, comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    return found[0] if found else None


def ran_compiled(model) -> bool:
    """Whether a MODEL went through the compile node and its blocks really ran compiled."""
    blocks = compiled_blocks(model)
    return blocks is not None and blocks.ran and not blocks.failed


class ZImageTurboCompile:
    DESCRIPTION = ("Runs the Z-Image diffusion model's transformer blocks through torch.compile: fused kernels, "
                   "faster steps. The first run at a new image size compiles first (about a minute on a GPU); "
                   "later runs at that size are faster. Needs Triton on NVIDIA GPUs, a C++ compiler on CPU; "
                   "if compiling fails the model runs as before and the console says why.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A Z-Image model; to the Z-Image Sampler or core KSampler, after "
                                           "any LoRA."}),
        }}

    def patch(self, model):
        zimage_dit(model, "Z-Image Compile")
        # the loaded MODEL stays as it was for other branches; dynamic VRAM cannot trace compiled graphs, so a
        # non-dynamic copy, as core's compile node makes
        patched = comfy_compat.non_dynamic_clone(model)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, CompiledBlocks())
        return (patched,)
