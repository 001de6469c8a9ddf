"""Reading a store: `ActivationStore.open(path)`, metadata, row selections, aligned shuffled batches,
statistics and verification. The reader never writes into the store file (its bytes stay the same
however it is read); statistics are cached in memory and in a sidecar `<store>.stats.json`.

    store = ActivationStore.open("runs/x/store.h5")
    with store.batches(["resid_mid.3", "mlp_out.3"], 4096, seed=0) as it:   # aligned {hook: [B, d]}
        for batch in it: ...
    x = store.sample("resid_post.3", 10_000, seed=0)                         # [n, d] float32

A sharded store (a directory of `shard-<i>-of-<n>.h5` files written by `harvest --shard i/n`, see
store_format) opens the same way, `ActivationStore.open(directory)`, and reads as the one store the
shards' contexts make in shard order: rows, splits (by each context's index in the corpus), batches,
samples, statistics and verification. A partial shard contributes its committed contexts.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import h5py
import numpy as np

from featureatlas.activation_store.corpus import corpus_fingerprint
from featureatlas.activation_store.prefetch import Prefetcher
from featureatlas.activation_store.runs import atomic_write_json
from featureatlas.activation_store.shuffle import ShufflePlan, gather_rows, read_batches, stacked_rows
from featureatlas.activation_store.store_format import (FORMAT_VERSION, IDENTITY_KEYS, StoreCorruptedError, StoreError,
                                                        check_foreign_hdf5, check_not_a_store, chunk_contexts,
                                                        corrupted, crc32, decode_attrs, disk_bytes, has_hdf5_signature,
                                                        has_shards, layout_problems, shard_files, shard_range,
                                                        val_context_mask)

STATS_FORMAT = "featureatlas-store-stats/1"


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No file at the store path."""


