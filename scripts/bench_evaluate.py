"""Evaluation speed: one function per section, each returning a dict; main prints one JSON object with every
section asked for and the machine's matmul rate before and after (absolute times on a shared machine drift).

Sections:
  kl_calibration  KL-calibrated steering (eval.steering.kl_calibrate) of --features random unit directions at
                  --hook × 4 targets (±0.25, ±0.5) on the output evaluation's prompts ("The explanation is
                  simple:", "I think", "We"): the batched search (--batch rows per vmapped forward) against one
                  row per forward (batch=1, "one feature at a time") on the first --baseline-features features,
                  scaled per feature. Both run the same search (same rounds, same strengths: checked), so their
                  ratio is what batching buys. Also the naive way on --naive-features features: per feature and
                  target a textbook bisection in log s (hi first, then midpoints until the KL is in the band,
                  at most 20), each step one `lm.forward` with full logits and the KL in numpy; its ratio adds
                  what the search (shared evaluations, KL ∝ s² extrapolation, regula falsi) buys.
                  Compiles are done first and reported apart. On a CPU the forward is FLOP-bound, so batching
                  buys the shared layers before the hook and bigger matmuls, not per-call overhead.

  cost            cost per feature of each evaluation with the offline judges: `featureatlas evaluate` on
                  --cost-features features of each describe run in --describe (a fresh run directory, nothing
                  cached), seconds per feature per evaluation (summed over the description methods, and per
                  method), and the projection to a 16k-feature dictionary. Model loading and compiles are
                  included, as a user would pay them once per run.

    .venv/bin/python scripts/bench_evaluate.py [--sections kl_calibration] [--features 64] [--baseline-features 8]
                                               [--naive-features 4]
    .venv/bin/python scripts/bench_evaluate.py --sections cost --describe runs/demo/describe_sae --cost-features 8
"""
from __future__ import annotations

import argparse

import numpy as np

from featureatlas.activation_store.models import add, load_model
from featureatlas.eval import steering as st
from featureatlas.scripts.benchlib import emit, matmul_gflops, peak_rss_mb, timed


def naive_calibration(lm, hook: str, V, targets, prompts, lo=1.0, hi=1000.0, band=0.1, iters=20):
    """Per (vector, target) pair a plain bisection in log s, one full forward per step; returns (|α|, KL, evals)."""
    toks, mask = st.left_pad(st.prompt_tokens(lm, prompts))
    T = toks.shape[1]
    real = (mask > 0) & (np.maximum(np.cumsum(mask, 1) - 1, 0) >= 1)
    positions = np.arange(1, T)

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp = log_softmax(np.asarray(lm.forward(lm.params, toks, attention_mask_BxT=mask)[0], np.float64))[real]

    def kl(v, a):
        logits, _ = lm.forward(lm.params, toks, attention_mask_BxT=mask, edits=[add(hook, v, a, positions)])
        lq = log_softmax(np.asarray(logits, np.float64))[real]
        return float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1)))

    out = []
    for v, t in zip(V, targets):
        sign, t = float(np.sign(t)), abs(float(t))
        a, b = np.log(lo), np.log(hi)
        s = hi
        k, evals = kl(v, sign * s), 1
        if k < t:  # too weak: hi does not reach the target
            out.append((s, k, evals, False))
            continue
        while not t <= k <= t + band and evals <= iters:
            s = float(np.exp(0.5 * (a + b)))
            k, evals = kl(v, sign * s), evals + 1
            if k < t:
                a = np.log(s)
            elif k > t + band:
                b = np.log(s)
        out.append((s, k, evals, t <= k <= t + band))
    return out


