"""The saved-dictionary format shared by SNMF, DiffMeans and PCA.

A result directory holds
  config.json         method ("snmf" | "diffmeans" | "pca"), hook, n_features, model_id,
                      store_fingerprint, the training config, final loss / relative error ...
  weights.safetensors snmf:      Z_DxK (unit-norm columns; the scale lives in Y),
                                 optionally Yt_NxK (= Yᵀ, token coefficients) and rows_N
                                 (the store row of each token);
                      diffmeans: directions_FxD (unit rows), norms_F;
                      pca:       components_KxD, mean_D, explained_variance_K
  metrics.jsonl, loss.png (SNMF loss curve), hierarchy.json / hierarchy.safetensors (optional).

Tensors are written by a small streaming safetensors writer, so a Yᵀ larger than memory (the
streaming solver's file) is copied chunk by chunk; files are read with `safetensors`.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from typing import Callable, Iterator

import numpy as np

from featureatlas.snmf.dictionary import DiffMeansDictionary, PCADictionary, SNMFDictionary

CONFIG = "config.json"
WEIGHTS = "weights.safetensors"
_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(np.int64): "I64",
           np.dtype(np.int32): "I32", np.dtype(np.float16): "F16"}


class Chunked:
    """A tensor given as row blocks: shape, dtype, and blocks() yielding arrays in row order."""

    def __init__(self, shape, dtype, blocks: Callable[[], Iterator[np.ndarray]]):
        self.shape, self.dtype, self.blocks = tuple(shape), np.dtype(dtype), blocks


def publish(tmp: str, path: str) -> None:
    """Give a finished temporary file the usual permissions (mkstemp makes it 0600) and move it
    into place atomically."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def write_safetensors(path: str, tensors: dict, metadata: dict | None = None) -> None:
    """Write tensors (ndarrays or `Chunked`) in the safetensors format, atomically.

    Format: u64 little-endian header length, JSON header {name: {dtype, shape,
    data_offsets}}, then the raw little-endian bytes of each tensor, in header order.
    """
    header, offset = {}, 0
    for name, t in tensors.items():
        nbytes = int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize
        header[name] = {"dtype": _DTYPES[np.dtype(t.dtype)], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, t in tensors.items():
                blocks = t.blocks() if isinstance(t, Chunked) else [np.asarray(t)]
                written = 0
                for b in blocks:
                    b = np.ascontiguousarray(b, dtype=np.dtype(t.dtype).newbyteorder("<"))
                    f.write(b.tobytes())
                    written += b.nbytes
                if written != header[name]["data_offsets"][1] - header[name]["data_offsets"][0]:
                    raise RuntimeError(f"tensor {name}: wrote {written} bytes, header says otherwise")
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_safetensors(path: str, names=None) -> dict[str, np.ndarray]:
    from safetensors.numpy import safe_open

    out = {}
    with safe_open(path, framework="numpy") as f:
        for name in f.keys():
            if names is None or name in names:
                out[name] = f.get_tensor(name)
    return out


def write_config(out_dir: str, config: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True, default=_json_default)
        f.write("\n")
    publish(tmp, os.path.join(out_dir, CONFIG))


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serializable: {type(x)}")


def unit_columns(Z_DxK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Z with unit-norm columns, the norms); an all-zero column keeps norm 1."""
    norms = np.linalg.norm(Z_DxK, axis=0)
    norms = np.where(norms > 0, norms, 1.0).astype(np.float32)
    return (Z_DxK / norms).astype(np.float32), norms


def save_snmf(out_dir: str, Z_DxK: np.ndarray, config: dict, *, Yt_NxK=None, rows_N=None,
              block: int = 65536) -> None:
    """Save Z normalised to unit columns; Yᵀ (ndarray or streaming `YFile`) scaled to match."""
    Zn, norms = unit_columns(np.asarray(Z_DxK, np.float32))
    tensors: dict = {"Z_DxK": Zn}
    if Yt_NxK is not None:
        n, k = Yt_NxK.shape
        if hasattr(Yt_NxK, "read"):
            def blocks():
                for s in range(0, n, block):
                    yield Yt_NxK.read(s, min(block, n - s)) * norms
        else:
            def blocks():
                for s in range(0, n, block):
                    yield np.asarray(Yt_NxK[s:s + block], np.float32) * norms
        tensors["Yt_NxK"] = Chunked((n, k), np.float32, blocks)
        if rows_N is not None:
            tensors["rows_N"] = np.asarray(rows_N, np.int64)
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, WEIGHTS), tensors, {"method": "snmf"})
    write_config(out_dir, {**config, "method": "snmf", "n_features": Zn.shape[1],
                           "z_unit_norm": True, "saved_y": Yt_NxK is not None})


def save_diffmeans(out_dir: str, dic: DiffMeansDictionary, config: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, WEIGHTS),
                      {"directions_FxD": np.asarray(dic.directions_np, np.float32),
                       "norms_F": np.asarray(dic.norms_F, np.float32)}, {"method": "diffmeans"})
    write_config(out_dir, {**config, "method": "diffmeans", "hook": dic.hook,
                           "n_features": dic.n_features, "label_names": list(dic.label_names)})


def save_pca(out_dir: str, dic: PCADictionary, config: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, WEIGHTS),
                      {"components_KxD": np.asarray(dic.components_KxD, np.float32),
                       "mean_D": np.asarray(dic.mean_D, np.float32),
                       "explained_variance_K": np.asarray(dic.explained_variance_K, np.float32)},
                      {"method": "pca"})
    write_config(out_dir, {**config, "method": "pca", "hook": dic.hook, "n_features": dic.n_features,
                           "pca_split": "± halves: features 0..k-1 are +axis, k..2k-1 are −axis"})


def read_config(out_dir: str) -> dict:
    path = os.path.join(out_dir, CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {CONFIG} in {out_dir}: not a saved dictionary "
                                "(train one with `featureatlas train-snmf`)")
    with open(path) as f:
        return json.load(f)


def load(out_dir: str):
    """Load a saved SNMF / DiffMeans / PCA result as its Dictionary (Y is not loaded)."""
    config = read_config(out_dir)
    method = config.get("method")
    weights = os.path.join(out_dir, WEIGHTS)
    if method == "snmf":
        w = read_safetensors(weights, {"Z_DxK"})
        return SNMFDictionary(config["hook"], w["Z_DxK"], config)
    if method == "diffmeans":
        w = read_safetensors(weights)
        return DiffMeansDictionary(config["hook"], w["directions_FxD"], w["norms_F"],
                                   tuple(config.get("label_names", ())), config)
    if method == "pca":
        w = read_safetensors(weights)
        return PCADictionary(config["hook"], w["components_KxD"], w["mean_D"], w["explained_variance_K"], config)
    raise ValueError(f"{out_dir}/config.json has unknown method {method!r} (snmf, diffmeans or pca)")


def load_codes(out_dir: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(Yt_NxK, rows_N) saved with --save-y (loads into memory)."""
    w = read_safetensors(os.path.join(out_dir, WEIGHTS), {"Yt_NxK", "rows_N"})
    if "Yt_NxK" not in w:
        raise ValueError(f"{out_dir} was saved without Y; train again with --save-y")
    return w["Yt_NxK"], w.get("rows_N")
