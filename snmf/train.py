"""Fit SNMF / DiffMeans / PCA on one hook of an activation store and save the result.

This is what `featureatlas train-snmf` runs: open the store, pick the tokens (train split,
BOS and padding excluded, optionally a seeded subset of --max-tokens), fit, save
(`snmf.io`), log the loss curve to metrics.jsonl + loss.png, optionally build the hierarchy,
and summarise (relative error, VocabProj tokens of the first features when the model loads).
Resumable: full batch checkpoints to <out>/checkpoint.npz, streaming to <out>/stream/.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time

import numpy as np

from featureatlas.snmf import io
from featureatlas.snmf.baselines import fit_diffmeans, fit_pca
from featureatlas.snmf.data import StoreSource, load_matrix
from featureatlas.snmf.solver import SNMFConfig, fit_full_batch
from featureatlas.snmf.streaming import STATE_FILE, fit_streaming, remove_y_files

METHODS = ("snmf", "diffmeans", "pca")
CHECKPOINT = "checkpoint.npz"
STREAM_DIR = "stream"
METRICS = "metrics.jsonl"


@dataclasses.dataclass
class TrainConfig:
    store: str
    out: str
    hook: str = "mlp_hidden.15"
    method: str = "snmf"
    snmf: SNMFConfig = dataclasses.field(default_factory=SNMFConfig)
    chunk_size: int | None = None  # streaming solver when set
    mu_steps: int = 1  # streaming: multiplicative Y updates per chunk and pass
    max_tokens: int | None = None
    split: str = "train"
    save_y: bool = False
    resume: bool = False
    hierarchy: tuple[int, ...] | None = None  # e.g. (400, 200, 100, 50); ranks[0] is the main k
    checkpoint_every: int = 10
    vocab_features: int = 5  # features whose VocabProj tokens the summary prints
    model: str | None = None  # model for VocabProj; default: the store's model_id
    progress: bool = True


def train(cfg: TrainConfig) -> dict:
    """Run the fit described by cfg; returns the saved config.json contents (plus 'summary')."""
    from featureatlas.activation_store import ActivationStore

    if cfg.method not in METHODS:
        raise ValueError(f"method={cfg.method!r} is not one of {', '.join(METHODS)}")
    if cfg.hierarchy:
        cfg = dataclasses.replace(cfg, snmf=dataclasses.replace(cfg.snmf, k=cfg.hierarchy[0]))
    store = ActivationStore.open(cfg.store)
    source = StoreSource.open(store, cfg.hook, split=cfg.split, max_tokens=cfg.max_tokens, seed=cfg.snmf.seed)
    os.makedirs(cfg.out, exist_ok=True)
    base = {
        "hook": cfg.hook, "model_id": store.model_id, "weights_hash": store.weights_hash,
        "store": os.path.abspath(cfg.store), "store_fingerprint": store.fingerprint,
        "split": cfg.split, "n_tokens": source.n, "d": source.d, "max_tokens": cfg.max_tokens,
    }
    t0 = time.time()
    if cfg.method == "diffmeans":
        dic = fit_diffmeans(source, cfg.hook, label_names=store.label_names, chunk_size=cfg.chunk_size or 65536)
        config = {**base, **dic.config}
        io.save_diffmeans(cfg.out, dic, config)
    elif cfg.method == "pca":
        dic = fit_pca(source, cfg.hook, cfg.snmf.k, chunk_size=cfg.chunk_size, seed=cfg.snmf.seed)
        config = {**base, "k": cfg.snmf.k, "seed": cfg.snmf.seed, "chunk_size": cfg.chunk_size,
                  "rel_error": pca_rel_error(source, dic)}
        io.save_pca(cfg.out, dic, config)
    else:
        config = _train_snmf(cfg, source, base)
        dic = io.load(cfg.out)
    config["time_s"] = round(time.time() - t0, 2)
    config = {**io.read_config(cfg.out), "time_s": config["time_s"]}
    io.write_config(cfg.out, config)
    config["summary"] = summarize(cfg, config, dic)
    return config


def _train_snmf(cfg: TrainConfig, source, base: dict) -> dict:
    s = cfg.snmf
    metrics_path = os.path.join(cfg.out, METRICS)
    ckpt = os.path.join(cfg.out, CHECKPOINT)
    stream_dir = os.path.join(cfg.out, STREAM_DIR)
    done = checkpoint_iteration(ckpt, stream_dir) if cfg.resume else None
    if done is None:  # a fresh run: drop what an earlier run left, so nothing stale mixes in
        for name in (CHECKPOINT, METRICS, io.CONFIG, io.WEIGHTS, "loss.png", "hierarchy.json",
                     "hierarchy.safetensors"):
            if os.path.exists(os.path.join(cfg.out, name)):
                os.unlink(os.path.join(cfg.out, name))
        shutil.rmtree(stream_dir, ignore_errors=True)
    else:
        truncate_metrics(metrics_path, done)

    def on_iter(it, loss, best, sq_norm):
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"iteration": it, "loss": loss, "best_loss": best,
                                "rel_error": math.sqrt(max(loss, 0.0) / sq_norm),
                                "time": round(time.time(), 3)}) + "\n")

    if cfg.chunk_size:
        fit = fit_streaming(source, s, chunk_size=cfg.chunk_size, workdir=stream_dir, mu_steps=cfg.mu_steps,
                            save_y=cfg.save_y or bool(cfg.hierarchy), resume=cfg.resume,
                            on_iter=on_iter, progress=cfg.progress)
    else:
        A_DxN = load_matrix(source)
        fit = fit_full_batch(A_DxN, s, checkpoint=ckpt, checkpoint_every=cfg.checkpoint_every,
                             resume=cfg.resume, on_iter=on_iter, progress=cfg.progress)
        del A_DxN
    config = {**base, "k": s.k, "p": s.p, "init": s.init, "max_iters": s.iters, "patience": s.patience,
              "tol": s.tol, "seed": s.seed, "iterations": fit.iterations, "stopped_early": fit.stopped_early,
              "solver": "streaming" if cfg.chunk_size else "full_batch", "chunk_size": cfg.chunk_size,
              "mu_steps": cfg.mu_steps if cfg.chunk_size else None,
              "final_loss": fit.loss, "rel_error": fit.rel_error,
              "kept_per_column": s.kept_per_column(source.d)}
    rows = source.rows_N if cfg.save_y else None
    io.save_snmf(cfg.out, fit.Z_DxK, config, Yt_NxK=fit.Yt_NxK if cfg.save_y else None, rows_N=rows)
    plot_loss(metrics_path, os.path.join(cfg.out, "loss.png"))
    if cfg.hierarchy:
        config["hierarchy"] = _build_hierarchy(cfg, source, fit)
        io.write_config(cfg.out, {**io.read_config(cfg.out), "hierarchy": config["hierarchy"]})
    if cfg.chunk_size:  # the result holds what is needed; the n×k scratch files can be large
        remove_y_files(stream_dir)
    return config


def checkpoint_iteration(ckpt: str, stream_dir: str) -> int | None:
    """Iterations completed by the checkpoint a resumed run will continue from (None: no checkpoint)."""
    for path in (ckpt, os.path.join(stream_dir, STATE_FILE)):
        if os.path.exists(path):
            with np.load(path) as ck:
                return int(ck["iteration"])
    return None


def truncate_metrics(path: str, iteration: int) -> None:
    """Drop metric lines written after the checkpoint (the resumed run writes them again)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    keep = []
    for ln in lines:
        try:
            if json.loads(ln)["iteration"] <= iteration:
                keep.append(ln)
        except (ValueError, KeyError):
            break  # a torn last line from a kill
    with open(path, "w") as f:
        f.writelines(keep)


