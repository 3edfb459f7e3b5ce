"""Parity of zimage_core.vae with diffusers' AutoencoderKL, plus the key-layout and config facts of the Flux AE."""
from __future__ import annotations

import math
import re

import pytest
import torch

from zimage_core.config import FLUX_LATENT
from zimage_core.vae import (FLUX_AE, AutoEncoder, VAEConfig, diffusers_to_ldm, from_model_space,
                             to_model_space)

diffusers = pytest.importorskip("diffusers")
AutoencoderKL = diffusers.AutoencoderKL

# Three levels so the decoder's reversed numbering has a middle level, and two levels (1 and 2) with identical
# shapes: a wrong up-block mapping then loads fine and is caught only by the numbers.
TINY_KW = dict(block_out_channels=(32, 64, 64), layers_per_block=2, latent_channels=16, norm_num_groups=32)
TINY = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, z_channels=16)

# The released vae/config.json of Z-Image-Turbo (= FLUX.1 ae).
FLUX_KW = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, norm_num_groups=32)


def _diffusers_vae(**kw) -> AutoencoderKL:
    n = len(kw["block_out_channels"])
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, use_quant_conv=False,
                         use_post_quant_conv=False, mid_block_add_attention=True, **kw)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm affines included), scaled so activations stay O(1) through the net."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:                                   # conv / linear weights
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):  # GroupNorm scale around 1
                p.copy_(1.0 + 0.3 * noise)
            else:                                             # biases (norm shifts included)
                p.copy_(0.3 * noise)


@pytest.fixture(scope="module")
def pair() -> tuple[AutoencoderKL, AutoEncoder]:
    torch.manual_seed(0)
    ref = _diffusers_vae(**TINY_KW).eval()
    _randomize(ref, seed=1234)
    ours = AutoEncoder(TINY).eval()
    ours.load_state_dict(diffusers_to_ldm(ref.state_dict()), strict=True)
    return ref, ours


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    max_abs = (a - b).abs().max().item()
    return max_abs, max_abs / b.abs().max().item()


def test_decode_matches_diffusers(pair) -> None:
    ref, ours = pair
    z = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(5))   # non-square
    with torch.no_grad():
        expected = ref.decode(z).sample
        got = ours.decode(z)
    assert got.shape == expected.shape == (2, 3, 6 * TINY.downscale, 10 * TINY.downscale)
    max_abs, rel = _rel_err(got, expected)
    print(f"decode: max-abs {max_abs:.3e}, rel {rel:.3e} (ref max {expected.abs().max():.3f})")
    assert rel <= 1e-5


def test_encode_matches_diffusers_posterior_mean(pair) -> None:
    ref, ours = pair
    x = torch.rand(2, 3, 48, 80, generator=torch.Generator().manual_seed(6)) * 2 - 1
    with torch.no_grad():
        expected = ref.encode(x).latent_dist.mean
        got = ours.encode(x)
    assert got.shape == expected.shape == (2, 16, 48 // TINY.downscale, 80 // TINY.downscale)
    max_abs, rel = _rel_err(got, expected)
    print(f"encode: max-abs {max_abs:.3e}, rel {rel:.3e} (ref max {expected.abs().max():.3f})")
    assert rel <= 1e-5


def test_from_shapes_recovers_tiny_config(pair) -> None:
    _, ours = pair
    assert VAEConfig.from_shapes(ours.state_dict()) == TINY
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}   # plain shapes work too
    assert VAEConfig.from_shapes(shapes) == TINY


def test_from_shapes_rejects_inconsistent_dicts(pair) -> None:
    _, ours = pair
    sd = dict(ours.state_dict())
    sd.pop("decoder.up.1.block.2.conv2.bias")
    with pytest.raises(ValueError, match="missing"):
        VAEConfig.from_shapes(sd)
    sd = dict(ours.state_dict())
    sd["encoder.mid.attn_1.q.weight"] = torch.zeros(64, 64)               # Linear shape, not 1x1 conv
    with pytest.raises(ValueError, match="wrong shape"):
        VAEConfig.from_shapes(sd)
    with pytest.raises(ValueError, match="encoder.conv_in.weight"):
        VAEConfig.from_shapes({"decoder.conv_in.weight": (64, 16, 3, 3)})


