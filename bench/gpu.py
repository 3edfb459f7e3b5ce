"""GPU benchmark: the whole Z-Image-Turbo job at full size with random bf16 weights (timings do not depend on
the values), per stage and end to end, through the pack and through core ComfyUI 0.30.0's own models in the
same process, on the same weight tensors.

    .runtime/venv/bin/python -m bench.gpu [--sizes 768 1024 1536 2048] [--batches 1 4] [--steps 8] [--runs 3]
    .runtime/venv/bin/python -m bench.gpu --smoke       # tiny configs and sizes; runs on CPU too (a self-test)

Per size and batch, each run does text encode (Qwen3-4B, `--caption-tokens` tokens per prompt) -> `--steps`
Euler steps of the DiT at cfg 1 (zimage_core.sampling.sample) -> VAE decode (Flux AE), synchronising between
stages. Pack and core runs alternate. Reported: median seconds, DiT steps/s, peak memory
(torch.cuda.max_memory_allocated, reset before each stage; every part's weights stay resident), achieved
TFLOP/s and its fraction of a bf16 matmul peak measured in the same run, and core / pack time ratios.

Pack variants (`--variants`), each a DiT over the same weight tensors (fp8: its own fp8 copy of the blocks):
`pack` (the fast path, zimage_core.fastpath.FAST, as the loaders configure it), `pack-plain` (fastpath.PLAIN),
`pack-fp8` (block matmuls in fp8, quant.use_fp8_matmul). torch.compile is the ComfyUI node's (nodes/speed.py).
Inside ComfyUI the pack's loaders now hand ComfyUI core's own NextDiT (nodes/core_model.py): that is the core
job below; measuring the nodes end to end through ComfyUI's loaders is the benchmark's next step.
`--memory` then runs the pack at `--memory-size` under each memory policy (keep / swap / lowvram), and swap and
lowvram again with the DiT's blocks in fp8, and reports per-stage peaks: the issue's "<= 13 GB bf16",
"<= 8 GB fp8" and "< 6 GB low-VRAM" figures.

The core ComfyUI job is its Qwen3_4B (all 36 layers, as ComfyUI runs it; the pack stops after the 35th, whose
output is the caption feature), its NextDiT(z_image_modulation=True) driven by the same Euler loop, and its
Flux AE Decoder; each built on the meta device and given the pack's tensors by reference (ComfyUI's layout is
the pack's), so both hold one copy of the weights and run the same dtype.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
from torch import nn

from bench.common import (dit_flops, flop_counter, fmt_gib, import_comfy, matmul_peak,
                          materialise_random, print_table, share_weights, summary, sync, text_encoder_flops, time_once, write_result)
from zimage_dev.comfy_tree import comfy_nextdit
from zimage_core.config import TURBO, DiTConfig
from zimage_core.dit import ZImageDiT
from zimage_core.fastpath import FAST, PLAIN, configure
from zimage_core.memory import POLICIES
from zimage_core.quant import use_fp8_matmul
from zimage_core.pipeline import ZImageModels, ZImagePipeline
from zimage_core.sampling import sample, sigma_schedule
from zimage_core.text_encoder import QWEN3_4B, Qwen3Config, Qwen3Encoder
from zimage_core.vae import FLUX_AE, AutoEncoder, VAEConfig, from_model_space

STAGES = ("text encode", "DiT", "VAE decode", "end to end")
PACK, CORE = "pack", "core"
VARIANTS = ("pack", "pack-plain", "pack-fp8")


@dataclass(frozen=True)
class Setup:
    dit: DiTConfig
    text: Qwen3Config
    vae: VAEConfig
    sizes: tuple[int, ...]
    batches: tuple[int, ...]
    steps: int
    caption_tokens: int
    runs: int


FULL = Setup(TURBO, QWEN3_4B, FLUX_AE, sizes=(768, 1024, 1536, 2048), batches=(1, 4), steps=8, caption_tokens=128,
             runs=3)
# Tiny parts that fit together, built so core ComfyUI's classes take them too: head_dim 128 (ComfyUI's Qwen3
# config hard-codes it), t-embedder hidden = dim (ComfyUI: min(dim, 1024)), VAE widths multiples of 32.
SMOKE = Setup(DiTConfig(dim=256, n_layers=2, n_noise_refiner=1, n_context_refiner=1, n_heads=2, ffn_hidden=682,
                        cap_feat_dim=64, adaln_dim=256, t_embed_hidden=256),
              Qwen3Config(hidden=64, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=128, ffn_hidden=128,
                          vocab_size=4096),
              VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1),
              sizes=(64, 128), batches=(1, 2), steps=2, caption_tokens=20, runs=2)


class FixedTokens:
    """Stands in for the prompt tokenizer: every prompt becomes the same `n` random ids (what matters for
    timing is the length), so encode_prompts runs exactly as in the pipeline."""

    def __init__(self, n: int, vocab_size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab_size, (n,), generator=g).tolist()
        self.pad_id = 0

    def encode(self, prompt: str) -> list[int]:
        return list(self.ids)


# ---------------------------------------------------------------------------------------------------------------
# The two jobs


class PackJob:
    def __init__(self, models: ZImageModels, device, memory: str = "keep"):
        self.pipe = ZImagePipeline(models, device, memory=memory)

    def encode(self, batch: int):
        return self.pipe.encode([f"prompt {i}" for i in range(batch)])

    def model(self):
        return self.pipe.models.dit

    def decode(self, latent):
        return self.pipe.decode(latent)


class CoreJob:
    """Core ComfyUI's modules doing the same job, called as ComfyUI's model wrappers call them."""

    def __init__(self, te: nn.Module, dit: nn.Module, decoder: nn.Module, tokens: FixedTokens, dtype, device):
        self.te, self.dit, self.decoder, self.tokens, self.dtype, self.device = te, dit, decoder, tokens, dtype, device

    def encode(self, batch: int):
        ids = torch.tensor([self.tokens.ids] * batch, device=self.device)
        mask = torch.ones_like(ids)
        # Z-Image's Qwen3_4BModel: layer "hidden", layer_idx -2, no final norm on it, attention mask on.
        _, hidden = self.te(ids, attention_mask=mask, intermediate_output=-2, final_layer_norm_intermediate=False,
                            dtype=self.dtype)
        return list(hidden)

    def model(self):
        dit, dtype = self.dit, self.dtype

        def u(x, t, captions):
            # model_base casts x and the context to the model dtype and passes sigma in fp32; NextDiT returns -u.
            context = torch.stack(captions).to(dtype)
            return -dit(x.to(dtype), 1.0 - t, context, num_tokens=context.shape[1]).float()
        return u

    def decode(self, latent):
        pixels = self.decoder(from_model_space(latent).to(self.dtype)).float()
        return (pixels / 2 + 0.5).clamp(0, 1).movedim(1, -1)


def run_job(job, batch: int, noise: torch.Tensor, sigmas: torch.Tensor, device) -> tuple[dict, dict]:
    """One text encode -> sample -> decode, each stage timed with its peak memory. Returns the timings and the
    stages' outputs."""
    cuda = torch.device(device).type == "cuda"
    out, state = {}, {}

    def stage(name, fn):
        if cuda:
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        seconds, value = time_once(fn, device)
        out[name] = {"seconds": seconds}
        if cuda:
            peak = torch.cuda.max_memory_allocated(device)
            out[name].update(peak_bytes=peak, working_bytes=peak - base)
        return value

    state["captions"] = stage("text encode", lambda: job.encode(batch))
    state["latent"] = stage("DiT", lambda: sample(job.model(), noise, sigmas, state["captions"], cfg=1.0))
    state["image"] = stage("VAE decode", lambda: job.decode(state["latent"]))
    out["end to end"] = {"seconds": sum(out[s]["seconds"] for s in STAGES[:3])}
    if cuda:
        out["end to end"]["peak_bytes"] = max(out[s]["peak_bytes"] for s in STAGES[:3])
    return out, state


