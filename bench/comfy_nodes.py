"""The pack as users run it, against core ComfyUI on the same files, in one process: load, encode, sample,
decode, each timed, for each weight dtype asked.

- pack: the loader nodes' code (nodes/loaders.py load_parts: core's MODEL, CLIP and VAE over the pack's strict
  loader), CLIP Text Encode's calls, the Z-Image sampler node (ZImageTurboSampler: comfy.sample.sample_custom),
  VAE Decode's call.
- core: UNETLoader (comfy.sd.load_diffusion_model, its weight_dtype options), CLIPLoader type lumina2
  (comfy.sd.load_clip), VAELoader (comfy.sd.VAE), ModelSamplingAuraFlow shift 3, KSampler euler/simple at cfg 1.

Both reach the device through comfy.model_management.load_models_gpu, as in a ComfyUI server: the load stage
ends with it (what the first queued prompt pays), and the sampler and decode call it again (a no-op when the
weights stayed). Per dtype, pack then core: each side loads, runs --warmup untimed jobs (default 1), then --runs
timed jobs, and is unloaded before the other loads, so each side's peak memory holds its own weights only. Stages
are synchronised; seconds are medians. Peak memory: torch.cuda.max_memory_allocated per stage (reset before it)
on CUDA; on a CPU, the process's anonymous memory (RssAnon) at the end of the stage. Each side's first images are
compared, pack vs core.

    .runtime/venv/bin/python -m bench.comfy_nodes                      # the targets: 1024², 8 steps, batch 1
    .runtime/venv/bin/python -m bench.comfy_nodes --sizes 768 1536 --batch 4
    .runtime/venv/bin/python -m bench.comfy_nodes --smoke              # CPU, wide two-layer files, 64², 2 steps

Weights: --files DIR holds z_image_turbo_bf16.safetensors, qwen_3_4b.safetensors and ae.safetensors (the
released names: real weights are used as they are); missing ones are written there, random, at full size,
tensor by tensor, drawn on the GPU (20.6 GB: about a minute). --smoke writes (once, under .runtime/cache) the
released widths with two DiT and three text encoder layers, which core's loaders still detect as Z-Image and
Qwen3-4B (core tells them apart by width only). JSON: bench/results/comfy_nodes-<cpu|cuda>-<UTC time>.json, or
--out DIR, or ZIMAGE_BENCH_RESULTS.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from zimage_dev import REPO, comfy_tree

DTYPES = ("bf16", "fp8_e4m3fn", "fp8_e4m3fn_fast")
STAGES = ("load", "encode", "sample", "decode")
NAMES = {"dit": "z_image_turbo_bf16.safetensors", "te": "qwen_3_4b.safetensors", "vae": "ae.safetensors"}
PROMPT = "a red fox in fresh snow at dawn, photographed with a long lens, soft golden light"
SEED, SHIFT = 42, 3.0
# Core's Z-Image text encoder reads the second-to-last layer's output (it asserts more than two layers).
SMOKE_LAYERS, SMOKE_TE_LAYERS = 2, 3


# ---------------------------------------------------------------- weights

def wide_configs():
    """Released widths, two layers: what core's detection needs (DiT dim 3840, Qwen3 hidden 2560), cheap on a
    CPU (DiT 1.1 B parameters, text encoder 0.7 B, most of it the vocabulary)."""
    import dataclasses
    from zimage_core.config import DiTConfig
    from zimage_core.text_encoder import QWEN3_4B
    return DiTConfig(n_layers=SMOKE_LAYERS), dataclasses.replace(QWEN3_4B, n_layers=SMOKE_TE_LAYERS)


def ensure_files(folder: Path, smoke: bool) -> dict[str, Path]:
    """The three files in `folder`, written (random, tensor by tensor) where missing; real ones are kept."""
    from safetensors.torch import save_file
    from zimage_dev import synthetic
    from zimage_core.config import TURBO
    from zimage_core.text_encoder import QWEN3_4B
    from zimage_core.vae import VAEConfig
    dit_cfg, te_cfg = wide_configs() if smoke else (TURBO, QWEN3_4B)
    device = "cuda" if torch.cuda.is_available() else "cpu"      # 10 B random numbers: seconds there, not minutes
    paths = {part: folder / name for part, name in NAMES.items()}
    folder.mkdir(parents=True, exist_ok=True)
    if not paths["dit"].exists():
        print(f"writing {paths['dit']} (random)", flush=True)
        synthetic.write_dit_file(paths["dit"], dit_cfg, device=device)
    if not paths["te"].exists():
        print(f"writing {paths['te']} (random)", flush=True)
        synthetic.write_text_encoder_file(paths["te"], te_cfg, device=device)
    if not paths["vae"].exists():
        part = paths["vae"].with_name(paths["vae"].name + ".part")   # renamed when whole: a cache never half-holds
        save_file(synthetic.vae_weights(VAEConfig()), str(part))
        part.rename(paths["vae"])
    return paths


# ---------------------------------------------------------------- measuring

def anon_bytes() -> int:
    """Memory that is not a view of a file (mapped weights are not counted; copies of them are)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class Stage:
    """Times one stage (synchronised on CUDA) and reads its memory: the CUDA peak since its start, or RssAnon."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.started
        self.memory = torch.cuda.max_memory_allocated() if self.cuda else anon_bytes()


def free_all() -> None:
    """What ComfyUI does between two workflows that share nothing: unload every model, drop the cache."""
    import comfy.model_management as mm
    gc.collect()
    mm.unload_all_models()
    if hasattr(mm, "cleanup_models_gc"):              # not in every ComfyUI version
        mm.cleanup_models_gc()
    gc.collect()
    mm.soft_empty_cache()


# ---------------------------------------------------------------- the two sides

class Pack:
    name = "pack"

    def __init__(self):
        self.loaders = comfy_tree.import_pack("nodes.loaders")
        self.sampling = comfy_tree.import_pack("nodes.sampling")

    def load(self, files, dtype):
        return self.loaders.load_parts(str(files["dit"]), str(files["te"]), str(files["vae"]), dtype)

    def sample(self, model, positive, latent, steps):
        out = self.sampling.ZImageTurboSampler().run(model, positive, {"samples": latent}, SEED, steps, 1.0, SHIFT,
                                                     1.0)
        return out["result"][0]["samples"]


class Core:
    name = "core"

    def __init__(self, smoke: bool):
        self.smoke = smoke

    def unet_options(self, dtype: str) -> dict:
        """UNETLoader's weight_dtype, as its node sets model_options; bf16 (its 'default' on a bf16 GPU) is asked
        for by name so that a CPU run computes in bf16 like the pack's."""
        if dtype == "bf16":
            return {"dtype": torch.bfloat16}
        options = {"dtype": torch.float8_e4m3fn}
        if dtype == "fp8_e4m3fn_fast":
            options["fp8_optimizations"] = True
        return options

    def clip_options(self, dtype: str) -> dict:
        """CLIPLoader's defaults on a GPU. On a CPU core would pick fp16; the pack's text dtype is asked for
        instead, so the two images can be compared. The smoke file has three layers: core is told so."""
        options = {}
        if not torch.cuda.is_available():
            from zimage_core.precision import choose_dtypes
            options["dtype"] = choose_dtypes("cpu", dtype).text_encoder
        if self.smoke:
            options["qwen3_4b_model_config"] = {"num_hidden_layers": SMOKE_TE_LAYERS}
        return options

    def load(self, files, dtype):
        import comfy.sd
        import comfy.utils
        model = comfy.sd.load_diffusion_model(str(files["dit"]), model_options=self.unet_options(dtype))
        clip = comfy.sd.load_clip(ckpt_paths=[str(files["te"])], clip_type=comfy.sd.CLIPType.LUMINA2,
                                  model_options=self.clip_options(dtype))
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(files["vae"])))
        return aura_flow(model, SHIFT), clip, vae

    def sample(self, model, positive, latent, steps):
        import comfy.sample
        noise = comfy.sample.prepare_noise(latent, SEED)
        return comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", positive, [], latent, denoise=1.0,
                                   seed=SEED)


