"""The loaders' MODEL, CLIP and VAE are core ComfyUI's own classes, and compute what the pack's independent
engine (zimage_core) computes on the same files; the pack's additions (fp8 matmul, the fp16 guard, compile)
act through ComfyUI's hooks; ComfyUI's GPU memory modes (dynamic VRAM, partial loading) simulated on the CPU,
with core's own NextDiT as the control."""
from __future__ import annotations

import logging

import pytest
import torch

from zimage_dev.runtime import import_pack
from zimage_dev.parity import rel_err
from zimage_dev import synthetic
from zimage_core.fastpath import PLAIN
from zimage_core.loading import load_dit, load_text_encoder, load_vae
from zimage_core.vae import VAEConfig

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(autouse=True)
def seeded():
    """Every test's random inputs are the same on every run: the fp8 tolerances hold for these inputs, not for
    whatever the global generator happens to be at (measured 3.7e-2 to 5.7e-2 apart between unseeded runs)."""
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def loaders():
    return import_pack("nodes.loaders")


@pytest.fixture(scope="module")
def parts(loaders, tiny_files):
    return loaders.load_parts(tiny_files.dit, tiny_files.text_encoder, tiny_files.vae, "auto")


def test_the_loaders_return_core_classes(parts):
    import comfy.ldm.lumina.model
    import comfy.model_base
    import comfy.sd
    import comfy.text_encoders.llama
    import comfy.text_encoders.z_image
    model, clip, vae = parts
    assert type(model.model) is comfy.model_base.Lumina2
    assert type(model.model.diffusion_model) is comfy.ldm.lumina.model.NextDiT
    assert isinstance(clip, comfy.sd.CLIP) and isinstance(clip.cond_stage_model, comfy.text_encoders.z_image.ZImageTEModel)
    assert isinstance(vae, comfy.sd.VAE) and vae.latent_channels == 16
    foreign = {type(m).__qualname__ for part in (model.model, clip.cond_stage_model, vae.first_stage_model)
               for m in part.modules() if not type(m).__module__.startswith(("comfy.", "torch."))}
    # the tiny text encoder's heads are not 128 wide: core's Qwen3 classes, sized (nonrelease_sizes); nothing else
    assert foreign <= {"_SizedQwen3", "_SizedQwen3Model"}, f"modules not ComfyUI's or torch's: {foreign}"
    sizes = import_pack("nodes.nonrelease_sizes")
    assert issubclass(sizes._SizedQwen3, comfy.text_encoders.llama.Qwen3_4B)


def test_the_released_sizes_take_core_s_classes_as_they_are():
    """nonrelease_sizes changes nothing at the released sizes: Qwen3-4B keeps core's class and head width, the
    Flux AE goes to core's detection alone, core's timestep MLP is kept (built on the meta device: no memory)."""
    import comfy.supported_models
    from zimage_core.config import TURBO
    from zimage_core.text_encoder import QWEN3_4B
    from zimage_core.vae import FLUX_AE
    sizes = import_pack("nodes.nonrelease_sizes")
    core_clip = import_pack("nodes.core_clip")
    core_model = import_pack("nodes.core_model")
    options = core_clip.model_options(QWEN3_4B, torch.bfloat16)
    assert "qwen3_4b_class" not in options and "head_dim" not in options["qwen3_4b_model_config"]
    sd = {"decoder.conv_in.weight": torch.zeros(1)}
    assert sizes.vae_arguments(FLUX_AE, sd) == {"sd": sd}
    model = comfy.supported_models.ZImage(core_model.unet_config(TURBO)).get_model({}, "", device=torch.device("meta"))
    embedder = model.diffusion_model.t_embedder
    sizes.size_timestep_embedder(model.diffusion_model, TURBO, torch.bfloat16, None)
    assert model.diffusion_model.t_embedder is embedder
    # and the small files do take them (the branches this test keeps honest are live)
    from zimage_dev.synthetic import TINY_TEXT, TINY_VAE
    assert core_clip.model_options(TINY_TEXT, torch.float32)["qwen3_4b_class"] is sizes._SizedQwen3Model
    assert "config" in sizes.vae_arguments(TINY_VAE, sd)