def max_diff(a: dict, b: dict) -> dict:
    """Largest |difference| between the two jobs' outputs of each stage (the same job on the same weights)."""
    return {"captions": max((x.float() - y.float()).abs().max().item() for x, y in zip(a["captions"], b["captions"])),
            "latent": (a["latent"] - b["latent"]).abs().max().item(),
            "image": (a["image"] - b["image"]).abs().max().item()}


# ---------------------------------------------------------------------------------------------------------------


def dit_variant(name: str, dit: ZImageDiT) -> ZImageDiT:
    """The pack's DiT for one variant, holding `dit`'s tensors (fp8: a quantised copy of the block Linears)."""
    if name == PACK:
        return configure(dit, FAST)
    with torch.device("meta"):
        twin = ZImageDiT(dit.cfg)
    share_weights(twin, dit)
    if name == "pack-plain":
        return configure(twin, PLAIN)
    if name == "pack-fp8":
        converted = use_fp8_matmul(configure(twin, FAST))
        print(f"pack-fp8: {len(converted)} block Linears in fp8 matmul" if converted else
              "pack-fp8: this device has no fp8 matmul; blocks stored in fp8, computed in bf16 (weight-only)")
        return twin
    raise ValueError(f"unknown variant '{name}': choose from {', '.join(VARIANTS)}")


