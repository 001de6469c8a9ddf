"""Fit SNMF / DiffMeans / PCA on one hook of an activation store and save the result.

This is what `featureatlas train-snmf` runs, as a run of the run layer (`activation_store.runs`):
check every setting and the output directory (nothing on disk changes before that), open the
store, pick the tokens (the split, BOS and padding excluded, optionally a seeded subset of
--max-tokens), fit, publish the result (`snmf.io`: config.json, weights.safetensors, loss.png,
optionally the hierarchy, all at once), and summarise (relative error, VocabProj tokens of the
first features when the model loads). The run directory also holds run.json (the settings,
with the store's fingerprint), results.json, metrics.jsonl and the orbax checkpoints
(checkpoints/; the streaming solver's Yᵀ scratch files in stream/). --resume continues from the
last checkpoint after checking that every setting (and the store) is the same.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from pathlib import Path

import numpy as np

from featureatlas.activation_store.configs import Config, flags_of, setting
from featureatlas.activation_store.errors import ConfigError, RunError
from featureatlas.activation_store.runs import MANIFEST, RESULTS, Run
from featureatlas.snmf import io
from featureatlas.snmf.baselines import check_labels, check_pca_rank, fit_diffmeans, fit_pca
from featureatlas.snmf.data import StoreColumns, load_matrix
from featureatlas.snmf.hierarchy import check_ranks
from featureatlas.snmf.solver import SNMFConfig, fit_full_batch, relative_error
from featureatlas.snmf.streaming import fit_streaming, remove_y_files

JOB = "train-snmf"
METHODS = ("snmf", "diffmeans", "pca")
STREAM_DIR = "stream"
# Checkpoints of runs written before the run layer (.npz): they do not record the store, so they are not resumed.
LEGACY_CHECKPOINTS = ("checkpoint.npz", "stream/stream_state.npz")
# Fields that say how to drive the run, not what is fitted: not part of the settings a resume compares.
RUN_OPTIONS = ("out", "resume", "overwrite", "progress", "vocab_features", "model", "checkpoint_every")
RESULT_KEYS = ("iterations", "stopped_early", "final_loss", "rel_error", "n_tokens", "n_contexts", "hierarchy",
               "label_counts", "time_s")


@dataclasses.dataclass
class SNMFJobConfig(Config):
    """What `featureatlas train-snmf` fits, on which data, and how the run is driven."""

    store: str = setting()
    """Activation store (.h5) written by `featureatlas harvest`."""
    out: str = setting()
    """Output directory: the saved dictionary and the run's records."""
    hook: str = setting("mlp_hidden.15")
    """Hook to factorize (any hook of the store works)."""
    method: str = setting("snmf", choices=METHODS)
    """snmf, diffmeans (one direction per store label) or pca (2k ± features)."""
    snmf: SNMFConfig = setting(default_factory=SNMFConfig, cli=False)
    """The semi-NMF hyper-parameters (flags --k, --p, --init, --iters, ...)."""
    chunk_size: int | None = setting(None, gt=0)
    """Tokens per chunk: use the streaming solver, whose memory does not grow with the token count (unset: full batch)."""
    mu_steps: int = setting(1, ge=1)
    """Streaming only: multiplicative Y updates per chunk and pass (1 = exactly the full-batch iteration)."""
    max_tokens: int | None = setting(None, gt=0)
    """Fit on a seeded random subset of this many tokens (unset: every token of the split)."""
    split: str = setting("train", choices=("train", "val", "all"))
    """Store split to fit on."""
    save_y: bool = setting(False)
    """Also save the token coefficients Y (Yt_NxK) and their store rows."""
    hierarchy: tuple[int, ...] | None = setting(None)
    """Also fit a hierarchy with these ranks, e.g. 400,200,100,50 (the first rank replaces --k)."""
    checkpoint_every: int = setting(10, ge=1)
    """Full batch: iterations between checkpoints (the streaming solver checkpoints every pass)."""
    vocab_features: int = setting(5, ge=0)
    """Print the VocabProj top tokens of this many features (0: do not load the model)."""
    model: str | None = setting(None)
    """Model for the VocabProj summary (unset: the store's model)."""
    progress: bool = setting(True)
    """Show a progress bar."""
    resume: bool = setting(False)
    """Continue the run in --out from its last checkpoint (its settings and store must be the same)."""
    overwrite: bool = setting(False)
    """Replace a run already in --out (deleted only after every check has passed)."""

    def validate(self) -> "SNMFJobConfig":
        super().validate()
        if self.hierarchy is not None:
            check_ranks(self.hierarchy)
            if self.method != "snmf":
                raise ConfigError(f"--hierarchy needs --method snmf (got --method {self.method})")
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
        return self