def stats_path(path) -> Path:
    """The sidecar file caching a store's statistics: `<store>.stats.json` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".stats.json")


# Attributes that differ between the shards of one store (everything else must agree).
SHARD_ATTRS = ("shard", "context_offset", "n_contexts", "n_tokens", "corpus_fingerprint", "harvest_config")


class Part(NamedTuple):
    """One file of a store: its path, committed contexts, and the corpus index of its first context."""

    path: Path
    n_committed: int
    first_context: int = 0


class ActivationStore:
    """Read access to a store; only committed contexts (c < n_committed) are visible."""

    def __init__(self, path: Path, attrs: dict, tokens, n_valid, doc_ids, labels, n_committed: int,
                 parts: list[Part] | None = None):
        self.path = path
        self.parts = parts or [Part(path, n_committed, int(attrs.get("context_offset", 0)))]
        self._attrs = attrs
        self.n_committed = n_committed
        self.n_planned = int(attrs["n_contexts"])
        self.context_length = int(attrs["context_length"])
        self.hooks = tuple(attrs["hooks"])
        self.dtype = str(attrs["dtype"])
        self.label_names = tuple(attrs.get("label_names") or ())
        self.val_fraction = float(attrs["val_fraction"])
        committed = (a[:n_committed] for a in (tokens, n_valid, doc_ids, labels))
        self.tokens, self.n_valid, self.doc_ids, self.labels = committed
        self._stats: dict[str, tuple[np.ndarray, float]] = {}
        self._h5: list[h5py.File] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        hooks = ", ".join(f"{h}:{self._attrs['dims'][h]}" for h in self.hooks)
        return (f"ActivationStore({str(self.path)!r}, {self.n_committed}/{self.n_planned} contexts x "
                f"{self.context_length}, {self.dtype}, hooks [{hooks}])")

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, path) -> "ActivationStore":
        """Open a store read-only. Says what the path is when it is not a store (a directory, another
        HDF5 file, a non-HDF5 file) and calls it corrupted only when it is a damaged store. A directory
        of shard files opens as the one store they make (see the module docstring)."""
        path = Path(path)
        if has_shards(path):
            return cls._open_shards(path)
        if not path.exists():
            raise StoreNotFoundError(f"no activation store at {path}: run `featureatlas harvest ... --out {path}` first")
        check_not_a_store(path)
        if not os.access(path, os.R_OK):
            raise StoreError(f"store {path} is not readable (permission denied); fix its permissions")
        if not has_hdf5_signature(path):
            raise StoreCorruptedError(
                f"{path} is not an HDF5 file (it lacks the HDF5 signature): if it was written as a store it is "
                "truncated or corrupted, so delete it and harvest again (`featureatlas harvest ... --overwrite`); "
                "otherwise pass the .h5 file written by `featureatlas harvest`")
        try:
            f = h5py.File(path, "r", locking=False)
        except OSError as err:
            raise corrupted(path, str(err)) from None
        try:
            with f:
                check_foreign_hdf5(path, f)
                attrs = decode_attrs(f.attrs)
                if attrs.get("format_version") != FORMAT_VERSION:
                    raise StoreError(f"store {path} has format version {attrs.get('format_version')}, "
                                     f"this featureatlas reads version {FORMAT_VERSION}; harvest it again")
                if problems := layout_problems(f, attrs):
                    raise corrupted(path, "; ".join(problems))
                arrays = [f[name][()] for name in ("tokens", "n_valid", "doc_id", "label")]
                n_committed = int(f["n_committed"][()])
        except (OSError, KeyError, RuntimeError) as err:
            raise corrupted(path, f"{type(err).__name__}: {err}") from None
        return cls(path, attrs, *arrays, n_committed)

    @classmethod
    def _open_shards(cls, directory: Path) -> "ActivationStore":
        """The shards of `directory` as one store, after checking they come from one sharded harvest."""
        shards = [cls.open(p) for p in shard_files(directory)]
        first = shards[0]._attrs
        n_total = int(first.get("sharded_contexts", -1))
        for i, s in enumerate(shards):
            a = s._attrs
            differ = [k for k in (*IDENTITY_KEYS, "sharded_fingerprint", "sharded_contexts")
                      if k not in SHARD_ATTRS and a.get(k) != first.get(k)]
            if a.get("shard") != f"{i}/{len(shards)}" or differ:
                raise StoreError(f"{s.path} is not shard {i}/{len(shards)} of the same harvest as {shards[0].path} "
                                 f"(differs in {differ or ['shard']}); keep only the shards of one "
                                 "`featureatlas harvest --shard i/n` run in the directory")
            if (int(a["context_offset"]), int(a["context_offset"]) + s.n_planned) != \
                    shard_range(n_total, i, len(shards)):
                raise StoreError(f"{s.path} holds contexts that are not those of shard {i}/{len(shards)}; harvest "
                                 "it again with --overwrite")
        attrs = {k: v for k, v in first.items() if k not in ("shard", "context_offset")}
        attrs.update(n_contexts=sum(s.n_planned for s in shards), shards=len(shards),
                     n_tokens=sum(int(s._attrs["n_tokens"]) for s in shards),
                     corpus_fingerprint=first["sharded_fingerprint"],
                     harvest_config={k: v for k, v in (first.get("harvest_config") or {}).items() if k != "shard"})
        arrays = [np.concatenate([getattr(s, a) for s in shards]) for a in ("tokens", "n_valid", "doc_ids", "labels")]
        return cls(directory, attrs, *arrays, sum(s.n_committed for s in shards), [p for s in shards for p in s.parts])

    def _handles(self) -> list[h5py.File]:
        with self._lock:
            if not self._h5 or not all(f.id.valid for f in self._h5):
                self._h5 = [h5py.File(p.path, "r", locking=False) for p in self.parts]
            return self._h5

    def _shard_block(self, hook: str) -> int | None:
        """Rows per read block of a sharded store: the chunk the unsharded store would have (None: one file)."""
        if not self.sharded:
            return None
        k = chunk_contexts(self.context_length, self.dim(hook), np.dtype(self.dtype).itemsize, self.n_planned)
        return k * self.context_length

    def _acts(self, hook: str):
        """`hook`'s rows (an h5py dataset, or the parts' datasets stacked), checked for the hook."""
        self.check_hook(hook)
        return stacked_rows(self._handles(), [p.n_committed * self.context_length for p in self.parts], hook,
                            self._shard_block(hook))

    def close(self) -> None:
        with self._lock:
            for f in self._h5:
                f.close()  # (h5py's close skips a file already closed)
            self._h5 = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- metadata -----------------------------------------------------------------------------

    @property
    def attrs(self) -> dict:
        return {**self._attrs, "n_committed": self.n_committed}

    @property
    def sharded(self) -> bool:
        """True for a directory of shard files read as one store."""
        return "shards" in self._attrs

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
        val = np.concatenate([val_context_mask(p.n_committed, self.val_fraction, p.first_context)
                              for p in self.parts])
        splits = {"train": ~val, "val": val, "all": np.ones(self.n_committed, bool)}
        if split not in splits:
            raise StoreError(f"split must be 'train', 'val' or 'all', got {split!r}")
        return splits[split]

    def token_rows(self, split: str = "train", exclude_bos: bool = True) -> np.ndarray:
        """Sorted int64 row indices (ctx·T + t) of the real (non-padding) tokens of `split`, BOS (t = 0) left
        out if asked."""
        t = np.arange(self.context_length)[None, :]
        mask = (t >= (1 if exclude_bos else 0)) & (t < self.n_valid[:, None]) & self.context_split(split)[:, None]
        return np.flatnonzero(mask.ravel()).astype(np.int64)

    def select_rows(self, split: str = "train", exclude_bos: bool = True, rows=None) -> np.ndarray:
        """The sorted rows a reader visits: `token_rows(split, exclude_bos)`, or the explicit subset
        `rows` of them (e.g. with massive-norm tokens left out); StoreError if `rows` strays outside."""
        selection = self.token_rows(split, exclude_bos)
        if rows is None:
            return selection
        rows = np.unique(np.asarray(rows, np.int64))
        outside = np.setdiff1d(rows, selection, assume_unique=True)
        if outside.size:
            raise StoreError(f"{outside.size} of the {rows.size} rows given are not real tokens of split {split!r} "
                             f"(exclude_bos={exclude_bos}) in {self.path}, e.g. rows {outside[:5].tolist()}; "
                             "build `rows` from store.token_rows(split, exclude_bos)")
        return rows

    # -- reading ------------------------------------------------------------------------------

    def block_rows(self, hook: str) -> int:
        """Rows per HDF5 chunk of `hook` (the unit the shuffled reader permutes)."""
        return int(self._acts(hook).chunks[0])

    def read_rows(self, hook: str, rows, dtype=np.float32) -> np.ndarray:
        """Activations of the given rows (any order, repeats allowed) as [len(rows), d]."""
        ds = self._acts(hook)
        rows = np.asarray(rows, np.int64)
        limit = self.n_committed * self.context_length
        if rows.size and (rows.min() < 0 or rows.max() >= limit):
            raise StoreError(f"row indices must lie in [0, {limit}) (committed rows of {self.path})")
        return gather_rows(ds, rows, int(ds.chunks[0]), limit, {}).astype(dtype, copy=False)

    def iter_chunks(self, hook: str, chunk_size: int, split: str = "train", exclude_bos: bool = True,
                    dtype=np.float32) -> Iterator[np.ndarray]:
        """The rows of `split` in store order, as arrays of `chunk_size` rows (the last may be shorter);
        each block of rows is read from the file once."""
        ds = self._acts(hook)
        if chunk_size < 1:
            raise StoreError(f"chunk_size must be positive, got {chunk_size}")
        rows = self.token_rows(split, exclude_bos)
        R, limit, cache = int(ds.chunks[0]), self.n_committed * self.context_length, {}
        for i in range(0, rows.size, chunk_size):
            sel = rows[i:i + chunk_size]
            yield gather_rows(ds, sel, R, limit, cache).astype(dtype, copy=False)
            last = int(sel[-1]) // R  # the next chunk starts in this block or a later one
            cache = {last: cache[last]}

    def _hook_list(self, hooks: str | Sequence[str]) -> tuple[str, ...]:
        hook_list = (hooks,) if isinstance(hooks, str) else tuple(dict.fromkeys(hooks))
        if not hook_list:
            raise StoreError(f"give at least one hook; {self.path} has {', '.join(self.hooks)}")
        for h in hook_list:
            self.check_hook(h)
        return hook_list

    def batches(self, hooks: str | Sequence[str], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                start_step: int = 0, split: str = "train", exclude_bos: bool = True, sharding=None,
                dtype=np.float32, rows=None, shuffle_buffer_rows: int = 1 << 16, prefetch: int = 4) -> Prefetcher:
        """Infinite iterator of device arrays [batch_size, d]; epochs follow one another seamlessly.

        hooks: one hook name (yields arrays) or several (yields {hook: array}, every hook at the
        same token rows: aligned, as a transcoder's input and target need).
        Order: see activation_store.shuffle; it depends only on (selected rows, seed, the hooks'
        chunk layout), so `start_step=i` resumes exactly at batch i without reading skipped data.
        rows: an explicit subset of the split's rows to visit (default: all of them).
        With `sharding` (a NamedSharding over the batch axis) the batch is placed across devices;
        with several processes each reads only its own rows. Batches are read on a background
        thread (`prefetch` ahead); close the iterator (or use it as a context manager) when done.
        """
        hook_list = self._hook_list(hooks)
        if batch_size < 1:
            raise StoreError(f"batch_size must be positive, got {batch_size}")
        if start_step < 0:
            raise StoreError(f"start_step must be >= 0, got {start_step}")
        selection = self.select_rows(split, exclude_bos, rows)
        if selection.size == 0:
            raise StoreError(f"split {split!r} of {self.path} has no rows (n_committed={self.n_committed}); "
                             "harvest more contexts or use split='all'")
        # Blocks are chunks of the widest-chunked hook, so each block is whole chunks of every hook.
        R, limit = max(self.block_rows(h) for h in hook_list), self.n_committed * self.context_length
        plan = ShufflePlan(selection, R, -(-limit // R), max(1, shuffle_buffer_rows // R), shuffle, seed)
        files = [(str(p.path), p.n_committed * self.context_length) for p in self.parts]
        blocks = {h: self._shard_block(h) for h in hook_list}

        def produce():  # {hook: array} batches, or the arrays of the one hook asked as a string
            batches = read_batches(files, blocks, plan, batch_size, start_step, sharding, dtype, limit)
            with contextlib.closing(batches):  # closed (its files with it) when the Prefetcher stops
                for batch in batches:
                    yield batch[hooks] if isinstance(hooks, str) else batch

        return Prefetcher(produce, prefetch, name=f"store-batches-{hook_list[0]}")

    def sample(self, hooks: str | Sequence[str], n: int, seed: int = 0, *, split: str = "train",
               exclude_bos: bool = True, rows=None, dtype=np.float32):
        """min(n, available) rows drawn uniformly without replacement by `seed`, in store order:
        [n, d] for one hook, {hook: [n, d]} (same rows) for several."""
        hook_list = self._hook_list(hooks)
        selection = self.select_rows(split, exclude_bos, rows)
        rng = np.random.default_rng([seed, 7])
        pick = np.sort(rng.choice(selection, size=min(int(n), selection.size), replace=False))
        out = {h: self.read_rows(h, pick, dtype) for h in hook_list}
        return out[hooks] if isinstance(hooks, str) else out

    # -- statistics ---------------------------------------------------------------------------

    def _stats_key(self, hook: str) -> dict:
        """What the cached statistics of `hook` depend on: the committed rows (their CRCs) and the split."""
        j = self.hooks.index(hook)
        C = int(self._attrs["commit_contexts"])
        crcs = np.concatenate([f["commit_crc"][:-(-p.n_committed // C), j]
                               for f, p in zip(self._handles(), self.parts)]).astype(np.uint32)
        return {"n_committed": self.n_committed, "commit_crc": crc32(crcs), "fingerprint": self.fingerprint,
                "val_fraction": self.val_fraction, "split": "train", "exclude_bos": True}

    def stats(self, hook: str) -> tuple[np.ndarray, float]:
        """(mean_D, mean squared norm E‖x‖²) over the train split without BOS, float64.

        Computed once per store content and cached in memory and in `<store>.stats.json` (written
        atomically beside the store; skipped when the directory is read-only). Never written into
        the store itself.
        """
        self.check_hook(hook)
        if hook in self._stats:
            return self._stats[hook]
        key, path = self._stats_key(hook), stats_path(self.path)
        entry = _stats_record(path)["hooks"].get(hook)
        result = None
        with contextlib.suppress(KeyError, TypeError, ValueError):  # the cached entry if for these rows, well formed
            if entry["key"] == key:
                result = np.asarray(entry["mean"], np.float64), float(entry["mean_sq_norm"])
        if result is None:
            total, sq, n = np.zeros(self.dim(hook), np.float64), 0.0, 0
            rows_per_chunk = max(1, (64 << 20) // (8 * self.dim(hook)))  # ~64 MiB of float64 at a time
            for x in self.iter_chunks(hook, rows_per_chunk, "train", True, dtype=np.float64):
                total += x.sum(0)
                sq += float(np.einsum("nd,nd->", x, x))
                n += x.shape[0]
            if n == 0:
                raise StoreError(f"the train split of {self.path} is empty: cannot compute stats")
            result = (total / n, sq / n)
            record = _stats_record(path)  # read again: another reader may have cached another hook meanwhile
            record["hooks"][hook] = {"key": key, "n_rows": n, "mean": [float(v) for v in result[0]],
                                     "mean_sq_norm": float(result[1])}
            with contextlib.suppress(OSError):  # a read-only directory: the in-memory cache is all we keep
                atomic_write_json(path, record)
        self._stats[hook] = result
        return result

    # -- verification -------------------------------------------------------------------------

    def verify(self, check_values: bool = True) -> list[str]:
        """Problems found (empty list = the store is sound): metadata, counters, corpus fingerprint,
        per-commit CRCs and NaN/Inf in committed rows."""
        if self.sharded:
            return [f"{p.path.name}: {problem}" for p in self.parts
                    for problem in ActivationStore.open(p.path).verify(check_values)]
        problems = []  # n_committed outside [0, n_contexts] is refused by open (layout_problems)
        a, T, N = self._attrs, self.context_length, self.n_committed
        with h5py.File(self.path, "r", locking=False) as f:
            tokens, n_valid, doc_ids, labels = (f[name][()] for name in ("tokens", "n_valid", "doc_id", "label"))
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
                    n_bad += int((~np.isfinite(rows)).any(axis=1).sum())
                if n_bad:
                    problems.append(f"{hook}: {n_bad} committed rows hold NaN or Inf")
        return problems

    def summary(self) -> dict:
        """What `featureatlas store info` prints."""
        train = self.context_split("train")
        return {
            "path": str(self.path), "model_id": self.model_id, "weights_hash": self.weights_hash,
            "tokenizer": self._attrs.get("tokenizer", ""), "hooks": {h: self.dim(h) for h in self.hooks},
            "dtype": self.dtype, "context_length": self.context_length,
            "contexts": self.n_committed, "contexts_planned": self.n_planned,
            "committed_fraction": self.n_committed / self.n_planned, "tokens": int(self.n_valid.sum()),
            "train_contexts": int(train.sum()), "val_contexts": int((~train).sum()), "val_fraction": self.val_fraction,
            "documents": int(np.unique(self.doc_ids).size),
            "labels": {name: int((self.labels == i).sum()) for i, name in enumerate(self.label_names)},
            "corpus_fingerprint": self.fingerprint,
            "size_on_disk_mb": round(sum(disk_bytes(p.path) for p in self.parts) / 2**20, 3),
            **({"shards": len(self.parts)} if self.sharded else {}),
        }


def _stats_record(path: Path) -> dict:
    """The sidecar's content, or an empty record when it is missing, unreadable or of another format."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        record = json.loads(path.read_text())
        if record.get("format") == STATS_FORMAT and isinstance(record.get("hooks"), dict):
            return record
    return {"format": STATS_FORMAT, "hooks": {}}
