"""The evaluate job: score every description of the chosen features, and steer with the features.

For each dictionary (a finished describe run: its records with descriptions, its cache, store and
dictionary) it runs the chosen evaluations with the chosen judges and seeds:

  no description, no judge  cheap (Arad et al. 2025 input/output scores), probing (SAEBench-style
                            sparse probing on the store's labels, per dictionary)
  no description, LLM judge intruder
  description + judge       embedding (embedding judge), detection, fuzzing, simulation (LLM judge),
                            input (the output-centric paper's input evaluation), output (its output
                            evaluation), steering (the SNMF paper's steering evaluation); the last three
                            run with an LLM judge or offline with the embedding judge.

Every result is cached by (dictionary, feature, description text, judge, protocol, seed) in
results.jsonl (one JSON line per result, appended as soon as it exists: a SIGKILL loses at most the
block in flight), and steered generations by (dictionary, feature, protocol, seed) in
generations.jsonl, shared by every description and judge. A rerun asks nothing that is cached: no
model call, no judge call. The scores are then merged into the records (features.jsonl schema,
eval/schema.py) of `<out>/<dictionary>/`, a catalog is written to `<out>/catalog/` (sortable and
filterable by score), and the report to `<out>/report.{md,json}` with PNG charts (eval/report.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from featureatlas.activation_store.configs import Config, setting
from featureatlas.activation_store.errors import ConfigError
from featureatlas.activation_store.runs import MetricsLog, Run
from featureatlas.eval.catalog import json_line
from featureatlas.eval.schema import DESCRIPTION_METHODS, catalog_meta

RESULTS_LOG, GENERATIONS_LOG, REPORT = "results.jsonl", "generations.jsonl", "report"


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What an evaluation needs."""

    name: str
    needs_description: bool
    judges: tuple[str, ...]  # judge kinds it accepts; () = no judge
    per_feature: bool = True


EVALUATIONS = {e.name: e for e in (
    Evaluation("cheap", False, ()),
    Evaluation("probing", False, (), per_feature=False),
    Evaluation("intruder", False, ("llm",)),
    Evaluation("embedding", True, ("embedding",)),
    Evaluation("detection", True, ("llm",)),
    Evaluation("fuzzing", True, ("llm",)),
    Evaluation("simulation", True, ("llm",)),
    Evaluation("input", True, ("llm", "embedding")),
    Evaluation("output", True, ("llm", "embedding")),
    Evaluation("steering", True, ("llm", "embedding")),
)}
JUDGES = ("embedding", "local", "openai")
# protocol settings of the output and steering evaluations that only the judging reads, or that change no result
NOT_GENERATION = {"group", "n_sets", "judge_max_tokens", "batch", "concept_hi", "concept_mid", "fluency_q",
                  "fluency_factor"}