FLAGS = {**flags_of(SNMFJobConfig, SNMFConfig), "store_fingerprint": "--store", "model_id": "--store",
         "weights_hash": "--store", "store_dtype": "--store", "n_contexts": "--store", "d": "--hook",
         "n_tokens": "--store, --split or --max-tokens"}


def train(cfg: SNMFJobConfig) -> dict:
    """Run the fit described by cfg; returns the saved config.json contents (plus 'summary')."""
    cfg, run, source = prepare(cfg)
    store = source.store
    base = {"hook": cfg.hook, "model_id": store.model_id, "weights_hash": store.weights_hash,
            "store": str(Path(cfg.store).absolute()), "store_fingerprint": store.fingerprint, "split": cfg.split,
            "n_tokens": source.n, "n_contexts": store.n_committed, "d": source.d, "max_tokens": cfg.max_tokens}
    t0 = time.time()
    with run.active():
        if cfg.method == "diffmeans":
            dic = fit_diffmeans(source, cfg.hook, label_names=store.label_names, chunk_size=cfg.chunk_size or 65536)
            config, files = {**base, **dic.config}, lambda c: io.diffmeans_files(dic, c)
        elif cfg.method == "pca":
            dic = fit_pca(source, cfg.hook, cfg.snmf.k, chunk_size=cfg.chunk_size, seed=cfg.snmf.seed)
            config = {**base, "k": cfg.snmf.k, "seed": cfg.snmf.seed, "chunk_size": cfg.chunk_size,
                      "rel_error": pca_rel_error(source, dic)}
            files = lambda c: io.pca_files(dic, c)  # noqa: E731
        else:
            config, files = _fit_snmf(cfg, source, base, run)
        config["time_s"] = round(time.time() - t0, 2)
        run.publish(files(config))
        run.write_results({k: config[k] for k in RESULT_KEYS if k in config})
        if cfg.method == "snmf" and cfg.chunk_size:  # the result holds what is needed; the n×k scratch can be large
            remove_y_files(str(run.dir / STREAM_DIR))
    dic = io.load(cfg.out)
    return {**dic.config, "summary": summarize(cfg, dic.config, dic)}


def prepare(cfg: SNMFJobConfig) -> tuple[SNMFJobConfig, Run, StoreColumns]:
    """Every check a run needs before it starts (settings, store, hook, shapes, output directory);
    nothing on disk changes. Returns the config (k from --hierarchy), the prepared run and the tokens."""
    from featureatlas.activation_store import ActivationStore

    cfg = cfg.validate()
    if cfg.hierarchy:
        cfg = cfg.replace(snmf=cfg.snmf.replace(k=cfg.hierarchy[0]))
    snmf = cfg.snmf
    out = Path(cfg.out)
    old = [name for name in LEGACY_CHECKPOINTS if (out / name).exists()]
    if old and not (out / MANIFEST).exists() and not cfg.overwrite:
        raise RunError(f"{out} holds a checkpoint in the old .npz format ({old[0]}), which does not record the "
                       f"store it was fitted on, so it cannot be resumed safely; pass --overwrite to start again "
                       f"in {out}, or choose another --out")
    store = ActivationStore.open(cfg.store)
    source = StoreColumns.open(store, cfg.hook, split=cfg.split, max_tokens=cfg.max_tokens, seed=snmf.seed)
    if cfg.method == "snmf":
        snmf.validate(source.d, source.n)
    elif cfg.method == "pca":
        check_pca_rank(snmf.k, source.d, source.n)
    else:
        check_labels(source.labels())
    if not store.complete:
        print(f"featureatlas {JOB}: warning: {store.path} holds {store.n_committed} of its {store.n_planned} "
              f"contexts (its harvest was interrupted or is still running); fitting on the {source.n:,} tokens "
              "committed so far (recorded as n_contexts). Resume the harvest first to use them all.",
              file=sys.stderr)
    settings = {k: v for k, v in cfg.to_dict().items() if k not in RUN_OPTIONS}
    settings.update(store_fingerprint=store.fingerprint, model_id=store.model_id, weights_hash=store.weights_hash,
                    store_dtype=store.dtype, n_contexts=store.n_committed, n_tokens=source.n, d=source.d)
    run = Run.prepare(out, JOB, settings, resume=cfg.resume, overwrite=cfg.overwrite, flags=FLAGS,
                      ignore=("store",), progress_markers=("checkpoints", RESULTS, io.CONFIG, io.WEIGHTS,
                                                           STREAM_DIR, *LEGACY_CHECKPOINTS))
    return cfg, run, source