@pytest.mark.parametrize("streamed", [False, True])
def test_core_model_equals_the_engine(parts, tiny_files, streamed):
    """streamed: every layer through ComfyUI's cast path, as in low-VRAM and dynamic modes."""
    model = parts[0]
    engine, _ = load_dit(tiny_files.dit, torch.float32, fast=PLAIN)
    dit = model.model.diffusion_model
    if streamed:
        for m in dit.modules():
            if hasattr(m, "comfy_cast_weights"):
                m.comfy_cast_weights = True
    torch.manual_seed(0)
    x, sigma = torch.randn(1, 16, 6, 4), torch.tensor([0.7])
    cap = torch.randn(1, 9, engine.cfg.cap_feat_dim)
    try:
        with torch.no_grad():
            ours = engine(x, 1 - sigma, [cap[0]])
            core = -dit(x, sigma, cap, num_tokens=9)                 # core's call: sigma in, -u out
    finally:
        for m in dit.modules():
            if hasattr(m, "comfy_cast_weights"):
                m.comfy_cast_weights = False
    err = rel_err(core, ours)
    print(f"core NextDiT vs engine: max abs {err[0]:.2e}, rel {err[1]:.2e}")
    # fp32 both; the sums run in other orders (ComfyUI's CPU attention is its split kernel, the engine's is
    # torch's SDPA), ~3e-5 after 4 blocks. A wrong weight or a missed term is O(1).
    assert err[1] <= 1e-4


def test_core_text_encoder_equals_the_engine(parts, tiny_files):
    clip = parts[1]
    tokens = clip.tokenize("a red fox in the snow, 雪の中の赤い狐")
    ids = [t[0] for t in tokens["qwen3_4b"][0]]
    core = clip.encode_from_tokens(tokens)
    engine, _ = load_text_encoder(tiny_files.text_encoder, torch.float32)
    with torch.no_grad():
        ours = engine(torch.tensor([ids]))
    err = rel_err(core.float(), ours.float())
    print(f"core Qwen3 vs engine, {len(ids)} tokens: max abs {err[0]:.2e}, rel {err[1]:.2e}")
    assert core.shape == ours.shape and err[1] <= 1e-5


def test_core_vae_equals_the_engine(parts, tiny_files):
    vae = parts[2]
    engine, _ = load_vae(tiny_files.vae, torch.float32)
    z = torch.randn(1, 16, 4, 6)
    with torch.no_grad():
        ours = ((engine.decode(z) + 1) / 2).clamp(0, 1).movedim(1, -1)
        pixels = torch.rand(1, 32, 48, 3)
        ours_z = engine.encode(pixels.movedim(-1, 1) * 2 - 1)
    decoded, encoded = vae.decode(z), vae.encode(pixels)
    print(f"core VAE vs engine: decode {rel_err(decoded, ours)[0]:.2e}, encode {rel_err(encoded, ours_z)[1]:.2e}")
    assert decoded.shape == ours.shape and rel_err(decoded, ours)[0] <= 1e-5
    assert rel_err(encoded, ours_z)[1] <= 1e-5


def test_full_size_ae_is_core_s_own_vae(loaders, tmp_path):
    """The released AE's size (84 M parameters, random): the pack's VAE and core's VAELoader read the same file
    into the same object, so decode and encode agree to the bit."""
    import comfy.sd
    import comfy.utils
    from safetensors.torch import save_file
    path = tmp_path / "ae.safetensors"
    save_file(synthetic.vae_weights(VAEConfig(), seed=5), str(path))
    ours = import_pack("nodes.core_vae").load_vae(path)
    core = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))
    assert sum(p.numel() for p in ours.first_stage_model.parameters()) > 80e6
    z = torch.randn(1, 16, 8, 8)
    pixels = torch.rand(1, 64, 64, 3)
    assert torch.equal(ours.decode(z), core.decode(z))
    assert torch.equal(ours.encode(pixels), core.encode(pixels))


def test_overlong_prompt_is_refused_with_the_limit(parts):
    clip = parts[1]
    assert len(clip.tokenize("word " * 600)["qwen3_4b"][0]) > 600          # past diffusers' 512: kept whole
    with pytest.raises(ValueError, match=r"text: the prompt is \d+ tokens long, over this pack's limit of 4096"):
        clip.tokenize("word " * 5000)


# ---- the pack's operations ----------------------------------------------------------------------------------

def fp8_linear(seed=0, fast=True):
    """A block Linear of the pack's operations holding an fp8 weight, as fp8_e4m3fn(_fast) loads it."""
    ops = import_pack("nodes.pack_ops")
    torch.manual_seed(seed)
    linear = ops.PackOps.Linear(64, 48, bias=False)
    linear.weight = torch.nn.Parameter((torch.randn(48, 64) * 0.5).to(torch.float8_e4m3fn), requires_grad=False)
    linear.zimage_fp8_matmul = fast
    return ops, linear


def test_fp8_fast_is_the_cast_path_where_there_is_no_fp8_matmul():
    """On this CPU (and GPUs without fp8 units) fp8_e4m3fn_fast computes exactly what fp8_e4m3fn does."""
    _, fast = fp8_linear()
    _, plain = fp8_linear(fast=False)
    x = torch.randn(2, 32, 64, dtype=torch.bfloat16)
    assert fast.fp8_matmul_mode(x) is None
    with torch.no_grad():
        assert torch.equal(fast(x), plain(x))


