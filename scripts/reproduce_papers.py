"""Reproduction study: do the output-centric and SNMF papers' findings hold here?

    python -m featureatlas.scripts.reproduce_papers --out runs/reproduce [--features 40] [--demo runs/demo]

On SmolLM2-135M with the BBC corpus it compares four dictionary types:
  TopK SAE   (resid_post.15, the demo's)          SNMF (mlp_hidden.15, k 100, the demo's)
  DiffMeans  (mlp_hidden.15: for each SNMF feature, mean activation on the tokens where it is in its
              top 1% minus the mean on the rest, the SNMF paper's baseline)
  neurons    (mlp_hidden.15, the raw MLP neurons)
Each is cached, --features live features are described with MaxAct, VocabProj, TokenChange and both
ensembles (template explainer: offline and deterministic), then `featureatlas evaluate` scores them
with the offline embedding judge (and an OpenAI-compatible endpoint when --base-url/--api-model are
given): cheap scores, embedding scorer, input and output evaluations, steering, sparse probing, and
the synthetic calibration. The verdicts (reproduce.md, reproduce.json) compare means with their 95%
bootstrap CIs: "reproduced" when the CIs separate in the paper's direction, "not reproduced" when they
separate the other way, "inconclusive" when they overlap. Every stage resumes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

METHODS = ("maxact", "vocabproj", "tokenchange", "ensemble-raw", "ensemble-concat")
INPUT_CENTRIC, OUTPUT_CENTRIC = ("maxact",), ("vocabproj", "tokenchange")
ENSEMBLES = ("ensemble-raw", "ensemble-concat")
JOB = "reproduce"


def diffmeans_of_snmf(store_path: Path, snmf_dir: Path, out: Path, top_fraction: float = 0.01) -> None:
    """DiffMeans directions, one per SNMF feature: mean of mlp_hidden over the tokens where the feature's code is in
    its top `top_fraction`, minus the mean over the other tokens (streamed over the store)."""
    from featureatlas.activation_store.store import ActivationStore
    from featureatlas.scripts.dictionaries import load_dictionary
    from featureatlas.snmf.dictionary import DiffMeansDictionary
    from featureatlas.activation_store.runs import publish_files
    from featureatlas.snmf.io import diffmeans_files

    if (out / "config.json").exists():
        return
    store = ActivationStore.open(store_path)
    snmf = load_dictionary(snmf_dir)
    hook, T = snmf.hook, store.context_length
    rows = np.concatenate([c * T + np.arange(1, int(store.n_valid[c])) for c in range(store.n_contexts)])
    codes, total_x = [], None
    for i in range(0, len(rows), 8192):
        x = np.asarray(store.read_rows(hook, rows[i:i + 8192]), np.float64)
        codes.append(np.asarray(snmf.encode(x), np.float32))
        total_x = x.sum(0) if total_x is None else total_x + x.sum(0)
    codes_NxF = np.concatenate(codes)
    thresholds_F = np.quantile(codes_NxF, 1 - top_fraction, axis=0)
    sums_x = np.zeros((snmf.n_features, store.dim(hook)))
    counts = np.zeros(snmf.n_features)
    for i in range(0, len(rows), 8192):
        x = np.asarray(store.read_rows(hook, rows[i:i + 8192]), np.float64)
        top = codes_NxF[i:i + len(x)] >= np.maximum(thresholds_F, 1e-12)
        sums_x += top.T.astype(np.float64) @ x
        counts += top.sum(0)
    n = len(rows)
    counts = np.maximum(counts, 1)
    diff = sums_x / counts[:, None] - (total_x[None, :] - sums_x) / np.maximum(n - counts, 1)[:, None]
    norms = np.linalg.norm(diff, axis=1)
    dirs = diff / np.maximum(norms, 1e-12)[:, None]
    dic = DiffMeansDictionary(hook, dirs.astype(np.float32), norms.astype(np.float32),
                              tuple(f"snmf{f}" for f in range(snmf.n_features)),
                              {"source": str(snmf_dir), "top_fraction": top_fraction})
    publish_files(out, diffmeans_files(dic, {"model_id": store.model_id, "store": str(store_path)}))


def verdict(better: dict | None, worse: dict | None) -> str:
    if not better or not worse or better["ci"] is None or worse["ci"] is None:
        return "inconclusive (missing scores)"
    if better["ci"][0] > worse["ci"][1]:
        return "reproduced"
    if worse["ci"][0] > better["ci"][1]:
        return "not reproduced (the opposite holds)"
    return "inconclusive (CIs overlap)" if better["mean"] >= worse["mean"] else \
        "not reproduced (lower mean, CIs overlap)"


def _mean_ci(vals: list) -> dict | None:
    """Mean and bootstrap 95% CI of `vals` (None when empty)."""
    from featureatlas.eval.judges import bootstrap_ci

    if not vals:
        return None
    lo, hi = bootstrap_ci(vals, seed=0)
    return {"mean": float(np.mean(vals)), "ci": [lo, hi], "n": len(vals)}


def pooled(summary: list[dict], evaluation: str, methods) -> dict | None:
    """Mean and bootstrap CI over every (dictionary, feature) value of the given description methods
    (embedding judge)."""
    return _mean_ci([v for r in summary if r["evaluation"] == evaluation and r["method"] in methods
                     and (r["judge"] or "").startswith("embedding") for v in r["values"]])


def steering_of(summary: list[dict], kind: str) -> dict | None:
    return _mean_ci([v for r in summary if r["evaluation"] == "steering" and r["kind"] == kind for v in r["values"]])


def findings(summary: list[dict]) -> list[dict]:
    o_out, o_in = pooled(summary, "output", OUTPUT_CENTRIC), pooled(summary, "output", INPUT_CENTRIC)
    i_in, i_out = pooled(summary, "input", INPUT_CENTRIC), pooled(summary, "input", OUTPUT_CENTRIC)
    e_out, e_in = pooled(summary, "output", ENSEMBLES), pooled(summary, "input", ENSEMBLES)
    best_single_out = max((x for x in (o_out, o_in) if x), key=lambda x: x["mean"], default=None)
    best_single_in = max((x for x in (i_in, i_out) if x), key=lambda x: x["mean"], default=None)
    snmf, sae, dm = steering_of(summary, "snmf"), steering_of(summary, "sae"), steering_of(summary, "diffmeans")
    claims = [  # (the paper's finding, its better side, its worse side)
        ("output-centric descriptions (VocabProj, TokenChange) beat input-centric (MaxAct) on the output evaluation",
         o_out, o_in),
        ("input-centric descriptions (MaxAct) beat output-centric ones on the input evaluation", i_in, i_out),
        ("ensembles beat the best single method on the output evaluation", e_out, best_single_out),
        ("ensembles beat the best single method on the input evaluation", e_in, best_single_in),
        ("SNMF features steer at least as well as SAE features", snmf, sae),
        ("SAE features steer at least as well as DiffMeans directions", sae, dm),
    ]
    return [{"finding": f, "better": b, "worse": w, "verdict": verdict(b, w)} for f, b, w in claims]


def _fmt(x: dict | None) -> str:
    return f"{x['mean']:.3f} [{x['ci'][0]:.3f}, {x['ci'][1]:.3f}] (n {x['n']})" if x else "–"


def write_verdicts(out: Path, rows: list[dict], report: dict, seconds: float) -> None:
    from featureatlas.activation_store.runs import atomic_write, atomic_write_json

    lines = ["# Reproduction study (SmolLM2-135M, BBC News)", "",
             f"Wall time of this run: {seconds / 60:.1f} min. Full tables and charts: eval/report.md.", "",
             "| finding | paper's better side | other side | verdict |", "|---|---|---|---|"]
    lines += [f"| {f['finding']} | {_fmt(f['better'])} | {_fmt(f['worse'])} | **{f['verdict']}** |" for f in rows]
    lines += ["", "Calibration of the evaluators on planted features (AUROC true vs shuffled descriptions):", ""]
    lines += [f"- {c['evaluation']} ({c['judge']}): AUROC {c['auroc']}" for c in report.get("calibration", [])]
    atomic_write(out / "reproduce.md", "\n".join(lines) + "\n")
    atomic_write_json(out / "reproduce.json", {"findings": rows, "seconds": seconds,
                                               "calibration": report.get("calibration", [])})


def main(argv=None) -> int:
    from featureatlas.scripts.cmd_demo import run_stage

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/reproduce")
    p.add_argument("--demo", default="", help="a finished `featureatlas demo` directory to reuse (store, SAE, SNMF)")
    p.add_argument("--features", type=int, default=40, help="live features described and scored per dictionary")
    p.add_argument("--evaluations", nargs="+", default=["cheap", "embedding", "input", "output", "steering", "probing"])
    p.add_argument("--steering-targets", nargs="+", default=["0.05", "0.25"],
                   help="KL targets of the steering evaluation (the paper: 0.025 ... 0.5; fewer keep CPU time down)")
    p.add_argument("--steering-features", default="12", help="features per dictionary in the steering evaluation")
    p.add_argument("--steering-samples", default="4", help="generations per strength (the paper: 8)")
    p.add_argument("--steering-tokens", default="30", help="tokens per generation (the paper: 50)")
    p.add_argument("--base-url", default="")
    p.add_argument("--api-model", default="")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    demo = Path(args.demo) if args.demo else out / "demo"
    if not (demo / "store.h5").exists() or not (demo / "snmf_mlp_hidden.15" / "config.json").exists():
        run_stage("demo", ["demo", "--out", str(demo), "--stages", "harvest,sae,snmf", "--no-progress"], JOB)
    store = demo / "store.h5"
    diffmeans_of_snmf(store, demo / "snmf_mlp_hidden.15", out / "diffmeans_mlp_hidden.15")
    dictionaries = {"sae": demo / "sae_topk_resid_post.15", "snmf": demo / "snmf_mlp_hidden.15",
                    "diffmeans": out / "diffmeans_mlp_hidden.15", "neurons": "neurons:mlp_hidden.15"}
    describe_dirs = []
    for name, spec in dictionaries.items():
        cache, desc = out / f"cache_{name}", out / f"describe_{name}"
        if not (cache / "cache.h5").exists():
            run_stage(f"cache {name}", ["cache", "--store", str(store), "--dictionary", str(spec), "--out", str(cache),
                                        "--resume", "--no-progress"], JOB)
        if not (desc / "records.jsonl").exists():
            run_stage(f"describe {name}", ["describe", "--cache", str(cache), "--dictionary", str(spec), "--name", name,
                                           "--out", str(desc), "--sample", str(args.features), "--methods", *METHODS,
                                           "--explainer", "template", "--resume", "--no-progress"], JOB)
        describe_dirs.append(str(desc))
    judges = ["embedding"] + (["openai"] if args.base_url and args.api_model else [])
    extra = ["--base-url", args.base_url, "--api-model", args.api_model] if "openai" in judges else []
    run_stage("evaluate", ["evaluate", "--describe", *describe_dirs, "--out", str(out / "eval"), "--evaluations",
                           *args.evaluations, "--judges", *judges, *extra, "--steering-targets", *args.steering_targets,
                           "--steering-features", args.steering_features, "--steering-n-samples", args.steering_samples,
                           "--steering-capability-sequences", "4", "--steering-n-new", args.steering_tokens,
                           "--calibrate", "--resume", "--no-progress"], JOB)
    report = json.loads((out / "eval" / "report.json").read_text())
    summary = report["summary"]
    _attach_values(out / "eval", summary)  # the report's JSON leaves out per-feature values
    write_verdicts(out, findings(summary), report, time.perf_counter() - t0)
    print((out / "reproduce.md").read_text())
    return 0


def _attach_values(eval_dir: Path, summary: list[dict]) -> None:
    """Per-feature values of each summary row, from the evaluate run's merged records."""
    per: dict[tuple, list] = {}
    for d in eval_dir.iterdir():
        rec_file = d / "records.jsonl"
        if d.is_dir() and rec_file.exists():
            for line in rec_file.read_text().splitlines():
                rec = json.loads(line)
                for sc in rec.get("scores", []):
                    if sc.get("evaluation") and sc.get("value") is not None:
                        per.setdefault((rec["dictionary"], sc["evaluation"], sc.get("description") or "",
                                        sc.get("judge") or "", sc["method"].split(":")[0]), []).append(sc["value"])
    for r in summary:
        r["values"] = per.get((r["dictionary"], r["evaluation"], r["description"] or "", r["judge"] or "",
                               r["score"]), [])


if __name__ == "__main__":
    sys.exit(main())
