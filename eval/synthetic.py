"""A ground truth for the evaluators: planted features whose meaning is known, run through the same pipeline.

Each planted feature f stands for a concept (sport, music, ...) given by a set of single-token words S_f:
  reads   at `resid_pre.0` (the token embeddings, so token identity is exact there):
          a_f(x) = 1 + i/|S_f|  if x is the embedding of the i-th word of S_f (cosine > 0.999), else 0;
  writes  at the last layer's `resid_post` the direction that raises the logits of the concept's words and
          as little else as possible: the ridge least-squares solution of Ũ d ≈ 1_{S_f}, where Ũ = E ⊙ g
          (the tied (un)embedding times the final norm's weight) centred over the vocabulary, i.e.
          d_f ∝ (ŨᵀŨ + λI)⁻¹ Σ_{t∈S_f} Ũ_t. (The plain mean embedding of the words mostly rescales every
          logit through the final norm; at the small KL of the protocols the words never appear.)
Its true description names the concept and its words. The suite builds a small store from the corpus,
caches and gathers evidence exactly like the describe job, then scores two copies of the dictionary:
one with the true descriptions and one with the descriptions shuffled among features (a derangement).
A scorer that can be trusted must separate them: `calibration` gives, per evaluation and judge, the
AUROC of "true description scores higher than shuffled" over features (1 = perfect, 0.5 = chance).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

# concept -> words (each a single SmolLM2 token with its leading space)
CONCEPTS = {
    "sport": ("football", "match", "goal", "goals", "league", "cup", "club", "players", "coach"),
    "music": ("music", "album", "band", "singer", "song", "songs", "concert", "chart", "guitar"),
    "film": ("film", "films", "actor", "actress", "Oscar", "movie", "cinema", "director", "Hollywood"),
    "elections": ("election", "vote", "votes", "voters", "Labour", "campaign", "ballot", "parliament"),
    "the economy": ("economy", "growth", "inflation", "prices", "interest", "bank", "rates", "economic"),
    "computers and the internet": ("computer", "software", "internet", "online", "digital", "web", "users"),
    "mobile phones": ("phone", "phones", "mobile", "calls", "wireless"),
    "courts and crime": ("court", "judge", "trial", "lawyers", "police", "prison"),
    "energy": ("oil", "fuel", "energy", "gas", "petrol"),
    "health and medicine": ("health", "hospital", "doctors", "patients", "medical", "disease"),
    "China and Asia": ("China", "Chinese", "Beijing", "Asia", "Japan"),
    "the weather": ("weather", "rain", "snow", "storm", "wind"),
}
READ_HOOK = "resid_pre.0"
CALIBRATION_SEEDS = 12


def true_description(concept: str, words) -> str:
    return f"{concept}: words such as {', '.join(words)}"


def derangement(n: int, seed: int) -> np.ndarray:
    """A random permutation with no fixed point (n >= 2): feature i gets the description of perm[i] != i."""
    rng = np.random.default_rng(seed)
    while True:
        p = rng.permutation(n)
        if not np.any(p == np.arange(n)):
            return p


@dataclasses.dataclass
class PlantedDictionary:
    """The planted features as a Dictionary (module docstring)."""

    E_SxD: np.ndarray  # embeddings of the planted tokens
    feature_S: np.ndarray  # feature of each planted token
    value_S: np.ndarray  # activation of each planted token
    W_FxD: np.ndarray  # write directions (at hook_out)
    hook_out: str
    hook: str = READ_HOOK

    @property
    def n_features(self) -> int:
        return int(self.W_FxD.shape[0])

    @property
    def directions_FxD(self) -> jax.Array:
        return jnp.asarray(self.W_FxD)

    def encode(self, x_NxD) -> jax.Array:
        x = jnp.asarray(x_NxD, jnp.float32)
        e = jnp.asarray(self.E_SxD)
        cos_NxS = (x @ e.T) / (jnp.linalg.norm(x, axis=-1, keepdims=True) * jnp.linalg.norm(e, axis=-1) + 1e-12)
        hit_NxS = (cos_NxS > 0.999).astype(jnp.float32) * jnp.asarray(self.value_S)
        onehot_SxF = jax.nn.one_hot(jnp.asarray(self.feature_S), self.n_features, dtype=jnp.float32)
        return hit_NxS @ onehot_SxF

    def decode(self, codes_NxF) -> jax.Array:
        return jnp.asarray(codes_NxF, jnp.float32) @ jnp.asarray(self.W_FxD)

    def residual_directions(self, model) -> jax.Array:
        return jnp.asarray(self.W_FxD)


def planted_dictionary(model, concepts=CONCEPTS) -> tuple[PlantedDictionary, list[str]]:
    """(dictionary, true descriptions) for the concepts whose words are single tokens of the model."""
    tok, params = model.tokenizer, model.params
    embed = np.asarray(params["embed"], np.float32)  # tied: the unembedding rows too (SmolLM2)
    U = np.asarray(params["embed"], np.float64) * np.asarray(params["ln_f_w"], np.float64)
    U -= U.mean(axis=0)
    gram = U.T @ U
    gram += 1e-3 * np.trace(gram) / len(gram) * np.eye(len(gram))
    rows, feats, values, W, truths = [], [], [], [], []
    for name, words in concepts.items():
        ids = []
        for w in words:
            t = tok.encode(" " + w)
            if len(t) == 1:
                ids.append(t[0])
        if len(ids) < 3:
            continue
        f = len(W)
        for i, t in enumerate(ids):
            rows.append(embed[t])
            feats.append(f)
            values.append(1.0 + i / len(ids))
        d = np.linalg.solve(gram, U[ids].sum(axis=0))
        W.append(d / np.linalg.norm(d))
        truths.append(true_description(name, [tok.decode([t]).strip() for t in ids]))
    hook_out = f"resid_post.{model.config.n_layers - 1}"
    return PlantedDictionary(np.stack(rows), np.asarray(feats, np.int32), np.asarray(values, np.float32),
                             np.stack(W).astype(np.float32), hook_out), truths


def synthetic_store(model, path: Path, *, n_contexts: int = 400, context_length: int = 64, batch: int = 32):
    """A store of `resid_pre.0` over the first n_contexts contexts of the built-in corpus."""
    from featureatlas.activation_store.corpus import CorpusConfig, build_corpus
    from featureatlas.activation_store.store import ActivationStore, write_store

    if Path(path).exists():
        return ActivationStore.open(path)
    corpus = build_corpus(CorpusConfig(context_length=context_length, max_contexts=n_contexts), model.tokenizer)
    toks = np.asarray(corpus.tokens_NxT, np.int32)
    acts = []
    for b in range(0, len(toks), batch):
        _, cap = model.forward(model.params, toks[b:b + batch], capture=(READ_HOOK,), stop_at="capture")
        acts.append(np.asarray(cap[READ_HOOK], np.float32).reshape(-1, model.config.d_model))
    return write_store(path, acts={READ_HOOK: np.concatenate(acts)}, tokens=toks, n_valid=corpus.n_valid_N,
                       doc_ids=corpus.doc_id_N, labels=corpus.label_N, label_names=corpus.label_names,
                       attrs={"model_id": model.model_id}, bos_id=model.config.bos_id)


def calibration(true_values: dict, shuffled_values: dict) -> dict:
    """AUROC that a feature's score with its true description exceeds the scores with shuffled ones
    (ties count half); {"auroc", "n_true", "n_shuffled", "mean_true", "mean_shuffled"}."""
    a = np.asarray([v for v in true_values.values() if v is not None], np.float64)
    b = np.asarray([v for v in shuffled_values.values() if v is not None], np.float64)
    if not len(a) or not len(b):
        return {"auroc": None, "n_true": len(a), "n_shuffled": len(b), "mean_true": None, "mean_shuffled": None}
    greater = (a[:, None] > b[None, :]).mean() + 0.5 * (a[:, None] == b[None, :]).mean()
    return {"auroc": float(greater), "n_true": len(a), "n_shuffled": len(b), "mean_true": float(a.mean()),
            "mean_shuffled": float(b.mean())}


def ground_truth_subjects(model, work_dir: Path, *, n_contexts: int = 1200, seed: int = 0):
    """(true, shuffled) evaluate Subjects over the planted dictionary, with a store and cache in work_dir."""
    from featureatlas.eval.cache import CacheConfig, FeatureCache, build_cache
    from featureatlas.eval.describe import DescribeConfig, gather_evidence
    from featureatlas.eval.evaluate import Subject
    from featureatlas.eval.outputs import TokenChangeConfig

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    dic, truths = planted_dictionary(model)
    store = synthetic_store(model, work_dir / "store.h5", n_contexts=n_contexts)
    cache_dir = work_dir / "cache"
    cache_cfg = CacheConfig(top_n=10, n_quantiles=3, per_bin=4, n_negative=20, hist_stride=1)
    if not (cache_dir / "cache.h5").exists():
        build_cache(store, dic, cache_cfg, cache_dir, dictionary_id="planted", progress=False, overwrite=True)
    cache = FeatureCache(cache_dir)
    feats = np.flatnonzero(~cache.dead)
    records = gather_evidence(store, model, dic, cache, feats, DescribeConfig(token_change=False), TokenChangeConfig(),
                              "planted", progress=False)
    perm = derangement(len(truths), seed)
    info = {"path": "synthetic:planted", "kind": "planted", "hook": dic.hook, "hook_out": dic.hook_out,
            "n_features": dic.n_features, "model_id": model.model_id, "store": {"fingerprint": store.fingerprint}}

    def subject(name: str, texts: list[str]):
        recs = {int(f): {**records[int(f)], "descriptions": [{"text": texts[int(f)], "method": "maxact",
                                                                "explainer": "template"}]} for f in feats}
        return Subject({**info, "name": name}, recs, dic, store, cache, list(recs.values()))

    return subject("planted-true", truths), subject("planted-shuffled", [truths[p] for p in perm])


def run_calibration(ev, work_dir: Path) -> list[dict]:
    """Score the planted features with true and shuffled descriptions through `ev`'s evaluations, judges and
    protocols (results cached in work_dir like any evaluate run); one calibration row per (evaluation, score,
    judge): the AUROC of true over shuffled."""
    from featureatlas.eval.evaluate import EVALUATIONS, Evaluator, current_rows

    true, shuffled = ground_truth_subjects(ev.model, work_dir)
    evals = tuple(e for e in ev.cfg.evaluations if EVALUATIONS[e].needs_description)
    if not evals:
        return []
    # judge noise (e.g. the output evaluation's random distractor sets): at least CALIBRATION_SEEDS seeds per feature
    cfg = dataclasses.replace(ev.cfg, evaluations=evals, methods=("maxact",), max_features=0,
                              seeds=max(ev.cfg.seeds, CALIBRATION_SEEDS))
    cal = Evaluator([true, shuffled], cfg, ev.protocols, Path(work_dir), lambda: ev.model, ev.judges,
                    progress=ev.progress)
    cal.run()
    values: dict[tuple, dict] = {}
    for r in current_rows(cal):
        for sc in r["scores"]:
            side = values.setdefault((r["evaluation"], sc["method"], r["judge"]), {"true": {}, "shuffled": {}})
            bucket = side["true" if r["dictionary"] == true.name else "shuffled"]
            bucket.setdefault(r["feature"], []).append(sc.get("value"))

    def mean(d):  # per feature, over seeds
        return {f: (float(np.mean([x for x in v if x is not None])) if any(x is not None for x in v) else None)
                for f, v in d.items()}

    out = []
    for (e, method, judge), side in sorted(values.items(), key=lambda kv: str(kv[0])):
        out.append({"evaluation": e, "score": method, "judge": judge, **calibration(mean(side["true"]),
                                                                                    mean(side["shuffled"]))})
    return out