def test_fp8_fast_multiplies_in_fp8(monkeypatch):
    """Where fp8 matmul is granted, the product is the fp8 one: the activations quantised (per tensor with the
    CPU build's kernel, forced here; per token on Ada/Hopper), the stored fp8 weight as it is."""
    ops, fast = fp8_linear(seed=1)
    _, plain = fp8_linear(seed=1, fast=False)
    monkeypatch.setattr(ops.quant, "scaled_mm_support", lambda device: "tensor")
    x = torch.randn(2, 32, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        out, reference = fast(x), plain(x)
    q, s = ops.quant.quantize(x.reshape(-1, 64), rowwise=False)
    emulated = ((q.float() * s) @ fast.weight.float().t()).reshape(2, 32, 48)
    assert out.dtype == torch.bfloat16 and out.shape == reference.shape
    assert rel_err(out.float(), emulated)[1] <= 1e-2                 # it is the fp8 x fp8 product (bf16 out)
    assert 0 < rel_err(out.float(), reference.float())[1] <= 0.1     # within fp8's rounding of the activations
    fast.weight_function = [lambda w: w]                             # a LoRA applied at cast time: cast path
    with torch.no_grad():
        assert torch.equal(fast(x), plain(x))


@pytest.mark.parametrize("mode", ["tensor", "rowwise"])
def test_fp8_fast_multiplies_a_scaled_weight_with_its_scale(monkeypatch, mode):
    """A scaled fp8 file's Linear: its per-tensor scale goes into the fp8 product (as _scaled_mm's weight scale,
    one per output row where the GPU scales rowwise), so fast and cast paths both compute weight * scale."""
    ops, fast = fp8_linear(seed=3)
    ops.keep_scale(fast, torch.tensor(2.0 ** -9))
    calls = []

    def emulated(x, weight, weight_scale, rowwise):         # the CPU build's _scaled_mm takes no rowwise scales
        calls.append(weight_scale)
        return (x.float() @ (weight.float() * weight_scale.reshape(-1, 1)).t()).to(x.dtype) if rowwise else \
            (x.float() @ (weight.float() * weight_scale).t()).to(x.dtype)
    monkeypatch.setattr(ops.quant, "scaled_mm_support", lambda device: mode)
    monkeypatch.setattr(ops.quant, "fp8_matmul", emulated)
    x = torch.randn(2, 32, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        out = fast(x)
        fast.zimage_fp8_matmul = False
        cast = fast(x)
    real = fast.weight.float() * 2.0 ** -9
    assert calls and torch.all(calls[0] == 2.0 ** -9) and calls[0].shape == ((1, 48) if mode == "rowwise" else ())
    assert rel_err(out.float(), x.float() @ real.t())[1] <= 1e-2
    assert rel_err(cast.float(), x.float() @ real.t())[1] <= 1e-2


@pytest.mark.parametrize("inplace", [False, True], ids=["lora", "weight_hook"])
def test_a_scaled_layer_patched_and_restored_as_core_does(inplace):
    """core bakes a LoRA through set_weight and restores the layer from its backup: a LoRA load sets a new
    Parameter and restores another (set_attr_param), so the patched weight may get a larger scale; weight hooks
    (scheduled LoRAs) patch in place and copy the backup into the same Parameter, so the scale stays."""
    ops, linear = fp8_linear(seed=4, fast=False)
    import comfy.utils
    ops.keep_scale(linear, torch.tensor(2.0 ** -9))
    x = torch.randn(2, 64)
    with torch.no_grad():
        before = linear(x)
        backup = linear.weight.detach().clone()
        real = linear.convert_weight(linear.weight.float(), inplace=True)        # fp8 values times the scale
        target = real + 0.5 * torch.randn_like(real)         # past the range of the scale (448 * 2^-9 = 0.875)
        linear.set_weight(target, inplace_update=inplace, seed=0)
        if not inplace:                                      # a scale of its own: fp8 rounding of the patch only
            assert rel_err(linear(x), x @ target.t())[1] <= 0.07
        if inplace:
            comfy.utils.copy_to_param(linear, "weight", backup)
        else:
            comfy.utils.set_attr_param(linear, "weight", backup)
        assert torch.equal(linear(x), before)


def test_fp8_fast_falls_back_once_when_the_gpu_refuses(monkeypatch, caplog):
    ops, fast = fp8_linear(seed=2)
    _, plain = fp8_linear(seed=2, fast=False)
    monkeypatch.setattr(ops.quant, "scaled_mm_support", lambda device: "rowwise")
    monkeypatch.setattr(ops.PackOps.Linear, "_fp8_failed", False)

    def refuse(*args, **kwargs):
        raise ValueError("mat2 must be col_major")               # torch raises ValueError for some arguments
    monkeypatch.setattr(ops.quant, "fp8_matmul", refuse)
    x = torch.randn(1, 16, 64, dtype=torch.bfloat16)
    with torch.no_grad(), caplog.at_level("WARNING"):
        assert torch.equal(fast(x), plain(x))
        assert torch.equal(fast(x), plain(x))
    assert ops.PackOps.Linear._fp8_failed
    assert sum("fp8 matmul failed" in r.getMessage() for r in caplog.records) == 1


def test_fp16_guard_is_the_fp32_product_and_never_overflows():
    """fp16 weights with fp32 activations (weight_dtype fp16): the product in fp16 on inputs scaled per row,
    close to the fp32 product, finite where a plain fp16 product overflows; a small row next to a huge one
    keeps its precision (per-row scales)."""
    ops = import_pack("nodes.pack_ops")
    torch.manual_seed(3)
    linear = ops.PackOps.Linear(64, 48, bias=True)
    w32, b32 = torch.randn(48, 64), torch.randn(48)
    linear.weight = torch.nn.Parameter(w32.half(), requires_grad=False)
    linear.bias = torch.nn.Parameter(b32, requires_grad=False)
    x = torch.randn(2, 8, 64) * 3e4
    x[0, 0] *= 100                                               # one token far larger than the rest
    with torch.no_grad():
        out = linear(x)
        exact = torch.nn.functional.linear(x.double(), w32.half().double(), b32.double())
        plain = torch.nn.functional.linear(x.half(), w32.half(), b32.half())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not torch.isfinite(plain).all()                       # what the guard is for
    small = (out[1] - exact[1]).abs().max() / exact[1].abs().max()
    assert rel_err(out, exact)[1] <= 2e-3 and small <= 2e-3


def test_fp8_and_fp16_models_use_the_pack_operations_and_stay_close(loaders, tiny_files, parts):
    import comfy.ops
    x, sigma = torch.randn(1, 16, 6, 4), torch.tensor([0.7])
    cap = torch.randn(1, 9, 32)
    with torch.no_grad():
        reference = parts[0].model.diffusion_model(x, sigma, cap, num_tokens=9)
    for weight_dtype, tol in (("fp8_e4m3fn", 0.08), ("fp8_e4m3fn_fast", 0.08), ("fp16", 2e-3)):
        model = loaders.load_parts(tiny_files.dit, tiny_files.text_encoder, tiny_files.vae, weight_dtype)[0]
        dit = model.model.diffusion_model
        linears = [m for m in dit.modules() if isinstance(m, torch.nn.Linear)]
        assert all(isinstance(m, comfy.ops.manual_cast.Linear) for m in linears)
        narrow = torch.float16 if weight_dtype == "fp16" else torch.float8_e4m3fn
        stored = {m.weight.dtype for m in dit.layers.modules() if isinstance(m, torch.nn.Linear)}
        assert narrow in stored and dit.x_embedder.weight.dtype == torch.float32
        with torch.no_grad():
            out = dit(x, sigma, cap, num_tokens=9)
        err = rel_err(out, reference)[1]
        print(f"{weight_dtype}: rel error {err:.2e} against fp32")
        assert 0 < err <= tol


# ---- compile ---------------------------------------------------------------------------------------------------

def test_compile_node_patches_a_clone_and_refuses_other_models(parts):
    import comfy.model_patcher
    speed = import_pack("nodes.speed")
    model = parts[0]
    (patched,) = speed.ZImageTurboCompile().patch(model)
    assert speed.compiled_blocks(patched) is not None and speed.compiled_blocks(model) is None
    assert patched.model is model.model                                       # same weights, no copy
    other = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), load_device=torch.device("cpu"),
                                             offload_device=torch.device("cpu"))
    with pytest.raises(ValueError, match="Z-Image Compile: model is a MODEL holding a Linear, .* not a Z-Image "
                                         "model: connect the MODEL of a Z-Image loader"):
        speed.ZImageTurboCompile().patch(other)


