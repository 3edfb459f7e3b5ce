"""The Z-Image LoRA loader: every trainer's key format patches the loaders' MODEL through core's LoRA loading,
each weight checked by hand against W + strength * (alpha / rank) * up @ down on the rows its key targets; keys
that match nothing are named, a file that patches nothing is refused."""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from zimage_dev.runtime import import_pack
from zimage_dev.parity import rel_err

RANK = 4


@pytest.fixture(scope="module")
def node():
    return import_pack("nodes.lora")


@pytest.fixture
def model(tiny_files):
    return import_pack("nodes.core_model").load_model(tiny_files.dit)


@pytest.fixture
def loras(tmp_path):
    import folder_paths
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    return tmp_path


def deltas(dim: int, seed: int = 0):
    """Down/up pairs for q, k, v and out of the first main block, and an alpha (scale alpha / rank = 0.5)."""
    g = torch.Generator().manual_seed(seed)
    pairs = {name: (torch.randn(RANK, dim, generator=g) * 0.1, torch.randn(dim, RANK, generator=g) * 0.1)
             for name in ("to_q", "to_k", "to_v", "to_out.0")}
    return pairs, torch.tensor(RANK / 2.0)


def write_format(fmt: str, dim: int, path) -> dict:
    """The same LoRA written as trainer `fmt` names it; returns {weight: {(first row, end row): delta}} it adds."""
    pairs, alpha = deltas(dim)
    sd = {}
    for name, (down, up) in pairs.items():
        dotted = f"layers.0.attention.{name}"
        underscored = dotted.replace(".", "_")
        key, (a, b), with_alpha = {
            "ai-toolkit": (f"diffusion_model.{dotted}", ("lora_A.weight", "lora_B.weight"), False),
            "diffusers-peft": (f"transformer.{dotted}", ("lora_A.weight", "lora_B.weight"), False),
            "diffsynth": (dotted, ("lora_A.default.weight", "lora_B.default.weight"), False),
            "lycoris": (f"lycoris_{underscored}", ("lora_down.weight", "lora_up.weight"), True),
            "musubi": (f"lora_unet_{underscored}", ("lora_down.weight", "lora_up.weight"), True),
            "musubi-double-underscore": (f"lora_unet__{underscored}", ("lora_down.weight", "lora_up.weight"), False),
        }[fmt]
        sd[f"{key}.{a}"], sd[f"{key}.{b}"] = down, up
        if with_alpha:
            sd[f"{key}.alpha"] = alpha.clone()
    save_file(sd, str(path))
    scale = float(alpha) / RANK if fmt in ("lycoris", "musubi") else 1.0
    qkv = {(i * dim, (i + 1) * dim): scale * pairs[n][1] @ pairs[n][0] for i, n in enumerate(("to_q", "to_k", "to_v"))}
    return {"layers.0.attention.qkv.weight": qkv,
            "layers.0.attention.out.weight": {(0, dim): scale * pairs["to_out.0"][1] @ pairs["to_out.0"][0]}}


