"""The engine handed to ComfyUI as its own types: MODEL (a ModelPatcher over a Lumina2 BaseModel whose
diffusion_model is our DiT), CLIP (comfy.sd.CLIP over our Qwen3 encoder and tokenizer) and VAE (comfy.sd.VAE
over our Flux AE). Core nodes (CLIPTextEncode, KSampler, ModelSamplingAuraFlow, LoraLoader, VAEDecode) and
ComfyUI's memory management then work with them. The only module besides the nodes that imports ComfyUI.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch import Tensor

import comfy.model_base
import comfy.ops
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.supported_models_base

from ..zimage_core import quant
from ..zimage_core.dit import ZImageDiT
from ..zimage_core.text_encoder import Qwen3Encoder
from ..zimage_core.tokenizer import PromptTokenizer
from ..zimage_core.vae import AutoEncoder

log = logging.getLogger("ZImageTurbo")
TOKEN_KEY = "zimage_qwen3"
# Prompts are kept whole, as ComfyUI keeps them (diffusers cuts at 512 tokens). The cap only keeps one pasted
# book from taking the server's memory: the text encoder's attention grows with the square of the length.
MAX_PROMPT_TOKENS = 4096


# ---- MODEL ---------------------------------------------------------------------------------------------

class ComfyZImageDiT(ZImageDiT):
    """Our DiT with the call ComfyUI's BaseModel makes: (x, sigma, context, num_tokens, attention_mask, ...)
    returning -u, like core's NextDiT. Same parameters, same state-dict keys, so LoRA keys line up.

    Its Linears are ComfyUI's own (a subclass of nn.Linear with the same parameters), so ComfyUI's low-VRAM
    mode can leave weights on the CPU and stream them per call, and fp8 weights are cast by ComfyUI."""

    def __init__(self, cfg):
        super().__init__(cfg)
        use_comfy_linears(self)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.weight.dtype

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, num_tokens=None, attention_mask=None,
                transformer_options=None, **kwargs) -> Tensor:
        # the compile node's choice travels in the MODEL's transformer_options (nodes/speed.py)
        with self.compiled_blocks(bool((transformer_options or {}).get("zimage_compile", False))):
            return -super().forward(x, 1.0 - timesteps, captions_from_context(context, num_tokens, attention_mask))

    def raw(self, x: Tensor, t: Tensor, captions: list[Tensor]) -> Tensor:
        """The engine's own call (t = 1 - sigma, returns u), for the pack's sampler."""
        return super().forward(x, t, captions)


def use_comfy_linears(root: torch.nn.Module) -> None:
    """Replace every plain nn.Linear by comfy.ops' Linear of the same shape, on the same device (meta while
    loading, so nothing is allocated)."""
    for module in list(root.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, name, comfy.ops.disable_weight_init.Linear(
                    child.in_features, child.out_features, bias=child.bias is not None,
                    device=child.weight.device, dtype=child.weight.dtype))


class FP8MatmulLinear(comfy.ops.disable_weight_init.Linear):
    """A block Linear with an fp8 weight that is multiplied in fp8 (quant.fp8_matmul: activations scaled per
    token, the weight as stored) where that is safe and fast: the weight resident on a GPU with fp8 units, no
    LoRA applied at cast time, no bias. Anywhere else (CPU, older GPUs, ComfyUI's low-VRAM streaming, LoRA
    patches) ComfyUI's own cast path runs, as for plain fp8 weights. The weight's key and dtype are those of
    fp8_e4m3fn storage, so ComfyUI saves, patches and offloads it as any fp8 Linear."""

    _failed = False                              # once a GPU refuses the fp8 product, stop asking (logged once)

    def forward_comfy_cast_weights(self, input):
        mode = self.fp8_matmul_mode(input)
        if mode is not None:
            try:
                return quant.fp8_matmul(input, self.weight, self.unit_scale(input.device, mode),
                                        rowwise=mode == "rowwise")
            except RuntimeError as e:
                FP8MatmulLinear._failed = True
                log.warning("Z-Image Turbo: fp8 matmul failed on %s (%s); using fp8 weights with %s matmuls",
                            input.device, e, input.dtype)
        return super().forward_comfy_cast_weights(input)

    def fp8_matmul_mode(self, input: Tensor) -> str | None:
        """quant.scaled_mm_support's mode for this call, or None where the cast path must run."""
        w = self.weight
        if (FP8MatmulLinear._failed or w.dtype != quant.FP8 or w.device != input.device or self.bias is not None
                or self.weight_function or self.bias_function or input.dtype not in (torch.bfloat16, torch.float16)
                or w.shape[0] % 16 or w.shape[1] % 16):          # the fp8 GEMM's tile constraint
            return None
        return quant.scaled_mm_support(input.device)

    def unit_scale(self, device: torch.device, mode: str) -> Tensor:
        """The weight's scale: 1 (per channel, or one), as fp8_e4m3fn files store the weights unscaled."""
        shape = (1, self.out_features) if mode == "rowwise" else ()
        scale = getattr(self, "_unit_scale", None)
        if scale is None or scale.device != device or scale.shape != shape:
            scale = self._unit_scale = torch.ones(shape, device=device, dtype=torch.float32)
        return scale


