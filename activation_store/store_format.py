"""The HDF5 activation store's file format: layout, constants, errors and small pure helpers.

Layout (N contexts of length T, token row r = ctx·T + t, t = 0 is BOS):

    /tokens              [N, T]      int32    token ids, right-padded
    /n_valid             [N]         int32    real tokens per context (BOS included)
    /doc_id              [N]         int64    source document of each context
    /label               [N]         int32    document label, -1 = none (names in attr label_names)
    /acts/<hook>         [N·T, d]    float16|float32, chunked (k·T rows per chunk), padding rows are 0
    /n_committed         []          int64    contexts [0, n_committed) are complete and visible
    /commit_crc          [C, H]      uint32   CRC-32 of each commit's rows of each hook (C commits)
    (/stats/<hook>/{mean,info}: in stores written before the reader stopped writing into stores; ignored.
     Statistics are cached in memory and in a sidecar file `<store>.stats.json`, see store_reader.)
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

import contextlib
import json
import math
import os
import re
import zlib
from pathlib import Path
from typing import Mapping

import h5py
import numpy as np

from featureatlas.activation_store.configs import leaves
from featureatlas.activation_store.errors import FeatureAtlasError

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
JSON_ATTRS = ("hooks", "dims", "label_names", "harvest_config", "model_config")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class StoreError(FeatureAtlasError, ValueError):
    """A store that cannot be used as asked."""


class StoreCorruptedError(StoreError):
    """The file is not a readable, self-consistent store."""


class NotAStoreError(StoreCorruptedError):
    """The path holds something else than a store (a directory, another HDF5 file, a text file)."""


class StoreMismatchError(StoreError):
    """An existing store was made with different settings than the ones asked for."""


# ---------------------------------------------------------------------------------------------
# Sharded stores: one file per harvesting job, `<dir>/shard-<i>-of-<n>.h5`, holding contexts
# [i·N//n, (i+1)·N//n) of the corpus's N (attributes shard, context_offset, sharded_contexts,
# sharded_fingerprint); read together as one store by opening the directory.

SHARD_FILE = re.compile(r"shard-(\d{5})-of-(\d{5})\.h5")


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.h5"


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n; StoreError naming the form otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if m is None or not 0 <= int(m[1]) < int(m[2]) or int(m[2]) > 99999:
        raise StoreError(f"--shard {text!r} is not of the form i/n with 0 <= i < n (e.g. --shard 0/4 for the first "
                         "of 4 shards)")
    return int(m[1]), int(m[2])


def shard_range(n_contexts: int, index: int, count: int) -> tuple[int, int]:
    """Contexts [a, b) of shard `index` of `count`: contiguous, sizes differing by at most one."""
    return index * n_contexts // count, (index + 1) * n_contexts // count


def shard_files(directory: Path) -> list[Path]:
    """The shard files of a sharded store directory, in shard order; StoreError if the set is not
    complete (naming the missing shards and how to write them) or mixes shard counts."""
    found = {(int(m[1]), int(m[2])): p for p in directory.iterdir() if (m := SHARD_FILE.fullmatch(p.name))}
    counts = sorted({n for _, n in found})
    if len(counts) > 1:
        raise StoreError(f"{directory} mixes shards of {counts} harvests (shard-*-of-<n>.h5 with different n); "
                         "keep the files of one sharded harvest in a directory")
    n = counts[0]
    missing = [i for i in range(n) if (i, n) not in found]
    if missing:
        raise StoreError(f"sharded store {directory} lacks shard(s) {missing[:10]} of {n}: run "
                         f"`featureatlas harvest ... --out {directory} --shard {missing[0]}/{n}` for each")
    return [found[(i, n)] for i in range(n)]


def has_shards(path: Path) -> bool:
    return path.is_dir() and any(SHARD_FILE.fullmatch(p.name) for p in path.iterdir())


# ---------------------------------------------------------------------------------------------
# Small pure helpers


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele, Lea & Flood 2014): a well-mixed 64-bit hash of integers."""
    z = np.asarray(x, np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def val_context_mask(n_contexts: int, val_fraction: float, first: int = 0) -> np.ndarray:
    """Boolean [n_contexts]: True for validation contexts (hash of the index below the fraction).
    The indices are first, first+1, ...: a shard holding contexts [a, b) of a corpus passes first=a,
    so its split is the one the unsharded store has."""
    ids = np.arange(first, first + n_contexts, dtype=np.uint64)
    u = (splitmix64(ids + np.uint64(SPLIT_SALT)) >> np.uint64(11))
    return u.astype(np.float64) * 2.0**-53 < val_fraction


def chunk_contexts(context_length: int, dim: int, itemsize: int, n_contexts: int,
                   chunk_bytes: int = CHUNK_TARGET_BYTES) -> int:
    """Contexts per HDF5 chunk: the largest power of two whose chunk stays within `chunk_bytes`."""
    k = max(1, chunk_bytes // (context_length * dim * itemsize))
    return int(min(2 ** int(math.log2(k)), n_contexts))


def crc32(arr: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(arr).view(np.uint8)) & 0xFFFFFFFF


def encode_attr(key: str, value):
    """Root attributes are plain scalars and strings; lists and dicts are stored as JSON text."""
    if key in JSON_ATTRS or isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    return "" if value is None else value


def decode_attrs(raw: Mapping) -> dict:
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


def corrupted(path, detail: str) -> StoreCorruptedError:
    return StoreCorruptedError(
        f"store {path} is truncated or corrupted: {detail}; delete it and harvest again "
        "(`featureatlas harvest ... --overwrite`)")


def has_hdf5_signature(path) -> bool:
    """True if the file starts with the HDF5 signature (at offset 0 or a user-block offset 512·2^k)."""
    with contextlib.suppress(OSError):
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            offset = 0
            while offset + 8 <= size:
                fh.seek(offset)
                if fh.read(8) == HDF5_SIGNATURE:
                    return True
                offset = 512 if offset == 0 else offset * 2
    return False


def check_not_a_store(path) -> None:
    """Raise NotAStoreError saying what `path` is when it is plainly not a store file."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.h5"))[:5]
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise NotAStoreError(f"{path} is a directory, not an activation store file; pass the store's .h5 file "
                             f"path{hint}, or a sharded store's directory (of shard-<i>-of-<n>.h5 files)")
    if path.exists() and not path.is_file():
        raise NotAStoreError(f"{path} is not a regular file; pass the .h5 file written by `featureatlas harvest`")
    if path.is_file() and path.stat().st_size == 0:
        raise NotAStoreError(f"{path} is an empty file, not an activation store; pass the store written by "
                             "`featureatlas harvest` (which may write into this path with --overwrite)")


def check_foreign_hdf5(path, f: h5py.File) -> None:
    """Raise NotAStoreError if the open HDF5 file `f` carries no featureatlas format attribute."""
    fmt = f.attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode(errors="replace")
    if fmt == FORMAT:
        return
    what = f"its format attribute is {fmt!r}" if fmt is not None else "it has no format attribute"
    content = ", ".join(f"/{k}" for k in list(f.keys())[:5]) or "nothing"
    missing = "" if "tokens" in f else "no /tokens, "
    raise NotAStoreError(
        f"{path} is an HDF5 file but not a featureatlas store ({missing}{what}; it holds {content}); pass the store "
        "written by `featureatlas harvest`, or choose another --out for a new store")


def layout_problems(f: h5py.File, attrs: dict) -> list[str]:
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
        if key not in f:
            problems.append(f"dataset /{key} missing")
        elif f[key].shape != (N * T, int(dims[hook])) or str(f[key].dtype) != attrs["dtype"]:
            problems.append(f"/{key} is {f[key].shape} {f[key].dtype}, expected {(N * T, dims[hook])} {attrs['dtype']}")
    if "n_committed" in f and f["n_committed"].shape == ():
        n = int(f["n_committed"][()])
        if not 0 <= n <= N:
            problems.append(f"n_committed={n} outside [0, {N}]")
    return problems


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
        have = leaves(stored.get("harvest_config") or {})
        want = leaves(json.loads(_canonical(expected["harvest_config"])))
        for sub in sorted(set(have) | set(want)):
            if sub.rsplit(".", 1)[-1] in named or _canonical(have.get(sub)) == _canonical(want.get(sub)):
                continue
            diffs.append(f"{sub}: store has {have.get(sub)!r}, this run asks for {want.get(sub)!r}")
    if diffs:
        raise StoreMismatchError(
            f"store {path} was harvested with different settings, refusing to append:\n  "
            + "\n  ".join(diffs) + "\nUse the original settings to resume, --overwrite to start again, "
            "or --out for a new file.")


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True)


def disk_bytes(path: Path) -> int:
    """Bytes the file occupies on disk (a sparse, partly written store occupies less than its size)."""
    st = os.stat(path)
    return min(st.st_size, getattr(st, "st_blocks", st.st_size // 512 + 1) * 512)