def build(setup: Setup, device, dtype, vae_dtype, with_core: bool, variants: tuple[str, ...] = (PACK,)):
    te = materialise_random(lambda: Qwen3Encoder(setup.text), device, dtype, seed=1)
    dit = materialise_random(lambda: ZImageDiT(setup.dit), device, dtype, seed=0)
    vae = materialise_random(lambda: AutoEncoder(setup.vae), device, vae_dtype, seed=2)
    tokens = FixedTokens(setup.caption_tokens, setup.text.vocab_size)
    packs = {name: PackJob(
        ZImageModels(dit_variant(name, dit), te, vae, tokens), device) for name in variants}
    if not with_core:
        return packs, None
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.model import Decoder
    from comfy.text_encoders.llama import Qwen3_4B
    t = setup.text
    with torch.device("meta"):
        core_te = Qwen3_4B(dict(vocab_size=t.vocab_size, hidden_size=t.hidden, intermediate_size=t.ffn_hidden,
                                num_hidden_layers=t.n_layers, num_attention_heads=t.n_heads,
                                num_key_value_heads=t.n_kv_heads, rms_norm_eps=t.norm_eps, rope_theta=t.rope_theta),
                           dtype, "meta", comfy.ops.disable_weight_init)
        core_dit = comfy_nextdit(setup.dit, device="meta", dtype=dtype)
        v = setup.vae
        core_dec = Decoder(ch=v.ch, out_ch=v.out_channels, ch_mult=list(v.ch_mult), num_res_blocks=v.num_res_blocks,
                           attn_resolutions=[], in_channels=v.in_channels, resolution=256, z_channels=v.z_channels)
    if core_te.model.config.head_dim != t.head_dim:
        raise RuntimeError(f"ComfyUI's Qwen3 has head_dim {core_te.model.config.head_dim}, ours {t.head_dim}")
    core = CoreJob(share_weights(core_te, te), share_weights(core_dit, dit), share_weights(core_dec, vae, "decoder."),
                   tokens, dtype, device)
    return packs, core


