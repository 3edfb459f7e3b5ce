"""The compile node: the pack's MODEL with its transformer blocks run through torch.compile."""
from __future__ import annotations

from . import bridge
from .loaders import CATEGORY

OPTION = "zimage_compile"           # the transformer_options key the DiT and the pack's sampler read


def wants_compiled(model) -> bool:
    """Whether a MODEL (a ModelPatcher) went through the compile node."""
    return bool(model.model_options.get("transformer_options", {}).get(OPTION, False))


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
            "model": ("MODEL", {"tooltip": "From a Z-Image Turbo loader node; to the Z-Image Turbo Sampler or core "
                                           "KSampler, after any LoRA."}),
        }}

    def patch(self, model):
        bridge.engine_dit(model)                         # a clear error for a MODEL of another loader
        patched = model.clone()                          # the loaded model stays as it was for other branches
        options = dict(patched.model_options.get("transformer_options", {}))
        options[OPTION] = True
        patched.model_options["transformer_options"] = options
        return (patched,)