def section_kl_calibration(lm, args) -> dict:
    """Batched vs one-at-a-time KL calibration (module docstring)."""
    hook, prompts = args.hook, list(st.OUTPUT_EVAL_PROMPTS)
    targets = np.asarray(st.OUTPUT_EVAL_TARGETS, np.float64)
    rng = np.random.default_rng(args.seed)
    V = rng.normal(size=(args.features, lm.hook_dim(hook))).astype(np.float32)
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    Vg = np.repeat(V, len(targets), axis=0)
    tg = np.tile(targets, args.features)
    cfg = st.OUTPUT_CALIBRATION.replace(batch=args.batch)
    one_cfg = cfg.replace(batch=1)
    compile_batched = st.compile_calibration(lm, hook, prompts, cfg)
    compile_one = st.compile_calibration(lm, hook, prompts, one_cfg)

    batched, t_batched = timed(lambda: st.kl_calibrate(lm, hook, Vg, tg, prompts, cfg))
    nb = min(args.baseline_features, args.features) * len(targets)
    one, t_one = timed(lambda: st.kl_calibrate(lm, hook, Vg[:nb], tg[:nb], prompts, one_cfg))

    nn = min(args.naive_features, args.features) * len(targets)
    naive_calibration(lm, hook, Vg[:1], tg[:1], prompts, iters=1)  # compile
    naive, t_naive = timed(lambda: naive_calibration(lm, hook, Vg[:nn], tg[:nn], prompts))

    pairs = len(tg)
    per_pair_batched = t_batched / pairs
    per_pair_one = t_one / nb
    per_pair_naive = t_naive / nn
    same = np.abs(one.alpha_G - batched.alpha_G[:nb]) <= 1e-4 * np.abs(one.alpha_G)
    return {
        "hook": hook, "prompts": prompts, "targets": targets.tolist(), "features": args.features,
        "pairs": pairs, "batch": args.batch, "lo": cfg.lo, "hi": cfg.hi, "iters": cfg.iters, "band": cfg.band,
        "positions": cfg.positions,
        "compile_s": {"batched": round(compile_batched, 1), "one_at_a_time": round(compile_one, 1)},
        "batched_s": round(t_batched, 2),
        "s_per_feature_per_target": round(per_pair_batched, 4),
        "batched_forwards": batched.forwards, "batched_rows": batched.rows,
        "evals_per_pair": round(float(batched.iters_G.mean()), 2),
        "reached_fraction": round(float(batched.reached_G.mean()), 3),
        "status_counts": {s: int(np.sum(batched.status_G == s)) for s in st.STATUSES},
        "one_at_a_time_features": nb // len(targets),
        "one_at_a_time_s": round(t_one, 2),
        "one_at_a_time_s_per_feature_per_target": round(per_pair_one, 4),
        "one_at_a_time_extrapolated_s": round(per_pair_one * pairs, 1),
        "one_at_a_time_note": (f"one row per forward, run on the first {nb // len(targets)} of {args.features} "
                               "features and scaled per feature" if nb < pairs else "run on every feature"),
        "speedup": round(per_pair_one / per_pair_batched, 2),
        "same_alpha_fraction": float(same.mean()),
        "naive_features": nn // len(targets),
        "naive_s": round(t_naive, 2),
        "naive_s_per_feature_per_target": round(per_pair_naive, 4),
        "naive_evals_per_pair": round(float(np.mean([e for *_, e, _ in naive])), 2),
        "naive_reached_fraction": round(float(np.mean([r for *_, r in naive])), 3),
        "speedup_vs_naive": round(per_pair_naive / per_pair_batched, 2),
    }


def section_cost(lm, args) -> dict:
    import tempfile

    from featureatlas.eval.evaluate import EvaluateConfig, evaluate, load_subjects

    if not args.describe:
        return {"skipped": "give --describe RUN_DIR (a finished describe run) to measure the cost per feature"}
    evals = tuple(args.cost_evaluations.split(","))
    cfg = EvaluateConfig(evaluations=evals, judges=("embedding",), max_features=args.cost_features)
    with tempfile.TemporaryDirectory() as tmp:
        res, wall = timed(lambda: evaluate(load_subjects(args.describe), cfg, {}, f"{tmp}/eval", progress=False,
                                           load_model=lambda: lm))
    per_eval: dict[str, float] = {}
    per_method: dict[str, dict] = {}
    for r in res["summary"]:
        if r["score"] == "cheap_output":  # one row's time is shared by the two cheap scores
            continue
        per_eval[r["evaluation"]] = per_eval.get(r["evaluation"], 0.0) + r["seconds_per_feature"]
        per_method.setdefault(r["evaluation"], {})[r["description"] or "-"] = round(r["seconds_per_feature"], 3)
    n = sum(min(args.cost_features, len(s.records)) for s in load_subjects(args.describe))
    return {"features": n, "evaluations": list(evals), "wall_s": round(wall, 1),
            "seconds_per_feature": {k: round(v, 3) for k, v in per_eval.items()},
            "seconds_per_feature_per_description": per_method,
            "projected_hours_16k_features": round(sum(per_eval.values()) * 16384 / 3600, 1),
            "note": "steering and probing not included unless listed in --cost-evaluations"}


SECTIONS = {"kl_calibration": section_kl_calibration, "cost": section_cost}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    ap.add_argument("--hook", default="resid_pre.15")
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--baseline-features", type=int, default=8)
    ap.add_argument("--naive-features", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--describe", nargs="*", default=[], help="cost section: finished describe runs")
    ap.add_argument("--cost-features", type=int, default=8, help="cost section: features per describe run")
    ap.add_argument("--cost-evaluations", default="cheap,embedding,input,output",
                    help="cost section: comma-separated evaluations")
    args = ap.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")

    mm_before = matmul_gflops()
    lm, load_s = timed(lambda: load_model(args.model))
    result = {"benchmark": "evaluate", "model": args.model, "model_load_s": round(load_s, 1)}
    for name in sections:
        result[name], secs = timed(lambda: SECTIONS[name](lm, args))
        result[name]["section_s"] = round(secs, 1)
    result["matmul_gflops"] = {"before": round(mm_before, 1), "after": round(matmul_gflops(), 1)}
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    emit(result)


if __name__ == "__main__":
    main()