@dataclasses.dataclass
class EvaluateConfig(Config):
    """Which evaluations, judges, descriptions and features."""

    evaluations: tuple[str, ...] = setting(("cheap", "embedding", "input", "output"))
    """Evaluations to run: cheap, probing, intruder, embedding, detection, fuzzing, simulation, input, output,
    steering (module docstring)."""
    judges: tuple[str, ...] = setting(("embedding",))
    """Judges: embedding (all-MiniLM-L6-v2, offline), local (SmolLM2-135M-Instruct), openai (HTTP endpoint).
    Each evaluation runs with every listed judge it accepts."""
    methods: tuple[str, ...] = setting(DESCRIPTION_METHODS)
    """Description methods to score (those a feature lacks are skipped)."""
    max_features: int = setting(0, ge=0)
    """Evaluate at most this many described features per dictionary, lowest ids first (0 = all)."""
    steering_features: int = setting(0, ge=0)
    """Run the steering evaluation on at most this many of the evaluated features, lowest ids first (0 = all;
    it is the slowest evaluation: ~14 strengths x 8 generations of 50 tokens per feature)."""
    seeds: int = setting(1, gt=0)
    """Judge seeds: every score is repeated for seeds 0..n-1 (per-feature noise)."""
    block: int = setting(16, gt=0)
    """Features scored per batch (the unit a kill can lose)."""
    skip_invalid: bool = setting(False)
    """Skip (and report) empty or over-long descriptions instead of refusing to start."""
    bootstrap: int = setting(1000, gt=0)
    """Bootstrap resamples for the 95% CIs over features."""
    base_url: str = setting("")
    """OpenAI-compatible endpoint of the openai judge, e.g. http://127.0.0.1:8080/v1."""
    api_model: str = setting("")
    """Model name at that endpoint."""
    api_key_env: str = setting("OPENAI_API_KEY")
    """Environment variable holding the endpoint's API key (never written anywhere)."""
    concurrency: int = setting(4, gt=0)
    """Requests in flight at once to the openai judge."""

    def validate(self) -> "EvaluateConfig":
        super().validate()
        for field, allowed in (("evaluations", tuple(EVALUATIONS)), ("judges", JUDGES),
                               ("methods", DESCRIPTION_METHODS)):
            bad = [v for v in getattr(self, field) if v not in allowed]
            if bad or not getattr(self, field):
                raise ConfigError(f"--{field} {bad[0] if bad else '(empty)'!r} is not valid; choose from "
                                  f"{', '.join(allowed)}")
        if "openai" in self.judges and not (self.base_url and self.api_model):
            raise ConfigError("the openai judge needs --base-url and --api-model")
        usable = [e for e in self.evaluations if not EVALUATIONS[e].judges
                  or any(_judge_kind(j) in EVALUATIONS[e].judges for j in self.judges)]
        unusable = sorted(set(self.evaluations) - set(usable))
        if unusable:
            need = {e: "/".join(EVALUATIONS[e].judges) for e in unusable}
            raise ConfigError(f"no listed judge can run {need} (judges given: {', '.join(self.judges)}); add "
                              "--judges local (an LLM judge) or embedding, or drop those evaluations")
        return self


def _judge_kind(judge: str) -> str:
    return "embedding" if judge == "embedding" else "llm"


# ---------------------------------------------------------------------------------------------
# Keys and the result log
# ---------------------------------------------------------------------------------------------
def result_key(**parts: Any) -> str:
    """sha256 of the canonical JSON of the parts (dictionary, feature, description, judge, protocol, seed)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class ResultLog:
    """An append-only JSONL of {"key": ..., ...} rows (a line torn by a kill is ignored; the last row of a key wins)."""

    def __init__(self, path: Path):
        self.log = MetricsLog(path)
        self.rows = {r["key"]: r for r in self.log.rows() if isinstance(r, dict) and "key" in r}

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def __getitem__(self, key: str) -> dict:
        return self.rows[key]

    def add(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        self.log.append(rows)
        self.rows.update((r["key"], r) for r in rows)


# ---------------------------------------------------------------------------------------------
# Subjects: one dictionary with its described records
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Subject:
    """One dictionary to evaluate."""

    info: dict  # dictionary.json of the describe run (name, kind, hook, hook_out, n_features, path, store)
    records: dict[int, dict]  # feature -> record with descriptions
    dic: Any
    store: Any
    cache: Any
    all_records: list[dict] = dataclasses.field(default_factory=list)  # every record (the catalog lists them all)

    @property
    def name(self) -> str:
        return self.info["name"]

    @property
    def identity(self) -> dict:
        """What makes a result of this dictionary reusable: its weights path, width, hook and store."""
        return {k: self.info.get(k) for k in ("path", "level", "kind", "hook", "hook_out", "n_features")} | \
            {"store": (self.info.get("store") or {}).get("fingerprint")}


def description_label(d: Mapping) -> str:
    """'maxact/local' or 'maxact/local#1' for sample 1 of a best-of-k."""
    label = f"{d['method']}/{d['explainer']}"
    return label + (f"#{d['sample']}" if d.get("sample") else "")


def usable_descriptions(rec: Mapping, methods: Iterable[str]) -> list[dict]:
    """The record's descriptions of the chosen methods (one per label)."""
    out, seen = [], set()
    for d in rec.get("descriptions", []):
        if d["method"] in methods and description_label(d) not in seen:
            seen.add(description_label(d))
            out.append(d)
    return out