def use_fp8_matmul_linears(linears) -> None:
    """Let ComfyUI Linears already holding fp8 block weights multiply in fp8 where they can."""
    for linear in linears:
        linear.__class__ = FP8MatmulLinear


def captions_from_context(context: Tensor, num_tokens=None, attention_mask=None) -> list[Tensor]:
    """ComfyUI batches conditionings as (B, L, D); keep each sample's valid tokens."""
    if attention_mask is not None:
        return [c[m.bool()] for c, m in zip(context, attention_mask)]
    n = context.shape[1] if num_tokens is None else int(num_tokens)
    return [c[:n] for c in context]


# What ComfyUI reserves for one sampling call on a GPU: memory_usage_factor * 0.01 * latent area * dtype size
# MiB. ComfyUI 0.3.75 shipped Z-Image with 1.7 and users of 12-16 GB cards hit out-of-memory on the second run
# (Comfy-Org/workflow_templates#340); 0.30.0 raised it to 2.8. Counted tensor by tensor at Turbo size (tests/
# test_memory_estimate.py), core's NextDiT peaks at 1.47 of that unit and the pack's DiT at 1.25; 0.30.0's
# 2.8 is 1.9x core's count (room for kernel workspaces and the allocator), and 2.4 is the same 1.9x over the
# pack's. The same value on every ComfyUI version, so 0.3.75 users get the margin too.
MEMORY_USAGE_FACTOR = 2.4


def make_model(dit: ComfyZImageDiT) -> comfy.model_patcher.ModelPatcher:
    unet_config = {"image_model": "lumina2", "dim": dit.cfg.dim, "disable_unet_model_creation": True}
    model_config = comfy.supported_models.ZImage(unet_config)
    model_config.set_inference_dtype(dit.dtype, None)
    model_config.memory_usage_factor = MEMORY_USAGE_FACTOR
    model = comfy.model_base.Lumina2(model_config, device=mm.unet_offload_device())
    model.diffusion_model = dit
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def engine_dit(model: comfy.model_patcher.ModelPatcher) -> ComfyZImageDiT:
    dit = getattr(model.model, "diffusion_model", None)
    if not isinstance(dit, ComfyZImageDiT):
        raise ValueError("this MODEL was not loaded by a Z-Image Turbo loader node: connect 'Z-Image Turbo "
                         "Loader' (or the checkpoint loader of this pack) to the sampler, or use core KSampler")
    return dit


# ---- CLIP ----------------------------------------------------------------------------------------------

class _TokenizerAdapter:
    """What comfy.sd.CLIP expects of a tokenizer: tokenize_with_weights -> {key: [[(id, weight), ...]]}."""

    def __init__(self, tokenizer: PromptTokenizer, embedding_directory=None, tokenizer_data=None, **kwargs):
        self.tokenizer = tokenizer

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs):
        ids = self.tokenizer.encode(text)
        if len(ids) > MAX_PROMPT_TOKENS:
            raise ValueError(f"text: the prompt is {len(ids)} tokens long, over this pack's limit of "
                             f"{MAX_PROMPT_TOKENS}; shorten it (Z-Image-Turbo was trained on prompts of up to 512 "
                             f"tokens, about 350 English words)")
        return {TOKEN_KEY: [[(i, 1.0, 0) if return_word_ids else (i, 1.0) for i in ids]]}

    def untokenize(self, token_weight_pair):
        return token_weight_pair

    def state_dict(self):
        return {}


