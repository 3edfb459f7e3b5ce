"""Shared benchmark helpers: timing, FLOP counts, a matmul peak, random weights on the target device, ComfyUI
import, tables and result files."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from zimage_dev import REPO, comfy_tree
from zimage_core.config import DiTConfig
from zimage_core.text_encoder import Qwen3Config

# ZIMAGE_BENCH_RESULTS redirects the JSON files (the README test runs the benchmarks without adding results)
RESULTS = Path(os.environ.get("ZIMAGE_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


# ---------------------------------------------------------------------------------------------------------------
# Timing


def sync(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def time_once(fn: Callable[[], object], device=None) -> tuple[float, object]:
    """Seconds of one call (the device synchronised before and after) and what it returned."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def timed(fn: Callable[[], object], runs: int = 7, warmup: int = 2, device=None) -> dict:
    """`warmup` untimed calls, then `runs` timed ones: {'median', 'min', 'max', 'times'} in seconds."""
    for _ in range(warmup):
        fn()
    times = [time_once(fn, device)[0] for _ in range(runs)]
    return summary(times)


def summary(times: list[float]) -> dict:
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "times": times}


def median_seconds(fn: Callable[[], object], runs: int = 7, warmup: int = 2) -> float:
    return timed(fn, runs, warmup)["median"]


# ---------------------------------------------------------------------------------------------------------------
# FLOP counts (multiply-add = 2 FLOP). Written from the architecture; `flop_counter` cross-checks them.


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def block_flops(tokens: int, dim: int, ffn_hidden: int) -> int:
    """One DiT block on one run of `tokens` tokens: qkv + out + SwiGLU (three matrices) + attention."""
    linear = 2 * tokens * (dim * 3 * dim + dim * dim + 3 * dim * ffn_hidden)
    attention = 4 * tokens * tokens * dim          # QK^T and PV, every head together
    return linear + attention


