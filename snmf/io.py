"""The saved-dictionary format shared by SNMF, DiffMeans and PCA.

A result directory holds
  config.json         method ("snmf" | "diffmeans" | "pca"), hook, n_features, model_id,
                      store_fingerprint, the training settings, final loss / relative error ...
  weights.safetensors snmf:      Z_DxK (unit-norm columns; the scale lives in Y),
                                 optionally Yt_NxK (= Yᵀ, token coefficients) and rows_N
                                 (the store row of each token);
                      diffmeans: directions_FxD (unit rows), norms_F;
                      pca:       components_KxD, mean_D, explained_variance_K
  loss.png (SNMF loss curve), hierarchy.json / hierarchy.safetensors (optional),
  and the run's records (run.json, results.json, metrics.jsonl; `activation_store.runs`).

The files of one result are published together (`activation_store.runs.publish_files`): a
reader (`load`, which calls `runs.published` first) never sees new weights beside an old
config. `*_files` functions return {name: data} for that. Tensors are written by a small
streaming safetensors writer, so a Yᵀ larger than memory (the streaming solver's file) is
copied chunk by chunk; files are read with `safetensors.numpy`.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterator

import numpy as np
from safetensors.numpy import load_file, safe_open

from featureatlas.activation_store.errors import RunError
from featureatlas.activation_store.runs import publish_files, published
from featureatlas.snmf.dictionary import DiffMeansDictionary, PCADictionary, SNMFDictionary

CONFIG = "config.json"
WEIGHTS = "weights.safetensors"
_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(np.int64): "I64",
           np.dtype(np.int32): "I32", np.dtype(np.float16): "F16"}


class Chunked:
    """A tensor given as row blocks: shape, dtype, and blocks() yielding arrays in row order."""

    def __init__(self, shape, dtype, blocks: Callable[[], Iterator[np.ndarray]]):
        self.shape, self.dtype, self.blocks = tuple(shape), np.dtype(dtype), blocks


def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write tensors (ndarrays or `Chunked`) to `path` in the safetensors format (not atomic by
    itself: pass `lambda p: write_safetensors(p, ...)` to `runs.atomic_write` / `publish_files`).

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
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, t in tensors.items():
            written = 0
            for b in (t.blocks() if isinstance(t, Chunked) else [np.asarray(t)]):
                written += f.write(np.ascontiguousarray(b, dtype=np.dtype(t.dtype).newbyteorder("<")).tobytes())
            if written != header[name]["data_offsets"][1] - header[name]["data_offsets"][0]:
                raise RuntimeError(f"tensor {name}: wrote {written} bytes, header says otherwise")


def tensors_file(tensors: dict, metadata: dict | None = None) -> Callable:
    """The data argument of `publish_files` for a safetensors file."""
    return lambda path: write_safetensors(path, tensors, metadata)


def json_text(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"


def _json_default(x):
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    raise TypeError(f"not JSON serializable: {type(x)}")


def unit_columns(Z_DxK: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Z with unit-norm columns, the norms); an all-zero column keeps norm 1."""
    norms = np.linalg.norm(Z_DxK, axis=0)
    norms = np.where(norms > 0, norms, 1.0).astype(np.float32)
    return (Z_DxK / norms).astype(np.float32), norms


def snmf_files(Z_DxK: np.ndarray, config: dict, *, Yt_NxK=None, rows_N=None, block: int = 65536) -> dict:
    """config.json and weights.safetensors of an SNMF result: Z normalised to unit columns; Yᵀ
    (ndarray or streaming `YFile`, read by blocks) scaled to match."""
    Zn, norms = unit_columns(np.asarray(Z_DxK, np.float32))
    tensors: dict = {"Z_DxK": Zn}
    if Yt_NxK is not None:
        n, k = Yt_NxK.shape
        tensors["Yt_NxK"] = Chunked((n, k), np.float32, lambda: (
            np.asarray(Yt_NxK[s:min(s + block, n)], np.float32) * norms for s in range(0, n, block)))
        if rows_N is not None:
            tensors["rows_N"] = np.asarray(rows_N, np.int64)
    return _result_files("snmf", tensors, config, n_features=Zn.shape[1], z_unit_norm=True, saved_y=Yt_NxK is not None)


def _result_files(method: str, tensors: dict, config: dict, **fields) -> dict:
    """weights.safetensors and config.json (config plus the method and `fields`) of a result."""
    config = {**config, "method": method, **fields}
    return {WEIGHTS: tensors_file(tensors, {"method": method}), CONFIG: json_text(config)}


def save_snmf(out_dir: str, Z_DxK: np.ndarray, config: dict, *, Yt_NxK=None, rows_N=None) -> None:
    """Publish an SNMF result into `out_dir` (see `snmf_files`)."""
    publish_files(out_dir, snmf_files(Z_DxK, config, Yt_NxK=Yt_NxK, rows_N=rows_N))


def diffmeans_files(dic: DiffMeansDictionary, config: dict) -> dict:
    tensors = {"directions_FxD": np.asarray(dic.directions_np, np.float32), "norms_F": np.asarray(dic.norms_F, np.float32)}
    return _result_files("diffmeans", tensors, config, hook=dic.hook, n_features=dic.n_features,
                         label_names=list(dic.label_names))


def pca_files(dic: PCADictionary, config: dict) -> dict:
    tensors = {"components_KxD": np.asarray(dic.components_KxD, np.float32), "mean_D": np.asarray(dic.mean_D, np.float32),
               "explained_variance_K": np.asarray(dic.explained_variance_K, np.float32)}
    return _result_files("pca", tensors, config, hook=dic.hook, n_features=dic.n_features,
                         pca_split="± halves: features 0..k-1 are +axis, k..2k-1 are −axis")


def load(out_dir: str):
    """Load a saved SNMF / DiffMeans / PCA result as its Dictionary (Y is not loaded); its config.json
    is the Dictionary's `config`."""
    path = os.path.join(published(out_dir), CONFIG)
    if not os.path.exists(path):
        raise RunError(f"no {CONFIG} in {out_dir}: not a saved dictionary "
                       "(train one with `featureatlas train-snmf`)")
    with open(path) as f:
        config = json.load(f)
    method = config.get("method")
    weights = os.path.join(out_dir, WEIGHTS)
    if method == "snmf":
        with safe_open(weights, framework="numpy") as f:
            return SNMFDictionary(config["hook"], f.get_tensor("Z_DxK"), config)
    w = load_file(weights)
    if method == "diffmeans":
        return DiffMeansDictionary(config["hook"], w["directions_FxD"], w["norms_F"],
                                   tuple(config.get("label_names", ())), config)
    if method == "pca":
        return PCADictionary(config["hook"], w["components_KxD"], w["mean_D"], w["explained_variance_K"], config)
    raise RunError(f"{out_dir}/config.json has unknown method {method!r} (snmf, diffmeans or pca); "
                   "is it a dictionary saved by train-snmf?")


def load_codes(out_dir: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(Yt_NxK, rows_N) saved with --save-y (loads into memory)."""
    w = load_file(os.path.join(published(out_dir), WEIGHTS))
    if "Yt_NxK" not in w:
        raise RunError(f"{out_dir} was saved without Y; train again with --save-y")
    return w["Yt_NxK"], w.get("rows_N")