def _fit_snmf(cfg: SNMFJobConfig, source, base: dict, run: Run):
    """Fit (resuming from the run's checkpoint if any); returns (config, files(config) -> {name: data})."""
    s = cfg.snmf

    def on_iter(it, loss, best, sq_norm):
        run.metrics.append([{"iteration": it, "loss": loss, "best_loss": best,
                             "rel_error": relative_error(loss, sq_norm), "time": round(time.time(), 3)}])

    with run.checkpoints(keep=1) as ckpt:  # the full-batch state holds Y (k×n) twice: one copy on disk is enough
        run.metrics.truncate_after(ckpt.latest_step() or 0, key="iteration")
        if cfg.chunk_size:
            fit = fit_streaming(source, s, chunk_size=cfg.chunk_size, workdir=str(run.dir / STREAM_DIR),
                                mu_steps=cfg.mu_steps, save_y=cfg.save_y or bool(cfg.hierarchy), checkpoints=ckpt,
                                on_iter=on_iter, progress=cfg.progress)
        else:
            fit = fit_full_batch(load_matrix(source), s, checkpoints=ckpt, checkpoint_every=cfg.checkpoint_every,
                                 on_iter=on_iter, progress=cfg.progress)
    config = {**base, "k": s.k, "p": s.p, "init": s.init, "max_iters": s.iters, "patience": s.patience,
              "tol": s.tol, "seed": s.seed, "iterations": fit.iterations, "stopped_early": fit.stopped_early,
              "solver": "streaming" if cfg.chunk_size else "full_batch", "chunk_size": cfg.chunk_size,
              "mu_steps": cfg.mu_steps if cfg.chunk_size else None, "final_loss": fit.loss,
              "rel_error": fit.rel_error, "kept_per_column": s.kept_per_column(source.d)}
    extra = {}
    if cfg.hierarchy:
        config["hierarchy"], extra = _build_hierarchy(cfg, source, fit)
    rows = run.metrics.rows()
    extra["loss.png"] = lambda path: plot_loss(rows, path)

    def files(config):
        return {**extra, **io.snmf_files(fit.Z_DxK, config, Yt_NxK=fit.Yt_NxK if cfg.save_y else None,
                                          rows_N=source.rows_N if cfg.save_y else None)}
    return config, files


def plot_loss(rows: list[dict], png_path) -> None:
    """The relative reconstruction error per iteration (metrics.jsonl rows) as a PNG."""
    from featureatlas.activation_store.plotting import figure, save_png

    rows = [r for r in rows if r.get("rel_error") is not None]
    fig = figure(4.4, 3.3)
    ax = fig.subplots()
    ax.plot([r["iteration"] for r in rows], [r["rel_error"] for r in rows], lw=1.4)
    ax.set_xlabel("iteration")
    ax.set_title("SNMF reconstruction error ‖A − ZY‖_F / ‖A‖_F", fontsize=10)
    ax.grid(alpha=0.3)
    save_png(fig, png_path)


def _build_hierarchy(cfg: SNMFJobConfig, source, fit) -> tuple[dict, dict]:
    """(the hierarchy's summary for config.json, its files: hierarchy.json and hierarchy.safetensors)."""
    from featureatlas.snmf.hierarchy import fit_levels, hierarchy_json, top_tokens_per_level

    levels = fit_levels(fit.Z_DxK, list(cfg.hierarchy), cfg.snmf)
    _, norms = io.unit_columns(fit.Z_DxK)
    token_ids = source.token_ids()
    tops = top_tokens_per_level(levels, fit.Yt_NxK, norms)
    lm = _model(cfg.model or source.store.model_id)
    token_text = (lambda t: lm.tokenizer.decode([t])) if lm is not None else None
    data = hierarchy_json(levels, tops, token_ids, token_text)
    tensors = {f"Z{i}_DxK": lv.Z_DxK for i, lv in enumerate(levels) if i > 0}
    tensors.update({f"Y{i}_KxKprev": lv.Y_KxKprev for i, lv in enumerate(levels) if i > 0})
    files = {"hierarchy.json": io.json_text(data),
             "hierarchy.safetensors": io.tensors_file(tensors, {"ranks": list(cfg.hierarchy)})}
    return {"ranks": list(cfg.hierarchy), "rel_errors": [lv.rel_error for lv in levels[1:]]}, files


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


@functools.cache
def _model(name: str | None):
    """The language model for VocabProj and token strings, loaded once per name; None if it cannot load."""
    if not name:
        return None
    try:
        from featureatlas.activation_store.models import load_model
        return load_model(name)
    except Exception as err:  # the summary is optional; say why it is skipped
        print(f"(VocabProj skipped: cannot load model {name!r}: {err})")
        return None


def vocab_proj(dic, lm, features, top: int = 10) -> list[list[str]]:
    """Top tokens (decoded text) of lm.unembed(residual direction) for the given features (VocabProj)."""
    import jax.numpy as jnp

    R = dic.residual_directions(lm)
    top_ids = [np.argsort(-np.asarray(lm.unembed(jnp.asarray(R[f]))))[:top] for f in features]
    return [[lm.tokenizer.decode([int(t)]) for t in ids] for ids in top_ids]


def summarize(cfg: SNMFJobConfig, config: dict, dic) -> str:
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