def check_descriptions(subjects: list[Subject], cfg: EvaluateConfig) -> list[dict]:
    """Invalid descriptions [{dictionary, feature, label, problem}]; ConfigError unless cfg.skip_invalid.
    A dictionary with no description of the chosen methods is refused when an evaluation needs one."""
    from featureatlas.eval.judges import DescriptionError, check_description

    needs = [e for e in cfg.evaluations if EVALUATIONS[e].needs_description]
    bad = []
    for s in subjects:
        n = 0
        for f, rec in s.records.items():
            for d in usable_descriptions(rec, cfg.methods):
                try:
                    check_description(d["text"])
                    n += 1
                except DescriptionError as err:
                    bad.append({"dictionary": s.name, "feature": f, "label": description_label(d), "problem": str(err)})
        if needs and n == 0:
            raise ConfigError(f"dictionary {s.name!r} has no descriptions of the methods {', '.join(cfg.methods)} "
                              f"that {', '.join(needs)} need; run `featureatlas describe` for it first (or choose "
                              "other --methods)")
    if bad and not cfg.skip_invalid:
        first = bad[0]
        raise ConfigError(f"{len(bad)} description(s) cannot be scored, e.g. {first['dictionary']} feature "
                          f"{first['feature']} ({first['label']}): {first['problem']}. Fix or re-describe them, or "
                          "pass --skip-invalid to leave them out (they are listed in the report)")
    return bad


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Unit:
    """One feature × description to score (description None for description-free evaluations)."""

    feature: int
    description: dict | None
    key: str


def _chunks(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


class Evaluator:
    """Runs the units of the chosen evaluations, skipping every cached result (module docstring)."""

    def __init__(self, subjects: list[Subject], cfg: EvaluateConfig, protocols: Mapping[str, Config], run_dir: Path,
                 load_model: Callable[[], Any], judges: Mapping[str, Any], *, skipped: Iterable[dict] = (),
                 progress: bool = True):
        self.subjects, self.cfg, self.protocols = subjects, cfg, dict(protocols)
        self.results = ResultLog(run_dir / RESULTS_LOG)
        self.generations = ResultLog(run_dir / GENERATIONS_LOG)
        self._load_model, self._model = load_model, None
        self.judges = dict(judges)
        self.skipped = {(s["dictionary"], s["feature"], s["label"]) for s in skipped}
        self.progress = progress
        self.calls = 0  # blocks that ran (0 on a fully cached rerun)

    @property
    def model(self):
        if self._model is None:
            self._model = self._load_model()
        return self._model

    def protocol(self, evaluation: str, *, generation: bool = False) -> dict:
        """The settings a result depends on; for steered generations, only those that change the texts (a new
        judge setting re-judges the cached generations without a model call)."""
        cfg = self.protocols.get(evaluation)
        d = cfg.to_dict() if cfg is not None else {}
        if generation:
            d = {k: v for k, v in d.items() if k not in NOT_GENERATION}
        return {"evaluation": evaluation, "config": d}

    def judge_names(self, evaluation: str) -> list[str | None]:
        kinds = EVALUATIONS[evaluation].judges
        return [j for j in self.cfg.judges if _judge_kind(j) in kinds] if kinds else [None]

    def features(self, s: Subject, evaluation: str) -> list[int]:
        """The features an evaluation scores ([-1] for a per-dictionary evaluation)."""
        if not EVALUATIONS[evaluation].per_feature:
            return [-1]
        feats = sorted(s.records)
        if evaluation == "steering" and self.cfg.steering_features:
            feats = feats[:self.cfg.steering_features]
        return feats

    def units(self, s: Subject, evaluation: str, judge: str | None, seed: int) -> dict[str, list[Unit]]:
        """{description label ('' if none): units not yet in the result log}."""
        ev = EVALUATIONS[evaluation]
        judge_name = self.judges[judge].name if judge else None
        out: dict[str, list[Unit]] = {}
        for f in self.features(s, evaluation):
            descs = usable_descriptions(s.records[f], self.cfg.methods) if ev.needs_description else [None]
            for d in descs:
                label = description_label(d) if d else ""
                if d is not None and (s.name, f, label) in self.skipped:
                    continue
                key = result_key(dictionary=s.identity, feature=f, description=d["text"] if d else None,
                                 judge=judge_name, protocol=self.protocol(evaluation), seed=seed)
                if key not in self.results:
                    out.setdefault(label, []).append(Unit(f, d, key))
        return out

    def run(self) -> None:
        todo = []
        for s in self.subjects:
            for e in self.cfg.evaluations:
                for j in self.judge_names(e):
                    for seed in range(self.cfg.seeds):
                        for label, units in self.units(s, e, j, seed).items():
                            todo.extend((s, e, j, seed, label, block) for block in _chunks(units, self.cfg.block))
        bar = None
        if self.progress and todo:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(len(t[-1]) for t in todo), desc="evaluate", unit="score")
        for s, e, j, seed, label, block in todo:
            t0 = time.perf_counter()
            scores = self.score_block(s, e, j, seed, block)
            seconds = (time.perf_counter() - t0) / len(block)
            self.calls += 1
            judge_name = self.judges[j].name if j else None
            # every unit gets its row, a failed one too (value None), so a rerun does not repeat it
            self.results.add({"key": u.key, "dictionary": s.name, "feature": u.feature, "evaluation": e,
                              "description": description_label(u.description) if u.description else None,
                              "judge": judge_name, "seed": seed, "seconds": round(seconds, 4),
                              "scores": [{**sc, "judge": judge_name} for sc in scores[u.feature]]} for u in block)
            if bar is not None:
                bar.update(len(block))
        if bar is not None:
            bar.close()

    # ---- the evaluations -------------------------------------------------------------------
    def score_block(self, s: Subject, evaluation: str, judge: str | None, seed: int, block: list[Unit]) -> dict:
        """{feature: [Score, ...]} for the block's units (one description label per block)."""
        j = self.judges[judge] if judge else None
        cfg = self.protocols.get(evaluation)
        feats = [u.feature for u in block]
        desc = {u.feature: u.description["text"] for u in block if u.description is not None}
        if evaluation == "cheap":
            from featureatlas.eval.cheap import cheap_scores

            return cheap_scores(self.model, s.store, s.dic, s.cache, feats, cfg)
        if evaluation == "probing":
            from featureatlas.eval.probing import sparse_probing

            r = sparse_probing(s.store, s.dic, cfg)
            return {-1: [{"method": f"probing_k{k}", "value": v["accuracy"], "ci": v["ci"], "n": v["n_test"],
                          "failed": 0, "seed": seed,
                          "metrics": {"records": r.records, "skipped": r.skipped, "label_names": list(r.label_names)}}
                         for k, v in r.summary.items()]}
        if evaluation in ("embedding", "detection", "fuzzing", "simulation", "intruder"):
            from featureatlas.eval.scoring import score

            sets = self.scoring_sets(s)
            out = score(evaluation, {f: sets[f] for f in feats}, desc or None, j, cfg, seed)
        elif evaluation == "input":
            from featureatlas.eval.input_eval import held_out_pool, input_evaluation, offline_input_evaluation

            if j.kind == "llm":
                out = input_evaluation(self.model, s.dic, desc, j, cfg, seed=seed)
            else:
                split = {"held_out_fraction": s.cache.attrs["settings"]["held_out_fraction"],
                         "cache_seed": s.cache.attrs["settings"]["seed"]}
                n = min(cfg.pool, len(held_out_pool(s.store, None, **split)))
                pool = held_out_pool(s.store, n, seed=0, **split)
                out = offline_input_evaluation(s.store, s.dic, self.model.tokenizer, desc, j, pool, cfg, seed=seed)
        elif evaluation == "output":
            from featureatlas.eval.output_eval import output_evaluation

            out = output_evaluation(None, s.dic, None, desc, j, cfg, generations=self.output_generations(s),
                                    seed=seed)
        elif evaluation == "steering":
            from featureatlas.eval.output_eval import steering_evaluation

            out = steering_evaluation(None, s.dic, None, desc, j, cfg, generations=self.steering_generations(s),
                                      seed=seed)
        else:  # pragma: no cover - EVALUATIONS and this dispatch list the same names
            raise ConfigError(f"unknown evaluation {evaluation!r}")
        return {f: [out[f]] for f in feats}

    def scoring_sets(self, s: Subject) -> dict:
        """The held-out scoring windows of every feature of the subject (built once; deterministic)."""
        cached = getattr(s, "_sets", None)
        if cached is None:
            from featureatlas.eval.scoring import scoring_sets

            tok = self.model.tokenizer
            cached = scoring_sets(s.store, s.dic, s.cache, sorted(s.records), lambda t: tok.decode([int(t)]),
                                  self.protocols["scoring"], embedder=self.embedding_judge)
            s._sets = cached
        return cached

    @property
    def embedding_judge(self):
        if "embedding" not in self.judges:
            from featureatlas.eval.embedder import EmbeddingJudge

            self.judges["embedding"] = EmbeddingJudge()
        return self.judges["embedding"]

    def _generations(self, s: Subject, evaluation: str, make: Callable[[list[int]], dict], block: int) -> dict:
        """{feature: generations} of every feature of the subject, from the generation log or `make(missing)`
        called on blocks of `block` features."""
        keys = {f: result_key(dictionary=s.identity, feature=f, protocol=self.protocol(evaluation, generation=True),
                              what="generations")
                for f in self.features(s, evaluation)}
        missing = [f for f, k in keys.items() if k not in self.generations]
        for part in _chunks(missing, block):
            made = make(part)
            self.generations.add({"key": keys[f], "dictionary": s.name, "feature": f, "evaluation": evaluation,
                                  "generations": made[f]} for f in part)
        return {f: self.generations[k]["generations"] for f, k in keys.items()}

    def output_generations(self, s: Subject) -> dict:
        from featureatlas.eval.output_eval import output_generations

        def make(block):
            gens = output_generations(self.model, s.dic, None, block, self.protocols["output"],
                                      clamp_latent=clamp_latent(s))
            return {f: {"texts": {str(t): v for t, v in gens[f].items()}, "calibration":
                        {str(t): r for t, r in gens.calibration.get(f, {}).items()}} for f in block}

        got = self._generations(s, "output", make, self.cfg.block)
        return {f: {float(t): v for t, v in g["texts"].items()} for f, g in got.items()}

    def steering_generations(self, s: Subject) -> dict:
        from featureatlas.eval.output_eval import steering_generations

        def make(block):
            gens = steering_generations(self.model, s.dic, None, block, self.protocols["steering"],
                                        corpus_tokens=self.corpus_tokens(s), clamp_latent=clamp_latent(s))
            return {f: {"features": {str(t): r for t, r in gens["features"][f].items()},
                        "prompt": gens["prompt"], "baseline": gens["baseline"]} for f in block}

        # one call for every missing feature: each call also generates the unsteered baseline texts
        got = self._generations(s, "steering", make, max(len(s.records), 1))
        first = next(iter(got.values()))
        baseline = {"prompt": first["prompt"], "baseline": first["baseline"]}
        return {**baseline, "features": {f: g["features"] for f, g in got.items()}}

    def corpus_tokens(self, s: Subject):
        from featureatlas.eval.outputs import corpus_sequences

        seq_len = min(64, s.store.context_length)
        long_enough = int((np.asarray(s.store.n_valid) >= seq_len).sum())
        n_seq = min(self.protocols["steering"].capability_sequences, long_enough)
        return corpus_sequences(s.store.tokens, s.store.n_valid, n_seq, seq_len, seed=1)


