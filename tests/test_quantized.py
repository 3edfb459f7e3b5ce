"""Quantized files (int8 ConvRot, fp8_mixed, NVFP4, MXFP8) in the pack's loaders, against core ComfyUI 0.30.0's
own loading of the same file, in-process (the server tests at the released width: test_quantized_server.py).

The files are written by core's own quantizer (zimage_dev/quantized_files.py), per layer (`.comfy_quant`) and in the
header form. The reference is core's model built as core's UNETLoader builds one (convert_old_quants, then
detect_layer_quantization and mixed-precision operations), at the test's sizes: the pack must compute exactly
what it computes. Every dtype safetensors can store is written into a block weight: the pack computes the right
model or refuses the file naming the tensor and dtype; it never casts a value it does not understand."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from zimage_dev import quantized_files as qf
from zimage_dev.runtime import import_pack
from zimage_dev.parity import rel_err
from zimage_dev import synthetic

CFG = qf.QUANTIZABLE
FORMATS = ("int8_tensorwise", "float8_e4m3fn", "nvfp4", "mxfp8", "convrot_w4a4")
# each format's own rounding against the fp32 model, these random weights (std 0.05): measured 2.4e-2 int8
# ConvRot, 7.0e-2 fp8, 6.0e-2 MXFP8, 2.4e-1 NVFP4 and 3.7e-1 ConvRot W4A4 (4 bits). A raw cast is ~1e2 off.
ROUNDING = {"int8_tensorwise": 0.05, "float8_e4m3fn": 0.1, "mxfp8": 0.12, "nvfp4": 0.4, "convrot_w4a4": 0.4}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    import_pack()
    sd = synthetic.dit_weights(CFG, seed=3, dtype=torch.float32)
    path = tmp_path_factory.mktemp("quantized") / "z_image_fp32.safetensors"
    save_file(sd, str(path))
    return path, sd


def write(path, sd, fmt, header=False, layers=None):
    qsd, metadata = qf.quantize_layers(sd, qf.block_layers(sd) if layers is None else layers, fmt, header=header)
    save_file(qsd, str(path), metadata=metadata)
    return path


def core_model_of(path):
    """core's own model of a quantized file, as its UNETLoader makes one (at the test's sizes: core sizes Z-Image
    from the released width only)."""
    import comfy.model_management as mm
    import comfy.supported_models
    import comfy.utils
    core_model = import_pack("nodes.core_model")
    sd, metadata = comfy.utils.load_torch_file(str(path), return_metadata=True)
    sd, metadata = comfy.utils.convert_old_quants(sd, "", metadata=metadata)
    config = comfy.supported_models.ZImage(core_model.unet_config(CFG))
    config.quant_config = comfy.utils.detect_layer_quantization(sd, "")
    assert config.quant_config, "core did not take the file for a quantized one"
    config.set_inference_dtype(torch.float32, mm.unet_manual_cast(None, torch.device("cpu"),
                                                                   config.supported_inference_dtypes))
    model = config.get_model(sd, "")
    model.load_model_weights(sd, "")
    return model


def dit_out(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, cap = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 9, CFG.cap_feat_dim, generator=g)
    dit = getattr(model, "model", model).diffusion_model
    with torch.no_grad():
        return dit(x, torch.tensor([0.7]), cap, num_tokens=9).float()


@pytest.mark.parametrize("header", [False, True], ids=["per-layer", "header"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_computes_what_core_computes(plain, tmp_path, fmt, header):
    """The pack's loader gives core's model core's quantized Linears: the output equals core's own loading of the
    file, and is the fp32 model's up to the format's rounding (not a cast of raw quantized values)."""
    import comfy.quant_ops
    core_model = import_pack("nodes.core_model")
    path = write(tmp_path / f"z_image_{fmt}.safetensors", plain[1], fmt, header)
    ours = core_model.load_model(path, "auto")
    qkv = ours.model.diffusion_model.layers[0].attention.qkv.weight
    assert isinstance(qkv, comfy.quant_ops.QuantizedTensor)
    exact = rel_err(dit_out(ours), dit_out(core_model_of(path)))[1]
    rounding = rel_err(dit_out(ours), dit_out(core_model.load_model(plain[0], "auto")))[1]
    print(f"{fmt} ({'header' if header else 'per-layer'}): pack vs core {exact:.1e}, vs fp32 {rounding:.2e}")
    assert exact <= 1e-6 and rounding <= ROUNDING[fmt]


def test_fp8_weight_dtype_on_a_quantized_file_keeps_the_file_s_format(plain, tmp_path):
    """fp8_e4m3fn on an int8 file: the file's own format computes (the option is for plain files), same output."""
    core_model = import_pack("nodes.core_model")
    path = write(tmp_path / "z_image_int8.safetensors", plain[1], "int8_tensorwise")
    assert torch.equal(dit_out(core_model.load_model(path, "fp8_e4m3fn")), dit_out(core_model.load_model(path)))