def vae_decode_flops(cfg: VAEConfig, batch: int, latent_h: int, latent_w: int) -> int:
    """Counted by torch's flop counter on a meta-device decoder (convolutions and the mid-block attention)."""
    with torch.device("meta"):
        decoder = AutoEncoder(cfg).decoder
        z = torch.empty(batch, cfg.z_channels, latent_h, latent_w)
        return flop_counter(lambda: decoder(z))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny configs and sizes; runs on CPU when no CUDA")
    parser.add_argument("--sizes", type=int, nargs="+", help="square image sizes in pixels (multiples of 16)")
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--runs", type=int, help="timed runs per job (median reported)")
    parser.add_argument("--caption-tokens", type=int, help="prompt length in tokens, template included")
    parser.add_argument("--no-core", action="store_true", help="skip core ComfyUI")
    parser.add_argument("--variants", nargs="+", default=[PACK, "pack-plain", "pack-fp8"], choices=VARIANTS,
                        help="pack variants to time")
    parser.add_argument("--memory", action="store_true", help="also run the pack under each memory policy")
    parser.add_argument("--memory-size", type=int, default=None, help="image size of the memory runs (1024)")
    args = parser.parse_args()
    if PACK not in args.variants:
        args.variants.insert(0, PACK)

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("bench/gpu.py needs a CUDA device and none is visible (torch.cuda.is_available() is False).\n"
              "Nothing measured. `--smoke` runs the same code on tiny configs on the CPU; bench/cpu_dit.py is the "
              "CPU benchmark.")
        return 0
    base = SMOKE if args.smoke else FULL
    setup = Setup(base.dit, base.text, base.vae, tuple(args.sizes or base.sizes), tuple(args.batches or base.batches),
                  args.steps or base.steps, args.caption_tokens or base.caption_tokens, args.runs or base.runs)
    for size in setup.sizes:
        if size % 16:
            parser.error(f"size {size} is not a multiple of 16")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    vae_dtype = dtype

    comfy_attention = None if args.no_core else import_comfy(cpu=not cuda)
    torch.manual_seed(0)
    peak = matmul_peak(device, n=None if not args.smoke else (4096 if cuda else 1024))
    print(f"{'smoke, ' if args.smoke else ''}{torch.cuda.get_device_name() if cuda else 'cpu'}: "
          f"{peak['dtype']} matmul peak {peak['flops_per_s'] / 1e12:.2f} TFLOP/s ({peak['n']}^3)"
          + (f"; ComfyUI attention: {comfy_attention}" if comfy_attention else ""))
    packs, core = build(setup, device, dtype, vae_dtype, with_core=not args.no_core, variants=tuple(args.variants))
    if cuda:
        print(f"weights resident: {fmt_gib(torch.cuda.memory_allocated(device))} GiB")
    jobs = dict(packs) if core is None else {**packs, CORE: core}

    results, rows, variant_rows = [], [], []
    sigmas = sigma_schedule(setup.steps)
    warm_sigmas = sigma_schedule(1)
    for size in setup.sizes:
        for batch in setup.batches:
            h = w = size // 8
            g = torch.Generator(device=device).manual_seed(size * 10 + batch)
            noise = torch.randn(batch, setup.dit.in_channels, h, w, device=device, generator=g)
            flops = {"text encode": text_encoder_flops(setup.text, setup.caption_tokens, batch),
                     "DiT": setup.steps * dit_flops(setup.dit, h, w, setup.caption_tokens, batch),
                     "VAE decode": vae_decode_flops(setup.vae, batch, h, w)}
            flops["end to end"] = sum(flops.values())
            runs = {name: [] for name in jobs}
            failed, warm = {}, {}
            with torch.inference_mode():
                for name, job in jobs.items():             # warm-up: the same job with one step
                    try:
                        warm[name] = run_job(job, batch, noise, warm_sigmas, device)[1]
                    except torch.cuda.OutOfMemoryError as e:
                        failed[name] = f"out of memory: {str(e).splitlines()[0]}"
                    if cuda:
                        torch.cuda.empty_cache()
                # one-step outputs of the warm-up, pack vs core; dropped before the timed runs (peak memory)
                agree = max_diff(warm[PACK], warm[CORE]) if PACK in warm and CORE in warm else None
                variant_agree = {name: max_diff(warm[name], warm[PACK]) for name in packs
                                 if name != PACK and name in warm and PACK in warm}
                del warm
                for _ in range(setup.runs):
                    for name, job in jobs.items():
                        if name in failed:
                            continue
                        try:
                            runs[name].append(run_job(job, batch, noise, sigmas, device)[0])
                        except torch.cuda.OutOfMemoryError as e:
                            failed[name] = f"out of memory: {str(e).splitlines()[0]}"
                        if cuda:
                            torch.cuda.empty_cache()
            entry = {"size": size, "batch": batch, "latent": [batch, setup.dit.in_channels, h, w],
                     "flops": flops, "failed": failed, "stages": {}}
            if agree is not None:
                entry["warmup_max_abs_diff"] = agree
            if variant_agree:
                entry["variants_max_abs_diff_vs_pack"] = variant_agree
            for stage in STAGES:
                per = {}
                for name in jobs:
                    if name in failed or not runs[name]:
                        continue
                    st = summary([r[stage]["seconds"] for r in runs[name]])
                    st["tflops_per_s"] = flops[stage] / st["median"] / 1e12
                    st["of_matmul_peak"] = flops[stage] / st["median"] / peak["flops_per_s"]
                    if cuda:
                        st["peak_bytes"] = max(r[stage]["peak_bytes"] for r in runs[name])
                        if "working_bytes" in runs[name][0][stage]:
                            st["working_bytes"] = max(r[stage]["working_bytes"] for r in runs[name])
                    if stage == "DiT":
                        st["steps_per_s"] = setup.steps / st["median"]
                    per[name] = st
                if PACK in per and CORE in per:
                    per["core_over_pack"] = per[CORE]["median"] / per[PACK]["median"]
                entry["stages"][stage] = per
                rows.append(table_row(size, batch, stage, per, cuda))
                if stage in ("DiT", "end to end"):
                    variant_rows.extend(variant_row(size, batch, stage, name, per, cuda) for name in packs
                                        if name in per)
            results.append(entry)
            done = entry["stages"]["end to end"]
            print(f"{size}² batch {batch}: end to end " + ", ".join(
                f"{name} {done[name]['median']:.3f} s" for name in jobs if name in done), flush=True)
            if failed:
                print(f"{size}² batch {batch}: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
            if "warmup_max_abs_diff" in entry:
                print(f"{size}² batch {batch}: pack vs core outputs (one-step job), max |diff|: "
                      + ", ".join(f"{k} {v:.2e}" for k, v in entry["warmup_max_abs_diff"].items()))

    print(f"\n{setup.steps} steps, cfg 1, {setup.caption_tokens}-token prompts, {str(dtype).replace('torch.', '')}, "
          f"median of {setup.runs}; TFLOP/s and '% pk' against the {peak['dtype']} matmul peak; "
          "core/pack > 1: the pack is faster")
    header = ["size", "B", "stage", "pack s", "core s", "core/pack", "steps/s", "pack TFLOP/s", "% pk",
              "core TFLOP/s"]
    if cuda:
        header += ["pack peak GiB", "core peak GiB"]
    print_table(header, rows)
    print("\npack variants (same weights): DiT and end to end; core/variant > 1: the variant is faster than core")
    print_table(["size", "B", "stage", "variant", "seconds", "steps/s", "TFLOP/s", "% pk", "core/variant"]
                + (["peak GiB"] if cuda else []), variant_rows)

    memory = None
    if args.memory:
        models = packs[PACK].pipe.models
        del packs, jobs, core                          # only the pack's own weights stay resident
        memory = memory_phase(models, setup, args.memory_size or (1024 if not args.smoke else setup.sizes[-1]),
                              device)
    write_result("gpu_smoke" if args.smoke else "gpu", {
        "setup": setup, "dtype": dtype, "comfyui": None if args.no_core else "0.30.0",
        "comfyui_attention": comfy_attention, "matmul_peak": peak, "variants": args.variants, "results": results,
        "memory_policies": memory}, device)
    return 0


def memory_phase(models: ZImageModels, setup: Setup, size: int, device) -> list[dict]:
    """The pack's job (batch 1) under each memory policy, then under swap and lowvram with the DiT's blocks in
    fp8 (the bf16 DiT moved off the device meanwhile): seconds and peak device memory per stage. Every part is
    put back on the device after each run."""
    cuda = torch.device(device).type == "cuda"
    h = w = size // 8
    noise = torch.randn(1, setup.dit.in_channels, h, w, device=device)
    out, rows = [], []

    def run(models: ZImageModels, policy: str, label: str) -> None:
        job = PackJob(models, device, memory=policy)
        with torch.inference_mode():
            run_job(job, 1, noise, sigma_schedule(1), device)                  # warm-up
            timings, _ = run_job(job, 1, noise, sigma_schedule(setup.steps), device)
        out.append({"policy": label, "size": size, "stages": timings})
        rows.append((label, f"{size}²") + tuple(f"{timings[s]['seconds']:.3f}" for s in STAGES)
                    + ((fmt_gib(timings["end to end"]["peak_bytes"]),
                        fmt_gib(timings["DiT"]["peak_bytes"])) if cuda else ()))
        job.pipe.close()
        for part in (models.dit, models.text_encoder, models.vae):
            part.to(device)
        if cuda:
            torch.cuda.empty_cache()

    for policy in POLICIES:
        run(models, policy, policy)
    fp8 = ZImageModels(dit_variant("pack-fp8", models.dit), models.text_encoder, models.vae, models.tokenizer)
    models.dit.to("cpu")                           # the fp8 copy shares only the small non-block tensors
    if cuda:
        torch.cuda.empty_cache()
    for policy in ("swap", "lowvram"):
        run(fp8, policy, f"{policy} + fp8")
    del fp8
    models.dit.to(device)
    print(f"\nmemory policies, {size}², batch 1, {setup.steps} steps (seconds per stage; peak = "
          "max_memory_allocated)")
    print_table(["policy", "size", *STAGES] + (["peak GiB", "DiT peak GiB"] if cuda else []), rows)
    return out


def variant_row(size: int, batch: int, stage: str, name: str, per: dict, cuda: bool) -> tuple:
    st, core = per[name], per.get(CORE)
    row = (f"{size}²", batch, stage, name, f"{st['median']:.3f}",
           f"{st['steps_per_s']:.2f}" if "steps_per_s" in st else "-", f"{st['tflops_per_s']:.3g}",
           f"{st['of_matmul_peak']:.0%}", f"{core['median'] / st['median']:.2f}" if core else "-")
    return row + ((fmt_gib(st["peak_bytes"]),) if cuda else ())


def table_row(size: int, batch: int, stage: str, per: dict, cuda: bool) -> tuple:
    p, c = per.get(PACK), per.get(CORE)

    def f(st, key, fmt):
        return fmt.format(st[key]) if st and key in st else "-"
    row = (f"{size}²", batch, stage, f(p, "median", "{:.3f}"), f(c, "median", "{:.3f}"),
           f(per, "core_over_pack", "{:.2f}"), f(p, "steps_per_s", "{:.2f}"), f(p, "tflops_per_s", "{:.3g}"),
           f(p, "of_matmul_peak", "{:.0%}"), f(c, "tflops_per_s", "{:.3g}"))
    if cuda:
        row += (fmt_gib(p["peak_bytes"]) if p else "-", fmt_gib(c["peak_bytes"]) if c else "-")
    return row


if __name__ == "__main__":
    sys.exit(main())
