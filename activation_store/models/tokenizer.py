"""Tokenizers. Every tokenizer exposes the same small interface:

encode(text) -> list[int] (no special tokens added), decode(ids) -> str,
token_str(id) -> str (the raw vocabulary entry), bos_id, eos_id, pad_id, vocab_size, name.
"""
from __future__ import annotations


class ByteTokenizer:
    """UTF-8 bytes shifted by 3 (0 = pad, 1 = BOS, 2 = EOS): for tiny random-weight test models."""

    offset = 3

    def __init__(self, vocab_size: int = 259):
        if vocab_size < 256 + self.offset:
            raise ValueError(f"ByteTokenizer needs vocab_size >= {256 + self.offset}, got {vocab_size}")
        self.vocab_size = vocab_size
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.name = f"bytes-{vocab_size}"

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        data = bytes(int(i) - self.offset for i in ids if self.offset <= int(i) < 256 + self.offset)
        return data.decode("utf-8", errors="replace")

    def token_str(self, token_id: int) -> str:
        return self.decode([token_id]) if token_id >= self.offset else ["<pad>", "<s>", "</s>"][token_id]