def lumina2_stand_in(model):
    """A MODEL as core's Lumina 2 loader makes one: the same NextDiT class, a Lumina2 model config."""
    import types
    import comfy.supported_models
    config = comfy.supported_models.Lumina2(import_pack("nodes.core_model").unet_config(synthetic.TINY))
    return types.SimpleNamespace(model=types.SimpleNamespace(model_config=config,
                                                             diffusion_model=model.model.diffusion_model))


@pytest.mark.parametrize("node", ["sampler", "lora", "compile", "controlnet"])
def test_every_model_input_runs_the_one_z_image_check(parts, node, tmp_path):
    """The sampler, the LoRA loader, the compile node and the scheduled ControlNet refuse another model with the same words: the node,
    what came in (core's Lumina 2 builds the very same NextDiT class: its model config tells them apart), and
    what to connect; the pack's MODEL passes the same check."""
    core_model = import_pack("nodes.core_model")
    assert core_model.zimage_dit(parts[0], "any") is parts[0].model.diffusion_model
    other = lumina2_stand_in(parts[0])
    if node == "sampler":
        name = "Z-Image Sampler"
        run = lambda: import_pack("nodes.sampling").ZImageTurboSampler().run(  # noqa: E731
            other, [], {"samples": torch.zeros(1, 16, 8, 8)}, 0, 1, 1.0, 3.0, 1.0)
    elif node == "lora":
        name = "Z-Image LoRA Loader"
        run = lambda: import_pack("nodes.lora").ZImageLoraLoader().load(other, "none.safetensors", 1.0)  # noqa: E731
    elif node == "compile":
        name = "Z-Image Compile"
        run = lambda: import_pack("nodes.speed").ZImageTurboCompile().patch(other)  # noqa: E731
    else:
        name = "Z-Image Fun ControlNet \\(start/end\\)"
        run = lambda: import_pack("nodes.controlnet").ZImageFunControlnetScheduled().apply(  # noqa: E731
            other, None, None, 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match=f"^{name}: model is a Lumina2 model, not a Z-Image model: connect the "
                                         f"MODEL of a Z-Image loader"):
        run()


