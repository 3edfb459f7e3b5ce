"""The Z-Image single-stream diffusion transformer (S3-DiT).

Module attribute names are the keys of ComfyUI's split file `z_image_turbo_bf16.safetensors`
(fused `qkv`, `out`, `q_norm`/`k_norm`, `x_embedder`, `final_layer`), so that file loads as the identity.
Semantics follow the official Tongyi-MAI implementation (see zimage-architecture.md, section 1).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from .config import DiTConfig
from .layers import RMSNorm, SwiGLU, attention, fp16_linear
from .rope import RopeTable, caption_positions, image_positions




def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Attention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        # fast-path options (zimage_core.fastpath); the defaults are the plain path
        self.complex_rope = False
        self.backend = "default"

    def forward(self, x: Tensor, rope: RopeTable, key_mask: Tensor | None) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.n_heads, -1)).unbind(2)   # each (B, L, H, D)
        q = rope.rotate(self.q_norm(q), self.complex_rope)
        k = rope.rotate(self.k_norm(k), self.complex_rope)
        return self.out(attention(q, k, v, key_mask, self.backend))

    def forward_fp16(self, x: Tensor, rope: RopeTable, key_mask: Tensor | None) -> Tensor:
        """fp32 in and out, fp16 matmuls on down-scaled inputs (layers.fp16_linear). q and k are normalised;
        v is scaled by a power of two for the fp16 attention kernel and scaled back after it."""
        q, k, v = fp16_linear(self.qkv, x).unflatten(-1, (3, self.n_heads, -1)).unbind(2)
        q = rope.rotate(self.q_norm(q), self.complex_rope).half()
        k = rope.rotate(self.k_norm(k), self.complex_rope).half()
        s = torch.exp2(torch.ceil(torch.log2(v.abs().amax().clamp_min(1.0))))
        out = attention(q, k, (v / s).half(), key_mask, self.backend).float() * s
        return fp16_linear(self.out, out)


class TransformerBlock(nn.Module):
    """Sandwich-norm block. Modulated blocks scale the inputs by (1 + s) and gate the outputs by tanh(g),
    from one Linear of the timestep embedding with no activation before it (and no shift term)."""

    def __init__(self, cfg: DiTConfig, modulated: bool):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = SwiGLU(cfg.dim, cfg.ffn_hidden)
        self.attention_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        if modulated:
            self.adaLN_modulation = nn.Sequential(nn.Linear(cfg.adaln_dim, 4 * cfg.dim))

    def forward(self, x: Tensor, rope: RopeTable, key_mask: Tensor | None = None,
                c: Tensor | None = None) -> Tensor:
        if x.dtype == torch.float32 and self.attention_norm1.weight.dtype == torch.float16:
            return self.forward_fp16(x, rope, key_mask, c)
        if c is None:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rope, key_mask))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(4, dim=-1)
        attn = self.attention(self.attention_norm1(x) * (1 + scale_msa), rope, key_mask)
        x = x + gate_msa.tanh() * self.attention_norm2(attn)
        ffn = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp))
        return x + gate_mlp.tanh() * self.ffn_norm2(ffn)

    def forward_fp16(self, x: Tensor, rope: RopeTable, key_mask: Tensor | None, c: Tensor | None) -> Tensor:
        """An fp16 model's block: the residual stream and every elementwise op in fp32, the matmuls in fp16 on
        power-of-two scaled inputs. fp16's range (65504) is what the stream and the FFN product outgrow."""
        scale_attn = gate_attn = scale_ffn = gate_ffn = 1.0          # unmodulated (context refiner) blocks
        if c is not None:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).float()[:, None].chunk(4, dim=-1)
            scale_attn, gate_attn, scale_ffn, gate_ffn = 1 + scale_msa, gate_msa.tanh(), 1 + scale_mlp, gate_mlp.tanh()
        attn = self.attention.forward_fp16(self.attention_norm1(x) * scale_attn, rope, key_mask)
        x = x + gate_attn * self.attention_norm2(attn)
        ffn = self.feed_forward.forward_fp16(self.ffn_norm1(x) * scale_ffn)
        return x + gate_ffn * self.ffn_norm2(ffn)


