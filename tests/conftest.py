"""Shared fixtures: random weights for tiny models, and access to the ComfyUI trees the runtime installed."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import comfy_tree  # noqa: E402

RUNTIME = comfy_tree.RUNTIME
SETUP_HINT = "run scripts/setup_runtime.sh (it installs the ComfyUI trees the tests compare against)"


def comfyui_tree(version: str = "0.30.0") -> Path:
    """The tree, or a skip that names the setup script (the tests' reference is missing, not wrong)."""
    try:
        return comfy_tree.comfyui_tree(version)
    except FileNotFoundError as e:
        pytest.skip(f"{e} ({SETUP_HINT})")


def tokenizer_dir() -> Path:
    return comfyui_tree() / "comfy" / "text_encoders" / "qwen25_tokenizer"


def import_comfy(version: str = "0.30.0") -> None:
    """Make ComfyUI's `comfy` package importable as a library, on the CPU."""
    comfyui_tree(version)                        # skips when missing
    comfy_tree.import_comfy(version, cpu=True)


def import_pack(submodule: str = "nodes"):
    """This repo imported as ComfyUI imports a custom node pack (comfy_tree.import_pack), ComfyUI on the CPU."""
    import_comfy()
    return comfy_tree.import_pack(submodule)


def randomize(module: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
    """Every parameter random (norm weights around 1), so no part of a parity test is trivially zero or one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            owner = name.rsplit(".", 2)[-2] if name.count(".") else ""
            p.copy_(1 + noise if "norm" in owner and name.endswith("weight") else noise)
    return module


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    """The tiny model's split files in fp32 (DiT, text encoder, VAE; zimage_core.synthetic), written once for
    the session: the tests read them and never write them."""
    from zimage_core import synthetic
    return synthetic.write_split_files(tmp_path_factory.mktemp("tiny_models"), dtype=torch.float32)


def released_like(module: torch.nn.Module, seed: int, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random bf16 weights with a (meta) module's names and shapes, std `std`, norm weights around 1: a file in a
    released layout, for models whose classes only core or diffusers builds (the Fun ControlNet's)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in module.state_dict().items():
        noise = torch.randn(t.shape, generator=g) * std
        out[name] = (1 + noise if "norm" in name and name.endswith("weight") else noise).to(torch.bfloat16)
    return out


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max abs error / max abs reference)."""
    diff = (ours.double() - ref.double()).abs().max().item()
    return diff, diff / ref.double().abs().max().item()


# Qwen3's chat template renders one user turn with enable_thinking=True as exactly this; ComfyUI's tokenizer
# copy carries Qwen2.5-VL's template (which adds a system turn), so the reference gets Qwen3's behaviour here.
QWEN3_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_diffusers_folder(folder: Path):
    """A tiny random diffusers ZImagePipeline saved by diffusers itself (sharded transformer, index json,
    text_encoder/, vae/, tokenizer/, scheduler/). Returns the pipeline."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model
    from zimage_core.synthetic import TINY_TEXT

    torch.manual_seed(0)
    tokenizer = Qwen2Tokenizer.from_pretrained(tokenizer_dir())
    tokenizer.chat_template = QWEN3_TEMPLATE
    te_cfg = Qwen3Config(vocab_size=TINY_TEXT.vocab_size, hidden_size=TINY_TEXT.hidden, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=64,
                         rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=1024)
    text_encoder = randomize(Qwen3Model(te_cfg), seed=1, std=0.2).eval()
    transformer = randomize(ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2, n_refiner_layers=1,
        n_heads=4, n_kv_heads=4, cap_feat_dim=TINY_TEXT.hidden, axes_dims=[4, 6, 6], axes_lens=[1536, 512, 512]),
        seed=2).eval()
    vae = randomize(AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
        shift_factor=0.1159), seed=3, std=0.05).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
    pipe.save_pretrained(folder, max_shard_size="100KB")       # shards + index json, as the release has
    return pipe



# ---- test tiers ---------------------------------------------------------------------------------------------
# Each test is marked from what it (or any fixture it uses) starts or reads, so `-m fast` runs the in-process
# tests alone: bash scripts/test.sh -m fast. The full suite (README's test command, CI) runs every tier.
TIERS = {
    "server": ("ComfyServer(", "scripts/demo.sh", "pack_and_core(", "started_server(", "http://127.0.0.1"),  # ComfyUI
    "browser": ("playwright", "chromium"),                                 # the real frontend in Chromium
    "queue": ("redis", "Redis", "celery", "cluster"),                      # Redis, Celery workers
    "reference": ("diffusers", "transformers"),                           # diffusers / transformers references
    "slow": ("fixture_files(", "wide_quantized(", "write_hollow", "full_size", "TURBO)", "released_like(",
             "bench/", '"bench"', "soak", "_dynamo", "survey"),             # GB-sized files, compiles, benchmarks
}


def _source(obj) -> str:
    import inspect
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def _used_sources(item) -> str:
    """The test's own source and every fixture's in its closure (those this repo defines)."""
    parts = [_source(getattr(item, "function", None))]
    for defs in getattr(item, "_fixtureinfo").name2fixturedefs.values():
        for d in defs:
            if str(REPO) in str(getattr(d.func, "__code__", None) and d.func.__code__.co_filename):
                parts.append(_source(d.func))
    return "\n".join(parts)


def pytest_configure(config):
    for tier in (*TIERS, "fast"):
        config.addinivalue_line("markers", f"{tier}: set by conftest.py from what the test uses")


def pytest_collection_modifyitems(config, items):
    for item in items:
        used = _used_sources(item)
        tiers = [t for t, needles in TIERS.items() if any(n in used for n in needles)]
        for tier in tiers or ["fast"]:
            item.add_marker(getattr(pytest.mark, tier))
