"""Demo: write tiny random Z-Image-Turbo files in ComfyUI's split-file layout, load them with the engine,
run the e-commerce template's prompt through the turbo pipeline (8 steps, cfg 1) and save a PNG.

Random weights make a random-looking picture: the point is that every stage runs, end to end, anywhere.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from zimage_core import synthetic  # noqa: E402
from zimage_core.pipeline import ZImagePipeline, load_zimage  # noqa: E402

PROMPT = "一位穿着汉服的女孩站在樱花树下,左侧有一只白猫,右侧有灯笼,写实风格"   # the seed template's prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "output")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=12345)
    args = parser.parse_args()

    tokenizer = next(REPO.glob(".runtime/ComfyUI-*/comfy/text_encoders/qwen25_tokenizer"), None)
    if tokenizer is None:
        sys.exit("Qwen tokenizer files not found: run scripts/setup_runtime.sh first")
    with tempfile.TemporaryDirectory() as models:
        files = synthetic.write_split_files(models)
        pipe = ZImagePipeline(load_zimage(files.dit, files.text_encoder, files.vae, tokenizer))
        for report in pipe.models.reports:
            print("loaded", report)
        start = time.perf_counter()
        images = pipe(PROMPT, width=args.size, height=args.size, seed=args.seed,
                      callback=lambda i, n, x, d: print(f"  step {i}/{n}"))
        seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"Ecommerce_ZImage_demo_{args.seed}.png"
    Image.fromarray((images[0].numpy() * 255).round().astype(np.uint8)).save(path)
    print(f"{args.size}x{args.size}, 8 steps in {seconds:.2f} s -> {path}")


if __name__ == "__main__":
    main()
