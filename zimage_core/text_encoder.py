"""Qwen3 text encoder (Qwen3-4B for Z-Image) returning the caption features the DiT consumes.

Module names are the ComfyUI `qwen_3_4b.safetensors` keys, so loading that file is the identity. The config is
inferred from tensor shapes, so tiny test checkpoints build tiny encoders with the same code.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import RMSNorm

if TYPE_CHECKING:                      # only a type here; the encoder itself does not need `tokenizers`
    from .tokenizer import PromptTokenizer

Shapes = Mapping[str, Sequence[int]]


@dataclass(frozen=True)
class Qwen3Config:
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int                      # not hidden // n_heads in Qwen3 (4B: 128 while 2560 / 32 = 80)
    ffn_hidden: int
    vocab_size: int
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        sizes = (self.hidden, self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim, self.ffn_hidden,
                 self.vocab_size)
        if min(sizes) < 1:
            raise ValueError(f"every Qwen3 size must be positive, got {self}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every checkpoint key and its shape, in state_dict order."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        per_layer = {
            "self_attn.q_proj.weight": (q, self.hidden),
            "self_attn.k_proj.weight": (kv, self.hidden),
            "self_attn.v_proj.weight": (kv, self.hidden),
            "self_attn.o_proj.weight": (self.hidden, q),
            "self_attn.q_norm.weight": (self.head_dim,),
            "self_attn.k_norm.weight": (self.head_dim,),
            "mlp.gate_proj.weight": (self.ffn_hidden, self.hidden),
            "mlp.up_proj.weight": (self.ffn_hidden, self.hidden),
            "mlp.down_proj.weight": (self.hidden, self.ffn_hidden),
            "input_layernorm.weight": (self.hidden,),
            "post_attention_layernorm.weight": (self.hidden,),
        }
        shapes = {"model.embed_tokens.weight": (self.vocab_size, self.hidden)}
        for i in range(self.n_layers):
            shapes.update({f"model.layers.{i}.{name}": shape for name, shape in per_layer.items()})
        shapes["model.norm.weight"] = (self.hidden,)
        return shapes

    @classmethod
    def from_shapes(cls, shapes: Shapes) -> "Qwen3Config":
        """Infer the config from ComfyUI-layout keys (`model.embed_tokens.weight`, `model.layers.N...`).

        Every key the inferred config implies must be present with that shape (ValueError otherwise); other keys,
        such as an `lm_head.weight`, are ignored here and left to the loader's strict check.
        """
        vocab_size, hidden = _shape(shapes, "model.embed_tokens.weight", 2)
        head_dim, = _shape(shapes, "model.layers.0.self_attn.q_norm.weight", 1)
        q_out, _ = _shape(shapes, "model.layers.0.self_attn.q_proj.weight", 2)
        kv_out, _ = _shape(shapes, "model.layers.0.self_attn.k_proj.weight", 2)
        ffn_hidden, _ = _shape(shapes, "model.layers.0.mlp.gate_proj.weight", 2)
        for what, width in (("q_proj", q_out), ("k_proj", kv_out)):
            if width % head_dim:
                raise ValueError(f"{what} width {width} is not a multiple of head_dim {head_dim} (from q_norm)")
        cfg = cls(hidden=hidden, n_layers=_count_layers(shapes), n_heads=q_out // head_dim,
                  n_kv_heads=kv_out // head_dim, head_dim=head_dim, ffn_hidden=ffn_hidden, vocab_size=vocab_size)
        _check_shapes(shapes, cfg.param_shapes())
        return cfg


QWEN3_4B = Qwen3Config(hidden=2560, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128, ffn_hidden=9728,
                       vocab_size=151936)


def _shape(shapes: Shapes, key: str, ndim: int) -> tuple[int, ...]:
    if key not in shapes:
        raise ValueError(f"not a Qwen3 text-encoder state dict: missing '{key}'")
    shape = tuple(int(s) for s in shapes[key])
    if len(shape) != ndim:
        raise ValueError(f"'{key}' has shape {list(shape)}, expected {ndim} dimensions")
    return shape


def _count_layers(shapes: Shapes) -> int:
    ids = {int(m.group(1)) for k in shapes if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    if ids != set(range(len(ids))):
        raise ValueError(f"decoder layer indices are not contiguous from 0: {sorted(ids)}")
    return len(ids)


def _check_shapes(shapes: Shapes, expected: Mapping[str, tuple[int, ...]]) -> None:
    missing = [k for k in expected if k not in shapes]
    wrong = [f"{k}: {list(shapes[k])} != {list(v)}" for k, v in expected.items()
             if k in shapes and tuple(int(s) for s in shapes[k]) != v]
    if missing or wrong:
        problems = [f"missing {k}" for k in missing[:5]] + wrong[:5]
        raise ValueError(f"inconsistent Qwen3 state dict ({len(missing)} missing, {len(wrong)} mis-shaped): "
                         + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------------------
# RoPE and attention


def rope_tables(length: int, head_dim: int, theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (L, head_dim) for positions 0..L-1, HF `rotate_half` layout (frequencies repeated twice).

    fp32 always: at positions in the thousands bf16 angles are off by whole radians.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, L, H, D). Rotates pairs (i, i + D/2); computed in fp32 and cast back."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)


def causal_mask(attention_mask: Tensor | None, length: int, device: torch.device) -> Tensor | None:
    """Boolean (B, 1, L, L) mask, True where query i may attend key j: j <= i and key j is a real token.

    The diagonal is always allowed. That changes nothing for real tokens (they see themselves anyway) but keeps
    padded query rows from being fully masked, whose NaNs would otherwise leak through 0 * NaN in later layers.
    None (no padding) means plain causal attention.
    """
    if attention_mask is None:
        return None
    keys = attention_mask.to(device=device) != 0                                     # (B, L)
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    eye = torch.eye(length, dtype=torch.bool, device=device)
    return (causal & keys[:, None, :]) | eye                                         # (B, L, L)


def _causal_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """q: (B, L, H, D); k, v: (B, L, H_kv, D); mask from `causal_mask`. Returns (B, L, H*D)."""
    groups = q.shape[2] // k.shape[2]
    # GQA by repeating kv heads (head h uses kv head h // groups); `enable_gqa` needs a newer torch than
    # every ComfyUI install has.
    k, v = (t.repeat_interleave(groups, dim=2) for t in (k, v))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))                                # (B, H, L, D)
    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    B, H, L, D = out.shape
    return out.transpose(1, 2).reshape(B, L, H * D)


# ---------------------------------------------------------------------------------------------------------------
# Modules (attribute names = checkpoint keys)


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.hidden, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)      # per head, before RoPE (Qwen3)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, L, self.n_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim))
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.o_proj(_causal_attention(q, k, v, mask))


class Qwen3MLP(nn.Module):
    """SwiGLU with Qwen's key names (layers.SwiGLU uses the DiT's w1/w2/w3)."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.hidden, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3Layer(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.self_attn = Qwen3Attention(cfg)
        self.mlp = Qwen3MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, cfg.norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Qwen3Body(nn.Module):
    """The `model.` level of the checkpoint."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList(Qwen3Layer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps)


class Qwen3Encoder(nn.Module):
    """Qwen3 decoder used as a text encoder. No buffers and no custom init, so it builds on the meta device."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.cfg = cfg
        self.model = _Qwen3Body(cfg)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids (B, L), attention_mask (B, L) with 1 on real tokens (right padding) -> (B, L, hidden).

        Returns transformers' `hidden_states[-2]`: the output of the second-to-last decoder layer, before the
        final norm, which is what Z-Image's caption features are. That tensor is the *input* of the last layer,
        so the last layer and `model.norm` are never run; they stay in the module only so the checkpoint loads
        strictly. Rows at padded positions hold garbage; use only the rows the mask marks valid.
        """
        _, L = input_ids.shape
        # Computed on input_ids' device; the embedding looked up where its table is (the CPU when the layers
        # are streamed to the device: memory.stream_text_encoder).
        table = self.model.embed_tokens.weight
        x = self.model.embed_tokens(input_ids.to(table.device)).to(input_ids.device)
        cos, sin = rope_tables(L, self.cfg.head_dim, self.cfg.rope_theta, x.device)
        mask = causal_mask(attention_mask, L, x.device)
        for layer in self.model.layers[:-1]:
            x = layer(x, cos, sin, mask)
        return x


def encode_prompts(encoder: Qwen3Encoder, tokenizer: PromptTokenizer, prompts: list[str],
                   device: torch.device | str | None = None) -> list[Tensor]:
    """Caption features per prompt: a (L_i, hidden) tensor of its valid tokens only, from one right-padded batch,
    computed on `device` (default: where the encoder's weights are).

    The encoder is causal and padding is on the right, so the padding cannot change the valid rows.
    """
    if not prompts:
        return []
    ids = [tokenizer.encode(p) for p in prompts]
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    length = max(len(i) for i in ids)
    input_ids = torch.full((len(ids), length), tokenizer.pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(ids), length, dtype=torch.bool, device=device)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long, device=device)
        mask[row, : len(seq)] = True
    with torch.no_grad():
        hidden = encoder(input_ids, mask)
    return [hidden[row, : len(seq)] for row, seq in enumerate(ids)]