def clamp_latent(s: Subject) -> bool:
    """SAE features steer by clamping their latent and keeping the reconstruction error (Gur-Arieh et al.);
    the other dictionaries add alpha times their direction."""
    return s.info.get("kind") in ("sae", "transcoder")


def protocol_classes() -> dict[str, type]:
    """{protocol name: config class}; the name prefixes its command-line flags (--output-targets ...)."""
    from featureatlas.eval.cheap import CheapConfig
    from featureatlas.eval.input_eval import InputEvalConfig
    from featureatlas.eval.output_eval import OutputEvalConfig, SteeringEvalConfig
    from featureatlas.eval.probing import ProbingConfig
    from featureatlas.eval.scoring import ScoringConfig

    return {"scoring": ScoringConfig, "cheap": CheapConfig, "probing": ProbingConfig, "input": InputEvalConfig,
            "output": OutputEvalConfig, "steering": SteeringEvalConfig}


def protocols_for(protocols: Mapping[str, Config]) -> dict[str, Config]:
    """{evaluation: its protocol config} (the input-side scorers share the scoring protocol)."""
    full = {name: protocols.get(name) or cls() for name, cls in protocol_classes().items()}
    for e in ("embedding", "detection", "fuzzing", "simulation", "intruder"):
        full[e] = full["scoring"]
    return full


