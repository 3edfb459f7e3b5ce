"""Qwen3 text encoder and prompt tokenizer: parity with transformers, config inference, tokenizer ids."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zimage_core.text_encoder import QWEN3_4B, Qwen3Config, Qwen3Encoder, encode_prompts
from zimage_core.tokenizer import PROMPT_TEMPLATE, PromptTokenizer

REPO = Path(__file__).resolve().parents[1]

# Tiny, but with GQA (4 query heads on 2 kv heads) and head_dim != hidden / n_heads, as in Qwen3-4B.
TINY = Qwen3Config(hidden=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=24, ffn_hidden=96, vocab_size=1000)
REL_TOL = 1e-5


def _hf_model(cfg: Qwen3Config, attn_implementation: str = "eager"):
    transformers = pytest.importorskip("transformers", reason="parity tests need transformers (test extras)")
    hf_cfg = transformers.Qwen3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attn_implementation=attn_implementation)
    torch.manual_seed(0)
    model = transformers.Qwen3Model(hf_cfg).float().eval()
    # Weights of unit-ish scale and non-trivial norm gains, so every term matters at the tolerance.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.ndim == 2 and "embed" not in name:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
            else:
                p.copy_(torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def pair(request) -> tuple[torch.nn.Module, Qwen3Encoder]:
    hf = _hf_model(TINY, request.param)
    ours = Qwen3Encoder(TINY).eval()
    ours.load_state_dict({f"model.{k}": v for k, v in hf.state_dict().items()}, strict=True)
    return hf, ours


def _errors(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    max_abs = (ours - ref).abs().max().item()
    return max_abs, max_abs / ref.abs().max().item()


def test_parity_unpadded(pair):
    hf, ours = pair
    ids = torch.randint(0, TINY.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids, output_hidden_states=True).hidden_states[-2]
        out = ours(ids)
    max_abs, rel = _errors(out, ref)
    print(f"unpadded: max-abs {max_abs:.3e}, relative {rel:.3e}")
    assert rel <= REL_TOL, (max_abs, rel)


def test_parity_right_padded_batch(pair):
    hf, ours = pair
    lengths = [23, 9]
    ids = torch.randint(0, TINY.vocab_size, (2, max(lengths)), generator=torch.Generator().manual_seed(2))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        ids[row, n:] = 0                                                  # a pad id
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        out = ours(ids, mask)
        alone = [ours(ids[row : row + 1, :n])[0] for row, n in enumerate(lengths)]
    valid = mask.bool()
    max_abs, rel = _errors(out[valid], ref[valid])
    print(f"right-padded batch: max-abs {max_abs:.3e}, relative {rel:.3e}")
    assert rel <= REL_TOL, (max_abs, rel)
    assert torch.isfinite(out).all()                                       # padded rows stay finite too
    for row, n in enumerate(lengths):                                      # padding does not touch valid rows
        torch.testing.assert_close(out[row, :n], alone[row], rtol=1e-5, atol=1e-5)


def test_encode_prompts_splits_valid_rows(pair):
    _, ours = pair

    class FakeTokenizer:                                                   # ids inside the tiny vocab
        pad_id = 0

        def encode(self, prompt: str) -> list[int]:
            return [1 + ord(c) % (TINY.vocab_size - 1) for c in prompt]

    prompts = ["a long prompt with many tokens", "short"]
    feats = encode_prompts(ours, FakeTokenizer(), prompts)
    assert [f.shape for f in feats] == [(len(p), TINY.hidden) for p in prompts]
    with torch.no_grad():
        single = ours(torch.tensor([FakeTokenizer().encode(prompts[1])]))[0]
    torch.testing.assert_close(feats[1], single, rtol=1e-5, atol=1e-5)
    assert encode_prompts(ours, FakeTokenizer(), []) == []


# ---------------------------------------------------------------------------------------------------------------
# Config inference


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_from_shapes_recovers_tiny():
    hf = _hf_model(TINY)
    shapes = {f"model.{k}": tuple(v.shape) for k, v in hf.state_dict().items()}
    assert Qwen3Config.from_shapes(shapes) == TINY
    assert _shapes(Qwen3Encoder(TINY)) == TINY.param_shapes() == shapes


def test_qwen3_4b_round_trips_on_meta():
    with torch.device("meta"):
        enc = Qwen3Encoder(QWEN3_4B)
    sd = enc.state_dict()
    assert len(sd) == 398
    assert sum(t.numel() for t in sd.values()) == 4_022_468_096
    assert all(t.is_meta for t in sd.values())
    assert "lm_head.weight" not in sd
    assert Qwen3Config.from_shapes(_shapes(enc)) == QWEN3_4B
    assert sd["model.layers.35.self_attn.k_proj.weight"].shape == (1024, 2560)


@pytest.mark.parametrize("corrupt, message", [
    (lambda s: s.pop("model.embed_tokens.weight"), "missing 'model.embed_tokens.weight'"),
    (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"), "missing model.layers.1.mlp.up_proj.weight"),
    (lambda s: s.update({"model.layers.2.self_attn.v_proj.weight": (32, 64)}), "v_proj"),
    (lambda s: s.update({"model.layers.0.self_attn.q_proj.weight": (100, 64)}), "not a multiple of head_dim"),
    (lambda s: s.update({"model.layers.7.input_layernorm.weight": (64,)}), "not contiguous"),
])
def test_from_shapes_rejects_inconsistent(corrupt, message):
    shapes = TINY.param_shapes()
    corrupt(shapes)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        Qwen3Config.from_shapes(shapes)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer

PROMPTS = {
    "english": "A photo of a red fox sitting in the snow, 35mm, golden hour.  Two spaces\tand a tab; 12345 digits",
    "chinese": "一位穿着汉服的女孩站在樱花树下,左侧有一只白猫,右侧有灯笼,写实风格",
    "mixed": "Café «neon» sign saying “你好 世界” 🦊🔥👩‍👩‍👧 — e\u0301 (NFC) ",
}


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    found = sorted(REPO.glob(".runtime/ComfyUI-*/comfy/text_encoders/qwen25_tokenizer"))
    if not found:
        pytest.skip("no ComfyUI checkout with qwen25_tokenizer under .runtime/; run scripts/setup_runtime.sh")
    return found[-1]


@pytest.fixture(scope="module")
def reference_tokenizer(tokenizer_dir):
    transformers = pytest.importorskip("transformers", reason="tokenizer parity needs transformers (test extras)")
    return transformers.Qwen2Tokenizer.from_pretrained(str(tokenizer_dir))


@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_tokenizer_matches_transformers(tokenizer_dir, reference_tokenizer, kind):
    ours = PromptTokenizer.from_dir(tokenizer_dir).encode(PROMPTS[kind])
    # What diffusers' pipeline does: the templated text through the tokenizer's default call.
    ref = reference_tokenizer(PROMPT_TEMPLATE.format(PROMPTS[kind])).input_ids
    assert ours == ref


def test_tokenizer_template_ids(tokenizer_dir):
    ids = PromptTokenizer.from_dir(tokenizer_dir).encode(PROMPTS["english"])
    assert ids[:3] == [151644, 872, 198]
    assert ids[-5:] == [151645, 198, 151644, 77091, 198]


def test_tokenizer_truncates_prompt_only(tokenizer_dir):
    tok = PromptTokenizer.from_dir(tokenizer_dir)
    full = tok.encode(PROMPTS["english"])
    cut = tok.encode(PROMPTS["english"], max_tokens=4)
    assert cut == full[:3 + 4] + full[-5:]
    assert tok.encode(PROMPTS["english"], max_tokens=10_000) == full
    with pytest.raises(ValueError):
        tok.encode("x", max_tokens=-1)


def test_tokenizer_json_folder_gives_same_ids(tokenizer_dir, tmp_path):
    PromptTokenizer.from_dir(tokenizer_dir)._tok.save(str(tmp_path / "tokenizer.json"))   # a diffusers-style folder
    for prompt in PROMPTS.values():
        assert PromptTokenizer.from_dir(tmp_path).encode(prompt) == PromptTokenizer.from_dir(tokenizer_dir).encode(prompt)


def test_tokenizer_missing_files(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merges.txt, tokenizer_config.json") as err:
        PromptTokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(err.value)
