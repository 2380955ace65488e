"""Prompt tokenisation with the ``tokenizers`` library, shared by the reference and the runtime.

SDXL has two CLIP tokenizers. Both pad and truncate to 77 tokens; they differ in
their pad token (``<|endoftext|>`` for the first, ``!`` for the second), which
matters because the second text encoder pools at the first end-of-text token.
A bundle stores each as one ``tokenizer.json`` with its padding and truncation
already set, so the runtime needs nothing but this file.

A prompt past 77 tokens is cut; :meth:`PromptTokenizer.warn_truncated` says so
and quotes the dropped part (the reference and the runtime call it on every
prompt and negative prompt).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from tokenizers import Tokenizer

MAX_LENGTH = 77


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used as an SDXL prompt tokenizer."""


class PromptTruncatedWarning(UserWarning):
    """A prompt longer than the text encoders take; the message quotes the part that was dropped."""


class PromptTokenizer:
    """Prompts -> ``int64 (N, 77)`` token ids, padded and truncated like CLIP's."""

    def __init__(self, tokenizer: Tokenizer, max_length: int = MAX_LENGTH):
        padding = tokenizer.padding
        if padding is None:
            raise TokenizerError("the tokenizer has no padding configured; export it with configure_padding()")
        self.max_length = max_length
        self.pad_id = int(padding["pad_id"])
        tokenizer.enable_padding(pad_id=self.pad_id, pad_token=padding["pad_token"], length=max_length)
        tokenizer.enable_truncation(max_length=max_length)
        self.tokenizer = tokenizer

    @classmethod
    def from_file(cls, path: Union[str, Path], max_length: int = MAX_LENGTH) -> "PromptTokenizer":
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{path} is not a valid tokenizer.json: {e}") from None
        return cls(tok, max_length)

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        enc = self.tokenizer.encode_batch(list(prompts))
        return np.array([e.ids for e in enc], dtype=np.int64)

    def dropped_text(self, prompt: str) -> str:
        """The part of ``prompt`` past the token limit (cut off by truncation), or ``""``."""
        enc = self.tokenizer.encode(prompt)
        if not enc.overflowing:
            return ""
        kept = [end for (_, end), special in zip(enc.offsets, enc.special_tokens_mask) if not special]
        return prompt[max(kept) if kept else 0:].strip()

    def warn_truncated(self, prompts: Sequence[str], what: str = "prompt") -> None:
        """A :class:`PromptTruncatedWarning` per prompt that does not fit, quoting what is dropped (as diffusers does)."""
        for prompt in prompts:
            dropped = self.dropped_text(prompt)
            if dropped:
                warnings.warn(
                    f"the {what} is longer than the text encoders' {self.max_length} tokens; this part was dropped: "
                    f"{dropped!r}",
                    PromptTruncatedWarning,
                    stacklevel=3,
                )

    def save(self, path: Union[str, Path]) -> None:
        self.tokenizer.save(str(path))


def configure_padding(tokenizer: Tokenizer, pad_token: str, max_length: int = MAX_LENGTH) -> Tokenizer:
    """Set CLIP-style padding (to ``max_length`` with ``pad_token``) and truncation."""
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
        raise TokenizerError(f"pad token {pad_token!r} is not in the vocabulary")
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token, length=max_length)
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer
