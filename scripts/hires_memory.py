"""GPU memory of example_workflows/zimage_turbo_hires_2x on a 12 GB card, without a GPU: what ComfyUI's own
accounting reserves per stage, which load it then picks for the DiT (whole, or part resident and the rest
streamed), and the activations counted on the meta device (bench/meta_memory.py: every tensor's bytes while it
lives, attention as the fused GPU kernels compute it; a floor, kernel workspaces and allocator rounding are not
in it). Nothing here is measured on a GPU. docs/hires.md states these numbers; tests/test_example_workflows.py
recomputes them and compares.

    .runtime/venv/bin/python -m scripts.hires_memory
"""
from __future__ import annotations



GIB = 2 ** 30
MIB = 2 ** 20
CARD = 12 * GIB                 # a "12 GB" card (RTX 3060 12G / 4070 / 4070 Ti): 12 GiB
CONTEXT = 0.5 * GIB             # assumed: CUDA context, cuDNN/cuBLAS handles and a desktop; free = CARD - CONTEXT
CAPTION_TOKENS = 128            # a long prompt (the example's is ~40 tokens)
TILE = 512                      # the workflow's VAEEncodeTiled / VAEDecodeTiled tile_size, pixels


def comfy_rules(version: str = "0.30.0"):
    """ComfyUI's own constants, read from the tree (model_management on an NVIDIA card, Linux)."""
    from zimage_dev import comfy_tree
    comfy_tree.import_comfy(version, cpu=True)
    import comfy.model_management as mm
    return {"extra_reserved": mm.extra_reserved_memory(), "minimum_inference": mm.minimum_inference_memory(),
            "min_weight_ratio_nvidia": 0.0}


