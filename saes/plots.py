"""Plots of SAE training runs (matplotlib, off-screen Agg canvas; no display needed).

  plot_run(run_dir)              training_curves.png (loss, MSE, L0, FVU, dead fraction vs tokens)
                                 and density_hist.png (log10 latent density at the last eval)
  plot_frontier(runs, out_png)   sparsity-fidelity frontier: L0 vs FVU, one point per SAE

Reads `metrics.jsonl` as written by saes/trainer.py: one JSON object per line with
kind "train" (step, tokens, loss, mse, l0, fvu, dead_frac, ...) or kind "eval" (the
reconstruction metrics of eval/metrics.py, including `log10_density_hist` = {edges, counts, n_dead}).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

CURVES = (("loss", "loss"), ("mse", "MSE"), ("l0", "L0 (active latents / token)"), ("fvu", "FVU"),
          ("dead_frac", "dead fraction"))


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) of `run_dir/metrics.jsonl`, each sorted by step."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; point at an SAE directory written by train-sae")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = sorted((r for r in rows if r.get("kind", "train") == "train"), key=lambda r: r.get("step", 0))
    evals = sorted((r for r in rows if r.get("kind") == "eval"), key=lambda r: r.get("step", 0))
    return train, evals


def _save(fig: Figure, out_png: Path) -> Path:
    out_png.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out_png, dpi=110)
    return out_png


# Plain numbers (0.4, 2, 30) on log axes instead of 4×10⁻¹.
_PLAIN = FuncFormatter(lambda v, _: f"{v:g}")


def _plain_log(axis) -> None:
    axis.set_major_formatter(_PLAIN)
    axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:e}"[0] in "25" else ""))


def _x_tokens(rows: Sequence[dict]) -> np.ndarray:
    return np.array([r.get("tokens", r.get("step", i)) for i, r in enumerate(rows)], float)


def plot_curves(train: Sequence[dict], evals: Sequence[dict], out_png: Path, title: str = "") -> Path:
    """One panel per logged quantity vs training tokens; eval values as dots on the same axes."""
    keys = [(k, label) for k, label in CURVES if any(k in r for r in train) or any(k in r for r in evals)]
    if not keys:
        raise ValueError(f"no plottable metrics ({', '.join(k for k, _ in CURVES)}) in the rows for {out_png}")
    n_cols = min(3, len(keys))
    n_rows = -(-len(keys) // n_cols)
    fig = Figure(figsize=(4.4 * n_cols, 3.3 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    for ax, (key, label) in zip(axes, keys):
        tr = [r for r in train if key in r]
        if tr:
            ax.plot(_x_tokens(tr), [r[key] for r in tr], lw=1.4, label="train")
        ev = [r for r in evals if key in r]
        if ev:
            ax.plot(_x_tokens(ev), [r[key] for r in ev], "o", ms=5, label="eval")
        if key in ("loss", "mse") and tr and min(r[key] for r in tr) > 0:
            ax.set_yscale("log")
            _plain_log(ax.yaxis)
        ax.set_xlabel("training tokens")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if tr and ev:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, out_png)


def plot_density(hist: dict, out_png: Path, title: str = "") -> Path:
    """Bar chart of the log10-density histogram; dead latents noted separately (they have no log)."""
    edges = np.asarray(hist["edges"], float)
    counts = np.asarray(hist["counts"], float)
    fig = Figure(figsize=(6, 3.6), layout="constrained")
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


def _sae_dirs(run_dir: Path) -> list[Path]:
    if (run_dir / "metrics.jsonl").exists():
        return [run_dir]
    return sorted(p for p in run_dir.iterdir() if (p / "metrics.jsonl").exists())


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write training_curves.png and (when an eval row has a histogram) density_hist.png into each SAE
    directory of `run_dir` (the run itself, or its sub-directories when several SAEs were trained),
    plus frontier.png in run_dir when there are several. Returns the written paths."""
    run_dir = Path(run_dir)
    dirs = _sae_dirs(run_dir) if run_dir.is_dir() else []
    if not dirs:
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir} or its sub-directories; is it a train-sae output?")
    written = []
    for d in dirs:
        train, evals = read_metrics(d)
        name = d.name
        written.append(plot_curves(train, evals, d / "training_curves.png", title=name))
        hist = next((r["log10_density_hist"] for r in reversed(evals) if "log10_density_hist" in r), None)
        if hist:
            written.append(plot_density(hist, d / "density_hist.png", title=f"{name}: latent density"))
    if len(dirs) > 1:
        written.append(plot_frontier(dirs, run_dir / "frontier.png"))
    return written


def _summary_row(d: Path) -> dict:
    """The last eval row of an SAE directory (else its last train row), with its architecture."""
    train, evals = read_metrics(d)
    row = dict((evals or train or [{}])[-1])
    cfile = d / "config.json"
    if cfile.exists():
        row.setdefault("architecture", json.loads(cfile.read_text()).get("architecture", ""))
    row.setdefault("sae", d.name)
    return row


def plot_frontier(runs: Iterable[str | Path | dict], out_png: str | Path, *, x: str = "l0", y: str = "fvu") -> Path:
    """L0 (log scale) vs FVU, one point per SAE, one line per architecture (sorted by L0).

    `runs`: SAE directories (their last eval row is used) or summary dicts with `x`, `y` and
    optionally "architecture" and "sae" (label)."""
    rows = [r if isinstance(r, dict) else _summary_row(Path(r)) for r in runs]
    rows = [r for r in rows if x in r and y in r]
    if not rows:
        raise ValueError(f"no run has both {x!r} and {y!r}; run an evaluation first")
    fig = Figure(figsize=(6, 4.4), layout="constrained")
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
    ax.set_ylabel("FVU = 1 - explained variance (lower is better)" if y == "fvu" else y)
    ax.set_title("sparsity vs reconstruction")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, Path(out_png))
