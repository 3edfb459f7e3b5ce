"""What loading a Z-Image DiT costs in ComfyUI: the pack's loader (core's model over the file's memory-mapped
tensors) against core's own UNETLoader path (comfy.sd.load_diffusion_model), on the same file, same dtype.

Each load runs in a fresh process (ComfyUI imported as a library, --cpu) so neither sees the other's pages;
reported: seconds to load, and the process's anonymous memory (RssAnon: memory that is not a view of a file,
what the system must find room for) after the load, above the process's baseline, and a forward at 256x256.

    .runtime/venv/bin/python bench/comfy_load_memory.py FILE [--dtype bf16] [--comfyui 0.30.0] [--forward]

FILE: a DiT in the released layout (core detects Z-Image only at dim 3840: the released file, or the wide test
file of tests/test_core_nodes.py). Results go to bench/results/comfy_load_memory-*.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

CHILD = r'''
import sys, time, json, torch
sys.path.insert(0, {scripts!r})
import comfy_tree
comfy_tree.import_comfy({version!r}, cpu=True)

def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

dtype = {{"bf16": torch.bfloat16, "fp32": torch.float32}}[{dtype!r}]
if {side!r} == "pack":
    core_model = comfy_tree.import_pack("nodes.core_model", version={version!r})
base = anon_kb()
t = time.perf_counter()
if {side!r} == "pack":
    model = core_model.load_model({path!r}, {dtype!r})
else:
    import comfy.sd
    model = comfy.sd.load_diffusion_model({path!r}, model_options={{"dtype": dtype}})
seconds = time.perf_counter() - t
loaded = anon_kb()
result = {{"side": {side!r}, "load_s": round(seconds, 2), "anon_gb": round((loaded - base) / 2**20, 3)}}
if {forward!r}:
    dit = model.model.diffusion_model
    cap = dit.cap_embedder[1].in_features
    x, sigma, ctx = torch.randn(1, 16, 32, 32), torch.tensor([0.8]), torch.randn(1, 32, cap)
    t = time.perf_counter()
    with torch.no_grad():
        model.model.apply_model(x, sigma, c_crossattn=ctx, num_tokens=32)
    result["forward_s"] = round(time.perf_counter() - t, 2)
    result["anon_after_forward_gb"] = round((anon_kb() - base) / 2**20, 3)
print("RESULT " + json.dumps(result))
'''


def measure(side: str, path: Path, dtype: str, version: str, forward: bool) -> dict:
    code = CHILD.format(scripts=str(REPO / "scripts"), version=version, dtype=dtype, side=side, path=str(path),
                        forward=forward)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=3600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{side} load failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", type=Path)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--comfyui", default="0.30.0")
    ap.add_argument("--forward", action="store_true", help="also time one forward at 256x256")
    args = ap.parse_args()
    rows = [measure(side, args.file, args.dtype, args.comfyui, args.forward) for side in ("pack", "core")]
    size_gb = args.file.stat().st_size / 2**30
    print(f"{args.file.name} ({size_gb:.2f} GiB), {args.dtype}, ComfyUI {args.comfyui}:")
    for r in rows:
        extra = f", forward {r['forward_s']} s" if "forward_s" in r else ""
        print(f"  {r['side']:5s} load {r['load_s']:7.2f} s, anonymous memory {r['anon_gb']:7.3f} GiB{extra}")
    pack, core = rows
    print(f"  core / pack: load time {core['load_s'] / max(pack['load_s'], 1e-3):.1f}x, anonymous memory "
          f"{core['anon_gb']:.2f} vs {pack['anon_gb']:.2f} GiB")
    out = REPO / "bench" / "results" / f"comfy_load_memory-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"file": args.file.name, "file_gib": round(size_gb, 3), "dtype": args.dtype,
                               "comfyui": args.comfyui, "rows": rows}, indent=2))
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
