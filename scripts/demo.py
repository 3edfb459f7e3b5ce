"""Demo: the e-commerce workflow (workflows/ecommerce_turbo_api.json, 1024x1024, 8 steps) run by a real
ComfyUI server with this pack installed, on tiny random weights written in the released file layouts.

Random weights make a random-looking picture: the point is that every stage runs, end to end, as a user's
REST client drives it.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from zimage_dev import REPO
from zimage_dev.comfy_server import ComfyServer, load_workflow, write_tiny_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--comfyui", default="0.30.0", choices=["0.30.0", "0.3.75"])
    parser.add_argument("--workflow", default="ecommerce_turbo_api.json")
    parser.add_argument("--out", type=Path, default=REPO / "output")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as base:
        print(f"writing tiny Z-Image weights and starting ComfyUI {args.comfyui} on 127.0.0.1 ...")
        write_tiny_models(Path(base) / "models")
        with ComfyServer(args.comfyui, Path(base)) as server:
            start = time.perf_counter()
            entry = server.run(load_workflow(args.workflow))
            seconds = time.perf_counter() - start
            args.out.mkdir(parents=True, exist_ok=True)
            saved = [Path(shutil.copy(f, args.out / f.name)) for f in server.output_files(entry)]
    print(f"{args.workflow} ran in {seconds:.1f} s on ComfyUI {args.comfyui}")
    for path in saved:
        print(path)


if __name__ == "__main__":
    main()
