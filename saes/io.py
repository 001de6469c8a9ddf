"""Saved SAE format: a directory with `config.json` and `weights.safetensors`.

config.json   the SAEConfig fields (architecture, d_in, d_out, width, k, hook_in, hook_out, model_id,
              store_fingerprint, normalisation_folded, input_scale, output_scale, hyperparameters)
              plus "train" (the SAETrainConfig of the run, or {}), "data" (what it was trained on:
              store, contexts used of those planned, excluded tokens) and "format": "featureatlas-sae/1".
weights.safetensors   float32 tensors named as in saes/sae.py (W_enc, b_enc, W_dec, b_dec, threshold,
              b_gate, r_mag, b_mag), all in raw activation space.

Normalisation fold. Training sees x' = s_in·x and targets y' = s_out·y with s = sqrt(d / E‖x‖²).
With training-space parameters (W, b, W_d, b_d, θ) the trainer saves, for s_in, s_out:

    W_enc = W · s_in / s_out,   b_enc = b / s_out,   threshold = θ / s_out,
    W_dec = W_d (rows unit norm, unchanged),   b_dec = b_d / s_out,
    gated: b_gate = b_g / s_out, b_mag = b_m / s_out, r_mag unchanged.

Every encoder is positively homogeneous in its pre-activations (ReLU, JumpReLU with a scaled
threshold, TopK selection, the gate sign), so raw codes are the training codes divided by s_out:
f_raw(x) = f'(s_in·x) / s_out and decode(f_raw) = (f' @ W_d + b_d) / s_out = ŷ'/s_out, exactly the
reconstruction in raw space, while decoder rows stay unit norm. `normalisation_folded` is then true
and input_scale/output_scale record s_in/s_out for reference only.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from featureatlas.activation_store.errors import ConfigError
from featureatlas.activation_store.runs import publish_files, published
from featureatlas.saes.config import SAEConfig
from featureatlas.saes.sae import SAE, sae_from_params

FORMAT = "featureatlas-sae/1"
RECORDS = ("train", "data", "format")  # config.json keys beside the SAEConfig fields


def save_sae(sae: SAE, path: str | Path, train_config: dict | None = None, data: dict | None = None) -> Path:
    """Publish `sae` (raw-space parameters) into directory `path`: config.json and weights.safetensors
    become visible together (activation_store.runs.publish_files), never new weights beside an old config.

    train_config: the training settings of the run; data: what it was trained on (store, contexts used).
    """
    config = {**sae.config.to_dict(), "train": dict(train_config or {}), "format": FORMAT}  # written with sorted keys
    if data:
        config["data"] = dict(data)
    tensors = {n: np.ascontiguousarray(np.asarray(v, np.float32)) for n, v in sae.params.items()}
    publish_files(path, {
        "weights.safetensors": lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}),
        "config.json": json.dumps(config, indent=2, sort_keys=True),
    })
    return Path(path)


def load_sae(path: str | Path) -> SAE:
    """Load a directory written by `save_sae` (its config.json's "train" and "data" records are not read)."""
    path = published(path)
    cfile, wfile = path / "config.json", path / "weights.safetensors"
    if not cfile.exists():
        raise FileNotFoundError(f"{cfile} not found; is {path} an SAE directory written by save_sae / train-sae?")
    raw = json.loads(cfile.read_text())
    fmt = raw.get("format", FORMAT)
    if fmt != FORMAT:
        raise ConfigError(f"{cfile} has format {fmt!r}, this version reads {FORMAT!r}")
    config = SAEConfig.from_dict(raw, where=str(cfile), ignore=RECORDS)
    if not wfile.exists():
        raise FileNotFoundError(f"{wfile} not found next to config.json; the SAE directory is incomplete")
    return sae_from_params(config, load_file(str(wfile)))
