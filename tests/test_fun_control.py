"""The pack's Fun ControlNet patch (nodes/fun_control.py) on core's NextDiT and core's ZImage_Control, against
diffusers' ZImageTransformer2DModel + ZImageControlNetModel on the same random weights, one forward, every
released layout (Union 1.0, 2.0, 2.1, lite) at a size whose image token count (24) is not a multiple of 32.

The reference is diffusers as it is (the trainer's token set: control tokens + the refined caption, hints on the
whole sequence, pads included) plus the one hook where diffusers departs from the trainer: the 2.x / lite control
refiner's hints added to the DiT's own noise refiner (controlnet_reference.dit_gets_refiner_hints).

Small widths (dim 64, 30 main blocks, so every layer place is real): core builds these classes at any width; the
released width runs through a real server in tests/test_controlnet_diffusers.py."""
from __future__ import annotations

import pytest
import torch

from zimage_dev.runtime import import_pack
from zimage_dev.parity import randomize, rel_err
from zimage_dev.controlnet_reference import dit_gets_refiner_hints

DIM, HEADS, CAP_DIM, CAP_LEN = 64, 4, 32, 9
LATENT_H, LATENT_W = 8, 12                     # 4 x 6 = 24 image tokens, padded to 32
SIGMA, STRENGTH = 0.6, 0.8
# fp32 on both sides. Without any control, core's NextDiT and diffusers' DiT on these tiny random weights already
# differ by ~1e-4 relative (`floor`, measured per run: from the first refiner block on, small activations meet
# each side's norm epsilons); the control path may add rounding, not more. A wrong token, RoPE position, pad or
# place moves the output by 1e-2 or more (the effect of the control is asserted too).
FLOOR_MAX = 1e-3

LAYOUTS = {
    "union_1.0": dict(control_layers_places=list(range(0, 30, 5)), control_in_dim=16, add_control_noise_refiner=None),
    "2.0": dict(control_layers_places=list(range(0, 30, 2)), control_refiner_layers_places=[0, 1], control_in_dim=33,
                add_control_noise_refiner="control_layers"),
    "2.1": dict(control_layers_places=list(range(0, 30, 2)), control_refiner_layers_places=[0, 1], control_in_dim=33,
                add_control_noise_refiner="control_noise_refiner"),
    "lite": dict(control_layers_places=[0, 10, 20], control_refiner_layers_places=[0, 1], control_in_dim=33,
                 add_control_noise_refiner="control_noise_refiner"),
}


@pytest.fixture(scope="module")
def dits(tmp_path_factory):
    """(diffusers' DiT, core's NextDiT through the pack's loader) on the same random weights."""
    from diffusers import ZImageTransformer2DModel
    from safetensors.torch import save_file
    core_model = import_pack("nodes.core_model")
    from zimage_core.keys import dit_from_diffusers
    ref = randomize(ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=DIM, n_layers=30, n_refiner_layers=2,
        n_heads=HEADS, n_kv_heads=HEADS, cap_feat_dim=CAP_DIM, axes_dims=[4, 6, 6], axes_lens=[1536, 512, 512]),
        seed=5, std=0.02).eval()
    path = tmp_path_factory.mktemp("fun_control") / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in dit_from_diffusers(ref.state_dict(), torch.cat).items()}, str(path))
    model = core_model.load_model(path, "fp32")
    return ref, model.model.diffusion_model


@pytest.fixture(scope="module")
def floor(dits):
    """Core's DiT vs diffusers' on the same weights and inputs, no control: what rounding alone gives here."""
    ref_dit, core_dit = dits
    x, cap, _ = inputs("lite")
    with torch.no_grad():
        core = -core_dit(x, torch.tensor([SIGMA]), cap, num_tokens=CAP_LEN)
        ref = ref_dit([x[0][:, None]], torch.tensor([1.0 - SIGMA]), [cap[0]], return_dict=False)[0][0][:, 0][None]
    rel = rel_err(core, ref)[1]
    print(f"no control: core's DiT vs diffusers' rel {rel:.2e}")
    assert rel <= FLOOR_MAX
    return rel