def aura_flow(model, shift: float):
    """ModelSamplingAuraFlow (comfy_extras, which the device bundle does not carry): a clone whose sampling
    object is discrete flow with this shift and multiplier 1, as the node builds it."""
    import comfy.model_sampling as ms

    class ModelSamplingAdvanced(ms.ModelSamplingDiscreteFlow, ms.CONST):
        pass
    sampling = ModelSamplingAdvanced(model.model.model_config)
    sampling.set_parameters(shift=shift, multiplier=1.0)
    model = model.clone()
    model.add_object_patch("model_sampling", sampling)
    return model


# ---------------------------------------------------------------- one job

def encode(clip, text: str):
    """CLIP Text Encode's calls."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def empty_latent(size: int, batch: int) -> torch.Tensor:
    """EmptySD3LatentImage's latent (16 channels, 1/8 size), what the Z-Image templates use."""
    import comfy.model_management as mm
    return torch.zeros([batch, 16, size // 8, size // 8], device=mm.intermediate_device())


def job(side, model, clip, vae, size: int, steps: int, batch: int, cuda: bool):
    """One prompt through the workflow: (stage -> (seconds, memory bytes)) and the decoded images."""
    stages = {}
    with Stage(cuda) as s:
        positive = encode(clip, PROMPT)
    stages["encode"] = s
    with Stage(cuda) as s:
        samples = side.sample(model, positive, empty_latent(size, batch), steps)
    stages["sample"] = s
    with Stage(cuda) as s:
        images = vae.decode(samples)
    stages["decode"] = s
    return {k: (v.seconds, v.memory) for k, v in stages.items()}, images


def load_stage(side, files, dtype: str, cuda: bool):
    """The loader node, then load_models_gpu as a server's first prompt calls it for each part."""
    import comfy.model_management as mm
    with Stage(cuda) as s:
        model, clip, vae = side.load(files, dtype)
        mm.load_models_gpu([model, clip.patcher, vae.patcher])
    return (s.seconds, s.memory), (model, clip, vae)


def run_side(side, files, dtype: str, sizes, steps: int, batch: int, runs: int, warmup: int, cuda: bool):
    """Rows for one side and dtype (load once; per size `warmup` untimed and `runs` timed jobs), and each size's
    first images (for the pack-vs-core comparison)."""
    rows, images = [], {}
    load, (model, clip, vae) = load_stage(side, files, dtype, cuda)
    rows.append(row(side.name, dtype, None, "load", [load]))
    for size in sizes:
        timed = []
        for i in range(warmup + runs):
            measured, out = job(side, model, clip, vae, size, steps, batch, cuda)
            images.setdefault(size, out.float().cpu())
            if i >= warmup:
                timed.append(measured)
        for stage in STAGES[1:]:
            rows.append(row(side.name, dtype, size, stage, [t[stage] for t in timed]))
    del model, clip, vae
    free_all()
    return rows, images


def row(side: str, dtype: str, size, stage: str, measured) -> dict:
    seconds = [m[0] for m in measured]
    return {"side": side, "dtype": dtype, "size": size, "stage": stage, "seconds": round(statistics.median(seconds), 4),
            "runs_s": [round(x, 4) for x in seconds], "memory_gib": round(max(m[1] for m in measured) / 2**30, 3)}


# ---------------------------------------------------------------- report

def ratios(rows) -> list[dict]:
    """core / pack for each (dtype, size, stage) measured on both sides: above 1, the pack is faster / smaller."""
    by = {(r["side"], r["dtype"], r["size"], r["stage"]): r for r in rows}
    out = []
    for (side, dtype, size, stage), pack in by.items():
        core = by.get(("core", dtype, size, stage))
        if side != "pack" or core is None:
            continue
        out.append({"dtype": dtype, "size": size, "stage": stage,
                    "seconds": round(core["seconds"] / max(pack["seconds"], 1e-9), 3),
                    "memory": round(core["memory_gib"] / max(pack["memory_gib"], 1e-9), 3)})
    return out


def compare(pack_images, core_images) -> list[dict]:
    """The first images of the two sides: same seed, prompt and schedule, so they should agree to rounding."""
    return [{"size": size, "max_abs_diff": round((pack_images[size] - core_images[size]).abs().max().item(), 5),
             "mean_abs_diff": round((pack_images[size] - core_images[size]).abs().mean().item(), 6)}
            for size in pack_images]


def print_table(rows, ratio_rows, memory_kind: str) -> None:
    print(f"\n{'dtype':16s} {'size':>5s} {'stage':7s} {'pack s':>9s} {'core s':>9s} {'core/pack':>9s}   "
          f"{'pack GiB':>9s} {'core GiB':>9s} ({memory_kind})")
    by = {(r["side"], r["dtype"], r["size"], r["stage"]): r for r in rows}
    for q in ratio_rows:
        p, c = by[("pack", q["dtype"], q["size"], q["stage"])], by[("core", q["dtype"], q["size"], q["stage"])]
        print(f"{q['dtype']:16s} {str(q['size'] or '-'):>5s} {q['stage']:7s} {p['seconds']:9.3f} {c['seconds']:9.3f} "
              f"{q['seconds']:8.2f}x   {p['memory_gib']:9.3f} {c['memory_gib']:9.3f}")


def machine(cuda: bool) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def results_dir(args) -> Path:
    return Path(args.out or os.environ.get("ZIMAGE_BENCH_RESULTS") or REPO / "bench" / "results")


# ---------------------------------------------------------------- main

def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", help="square image sizes in px (default 1024; smoke 64)")
    ap.add_argument("--steps", type=int, help="sampler steps (default 8; smoke 2: one step would not see the shift)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtypes", nargs="+", choices=DTYPES, help=f"weight dtypes (default all: {' '.join(DTYPES)}; "
                                                                 f"smoke bf16)")
    ap.add_argument("--runs", type=int, help="timed jobs per side, dtype and size, after --warmup (default 3; "
                                             "smoke 1)")
    ap.add_argument("--warmup", type=int, help="untimed jobs first (default 1; smoke 0: one job, timed cold)")
    ap.add_argument("--sides", nargs="+", choices=("pack", "core"), default=["pack", "core"])
    ap.add_argument("--files", type=Path, help="folder of the three weight files (written where missing; default "
                                               ".runtime/cache/bench_full, smoke .runtime/cache/bench_wide)")
    ap.add_argument("--smoke", action="store_true", help="wide two-layer files, small size, CPU OK: a self-test")
    ap.add_argument("--out", type=Path, help="where the JSON goes (default bench/results or ZIMAGE_BENCH_RESULTS)")
    ap.add_argument("--comfyui", default="0.30.0")
    args = ap.parse_args(argv)
    defaults = ({"sizes": [64], "steps": 2, "dtypes": ["bf16"], "runs": 1, "warmup": 0} if args.smoke else
                {"sizes": [1024], "steps": 8, "dtypes": list(DTYPES), "runs": 3, "warmup": 1})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.files is None:
        args.files = REPO / ".runtime" / "cache" / ("bench_wide" if args.smoke else "bench_full")
    return args


def summary(args, cuda: bool, files, rows, images) -> dict:
    """The JSON: configuration, machine, every row, core/pack ratios and image agreement so far."""
    agreement = [dict(dtype=d, **c) for d in args.dtypes if ("pack", d) in images and ("core", d) in images
                 for c in compare(images[("pack", d)], images[("core", d)])]
    return {"benchmark": "comfy_nodes", "smoke": args.smoke, "comfyui": args.comfyui, "machine": machine(cuda),
            "config": {"sizes": args.sizes, "steps": args.steps, "batch": args.batch, "dtypes": args.dtypes,
                       "runs": args.runs, "warmup": args.warmup, "files": {k: p.name for k, p in files.items()},
                       "prompt": PROMPT, "seed": SEED, "shift": SHIFT},
            "memory_kind": "CUDA peak allocated" if cuda else "RssAnon after stage",
            "rows": rows, "core_over_pack": ratios(rows), "images": agreement}


def main(argv=None) -> int:
    args = parse(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("no CUDA device: this benchmark is for a GPU machine (--smoke runs it on the CPU as a self-test)")
        return 0
    comfy_tree.import_comfy(args.comfyui, cpu=not cuda)
    files = ensure_files(args.files, args.smoke)
    out = results_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"comfy_nodes-{'cuda' if cuda else 'cpu'}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    rows, images = [], {}
    for dtype in args.dtypes:
        for name in args.sides:
            side = Pack() if name == "pack" else Core(args.smoke)
            print(f"{name} {dtype}: load, then {args.warmup} + {args.runs} jobs per size", flush=True)
            side_rows, images[(name, dtype)] = run_side(side, files, dtype, args.sizes, args.steps, args.batch,
                                                         args.runs, args.warmup, cuda)
            rows += side_rows
            # after every side: a call cut short by its time limit still leaves what it measured
            path.write_text(json.dumps(summary(args, cuda, files, rows, images), indent=2))
    result = summary(args, cuda, files, rows, images)
    print_table(rows, result["core_over_pack"], result["memory_kind"])
    for a in result["images"]:
        print(f"images {a['dtype']} {a['size']}²: pack vs core max |diff| {a['max_abs_diff']}, "
              f"mean {a['mean_abs_diff']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
