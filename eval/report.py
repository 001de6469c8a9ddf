"""The evaluate job's report: one summary row per (dictionary, evaluation, description, judge, score), a
Markdown table, a JSON file and PNG charts.

Per row: the mean over features of each feature's score (its mean over judge seeds), a 95% percentile
bootstrap CI over features (eval/judges.py `bootstrap_ci`), the number of features scored and not
scorable (every judge call failed), the failed judge calls (excluded from every rate, never scored as
wrong), the mean spread over seeds, and the cost per feature: wall seconds and judge tokens.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

CHANCE = {"output": "1/n_sets (0.33 with 3 sets)", "intruder": "1/n", "embedding": "0.5 (AUROC)",
          "detection": "0.5 (balanced accuracy)", "fuzzing": "0.5 (balanced accuracy)", "simulation": "0 (Pearson r)",
          "input": "0.5"}


def summary_rows(rows: Iterable[Mapping], kinds: Mapping[str, str], n_boot: int = 1000) -> list[dict]:
    """One summary per (dictionary, evaluation, description, judge, score method) of the result rows."""
    from featureatlas.eval.judges import bootstrap_ci

    per: dict[tuple, dict] = {}
    for r in rows:
        for sc in r["scores"]:
            key = (r["dictionary"], r["evaluation"], r["description"] or "", r["judge"] or "", sc["method"])
            g = per.setdefault(key, {"values": {}, "failed": 0, "seconds": 0.0, "tokens": 0, "features": set()})
            g["features"].add(r["feature"])
            g["values"].setdefault(r["feature"], []).append(sc.get("value"))
            g["failed"] += int(sc.get("failed") or 0)
            g["tokens"] += int(sc.get("tokens_in") or 0) + int(sc.get("tokens_out") or 0)
        # a row's wall time is shared by its scores (cheap gives two): count it once per row
        key0 = (r["dictionary"], r["evaluation"], r["description"] or "", r["judge"] or "", r["scores"][0]["method"]) \
            if r["scores"] else None
        if key0 in per:
            per[key0]["seconds"] += float(r.get("seconds") or 0.0)
    out = []
    for (name, e, label, judge, method), g in sorted(per.items()):
        feats = [np.mean([v for v in vs if v is not None]) if any(v is not None for v in vs) else None
                 for vs in g["values"].values()]
        spreads = [np.std([v for v in vs if v is not None]) for vs in g["values"].values()
                   if sum(v is not None for v in vs) > 1]
        scored = [float(v) for v in feats if v is not None]
        lo, hi = bootstrap_ci(scored, n_boot=n_boot, seed=0)
        n_f = len(g["features"])
        out.append({"dictionary": name, "kind": kinds.get(name, ""), "evaluation": e, "description": label or None,
                    "method": label.split("/")[0] if label else None, "judge": judge or None, "score": method,
                    "mean": float(np.mean(scored)) if scored else None, "ci": [lo, hi] if scored else None,
                    "n_features": n_f, "n_unscored": n_f - len(scored), "failed_calls": g["failed"],
                    "seed_std": float(np.mean(spreads)) if spreads else None,
                    "seconds_per_feature": g["seconds"] / max(n_f, 1),
                    "judge_tokens_per_feature": g["tokens"] / max(n_f, 1),
                    "values": scored})
    return out


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _md_cell(text) -> str:
    """Markdown table cell: pipes and newlines of corpus/model text cannot break the table."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def markdown(summary: list[dict], *, probing: list[dict], calibration: list[dict], skipped: list[dict],
             unreached: list[dict], charts: list[str], title: str = "featureatlas evaluation") -> str:
    lines = [f"# {title}", "", "Each value is the mean over features of the feature's score (mean over judge seeds), "
             "with a 95% bootstrap CI over features. Failed judge calls are counted, excluded from every rate, "
             "never scored as wrong.", ""]
    if calibration:
        lines += ["## Calibration: can the evaluators be trusted?", "",
                  "Planted features with known meaning (eval/synthetic.py), scored with their true descriptions and "
                  "with shuffled ones. AUROC = how well each scorer separates the two (1 = perfect, 0.5 = chance).", "",
                  "| evaluation | score | judge | AUROC | mean (true) | mean (shuffled) | n |",
                  "|---|---|---|---|---|---|---|"]
        for c in calibration:
            lines.append(f"| {c['evaluation']} | {c['score']} | {_md_cell(c['judge'] or '–')} | {_fmt(c['auroc'])} | "
                         f"{_fmt(c['mean_true'])} | {_fmt(c['mean_shuffled'])} | {c['n_true']} |")
        lines.append("")
    lines += ["## Scores", "", "| dictionary | kind | evaluation | description | judge | score | mean | 95% CI | "
              "features | unscored | failed calls | seed std | s / feature | judge tokens / feature |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        ci = "–" if not r["ci"] else f"[{_fmt(r['ci'][0])}, {_fmt(r['ci'][1])}]"
        lines.append(f"| {_md_cell(r['dictionary'])} | {r['kind']} | {r['evaluation']} "
                     f"| {_md_cell(r['description'] or '–')} | {_md_cell(r['judge'] or '–')} | {r['score']} "
                     f"| {_fmt(r['mean'])} | {ci} | {r['n_features']} | "
                     f"{r['n_unscored']} | {r['failed_calls']} | {_fmt(r['seed_std'])} | "
                     f"{_fmt(r['seconds_per_feature'], 2)} | {_fmt(r['judge_tokens_per_feature'], 0)} |")
    lines.append("")
    if probing:
        lines += ["## Sparse probing (held-out accuracy, mean over classes, pooled Wilson 95% CI)", "",
                  "| dictionary | kind | probe | accuracy | 95% CI |", "|---|---|---|---|---|"]
        for p in probing:
            ci = "–" if not p.get("ci") else f"[{_fmt(p['ci'][0])}, {_fmt(p['ci'][1])}]"
            lines.append(f"| {_md_cell(p['dictionary'])} | {p['kind']} | {p['probe']} | {_fmt(p['accuracy'])} | {ci} |")
        lines.append("")
    if unreached:
        lines += ["## Steering targets not reached within the strength range", "",
                  "| dictionary | evaluation | feature | targets |", "|---|---|---|---|"]
        for u in unreached:
            lines.append(f"| {_md_cell(u['dictionary'])} | {u['evaluation']} | {u['feature']} | "
                         f"{', '.join(str(t) for t in u['targets'])} |")
        lines.append("")
    if skipped:
        lines += ["## Descriptions left out (--skip-invalid)", "", "| dictionary | feature | description | problem |",
                  "|---|---|---|---|"]
        for s in skipped:
            lines.append(f"| {_md_cell(s['dictionary'])} | {s['feature']} | {_md_cell(s['label'])} | "
                         f"{_md_cell(s['problem'])} |")
        lines.append("")
    if charts:
        lines += ["## Charts", ""] + [f"![{c}]({c})" for c in charts] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Charts
# ---------------------------------------------------------------------------------------------
def _bar_groups(ax, groups: list[str], series: Mapping[str, Mapping[str, tuple]], ylabel: str) -> None:
    """Grouped bars with CI whiskers: series {name: {group: (mean, lo, hi)}}."""
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for i, (name, vals) in enumerate(series.items()):
        m = [vals.get(g, (np.nan,) * 3)[0] for g in groups]
        lo = [vals.get(g, (np.nan,) * 3)[1] for g in groups]
        hi = [vals.get(g, (np.nan,) * 3)[2] for g in groups]
        err = np.array([[a - b if b is not None and a == a else 0 for a, b in zip(m, lo)],
                        [c - a if c is not None and a == a else 0 for a, c in zip(m, hi)]], dtype=float)
        ax.bar(x + (i - (len(series) - 1) / 2) * width, m, width, yerr=np.abs(err), capsize=2, label=name)
    ax.set_xticks(x, groups, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if series:
        ax.legend(fontsize=7)


def _mean_ci(r: Mapping) -> tuple:
    ci = r["ci"] or [None, None]
    return (r["mean"] if r["mean"] is not None else np.nan, ci[0], ci[1])


def charts(summary: list[dict], out_dir: Path) -> dict[str, Path]:
    """{file name: temp path} of the PNG charts (rendered to temp files for publishing with the report)."""
    from featureatlas.activation_store.plotting import figure, save_png

    files: dict[str, Path] = {}
    # input vs output success per description method, one panel per dictionary
    io_rows = [r for r in summary if r["evaluation"] in ("input", "output") and r["description"]]
    dicts = sorted({r["dictionary"] for r in io_rows})
    if dicts:
        fig = figure(4.2 * len(dicts), 3.4)
        axes = fig.subplots(1, len(dicts), squeeze=False)[0]
        for ax, d in zip(axes, dicts):
            rs = [r for r in io_rows if r["dictionary"] == d]
            groups = sorted({r["description"] for r in rs})
            series: dict[str, dict] = {}
            for r in rs:
                series.setdefault(f"{r['evaluation']} ({r['judge']})", {})[r["description"]] = _mean_ci(r)
            _bar_groups(ax, groups, series, "success / AUROC")
            ax.set_title(d, fontsize=9)
        files["input_vs_output.png"] = save_png(fig, out_dir / ".input_vs_output.png.tmp")
    # steering score per dictionary type
    st = [r for r in summary if r["evaluation"] == "steering"]
    if st:
        fig = figure(5.5, 3.4)
        ax = fig.subplots()
        groups = sorted({f"{r['dictionary']} ({r['kind']})" for r in st})
        series = {}
        for r in st:
            group = f"{r['dictionary']} ({r['kind']})"
            series.setdefault(f"{r['description']} / {r['judge']}", {})[group] = _mean_ci(r)
        _bar_groups(ax, groups, series, "steering score (0-2)")
        files["steering.png"] = save_png(fig, out_dir / ".steering.png.tmp")
    # score distributions per evaluation
    evals = sorted({r["evaluation"] for r in summary if r["values"]})
    if evals:
        fig = figure(3.2 * len(evals), 3.0)
        axes = fig.subplots(1, len(evals), squeeze=False)[0]
        for ax, e in zip(axes, evals):
            for r in [r for r in summary if r["evaluation"] == e and r["values"]][:8]:
                ax.hist(r["values"], bins=20, histtype="step",
                        label=f"{r['dictionary']} {r['description'] or r['score']}")
            ax.set_title(e, fontsize=9)
            ax.set_xlabel("score")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=5)
        files["distributions.png"] = save_png(fig, out_dir / ".distributions.png.tmp")
    return files


def write_report(run, summary: list[dict], *, probing: list[dict], calibration: list[dict], skipped: list[dict],
                 unreached: list[dict], extra: Mapping | None = None) -> Path:
    """Publish report.md, report.json and the charts together into the run directory; returns report.md."""
    pngs = charts(summary, run.dir)
    md = markdown(summary, probing=probing, calibration=calibration, skipped=skipped, unreached=unreached,
                  charts=list(pngs))
    body = {"summary": [{k: v for k, v in r.items() if k != "values"} for r in summary], "probing": probing,
            "calibration": calibration, "skipped": skipped, "unreached": unreached, **(extra or {})}
    files = {"report.md": md, "report.json": json.dumps(body, indent=1, default=float)}
    for name, tmp in pngs.items():
        files[name] = tmp.read_bytes()
        tmp.unlink()
    run.publish(files)
    return run.dir / "report.md"
