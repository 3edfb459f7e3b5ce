"""Prompt tokenizer for the Qwen3 text encoder: Qwen2 byte-level BPE (via the `tokenizers` library) + chat template.

Source of truth for the prompt template and for how a tokenizer folder (diffusers or ComfyUI's copy) is read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

# What the official pipeline gets from `apply_chat_template(..., add_generation_prompt=True, enable_thinking=True)`;
# ComfyUI hard-codes the same string (reference §3).
PROMPT_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"

# Qwen2's pre-tokenizer split (the published Qwen2 tokenizer definition). Digits are split one by one.
_QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
_PAD_TOKEN = "<|endoftext|>"
_TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>")
_BPE_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")


class PromptTokenizer:
    """Turns a user prompt into the encoder's input ids, template included, with no BOS and no padding."""

    def __init__(self, tokenizer: Tokenizer):
        for token in (*_TEMPLATE_TOKENS, _PAD_TOKEN):
            if tokenizer.token_to_id(token) is None:
                raise ValueError(f"tokenizer has no '{token}' token; is this a Qwen tokenizer?")
        self._tok = tokenizer
        prefix, suffix = PROMPT_TEMPLATE.split("{}")
        # Template token counts, used to truncate only the prompt part (see `encode`).
        self._n_prefix = len(self._ids(prefix))
        self._n_suffix = len(self._ids(suffix))

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "PromptTokenizer":
        """Load `tokenizer.json` (diffusers folder) if present, else vocab.json + merges.txt + tokenizer_config.json
        (ComfyUI's `qwen25_tokenizer` copy)."""
        folder = Path(path)
        if (folder / "tokenizer.json").is_file():
            return cls(Tokenizer.from_file(str(folder / "tokenizer.json")))
        missing = [name for name in _BPE_FILES if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"tokenizer folder '{folder}' lacks {', '.join(missing)}: expected either tokenizer.json "
                f"or all of {', '.join(_BPE_FILES)}")
        return cls(build_qwen2_bpe(folder))

    @property
    def pad_id(self) -> int:
        return self._tok.token_to_id(_PAD_TOKEN)

    def encode(self, prompt: str, max_tokens: int | None = None) -> list[int]:
        """Ids of `PROMPT_TEMPLATE.format(prompt)`.

        max_tokens: keep at most this many *prompt* tokens; the template's own tokens are always kept, so the
        result has at most max_tokens + 8 ids. (diffusers truncates the whole templated text at 512, which can cut
        off the template's end; ComfyUI does not truncate. None, the default, is ComfyUI's behaviour.)
        """
        if max_tokens is not None and max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        ids = self._ids(PROMPT_TEMPLATE.format(prompt))
        if max_tokens is None or len(ids) - self._n_prefix - self._n_suffix <= max_tokens:
            return ids
        # The suffix starts with a special token, so the last n_suffix ids are always exactly the suffix.
        return ids[: self._n_prefix + max_tokens] + ids[-self._n_suffix:]

    def _ids(self, text: str) -> list[int]:
        # add_special_tokens=False: a tokenizer.json post-processor must not add a BOS; the template has its own.
        return self._tok.encode(text, add_special_tokens=False).ids


def build_qwen2_bpe(folder: Path) -> Tokenizer:
    """Qwen2's byte-level BPE from vocab.json + merges.txt, plus the added tokens listed in tokenizer_config.json,
    configured so that its ids equal transformers' Qwen2Tokenizer on the same files."""
    vocab, merges = BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tok = Tokenizer(BPE(vocab, merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),   # the Split above already split
    ])
    tok.decoder = decoders.ByteLevel()
    _add_listed_tokens(tok, folder / "tokenizer_config.json")
    return tok


def _add_listed_tokens(tok: Tokenizer, config_path: Path) -> None:
    """Add `added_tokens_decoder` in id order; they sit right after the BPE vocab, so the ids must come out equal."""
    listed = json.loads(config_path.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
    for token_id, spec in sorted(listed.items(), key=lambda kv: int(kv[0])):
        token = AddedToken(spec["content"], single_word=spec.get("single_word", False),
                           lstrip=spec.get("lstrip", False), rstrip=spec.get("rstrip", False),
                           normalized=spec.get("normalized", False), special=spec.get("special", False))
        if token.special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
        got = tok.token_to_id(spec["content"])
        if got != int(token_id):
            raise ValueError(f"{config_path}: added token '{spec['content']}' is listed as id {token_id} but got "
                             f"id {got}; the vocab and tokenizer_config.json do not belong together")
