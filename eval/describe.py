"""The describe job: turn a Dictionary and its feature cache into feature records with descriptions.

For the chosen features (explicit ids, or a seeded random sample of the live ones) it gathers the
evidence, then asks an explainer:
  input-centric   MaxAct windows of the EXPLAIN split only (eval/maxact.py, from eval/cache.py);
  output-centric  VocabProj and TokenChange (eval/outputs.py);
  weights         norm, null-space fraction, unigram alignment, nearest features (eval/weights.py);
  descriptions    eval/explainers.py `describe_features` (template, local or OpenAI-compatible).
Every feature of the dictionary gets a record (features.jsonl schema, eval/schema.py): those not chosen
carry their statistics only; dead features are marked dead and never described.

Run directory (the shared run layer): run.json (settings), evidence.jsonl (the records before the
explainer: a killed job does not recompute them), responses/ (the explainer's response cache: a rerun
asks nothing twice), records.jsonl (the records with descriptions), failures.jsonl (failed explainer
calls, never stored as descriptions), dictionary.json (the catalog entry), results.json.
Running again with --resume and another explainer or methods adds their descriptions to the same
records (the evidence settings must stay the same).
"""
from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from featureatlas.activation_store.configs import Config, setting
from featureatlas.activation_store.errors import ConfigError
from featureatlas.activation_store.runs import Run, atomic_write, atomic_write_json, read_json
from featureatlas.eval.adapters import feature_ids
from featureatlas.eval.cache import EXPLAIN, FeatureCache
from featureatlas.eval.catalog import json_line, read_features
from featureatlas.eval.schema import DESCRIPTION_METHODS, EXPLAINERS, SCHEMA_VERSION

EVIDENCE, RECORDS, FAILURES, DICTIONARY = "evidence.jsonl", "records.jsonl", "failures.jsonl", "dictionary.json"


@dataclasses.dataclass
class DescribeConfig(Config):
    """What to describe, with which evidence and explainer."""

    features: str = setting("")
    """Feature ids to describe, e.g. '3,17,40-45' (default: a random sample of live features)."""
    sample: int = setting(32, ge=0)
    """Live features sampled at random when --features is not given (0 = every live feature)."""
    sample_seed: int = setting(0, ge=0)
    """Seed of the random sample."""
    methods: tuple[str, ...] = setting(("maxact", "vocabproj", "tokenchange", "ensemble-concat"))
    """Description methods: maxact, vocabproj, tokenchange, ensemble-raw, ensemble-concat."""
    explainer: str = setting("template", choices=EXPLAINERS)
    """Who writes descriptions: template (no LLM), local (SmolLM2-135M-Instruct), openai (HTTP endpoint)."""
    k: int = setting(1, gt=0)
    """Best-of-k: descriptions sampled per feature and method (kept for later selection by a scorer)."""
    max_tokens: int = setting(48, gt=0)
    """Longest description an LLM explainer may write, in tokens."""
    window: int = setting(32, ge=2)
    """Tokens per MaxAct example window."""
    top_examples: int = setting(20, ge=1)
    """Top-activating examples kept per feature in the record."""
    token_change: bool = setting(True)
    """Compute TokenChange (one batched forward per block of features)."""
    base_url: str = setting("")
    """openai explainer: base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8080/v1."""
    api_model: str = setting("")
    """openai explainer: the model name the endpoint serves."""
    api_key_env: str = setting("OPENAI_API_KEY")
    """openai explainer: environment variable holding the API key (the key itself is never written)."""
    concurrency: int = setting(4, gt=0)
    """openai explainer: requests in flight at once."""

    def validate(self):
        super().validate()
        bad = [m for m in self.methods if m not in DESCRIPTION_METHODS]
        if bad:
            raise ConfigError(f"--methods {bad[0]!r} is not a description method; choose from "
                              f"{', '.join(DESCRIPTION_METHODS)}")
        if self.explainer == "openai" and not (self.base_url and self.api_model):
            raise ConfigError("--explainer openai needs --base-url (e.g. http://127.0.0.1:8080/v1) and --api-model")
        parse_features(self.features)
        return self


def parse_features(text: str) -> list[int] | None:
    """'3,17,40-45' -> [3, 17, 40, ..., 45]; '' -> None."""
    if not text.strip():
        return None
    out = []
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        if m:
            out.extend(range(int(m[1]), int(m[2]) + 1))
        elif re.fullmatch(r"-?\d+", part):
            out.append(int(part))
        else:
            raise ConfigError(f"--features: {part!r} is not a feature id or range; write e.g. '3,17,40-45'")
    return out


def choose_features(cfg: DescribeConfig, cache: FeatureCache) -> np.ndarray:
    """The explicit ids (range-checked), else a seeded sample of live features (all when sample = 0)."""
    ids = parse_features(cfg.features)
    if ids is not None:
        return feature_ids(ids, cache.n_features)
    live = np.flatnonzero(~cache.dead)
    if cfg.sample and cfg.sample < live.size:
        live = np.sort(np.random.default_rng(cfg.sample_seed).choice(live, cfg.sample, replace=False))
    return live.astype(np.int64)


def stats_record(cache: FeatureCache, f: int) -> dict:
    """The record's "stats" field; the histogram trimmed to the bins between its first and last count."""
    counts, edges = cache["hist"][f], cache["hist_edges"]
    nz = np.flatnonzero(counts)
    lo, hi = (nz[0], nz[-1] + 1) if nz.size else (0, 0)
    return {"density": float(cache["density"][f]), "max": float(cache["max"][f]), "mean": float(cache["mean"][f]),
            "mean_active": float(cache["mean_active"][f]), "n_tokens": int(cache["n_tokens"]),
            "hist": {"edges": [float(e) for e in edges[lo:hi + 1]] if nz.size else [],
                     "counts": [int(c) for c in counts[lo:hi]]}}


def base_record(name: str, hook: str, cache: FeatureCache, f: int) -> dict:
    return {"schema": SCHEMA_VERSION, "id": f"{name}/{f}", "dictionary": name, "index": int(f), "hook": hook,
            "dead": bool(cache.dead[f]), "stats": stats_record(cache, f),
            "examples": {"top": [], "quantiles": [], "random": []}, "descriptions": [], "scores": []}


def cooccurrence_record(cache: FeatureCache, f: int, top: int = 10) -> list | None:
    rows = np.flatnonzero(cache["cooc_features"] == f)
    if not rows.size:
        return None
    counts = cache["cooc"][rows[0]].copy()
    counts[f] = 0
    order = np.argsort(-counts, kind="stable")[:top]
    return [[int(g), int(counts[g])] for g in order if counts[g] > 0]


def gather_evidence(store, model, dic, cache: FeatureCache, features: np.ndarray, cfg: DescribeConfig,
                    tc_cfg, name: str, progress: bool = True) -> dict[int, dict]:
    """{feature: record with examples, vocab_proj, token_change, weights, cooccurrence} for the chosen features."""
    from featureatlas.eval.maxact import example_windows
    from featureatlas.eval.outputs import corpus_sequences, dictionary_vocab_proj, token_change
    from featureatlas.eval.weights import unigram_counts, weight_statistics

    tok = model.tokenizer
    decode = lambda t: tok.decode([int(t)])  # noqa: E731
    feats = [int(f) for f in features]
    live = [f for f in feats if not cache.dead[f]]
    wins = example_windows(store, dic, cache, live, decode, split=EXPLAIN, width=cfg.window)
    vp = dictionary_vocab_proj(model, dic, feats) if feats else None
    tc = None
    if cfg.token_change and live:
        seqs = corpus_sequences(store.tokens, store.n_valid, tc_cfg.n_seq, tc_cfg.seq_len, tc_cfg.seed)
        tc = token_change(model, dic, seqs, live, tc_cfg, progress=progress)
    counts = unigram_counts(store.tokens, store.n_valid, model.config.vocab_size)
    ws = weight_statistics(model, dic, feats, counts_V=counts) if feats else None
    out = {}
    tc_row = {f: i for i, f in enumerate(live)}
    for i, f in enumerate(feats):
        rec = base_record(name, dic.hook, cache, f)
        if f in wins:
            w = wins[f]
            rec["examples"] = {"top": w["top"][:cfg.top_examples], "quantiles": w["quantiles"], "random": w["random"]}
        rec["vocab_proj"] = vp.record(i, tok)
        if tc is not None and f in tc_row:
            rec["token_change"] = tc.record(tc_row[f], tok)
        rec["weights"] = {k: v for k, v in ws.record(i, tok).items() if v is not None}
        co = cooccurrence_record(cache, f)
        if co:
            rec["cooccurrence"] = co
        out[f] = rec
    return out


def jsonl_text(records: Iterable[dict]) -> str:
    return "".join(json_line(r) + "\n" for r in records)


