"""CPU benchmark: one DiT forward of a reduced Z-Image config, the pack vs core ComfyUI's NextDiT vs diffusers'
ZImageTransformer2DModel, all three on the same random weights, in one process. Prints a table of medians and
writes JSON to bench/results/.

    .runtime/venv/bin/python bench/cpu_dit.py [--runs 7] [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "bench")]

from common import median_seconds, print_table, write_result  # noqa: E402
from zimage_core.config import DiTConfig  # noqa: E402
from zimage_core.dit import ZImageDiT  # noqa: E402
from zimage_core.synthetic import random_state_dict  # noqa: E402

# Reduced but proportioned like Turbo: head_dim 128, RoPE split (32, 48, 48), ffn dim * 8/3.
REDUCED = DiTConfig(dim=768, n_layers=4, n_noise_refiner=1, n_context_refiner=1, n_heads=6, ffn_hidden=2048,
                    cap_feat_dim=2560, adaln_dim=256, t_embed_hidden=768)   # ComfyUI: min(dim, 1024)
LATENT = (1, 16, 64, 64)          # 512x512 pixels: 1024 image tokens
CAPTION_TOKENS = 77


def build_models(cfg: DiTConfig):
    from test_dit import comfy_nextdit, diffusers_dit
    ours = ZImageDiT(cfg).eval()
    ours.load_state_dict(random_state_dict(ours, seed=0, std=0.02))
    core = comfy_nextdit(cfg).eval()
    core.load_state_dict(ours.state_dict(), strict=False)
    ref = diffusers_dit(cfg, seed=0)                       # diffusers' own layout, random weights of the same sizes
    return ours, core, ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ours, core, ref = build_models(REDUCED)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(LATENT, generator=g)
    cap = torch.randn(1, CAPTION_TOKENS, REDUCED.cap_feat_dim, generator=g)
    t = torch.tensor([0.4])
    calls = {
        "pack (zimage_core)": lambda: ours(x, t, [cap[0]]),
        "ComfyUI core NextDiT": lambda: core(x, 1 - t, cap, num_tokens=CAPTION_TOKENS),
        "diffusers": lambda: ref([x[0].unsqueeze(1)], t, [cap[0]], return_dict=False),
    }
    with torch.inference_mode():
        seconds = {name: median_seconds(fn, runs=args.runs) for name, fn in calls.items()}
    pack = seconds["pack (zimage_core)"]
    rows = [(name, f"{s * 1000:.1f}", f"{pack / s:.2f}") for name, s in seconds.items()]
    print(f"one DiT forward, dim {REDUCED.dim}, {REDUCED.n_layers}+{REDUCED.n_noise_refiner}+"
          f"{REDUCED.n_context_refiner} blocks, {LATENT[2] * LATENT[3] // 4} image + {CAPTION_TOKENS} caption tokens, "
          f"fp32, {args.threads} threads, median of {args.runs}")
    print_table(["implementation", "ms", "pack time / this"], rows)
    write_result("cpu_dit", {"config": REDUCED.__dict__, "latent": LATENT, "caption_tokens": CAPTION_TOKENS,
                             "threads": args.threads, "runs": args.runs, "seconds": seconds,
                             "pack_over_core": pack / seconds["ComfyUI core NextDiT"],
                             "pack_over_diffusers": pack / seconds["diffusers"]})


if __name__ == "__main__":
    main()
