"""The CLIP the loaders return: core ComfyUI's own Z-Image text encoder (Qwen3-4B, clip type lumina2) and
tokenizer, sized from the file's shapes, holding the weights the pack's strict loader found and checked.

Core sizes its Qwen3 through `model_options["qwen3_4b_model_config"]`; the released qwen_3_4b file runs core's
class as is (heads of another width: nonrelease_sizes).
"""
from __future__ import annotations

from pathlib import Path

import comfy.sd
import comfy.supported_models_base
import comfy.text_encoders.z_image as z_image
import torch

from ..zimage_core.errors import CheckpointMismatch
from ..zimage_core.loading import prepare_text_encoder
from ..zimage_core.text_encoder import Qwen3Config
from . import nonrelease_sizes, quantized

# Prompts are kept whole, as ComfyUI keeps them (diffusers cuts at 512 tokens). The cap only keeps one pasted
# book from taking the server's memory: the text encoder's attention grows with the square of the length.
MAX_PROMPT_TOKENS = 4096


# Qwen's chat-template markers (<|im_end|>, <|endoftext|> ...) typed in a prompt stay plain text: a catalogue row
# must not end the user turn early or start another, and ComfyUI 0.3.75's NextDiT fails on a prompt holding the
# pad token (its attention mask then no longer matches the padded caption). A zero-width non-joiner after "<"
# keeps the characters and breaks only the marker; prompts without "<|" are tokenized exactly as core does.
MARKER, PLAIN_MARKER = "<|", "<\u200c|"


class ZImageTokenizer(z_image.ZImageTokenizer):
    """core's tokenizer (template, vocabulary, padding), with the pack's prompt-length cap; special-token
    markers in the prompt are kept as text."""

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        text = text.replace(MARKER, PLAIN_MARKER)
        tokens = super().tokenize_with_weights(text, return_word_ids=return_word_ids, **kwargs)
        n = sum(len(run) for runs in tokens.values() for run in runs)
        if n > MAX_PROMPT_TOKENS:
            raise ValueError(f"text: the prompt is {n} tokens long, over this pack's limit of {MAX_PROMPT_TOKENS}; "
                             f"shorten it (Z-Image was trained on prompts of up to 512 tokens, about 350 English "
                             f"words)")
        return tokens


def model_options(cfg: Qwen3Config, dtype: torch.dtype) -> dict:
    sizes = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.ffn_hidden,
                 num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                 rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps)
    options = {"dtype": dtype, "qwen3_4b_model_config": sizes}
    nonrelease_sizes.size_text_encoder(cfg, options)
    return options


def load_clip(source: str | Path, dtype: torch.dtype) -> comfy.sd.CLIP:
    """core's CLIP for a Qwen3-4B file. A quantized one (fp8_mixed) gets core's mixed-precision operations and
    its tensors as stored, as core's CLIPLoader gives them."""
    meta, report, read = prepare_text_encoder(source)          # strict key/shape check, config from shapes
    target = comfy.supported_models_base.ClipTarget(ZImageTokenizer, z_image.te())
    n_params = sum(p.numel() for p in meta.parameters())
    options = model_options(report.config, dtype)
    if report.quantization:
        return _quantized_clip(target, n_params, options, meta, report, read)
    clip = comfy.sd.CLIP(target=target, parameters=n_params, model_options=options)
    missing, unexpected = clip.load_sd({key: read(key) for key in meta.state_dict()})
    _check_taken(report.file, missing, unexpected)
    return clip


def _quantized_clip(target, n_params: int, options: dict, meta, report, read) -> comfy.sd.CLIP:
    """The file's tensors as stored, declarations in the running ComfyUI's form, loaded while core builds the
    CLIP (its mixed-precision Linears have no weight until loaded, and core moves the model at construction)."""
    q = report.quantization
    quantized.check_computable(q, report.file, "qwen_3_4b.safetensors")
    options.update(quantized.clip_options(q))
    file_keys = [read.names[k] for k in meta.state_dict()] + [k for k in read.stored_keys if q.format_of(k)]
    ours = {src: our for our, src in read.names.items()}
    prefix = "model." if any(our != src for our, src in read.names.items()) else ""     # a bare Qwen3Model
    sd = {ours.get(k, prefix + k): v for k, v in quantized.stored_tensors(q, file_keys, read.stored_many).items()}
    clip = quantized.build_clip(target, n_params, options, sd)
    loaded = clip.cond_stage_model.qwen3_4b.transformer.state_dict()
    _check_taken(report.file, sorted(set(meta.state_dict()) - set(loaded)), [])
    layers = dict(clip.cond_stage_model.qwen3_4b.transformer.named_modules())
    plain = [layer for layer in q.layers if not quantized.is_quantized_weight(layers[prefix + layer].weight)]
    if plain:
        raise CheckpointMismatch(f"{report.file}: ComfyUI did not take layers {plain[:3]} as quantized; this ComfyUI "
                                 f"version reads the file differently: report it with the version")
    return clip


def _check_taken(file: str, missing, unexpected) -> None:
    if missing or unexpected:
        raise CheckpointMismatch(f"{file}: ComfyUI's Qwen3 text encoder does not take this file's tensors "
                                 f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); this ComfyUI "
                                 f"version builds it differently: report it with the version")