# ---- every dtype a tensor can be stored in ----

def safetensors_dtypes() -> dict[str, torch.dtype]:
    import safetensors.torch
    return dict(safetensors.torch._TYPES)           # every dtype this safetensors version reads into torch


UNDERSTOOD = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


@pytest.mark.parametrize("name", sorted(safetensors_dtypes()))
def test_every_stored_dtype_is_computed_right_or_refused_by_name(tmp_path, name):
    """One block weight stored in each dtype safetensors has, with no declaration: floats compute the model whose
    weight is that value; anything else is refused naming the tensor and the dtype, before any value is read."""
    UnsupportedFile = import_pack("zimage_core.errors").UnsupportedFile
    core_model = import_pack("nodes.core_model")
    key, dtype = "layers.0.attention.qkv.weight", safetensors_dtypes()[name]
    sd = synthetic.dit_weights(synthetic.TINY, seed=4, dtype=torch.float32)
    w = sd[key] * (100 if not dtype.is_floating_point and not dtype.is_complex else 1)
    sd[key] = (w > 0) if dtype == torch.bool else w.to(dtype)
    path = tmp_path / f"z_image_{name}.safetensors"
    save_file(sd, str(path))
    if name not in UNDERSTOOD:
        with pytest.raises(UnsupportedFile) as e:
            core_model.load_model(path, "auto")
        assert key in str(e.value) and name in str(e.value) and "bf16 file" in str(e.value)
        return
    ours = core_model.load_model(path, "auto")
    # the right model: the same weights with this one's stored value widened to fp32 by hand
    sd_ref = dict(sd, **{key: sd[key].to(torch.float32)})
    ref_path = tmp_path / "reference.safetensors"
    save_file({k: v.to(torch.float32) for k, v in sd_ref.items()}, str(ref_path))
    x, sigma, cap = torch.randn(1, 16, 6, 4), torch.tensor([0.7]), torch.randn(1, 9, 32)
    with torch.no_grad():
        got = ours.model.diffusion_model(x, sigma, cap, num_tokens=9).float()
        want = core_model.load_model(ref_path, "auto").model.diffusion_model(x, sigma, cap, num_tokens=9).float()
    # fp8 blocks are kept as fp8 and computed in fp32: the same values; bf16/f16 widen exactly
    assert rel_err(got, want)[1] <= 1e-6, name


def test_a_declared_format_stored_in_another_dtype_is_refused(plain, tmp_path):
    CheckpointMismatch = import_pack("zimage_core.errors").CheckpointMismatch
    core_model = import_pack("nodes.core_model")
    qsd, _ = qf.quantize_layers(plain[1], ["layers.0.attention.qkv"], "int8_tensorwise")
    qsd["layers.0.attention.qkv.weight"] = qsd["layers.0.attention.qkv.weight"].to(torch.int16)
    save_file(qsd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointMismatch, match=r"layers\.0\.attention\.qkv\.weight is declared int8_tensorwise "
                                                 r"but stored as I16"):
        core_model.load_model(tmp_path / "bad.safetensors", "auto")


def test_a_format_nobody_knows_is_refused_by_name(plain, tmp_path):
    UnsupportedFile = import_pack("zimage_core.errors").UnsupportedFile
    core_model = import_pack("nodes.core_model")
    qsd, _ = qf.quantize_layers(plain[1], ["layers.0.attention.qkv"], "int8_tensorwise")
    qsd["layers.0.attention.qkv.comfy_quant"] = torch.tensor(list(json.dumps({"format": "int3_magic"}).encode()),
                                                              dtype=torch.uint8)
    save_file(qsd, str(tmp_path / "odd.safetensors"))
    with pytest.raises(UnsupportedFile, match="int3_magic"):
        core_model.load_model(tmp_path / "odd.safetensors", "auto")


