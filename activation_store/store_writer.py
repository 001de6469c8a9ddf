"""Writing a store: the crash-safe skeleton, committed appends, and the one-writer lock.

See store_format for the layout and why a store killed at any moment stays valid.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import h5py
import numpy as np

from featureatlas.activation_store.corpus import corpus_fingerprint
from featureatlas.activation_store.runs import atomic_write
from featureatlas.activation_store.store_format import (CHUNK_TARGET_BYTES, DTYPES, FORMAT, FORMAT_VERSION, StoreError,
                                                        chunk_contexts, corrupted, crc32, decode_attrs, encode_attr)
from featureatlas.activation_store.store_reader import ActivationStore

# Free space kept in reserve beyond a commit's rows (HDF5 flushes, filesystem block rounding).
FREE_SPACE_MARGIN = 4 << 20


class StoreBusyError(StoreError):
    """Another process is writing the store."""


class DiskFullError(StoreError, OSError):
    """Not enough free space for the next commit."""


def free_bytes(path) -> int:
    """Bytes free for an unprivileged writer on the filesystem holding `path` (shutil.disk_usage)."""
    return shutil.disk_usage(path).free


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MB"


def check_free_space(path, need: int, what: str, rest: int | None = None) -> None:
    """Raise DiskFullError naming the bytes needed if the filesystem of `path` has less than
    `need` + FREE_SPACE_MARGIN free (a full disk inside libhdf5 ends in a crash, not an error)."""
    path = Path(path)
    free = free_bytes(path if path.exists() else path.parent)
    if free >= need + FREE_SPACE_MARGIN:
        return
    total = f" (the whole remaining store needs {_mb(rest)})" if rest is not None and rest > need else ""
    raise DiskFullError(
        f"not enough disk space: {what} needs {_mb(need + FREE_SPACE_MARGIN)} free on the filesystem of {path} "
        f"but only {_mb(free)} is free{total}; free some space (or choose another --out), then run the same "
        "command again: committed contexts are kept and the harvest resumes")


@contextlib.contextmanager
def store_lock(path):
    """Hold an exclusive lock on `<path>.lock` (created beside the store, removed on exit) for the
    whole of a harvest, so that a second harvest of the same store (resume or --overwrite) fails
    at once instead of both writing. The lock is an flock: the kernel drops it if the process dies."""
    path = Path(path)
    lock_path = path.with_name(path.name + ".lock")
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreBusyError(
                    f"store {path} is being written by another harvest (lock {lock_path} is held); wait for it to "
                    "finish or stop it, then run the command again") from None
            raise
        # The holder we waited on may have removed the lock file after we opened it: retry on the new one.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    try:
        yield lock_path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)  # still holding the lock, so nobody is between open and flock on this inode
        os.close(fd)


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
    root = {  # in this order in the file
        "format": FORMAT, "format_version": FORMAT_VERSION, "model_id": "", "weights_hash": "", "tokenizer": tokenizer,
        "hooks": hooks, "dims": {h: int(dims[h]) for h in hooks}, "context_length": int(T), "dtype": dtype,
        "bos_id": -1 if bos_id is None else int(bos_id), "label_names": list(label_names),
        "val_fraction": float(val_fraction), "n_contexts": int(N), "n_tokens": int(np.asarray(n_valid_N).sum()),
        "commit_contexts": int(commit_contexts),
        "corpus_fingerprint": corpus_fingerprint(tokens_NxT, n_valid_N, doc_id_N, label_N, label_names, tokenizer),
        "harvest_config": {},
    }
    fixed = root.keys() - {"model_id", "weights_hash", "tokenizer", "bos_id", "harvest_config"}
    clash = [k for k in attrs if k in fixed and json.dumps(attrs[k]) != json.dumps(root[k])]
    if clash:
        raise StoreError(f"attrs may not override the store's own {clash} (given {[attrs[k] for k in clash]})")
    root.update(attrs)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            for key, value in root.items():
                f.attrs[key] = encode_attr(key, value)
            f.create_dataset("tokens", data=tokens_NxT, track_times=False)
            for name, (arr, dt) in arrays.items():
                f.create_dataset(name, data=np.asarray(arr, dt), track_times=False)
            f.create_dataset("n_committed", data=np.int64(0), track_times=False)
            f.create_dataset("commit_crc", data=np.zeros((n_commits, len(hooks)), np.uint32), track_times=False)
            acts = f.create_group("acts")
            for hook in hooks:
                d = int(dims[hook])
                k = chunk_contexts(T, d, itemsize, N, chunk_bytes)
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # all chunks exist now: writes touch no metadata
                acts.create_dataset(hook, shape=(N * T, d), dtype=dtype, chunks=(k * T, d), dcpl=dcpl,
                                    fill_time="never", track_times=False)

    atomic_write(path, write)  # the empty store appears whole or not at all
    return path


class StoreWriter:
    """Appends committed contexts to a store created by `create_store` (one writer at a time).

    `commit(c0, c1, acts)` writes contexts [c0, c1) for every hook; it must continue exactly at
    the committed counter and cover one commit block (`commit_contexts` contexts, fewer at the end).
    Before writing it checks that the filesystem has room for the block (DiskFullError otherwise).
    `on_phase(name, commit_index)` is called between the steps (for crash tests).
    """

    def __init__(self, path, *, fsync: bool = True, on_phase=None):
        self.path = Path(path)
        try:
            self.file = h5py.File(self.path, "r+")
        except OSError as err:
            if "lock" in str(err).lower():
                raise StoreBusyError(f"store {self.path} is open for writing in another process (a harvest still "
                                     "running?); wait for it or stop it, then run the command again") from None
            if not os.access(self.path, os.W_OK):
                raise StoreError(f"store {self.path} is not writable (permission denied); fix its permissions or "
                                 "choose another --out") from None
            raise corrupted(self.path, str(err)) from None
        self.attrs = decode_attrs(self.file.attrs)
        self.hooks = list(self.attrs["hooks"])
        self.T = int(self.attrs["context_length"])
        self.N = int(self.attrs["n_contexts"])
        self.commit_contexts = int(self.attrs["commit_contexts"])
        self.context_bytes = self.T * sum(int(self.file["acts"][h].shape[1]) * self.file["acts"][h].dtype.itemsize
                                          for h in self.hooks)  # of activations, over every hook
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
        check_free_space(self.path, (c1 - c0) * self.context_bytes, f"committing contexts [{c0}, {c1})",
                         rest=(self.N - c0) * self.context_bytes)
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
        self._flush()
        self.on_phase("rows_flushed", index)
        # Only now do the rows become visible.
        self.file["n_committed"].write_direct(np.array(c1, np.int64))
        self._flush()
        self.on_phase("committed", index)

    def _flush(self) -> None:
        self.file.flush()
        if self.fsync:
            with contextlib.suppress(OSError, ValueError, TypeError):  # a non-POSIX driver: the flush is all we can do
                os.fsync(self.file.id.get_vfd_handle())

    def close(self) -> None:
        self.file.close()  # (h5py's close skips a file already closed)


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
) -> ActivationStore:
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
    for hook, a in acts.items():
        if np.ndim(a) != 2 or np.shape(a)[0] != N * T:
            raise StoreError(f"acts[{hook!r}] must have shape [n_ctx*T={N * T}, d], got {np.shape(a)}")
    dims = {hook: int(np.shape(a)[1]) for hook, a in acts.items()}
    path = create_store(path, tokens_NxT=tokens, n_valid_N=n_valid, doc_id_N=doc_ids, label_N=labels,
                 label_names=label_names, dims=dims, dtype=dtype, attrs=dict(attrs or {}),
                 commit_contexts=commit_contexts, val_fraction=val_fraction, bos_id=bos_id, chunk_bytes=chunk_bytes)
    with contextlib.closing(StoreWriter(path, fsync=False)) as writer:
        for c0 in range(0, N, commit_contexts):
            c1 = min(c0 + commit_contexts, N)
            writer.commit(c0, c1, {h: np.asarray(a)[c0 * T:c1 * T] for h, a in acts.items()})
    return ActivationStore.open(path)
