"""Out of memory inside the pack's nodes, in-process (ComfyUI 0.30.0 as a library, CPU): the error is turned
into one that says what to do, memory is released only after the failed call's tensors are gone, and the next
call of the same node succeeds. CPU builds of torch have torch.cuda.OutOfMemoryError, so the CUDA path is the
one exercised here."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from zimage_dev.runtime import import_pack
from zimage_dev import synthetic
from zimage_core.config import TINY


@pytest.fixture(scope="module")
def pack():
    return import_pack("nodes")


@pytest.fixture
def guard(pack):
    return import_pack("nodes.guard")


@pytest.fixture
def released(guard, monkeypatch):
    """Records the memory-release calls (and still makes them)."""
    import comfy.model_management as mm
    calls = []
    for name in ("unload_all_models", "soft_empty_cache"):
        real = getattr(mm, name)
        monkeypatch.setattr(mm, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k)))
    real_collect = gc.collect
    monkeypatch.setattr(guard.gc, "collect", lambda *a: (calls.append("gc.collect"), real_collect(*a))[1])
    return calls


@pytest.mark.parametrize("error,oom", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("MPS backend out of memory (MPS allocated: 17 GB)"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"), True),
    (MemoryError(), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"), False),
    (ValueError("width 904 is not a multiple of 16"), False),
])
def test_what_counts_as_out_of_memory(guard, error, oom):
    assert guard.is_oom(error) is oom


def test_oom_releases_memory_after_the_failed_frames_are_gone_and_says_what_to_do(guard, released):
    import comfy.model_management as mm
    seen = {}

    def forward():
        activations = torch.ones(1024, 1024)            # what a real forward would hold when it runs out
        seen["ref"] = weakref.ref(activations)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def unload_spy(_real=mm.unload_all_models):
        seen.setdefault("alive_at_unload", []).append(seen["ref"]() is not None)
        return _real()
    mm.unload_all_models = unload_spy                 # restored by the `released` fixture's monkeypatch
    with pytest.raises(guard.PackOutOfMemory) as info:
        guard.run_guarded("sampling", guard.sampler_remedy(1024, 1024, 4), forward)
    assert seen["alive_at_unload"] == [False], \
        f"unloads (True: the failed call's tensors still held): {seen['alive_at_unload']}"
    assert {"gc.collect", "soft_empty_cache"} <= set(released)
    text = str(info.value)
    for words in ("out of memory while sampling", "released", "1024x1024", "batch (4)", "fp8_e4m3fn", "--lowvram"):
        assert words in text, text
    assert isinstance(info.value, torch.cuda.OutOfMemoryError), "ComfyUI must still see an OOM"


def test_other_errors_pass_through_untouched_and_release_nothing(guard, released):
    error = ValueError("not memory")
    with pytest.raises(ValueError) as info:
        guard.run_guarded("sampling", "x", lambda: (_ for _ in ()).throw(error))
    assert info.value is error and released == []


# ---- the nodes themselves: a forward that runs out once, then the next call on the same objects succeeds ----

@pytest.fixture(scope="module")
def parts(pack, tmp_path_factory):
    loaders = import_pack("nodes.loaders")
    files = synthetic.write_split_files(tmp_path_factory.mktemp("models"))
    return loaders.load_parts(files.dit, files.text_encoder, files.vae, "fp32")


def conditioning(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 7, TINY.cap_feat_dim, generator=g), {}]]


def fail_once(obj, name, error):
    """Make obj.name raise `error` on its next call only (an instance attribute shadows the method)."""
    def failing(*args, **kwargs):
        delattr(obj, name)
        big = torch.ones(512, 512)  # noqa: F841  (held by this frame when it fails, as activations would be)
        raise error
    setattr(obj, name, failing)


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8 GiB"),
                                   RuntimeError("HIP out of memory")], ids=["cuda-oom", "generic-oom"])
def test_sampler_oom_then_the_next_run_succeeds(pack, parts, released, error):
    model, _, _ = parts
    sampler = pack.NODE_CLASS_MAPPINGS["ZImageTurboSampler"]()
    latent = {"samples": torch.zeros(2, 16, 8, 12)}
    args = dict(model=model, positive=conditioning(), latent_image=latent, seed=1, steps=2, cfg=1.0, shift=3.0,
                denoise=1.0)
    fail_once(model.model.diffusion_model, "forward", error)      # the DiT core calls each step
    with pytest.raises(torch.cuda.OutOfMemoryError) as info:
        sampler.run(**args)
    assert "out of memory while sampling" in str(info.value) and "96x64" in str(info.value), str(info.value)
    assert "unload_all_models" in released and "soft_empty_cache" in released
    out = sampler.run(**args)["result"][0]["samples"]
    assert out.shape == (2, 16, 8, 12) and torch.isfinite(out).all()


def test_vae_decode_oom_then_the_next_decode_succeeds(pack, parts, released):
    _, _, vae = parts
    decode = pack.NODE_CLASS_MAPPINGS["ZImageTurboVAEDecode"]()
    latent = {"samples": torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))}
    # A generic RuntimeError: ComfyUI's own VAE.decode only retries tiled on CUDA's class, so this one reaches us.
    fail_once(vae.first_stage_model, "decode", RuntimeError("XPU out of memory"))
    with pytest.raises(torch.cuda.OutOfMemoryError) as info:
        decode.decode(latent, vae)
    assert "decoding with the VAE" in str(info.value) and "VAE Decode (Tiled)" in str(info.value)
    assert "unload_all_models" in released
    image = decode.decode(latent, vae)[0]
    assert image.shape == (1, 32, 32, 3) and torch.isfinite(image).all()


def test_sampler_refuses_bad_latents_and_numbers_before_any_work(pack, parts):
    model, _, _ = parts
    sampler = pack.NODE_CLASS_MAPPINGS["ZImageTurboSampler"]()
    base = dict(model=model, positive=conditioning(), seed=1, steps=1, cfg=1.0, shift=3.0, denoise=1.0)
    cases = [({"latent_image": {"samples": torch.zeros(1, 16, 113, 8)}}, "height 904 is not a multiple of 16: use 896 or 912"),
             ({"latent_image": {"samples": torch.zeros(1, 16, 8, 1024)}}, "width 8192 is above the maximum of 4096"),
             ({"latent_image": {"samples": torch.zeros(0, 16, 8, 8)}}, "0 images: set batch_size to 1"),
             ({"latent_image": {"samples": torch.ones(1, 4, 8, 8)}}, "4 channels"),
             ({"latent_image": {"samples": torch.zeros(1, 16, 8, 8)}, "cfg": float("nan")}, "cfg is nan: send a finite"),
             ({"latent_image": {"samples": torch.zeros(1, 16, 8, 8)}, "shift": float("inf")}, "shift is inf")]
    for extra, words in cases:
        with pytest.raises(ValueError, match=words):
            sampler.run(**{**base, **extra})