def test_a_failing_compile_is_logged_once_and_runs_eager(parts, monkeypatch, caplog):
    speed, sampling = import_pack("nodes.speed"), import_pack("nodes.sampling")
    model, clip = parts[0], parts[1]
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a lamp"))
    latent = {"samples": torch.zeros(1, 16, 4, 4)}
    plain = sampling.ZImageTurboSampler().run(model, cond, latent, 7, 2, 1.0, 3.0, 1.0)

    class BrokenCompile(torch.nn.Module):                  # what torch.compile returns when the backend fails
        def forward(self, *args, **kwargs):
            raise torch._dynamo.exc.BackendCompilerFailed(lambda: None, RuntimeError("no C++ compiler"), None)

    def broken_compile(module, **kwargs):
        return BrokenCompile()
    monkeypatch.setattr(speed.torch, "compile", broken_compile)
    (compiled,) = speed.ZImageTurboCompile().patch(model)
    with caplog.at_level(logging.WARNING):
        out = sampling.ZImageTurboSampler().run(compiled, cond, latent, 7, 2, 1.0, 3.0, 1.0)
    assert torch.equal(out["result"][0]["samples"], plain["result"][0]["samples"])
    assert out["ui"]["zimage"][0]["compiled"] is False
    assert sum("torch.compile failed" in r.getMessage() for r in caplog.records) == 1


# ---- ComfyUI's GPU memory modes, simulated on the CPU ------------------------------------------------------------

def core_control(cfg):
    """core's own NextDiT for the same config (zimage_dev/comfy_tree.py), as core's loader builds it."""
    from zimage_dev.comfy_tree import comfy_nextdit
    return comfy_nextdit(cfg)


def test_dynamic_vram_loads_every_weight(loaders, tiny_files, parts, monkeypatch):
    """ComfyUI 0.30.0 on NVIDIA turns on dynamic VRAM (comfy.memory_management.aimdo_enabled): core's Linears are
    then built without weights and filled from the state dict. The loader must still hold every weight and
    compute the same; core's own NextDiT (the control) does under the same flag."""
    import comfy.memory_management
    if not hasattr(comfy.memory_management, "aimdo_enabled"):
        pytest.skip("this ComfyUI has no dynamic VRAM (0.3.75)")
    monkeypatch.setattr(comfy.memory_management, "aimdo_enabled", True)
    from zimage_core.config import TINY
    control = core_control(TINY)
    assert next(m for m in control.modules() if isinstance(m, torch.nn.Linear)).weight is None   # lazy: the flag acts
    model = loaders.load_parts(tiny_files.dit, tiny_files.text_encoder, tiny_files.vae, "auto")[0]
    dit = model.model.diffusion_model
    assert all(p is not None and not p.is_meta for p in dit.state_dict().values())
    x, sigma, cap = torch.randn(1, 16, 6, 4), torch.tensor([0.5]), torch.randn(1, 9, 32)
    with torch.no_grad():
        out = dit(x, sigma, cap, num_tokens=9)
        reference = parts[0].model.diffusion_model(x, sigma, cap, num_tokens=9)
    assert torch.equal(out, reference)


def partial_load_to_meta(patcher, fraction: float = 0.5):
    """ComfyUI's partial load with the meta device standing in for a GPU that holds `fraction` of the weights."""
    patcher.load(torch.device("meta"), lowvram_model_memory=int(patcher.model_size() * fraction))