def plot_loss(metrics_path: str, png_path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its, rel = [], []
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            for ln in f:
                rec = json.loads(ln)
                if rec.get("rel_error") is not None:
                    its.append(rec["iteration"])
                    rel.append(rec["rel_error"])
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(its, rel)
    ax.set_xlabel("iteration")
    ax.set_ylabel("‖A − ZY‖_F / ‖A‖_F")
    ax.set_title("SNMF reconstruction error")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def _build_hierarchy(cfg: TrainConfig, source, fit) -> dict:
    from featureatlas.snmf.hierarchy import fit_levels, hierarchy_json, top_tokens_per_level

    levels = fit_levels(fit.Z_DxK, list(cfg.hierarchy), cfg.snmf)
    _, norms = io.unit_columns(fit.Z_DxK)
    Yt = fit.Yt_NxK
    scaled = _ScaledY(Yt, norms)
    token_ids = source.token_ids()
    tops = top_tokens_per_level(levels, scaled, token_ids)
    tok = _tokenizer(cfg, source)
    token_text = (lambda t: tok.decode([t])) if tok is not None else None
    data = hierarchy_json(levels, tops, token_ids, token_text, cfg.hierarchy)
    with open(os.path.join(cfg.out, "hierarchy.json"), "w") as f:
        json.dump(data, f, indent=1)
    tensors = {f"Z{i}_DxK": lv.Z_DxK for i, lv in enumerate(levels) if i > 0}
    tensors.update({f"Y{i}_KxKprev": lv.Y_KxKprev for i, lv in enumerate(levels) if i > 0})
    io.write_safetensors(os.path.join(cfg.out, "hierarchy.safetensors"), tensors, {"ranks": list(cfg.hierarchy)})
    return {"ranks": list(cfg.hierarchy), "rel_errors": [lv.rel_error for lv in levels[1:]]}


class _ScaledY:
    """Level 0's Yᵀ in the unit-norm-Z scale, readable by row ranges (array or YFile)."""

    def __init__(self, Yt, norms):
        self.Yt, self.norms, self.shape = Yt, norms, Yt.shape

    def read(self, start, count):
        rows = self.Yt.read(start, count) if hasattr(self.Yt, "read") else np.asarray(self.Yt[start:start + count])
        return rows * self.norms


def pca_rel_error(source, dic) -> float:
    """‖X − X̂‖_F/‖X‖_F of the rank-k PCA reconstruction (about zero, like SNMF's)."""
    num = den = 0.0
    C = np.asarray(dic.components_KxD, np.float64)
    for _, X in source.chunks(65536):
        Xc = np.asarray(X, np.float64) - dic.mean_D
        R = Xc - (Xc @ C.T) @ C
        num += float((R * R).sum())
        den += float((np.asarray(X, np.float64) ** 2).sum())
    return math.sqrt(num / den)


_MODEL_CACHE: dict = {}


def _model(name: str | None):
    """The language model for VocabProj and token strings, loaded once; None if it cannot load."""
    if not name:
        return None
    if name not in _MODEL_CACHE:
        try:
            from featureatlas.activation_store.models import load_model
            _MODEL_CACHE[name] = load_model(name)
        except Exception as err:  # the summary is optional; say why it is skipped
            print(f"(VocabProj skipped: cannot load model {name!r}: {err})")
            _MODEL_CACHE[name] = None
    return _MODEL_CACHE[name]


def _tokenizer(cfg: TrainConfig, source):
    lm = _model(cfg.model or source.store.model_id)
    return lm.tokenizer if lm is not None else None


def vocab_proj(dic, lm, features, top: int = 10) -> list[list[str]]:
    """Top tokens (decoded text) of lm.unembed(residual direction) for the given features (VocabProj)."""
    import jax.numpy as jnp

    R = dic.residual_directions(lm)
    out = []
    for f in features:
        logits = np.asarray(lm.unembed(jnp.asarray(R[f])))
        out.append([lm.tokenizer.decode([int(t)]) for t in np.argsort(-logits)[:top]])
    return out


def summarize(cfg: TrainConfig, config: dict, dic) -> str:
    lines = [f"{config['method']} on {config['hook']}: {config['n_features']} features from "
             f"{config['n_tokens']:,} tokens (d={config['d']}) in {config.get('time_s', 0):.1f}s"]
    if config.get("rel_error") is not None:
        lines.append(f"relative reconstruction error ‖A−Â‖_F/‖A‖_F = {config['rel_error']:.4f}")
    if config["method"] == "snmf":
        lines.append(f"iterations {config['iterations']} (stopped early: {config['stopped_early']}), "
                     f"final loss {config['final_loss']:.6g}")
    if config["method"] == "diffmeans":
        lines.append("labels: " + ", ".join(dic.label_names))
    if cfg.vocab_features:
        lm = _model(cfg.model or config.get("model_id"))
        if lm is not None:
            if config.get("weights_hash") and lm.weights_hash != config["weights_hash"]:
                lines.append("(note: the model's weights hash differs from the store's)")
            n = min(cfg.vocab_features, dic.n_features)
            for f, toks in zip(range(n), vocab_proj(dic, lm, range(n))):
                lines.append(f"feature {f}: VocabProj top tokens {toks}")
    return "\n".join(lines)