# ---------------------------------------------------------------------------------------------
# Inputs, judges, merge, and the job
# ---------------------------------------------------------------------------------------------
def load_subjects(describe_dirs: Iterable[str]) -> list[Subject]:
    """A Subject per finished describe run: its records, cache, store and dictionary (checked, nothing loaded twice)."""
    from featureatlas.activation_store.runs import read_json
    from featureatlas.activation_store.store import ActivationStore
    from featureatlas.eval.cache import FeatureCache
    from featureatlas.eval.describe import load_describe_run
    from featureatlas.scripts.dictionaries import load_for_store

    subjects, names = [], set()
    for d in describe_dirs:
        info, records = load_describe_run(d)
        if info["name"] in names:
            raise ConfigError(f"two describe runs use the dictionary name {info['name']!r}; rerun one with --name")
        names.add(info["name"])
        settings = read_json(Path(d) / "run.json")["settings"]
        cache = FeatureCache(settings["cache"])
        store = ActivationStore.open(info["store"]["path"])
        spec = info["path"] + (f"@{info['level']}" if info.get("level") else "")
        dic = load_for_store(spec, store)
        records = list(records)
        chosen = {int(r["index"]): r for r in records
                  if not r.get("dead") and (r.get("descriptions") or (r.get("examples") or {}).get("top"))}
        subjects.append(Subject(info, chosen, dic, store, cache, records))
    return subjects


def make_judges(cfg: EvaluateConfig, run_dir: Path) -> dict:
    """{judge name in cfg.judges: judge}; the LLM judges answer through a response cache in run_dir/responses."""
    from featureatlas.eval.explainers import ResponseCache, make_explainer
    from featureatlas.eval.judges import LLMJudge

    judges = {}
    for j in cfg.judges:
        if j == "embedding":
            from featureatlas.eval.embedder import EmbeddingJudge

            judges[j] = EmbeddingJudge()
        elif j == "local":
            judges[j] = LLMJudge(make_explainer("local"), cache=ResponseCache(run_dir / "responses"))
        else:
            judges[j] = LLMJudge(make_explainer("openai", base_url=cfg.base_url, model=cfg.api_model,
                                                api_key_env=cfg.api_key_env, concurrency=cfg.concurrency),
                                 cache=ResponseCache(run_dir / "responses"))
    return judges