def test_partial_loading_runs_the_model_and_vae_like_core_s(loaders, tiny_files, monkeypatch):
    """Cards the DiT does not fit: ComfyUI loads part of the weights and streams the rest per call. With the
    meta device as the GPU, a forward runs on the device (shapes only) for core's NextDiT (the control) and for
    the loaders' MODEL and VAE. A weight left on the CPU that the forward does not cast to the device fails it
    (a CPU tensor meets a meta one), as it failed the pack's own DiT before (x_pad_token, RMSNorm weights)."""
    import comfy.model_management
    import comfy.model_patcher
    from zimage_core.config import SMALL
    # the CPU's attention kernels ask the device for its free memory; meta has none to tell
    def plenty(dev=None, torch_free_too=False):
        return (1 << 34, 1 << 34) if torch_free_too else 1 << 34
    monkeypatch.setattr(comfy.model_management, "get_free_memory", plenty)
    x, sigma = torch.empty(1, 16, 6, 4, device="meta"), torch.empty(1, device="meta")
    # core's control at the sizes core hard-codes (SMALL); the loaders' model from the tiny file
    control = comfy.model_patcher.ModelPatcher(core_control(SMALL), load_device=torch.device("meta"),
                                               offload_device=torch.device("cpu"))
    model, _, vae = loaders.load_parts(tiny_files.dit, tiny_files.text_encoder, tiny_files.vae, "auto")
    for name, patcher, dit, width in (("core", control, control.model, SMALL.cap_feat_dim),
                                      ("pack", model, model.model.diffusion_model, 32)):
        cap = torch.empty(1, 9, width, device="meta")
        partial_load_to_meta(patcher)          # (weights on meta cannot come back: these models are thrown away)
        assert any(p.device.type == "cpu" for p in dit.parameters()), f"{name}: the load was not partial"
        with torch.no_grad():
            out = dit(x, sigma, cap, num_tokens=9)
        assert out.shape == x.shape and out.device.type == "meta", name
    partial_load_to_meta(vae.patcher)
    with torch.no_grad():
        image = vae.first_stage_model.decode(torch.empty(1, 16, 4, 4, device="meta"))
    assert image.shape == (1, 3, 32, 32)


# ---- LoRA formats core maps, on the loaders' MODEL ----------------------------------------------------------------

def lora_files(dim: int, rank: int = 4, seed: int = 0) -> dict[str, tuple[dict, list]]:
    """The same kind of LoRA in the formats core maps for Z-Image: {format: (state dict, [(weight key, row slice,
    up, down)])} where each patched weight should become W + up @ down on those rows."""
    g = torch.Generator().manual_seed(seed)

    def pair():
        return torch.randn(dim, rank, generator=g) * 0.1, torch.randn(rank, dim, generator=g) * 0.1
    formats = {}
    qkv = "layers.0.attention.qkv.weight"
    up_q, down_q = pair()
    up_o, down_o = pair()
    for name, prefix, a, b in (("ai-toolkit", "diffusion_model.", "lora_A.weight", "lora_B.weight"),
                               ("diffusers-peft", "transformer.", "lora_A.weight", "lora_B.weight"),
                               ("diffsynth", "", "lora_A.default.weight", "lora_B.default.weight")):
        sd = {f"{prefix}layers.0.attention.to_q.{a}": down_q, f"{prefix}layers.0.attention.to_q.{b}": up_q,
              f"{prefix}layers.0.attention.to_out.0.{a}": down_o, f"{prefix}layers.0.attention.to_out.0.{b}": up_o}
        formats[name] = (sd, [(qkv, slice(0, dim), up_q, down_q),
                              ("layers.0.attention.out.weight", slice(0, dim), up_o, down_o)])
    up3, down3 = torch.randn(3 * dim, rank, generator=g) * 0.1, torch.randn(rank, dim, generator=g) * 0.1
    formats["comfyui"] = ({"diffusion_model.layers.0.attention.qkv.lora_up.weight": up3,
                           "diffusion_model.layers.0.attention.qkv.lora_down.weight": down3},
                          [(qkv, slice(0, 3 * dim), up3, down3)])
    return formats


