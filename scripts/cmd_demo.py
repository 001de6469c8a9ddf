"""`featureatlas demo`: the main job end to end on the built-in model and corpus.

Stages (each resumes if its output already exists, so re-running continues):
  1. harvest `resid_post.15` and `mlp_hidden.15` of SmolLM2-135M over BBC News into an HDF5 store;
  2. train a TopK SAE (k 32, width 4608) on `resid_post.15` and report its metrics: the headline FVU
     leaves out the few massive-norm tokens (`fvu_excl_massive`; the all-token FVU is printed beside it,
     see the README's "Which FVU the demo prints");
  3. fit SNMF (k 100) on `mlp_hidden.15` and report its reconstruction error and VocabProj tokens;
  4. cache both dictionaries' feature activations over the store (top / quantile / negative examples,
     density, histograms; explain and held-out contexts kept apart);
  5. describe a random sample of live features of each (MaxAct, VocabProj, TokenChange and their
     ensemble) with the template explainer and with SmolLM2-135M-Instruct as a local explainer;
  6. evaluate the descriptions offline (eval/evaluate.py, embedding judge): cheap no-LLM scores, the
     embedding scorer on held-out examples, the input and output evaluations of the output-centric paper,
     with a report (Markdown, JSON, PNG charts);
  7. write the catalog with the scores (features.jsonl, index.html for file://, Neuronpedia export) and
     print a table of example features and the path of index.html.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the pipeline end to end on SmolLM2-135M and BBC News",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="directory for every artifact (default runs/demo)")
    p.add_argument("--model", default="smollm2-135m", help="model name or path (default smollm2-135m)")
    p.add_argument("--layer", type=int, default=15, help="layer whose hooks are harvested (default 15)")
    p.add_argument("--max-tokens", type=int, default=100_000,
                   help="tokens to harvest (default 100,000: about 2-3 minutes on a 2-core CPU)")
    p.add_argument("--sae-tokens", type=int, default=600_000,
                   help="training tokens for the SAE (default 600,000: about six passes over the store)")
    p.add_argument("--snmf-tokens", type=int, default=20_000, help="tokens SNMF is fitted on (default 20,000)")
    p.add_argument("--describe-sample", type=int, default=5,
                   help="live features of each dictionary described (default 5)")
    p.add_argument("--local-explainer", action=argparse.BooleanOptionalAction, default=True,
                   help="also describe with SmolLM2-135M-Instruct (default on)")
    p.add_argument("--stages", default="harvest,sae,snmf,cache,describe,evaluate,catalog",
                   help="comma list of stages to run (default harvest,sae,snmf,cache,describe,evaluate,catalog)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run_stage(name: str, argv: list[str], job: str = "demo") -> None:
    """Run `featureatlas <argv>` as stage `name` of `job`, timed; a failing stage stops the job."""
    from featureatlas.scripts.cli import main

    print(f"\n=== {job}: {name} ===\n$ featureatlas {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    if code := main(argv):
        raise SystemExit(f"{job} stage '{name}' failed with exit code {code}")
    print(f"=== {name} done in {time.perf_counter() - t0:.1f}s ===", flush=True)


def _report_fvu(sae_dir: Path) -> None:
    """Print the SAE's FVU without massive-norm tokens as the headline, the all-token FVU beside it, and why."""
    from featureatlas.activation_store.runs import MetricsLog

    rows = MetricsLog(sae_dir / "metrics.jsonl").rows()
    ev = next((r for r in reversed(rows) if r.get("kind") == "eval" and "fvu_excl_massive" in r), None)
    if ev is None:
        return
    print(f"\nSAE reconstruction on {ev.get('n_tokens')} validation tokens:\n"
          f"  FVU, massive-norm tokens excluded  {ev['fvu_excl_massive']:.4f}   <- the demo's headline FVU\n"
          f"  FVU, all tokens                    {ev['fvu']:.4f}\n"
          f"  mean per-token relative error      {ev.get('rel_err_per_token', float('nan')):.4f}"
          f"   (mean of ||x - x_hat||^2 / ||x||^2)\n"
          f"Why: {ev.get('n_massive')} of these tokens are 'massive activations' ({ev.get('massive_rule')}); "
          "they hold most of the variance, so the all-token FVU mostly measures how well those few are fitted "
          "and can rank SAEs against their CE scores. The headline leaves them out.", flush=True)


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "store.h5"
    resid, mlp = f"resid_post.{args.layer}", f"mlp_hidden.{args.layer}"
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    quiet = ["--no-progress"] if args.no_progress else []
    sae_dir, snmf_dir = out / f"sae_topk_{resid}", out / f"snmf_{mlp}"
    if "harvest" in stages:
        run_stage("harvest", ["harvest", "--model", args.model, "--corpus", "bbc", "--hooks", resid, mlp,
                              "--dtype", "float16", "--max-tokens", str(args.max_tokens), "--out", str(store), *quiet])
        run_stage("store info", ["store", "info", str(store)])
    if "sae" in stages:
        run_stage("train SAE", ["train-sae", "--store", str(store), "--hook", resid, "--arch", "topk",
                                "--k", "32", "--width", "4608", "--tokens", str(args.sae_tokens),
                                "--out", str(sae_dir), *(["--resume"] if sae_dir.exists() else []), *quiet])
        _report_fvu(sae_dir)
    if "snmf" in stages:
        run_stage("fit SNMF", ["train-snmf", "--store", str(store), "--hook", mlp, "--k", "100",
                               "--max-tokens", str(args.snmf_tokens), "--out", str(snmf_dir),
                               *(["--resume"] if snmf_dir.exists() else []), *quiet])
    dics = {"sae-topk": (sae_dir, out / "cache_sae", out / "describe_sae"),
            "snmf": (snmf_dir, out / "cache_snmf", out / "describe_snmf")}
    if "cache" in stages:
        for name, (dic_dir, cache_dir, _) in dics.items():
            run_stage(f"cache {name}", ["cache", "--store", str(store), "--dictionary", str(dic_dir),
                                        "--out", str(cache_dir), *(["--resume"] if cache_dir.exists() else []), *quiet])
    if "describe" in stages:
        _describe(args, store, dics)
    evaluated = out / "evaluate"
    if "evaluate" in stages:
        run_stage("evaluate", ["evaluate", "--describe", *(str(d) for _, _, d in dics.values()),
                               "--out", str(evaluated), "--evaluations", "cheap", "embedding", "input", "output",
                               "--judges", "embedding", "--resume", *quiet])
        print(f"report: {evaluated / 'report.md'}")
    if "catalog" in stages:
        catalog = out / "catalog"
        # with scores when the evaluate stage ran (its per-dictionary records are describe-run shaped)
        sources = [evaluated / name if (evaluated / name / "records.jsonl").exists() else d
                   for name, (_, _, d) in dics.items()]
        run_stage("catalog", ["catalog", "--describe", *(str(d) for d in sources), "--out", str(catalog)])
        _table(dics)
        print(f"\nopen the catalog: file://{(catalog / 'index.html').resolve()}")
    print(f"\ndemo finished: artifacts in {out}/")
    return 0


