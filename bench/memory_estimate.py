"""Predicted device memory of the plain pipeline's policies at Turbo size, without a GPU: the weights each
policy keeps on the device (counted from the models built on the meta device) plus each stage's activations
(counted tensor by tensor by bench/meta_memory.py: a floor, since kernel workspaces and the allocator's
rounding are not in it). bench/gpu.py --memory measures the same on a GPU; this says what to expect, and the
issue's targets (bf16 <= 13 GB, fp8 <= 8 GB, low-VRAM < 6 GB) can be checked against it here.

    .runtime/venv/bin/python -m bench.memory_estimate [--size 1024] [--batch 1] [--caption-tokens 128]
"""
from __future__ import annotations

import argparse
import sys

import torch

from bench.common import print_table, write_result
from bench.meta_memory import param_bytes, peak_bytes
from zimage_core.config import TURBO
from zimage_core.dit import ZImageDiT
from zimage_core.fastpath import FAST, configure
from zimage_core.memory import decode_tiled
from zimage_core.quant import use_fp8_matmul
from zimage_core.text_encoder import QWEN3_4B, Qwen3Encoder
from zimage_core.vae import FLUX_AE, AutoEncoder

GB = 1e9
BF16 = torch.bfloat16
VAE_TILE = 64               # ZImagePipeline's default tile (latent pixels) under lowvram


def meta(factory, dtype=BF16):
    with torch.device("meta"):
        return factory().to(dtype).eval()


def activations(size: int, batch: int, tokens: int) -> dict:
    """Counted activation peaks (bytes) of each stage: text encode, one DiT forward (bf16 and fp8 matmul),
    whole and tiled VAE decode."""
    te, dit, vae = meta(lambda: Qwen3Encoder(QWEN3_4B)), meta(lambda: configure(ZImageDiT(TURBO), FAST)), \
        meta(lambda: AutoEncoder(FLUX_AE))
    fp8 = meta(lambda: configure(ZImageDiT(TURBO), FAST))
    use_fp8_matmul(fp8, mode="rowwise")                     # Ada/Hopper's per-token fp8 products
    all_blocks = [*dit.noise_refiner, *dit.context_refiner, *dit.layers]
    h = w = size // 8
    ids = torch.zeros(batch, tokens, dtype=torch.long, device="meta")
    x = torch.empty(batch, TURBO.in_channels, h, w, device="meta", dtype=BF16)
    t = torch.empty(batch, device="meta")
    caps = [torch.empty(tokens, TURBO.cap_feat_dim, device="meta", dtype=BF16)] * batch
    z = torch.empty(batch, FLUX_AE.z_channels, h, w, device="meta", dtype=BF16)
    return {"text encode": peak_bytes(lambda: te(ids, torch.ones_like(ids, dtype=torch.bool))),
            "DiT": peak_bytes(lambda: dit(x, t, caps)),
            "DiT fp8": peak_bytes(lambda: fp8(x, t, caps)),
            "VAE decode": peak_bytes(lambda: vae.decode(z)),
            "VAE decode tiled": peak_bytes(lambda: decode_tiled(vae.decode, z, tile=VAE_TILE,
                                                                overlap=VAE_TILE // 4)),
            "weights": {"dit": param_bytes(dit), "dit_fp8": param_bytes(fp8),
                        "dit_blocks_largest": max(param_bytes(b) for b in [*dit.noise_refiner, *dit.layers]),
                        "dit_blocks_largest_fp8": max(param_bytes(b) for b in [*fp8.noise_refiner, *fp8.layers]),
                        "dit_non_block": param_bytes(dit) - sum(param_bytes(b) for b in all_blocks),
                        "te": param_bytes(te), "te_layer": param_bytes(te.model.layers[0]), "vae": param_bytes(vae)}}


def policy_peaks(act: dict) -> dict:
    """Per policy and stage: resident weights + that stage's activations (bytes)."""
    wt = act["weights"]
    out = {}
    for fp8 in (False, True):
        dit = wt["dit_fp8" if fp8 else "dit"]
        block = wt["dit_blocks_largest_fp8" if fp8 else "dit_blocks_largest"]
        dit_act = act["DiT fp8" if fp8 else "DiT"]
        te_stream = 2 * wt["te_layer"] + act["text encode"]          # two layers resident while encoding
        suffix = " + fp8" if fp8 else ""
        if not fp8:
            full = dit + wt["te"] + wt["vae"]
            out["keep"] = {"text encode": full + act["text encode"], "DiT": full + dit_act,
                           "VAE decode": full + act["VAE decode"]}
        base = dit + wt["vae"]
        out["swap" + suffix] = {"text encode": base + te_stream, "DiT": base + dit_act,
                                "VAE decode": base + act["VAE decode tiled"]}
        base = wt["dit_non_block"] + wt["vae"]
        out["lowvram" + suffix] = {"text encode": base + te_stream, "DiT": base + 2 * block + dit_act,
                                   "VAE decode": base + act["VAE decode tiled"]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--caption-tokens", type=int, default=128)
    args = parser.parse_args()
    act = activations(args.size, args.batch, args.caption_tokens)
    peaks = policy_peaks(act)
    stages = ("text encode", "DiT", "VAE decode")
    print(f"predicted device memory, {args.size}², batch {args.batch}, {args.caption_tokens} caption tokens, bf16 "
          "(GB = 1e9 bytes; weights + counted activations, a floor: workspaces and allocator not included)")
    print_table(["policy", *stages, "peak"],
                [(name, *(f"{p[s] / GB:.2f}" for s in stages), f"{max(p.values()) / GB:.2f}")
                 for name, p in peaks.items()])
    print("activations (GB): " + ", ".join(f"{k} {v / GB:.2f}" for k, v in act.items() if k != "weights"))
    write_result("memory_estimate", {"size": args.size, "batch": args.batch, "caption_tokens": args.caption_tokens,
                                     "activations": act, "policy_peaks": peaks}, "cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
