"""The precision policy, in one place: which dtype each part runs in on a given device.

bf16 where the GPU has it. GPUs without bf16 run the DiT in fp16: its blocks then keep the residual stream
in fp32 and scale every matmul input by a power of two (dit.TransformerBlock.forward_fp16), which is what
keeps fp16 from overflowing into black images; the text encoder stays fp32 there. fp32 on CPU. The VAE is
never fp16.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NAMED = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FP8_NAME = "fp8_e4m3fn"
FP8_FAST_NAME = "fp8_e4m3fn_fast"      # core ComfyUI's name for fp8 weights with fp8 matmul


@dataclass(frozen=True)
class PartDtypes:
    dit: torch.dtype
    text_encoder: torch.dtype
    vae: torch.dtype
    dit_fp8: bool = False          # store the DiT's block weights in fp8 (quant.store_blocks_in_fp8)
    dit_fp8_matmul: bool = False   # and multiply them in fp8 where the GPU can (quant.fp8_matmul)


BF16_CAPABILITY = (8, 0)       # Ampere: the first CUDA GPUs with bf16 tensor cores


def has_bf16(device: torch.device) -> bool:
    """bf16 worth running in: CUDA devices of compute capability 8.0 or more (Ampere on). CPU bf16 matmul is
    slow or emulated on most CPUs.

    Not torch.cuda.is_bf16_supported(): since torch 2.3 it counts emulation and answers True on T4, V100 and
    RTX 20xx / GTX 10-16 cards, where flash and mem-efficient attention refuse bf16 and GEMMs crawl; and it asks
    the current device, not this one (a machine can mix generations)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= BF16_CAPABILITY


def choose_dtypes(device: str | torch.device = "cpu", requested: str = "auto") -> PartDtypes:
    """requested: 'auto', 'fp8_e4m3fn', 'fp8_e4m3fn_fast' or one of NAMED for the DiT and text encoder; the VAE
    follows the safe rule. fp8 stores the DiT blocks in fp8 and computes in what 'auto' picks; _fast also asks
    for fp8 matmuls (granted per call where the GPU has fp8 units). The text encoder is never fp8."""
    device = torch.device(device)
    if requested in (FP8_NAME, FP8_FAST_NAME):
        auto = choose_dtypes(device, "auto")
        return PartDtypes(auto.dit, auto.text_encoder, auto.vae, dit_fp8=True,
                          dit_fp8_matmul=requested == FP8_FAST_NAME)
    if requested == "auto":
        main = torch.bfloat16 if has_bf16(device) else torch.float16 if device.type == "cuda" else torch.float32
    elif requested in NAMED:
        main = NAMED[requested]
    else:
        raise ValueError(f"weight dtype must be 'auto', '{FP8_NAME}', '{FP8_FAST_NAME}' or one of {', '.join(NAMED)}, "
                         f"got '{requested}'")
    # fp16: only the DiT has the overflow guard; the text encoder and the VAE run fp32
    text_encoder = torch.float32 if main == torch.float16 else main
    vae = torch.bfloat16 if main == torch.bfloat16 else torch.float32
    return PartDtypes(dit=main, text_encoder=text_encoder, vae=vae)