def make_explainer_for(cfg: DescribeConfig, run_dir: Path):
    from featureatlas.eval.explainers import ResponseCache, make_explainer

    cache = ResponseCache(run_dir / "responses")
    if cfg.explainer == "openai":
        return make_explainer("openai", base_url=cfg.base_url, model=cfg.api_model, api_key_env=cfg.api_key_env,
                              concurrency=cfg.concurrency, cache=cache), cache
    if cfg.explainer == "template":  # deterministic, no calls: nothing to cache
        return make_explainer("template"), cache
    return make_explainer(cfg.explainer, cache=cache), cache


def describe(store, model, dic, cache: FeatureCache, cfg: DescribeConfig, tc_cfg, out, *, info: dict,
             resume: bool = False, overwrite: bool = False, flags: dict | None = None, progress: bool = True,
             explainer=None) -> dict:
    """The `featureatlas describe` job (module docstring). Returns its results record."""
    from featureatlas.eval.explainers import describe_features

    cfg.validate()
    tc_cfg.validate()
    if cache.hook != dic.hook or cache.n_features != dic.n_features:
        raise ConfigError(f"the cache {cache.path} was made for {cache.n_features} features at {cache.hook}, the "
                          f"dictionary has {dic.n_features} at {dic.hook}; run `featureatlas cache` for this dictionary")
    chosen = choose_features(cfg, cache)
    name = info["name"]
    explain_keys = ("methods", "explainer", "k", "max_tokens", "base_url", "api_model", "api_key_env", "concurrency")
    d = cfg.to_dict()
    settings = {"evidence": {k: v for k, v in d.items() if k not in explain_keys}, "token_change": tc_cfg.to_dict(),
                "explain": {k: d[k] for k in explain_keys}, "dictionary": info,
                "cache": str(Path(cache.path).resolve()), "model_id": model.model_id}
    # the explainer settings may change between runs into one directory: each adds its descriptions
    run = Run.prepare(out, "describe", settings, resume=resume, overwrite=overwrite, flags=flags, ignore=("explain",))
    t0 = time.perf_counter()
    with run.active():
        atomic_write_json(run.dir / DICTIONARY, {**info, "model_id": model.model_id,
                                                 "store": {"path": str(Path(store.path).resolve()),
                                                           "fingerprint": store.fingerprint}})
        evidence_path = run.dir / EVIDENCE
        if evidence_path.exists():
            evidence = {r["index"]: r for r in read_features(evidence_path, validate=False)}
        else:
            evidence = gather_evidence(store, model, dic, cache, chosen, cfg, tc_cfg, name, progress)
            atomic_write(evidence_path, jsonl_text(evidence[f] for f in sorted(evidence)))
        t_evidence = time.perf_counter() - t0
        previous = {r["index"]: r.get("descriptions", []) for r in read_features(run.dir / RECORDS, validate=False)} \
            if (run.dir / RECORDS).exists() else {}
        chosen_recs = [evidence[int(f)] for f in chosen]
        if explainer is None:
            explainer, _ = make_explainer_for(cfg, run.dir)
        described = describe_features(chosen_recs, explainer, cfg.methods, k=cfg.k, max_tokens=cfg.max_tokens,
                                      existing=[previous.get(r["index"], []) for r in chosen_recs])
        for rec, descs in zip(chosen_recs, described.descriptions):
            rec["descriptions"] = descs
        failures = [{"id": rec["id"], **fail} for rec, fails in zip(chosen_recs, described.failures) for fail in fails]

        def all_records():
            for f in range(cache.n_features):
                yield evidence[f] if f in evidence else base_record(name, dic.hook, cache, f)

        atomic_write(run.dir / RECORDS, jsonl_text(all_records()))
        atomic_write(run.dir / FAILURES, jsonl_text(failures))
        results = {"n_features": int(cache.n_features), "n_dead": int(cache.dead.sum()),
                   "described": [int(f) for f in chosen if not cache.dead[f]],
                   "dead_chosen": [int(f) for f in chosen if cache.dead[f]],
                   "n_descriptions": int(sum(len(r["descriptions"]) for r in chosen_recs)),
                   "n_new": int(described.n_new), "n_failed": len(failures),
                   "seconds_evidence": round(t_evidence, 2), "seconds_total": round(time.perf_counter() - t0, 2)}
        run.write_results(results)
    return results


def load_describe_run(path) -> tuple[dict, Iterator[dict]]:
    """(dictionary entry with model_id and store, records iterator) of a finished describe run."""
    path = Path(path)
    if not (path / RECORDS).exists() or not (path / DICTIONARY).exists():
        raise ConfigError(f"{path} is not a finished describe run (no {RECORDS}); run `featureatlas describe "
                          f"--out {path}` first")
    return read_json(path / DICTIONARY), read_features(path / RECORDS, validate=False)