def _describe(args, store_path: Path, dics: dict) -> None:
    """Describe a sample of each dictionary's features: template, then the local explainer (one model load)."""
    from featureatlas.activation_store.models import load_model
    from featureatlas.activation_store.store import ActivationStore
    from featureatlas.eval.cache import FeatureCache
    from featureatlas.eval.describe import DescribeConfig, describe
    from featureatlas.eval.outputs import TokenChangeConfig
    from featureatlas.scripts.dictionaries import dictionary_info, load_dictionary

    print("\n=== demo: describe ===", flush=True)
    t0 = time.perf_counter()
    store = ActivationStore.open(store_path)
    model = load_model(args.model)
    explainers = ["template"] + (["local"] if args.local_explainer else [])
    methods = ("maxact", "vocabproj", "tokenchange", "ensemble-concat")
    for name, (dic_dir, cache_dir, out) in dics.items():
        dic = load_dictionary(dic_dir)
        cache = FeatureCache(cache_dir)
        info = dictionary_info(dic_dir, dic, name)
        for explainer in explainers:
            cfg = DescribeConfig(sample=args.describe_sample, methods=methods, explainer=explainer)
            res = describe(store, model, dic, cache, cfg, TokenChangeConfig(), out, info=info,
                           resume=out.exists(), progress=not args.no_progress)
            print(f"{name} / {explainer}: {len(res['described'])} features, {res['n_new']} new descriptions, "
                  f"{res['n_failed']} failed calls ({res['seconds_total']:.0f}s)", flush=True)
    print(f"=== describe done in {time.perf_counter() - t0:.1f}s ===", flush=True)


def _table(dics: dict) -> None:
    """A short table of the described features: id, density, top tokens of its best example, descriptions."""
    from featureatlas.eval.describe import load_describe_run

    print("\nexample features (descriptions by explainer / method):")
    for name, (_, _, out) in dics.items():
        if not out.exists():
            continue
        _, records = load_describe_run(out)
        for rec in records:
            if not rec["descriptions"]:
                continue
            top = rec["examples"]["top"][0] if rec["examples"]["top"] else None
            peak = repr(top["tokens"][top["max_pos"]]) if top else "-"
            vp = ", ".join(repr(t) for t, _ in (rec.get("vocab_proj") or {}).get("top", [])[:5])
            print(f"\n{rec['id']}  density {rec['stats']['density']:.4f}  max {rec['stats']['max']:.2f}  "
                  f"peak token {peak}\n  VocabProj top: {vp}")
            for d in rec["descriptions"]:
                if d["method"] in ("maxact", "vocabproj", "ensemble-concat"):
                    print(f"  {d['explainer']:>8} / {d['method']:<15} {d['text'][:110]}")