@pytest.mark.parametrize("fmt", ["comfyui", "ai-toolkit", "diffusers-peft", "diffsynth"])
def test_core_lora_loading_patches_the_loaders_model(loaders, tiny_files, fmt, caplog):
    """core's LoRA loading (what LoraLoader runs) on the loaders' MODEL: every key of the file is mapped, and
    each patched weight is the original plus up @ down, checked by hand on the rows the key targets."""
    import comfy.sd
    import comfyui_version
    if fmt in ("diffusers-peft", "diffsynth") and comfyui_version.__version__ == "0.3.75":
        pytest.skip(f"core ComfyUI 0.3.75 maps no {fmt} keys for Z-Image (on its own model either); the pack's "
                    "ZImageLoraLoader does (tests/test_lora.py)")
    # not loaded by a sampler yet
    model = loaders.load_parts(tiny_files.dit, tiny_files.text_encoder, tiny_files.vae, "auto")[0]
    dim = model.model.diffusion_model.dim
    sd, expected = lora_files(dim)[fmt]
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()], caplog.text
    dit = model.model.diffusion_model
    before = {key: dit.get_parameter(key).detach().clone() for key, *_ in expected}
    patched.patch_model()
    try:
        for key, rows, up, down in expected:
            after = dit.get_parameter(key)
            want = before[key].clone()
            want[rows] += up @ down
            assert rel_err(after, want)[0] <= 1e-5, key
            assert not torch.equal(after, before[key])
    finally:
        patched.unpatch_model()
    assert all(torch.equal(dit.get_parameter(k), v) for k, v in before.items())


def write_fp8_file(path, scaled: bool):
    from safetensors.torch import save_file
    save_file(synthetic.to_fp8(synthetic.dit_weights(seed=0, dtype=torch.float32), scaled=scaled), str(path))
    return path


def dit_out(model, x, sigma, cap):
    with torch.no_grad():
        return model.model.diffusion_model(x, sigma, cap, num_tokens=9)


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8", "scaled_fp8"])
def test_an_fp8_file_stays_fp8_under_auto(tmp_path, parts, scaled):
    """Users pick an fp8 release to fit a smaller card: 'auto' keeps its blocks fp8 (a scaled file's values as
    stored, with their per-tensor scale), as core's loader keeps them, and computes close to the full model."""
    core_model = import_pack("nodes.core_model")
    path = write_fp8_file(tmp_path / "z_image_turbo_fp8.safetensors", scaled)
    model = core_model.load_model(path, "auto")
    qkv = model.model.diffusion_model.layers[0].attention.qkv
    assert qkv.weight.dtype == torch.float8_e4m3fn
    assert (getattr(qkv, "scale_weight", None) is not None) == scaled
    x, sigma, cap = torch.randn(1, 16, 6, 4), torch.tensor([0.7]), torch.randn(1, 9, 32)
    err = rel_err(dit_out(model, x, sigma, cap), dit_out(parts[0], x, sigma, cap))
    print(f"{'scaled ' if scaled else ''}fp8 file, auto: rel error {err[1]:.2e} against the fp32 file")
    # fp8 e4m3 has 3 mantissa bits (relative rounding up to 6%); seeded, measured 5.1e-2 unscaled (these random
    # weights, std 0.05, sit near fp8's subnormals) and 4.6e-2 scaled (core's own scaled-fp8 model: the same,
    # test below). A dropped scale (the dequantised weight stored in fp8 again) measured 1.06e-1.
    assert 0 < err[1] <= (0.05 if scaled else 0.06)


def core_scaled_fp8_model(path):
    """core's own model for a scaled fp8 file, loaded as its loader loads one (0.30.0: the old layout converted
    to per-layer `comfy_quant`, quantised tensors in core's mixed-precision Linears), at the pack's sizes (core
    cannot size the tiny test model from its shapes)."""
    import comfy.model_management as mm
    import comfy.supported_models
    import comfy.utils
    from safetensors.torch import load_file
    if not hasattr(comfy.utils, "convert_old_quants"):
        pytest.skip("this ComfyUI (0.3.75) reads scaled fp8 with other operations")
    core_model = import_pack("nodes.core_model")
    sd, _ = comfy.utils.convert_old_quants(load_file(str(path)), "", metadata={})
    config = comfy.supported_models.ZImage(core_model.unet_config(synthetic.TINY))
    config.quant_config = comfy.utils.detect_layer_quantization(sd, "")
    assert config.quant_config, "core did not take the file for a quantised one"
    config.set_inference_dtype(torch.float32, mm.unet_manual_cast(None, torch.device("cpu"),
                                                                   config.supported_inference_dtypes))
    model = config.get_model(sd, "")
    import_pack("nodes.nonrelease_sizes").size_timestep_embedder(model.diffusion_model, synthetic.TINY, torch.float32, None)
    model.load_model_weights(sd, "", assign=True)
    return model


def test_a_scaled_fp8_file_computes_as_core_s_scaled_fp8_model(tmp_path):
    """The per-tensor scale is kept: the pack's MODEL of a scaled fp8 file computes what core's own does."""
    core_model = import_pack("nodes.core_model")
    path = write_fp8_file(tmp_path / "z_image_turbo_fp8_scaled.safetensors", scaled=True)
    ours = core_model.load_model(path, "auto")
    core = core_scaled_fp8_model(path)
    x, sigma, cap = torch.randn(1, 16, 6, 4), torch.tensor([0.7]), torch.randn(1, 9, 32)
    with torch.no_grad():
        theirs = core.diffusion_model(x, sigma, cap, num_tokens=9).float()
    err = rel_err(dit_out(ours, x, sigma, cap), theirs)
    print(f"scaled fp8: pack vs core rel {err[1]:.2e}")
    assert err[1] <= 1e-5                 # measured 8.2e-7: the same fp8 values and scales, fp32 sums