def controlnets(layout: str, transformer):
    """(diffusers' ZImageControlNetModel sharing `transformer`'s embedders, core's ZImage_Control in a
    ModelPatcher) with the same random weights; core's gets them through core's own key conversion."""
    import comfy.ldm.lumina.controlnet
    import comfy.model_patcher
    import comfy.ops
    from comfy_extras.nodes_model_patch import z_image_convert
    from diffusers import ZImageControlNetModel
    config = LAYOUTS[layout]
    ref = randomize(ZImageControlNetModel(**config, dim=DIM, n_heads=HEADS, n_kv_heads=HEADS), seed=7, std=0.05).eval()
    release_sd = dict(ref.state_dict())                    # the released file's names, before sharing modules
    ref = ZImageControlNetModel.from_transformer(ref, transformer)
    refiner = config["add_control_noise_refiner"]
    core = comfy.ldm.lumina.controlnet.ZImage_Control(
        dim=DIM, n_heads=HEADS, n_kv_heads=HEADS, multiple_of=1,
        n_control_layers=len(config["control_layers_places"]), additional_in_dim=config["control_in_dim"] - 16,
        refiner_control=refiner is not None, broken=refiner == "control_layers", operations=comfy.ops.manual_cast)
    missing, unexpected = core.load_state_dict(z_image_convert(release_sd), strict=False)
    assert not unexpected, unexpected
    # a 2.0 file's control_noise_refiner is never used (core runs the control layers there, as the trainer did)
    assert all(k.startswith("control_noise_refiner.") for k in missing) and (not missing or refiner == "control_layers")
    core.eval().requires_grad_(False)
    patcher = comfy.model_patcher.ModelPatcher(core, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    return ref, patcher


def inputs(layout: str, seed: int = 11):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, LATENT_H, LATENT_W, generator=g)
    cap = torch.randn(1, CAP_LEN, CAP_DIM, generator=g)
    control = torch.randn(1, LAYOUTS[layout]["control_in_dim"], LATENT_H, LATENT_W, generator=g)
    return x, cap, control


def pack_forward(dit, patch_model, x, cap, control, strength=STRENGTH):
    fun_control = import_pack("nodes.fun_control")
    patch = fun_control.TrainerControlPatch(patch_model, dit.rope_embedder, lambda _: control, strength)
    options = {"patches": {"noise_refiner": [patch], "double_block": [patch]}}
    with torch.no_grad():
        out = -dit(x, torch.tensor([SIGMA]), cap, num_tokens=CAP_LEN, transformer_options=options)
    assert patch.state is None, "the control stream outlived the forward"
    return out


def diffusers_forward(transformer, controlnet, x, cap, control, strength=STRENGTH):
    t = torch.tensor([1.0 - SIGMA])
    handles = dit_gets_refiner_hints(controlnet, transformer)
    try:
        with torch.no_grad():
            samples = controlnet([x[0][:, None]], t, [cap[0]], [control[0][:, None]], conditioning_scale=strength)
            out = transformer([x[0][:, None]], t, [cap[0]], controlnet_block_samples=samples, return_dict=False)[0]
    finally:
        for h in handles:
            h.remove()
    return out[0][:, 0][None]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pack_patch_is_the_trainer_s_rule(dits, floor, layout):
    ref_dit, core_dit = dits
    ref_cn, patch_model = controlnets(layout, ref_dit)
    x, cap, control = inputs(layout)
    ours = pack_forward(core_dit, patch_model, x, cap, control)
    ref = diffusers_forward(ref_dit, ref_cn, x, cap, control)
    with torch.no_grad():
        plain = -core_dit(x, torch.tensor([SIGMA]), cap, num_tokens=CAP_LEN)
    err, rel = rel_err(ours, ref)
    effect = rel_err(ours, plain)[1]
    # without the refiner hints on the DiT (diffusers as it is): the one point where diffusers departs
    with torch.no_grad():
        samples = ref_cn([x[0][:, None]], torch.tensor([1.0 - SIGMA]), [cap[0]], [control[0][:, None]],
                         conditioning_scale=STRENGTH)
        as_is = ref_dit([x[0][:, None]], torch.tensor([1.0 - SIGMA]), [cap[0]], controlnet_block_samples=samples,
                        return_dict=False)[0][0][:, 0][None]
    refiner_gap = rel_err(ours, as_is)[1]
    print(f"{layout}: pack vs trainer's rule (diffusers + refiner hints) max abs {err:.2e}, rel {rel:.2e}; "
          f"effect of the control rel {effect:.2e}; vs diffusers as it is rel {refiner_gap:.2e}")
    assert rel <= 2 * floor
    assert effect > 100 * floor, "the control changed nothing"
    if LAYOUTS[layout]["add_control_noise_refiner"]:
        assert refiner_gap > 100 * floor, "the refiner hints changed nothing"


def test_strength_zero_is_no_control(dits):
    ref_dit, core_dit = dits
    _, patch_model = controlnets("lite", ref_dit)
    x, cap, control = inputs("lite")
    with torch.no_grad():
        plain = -core_dit(x, torch.tensor([SIGMA]), cap, num_tokens=CAP_LEN)
    ours = pack_forward(core_dit, patch_model, x, cap, control, strength=0.0)
    assert rel_err(ours, plain)[1] <= 1e-6


def test_an_unknown_layer_count_is_refused_by_name(dits):
    fun_control = import_pack("nodes.fun_control")
    _, patch_model = controlnets("lite", dits[0])
    del patch_model.model.control_layers[2]
    with pytest.raises(ValueError, match="2 control layers is none of the released layouts"):
        fun_control.TrainerControlPatch(patch_model, dits[1].rope_embedder, lambda _: None, 1.0)
