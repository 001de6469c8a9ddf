"""Plots of SAE training runs (matplotlib, off-screen Agg canvas; no display needed).

  plot_run(run_dir)              training_curves.png (loss, MSE, L0, FVU, relative error, dead fraction
                                 vs tokens) and density_hist.png (log10 latent density at the last eval)
  plot_frontier(runs, out_png)   sparsity-fidelity frontier: L0 vs FVU, one point per SAE

Reads `metrics.jsonl` as written by saes/trainer.py: one JSON object per line with
kind "train" (step, tokens, loss, mse, l0, fvu, dead_frac, ...) or kind "eval" (the
reconstruction metrics of eval/metrics.py, including `log10_density_hist` = {edges, counts, n_dead}),
and the SAE's `config.json` (its output_scale and its training settings, key "train").

Train and eval values share an axis only when they measure the same thing in the same units:
  * MSE: training rows are in training units (targets scaled by output_scale so E||y||^2 = d);
    eval rows are in raw units, so eval MSE is drawn times output_scale^2 (config.json), or not at all.
  * FVU: eval reports it over all tokens and with massive-norm tokens excluded
    (activation_store/massive.py); a few such tokens can hold most of the variance and decide the
    all-token FVU alone. The train FVU is drawn on the panel of its own token rule: all tokens, or
    massive tokens excluded when training left them out (config.json train.exclude_massive) or the train
    row logs `fvu_excl_massive`. Both are one ratio of summed errors and variances (train: over the log
    window, saes/trainer.py POOLED; eval: over all eval tokens).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from featureatlas.activation_store.plotting import SI as _TOKENS, figure as _figure, plain_log as _plain_log
from featureatlas.activation_store.plotting import save_png as _save
from featureatlas.activation_store.runs import MetricsLog


@dataclasses.dataclass(frozen=True)
class Panel:
    """One panel of training_curves.png: a train series and an eval series of the same quantity."""

    title: str
    """panel title (says the units and the token rule)"""
    train_key: str | None
    """key of the train rows drawn as a line (None: no train series)"""
    eval_key: str | None
    """key of the eval rows drawn as dots (None: no eval series)"""
    log: bool = False
    """log y axis when every value is positive"""
    note: str = ""
    """small text in the panel saying why train and eval may differ"""
    eval_scale: float = 1.0
    """factor applied to eval values (raw -> training units)"""


_DEAD_NOTE = ("train: no fire in the last dead_tokens training tokens;\n"
              "eval: no fire on any eval token")


def _config(sae_dir: Path) -> dict:
    """The SAE's config.json, or {} when it is missing or unreadable."""
    try:
        return json.loads((Path(sae_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def panels(train: Sequence[dict], evals: Sequence[dict], config: dict | None = None) -> list[Panel]:
    """The panels to draw for these rows; `config` is the SAE's config.json (output_scale, train)."""
    config = config or {}
    has = lambda rows, k: any(k in r for r in rows)  # noqa: E731
    out_scale = float(config.get("output_scale") or 0.0)
    excl_in_training = bool((config.get("train") or {}).get("exclude_massive"))
    # Train FVU goes to the panel of its token rule.
    train_fvu_all = "fvu" if has(train, "fvu") and not excl_in_training else None
    train_fvu_excl = ("fvu_excl_massive" if has(train, "fvu_excl_massive")
                      else "fvu" if excl_in_training and has(train, "fvu") else None)
    eval_excl = has(evals, "fvu_excl_massive")
    n_massive = next((r["n_massive"] for r in reversed(evals) if "n_massive" in r), None)
    # Eval MSE is in raw units: drawn only when output_scale converts it.
    mse = (Panel("MSE per element, training units (E||y||² = d)", "mse", "mse", log=True, eval_scale=out_scale ** 2)
           if out_scale > 0 else Panel("MSE per element, training units", "mse", None, log=True))
    out = [Panel("loss (training units)", "loss", None, log=True), mse,
           Panel("L0 (active latents / token)", "l0", "l0")]
    all_title = "FVU, all tokens" if eval_excl or train_fvu_excl else "FVU"
    if eval_excl and n_massive:
        all_title += f" (eval holds {n_massive} massive)"
    out.append(Panel(all_title, train_fvu_all, "fvu"))
    if eval_excl or train_fvu_excl:
        out.append(Panel("FVU, massive-norm tokens excluded", train_fvu_excl,
                         "fvu_excl_massive" if eval_excl else None))
    out.append(Panel("mean per-token ||x - x̂||² / ||x||²", "rel_err_per_token", "rel_err_per_token", log=True))
    out.append(Panel("dead fraction", "dead_frac", "dead_frac",
                     note=_DEAD_NOTE if has(train, "dead_frac") and has(evals, "dead_frac") else ""))
    return [p for p in out if (p.train_key and has(train, p.train_key)) or (p.eval_key and has(evals, p.eval_key))]


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) of `run_dir/metrics.jsonl`, each sorted by step."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; point at an SAE directory written by train-sae")
    rows = sorted(MetricsLog(path).rows(), key=lambda r: r.get("step", 0))
    return [r for r in rows if r.get("kind", "train") == "train"], [r for r in rows if r.get("kind") == "eval"]


def _x_tokens(rows: Sequence[dict]) -> np.ndarray:
    return np.array([r.get("tokens", r.get("step", i)) for i, r in enumerate(rows)], float)


def _series(rows: Sequence[dict], key: str | None, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rows = [r for r in rows if key and isinstance(r.get(key), (int, float))]
    return _x_tokens(rows), np.array([r[key] for r in rows], float) * scale


def plot_curves(train: Sequence[dict], evals: Sequence[dict], out_png: Path, title: str = "",
                config: dict | None = None) -> Path:
    """One panel per quantity vs training tokens (`panels`); eval values as dots on the same axes
    only where they share the train values' units and token rule."""
    chosen = panels(train, evals, config)
    if not chosen:
        raise ValueError(f"no plottable metrics (loss, mse, l0, fvu, dead_frac, ...) in the rows for {out_png}")
    n_cols = min(3, len(chosen))
    n_rows = -(-len(chosen) // n_cols)
    fig = _figure(4.6 * n_cols, 3.4 * n_rows)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax in axes[len(chosen):]:
        ax.set_visible(False)
    x_max = max([1.0, *_x_tokens(train), *_x_tokens(evals)])
    for ax, panel in zip(axes, chosen):
        tx, ty = _series(train, panel.train_key)
        ex, ey = _series(evals, panel.eval_key, panel.eval_scale)
        if tx.size:
            ax.plot(tx, ty, lw=1.4, color="C0", label="train")
        if ex.size:
            ax.plot(ex, ey, "o", ms=5, color="C1",
                    label="eval" if panel.eval_scale == 1.0 else "eval (× output_scale²)")
        ax.set_xlim(0, x_max * 1.04)
        values = np.concatenate([ty, ey])
        if panel.log and values.size and np.all(values > 0):
            ax.set_yscale("log")
            _plain_log(ax.yaxis)
        ax.xaxis.set_major_formatter(_TOKENS)
        ax.set_xlabel("training tokens")
        ax.set_title(panel.title + (f"\n{panel.note}" if panel.note else ""), fontsize=9 if panel.note else 10)
        ax.grid(alpha=0.3)
        if tx.size and ex.size:
            ax.legend(fontsize=8, loc="lower left")
    if title:
        fig.suptitle(title)
    return _save(fig, out_png)


def plot_density(hist: dict, out_png: Path, title: str = "") -> Path:
    """Bar chart of the log10-density histogram; dead latents noted separately (they have no log)."""
    edges = np.asarray(hist["edges"], float)
    counts = np.asarray(hist["counts"], float)
    fig = _figure(6, 3.6)
    ax = fig.subplots()
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="tab:blue", edgecolor="white")
    n_dead = int(hist.get("n_dead", 0))
    total = int(counts.sum()) + n_dead
    ax.set_xlabel("log10(latent density)   (fraction of tokens where the latent fires)")
    ax.set_ylabel("latents")
    ax.set_title(title or "latent density")
    ax.text(0.02, 0.95, f"dead (never fired): {n_dead} of {total}", transform=ax.transAxes, va="top", fontsize=9)
    nz = np.flatnonzero(counts)
    if nz.size:  # zoom onto the populated bins, a little margin either side
        ax.set_xlim(edges[max(nz[0] - 1, 0)], edges[min(nz[-1] + 2, len(edges) - 1)])
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, out_png)


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write training_curves.png and (when an eval row has a histogram) density_hist.png into each SAE
    directory of `run_dir` (the run itself, or its sub-directories when several SAEs were trained),
    plus frontier.png in run_dir when there are several. Returns the written paths."""
    run_dir = Path(run_dir)
    if (run_dir / "metrics.jsonl").exists():
        dirs = [run_dir]
    else:
        dirs = sorted(p for p in run_dir.iterdir() if (p / "metrics.jsonl").exists()) if run_dir.is_dir() else []
    if not dirs:
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir} or its sub-directories; is it a train-sae output?")
    written = []
    for d in dirs:
        train, evals = read_metrics(d)
        name = d.name
        written.append(plot_curves(train, evals, d / "training_curves.png", title=name, config=_config(d)))
        hist = next((r["log10_density_hist"] for r in reversed(evals) if "log10_density_hist" in r), None)
        if hist:
            written.append(plot_density(hist, d / "density_hist.png", title=f"{name}: latent density"))
    if len(dirs) > 1:
        written.append(plot_frontier(dirs, run_dir / "frontier.png"))
    return written


def _summary_row(d: Path) -> dict:
    """The last eval row of an SAE directory (else its last train row), with its architecture."""
    train, evals = read_metrics(d)
    return {"architecture": _config(d).get("architecture", ""), "sae": d.name, **(evals or train or [{}])[-1]}


def plot_frontier(runs: Iterable[str | Path | dict], out_png: str | Path, *, x: str = "l0", y: str | None = None) -> Path:
    """L0 (log scale) vs FVU, one point per SAE, one line per architecture (sorted by L0).

    `runs`: SAE directories (their last eval row is used) or summary dicts with `x`, `y` and
    optionally "architecture" and "sae" (label). y=None: the FVU with massive-norm tokens excluded
    when every run reports it (a few such tokens otherwise decide the ranking), else "fvu"."""
    rows = [r if isinstance(r, dict) else _summary_row(Path(r)) for r in runs]
    if y is None:
        y = "fvu_excl_massive" if rows and all(isinstance(r.get("fvu_excl_massive"), (int, float)) for r in rows) \
            else "fvu"
    rows = [r for r in rows if x in r and y in r]
    if not rows:
        raise ValueError(f"no run has both {x!r} and {y!r}; run an evaluation first")
    fig = _figure(6, 4.4)
    ax = fig.subplots()
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(str(r.get("architecture", "")) or "SAE", []).append(r)
    for arch, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r[x])
        ax.plot([r[x] for r in rs], [r[y] for r in rs], "o-", ms=6, label=arch)
        for r in rs:
            if r.get("sae"):
                ax.annotate(str(r["sae"]), (r[x], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if all(r[x] > 0 for r in rows):
        ax.set_xscale("log")
        _plain_log(ax.xaxis)
    ax.set_xlabel("L0 (mean active latents per token)" if x == "l0" else x)
    ylabels = {"fvu": "FVU = 1 - explained variance, all tokens",
               "fvu_excl_massive": "FVU, massive-norm tokens excluded"}
    ax.set_ylabel(ylabels.get(y, y) + (" (lower is better)" if y in ylabels else ""))
    ax.set_title("sparsity vs reconstruction")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, Path(out_png))