@pytest.mark.parametrize("how", ["baked", "cast_time"])
def test_a_lora_on_a_scaled_fp8_file_patches_the_real_weight(tmp_path, how):
    """core's LoRA patching on a scaled fp8 MODEL adds the delta to weight * scale, not to the stored fp8 values:
    baked into the weights (a full load) or applied at cast time (a partial load, low VRAM), the output is the
    full-precision model's with the same LoRA up to fp8 rounding; removing the LoRA gives the model back."""
    import comfy.sd
    core_model = import_pack("nodes.core_model")
    fp32 = tmp_path / "z_image_turbo.safetensors"
    from safetensors.torch import save_file
    save_file(synthetic.dit_weights(seed=0, dtype=torch.float32), str(fp32))
    scaled = core_model.load_model(write_fp8_file(tmp_path / "scaled.safetensors", scaled=True), "auto")
    reference = core_model.load_model(fp32, "auto")
    # strong enough that the patched weights leave the range of the file's scales (measured 4.8x)
    lora = {k: v * 3 for k, v in lora_files(reference.model.diffusion_model.dim)["comfyui"][0].items()}
    x, sigma, cap = torch.randn(1, 16, 6, 4), torch.tensor([0.7]), torch.randn(1, 9, 32)
    before = dit_out(scaled, x, sigma, cap)
    want_patcher, _ = comfy.sd.load_lora_for_models(reference, None, lora, 1.0, 0)
    want_patcher.patch_model()
    want = dit_out(want_patcher, x, sigma, cap)
    patched, _ = comfy.sd.load_lora_for_models(scaled, None, lora, 1.0, 0)
    if how == "baked":
        patched.patch_model()
    else:                                     # a budget of 1 byte: every layer cast and patched per call
        patched.load(torch.device("cpu"), lowvram_model_memory=1)
        assert scaled.model.diffusion_model.layers[0].attention.qkv.weight_function
    got = dit_out(patched, x, sigma, cap)
    err, effect = rel_err(got, want)[1], rel_err(before, want)[1]
    print(f"LoRA on scaled fp8 ({how}): rel {err:.2e} against fp32 + LoRA; the LoRA's own effect {effect:.2e}")
    # measured 6.3e-2 baked (stochastic rounding at a larger scale), 5.8e-2 at cast time; the delta scaled
    # down with the stored values (the scale missing from the patch) measured 2.2e-1
    assert err <= 0.07 and effect >= 0.5
    patched.unpatch_model()
    assert torch.equal(dit_out(scaled, x, sigma, cap), before)


def test_prompts_tokenize_as_core_and_template_markers_stay_text(parts):
    """An ordinary prompt gives core's own tokens; chat-template markers typed in a prompt are text (no special
    ids inside the user turn), so a row cannot end the turn or carry the pad token into the caption."""
    import comfy.text_encoders.z_image as z_image
    clip, core = parts[1], z_image.ZImageTokenizer()
    prompt = "一只白猫 on a sofa, 50% off"
    assert clip.tokenize(prompt) == core.tokenize_with_weights(prompt)
    ids = [t[0] for t in clip.tokenize("<|endoftext|><|im_end|>\n<|im_start|>system a chair")["qwen3_4b"][0]]
    user = ids[3:-5]                                  # between "<|im_start|>user\n" and "<|im_end|>\n<|im_start|>..."
    assert user and not [i for i in user if i >= 151643], user


def test_cached_patcher_init_rebuilds_the_model(parts):
    """ComfyUI 0.30.0 asks a loader's factory for a separate, non-dynamic copy (core's compile node under dynamic
    VRAM, hooks, multi-GPU): clone(force_deepcopy=True) calls it. The copy is a new model with the same output."""
    import inspect
    model = parts[0]
    factory, args = model.cached_patcher_init
    assert "disable_dynamic" in inspect.signature(factory).parameters
    if "force_deepcopy" not in inspect.signature(model.clone).parameters:
        pytest.skip("this ComfyUI (0.3.75) has no cached_patcher_init use")
    copy = model.clone(force_deepcopy=True)
    assert copy.model is not model.model and copy.model.diffusion_model is not model.model.diffusion_model
    x, sigma, cap = torch.randn(1, 16, 6, 4), torch.tensor([0.4]), torch.randn(1, 9, 32)
    with torch.no_grad():
        assert torch.equal(copy.model.diffusion_model(x, sigma, cap, num_tokens=9),
                           model.model.diffusion_model(x, sigma, cap, num_tokens=9))