FORMATS = ["ai-toolkit", "diffusers-peft", "diffsynth", "lycoris", "musubi", "musubi-double-underscore"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_patches_what_it_says(node, model, loras, fmt, caplog):
    dit = model.model.diffusion_model
    expected = write_format(fmt, dit.dim, loras / f"{fmt}.safetensors")
    strength = 0.7
    with caplog.at_level(logging.WARNING):
        out = node.ZImageLoraLoader().load(model, f"{fmt}.safetensors", strength)
    patched = out["result"][0]
    assert out["ui"]["zimage_lora"][0]["patched"] == 2 and out["ui"]["zimage_lora"][0]["ignored"] == 0
    assert "not loaded" not in caplog.text.lower() and "match nothing" not in caplog.text
    before = {k: dit.get_parameter(k).detach().clone() for k in expected}
    patched.patch_model()
    try:
        for key, rows in expected.items():
            want = before[key].clone()
            for (start, end), delta in rows.items():
                want[start:end] += strength * delta
            err = rel_err(dit.get_parameter(key), want)[0]
            assert err <= 1e-6, f"{fmt} {key}: {err}"
    finally:
        patched.unpatch_model()
    assert all(torch.equal(dit.get_parameter(k), v) for k, v in before.items())


def test_keys_that_match_nothing_are_named_and_the_rest_applies(node, model, loras, caplog):
    write_format("musubi", model.model.diffusion_model.dim, loras / "partly.safetensors")
    from safetensors.torch import load_file
    sd = load_file(str(loras / "partly.safetensors"))
    sd["lora_unet_layers_7_attention_to_q.lora_down.weight"] = torch.zeros(RANK, 64)      # no layer 7
    sd["lora_unet_layers_7_attention_to_q.lora_up.weight"] = torch.zeros(64, RANK)
    sd["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(RANK, 32)
    sd["layers.0.attention.to_q.hada_w1_a"] = torch.zeros(4, 4)                            # LoHa: not read
    save_file(sd, str(loras / "partly.safetensors"))
    with caplog.at_level(logging.WARNING):
        info = node.ZImageLoraLoader().load(model, "partly.safetensors", 1.0)["ui"]["zimage_lora"][0]
    assert info["patched"] == 2 and info["ignored"] == 4
    assert "lora_unet_layers_7_attention_to_q.lora_down.weight" in info["ignored_first"]
    assert "4 keys match nothing" in caplog.text and "hada_w1_a" in caplog.text


def test_a_lora_for_another_model_is_refused_by_name(node, model, loras):
    save_file({"lora_unet_input_blocks_0_0.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_input_blocks_0_0.lora_up.weight": torch.zeros(8, 4)}, str(loras / "sdxl_style.safetensors"))
    with pytest.raises(ValueError, match=r"lora_name: sdxl_style.safetensors patches nothing in this Z-Image model"):
        node.ZImageLoraLoader().load(model, "sdxl_style.safetensors", 1.0)


def test_strength_zero_and_other_models(node, model, loras):
    import comfy.model_patcher
    write_format("musubi", model.model.diffusion_model.dim, loras / "m.safetensors")
    assert node.ZImageLoraLoader().load(model, "m.safetensors", 0.0)["result"][0] is model
    other = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), load_device=torch.device("cpu"),
                                             offload_device=torch.device("cpu"))
    other.model.diffusion_model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="Z-Image LoRA Loader: model is a MODEL holding a Linear, .* not a "
                                         "Z-Image model: connect the MODEL of a Z-Image loader"):
        node.ZImageLoraLoader().load(other, "m.safetensors", 1.0)


def test_split_parts_fuse_exactly_and_incomplete_files_are_refused():
    from zimage_core.lora import normalise
    g = torch.Generator().manual_seed(1)
    dim = 8
    down_q, up_q = torch.randn(2, dim, generator=g), torch.randn(dim, 2, generator=g)
    down_v, up_v = torch.randn(3, dim, generator=g), torch.randn(dim, 3, generator=g)
    sd = {"transformer.layers.0.attention.to_q.lora_A.weight": down_q,
          "transformer.layers.0.attention.to_q.lora_B.weight": up_q,
          "transformer.layers.0.attention.to_v.lora_A.weight": down_v,
          "transformer.layers.0.attention.to_v.lora_B.weight": up_v}
    out = normalise(sd, ["layers.0.attention.qkv"], {"layers.0.attention.qkv": 3 * dim})
    down = out.state_dict["diffusion_model.layers.0.attention.qkv.lora_down.weight"]
    up = out.state_dict["diffusion_model.layers.0.attention.qkv.lora_up.weight"]
    alpha = out.state_dict["diffusion_model.layers.0.attention.qkv.alpha"]
    fused = up @ down * (alpha / down.shape[0])
    want = torch.cat([up_q @ down_q, torch.zeros(dim, dim), up_v @ down_v])           # no k part: k rows unchanged
    assert torch.allclose(fused, want, atol=1e-6)
    del sd["transformer.layers.0.attention.to_v.lora_B.weight"]
    with pytest.raises(ValueError, match="without its up weight"):
        normalise(sd, ["layers.0.attention.qkv"], {"layers.0.attention.qkv": 3 * dim})