def test_a_format_this_comfyui_cannot_compute_is_refused_with_what_to_do(plain, tmp_path, monkeypatch):
    """What a ComfyUI without the format (0.3.75 for int8, or 0.30.0 without comfy_kitchen) answers: the format,
    the file, update ComfyUI or use the bf16 file; nothing is read first."""
    import comfy.quant_ops
    UnsupportedFile = import_pack("zimage_core.errors").UnsupportedFile
    core_model = import_pack("nodes.core_model")
    path = write(tmp_path / "z_image_turbo_int8_convrot.safetensors", plain[1], "int8_tensorwise")
    monkeypatch.delitem(comfy.quant_ops.QUANT_ALGOS, "int8_tensorwise")
    with pytest.raises(UnsupportedFile) as e:
        core_model.load_model(path, "auto")
    message = str(e.value)
    assert all(s in message for s in ("z_image_turbo_int8_convrot.safetensors", "int8_tensorwise (int8 ConvRot)",
                                      "Update ComfyUI", "bf16 file")), message


# ---- the text encoder (qwen_3_4b_fp8_mixed) ----

def core_clip_of(path):
    """core's CLIP of a quantized text encoder as CLIPLoader makes it: its own detection (llama_detect) and
    operations, the file's state dict, at the tiny sizes (core detects Qwen3-4B at its released width only)."""
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.hunyuan_video as hv
    import comfy.text_encoders.z_image as z_image
    import comfy.utils
    core_clip = import_pack("nodes.core_clip")
    from zimage_core.loading import prepare_text_encoder
    sd, metadata = comfy.utils.load_torch_file(str(path), return_metadata=True)
    sd, _ = comfy.utils.convert_old_quants(sd, "", metadata=metadata)
    options = core_clip.model_options(prepare_text_encoder(path)[1].config, torch.float32)
    target = comfy.supported_models_base.ClipTarget(z_image.ZImageTokenizer, z_image.te(**hv.llama_detect(sd)))
    return comfy.sd.CLIP(target=target, parameters=1, model_options=options, state_dict=[sd])


@pytest.mark.parametrize("header", [False, True], ids=["per-layer", "header"])
def test_an_fp8_mixed_text_encoder_encodes_as_core_s(tmp_path, header):
    """Half the projections fp8 (weight + per-tensor scale), the rest full precision, as qwen_3_4b_fp8_mixed: the
    pack's CLIP is core's with core's mixed-precision operations, the same conditioning as core's loading of the
    file, and the fp32 encoder's up to fp8 rounding. It used to be refused as 'damaged'."""
    core_clip = import_pack("nodes.core_clip")
    sd = synthetic.text_encoder_weights(seed=1, dtype=torch.float32)
    save_file(sd, str(tmp_path / "qwen_3_4b.safetensors"))
    path = write(tmp_path / "qwen_3_4b_fp8_mixed.safetensors", sd, "float8_e4m3fn", header, qf.text_layers(sd)[::2])
    ours = core_clip.load_clip(path, torch.float32)

    def encode(clip):
        return clip.encode_from_tokens(clip.tokenize("a red chair, 50% off"), return_pooled=False).float()
    exact = rel_err(encode(ours), encode(core_clip_of(path)))[1]
    rounding = rel_err(encode(ours), encode(core_clip.load_clip(tmp_path / "qwen_3_4b.safetensors", torch.float32)))[1]
    print(f"fp8_mixed text encoder ({'header' if header else 'per-layer'}): pack vs core {exact:.1e}, "
          f"vs fp32 {rounding:.2e}")
    assert exact <= 1e-6 and 0 < rounding <= 0.12            # measured 7.7e-2 (std 0.2 weights, fp8's 3 bits)


# ---- the pack's additions on quantized models ----

