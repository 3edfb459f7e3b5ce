"""The session's shared fixtures and the test tiers. Helpers the tests import live in zimage_dev/ (the harness)."""
from __future__ import annotations

import pytest
import torch

from zimage_dev import REPO


@pytest.fixture(scope="module", params=["0.30.0", "0.3.75"])
def server(request, tmp_path_factory):
    """A real ComfyUI of each version with the pack and the tiny models, one per test module; a module that needs
    other files defines its own `server`."""
    from zimage_dev.comfy_server import ComfyServer, write_tiny_models
    from zimage_dev.runtime import comfyui_tree
    comfyui_tree(request.param)
    base = tmp_path_factory.mktemp(f"comfy-{request.param}")
    write_tiny_models(base / "models")
    with ComfyServer(request.param, base) as srv:
        yield srv


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    """The tiny model's split files in fp32 (DiT, text encoder, VAE; zimage_dev.synthetic), written once for
    the session: the tests read them and never write them."""
    from zimage_dev import synthetic
    return synthetic.write_split_files(tmp_path_factory.mktemp("tiny_models"), dtype=torch.float32)


# ---- test tiers ---------------------------------------------------------------------------------------------
# Each test is marked from what it (or any fixture it uses) starts or reads, so `-m fast` runs the in-process
# tests alone: bash scripts/test.sh -m fast. The full suite (README's test command, CI) runs every tier.
TIERS = {
    "server": ("ComfyServer(", "scripts/demo.sh", "pack_and_core(", "started_server(", "http://127.0.0.1"),  # ComfyUI
    "browser": ("playwright", "chromium"),                                 # the real frontend in Chromium
    "queue": ("redis", "Redis", "celery", "cluster"),                      # Redis, Celery workers
    "reference": ("diffusers", "transformers"),                           # diffusers / transformers references
    "slow": ("fixture_files(", "wide_quantized(", "write_hollow", "full_size", "TURBO)", "released_like(",
             "bench/", '"bench', "-m bench", "soak", "_dynamo", "survey"),             # GB-sized files, compiles, benchmarks
}


_SOURCES: dict = {}


def _source(obj) -> str:
    """obj's source, read once per object (a parametrized test and a shared fixture recur across many items)."""
    import inspect
    if obj not in _SOURCES:
        try:
            _SOURCES[obj] = inspect.getsource(obj)
        except (OSError, TypeError):
            _SOURCES[obj] = ""
    return _SOURCES[obj]


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
