"""CPU benchmark: one DiT forward of a reduced Z-Image config through the pack (zimage_core.ZImageDiT), core
ComfyUI 0.30.0's NextDiT and diffusers' ZImageTransformer2DModel, all three holding the same random fp32 weights,
in one process. Runs are interleaved (one call of each model per round) so machine drift hits all alike.
Prints a table of medians and writes JSON to bench/results/.

    .runtime/venv/bin/python -m bench.cpu_dit [--sizes 256 512] [--runs 5] [--threads N] [--dtype fp32 bf16]
                                              [--profile]

The pack runs twice: with its fast path (fastpath.FAST) and with the plain path.
With several dtypes, each dtype is a separate table: all implementations run in that dtype (bf16 uses the
CPU's AMX/AVX512-BF16 units where it has them).

Core ComfyUI is timed twice: with the attention it picks on a CPU (sub-quadratic, as shipped) and with
`--use-pytorch-cross-attention`'s choice (torch SDPA, the kernel the pack and diffusers use).
"""
from __future__ import annotations

import argparse
import os

import torch

from bench.common import (dit_flops, dit_token_counts, fmt_ms, import_comfy, matmul_peak,
                          print_table, randomize_, share_weights, summary, time_once, write_result)
from zimage_dev.comfy_tree import comfy_nextdit
from zimage_core.config import DiTConfig
from zimage_core.dit import ZImageDiT
from zimage_core.fastpath import FAST, PLAIN, configure
from zimage_core.keys import dit_from_diffusers

# Reduced but proportioned like Turbo: head_dim 128 and RoPE (32, 48, 48), ffn int(dim / 3 * 8), adaLN 256, the
# real caption width. dim 1024 is the smallest where all three agree on the timestep MLP (diffusers hard-codes
# a hidden width of 1024, ComfyUI uses min(dim, 1024)), so the three really hold the same weights.
REDUCED = DiTConfig(dim=1024, n_layers=4, n_noise_refiner=1, n_context_refiner=1, n_heads=8, ffn_hidden=2730,
                    cap_feat_dim=2560, adaln_dim=256, t_embed_hidden=1024)
CAPTION_TOKENS = 77
PACK, PACK_PLAIN = "pack (fast path)", "pack (plain path)"
CORE, CORE_SDPA, DIFFUSERS = "ComfyUI core NextDiT", "ComfyUI core, torch SDPA", "diffusers"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_models(cfg: DiTConfig, seed: int = 0):
    """diffusers' model with random weights; ours and ComfyUI's with exactly those weights (ours by the pack's
    key mapping, ComfyUI's by sharing ours' tensors: our layout is ComfyUI's)."""
    from diffusers import ZImageTransformer2DModel
    ref = ZImageTransformer2DModel(
        all_patch_size=(cfg.patch_size,), all_f_patch_size=(1,), in_channels=cfg.in_channels, dim=cfg.dim,
        n_layers=cfg.n_layers, n_refiner_layers=cfg.n_noise_refiner, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads,
        cap_feat_dim=cfg.cap_feat_dim, axes_dims=list(cfg.axes_dims), axes_lens=list(cfg.axes_lens),
        rope_theta=cfg.rope_theta, t_scale=cfg.t_scale)
    randomize_(ref, seed)
    sd = dit_from_diffusers(ref.state_dict(), fuse=lambda parts: torch.cat(parts))
    ours = ZImageDiT(DiTConfig.from_shapes({k: v.shape for k, v in sd.items()}))
    if ours.cfg != cfg:
        raise RuntimeError(f"diffusers built another config than asked for: {ours.cfg} != {cfg}")
    ours.load_state_dict(sd, strict=True)
    ours.eval().requires_grad_(False)
    with torch.device("meta"):
        core = comfy_nextdit(cfg, device="meta")
    share_weights(core, ours)
    return ours, core, ref


def use_comfy_sdpa(on: bool) -> None:
    """Switch the attention core ComfyUI's Lumina/Z-Image model calls (bound at its import)."""
    import comfy.ldm.lumina.model as lumina
    import comfy.ldm.modules.attention as attention
    if not hasattr(lumina, "_bench_default_attention"):
        lumina._bench_default_attention = lumina.optimized_attention_masked
    lumina.optimized_attention_masked = attention.attention_pytorch if on else lumina._bench_default_attention