def test_flux_ae_meta_size() -> None:
    with torch.device("meta"):
        model = AutoEncoder(FLUX_AE)
    sd = model.state_dict()
    assert len(sd) == 244
    assert sum(v.numel() for v in sd.values()) == 83_819_683
    assert not any("quant_conv" in k for k in sd)
    assert sd["encoder.conv_out.weight"].shape == (32, 512, 3, 3)                # mean + logvar
    assert sd["decoder.up.0.block.2.conv2.weight"].shape == (128, 128, 3, 3)     # 3 blocks per decoder level
    assert "decoder.up.0.upsample.conv.weight" not in sd
    assert "encoder.down.3.downsample.conv.weight" not in sd
    assert VAEConfig.from_shapes(sd) == FLUX_AE
    assert FLUX_AE.downscale == FLUX_LATENT.downscale


def test_diffusers_flux_key_set_maps_to_ours() -> None:
    with torch.device("meta"):
        ref = _diffusers_vae(**FLUX_KW)
        ours = AutoEncoder(FLUX_AE)
    mapped = diffusers_to_ldm(ref.state_dict())
    expected = ours.state_dict()
    assert len(ref.state_dict()) == 244
    assert mapped.keys() == expected.keys()
    for k, v in expected.items():
        assert mapped[k].shape == v.shape, k
        assert mapped[k].is_meta


def test_unknown_key_is_named() -> None:
    sd = _diffusers_vae(**TINY_KW).state_dict()
    sd["encoder.mid_block.attentions.0.to_out.1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=re.escape("encoder.mid_block.attentions.0.to_out.1.weight")):
        diffusers_to_ldm(sd)
    sd = {"quant_conv.weight": torch.zeros(32, 32, 1, 1)}
    with pytest.raises(ValueError, match="quant_conv.weight.*quant_conv/post_quant_conv"):
        diffusers_to_ldm(sd)


def test_model_space_round_trip() -> None:
    assert (FLUX_AE.scale, FLUX_AE.shift) == (0.3611, 0.1159)
    z_raw = torch.randn(1, 16, 4, 6, dtype=torch.float64)
    z = to_model_space(z_raw)
    torch.testing.assert_close(z, (z_raw - 0.1159) * 0.3611)
    torch.testing.assert_close(from_model_space(z), z_raw)
    torch.testing.assert_close(from_model_space(torch.zeros(1)), torch.full((1,), 0.1159, dtype=torch.float32))
    with torch.device("meta"):
        model = AutoEncoder(TINY)
    torch.testing.assert_close(model.from_model_space(model.to_model_space(z_raw)), z_raw)


def test_mid_block_attention_gives_sdpa_inputs_contiguous_in_their_last_dim(pair, monkeypatch) -> None:
    """CUDA's flash, mem-efficient and cuDNN SDPA kernels take only inputs with stride 1 in the last dim
    (torch's check_last_dim_stride_equals_1); any other input falls to the math kernel, which holds the whole
    (H*W)^2 score matrix. Every SDPA call of an encode and a decode is looked at, on real inputs."""
    import torch.nn.functional as F
    _, ours = pair
    real = F.scaled_dot_product_attention
    seen = []

    def watching(*args, **kwargs):
        seen.append([(t.shape, t.stride()) for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)])
        return real(*args, **kwargs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", watching)
    with torch.no_grad():
        z = ours.encode(torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(3)))
        ours.decode(z)
    assert len(seen) == 2, "one mid-block attention in the encoder and one in the decoder"
    for call in seen:
        assert len(call) == 3
        for shape, stride in call:
            assert stride[-1] == 1, f"an SDPA input of shape {tuple(shape)} has strides {stride}"
