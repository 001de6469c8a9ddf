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


# GGUF token types (llama.cpp `llama_token_type`): which vocabulary entries are not plain BPE pieces.
GGUF_TOKEN_NORMAL, GGUF_TOKEN_UNKNOWN, GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER_DEFINED = 1, 2, 3, 4

# Pre-tokenizer splits by `tokenizer.ggml.pre` (the names llama.cpp's converter gives to a model's
# pre-tokenizer). "gpt2": the GPT-2 regex. "digits": each digit its own piece, then the GPT-2 regex
# (SmolLM/StarCoder; llama.cpp lists the same regex pair for these names). "llama3"/"qwen2": the
# Llama 3 regex with numbers in runs of at most three digits, or of any length for Qwen2.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_STYLES = {
    "default": "gpt2", "gpt2": "gpt2", "gpt-2": "gpt2",
    "smollm": "digits", "starcoder": "digits", "refact": "digits", "codeshell": "digits",
    "llama-bpe": "llama3", "llama3": "llama3", "smaug-bpe": "llama3", "dbrx": "llama3",
    "qwen2": "qwen2",
}


def _byte_level_pre_tokenizer(style: str):
    from tokenizers import Regex, pre_tokenizers

    if style == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if style == "digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    pattern = _LLAMA3_SPLIT if style == "llama3" else _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


class BPETokenizer:
    """Byte-level BPE (GPT-2 style: bytes mapped to printable unicode, then merges), a thin wrapper
    around a `tokenizers.Tokenizer` exposing the common tokenizer interface.

    `encode` never adds BOS/EOS (callers prepend `bos_id` themselves), but special tokens written in
    the text (e.g. `<|im_start|>`) encode as their single ids, so chat prompts tokenize as the model
    was trained. `chat_template` is the model's Jinja template string when the source had one.
    """

    def __init__(self, tokenizer, *, bos_id: int | None, eos_id: int | None, pad_id: int | None = None,
                 chat_template: str | None = None, name: str | None = None):
        import hashlib

        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.chat_template = chat_template
        # The name identifies the id space and the splitting rules (stored with activations), so it is
        # a hash of the serialized tokenizer rather than of the file it came from.
        digest = hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()[:12]
        self.name = name or f"bpe-{self.vocab_size}-{digest}"

    @classmethod
    def from_gguf_fields(cls, *, tokens: list[str], merges: list[str], token_types: list[int] | None,
                         pre: str | None, bos_id: int | None, eos_id: int | None, pad_id: int | None = None,
                         chat_template: str | None = None) -> "BPETokenizer":
        """Build from the `tokenizer.ggml.*` metadata of a GGUF whose `tokenizer.ggml.model` is "gpt2".

        CONTROL tokens become special added tokens and USER_DEFINED tokens plain added tokens, which
        is how llama.cpp matches them in raw text before BPE runs.
        """
        from tokenizers import AddedToken, Tokenizer, decoders, models

        style = PRE_TOKENIZER_STYLES.get(pre or "default")
        if style is None:
            raise ValueError(f"GGUF tokenizer pre-tokenizer {pre!r} is not supported; supported values of "
                             f"tokenizer.ggml.pre: {sorted(PRE_TOKENIZER_STYLES)}. Convert the model to a local HF "
                             "directory with a tokenizer.json instead.")
        vocab = {tok: i for i, tok in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
        tk.pre_tokenizer = _byte_level_pre_tokenizer(style)
        tk.decoder = decoders.ByteLevel()
        types = list(token_types) if token_types is not None else [GGUF_TOKEN_NORMAL] * len(tokens)
        added = [AddedToken(tokens[i], special=(t == GGUF_TOKEN_CONTROL), normalized=False)
                 for i, t in enumerate(types) if t in (GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER_DEFINED)]
        tk.add_tokens(added)
        return cls(tk, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, chat_template=chat_template)

    @classmethod
    def from_file(cls, path, *, bos_id: int | None, eos_id: int | None, pad_id: int | None = None,
                  chat_template: str | None = None) -> "BPETokenizer":
        """Load a HF `tokenizer.json`."""
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)), bos_id=bos_id, eos_id=eos_id, pad_id=pad_id,
                   chat_template=chat_template)

    def save(self, path) -> None:
        """Write a HF `tokenizer.json`."""
        self.tokenizer.save(str(path))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_str(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(int(token_id))

    def token_id(self, token: str) -> int | None:
        """Id of a raw vocabulary entry (e.g. "<|im_start|>"), or None."""
        return self.tokenizer.token_to_id(token)
