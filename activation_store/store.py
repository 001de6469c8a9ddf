"""The HDF5 activation store: one file per harvest, written crash-safely, read as shuffled batches.

Layout (N contexts of length T, token row r = ctx·T + t, t = 0 is BOS):

    /tokens              [N, T]      int32    token ids, right-padded
    /n_valid             [N]         int32    real tokens per context (BOS included)
    /doc_id              [N]         int64    source document of each context
    /label               [N]         int32    document label, -1 = none (names in attr label_names)
    /acts/<hook>         [N·T, d]    float16|float32, chunked (k·T rows per chunk), padding rows are 0
    /n_committed         []          int64    contexts [0, n_committed) are complete and visible
    /commit_crc          [C, H]      uint32   CRC-32 of each commit's rows of each hook (C commits)
    /stats/<hook>/mean   [d]         float64  cached mean over train rows without BOS
    /stats/<hook>/info   [4]         float64  (valid, n_committed when computed, n_rows, mean ‖x‖²)
    root attributes: format, format_version, model_id, weights_hash, hooks, dims (JSON hook→d),
        context_length, dtype, tokenizer, bos_id, corpus_fingerprint, corpus_source, label_names,
        harvest_config (JSON), val_fraction, n_contexts, n_tokens, commit_contexts.

Crash safety. Every dataset is allocated at its final size when the file is created (early
allocation, fixed shapes, no filters, no timestamps) and every attribute is written then; the
skeleton is built under a temporary name and renamed into place. After that, writing never changes
HDF5 metadata, only raw bytes at fixed offsets: a commit writes its rows and CRCs, flushes and
fsyncs, and only then writes the 8-byte counter /n_committed (and flushes again). A process killed
at any moment therefore leaves a file whose first n_committed contexts are complete; rows past the
counter are ignored by readers and rewritten on resume. (The committed counter is a one-element
dataset rather than an attribute because rewriting an attribute is a metadata change.)

Train/val split: context c is in val iff splitmix64(c + salt)/2^64 < val_fraction (default 0.05),
so the split is fixed by the file and independent of the reader.
"""
from __future__ import annotations

import atexit
import json
import math
import os
import queue
import threading
import weakref
import zlib
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import h5py
import numpy as np

from featureatlas.activation_store.corpus import corpus_fingerprint

FORMAT = "featureatlas-activation-store"
FORMAT_VERSION = 1
DTYPES = ("float16", "float32")
FLOAT16_MAX = float(np.finfo(np.float16).max)
SPLIT_SALT = 0x5EED_F00D
# Root attributes that must agree for a harvest to append to (resume) an existing store.
IDENTITY_KEYS = ("model_id", "weights_hash", "hooks", "dims", "context_length", "dtype", "tokenizer",
                 "corpus_fingerprint", "val_fraction", "commit_contexts", "harvest_config")
# Each acts chunk holds a power-of-two number of contexts, about this many bytes.
CHUNK_TARGET_BYTES = 1 << 20


class StoreError(ValueError):
    """A store that cannot be used as asked."""


class StoreCorruptedError(StoreError):
    """The file is not a readable, self-consistent store."""


class StoreMismatchError(StoreError):
    """An existing store was made with different settings than the ones asked for."""


