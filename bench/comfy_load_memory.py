"""What loading a Z-Image DiT or text encoder costs in ComfyUI: the pack's loader against core's own (UNETLoader's
comfy.sd.load_diffusion_model, CLIPLoader's comfy.sd.load_clip), on the same file, same dtype.

Each load runs in a fresh process (ComfyUI imported as a library, --cpu) so neither sees the other's pages;
reported: seconds to load; the process's anonymous memory (RssAnon: memory that is not a view of a file, what the
system must find room for) after the load, above the process's baseline; its peak resident memory (VmHWM) above
the baseline; and, with --forward, a DiT forward at 256x256.

    .runtime/venv/bin/python -m bench.comfy_load_memory FILE [--part dit|text] [--dtype auto|bf16|fp32]
                                                        [--comfyui 0.30.0] [--forward]
    .runtime/venv/bin/python -m bench.comfy_load_memory --write-hollow int8_convrot|fp8_mixed FILE

FILE: a DiT in the released layout (core detects Z-Image only at dim 3840: the released file, or the wide test
file of tests/test_core_nodes.py), or a Qwen3-4B text encoder at its released size. --write-hollow writes a
full-size quantized file in Comfy-Org's layout whose data is a hole (no disk, zeros: for memory, never for
pictures). --dtype auto: the pack's auto, core's default. Results go to bench/results/comfy_load_memory-*.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r'''
import sys, time, json, torch
from zimage_dev import comfy_tree
comfy_tree.import_comfy({version!r}, cpu=True)

def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

dtype = {{"bf16": torch.bfloat16, "fp32": torch.float32, "auto": None}}[{dtype!r}]
options = {{}} if dtype is None else {{"dtype": dtype}}
if {side!r} == "pack":
    pack = comfy_tree.import_pack("nodes.core_model" if {part!r} == "dit" else "nodes.core_clip", version={version!r})
    import comfy.model_management as mm
    precision = comfy_tree.import_pack("zimage_core.precision", version={version!r})
import comfy.sd
base, base_rss = status_kb("RssAnon"), status_kb("VmRSS")
t = time.perf_counter()
if {side!r} == "pack" and {part!r} == "dit":
    model = pack.load_model({path!r}, {dtype!r})
elif {side!r} == "pack":
    model = pack.load_clip({path!r}, precision.choose_dtypes(mm.get_torch_device(), {dtype!r}).text_encoder)
elif {part!r} == "dit":
    model = comfy.sd.load_diffusion_model({path!r}, model_options=options)
else:
    model = comfy.sd.load_clip(ckpt_paths=[{path!r}], clip_type=comfy.sd.CLIPType.LUMINA2, model_options=options)
seconds = time.perf_counter() - t
loaded = status_kb("RssAnon")
result = {{"side": {side!r}, "load_s": round(seconds, 2), "anon_gb": round((loaded - base) / 2**20, 3),
           "peak_rss_gb": round((status_kb("VmHWM") - base_rss) / 2**20, 3)}}
if {forward!r} and {part!r} == "dit":
    dit = model.model.diffusion_model
    cap = dit.cap_embedder[1].in_features
    x, sigma, ctx = torch.randn(1, 16, 32, 32), torch.tensor([0.8]), torch.randn(1, 32, cap)
    t = time.perf_counter()
    with torch.no_grad():
        model.model.apply_model(x, sigma, c_crossattn=ctx, num_tokens=32)
    result["forward_s"] = round(time.perf_counter() - t, 2)
    result["anon_after_forward_gb"] = round((status_kb("RssAnon") - base) / 2**20, 3)
print("RESULT " + json.dumps(result))
'''


def measure(side: str, path: Path, dtype: str, version: str, forward: bool, part: str = "dit") -> dict:
    code = CHILD.format(version=version, dtype=dtype, side=side, path=str(path),
                        forward=forward, part=part)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=3600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{side} load failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", type=Path)
    ap.add_argument("--part", default="dit", choices=["dit", "text"])
    ap.add_argument("--dtype", default="bf16", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--comfyui", default="0.30.0")
    ap.add_argument("--forward", action="store_true", help="also time one DiT forward at 256x256")
    ap.add_argument("--write-hollow", choices=["int8_convrot", "fp8_mixed"],
                    help="write FILE as a full-size hollow quantized file, then stop")
    args = ap.parse_args()
    if args.write_hollow:
        from zimage_dev.synthetic import write_hollow_quantized
        print(f"wrote {write_hollow_quantized(args.write_hollow, args.file)}")
        return
    rows = [measure(side, args.file, args.dtype, args.comfyui, args.forward, args.part) for side in ("pack", "core")]
    size_gb = args.file.stat().st_size / 2**30
    print(f"{args.file.name} ({size_gb:.2f} GiB), {args.part}, {args.dtype}, ComfyUI {args.comfyui}:")
    for r in rows:
        extra = f", forward {r['forward_s']} s" if "forward_s" in r else ""
        print(f"  {r['side']:5s} load {r['load_s']:7.2f} s, anonymous memory {r['anon_gb']:7.3f} GiB, peak resident "
              f"+{r['peak_rss_gb']:.3f} GiB{extra}")
    pack, core = rows
    print(f"  core / pack: load time {core['load_s'] / max(pack['load_s'], 1e-3):.1f}x, anonymous memory "
          f"{core['anon_gb']:.2f} vs {pack['anon_gb']:.2f} GiB")
    out = REPO / "bench" / "results" / f"comfy_load_memory-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"file": args.file.name, "file_gib": round(size_gb, 3), "part": args.part,
                               "dtype": args.dtype,
                               "comfyui": args.comfyui, "rows": rows}, indent=2))
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