class TimestepEmbedder(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.freq_dim = cfg.t_freq_dim
        self.mlp = nn.Sequential(nn.Linear(cfg.t_freq_dim, cfg.t_embed_hidden), nn.SiLU(),
                                 nn.Linear(cfg.t_embed_hidden, cfg.adaln_dim))

    def forward(self, t: Tensor) -> Tensor:
        # The sinusoid stays in fp32 (t reaches 1000); cos half first, max period 10000.
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs
        emb = torch.cat([args.cos(), args.sin()], dim=-1)
        weight = self.mlp[0].weight
        return self.mlp(emb.to(weight.dtype if weight.dtype.is_floating_point else torch.float32))


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm_final = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(cfg.dim, cfg.patch_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.adaln_dim, cfg.dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        scale = 1 + self.adaLN_modulation(c)[:, None]
        return self.linear((self.norm_final(x) * scale).to(c.dtype))    # c's dtype is the compute dtype


@dataclass
class PromptContext:
    """Everything of one DiT call that does not depend on the latent's values or on t: the captions after
    the context refiner, the RoPE tables and the key mask. One per prompt and size, reusable across steps."""
    captions: list[Tensor]                   # what it was made from (identity + version are its key)
    versions: list[int | None]
    size: tuple[int, int]
    cap: Tensor                              # (B, Lcap, dim) after the context refiner
    img_rope: RopeTable
    rope: RopeTable                          # joint [image, caption]
    mask: Tensor | None                      # joint key mask, None when every caption has the same length

    def serves(self, captions: list[Tensor], size: tuple[int, int]) -> bool:
        # Same tensor objects, not modified in place since: exact without comparing values (no device sync).
        return (size == self.size and len(captions) == len(self.captions)
                and all(a is b and _version(a) == v for a, b, v in zip(captions, self.captions, self.versions)))


def _version(t: Tensor) -> int | None:
    """The in-place modification counter; inference-mode tensors have none (identity must do)."""
    try:
        return t._version
    except RuntimeError:
        return None


class ZImageDiT(nn.Module):
    """forward(x, t, captions) -> the raw network output u, which estimates (clean - noise).

    x: (B, C, H, W) latents in model space (H, W even); t: (B,) in [0, 1] with 1 = clean (t = 1 - sigma);
    captions: one (L_i, cap_feat_dim) tensor per sample, valid tokens only, lengths may differ.
    Inside `with model.reuse_context():` the prompt part (PromptContext) is made once and reused by every
    call with the same caption tensors and size, as it is across the steps of one sampling run.
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.x_embedder = nn.Linear(cfg.patch_dim, cfg.dim)
        self.t_embedder = TimestepEmbedder(cfg)
        self.cap_embedder = nn.Sequential(RMSNorm(cfg.cap_feat_dim, cfg.norm_eps), nn.Linear(cfg.cap_feat_dim, cfg.dim))
        self.x_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.noise_refiner = nn.ModuleList(TransformerBlock(cfg, True) for _ in range(cfg.n_noise_refiner))
        self.context_refiner = nn.ModuleList(TransformerBlock(cfg, False) for _ in range(cfg.n_context_refiner))
        self.layers = nn.ModuleList(TransformerBlock(cfg, True) for _ in range(cfg.n_layers))
        self.final_layer = FinalLayer(cfg)
        self._contexts: list[PromptContext] | None = None          # set only inside reuse_context()

    def forward(self, x: Tensor, t: Tensor, captions: list[Tensor]) -> Tensor:
        B, C, H, W = x.shape
        if len(captions) != B:
            raise ValueError(f"got {len(captions)} captions for a batch of {B} latents")
        ctx = self.prompt_context(captions, (H, W))
        img, n_img = self.embed_image(x)
        c = self.t_embedder(t * self.cfg.t_scale).to(img.dtype)
        if img.dtype == torch.float16:
            img = img.float()           # an fp16 model keeps its residual stream in fp32 (forward_fp16)

        for block in self.noise_refiner:
            img = block(img, ctx.img_rope, None, c)
        joint = torch.cat([img, ctx.cap], dim=1)     # [image, caption]: batch padding sits at the caption's end
        for block in self.layers:
            joint = block(joint, ctx.rope, ctx.mask, c)

        out = self.final_layer(joint[:, :n_img], c)                 # (B, N, p*p*C), image tokens only
        return self.unpatchify(out, H, W).to(x.dtype)

    @contextmanager
    def reuse_context(self):
        """Reuse each prompt's PromptContext across the calls inside (the steps of one run). Scoped, so a
        weight change between runs (a LoRA patched in) can never meet a stale context."""
        outer = self._contexts
        self._contexts = []
        try:
            yield self
        finally:
            self._contexts = outer

    def prompt_context(self, captions: list[Tensor], size: tuple[int, int]) -> PromptContext:
        if self._contexts is not None:
            for ctx in self._contexts:
                if ctx.serves(captions, size):
                    return ctx
        ctx = self.make_context(captions, size)
        if self._contexts is not None:
            self._contexts[:] = self._contexts[-1:] + [ctx]         # the last two: cond+uncond runs alternate
        return ctx

    def make_context(self, captions: list[Tensor], size: tuple[int, int]) -> PromptContext:
        H, W = size
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"latent height and width must be multiples of {p}, got {H}x{W}")
        cap, cap_rope, cap_mask, cap_lens = self.embed_captions(captions)
        if cap.dtype == torch.float16:
            cap = cap.float()
        for block in self.context_refiner:      # it does not see t: the same every step
            cap = block(cap, cap_rope, cap_mask)
        n_img = (H // p) * (W // p)
        n_padded = _round_up(n_img, self.cfg.seq_multiple)
        pos = torch.stack([image_positions(H // p, W // p, n_padded, lp + 1, cap.device) for lp in cap_lens])
        img_rope = RopeTable.from_positions(pos, self.cfg.axes_dims, self.cfg.rope_theta)
        mask = None
        if cap_mask is not None:
            mask = torch.cat([torch.ones(len(captions), n_padded, dtype=torch.bool, device=cap.device), cap_mask], 1)
        return PromptContext(list(captions), [_version(c) for c in captions], size, cap, img_rope,
                             img_rope.cat(cap_rope), mask)

    def embed_captions(self, captions: list[Tensor]) -> tuple[Tensor, RopeTable, Tensor | None, list[int]]:
        """Embed, pad each caption to a multiple of seq_multiple with cap_pad_token, then stack the batch.

        Returns tokens (B, Lmax, dim), their RoPE, a key mask (None when all lengths are equal) and
        each sample's padded length Lp."""
        weight = self.cap_embedder[1].weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        padded = []
        for feats in captions:
            emb = self.cap_embedder(feats.to(weight.device, dtype))
            extra = _round_up(len(emb), self.cfg.seq_multiple) - len(emb)
            padded.append(torch.cat([emb, self.cap_pad_token.to(emb.dtype).expand(extra, -1)]))
        lens = [len(p) for p in padded]
        tokens = torch.nn.utils.rnn.pad_sequence(padded, batch_first=True)
        pos = caption_positions(max(lens), tokens.device).expand(len(lens), -1, -1)
        rope = RopeTable.from_positions(pos, self.cfg.axes_dims, self.cfg.rope_theta)
        mask = None
        if len(set(lens)) > 1:
            lengths = torch.tensor(lens, device=tokens.device)
            mask = torch.arange(max(lens), device=tokens.device)[None] < lengths[:, None]
        return tokens, rope, mask, lens

    def embed_image(self, x: Tensor) -> tuple[Tensor, int]:
        """Patchify (channel fastest), embed, pad to a multiple of seq_multiple with x_pad_token.
        Returns the tokens and how many of them are image (not padding)."""
        p = self.cfg.patch_size
        B, C, H, W = x.shape
        weight = self.x_embedder.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        patches = rearrange(x, "b c (h ph) (w pw) -> b (h w) (ph pw c)", ph=p, pw=p)
        tokens = self.x_embedder(patches.to(weight.device, dtype))
        n = tokens.shape[1]
        extra = _round_up(n, self.cfg.seq_multiple) - n
        tokens = torch.cat([tokens, self.x_pad_token.to(tokens.dtype).expand(B, extra, -1)], dim=1)
        return tokens, n

    def unpatchify(self, out: Tensor, H: int, W: int) -> Tensor:
        p = self.cfg.patch_size
        return rearrange(out, "b (h w) (ph pw c) -> b c (h ph) (w pw)", h=H // p, w=W // p, ph=p, pw=p)