def reservation(size: int, factor: float, batch: int = 1, dtype_size: int = 2) -> float:
    """model.memory_required() as ComfyUI computes it with flash/pytorch attention (model_base.BaseModel):
    latent area x dtype size x 0.01 x memory_usage_factor MiB."""
    area = batch * (size // 8) ** 2
    return area * dtype_size * 0.01 * factor * MIB


def resident_budget(free: float, memory_required: float, rules: dict) -> float:
    """load_models_gpu's room for a model's weights (model_management.py, 0.3.75 L687-693, 0.30.0 L982-991):
    max(0, free - max(minimum_inference, memory_required + extra_reserved), min(free * ratio, free -
    minimum_inference)), ratio 0 on NVIDIA. A model larger than this is loaded in part, the rest streamed."""
    minimum = max(rules["minimum_inference"], memory_required + rules["extra_reserved"])
    return max(0.0, free - minimum, min(free * rules["min_weight_ratio_nvidia"], free - rules["minimum_inference"]))


def vae_estimates(size: int, tile: int = TILE, dtype_size: int = 2) -> dict:
    """ComfyUI's VAE (Flux AE, AutoencoderKL branch of comfy.sd.VAE) estimates, NVIDIA (ratio 1.0):
    decode 2178 x latent area x 64 x dtype size, encode 1767 x pixel area x dtype size."""
    lat, lat_tile = size // 8, tile // 8
    return {"decode_whole": 2178 * lat * lat * 64 * dtype_size, "decode_tile": 2178 * lat_tile * lat_tile * 64 * dtype_size,
            "encode_whole": 1767 * size * size * dtype_size, "encode_tile": 1767 * tile * tile * dtype_size}


def counted(sizes=(1024, 2048), tile: int = TILE) -> dict:
    """Activation peaks counted on the meta device: the loaders' MODEL (core's NextDiT at Turbo size) for one
    forward at each size, bf16; the Flux AE decoder (the pack's engine, core's architecture) whole and on one
    tile; Qwen3-4B encoding CAPTION_TOKENS tokens. Weights: the modules' parameter bytes."""
    from zimage_dev import comfy_tree
    comfy_tree.import_comfy("0.30.0", cpu=True)
    core_model = comfy_tree.import_pack("nodes.core_model")
    import comfy.ldm.lumina.model as lumina
    import comfy.ldm.modules.attention as attention
    import comfy.ops
    original = lumina.optimized_attention_masked
    lumina.optimized_attention_masked = attention.attention_pytorch          # as on a GPU (sdpa)
    try:
        return _count(sizes, tile, dit_parts=(lumina, comfy.ops, core_model))
    finally:
        lumina.optimized_attention_masked = original


def _count(sizes, tile, dit_parts) -> dict:
    import torch
    from bench.meta_memory import param_bytes, peak_bytes
    from zimage_core.config import TURBO
    from zimage_core.text_encoder import QWEN3_4B, Qwen3Encoder
    from zimage_core.vae import FLUX_AE, AutoEncoder
    lumina, ops, core_model = dit_parts
    bf16 = torch.bfloat16
    with torch.device("meta"):
        dit = lumina.NextDiT(**core_model.unet_config(TURBO), device="meta", dtype=bf16,
                             operations=ops.disable_weight_init)
        vae = AutoEncoder(FLUX_AE).to(bf16).eval()
        te = Qwen3Encoder(QWEN3_4B).to(bf16).eval()
    linear = sum(m.weight.numel() for m in dit.modules() if isinstance(m, torch.nn.Linear))
    out = {"weights": {"dit_bf16": param_bytes(dit), "dit_fp8": param_bytes(dit) - linear,   # Linear weights 1 byte
                       "vae": param_bytes(vae), "text_encoder": param_bytes(te)},
           "memory_usage_factor": core_model.MEMORY_USAGE_FACTOR, "dit": {}, "vae_decode": {}}
    ctx = torch.empty(1, CAPTION_TOKENS, TURBO.cap_feat_dim, device="meta", dtype=bf16)
    for size in sizes:
        x = torch.empty(1, TURBO.in_channels, size // 8, size // 8, device="meta", dtype=bf16)
        out["dit"][size] = peak_bytes(lambda: dit(x, torch.empty(1, device="meta"), ctx, num_tokens=CAPTION_TOKENS))
    for name, side in (("whole_2048", 2048 // 8), ("tile", tile // 8)):
        z = torch.empty(1, FLUX_AE.z_channels, side, side, device="meta", dtype=bf16)
        out["vae_decode"][name] = peak_bytes(lambda: vae.decode(z))
    ids = torch.zeros(1, CAPTION_TOKENS, dtype=torch.long, device="meta")
    out["text_encode"] = peak_bytes(lambda: te(ids, torch.ones_like(ids, dtype=torch.bool)))
    return out


def figures() -> dict:
    """Per stage of the hires workflow on the 12 GB card: ComfyUI's reservation, the DiT bytes it keeps
    resident (bf16 and fp8 weights), counted activations and the peak (resident weights + activations)."""
    rules, c = comfy_rules(), counted()
    free = CARD - CONTEXT
    w, factor = c["weights"], c["memory_usage_factor"]
    vae = vae_estimates(2048)
    stages = {}
    for size, stage in ((1024, "pass 1 (1024²)"), (2048, "pass 2 (2048²)")):
        need = reservation(size, factor)
        budget = resident_budget(free, need, rules)
        row = {"reserved": need, "budget": budget, "activations": c["dit"][size]}
        for dtype in ("bf16", "fp8"):
            size_w = w[f"dit_{dtype}"]
            resident = min(size_w, budget)
            row[dtype] = {"resident": resident, "streamed": size_w - resident, "full": size_w <= budget,
                          "peak": resident + w["vae"] + c["dit"][size]}
        stages[stage] = row
    return {"card": CARD, "free": free, "rules": rules, "weights": w, "factor": factor, "stages": stages,
            "vae": {**vae, "counted_whole_2048": c["vae_decode"]["whole_2048"], "counted_tile": c["vae_decode"]["tile"],
                    "tiled_peak": w["vae"] + c["vae_decode"]["tile"]},
            "text_encode": {"activations": c["text_encode"], "peak": w["text_encoder"] + c["text_encode"]}}


def gib(b: float) -> str:
    return f"{b / GIB:.2f}"


def tables(f: dict) -> list[str]:
    """The rows docs/hires.md states (GiB, two decimals), built from figures(): the test compares them."""
    w, v = f["weights"], f["vae"]
    rows = [f"| weights | {gib(w['dit_bf16'])} | {gib(w['dit_fp8'])} | {gib(w['text_encoder'])} | {gib(w['vae'])} |"]
    for stage, r in f["stages"].items():
        rows.append(f"| {stage} | {gib(r['reserved'])} | {gib(r['budget'])} | {gib(r['activations'])} | "
                    f"{gib(r['bf16']['resident'])} + {gib(r['bf16']['streamed'])} streamed | {gib(r['bf16']['peak'])} | "
                    f"{gib(r['fp8']['resident'])} ({'whole' if r['fp8']['full'] else 'part'}) | {gib(r['fp8']['peak'])} |")
    rows.append(f"| VAE decode 2048² | {gib(v['decode_whole'])} | {gib(v['decode_tile'])} | "
                f"{gib(v['counted_whole_2048'])} | {gib(v['counted_tile'])} | {gib(v['tiled_peak'])} |")
    rows.append(f"| VAE encode 2048² | {gib(v['encode_whole'])} | {gib(v['encode_tile'])} | not counted | not counted | |")
    rows.append(f"| text encode | {gib(f['text_encode']['activations'])} | {gib(f['text_encode']['peak'])} |")
    return rows


def main() -> None:
    f = figures()
    g = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    print(f"card {g(f['card'])} GiB, free {g(f['free'])} GiB; weights: " +
          ", ".join(f"{k} {g(v)} GiB" for k, v in f["weights"].items()))
    for stage, row in f["stages"].items():
        print(f"{stage}: reserved {g(row['reserved'])}, weight budget {g(row['budget'])}, activations "
              f"{g(row['activations'])}; bf16 resident {g(row['bf16']['resident'])} streamed "
              f"{g(row['bf16']['streamed'])} peak {g(row['bf16']['peak'])}; fp8 resident {g(row['fp8']['resident'])} "
              f"full {row['fp8']['full']} peak {g(row['fp8']['peak'])}")
    print("vae: " + ", ".join(f"{k} {g(v)}" for k, v in f["vae"].items()))
    print("text encode: " + ", ".join(f"{k} {g(v)}" for k, v in f["text_encode"].items()))
    print("\n".join(tables(f)))


if __name__ == "__main__":
    main()