def dit_token_counts(cfg: DiTConfig, latent_h: int, latent_w: int, caption_tokens: int) -> tuple[int, int]:
    """(image tokens, caption tokens) after patching and padding each run to cfg.seq_multiple."""
    n_img = (latent_h // cfg.patch_size) * (latent_w // cfg.patch_size)
    return round_up(n_img, cfg.seq_multiple), round_up(caption_tokens, cfg.seq_multiple)


def dit_flops(cfg: DiTConfig, latent_h: int, latent_w: int, caption_tokens: int, batch: int = 1) -> int:
    """FLOP of one ZImageDiT forward: the noise refiner on the image tokens, the context refiner on the caption
    tokens, the main layers on both joined; plus embedders, adaLN and the final layer. Padded lengths count
    (they are computed); all captions are taken to have `caption_tokens` tokens."""
    n_img, n_cap = dit_token_counts(cfg, latent_h, latent_w, caption_tokens)
    n_real_img = (latent_h // cfg.patch_size) * (latent_w // cfg.patch_size)
    d = cfg.dim
    per_sample = (cfg.n_noise_refiner * block_flops(n_img, d, cfg.ffn_hidden)
                  + cfg.n_context_refiner * block_flops(n_cap, d, cfg.ffn_hidden)
                  + cfg.n_layers * block_flops(n_img + n_cap, d, cfg.ffn_hidden))
    per_sample += 2 * n_real_img * cfg.patch_dim * d                       # x_embedder
    per_sample += 2 * caption_tokens * cfg.cap_feat_dim * d                # cap_embedder (before padding)
    per_sample += 2 * n_real_img * d * cfg.patch_dim                       # final linear, image tokens only
    per_sample += 2 * (cfg.t_freq_dim * cfg.t_embed_hidden + cfg.t_embed_hidden * cfg.adaln_dim)
    per_sample += 2 * cfg.adaln_dim * 4 * d * (cfg.n_noise_refiner + cfg.n_layers)
    per_sample += 2 * cfg.adaln_dim * d                                    # final adaLN
    return batch * per_sample


def text_encoder_flops(cfg: Qwen3Config, tokens: int, batch: int = 1, layers: int | None = None) -> int:
    """FLOP of the Qwen3 encoder over `tokens` tokens, running `layers` decoder layers (ours: n_layers - 1, the
    caption features are the second-to-last hidden state). Attention counted in full (4 L^2 d), as the
    masked kernels compute it."""
    layers = cfg.n_layers - 1 if layers is None else layers
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    linear = 2 * tokens * (cfg.hidden * (q + 2 * kv) + q * cfg.hidden + 3 * cfg.hidden * cfg.ffn_hidden)
    attention = 4 * tokens * tokens * q
    return batch * layers * (linear + attention)


def flop_counter(fn: Callable[[], object]) -> int:
    """FLOP of one call as torch.utils.flop_counter counts them (matmuls, convolutions, SDPA)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------------------------
# Matmul peak


def matmul_peak(device: torch.device | str, dtype: torch.dtype | None = None, n: int | None = None,
                runs: int = 5) -> dict:
    """Achieved FLOP/s of one square n x n @ n x n matmul, the best of `runs` timed batches: the 'peak' the
    model's FLOP/s are compared with. bf16 8192^3 on CUDA, fp32 1536^3 on CPU unless told otherwise."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    n = n or (8192 if cuda else 1536)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if cuda else 3
    best = float("inf")
    for i in range(runs + 1):
        seconds, _ = time_once(lambda: [a @ b for _ in range(reps)], device)
        if i:                                       # the first batch is warm-up
            best = min(best, seconds / reps)
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "seconds": best, "flops_per_s": 2 * n ** 3 / best}


# ---------------------------------------------------------------------------------------------------------------
# Random weights made where they run


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Fill every floating tensor of `model` in place, on its own device: N(0, std), and 1 + N(0, std) for the
    weights of norm layers (any module whose class name has 'Norm'), so activations keep their scale."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    for module in model.modules():
        is_norm = "Norm" in type(module).__name__
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if not t.dtype.is_floating_point:
                continue
            t.normal_(0.0, std, generator=g)
            if is_norm and name == "weight":
                t.add_(1.0)
    return model.eval().requires_grad_(False)


def materialise_random(factory: Callable[[], nn.Module], device, dtype: torch.dtype, seed: int = 0,
                       std: float = 0.02) -> nn.Module:
    """Build `factory()` on the meta device, allocate it once on `device` in `dtype` (to_empty) and fill it in
    place (`randomize_`). No host copy: a 12 GB bf16 DiT costs 12 GB of device memory and nothing on the host."""
    with torch.device("meta"):
        model = factory().to(dtype)              # free on meta; to_empty then allocates in the target dtype
    return randomize_(model.to_empty(device=device), seed, std)


# ---------------------------------------------------------------------------------------------------------------
# ComfyUI as a library


def import_comfy(version: str = "0.30.0", cpu: bool | None = None) -> str:
    """comfy_tree.import_comfy, with a missing tree reported as a script's error."""
    try:
        return comfy_tree.import_comfy(version, cpu)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None


def share_weights(target: nn.Module, source: nn.Module, prefix: str = "") -> nn.Module:
    """Load `source`'s tensors (keys under `prefix`, prefix stripped) into `target` by reference: the two models
    then hold one copy of the weights between them. Strict: every key of `target` must be covered."""
    sd = {k[len(prefix):]: v for k, v in source.state_dict().items() if k.startswith(prefix)}
    missing, unexpected = target.load_state_dict(sd, strict=False, assign=True)
    if missing:
        raise RuntimeError(f"{type(target).__name__}: no weights for {missing[:5]} ({len(missing)} keys)")
    meta = [n for n, t in list(target.named_parameters()) + list(target.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"{type(target).__name__}: tensors left on the meta device: {meta[:5]}")
    return target.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------
# Output


def print_table(header: list[str], rows: list[tuple]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = "  ".join("{:<%d}" % w for w in widths)
    print(line.format(*header))
    print(line.format(*("-" * w for w in widths)))
    for row in rows:
        print(line.format(*(str(c) for c in row)))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device | str | None = None) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "cpu": cpu_name(), "torch_threads": torch.get_num_threads()}
    if device is not None and torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({"device_name": props.name, "device_memory_gib": round(props.total_memory / 2 ** 30, 1),
                     "cuda": torch.version.cuda})
    else:
        info["device_name"] = "cpu"
    try:
        import diffusers
        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    ck = sys.modules.get("comfy_kitchen")        # core ComfyUI's fused kernels: which backends it had matters
    if ck is not None and hasattr(ck, "list_backends"):
        info["comfy_kitchen_backends"] = {
            name: {k: state.get(k) for k in ("available", "disabled", "unavailable_reason")}
            if isinstance(state, dict) else str(state) for name, state in ck.list_backends().items()}
    return info


def _plain(x):
    if is_dataclass(x):
        return asdict(x)
    if isinstance(x, torch.dtype):
        return str(x).replace("torch.", "")
    return str(x)


def write_result(name: str, data: dict, device: torch.device | str = "cpu") -> Path:
    """bench/results/<name>-<device>-<UTC date and time>.json, with the machine's description."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"{name}-{device.type}-{stamp}.json"
    path.write_text(json.dumps({"machine": machine(device), **data}, indent=2, default=_plain))
    print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return path


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def fmt_gib(n_bytes: float) -> str:
    return f"{n_bytes / 2 ** 30:.2f}"
