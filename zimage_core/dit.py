"""The Z-Image single-stream diffusion transformer (S3-DiT).

Module attribute names are the keys of ComfyUI's split file `z_image_turbo_bf16.safetensors`
(fused `qkv`, `out`, `q_norm`/`k_norm`, `x_embedder`, `final_layer`), so that file loads as the identity.
Semantics follow the official Tongyi-MAI implementation (see zimage-architecture.md, section 1).
"""
from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn

from .config import DiTConfig
from .layers import RMSNorm, SwiGLU, attention
from .rope import apply_rope, caption_positions, image_positions, rope_angles

Rope = tuple[Tensor, Tensor]          # (cos, sin), each (B, L, head_dim / 2)


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

    def forward(self, x: Tensor, rope: Rope, key_mask: Tensor | None) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.n_heads, -1)).unbind(2)   # each (B, L, H, D)
        q = apply_rope(self.q_norm(q), *rope)
        k = apply_rope(self.k_norm(k), *rope)
        return self.out(attention(q, k, v, key_mask))


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

    def forward(self, x: Tensor, rope: Rope, key_mask: Tensor | None = None, c: Tensor | None = None) -> Tensor:
        if c is None:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rope, key_mask))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(4, dim=-1)
        attn = self.attention(self.attention_norm1(x) * (1 + scale_msa), rope, key_mask)
        x = x + gate_msa.tanh() * self.attention_norm2(attn)
        ffn = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp))
        return x + gate_mlp.tanh() * self.ffn_norm2(ffn)


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
        return self.linear(self.norm_final(x) * scale)


class ZImageDiT(nn.Module):
    """forward(x, t, captions) -> the raw network output u, which estimates (clean - noise).

    x: (B, C, H, W) latents in model space (H, W even); t: (B,) in [0, 1] with 1 = clean (t = 1 - sigma);
    captions: one (L_i, cap_feat_dim) tensor per sample, valid tokens only, lengths may differ.
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

    def forward(self, x: Tensor, t: Tensor, captions: list[Tensor]) -> Tensor:
        B, C, H, W = x.shape
        if len(captions) != B:
            raise ValueError(f"got {len(captions)} captions for a batch of {B} latents")
        c = self.t_embedder(t * self.cfg.t_scale)
        cap, cap_rope, cap_mask, cap_lens = self.embed_captions(captions)
        img, img_rope, n_img = self.embed_image(x, cap_lens)
        dtype = img.dtype
        c = c.to(dtype)

        for block in self.noise_refiner:
            img = block(img, img_rope, None, c)
        for block in self.context_refiner:
            cap = block(cap, cap_rope, cap_mask)

        joint, rope, mask = self.join(img, img_rope, cap, cap_rope, cap_mask)
        for block in self.layers:
            joint = block(joint, rope, mask, c)

        out = self.final_layer(joint[:, :n_img], c)                 # (B, N, p*p*C), image tokens only
        return self.unpatchify(out, H, W).to(x.dtype)

    def embed_captions(self, captions: list[Tensor]) -> tuple[Tensor, Rope, Tensor | None, list[int]]:
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
        rope = rope_angles(pos, self.cfg.axes_dims, self.cfg.rope_theta)
        mask = None
        if len(set(lens)) > 1:
            mask = torch.arange(max(lens), device=tokens.device)[None] < torch.tensor(lens, device=tokens.device)[:, None]
        return tokens, rope, mask, lens

    def embed_image(self, x: Tensor, cap_lens: list[int]) -> tuple[Tensor, Rope, int]:
        """Patchify (channel fastest), embed, pad to a multiple of seq_multiple with x_pad_token."""
        p = self.cfg.patch_size
        B, C, H, W = x.shape
        if H % p or W % p:
            raise ValueError(f"latent height and width must be multiples of {p}, got {H}x{W}")
        weight = self.x_embedder.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        patches = rearrange(x, "b c (h ph) (w pw) -> b (h w) (ph pw c)", ph=p, pw=p)
        tokens = self.x_embedder(patches.to(weight.device, dtype))
        n = tokens.shape[1]
        extra = _round_up(n, self.cfg.seq_multiple) - n
        tokens = torch.cat([tokens, self.x_pad_token.to(tokens.dtype).expand(B, extra, -1)], dim=1)
        pos = torch.stack([image_positions(H // p, W // p, n + extra, lp + 1, tokens.device) for lp in cap_lens])
        return tokens, rope_angles(pos, self.cfg.axes_dims, self.cfg.rope_theta), n

    @staticmethod
    def join(img: Tensor, img_rope: Rope, cap: Tensor, cap_rope: Rope, cap_mask: Tensor | None):
        """The joint sequence [image, caption]. Batch padding sits at the end of the caption part, so a
        key mask over the caption part is all the batch needs (official order; attention is order-free)."""
        tokens = torch.cat([img, cap], dim=1)
        rope = (torch.cat([img_rope[0], cap_rope[0]], 1), torch.cat([img_rope[1], cap_rope[1]], 1))
        mask = None
        if cap_mask is not None:
            mask = torch.cat([torch.ones(img.shape[:2], dtype=torch.bool, device=img.device), cap_mask], dim=1)
        return tokens, rope, mask

    def unpatchify(self, out: Tensor, H: int, W: int) -> Tensor:
        p = self.cfg.patch_size
        return rearrange(out, "b (h w) (ph pw c) -> b c (h ph) (w pw)", h=H // p, w=W // p, ph=p, pw=p)