class _TextEncoderAdapter(torch.nn.Module):
    """What comfy.sd.CLIP expects of a text model: encode_token_weights -> (cond, pooled, extra)."""

    def __init__(self, encoder: Qwen3Encoder, device=None, dtype=None, model_options=None):
        super().__init__()
        self.encoder = encoder
        self.dtypes = {next(encoder.parameters()).dtype}
        self.disable_offload = False
        if device is not None:
            self.encoder.to(device)

    def reset_clip_options(self):
        pass

    def set_clip_options(self, options):
        pass

    def encode_token_weights(self, token_weight_pairs):
        ids = [t[0] for t in token_weight_pairs[TOKEN_KEY][0]]
        device = next(self.encoder.parameters()).device
        with torch.no_grad():
            hidden = self.encoder(torch.tensor([ids], device=device))
        return hidden.float().to(mm.intermediate_device()), None, {}

    def load_sd(self, sd):
        return self.encoder.load_state_dict(sd, strict=False)


def make_clip(encoder: Qwen3Encoder, tokenizer: PromptTokenizer) -> comfy.sd.CLIP:
    target = comfy.supported_models_base.ClipTarget(
        lambda **kw: _TokenizerAdapter(tokenizer, **kw), lambda **kw: _TextEncoderAdapter(encoder, **kw))
    dtype = next(encoder.parameters()).dtype
    return comfy.sd.CLIP(target=target, model_options={"dtype": dtype})


# ---- VAE -----------------------------------------------------------------------------------------------

class _AEAdapter(torch.nn.Module):
    """What comfy.sd.VAE calls on its first_stage_model: encode(pixels in [-1, 1]) and decode(latent)."""

    def __init__(self, ae: AutoEncoder):
        super().__init__()
        self.ae = ae

    def encode(self, x: Tensor) -> Tensor:
        return self.ae.encode(x)

    def decode(self, z: Tensor, **kwargs) -> Tensor:
        out = self.ae.decode(z)
        check_finite(out, "decoded image")          # before ComfyUI clamps inf into a flat white/black image
        return out


NONFINITE_HINT = ("a black image would have been saved. The values overflowed: load the model with weight_dtype "
                  "bf16 or fp32 (not fp16) and keep cfg near 1")


def check_finite(t: Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"the {what} contains NaN or infinite values; {NONFINITE_HINT}")


def make_vae(ae: AutoEncoder) -> comfy.sd.VAE:
    """comfy.sd.VAE detects architectures from full-size keys only, so it is started on a stub (the tiny
    TAESD branch, which builds in milliseconds) to set every attribute this ComfyUI version uses, then given
    our AE and the Flux latent facts."""
    stub = {"taesd_decoder.1.weight": torch.zeros(64, 16, 3, 3)}
    dtype = next(ae.parameters()).dtype
    with _root_log_level(logging.ERROR):            # the stub's "Missing VAE keys" warning would mislead users
        vae = comfy.sd.VAE(sd=stub, dtype=dtype)
    vae.first_stage_model = _AEAdapter(ae).eval()
    vae.latent_channels = ae.cfg.z_channels
    vae.downscale_ratio = vae.upscale_ratio = ae.cfg.downscale
    vae.process_input = lambda image: image * 2.0 - 1.0
    vae.process_output = lambda image: torch.clamp((image + 1.0) / 2.0, min=0.0, max=1.0)
    vae.working_dtypes = [torch.bfloat16, torch.float32]          # never fp16: the Flux AE overflows it
    vae.patcher = comfy.model_patcher.ModelPatcher(vae.first_stage_model, load_device=vae.device,
                                                   offload_device=mm.vae_offload_device())
    vae.size = None
    vae.model_size()
    return vae


@contextmanager
def _root_log_level(level: int):
    root = logging.getLogger()
    before = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(before)