def current_rows(ev: Evaluator) -> list[dict]:
    """The result rows of the current settings (a result log may also hold rows of other settings)."""
    rows = []
    for s in ev.subjects:
        for e in ev.cfg.evaluations:
            for j in ev.judge_names(e):
                judge_name = ev.judges[j].name if j else None
                ev_def = EVALUATIONS[e]
                for seed in range(ev.cfg.seeds):
                    for f in ev.features(s, e):
                        descs = usable_descriptions(s.records[f], ev.cfg.methods) if ev_def.needs_description \
                            else [None]
                        for d in descs:
                            key = result_key(dictionary=s.identity, feature=f, description=d["text"] if d else None,
                                             judge=judge_name, protocol=ev.protocol(e), seed=seed)
                            if key in ev.results:
                                rows.append(ev.results[key])
    return rows


def feature_scores(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """{(dictionary, feature): [Score]}: each (evaluation, description, judge, score method) averaged over seeds."""
    groups: dict[tuple, list] = {}
    for r in rows:
        for sc in r["scores"]:
            groups.setdefault((r["dictionary"], r["feature"], r["evaluation"], r["description"], r["judge"],
                               sc["method"]), []).append((r, sc))
    out: dict[tuple[str, int], list[dict]] = {}
    for (name, f, e, label, judge, method), items in sorted(groups.items(), key=lambda kv: str(kv[0])):
        values = [sc["value"] for _, sc in items if sc.get("value") is not None]
        score = {"method": method if label is None else f"{method}:{label}", "value":
                 float(np.mean(values)) if values else None, "judge": judge, "evaluation": e, "description": label,
                 "n": int(sum(sc.get("n", 0) or 0 for _, sc in items)),
                 "failed": int(sum(sc.get("failed", 0) or 0 for _, sc in items)), "seeds": len(items)}
        if len(values) > 1:
            score["seed_std"] = float(np.std(values))
        if len(items) == 1 and items[0][1].get("ci") is not None:
            score["ci"] = items[0][1]["ci"]
        out.setdefault((name, f), []).append(score)
    return out


def merged_records(s: Subject, scores: Mapping[tuple[str, int], list[dict]]) -> Iterable[dict]:
    """Every record of the subject, the evaluated ones with their scores (earlier evaluate scores replaced)."""
    for rec in s.all_records:
        f = int(rec["index"])
        if (s.name, f) in scores:
            rec = {**rec, "scores": [sc for sc in rec.get("scores", []) if "evaluation" not in sc]
                   + scores[(s.name, f)]}
        yield rec


def probing_rows(rows: list[dict], kinds: Mapping[str, str]) -> list[dict]:
    """Report rows of sparse probing: per dictionary and k, and the probe on the raw activations (k "all")."""
    out = []
    for r in rows:
        if r["evaluation"] != "probing":
            continue
        for sc in r["scores"]:
            k = sc["method"].split("_k")[-1]
            raw = k == "all"
            kind = "raw activations" if raw else kinds.get(r["dictionary"], "")
            out.append({"dictionary": r["dictionary"], "kind": kind,
                        "probe": "all dimensions" if raw else f"top-{k} features", "accuracy": sc["value"],
                        "ci": sc.get("ci")})
    return out


def unreached_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if r["evaluation"] in ("output", "steering") and r["seed"] == 0:
            for sc in r["scores"]:
                targets = (sc.get("metrics") or {}).get("unreached")
                if targets:
                    out.append({"dictionary": r["dictionary"], "evaluation": r["evaluation"], "feature": r["feature"],
                                "targets": targets})
    # one line per (dictionary, evaluation, feature): the generations are shared by every description
    seen, unique = set(), []
    for u in out:
        k = (u["dictionary"], u["evaluation"], u["feature"])
        if k not in seen:
            seen.add(k)
            unique.append(u)
    return unique


def evaluate(subjects: list[Subject], cfg: EvaluateConfig, protocols: Mapping[str, Config], out, *,
             resume: bool = False, overwrite: bool = False, flags: Mapping[str, str] | None = None,
             progress: bool = True, calibrate: bool = False, load_model: Callable[[], Any] | None = None,
             judges: Mapping[str, Any] | None = None) -> dict:
    """The `featureatlas evaluate` job (module docstring). Returns its results record."""
    import itertools

    from featureatlas.eval.catalog import write_catalog

    cfg.validate()
    protocols = protocols_for(protocols)
    for p in protocols.values():
        p.validate()
    if not subjects:
        raise ConfigError("nothing to evaluate: give at least one describe run (--describe)")
    models = {s.info.get("model_id") for s in subjects}
    if len(models) != 1:
        raise ConfigError(f"the describe runs come from different models {sorted(map(str, models))}; evaluate each "
                          "model in its own run")
    model_id = models.pop()
    if cfg.max_features:
        for s in subjects:
            s.records = {f: s.records[f] for f in sorted(s.records)[:cfg.max_features]}
    skipped = check_descriptions(subjects, cfg)
    settings = {"dictionaries": [{"name": s.name, **s.identity} for s in subjects], "model_id": model_id,
                "evaluate": cfg.to_dict(), "protocols": {k: v.to_dict() for k, v in protocol_classes_items(protocols)}}
    # results are keyed by their settings, so a resumed run may add evaluations, judges or protocol changes
    run = Run.prepare(out, "evaluate", settings, resume=resume, overwrite=overwrite, flags=flags,
                      ignore=("evaluate", "protocols"), progress_markers=(RESULTS_LOG, "results.json"))
    if judges is None:
        judges = make_judges(cfg, run.dir)
        for j in judges.values():  # a missing key or a dead endpoint: said before anything is written
            if getattr(j, "kind", "") == "llm" and j.explainer.backend == "openai":
                j.explainer.check()
    if load_model is None:
        def load_model():
            from featureatlas.activation_store.models import load_model as load

            return load(model_id)
    t0 = time.perf_counter()
    with run.active():
        ev = Evaluator(subjects, cfg, protocols, run.dir, load_model, judges, skipped=skipped, progress=progress)
        n_before = len(ev.results.rows)
        ev.run()
        calibration = []
        if calibrate:
            from featureatlas.eval.synthetic import run_calibration

            calibration = run_calibration(ev, run.dir / "calibration")
        rows = current_rows(ev)
        scores = feature_scores(rows)
        kinds = {s.name: s.info.get("kind", "") for s in subjects}
        for s in subjects:
            records = list(merged_records(s, scores))
            run.publish({"records.jsonl": "".join(json_line(r) + "\n" for r in records),
                         "dictionary.json": json.dumps(s.info, indent=1)}, subdir=s.name)
        catalog = write_catalog(run.dir / "catalog", itertools.chain.from_iterable(
            merged_records(s, scores) for s in subjects), catalog_meta(model_id, [s.info for s in subjects]))
        from featureatlas.eval.report import summary_rows, write_report

        summary = summary_rows([r for r in rows if r["evaluation"] != "probing"], kinds, cfg.bootstrap)
        report = write_report(run, summary, probing=probing_rows(rows, kinds), calibration=calibration,
                              skipped=skipped, unreached=unreached_rows(rows))
        results = {"n_results": len(rows), "n_new": len(ev.results.rows) - n_before, "blocks_run": ev.calls,
                   "model_loaded": ev._model is not None, "report": str(report), "catalog": str(catalog.index_html),
                   "seconds": round(time.perf_counter() - t0, 2), "skipped_descriptions": len(skipped),
                   "summary": [{k: v for k, v in r.items() if k != "values"} for r in summary]}
        run.write_results(results)
    return results


def protocol_classes_items(protocols: Mapping[str, Config]):
    """(name, config) of the named protocols (not their per-evaluation aliases)."""
    return [(k, protocols[k]) for k in protocol_classes()]