@pytest.mark.parametrize("fmt", ["int8_tensorwise", "float8_e4m3fn"])
def test_the_lora_loader_patches_core_s_quantized_linears_as_core_s_loader(plain, tmp_path, fmt):
    """A core-loaded quantized MODEL (core's mixed-precision Linears are not nn.Linears): the pack's LoRA loader
    finds every block Linear and patches them as core's LoraLoaderModelOnly does with the same LoRA in core's
    own key names."""
    import comfy.model_patcher
    import comfy.sd
    import folder_paths
    lora_mod = import_pack("nodes.lora")
    path = write(tmp_path / f"z_image_{fmt}.safetensors", plain[1], fmt)
    core = comfy.model_patcher.ModelPatcher(core_model_of(path), torch.device("cpu"), torch.device("cpu"))
    linears = lora_mod.dit_linears(core)
    assert "layers.0.attention.qkv" in linears and "layers.1.feed_forward.w2" in linears
    g, rank, dim = torch.Generator().manual_seed(5), 4, CFG.dim
    down, up = torch.randn(rank, dim, generator=g) * 0.3, torch.randn(dim, rank, generator=g) * 0.3
    folder = tmp_path / "loras"
    folder.mkdir()
    save_file({"diffusion_model.layers.0.attention.to_q.lora_A.weight": down,          # ai-toolkit's names
               "diffusion_model.layers.0.attention.to_q.lora_B.weight": up}, str(folder / "q.safetensors"))
    folder_paths.add_model_folder_path("loras", str(folder))
    ours = lora_mod.ZImageLoraLoader().load(core, "q.safetensors", 1.0)["result"][0]
    qkv_up = torch.cat([up, torch.zeros(2 * dim, rank)])                             # to_q: the first dim rows
    theirs, _ = comfy.sd.load_lora_for_models(core, None, {
        "diffusion_model.layers.0.attention.qkv.lora_up.weight": qkv_up,
        "diffusion_model.layers.0.attention.qkv.lora_down.weight": down}, 1.0, 0)
    outs = []
    for patcher in (ours, theirs):
        patcher.patch_model()
        outs.append(dit_out(patcher))
        patcher.unpatch_model()
    effect = rel_err(outs[0], dit_out(core))[1]
    print(f"LoRA on core's {fmt} model: pack vs core {rel_err(outs[0], outs[1])[1]:.1e}, effect {effect:.2e}")
    assert rel_err(outs[0], outs[1])[1] <= 1e-6 and effect > 1e-2


def test_the_zimage_check_refuses_core_s_subclasses_it_cannot_sample():
    """Newer ComfyUI builds ZImagePixelSpace and MingImage as subclasses of ZImage; they sample other latents."""
    import comfy.supported_models
    core_model = import_pack("nodes.core_model")

    class ZImagePixelSpace(comfy.supported_models.ZImage):
        pass

    base = type("Base", (), {"model_config": ZImagePixelSpace(core_model.unet_config(CFG)),
                             "diffusion_model": torch.nn.Module()})()
    with pytest.raises(ValueError, match="ZImagePixelSpace model, not a Z-Image model"):
        core_model.zimage_dit(type("Patcher", (), {"model": base})(), "Z-Image Sampler")


def test_fp8_casts_ask_core_for_the_lora_compute_dtype(monkeypatch):
    """Under dynamic VRAM core patches a LoRA in while casting; the pack's fp8 and fp16 casts ask it to do that
    in core's LoRA compute dtype and requantize (as core's own fp8 Linear does), not to sum the patch in fp8."""
    import comfy.model_management as mm
    import comfy.ops
    pack_ops = import_pack("nodes.pack_ops")
    seen = []
    monkeypatch.setattr(comfy.ops, "cast_bias_weight", lambda *a, **k: seen.append(k) or (None, None, None))
    x = torch.randn(2, 8)
    pack_ops.cast_weight(torch.nn.Linear(8, 4), x, dtype=torch.float8_e4m3fn)
    pack_ops.cast_weight(torch.nn.Linear(8, 4), x, dtype=torch.float32)
    assert seen[0]["compute_dtype"] == mm.lora_compute_dtype(x.device) and seen[0]["want_requant"] is True
    assert "compute_dtype" not in seen[1]                 # no narrower storage: nothing to requantize


# ---- the released files' layouts, at full size ----

def test_the_released_int8_and_fp8_mixed_layouts_are_read_at_full_size(tmp_path):
    """z_image_turbo_int8_convrot (857 tensors: 202 int8 block Linears with scales and declarations, F32 else) and
    qwen_3_4b_fp8_mixed, full size and hollow (no disk): the strict check takes them as Turbo and Qwen3-4B, with
    every declared layer, reading nothing but the headers and declarations."""
    import_pack()
    from zimage_core.config import TURBO
    from zimage_core.loading import prepare_dit, prepare_text_encoder
    from zimage_core.text_encoder import QWEN3_4B
    dit = synthetic.write_hollow_quantized("int8_convrot", tmp_path / "z_image_turbo_int8_convrot.safetensors")
    _, report, _ = prepare_dit(dit)
    assert len(report.source_dtypes) == 3 and sum(report.source_dtypes.values()) == 857
    assert report.config == TURBO and report.quantization.describe() == "202 layers int8_tensorwise"
    te = synthetic.write_hollow_quantized("fp8_mixed", tmp_path / "qwen_3_4b_fp8_mixed.safetensors")
    _, report, _ = prepare_text_encoder(te)
    assert report.config == QWEN3_4B and report.quantization.describe() == "238 layers float8_e4m3fn"