def profile_forward(fn, top: int = 15) -> list[dict]:
    """Top ops of one call by self CPU time."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    rows = [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1000,
             "share": e.self_cpu_time_total / total} for e in events[:top]]
    print(f"\nprofile of one pack forward (self CPU time, total {total / 1000:.1f} ms)")
    print_table(["op", "calls", "self ms", "share"],
                [(r["op"], r["calls"], f"{r['self_ms']:.1f}", f"{r['share']:.1%}") for r in rows])
    return rows


def twin(model: ZImageDiT) -> ZImageDiT:
    """A second DiT over the same tensors (for the plain path next to the fast one)."""
    with torch.device("meta"):
        other = ZImageDiT(model.cfg)
    return share_weights(other, model)


def bench_dtype(cfg: DiTConfig, dtype: torch.dtype, args, peak: dict) -> tuple[list[dict], list[tuple]]:
    """All implementations in `dtype`, interleaved per size. Returns result entries and table rows."""
    ours, core, ref = build_models(cfg)
    for model in (ours, core, ref):
        model.to(dtype)
    plain = configure(twin(ours), PLAIN)
    configure(ours, FAST)
    results, rows = [], []
    for size in args.sizes:
        h = w = size // 8
        g = torch.Generator().manual_seed(size)
        x = torch.randn(1, cfg.in_channels, h, w, generator=g).to(dtype)
        cap = torch.randn(1, CAPTION_TOKENS, cfg.cap_feat_dim, generator=g).to(dtype)
        t = torch.tensor([0.4])
        flops = dit_flops(cfg, h, w, CAPTION_TOKENS)
        n_img, n_cap = dit_token_counts(cfg, h, w, CAPTION_TOKENS)

        def comfy(sdpa: bool):
            def call():
                use_comfy_sdpa(sdpa)
                return core(x, 1 - t, cap, num_tokens=CAPTION_TOKENS)   # ComfyUI takes sigma and returns -u
            return call

        calls = {PACK: lambda: ours(x, t, [cap[0]]), PACK_PLAIN: lambda: plain(x, t, [cap[0]]),
                 CORE: comfy(False), CORE_SDPA: comfy(True),
                 DIFFUSERS: lambda: ref([x[0].unsqueeze(1)], t, [cap[0]], return_dict=False)}
        times = {name: [] for name in calls}
        with torch.inference_mode():
            outputs = {name: fn() for name, fn in calls.items()}
            for _ in range(args.warmup - 1):
                for fn in calls.values():
                    fn()
            for _ in range(args.runs):
                for name, fn in calls.items():
                    times[name].append(time_once(fn, "cpu")[0])
        use_comfy_sdpa(False)
        u = outputs[PACK].float()
        agree = {PACK_PLAIN: (u - outputs[PACK_PLAIN].float()).abs().max().item(),
                 CORE: (u + outputs[CORE].float()).abs().max().item(),
                 CORE_SDPA: (u + outputs[CORE_SDPA].float()).abs().max().item(),
                 DIFFUSERS: (u - torch.stack(outputs[DIFFUSERS][0]).squeeze(2).float()).abs().max().item()}
        stats = {name: summary(ts) for name, ts in times.items()}
        pack_s = stats[PACK]["median"]
        name_of = str(dtype).replace("torch.", "")
        for name, st in stats.items():
            rate = flops / st["median"]
            rows.append((name_of, f"{size}²", name, fmt_ms(st["median"]), fmt_ms(st["min"]), f"{rate / 1e9:.1f}",
                         f"{rate / peak['flops_per_s']:.0%}", f"{pack_s / st['median']:.2f}"))
        results.append({"dtype": name_of, "size": size, "latent": [1, cfg.in_channels, h, w],
                        "image_tokens": n_img, "caption_tokens": CAPTION_TOKENS, "caption_tokens_padded": n_cap,
                        "flops": flops, "seconds": stats, "max_abs_diff_to_pack": agree,
                        "pack_over": {name: pack_s / st["median"] for name, st in stats.items() if name != PACK}})
    return results, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sizes in pixels (square)")
    parser.add_argument("--runs", type=int, default=7, help="timed calls per model and size (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--profile", action="store_true", help="also profile one pack forward at the last size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    comfy_attention = import_comfy(cpu=True)
    cfg = REDUCED
    peak = matmul_peak("cpu")
    print(f"fp32 matmul peak: {peak['flops_per_s'] / 1e9:.1f} GFLOP/s ({peak['n']}^3), {args.threads} threads; "
          f"ComfyUI's CPU attention: {comfy_attention}")

    results, rows = [], []
    for name in args.dtype:
        r, w = bench_dtype(cfg, DTYPES[name], args, peak)
        results += r
        rows += w

    print(f"\none DiT forward: dim {cfg.dim}, {cfg.n_heads} heads of {cfg.head_dim}, {cfg.n_layers}+"
          f"{cfg.n_noise_refiner}+{cfg.n_context_refiner} blocks, {CAPTION_TOKENS} caption tokens, batch 1, "
          f"{args.threads} threads, median of {args.runs} after {args.warmup} warm-up (interleaved); GFLOP/s "
          "against the fp32 matmul peak")
    print_table(["dtype", "size", "implementation", "median ms", "min ms", "GFLOP/s", "of fp32 peak", "pack / this"],
                rows)
    print("pack / this < 1: the pack is faster. Outputs agree to (max |diff| vs pack): " + "; ".join(
        f"{r['dtype']} {r['size']}²: " + ", ".join(f"{k} {v:.1e}" for k, v in r["max_abs_diff_to_pack"].items())
        for r in results))
    for r in results:
        po = r["pack_over"]
        print(f"{r['dtype']} {r['size']}²: pack/core {po[CORE]:.2f} (core with SDPA {po[CORE_SDPA]:.2f}), "
              f"pack/diffusers {po[DIFFUSERS]:.2f}, fast/plain {po[PACK_PLAIN]:.2f}")

    profile = None
    if args.profile:
        size = args.sizes[-1]
        ours = configure(build_models(cfg)[0].to(DTYPES[args.dtype[-1]]), FAST)
        x = torch.randn(1, cfg.in_channels, size // 8, size // 8).to(DTYPES[args.dtype[-1]])
        cap = torch.randn(CAPTION_TOKENS, cfg.cap_feat_dim).to(DTYPES[args.dtype[-1]])
        with torch.inference_mode():
            profile = profile_forward(lambda: ours(x, torch.tensor([0.4]), [cap]))

    write_result("cpu_dit", {"config": cfg, "threads": args.threads, "runs": args.runs, "warmup": args.warmup,
                             "dtypes": args.dtype, "comfyui": "0.30.0", "comfyui_cpu_attention": comfy_attention,
                             "matmul_peak": peak, "results": results, "profile": profile}, "cpu")


if __name__ == "__main__":
    main()