# ---------------------------------------------------------------------------------------------
# Small pure helpers


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele, Lea & Flood 2014): a well-mixed 64-bit hash of integers."""
    z = np.asarray(x, np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def val_context_mask(n_contexts: int, val_fraction: float) -> np.ndarray:
    """Boolean [n_contexts]: True for validation contexts (hash of the index below the fraction)."""
    u = (splitmix64(np.arange(n_contexts, dtype=np.uint64) + np.uint64(SPLIT_SALT)) >> np.uint64(11))
    return u.astype(np.float64) * 2.0**-53 < val_fraction


def row_mask(n_valid_N: np.ndarray, context_length: int, contexts_N: np.ndarray, exclude_bos: bool) -> np.ndarray:
    """Boolean [N, T]: real (non-padding) positions of the chosen contexts, BOS dropped if asked."""
    t = np.arange(context_length)[None, :]
    start = 1 if exclude_bos else 0
    return (t >= start) & (t < n_valid_N[:, None]) & contexts_N[:, None]


def chunk_contexts(context_length: int, dim: int, itemsize: int, n_contexts: int,
                   chunk_bytes: int = CHUNK_TARGET_BYTES) -> int:
    """Contexts per HDF5 chunk: the largest power of two whose chunk stays within `chunk_bytes`."""
    per_context = context_length * dim * itemsize
    k = max(1, chunk_bytes // per_context)
    return int(min(2 ** int(math.log2(k)), n_contexts))


def crc32(arr: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(arr).view(np.uint8)) & 0xFFFFFFFF


JSON_ATTRS = ("hooks", "dims", "label_names", "harvest_config", "model_config")


def _attr_value(key: str, value):
    """Root attributes are plain scalars and strings; lists and dicts are stored as JSON text."""
    if key in JSON_ATTRS or isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    if value is None:
        return ""
    return value


def _decode_attrs(raw: Mapping) -> dict:
    out = {}
    for key, value in raw.items():
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, np.generic):
            value = value.item()
        if key in JSON_ATTRS and isinstance(value, str):
            value = json.loads(value) if value else None
        out[key] = value
    return out


def _fsync(f: h5py.File) -> None:
    try:
        os.fsync(f.id.get_vfd_handle())
    except (OSError, ValueError, TypeError):  # a non-POSIX driver: the flush is all we can do
        pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def corrupted(path, detail: str) -> StoreCorruptedError:
    return StoreCorruptedError(
        f"store {path} is truncated or corrupted: {detail}; delete it and harvest again "
        "(`featureatlas harvest ... --overwrite`)")


# ---------------------------------------------------------------------------------------------
# Creating and writing


def create_store(
    path,
    *,
    tokens_NxT: np.ndarray,
    n_valid_N: np.ndarray,
    doc_id_N: np.ndarray,
    label_N: np.ndarray,
    label_names: Sequence[str],
    dims: Mapping[str, int],
    dtype: str,
    attrs: Mapping,
    commit_contexts: int = 64,
    val_fraction: float = 0.05,
    bos_id: int | None = None,
    tokenizer: str = "",
    chunk_bytes: int = CHUNK_TARGET_BYTES,
) -> Path:
    """Write the complete skeleton of a store (every dataset allocated, n_committed = 0).

    Built under `<path>.creating` and renamed into place, so `path` is either absent or a valid
    store. Deterministic: the same arguments give the same bytes.
    """
    path = Path(path)
    dtype = str(np.dtype(dtype))
    if dtype not in DTYPES:
        raise StoreError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    tokens_NxT = np.ascontiguousarray(tokens_NxT, np.int32)
    if tokens_NxT.ndim != 2 or tokens_NxT.shape[0] == 0:
        raise StoreError(f"tokens must be a non-empty [n_ctx, T] array, got shape {tokens_NxT.shape}")
    N, T = tokens_NxT.shape
    arrays = {"n_valid": (n_valid_N, np.int32), "doc_id": (doc_id_N, np.int64), "label": (label_N, np.int32)}
    for name, (arr, _) in arrays.items():
        if np.shape(arr) != (N,):
            raise StoreError(f"{name} must have shape ({N},), got {np.shape(arr)}")
    if not dims:
        raise StoreError("a store needs at least one hook")
    if commit_contexts < 1:
        raise StoreError(f"commit_contexts must be positive, got {commit_contexts}")
    hooks = list(dims)
    itemsize = np.dtype(dtype).itemsize
    n_commits = -(-N // commit_contexts)
    root = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_id": "",
        "weights_hash": "",
        "tokenizer": tokenizer,
        "hooks": hooks,
        "dims": {h: int(dims[h]) for h in hooks},
        "context_length": int(T),
        "dtype": dtype,
        "bos_id": -1 if bos_id is None else int(bos_id),
        "label_names": list(label_names),
        "val_fraction": float(val_fraction),
        "n_contexts": int(N),
        "n_tokens": int(np.asarray(n_valid_N).sum()),
        "commit_contexts": int(commit_contexts),
        "corpus_fingerprint": corpus_fingerprint(tokens_NxT, n_valid_N, doc_id_N, label_N, label_names, tokenizer),
        "harvest_config": {},
    }
    fixed = ("format", "format_version", "hooks", "dims", "context_length", "dtype", "n_contexts", "n_tokens",
             "commit_contexts", "corpus_fingerprint", "label_names", "val_fraction")
    clash = [k for k in attrs if k in fixed and json.dumps(attrs[k]) != json.dumps(root[k])]
    if clash:
        raise StoreError(f"attrs may not override the store's own {clash} (given {[attrs[k] for k in clash]})")
    root.update(attrs)
    tmp = path.with_name(path.name + ".creating")
    path.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        tmp.unlink()
    with h5py.File(tmp, "w") as f:
        for key, value in root.items():
            f.attrs[key] = _attr_value(key, value)
        f.create_dataset("tokens", data=tokens_NxT, track_times=False)
        for name, (arr, dt) in arrays.items():
            f.create_dataset(name, data=np.asarray(arr, dt), track_times=False)
        f.create_dataset("n_committed", data=np.int64(0), track_times=False)
        f.create_dataset("commit_crc", data=np.zeros((n_commits, len(hooks)), np.uint32), track_times=False)
        acts = f.create_group("acts")
        stats = f.create_group("stats")
        for hook in hooks:
            d = int(dims[hook])
            k = chunk_contexts(T, d, itemsize, N, chunk_bytes)
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # all chunks exist now: writes touch no metadata
            acts.create_dataset(hook, shape=(N * T, d), dtype=dtype, chunks=(k * T, d), dcpl=dcpl,
                                fill_time="never", track_times=False)
            g = stats.create_group(hook)
            g.create_dataset("mean", data=np.zeros(d, np.float64), track_times=False)
            g.create_dataset("info", data=np.zeros(4, np.float64), track_times=False)
        f.flush()
        _fsync(f)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


class StoreWriter:
    """Appends committed contexts to a store created by `create_store` (one writer at a time).

    `commit(c0, c1, acts)` writes contexts [c0, c1) for every hook; it must continue exactly at
    the committed counter and cover one commit block (`commit_contexts` contexts, fewer at the end).
    `on_phase(name, commit_index)` is called between the steps (for crash tests).
    """

    def __init__(self, path, *, fsync: bool = True, on_phase=None):
        self.path = Path(path)
        try:
            self.file = h5py.File(self.path, "r+")
        except OSError as err:
            if "lock" in str(err).lower():
                raise StoreError(f"store {self.path} is open for writing in another process (a harvest still "
                                 "running?); wait for it or stop it, then run the command again") from None
            raise corrupted(self.path, str(err)) from None
        self.attrs = _decode_attrs(self.file.attrs)
        self.hooks = list(self.attrs["hooks"])
        self.T = int(self.attrs["context_length"])
        self.N = int(self.attrs["n_contexts"])
        self.commit_contexts = int(self.attrs["commit_contexts"])
        self.fsync = fsync
        self.on_phase = on_phase or (lambda name, index: None)

    @property
    def n_committed(self) -> int:
        return int(self.file["n_committed"][()])

    def commit(self, c0: int, c1: int, acts: Mapping[str, np.ndarray]) -> None:
        index = c0 // self.commit_contexts
        if c0 != self.n_committed or c0 % self.commit_contexts or c1 != min(c0 + self.commit_contexts, self.N):
            raise StoreError(f"commit [{c0}, {c1}) does not continue the store at context {self.n_committed} "
                             f"in blocks of {self.commit_contexts}")
        crcs = np.zeros(len(self.hooks), np.uint32)
        for j, hook in enumerate(self.hooks):
            ds = self.file["acts"][hook]
            rows = np.ascontiguousarray(acts[hook], ds.dtype)
            if rows.shape != ((c1 - c0) * self.T, ds.shape[1]):
                raise StoreError(f"{hook}: expected rows of shape {((c1 - c0) * self.T, ds.shape[1])}, got {rows.shape}")
            ds.write_direct(rows, dest_sel=np.s_[c0 * self.T:c1 * self.T])
            crcs[j] = crc32(rows)
            self.on_phase("hook_written", index)
        self.file["commit_crc"].write_direct(crcs[None], dest_sel=np.s_[index:index + 1])
        self.file.flush()
        if self.fsync:
            _fsync(self.file)
        self.on_phase("rows_flushed", index)
        # Only now do the rows become visible.
        self.file["n_committed"].write_direct(np.array(c1, np.int64))
        self.file.flush()
        if self.fsync:
            _fsync(self.file)
        self.on_phase("committed", index)

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()


def write_store(
    path,
    acts: Mapping[str, np.ndarray],
    tokens,
    doc_ids=None,
    labels=None,
    label_names: Sequence[str] = (),
    attrs: Mapping | None = None,
    *,
    n_valid=None,
    dtype: str | None = None,
    commit_contexts: int = 64,
    val_fraction: float = 0.05,
    bos_id: int | None = None,
    chunk_bytes: int = CHUNK_TARGET_BYTES,
) -> "ActivationStore":
    """Write a complete store from in-memory arrays (synthetic data, tests, benchmarks).

    acts: {hook: [n_ctx·T, d]}; tokens: [n_ctx, T]; doc_ids default to 0..n_ctx-1, labels to -1,
    n_valid to T (no padding); dtype defaults to float16 if every array is float16, else float32.
    """
    tokens = np.asarray(tokens, np.int32)
    N, T = tokens.shape
    doc_ids = np.arange(N, dtype=np.int64) if doc_ids is None else np.asarray(doc_ids, np.int64)
    labels = np.full(N, -1, np.int32) if labels is None else np.asarray(labels, np.int32)
    n_valid = np.full(N, T, np.int32) if n_valid is None else np.asarray(n_valid, np.int32)
    if dtype is None:
        dtype = "float16" if all(np.asarray(a).dtype == np.float16 for a in acts.values()) else "float32"
    dims = {}
    for hook, a in acts.items():
        if np.ndim(a) != 2 or np.shape(a)[0] != N * T:
            raise StoreError(f"acts[{hook!r}] must have shape [n_ctx*T={N * T}, d], got {np.shape(a)}")
        dims[hook] = int(np.shape(a)[1])
    path = Path(path)
    create_store(path, tokens_NxT=tokens, n_valid_N=n_valid, doc_id_N=doc_ids, label_N=labels,
                 label_names=label_names, dims=dims, dtype=dtype, attrs=dict(attrs or {}),
                 commit_contexts=commit_contexts, val_fraction=val_fraction, bos_id=bos_id, chunk_bytes=chunk_bytes)
    writer = StoreWriter(path, fsync=False)
    try:
        for c0 in range(0, N, commit_contexts):
            c1 = min(c0 + commit_contexts, N)
            writer.commit(c0, c1, {h: np.asarray(a)[c0 * T:c1 * T] for h, a in acts.items()})
    finally:
        writer.close()
    return ActivationStore.open(path)


def check_compatible(stored: Mapping, expected: Mapping, path) -> None:
    """Refuse to append to a store made with different settings, naming every difference."""
    diffs, named = [], set()
    for key in IDENTITY_KEYS:
        if key not in expected or key == "harvest_config":
            continue
        have, want = stored.get(key), expected[key]
        if _canonical(have) != _canonical(want):
            diffs.append(f"{key}: store has {have!r}, this run asks for {want!r}")
            named.add(key)
    if "harvest_config" in expected:
        have = _flatten(stored.get("harvest_config") or {})
        want = _flatten(json.loads(_canonical(expected["harvest_config"])))
        for sub in sorted(set(have) | set(want)):
            if sub.rsplit(".", 1)[-1] in named or _canonical(have.get(sub)) == _canonical(want.get(sub)):
                continue
            diffs.append(f"{sub}: store has {have.get(sub)!r}, this run asks for {want.get(sub)!r}")
    if diffs:
        raise StoreMismatchError(
            f"store {path} was harvested with different settings, refusing to append:\n  "
            + "\n  ".join(diffs) + "\nUse the original settings to resume, --overwrite to start again, "
            "or --out for a new file.")


def _flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# Reading


class ActivationStore:
    """Read access to a store; only committed contexts (c < n_committed) are visible."""

    def __init__(self, path: Path, attrs: dict, tokens, n_valid, doc_ids, labels, n_committed: int):
        self.path = path
        self._attrs = attrs
        self.n_committed = n_committed
        self.n_planned = int(attrs["n_contexts"])
        self.context_length = int(attrs["context_length"])
        self.hooks = tuple(attrs["hooks"])
        self.dtype = str(attrs["dtype"])
        self.label_names = tuple(attrs.get("label_names") or ())
        self.val_fraction = float(attrs["val_fraction"])
        self.tokens = tokens[:n_committed]
        self.n_valid = n_valid[:n_committed]
        self.doc_ids = doc_ids[:n_committed]
        self.labels = labels[:n_committed]
        self._stats: dict[str, tuple[np.ndarray, float]] = {}
        self._h5: h5py.File | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        hooks = ", ".join(f"{h}:{self._attrs['dims'][h]}" for h in self.hooks)
        return (f"ActivationStore({str(self.path)!r}, {self.n_committed}/{self.n_planned} contexts x "
                f"{self.context_length}, {self.dtype}, hooks [{hooks}])")

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, path) -> "ActivationStore":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no activation store at {path}: run `featureatlas harvest ... --out {path}` first")
        try:
            f = h5py.File(path, "r", locking=False)
        except OSError as err:
            raise corrupted(path, str(err)) from None
        try:
            with f:
                if f.attrs.get("format") != FORMAT:
                    raise corrupted(path, f"not a featureatlas store (format attribute {f.attrs.get('format')!r})")
                attrs = _decode_attrs(f.attrs)
                if attrs.get("format_version") != FORMAT_VERSION:
                    raise StoreError(f"store {path} has format version {attrs.get('format_version')}, "
                                     f"this featureatlas reads version {FORMAT_VERSION}; harvest it again")
                problems = _layout_problems(f, attrs)
                if problems:
                    raise corrupted(path, "; ".join(problems))
                arrays = [f[name][()] for name in ("tokens", "n_valid", "doc_id", "label")]
                n_committed = int(f["n_committed"][()])
        except (OSError, KeyError, RuntimeError) as err:
            raise corrupted(path, f"{type(err).__name__}: {err}") from None
        return cls(path, attrs, *arrays, n_committed)

    def _handle(self) -> h5py.File:
        with self._lock:
            if self._h5 is None or not self._h5.id.valid:
                self._h5 = h5py.File(self.path, "r", locking=False)
            return self._h5

    def close(self) -> None:
        with self._lock:
            if self._h5 is not None and self._h5.id.valid:
                self._h5.close()
            self._h5 = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- metadata -----------------------------------------------------------------------------

    @property
    def attrs(self) -> dict:
        return {**self._attrs, "n_committed": self.n_committed}

    @property
    def fingerprint(self) -> str:
        return str(self._attrs["corpus_fingerprint"])

    @property
    def n_contexts(self) -> int:
        return self.n_committed

    @property
    def complete(self) -> bool:
        return self.n_committed == self.n_planned

    @property
    def model_id(self) -> str:
        return str(self._attrs.get("model_id", ""))

    @property
    def weights_hash(self) -> str:
        return str(self._attrs.get("weights_hash", ""))

    @property
    def harvest_config(self) -> dict:
        return dict(self._attrs.get("harvest_config") or {})

    def dim(self, hook: str) -> int:
        self.check_hook(hook)
        return int(self._attrs["dims"][hook])

    def check_hook(self, hook: str) -> None:
        """Raise StoreError naming the store's hooks unless `hook` is one of them."""
        if hook not in self.hooks:
            raise StoreError(f"store {self.path} has no hook {hook!r}; it has {', '.join(self.hooks)}")

    def context_split(self, split: str = "train") -> np.ndarray:
        """Boolean [n_contexts]: the committed contexts in `split` ("train", "val" or "all")."""
        val = val_context_mask(self.n_committed, self.val_fraction)
        if split == "train":
            return ~val
        if split == "val":
            return val
        if split == "all":
            return np.ones(self.n_committed, bool)
        raise StoreError(f"split must be 'train', 'val' or 'all', got {split!r}")

    def token_rows(self, split: str = "train", exclude_bos: bool = True) -> np.ndarray:
        """Sorted int64 row indices (ctx·T + t) of the real tokens of `split`."""
        mask = row_mask(self.n_valid, self.context_length, self.context_split(split), exclude_bos)
        return np.flatnonzero(mask.ravel()).astype(np.int64)

    # -- reading ------------------------------------------------------------------------------

    def block_rows(self, hook: str) -> int:
        """Rows per HDF5 chunk of `hook` (the unit the shuffled reader permutes)."""
        return int(self._handle()["acts"][hook].chunks[0])

    def read_rows(self, hook: str, rows, dtype=np.float32) -> np.ndarray:
        """Activations of the given rows (any order, repeats allowed) as [len(rows), d]."""
        self.check_hook(hook)
        rows = np.asarray(rows, np.int64)
        limit = self.n_committed * self.context_length
        if rows.size and (rows.min() < 0 or rows.max() >= limit):
            raise StoreError(f"row indices must lie in [0, {limit}) (committed rows of {self.path})")
        ds = self._handle()["acts"][hook]
        return _gather(ds, rows, int(ds.chunks[0]), limit, {}).astype(dtype, copy=False)

    def iter_chunks(self, hook: str, chunk_size: int, split: str = "train", exclude_bos: bool = True,
                    dtype=np.float32) -> Iterator[np.ndarray]:
        """The rows of `split` in store order, as arrays of `chunk_size` rows (the last may be shorter)."""
        self.check_hook(hook)
        if chunk_size < 1:
            raise StoreError(f"chunk_size must be positive, got {chunk_size}")
        rows = self.token_rows(split, exclude_bos)
        ds = self._handle()["acts"][hook]
        R, limit = int(ds.chunks[0]), self.n_committed * self.context_length
        pending, n_pending = [], 0
        starts = np.searchsorted(rows, np.arange(0, limit + R, R))
        for b in range(-(-limit // R)):
            sel = rows[starts[b]:starts[b + 1]]
            if not sel.size:
                continue
            block = ds[b * R:min((b + 1) * R, limit)]
            pending.append(block[sel - b * R])
            n_pending += sel.size
            while n_pending >= chunk_size:
                cat = np.concatenate(pending)
                yield cat[:chunk_size].astype(dtype, copy=False)
                pending, n_pending = [cat[chunk_size:]], n_pending - chunk_size
        if n_pending:
            yield np.concatenate(pending).astype(dtype, copy=False)

    def batches(self, hook: str, batch_size: int, *, shuffle: bool = True, seed: int = 0, start_step: int = 0,
                split: str = "train", exclude_bos: bool = True, sharding=None, dtype=np.float32,
                shuffle_buffer_rows: int = 1 << 16, prefetch: int = 4) -> "BatchIterator":
        """Infinite iterator of jax arrays [batch_size, d]; epochs follow one another seamlessly.

        Order: per epoch, the HDF5 chunks (blocks of rows) are permuted by (seed, epoch); consecutive
        runs of blocks totalling ~`shuffle_buffer_rows` rows form a buffer whose selected rows are
        permuted by (seed, epoch, buffer index). Every selected row appears exactly once per epoch.
        Batch i holds stream positions [i·B, (i+1)·B), so `start_step=i` resumes exactly at batch i
        without reading the skipped data. With `sharding` (a NamedSharding over the batch axis) the
        batch is placed across devices; with several processes each reads only its own rows.
        """
        self.check_hook(hook)
        if batch_size < 1:
            raise StoreError(f"batch_size must be positive, got {batch_size}")
        rows = self.token_rows(split, exclude_bos)
        if rows.size == 0:
            raise StoreError(f"split {split!r} of {self.path} has no rows (n_committed={self.n_committed}); "
                             "harvest more contexts or use split='all'")
        R = self.block_rows(hook)
        n_blocks = -(-(self.n_committed * self.context_length) // R)
        plan = ShufflePlan(rows, R, n_blocks, max(1, shuffle_buffer_rows // R), shuffle, seed)
        source = _batch_source(self.path, hook, plan, batch_size, start_step, self.dim(hook), sharding, dtype,
                               self.n_committed * self.context_length)
        return BatchIterator(source, prefetch)

    # -- statistics ---------------------------------------------------------------------------

    def stats(self, hook: str) -> tuple[np.ndarray, float]:
        """(mean_D, mean squared norm E‖x‖²) over the train split without BOS, float64.

        Computed once and cached in /stats/<hook> (a raw write into pre-allocated space); when the
        file cannot be opened for writing it is cached in memory only.
        """
        self.check_hook(hook)
        if hook in self._stats:
            return self._stats[hook]
        f = self._handle()
        info = f["stats"][hook]["info"][()]
        if info[0] == 1.0 and int(info[1]) == self.n_committed:
            result = (f["stats"][hook]["mean"][()], float(info[3]))
        else:
            total, sq, n = np.zeros(self.dim(hook), np.float64), 0.0, 0
            rows_per_chunk = max(1, (64 << 20) // (8 * self.dim(hook)))  # ~64 MiB of float64 at a time
            for x in self.iter_chunks(hook, rows_per_chunk, "train", True, dtype=np.float64):
                total += x.sum(0)
                sq += float(np.einsum("nd,nd->", x, x))
                n += x.shape[0]
            if n == 0:
                raise StoreError(f"the train split of {self.path} is empty: cannot compute stats")
            result = (total / n, sq / n)
            self._persist_stats(hook, result[0], np.array([1.0, self.n_committed, n, result[1]]))
        self._stats[hook] = result
        return result

    def _persist_stats(self, hook: str, mean: np.ndarray, info: np.ndarray) -> None:
        self.close()  # HDF5 refuses a read-write open while this process holds a read-only one
        try:
            with h5py.File(self.path, "r+") as f:
                g = f["stats"][hook]
                g["mean"].write_direct(np.ascontiguousarray(mean, np.float64))
                f.flush()
                g["info"].write_direct(np.ascontiguousarray(info, np.float64))  # valid flag last
                f.flush()
        except OSError:
            pass  # read-only file or another open handle: keep the in-memory cache only

    # -- verification -------------------------------------------------------------------------

    def verify(self, check_values: bool = True) -> list[str]:
        """Problems found (empty list = the store is sound): metadata, counters, corpus fingerprint,
        per-commit CRCs and NaN/Inf in committed rows."""
        problems = []
        a, T, N = self._attrs, self.context_length, self.n_committed
        if not 0 <= N <= self.n_planned:
            problems.append(f"n_committed={N} outside [0, {self.n_planned}]")
        f = h5py.File(self.path, "r", locking=False)
        with f:
            tokens, n_valid = f["tokens"][()], f["n_valid"][()]
            doc_ids, labels = f["doc_id"][()], f["label"][()]
            fp = corpus_fingerprint(tokens, n_valid, doc_ids, labels, self.label_names, a.get("tokenizer", ""))
            if fp != a.get("corpus_fingerprint"):
                problems.append("tokens/n_valid/doc_id/label do not match corpus_fingerprint")
            if ((n_valid < 1) | (n_valid > T)).any():
                problems.append(f"n_valid outside [1, {T}]")
            if ((labels < -1) | (labels >= len(self.label_names))).any():
                problems.append("labels outside [-1, len(label_names))")
            if int(a.get("bos_id", -1)) >= 0 and (tokens[:, 0] != int(a["bos_id"])).any():
                problems.append("some contexts do not start with BOS")
            if int(a.get("n_tokens", -1)) != int(n_valid.sum()):
                problems.append(f"n_tokens attribute {a.get('n_tokens')} != sum(n_valid) {int(n_valid.sum())}")
            if not check_values:
                return problems
            C = int(a["commit_contexts"])
            crc_table = f["commit_crc"][()]
            for j, hook in enumerate(self.hooks):
                ds = f["acts"][hook]
                n_bad = 0
                for k, c0 in enumerate(range(0, N, C)):
                    c1 = min(c0 + C, N)
                    rows = ds[c0 * T:c1 * T]
                    if crc32(rows) != int(crc_table[k, j]):
                        problems.append(f"{hook}: contexts [{c0}, {c1}) fail their CRC check (data corrupted)")
                    bad = ~np.isfinite(rows)
                    if bad.any():
                        n_bad += int(bad.any(axis=1).sum())
                if n_bad:
                    problems.append(f"{hook}: {n_bad} committed rows hold NaN or Inf")
        return problems

    def summary(self) -> dict:
        """What `featureatlas store info` prints."""
        train = self.context_split("train")
        return {
            "path": str(self.path),
            "model_id": self.model_id,
            "weights_hash": self.weights_hash,
            "tokenizer": self._attrs.get("tokenizer", ""),
            "hooks": {h: self.dim(h) for h in self.hooks},
            "dtype": self.dtype,
            "context_length": self.context_length,
            "contexts": self.n_committed,
            "contexts_planned": self.n_planned,
            "committed_fraction": self.n_committed / self.n_planned,
            "tokens": int(self.n_valid.sum()),
            "train_contexts": int(train.sum()),
            "val_contexts": int((~train).sum()),
            "val_fraction": self.val_fraction,
            "documents": int(np.unique(self.doc_ids).size),
            "labels": {name: int((self.labels == i).sum()) for i, name in enumerate(self.label_names)},
            "corpus_fingerprint": self.fingerprint,
            "size_on_disk_mb": round(_disk_bytes(self.path) / 2**20, 3),
        }


def _disk_bytes(path: Path) -> int:
    st = os.stat(path)
    return min(st.st_size, getattr(st, "st_blocks", st.st_size // 512 + 1) * 512)


def _layout_problems(f: h5py.File, attrs: dict) -> list[str]:
    """Shape/dtype disagreements between the datasets and the root attributes."""
    problems = []
    try:
        N, T = int(attrs["n_contexts"]), int(attrs["context_length"])
        dims, hooks = attrs["dims"], list(attrs["hooks"])
    except (KeyError, TypeError, ValueError) as err:
        return [f"missing or malformed root attribute ({err})"]
    expect = {"tokens": (N, T), "n_valid": (N,), "doc_id": (N,), "label": (N,), "n_committed": ()}
    for name, shape in expect.items():
        if name not in f:
            problems.append(f"dataset /{name} missing")
        elif f[name].shape != shape:
            problems.append(f"/{name} has shape {f[name].shape}, expected {shape}")
    for hook in hooks:
        key = f"acts/{hook}"
        if key not in f or f"stats/{hook}/info" not in f:
            problems.append(f"dataset /{key} or its stats missing")
        elif f[key].shape != (N * T, int(dims[hook])) or str(f[key].dtype) != attrs["dtype"]:
            problems.append(f"/{key} is {f[key].shape} {f[key].dtype}, expected {(N * T, dims[hook])} {attrs['dtype']}")
    if "n_committed" in f and f["n_committed"].shape == ():
        n = int(f["n_committed"][()])
        if not 0 <= n <= N:
            problems.append(f"n_committed={n} outside [0, {N}]")
    return problems


# ---------------------------------------------------------------------------------------------
# Shuffled batches


class ShufflePlan:
    """The row order of every epoch, computed from the row selection alone (no data read).

    rows: sorted selected row indices; block_rows R: rows per block (one HDF5 chunk);
    group_blocks G: blocks per shuffle buffer.
    """

    def __init__(self, rows: np.ndarray, block_rows: int, n_blocks: int, group_blocks: int, shuffle: bool, seed: int):
        self.rows, self.R, self.n_blocks, self.G = rows, block_rows, n_blocks, group_blocks
        self.shuffle, self.seed = shuffle, seed
        self.n = int(rows.size)
        # rows of block b are rows[starts[b]:starts[b+1]]
        self.starts = np.searchsorted(rows, np.arange(n_blocks + 1, dtype=np.int64) * block_rows)
        self.counts = np.diff(self.starts)

    def block_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_blocks)
        return np.random.default_rng([self.seed, epoch, 0]).permutation(self.n_blocks)

    def group_rows(self, epoch: int, order: np.ndarray, g: int) -> np.ndarray:
        blocks = order[g * self.G:(g + 1) * self.G]
        rows = np.concatenate([self.rows[self.starts[b]:self.starts[b + 1]] for b in blocks])
        if self.shuffle:
            rows = rows[np.random.default_rng([self.seed, epoch, 1, g]).permutation(rows.size)]
        return rows

    def segments(self, position: int) -> Iterator[np.ndarray]:
        """Row index arrays that, concatenated, form the infinite stream from `position` on."""
        epoch, offset = divmod(position, self.n)
        while True:
            order = self.block_order(epoch)
            n_groups = -(-self.n_blocks // self.G)
            per_group = np.add.reduceat(self.counts[order], np.arange(0, self.n_blocks, self.G))
            ends = np.cumsum(per_group)
            g = int(np.searchsorted(ends, offset, side="right"))
            skip = offset - (int(ends[g - 1]) if g else 0)
            for gi in range(g, n_groups):
                if per_group[gi] == 0:
                    continue
                seg = self.group_rows(epoch, order, gi)[skip:]
                skip = 0
                yield seg
            epoch, offset = epoch + 1, 0

    def batch_rows(self, batch_size: int, start_step: int = 0) -> Iterator[np.ndarray]:
        """Row indices of batch start_step, start_step+1, ..."""
        pending, n_pending = [], 0
        for seg in self.segments(start_step * batch_size):
            pending.append(seg)
            n_pending += seg.size
            while n_pending >= batch_size:
                cat = np.concatenate(pending) if len(pending) > 1 else pending[0]
                yield cat[:batch_size]
                pending, n_pending = [cat[batch_size:]], n_pending - batch_size


def _gather(ds, rows: np.ndarray, R: int, limit: int, cache: dict) -> np.ndarray:
    """ds rows in the given order, reading whole blocks of R rows once each (cached in `cache`)."""
    out = np.empty((rows.size, ds.shape[1]), ds.dtype)
    if not rows.size:
        return out
    blocks = rows // R
    order = np.argsort(blocks, kind="stable")
    sorted_blocks = blocks[order]
    cuts = np.flatnonzero(np.diff(sorted_blocks)) + 1
    for idx in np.split(order, cuts):
        b = int(blocks[idx[0]])
        if b not in cache:
            cache[b] = ds[b * R:min((b + 1) * R, limit)]
        out[idx] = cache[b][rows[idx] - b * R]
    return out


def _local_rows(sharding, batch_size: int, dim: int) -> slice | None:
    """The contiguous slice of the global batch this process must provide (None = all of it)."""
    import jax

    if sharding is None or jax.process_count() == 1:
        return None
    index_map = sharding.addressable_devices_indices_map((batch_size, dim))
    starts, stops = [], []
    for index in index_map.values():
        s = index[0]
        starts.append(s.start or 0)
        stops.append(batch_size if s.stop is None else s.stop)
    return slice(min(starts), max(stops))


def _batch_source(path, hook, plan: ShufflePlan, batch_size, start_step, dim, sharding, dtype, limit):
    """Generator of device arrays (runs on the prefetch thread)."""
    import jax

    local = _local_rows(sharding, batch_size, dim)
    with h5py.File(path, "r", locking=False) as f:
        ds = f["acts"][hook]
        cache: dict[int, np.ndarray] = {}
        keep = plan.G + 4  # one shuffle buffer (a batch straddling two buffers holds both briefly)
        for rows in plan.batch_rows(batch_size, start_step):
            mine = rows if local is None else rows[local]
            x = _gather(ds, mine, plan.R, limit, cache).astype(dtype, copy=False)
            if len(cache) > keep:
                needed = set((mine // plan.R).tolist())
                for b in list(cache)[: len(cache) - keep]:
                    if b not in needed:
                        del cache[b]
            if local is not None:
                yield jax.make_array_from_process_local_data(sharding, x, (batch_size, dim))
            elif sharding is not None:
                yield jax.device_put(x, sharding)
            else:
                yield jax.device_put(x)


_LIVE_ITERATORS: "weakref.WeakSet[BatchIterator]" = weakref.WeakSet()


@atexit.register
def _stop_live_iterators() -> None:
    # A prefetch thread still inside h5py or jax.device_put while the interpreter finalises can
    # crash the process at exit (seen as SIGSEGV after a successful run), so stop and join them first.
    for it in list(_LIVE_ITERATORS):
        it.close()


class BatchIterator:
    """Runs a generator on a background thread, keeping up to `prefetch` items ready."""

    _END = object()

    def __init__(self, source: Iterator, prefetch: int = 4):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._source = source
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        _LIVE_ITERATORS.add(self)

    def _run(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
        except BaseException as err:  # surfaced in the consumer's thread
            self._put(err)
            return
        finally:
            self._source.close()
        self._put(self._END)

    def _put(self, item) -> bool:
        """Queue `item`, waiting for room; False if the iterator was closed meanwhile."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        if self._stop.is_set():
            raise StopIteration
        item = self._queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self._stop.set()
        except Exception:
            pass
