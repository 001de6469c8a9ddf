"""Input-side scoring of descriptions on HELD-OUT windows: detection, fuzzing, simulation, embedding, intruder.

    from featureatlas.eval.scoring import ScoringConfig, scoring_sets, detection, embedding_score
    cfg = ScoringConfig()
    items = scoring_sets(store, dic, cache, features, decode_token, cfg, embedder=EmbeddingJudge())
    scores = detection(items, {f: text}, LLMJudge(explainer), cfg, seed=0)    # {feature: Score}
    scores = embedding_score(items, {f: text}, EmbeddingJudge(), cfg, seed=0)  # fully offline

The scoring set of a feature (`ScoringSet`) holds only windows of held-out contexts (`eval/maxact.py
example_windows(..., split=HELD_OUT)`): the cache splits contexts into explain and held-out sets by context id,
so no scored window comes from a context the explainer saw (delphi draws both from one pool):
- positives: the n_top top windows and per_quantile windows of every activation-quantile bin (highest bin
  first), one window per context;
- random negatives: the cache's held-out windows of contexts where the feature never fires; a dense feature
  (SNMF, neurons) that fires almost everywhere has too few, so they are filled up with pool windows on which
  it is quiet (see below), in a seeded random order;
- hard negatives: from a pool of other windows (by default the other features' held-out windows), those on
  which this feature is quiet (max activation <= quiet x its max over the positives, recomputed by encoding
  the pool's contexts once) and whose text is most similar, by the embedding judge, to any of the feature's
  positive windows (max cosine). Negatives are shown to judges with activation 0.

Scorers: `(items, descriptions {feature: text}, judge, cfg, seed) -> {feature: Score}`, with the Score of
eval_spec.md: {"method", "value", "judge", "n", "failed", "seed", "metrics", "seconds", "tokens_in",
"tokens_out"}. n counts the trials (windows, or intruder questions), failed those whose judge call failed or
whose answer could not be read: they are excluded from every rate, never scored as wrong, and a feature whose
every trial failed gets value None. Descriptions are checked (`judges.check_description`) before any judge call.

- detection (delphi; Bills et al. 2023 style): the judge sees the description and per_prompt unmarked
  windows and labels each 1 (the feature fires in it) or 0. value = balanced accuracy (TPR + TNR) / 2 over
  positives vs all negatives; metrics add precision, recall, F1 and AUROC (from P(1) / (P(0) + P(1)) of
  the label tokens when the judge gives log-probs, else from the labels), and the same against random and
  against hard negatives alone.
- fuzzing: the same with tokens marked <<tok>>: in positives the tokens with activation >= highlight x the
  feature's max (at least the window's peak), in negatives as many random tokens as a positive window has
  marked on average; the judge says whether the marks fit the description.
- simulation (Bills et al. 2023): per window, the judge predicts each token's activation 0..10; the
  prediction is the expected value sum_v v P(v) over the log-probs of "0".."10" where available, else the
  written integer; value = Pearson r between predictions and true activations over all tokens of all
  windows pooled (not a mean of per-window r).
- embedding: AUROC of cosine(description, window text) for positives against negatives (random and hard
  together; each alone in metrics). Needs only the embedding judge: fully offline.
- intruder (explanation-free; delphi): intruder_n - 1 windows of one quantile bin (or the top windows) plus
  one intruder (a random or a hard negative) in random order; the judge names the intruder. value =
  accuracy, chance 1 / intruder_n. With the embedding judge, the window least similar to the others is picked.
"""
from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from typing import Any, Mapping, Sequence

import numpy as np

from featureatlas.activation_store.configs import Config, setting
from featureatlas.activation_store.errors import ConfigError
from featureatlas.eval.judges import (
    DescriptionError, Tally, aligned_distributions, auroc, binary_metrics, check_description, choice_probability,
    expected_value, parse_activations, parse_choice, parse_labels, pearson,
)
from featureatlas.eval.prompts import highlight_window, inline_token, show_token

PROMPT_VERSIONS = {"detection": "detection-v1", "fuzzing": "fuzzing-v1", "simulation": "simulation-v1",
                   "embedding": "embedding-v1", "intruder": "intruder-v1"}
"""Scorer -> version of its prompt and protocol (bumped when either changes; part of a result's cache key)."""
METHODS = tuple(PROMPT_VERSIONS)


@dataclasses.dataclass
class ScoringConfig(Config):
    """What the input-side scorers show the judge, and how many."""

    width: int = setting(32, ge=2)
    """Tokens per scoring window (held-out windows are cut around each context's max token)."""
    n_top: int = setting(10, ge=0)
    """Positives: held-out top-activating windows per feature."""
    per_quantile: int = setting(4, ge=0)
    """Positives: held-out windows from each activation-quantile bin (capped by the cache's per_bin)."""
    n_random: int = setting(20, ge=0)
    """Random negatives: held-out windows of contexts where the feature never fires (capped by the cache's
    n_negative)."""
    n_hard: int = setting(20, ge=0)
    """Hard negatives: most similar (embedding judge) pool windows on which the feature does not fire
    (0 = none; none either without an embedding judge)."""
    quiet: float = setting(0.1, ge=0.0, lt=1.0)
    """Pool windows (hard negatives, and random negatives when the cache has too few contexts where the feature
    never fires: dense features such as SNMF or neurons) count as not firing when the feature's max activation
    on them is at most this fraction of its max over the positives."""
    per_prompt: int = setting(5, ge=1)
    """Detection / fuzzing: windows the judge labels in one prompt."""
    highlight: float = setting(0.3, gt=0.0, le=1.0)
    """Fuzzing: positive windows mark tokens with activation >= this fraction of the feature's max."""
    sim_positive: int = setting(6, ge=1)
    """Simulation: positive windows simulated per feature (evenly spread from the top to the lowest bin)."""
    sim_negative: int = setting(2, ge=0)
    """Simulation: random negative windows simulated per feature."""
    intruder_n: int = setting(5, ge=2, le=9)
    """Intruder: windows per question (n - 1 from one quantile bin + 1 intruder)."""
    intruder_trials: int = setting(5, ge=1)
    """Intruder: questions per feature."""
    intruder_from: str = setting("random", choices=("random", "hard"))
    """Intruder: where the intruder window comes from (hard falls back to random when there is none)."""
    logprobs: bool = setting(True)
    """Ask LLM judges for log-probs of the answer tokens (P(1), expected activations) when the backend has them."""
    temperature: float = setting(0.0, ge=0.0)
    """LLM judge sampling temperature (0 = greedy)."""

    def validate(self) -> "ScoringConfig":
        super().validate()
        if self.n_top + self.per_quantile == 0:
            raise ConfigError("--n-top and --per-quantile are both 0, so no feature has a positive window; "
                              "raise one of them")
        return self


# ---------------------------------------------------------------------------------------------
# Scoring sets (held-out windows only)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ScoringSet:
    """The held-out windows one feature is scored on. A window is an Example dict (context, start, tokens,
    acts, max_pos) plus "bin" for positives (-1 = top, q = quantile bin q) and "similarity" for hard negatives."""

    feature: int
    positives: list
    """Activating windows: top first, then quantile bins from the highest to the lowest."""
    random: list
    """Windows of contexts where the feature never fires."""
    hard: list
    """Windows similar to the positives where the feature does not fire (most similar first)."""
    max_act: float
    """The largest activation over the positives (the scale of 0..10 and of fuzzing's marks)."""

    @property
    def contexts(self) -> set[int]:
        return {int(w["context"]) for w in self.positives + self.random + self.hard}


def _copy(window: Mapping, **extra) -> dict:
    out = {k: window[k] for k in ("context", "start", "tokens", "acts", "max_pos") if k in window}
    out["tokens"], out["acts"] = list(out["tokens"]), [float(a) for a in out["acts"]]
    out.update(extra)
    return out


def window_text(window: Mapping) -> str:
    """The window's plain text (its tokens joined), for the embedding judge."""
    return "".join(str(t) for t in window["tokens"])


def select_positives(windows: Mapping, cfg: ScoringConfig) -> list[dict]:
    """n_top top windows, then per_quantile of each quantile bin from the highest bin down; one window per
    context; only windows where the feature fires."""
    out, seen = [], set()
    picks = [(-1, w) for w in list(windows.get("top") or [])[:cfg.n_top]]
    bins = list(windows.get("quantiles") or [])
    for q in range(len(bins) - 1, -1, -1):
        picks += [(q, w) for w in list(bins[q])[:cfg.per_quantile]]
    for q, w in picks:
        c = int(w["context"])
        if c in seen or not w["tokens"] or max(w["acts"], default=0.0) <= 0:
            continue
        seen.add(c)
        out.append(_copy(w, bin=q))
    return out


def pick_hard_negatives(pos_emb_PxE: np.ndarray, cand_emb_CxE: np.ndarray, allowed_C: np.ndarray,
                        n: int) -> list[tuple[int, float]]:
    """[(candidate index, similarity)] of the n allowed candidates most similar to any positive
    (similarity = max over positives of the cosine; embeddings are L2-normalised), most similar first."""
    if n <= 0 or not len(pos_emb_PxE) or not len(cand_emb_CxE):
        return []
    sims = (np.asarray(cand_emb_CxE, np.float64) @ np.asarray(pos_emb_PxE, np.float64).T).max(axis=1)
    order = [int(i) for i in np.argsort(-sims, kind="stable") if allowed_C[i]]
    return [(i, float(sims[i])) for i in order[:n]]


def build_scoring_sets(windows: Mapping[int, Mapping], cfg: ScoringConfig, *, pool: Sequence[Mapping] = (),
                       pool_max: Mapping[int, np.ndarray] | None = None, embedder=None,
                       explain_contexts: Mapping[int, set] | None = None) -> dict[int, ScoringSet]:
    """{feature: ScoringSet} from held-out windows (`example_windows(..., split=HELD_OUT)` output).

    pool: candidate windows for hard negatives; pool_max[f][i]: feature f's max activation on pool window i
    (a window counts as firing when it is > 0); embedder: the embedding judge that ranks candidates (no hard
    negatives without one). explain_contexts[f]: contexts the explainer saw for f; a window from one is never
    used (they cannot occur when the windows come from the held-out split; this is a guard)."""
    cfg.validate()
    sets: dict[int, ScoringSet] = {}
    for f, w in windows.items():
        banned = set(explain_contexts.get(f, ())) if explain_contexts else set()
        pos = [x for x in select_positives(w, cfg) if x["context"] not in banned]
        seen = {x["context"] for x in pos}
        rnd = []
        for x in list(w.get("random") or [])[:cfg.n_random]:
            c = int(x["context"])
            if c not in banned and c not in seen and x["tokens"]:
                seen.add(c)
                rnd.append(_copy(x, acts=[0.0] * len(x["tokens"])))
        max_act = max((a for x in pos for a in x["acts"]), default=0.0)
        sets[int(f)] = ScoringSet(int(f), pos, rnd, [], float(max_act))
    if not (cfg.n_hard and embedder is not None and len(pool)):
        return sets
    if pool_max is None:
        raise ConfigError("hard negatives need the features' activations on the pool windows (pool_max)")
    texts = list(dict.fromkeys([window_text(x) for x in pool] +
                               [window_text(x) for s in sets.values() for x in s.positives]))
    emb = np.asarray(embedder.embed(texts), np.float64)
    row = {t: i for i, t in enumerate(texts)}
    cand = emb[[row[window_text(x)] for x in pool]]
    pool_ctx = np.asarray([int(x["context"]) for x in pool])
    for f, s in sets.items():
        if not s.positives:
            continue
        fires = np.asarray(pool_max[f]) > cfg.quiet * s.max_act
        banned = set(explain_contexts.get(f, ())) if explain_contexts else set()
        taken = s.contexts | banned
        allowed = ~fires & ~np.isin(pool_ctx, list(taken)) & np.asarray([bool(x["tokens"]) for x in pool])
        if len(s.random) < cfg.n_random:  # dense features: quiet pool windows in a seeded random order
            for i in _rng(0, f, "random-fill").permutation(np.flatnonzero(allowed)):
                if len(s.random) >= cfg.n_random:
                    break
                s.random.append(_copy(pool[i], acts=[0.0] * len(pool[i]["tokens"]), max_pos=0))
                allowed[i] = False
        pos_emb = emb[[row[window_text(x)] for x in s.positives]]
        used = set()
        for i, sim in pick_hard_negatives(pos_emb, cand, allowed, len(pool)):
            if len(s.hard) >= cfg.n_hard:
                break
            c = int(pool[i]["context"])
            if c in used:  # one window per context
                continue
            used.add(c)
            s.hard.append(_copy(pool[i], acts=[0.0] * len(pool[i]["tokens"]), max_pos=0, similarity=round(sim, 6)))
    return sets


def window_max_acts(store, dictionary, windows: Sequence[Mapping], features: Sequence[int], *,
                    contexts_per_batch: int = 16) -> dict[int, np.ndarray]:
    """{feature: [len(windows)]} each feature's max activation over each window's tokens, encoding every
    context the windows come from once (as eval/maxact.py does)."""
    features = [int(f) for f in features]
    out = {f: np.zeros(len(windows), np.float32) for f in features}
    by_ctx: dict[int, list[int]] = defaultdict(list)
    for i, w in enumerate(windows):
        by_ctx[int(w["context"])].append(i)
    T = store.context_length
    contexts = sorted(by_ctx)
    cols = np.asarray(features, np.int64)
    for b in range(0, len(contexts), contexts_per_batch):
        batch = contexts[b:b + contexts_per_batch]
        rows = (np.asarray(batch)[:, None] * T + np.arange(T)[None, :]).ravel()
        codes = np.asarray(dictionary.encode(store.read_rows(dictionary.hook, rows)))[:, cols]
        codes = codes.reshape(len(batch), T, len(cols))
        for j, c in enumerate(batch):
            for i in by_ctx[c]:
                start, stop = int(windows[i]["start"]), int(windows[i]["start"]) + len(windows[i]["tokens"])
                seg = codes[j, start:stop]
                for k, f in enumerate(features):
                    out[f][i] = float(seg[:, k].max()) if seg.size else 0.0
    return out


def scoring_sets(store, dictionary, cache, features, decode_token, cfg: ScoringConfig, *, embedder=None,
                 pool_features=None, exclude_bos: bool = True) -> dict[int, ScoringSet]:
    """{feature: ScoringSet} of the held-out split of `cache` (see the module docstring).

    pool_features: the features whose held-out windows (top, quantile and random) are the hard-negative pool
    (default: the scored features themselves; pass a larger sample of live features for a richer pool).
    embedder: the embedding judge (eval/embedder.py) that finds hard negatives; None: no hard negatives.
    """
    from featureatlas.eval.cache import EXPLAIN, HELD_OUT
    from featureatlas.eval.maxact import example_windows

    cfg.validate()
    feats = [int(f) for f in cache.check_features(features)]
    pool_feats = feats if pool_features is None else [int(f) for f in cache.check_features(pool_features)]
    use_pool = bool(cfg.n_hard and embedder is not None)
    wanted = sorted(set(feats) | (set(pool_feats) if use_pool else set()))
    windows = example_windows(store, dictionary, cache, wanted, decode_token, split=HELD_OUT, width=cfg.width,
                              exclude_bos=exclude_bos)
    explain = {}
    for f in feats:
        ex = cache.examples(f, EXPLAIN)
        explain[f] = ({c for c, _ in ex["top"]} | {c for b in ex["quantiles"] for c, _ in b} | set(ex["negative"]))
    pool, pool_max = [], None
    if use_pool:
        seen = set()
        for g in pool_feats:
            w = windows[g]
            for x in list(w["top"]) + [x for b in w["quantiles"] for x in b] + list(w["random"]):
                key = (int(x["context"]), int(x["start"]))
                if key not in seen and x["tokens"]:
                    seen.add(key)
                    pool.append(x)
        pool_max = window_max_acts(store, dictionary, pool, feats)
    return build_scoring_sets({f: windows[f] for f in feats}, cfg, pool=pool, pool_max=pool_max,
                              embedder=embedder, explain_contexts=explain)


# ---------------------------------------------------------------------------------------------
# Shared pieces of the scorers
# ---------------------------------------------------------------------------------------------
def _rng(seed: int, feature: int, method: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(feature), sum(map(ord, method))])


def _to_score(items: Mapping, descriptions: Mapping | None, *, needs_description: bool = True) -> list:
    """[(feature, checked description or None)] in feature order; every check happens before any judge call."""
    if needs_description:
        if not isinstance(descriptions, Mapping):
            raise ConfigError("descriptions must be a mapping {feature: description text}")
        missing = [f for f in descriptions if f not in items]
        if missing:
            raise ConfigError(f"feature(s) {', '.join(map(str, sorted(missing)[:5]))} have a description but no "
                              "scoring set; build the sets (scoring_sets) for every described feature")
        out = []
        for f in sorted(descriptions):
            try:
                out.append((f, check_description(descriptions[f])))
            except DescriptionError as e:
                raise DescriptionError(f"feature {f}: {e}") from None
        return out
    return [(f, None) for f in sorted(items)]


def _need(judge, kind: str, method: str) -> None:
    if getattr(judge, "kind", None) != kind:
        other = ("the embedding scorer for an offline score" if kind == "llm" else
                 "detection, fuzzing or simulation for an LLM judge")
        raise ConfigError(f"{method} needs an {'LLM' if kind == 'llm' else 'embedding'} judge, got "
                          f"{getattr(judge, 'name', type(judge).__name__)!r} ({getattr(judge, 'kind', '?')}); "
                          f"use {other}")


def make_score(method: str, value, judge, *, n: int, failed: int, seed: int, metrics: Mapping,
               seconds: float = 0.0, tokens_in: int = 0, tokens_out: int = 0) -> dict:
    """A Score dict (eval_spec.md; `eval/schema.py validate_score` accepts it)."""
    return {"method": method, "value": None if value is None else float(value), "judge": judge.name,
            "n": int(n), "failed": int(failed), "seed": int(seed), "metrics": dict(metrics),
            "seconds": round(float(seconds), 4), "tokens_in": int(tokens_in), "tokens_out": int(tokens_out)}


def _round(x):
    return None if x is None else round(float(x), 6)


def _excerpts(texts: Sequence[str]) -> str:
    return "\n".join(f"Excerpt {i}: {t}" for i, t in enumerate(texts, 1))


def shown(tokens: Sequence[str]) -> str:
    """A window for a prompt: its tokens joined, control characters escaped so the layout holds."""
    return "".join(inline_token(t) for t in tokens)


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------
_FEATURE = "A feature of a neural language model gives every token of a text an activation; it fires on some tokens. "

DETECTION_SYSTEM = _FEATURE + (
    "You will see a description of one feature and numbered text excerpts. For each excerpt, decide from the "
    "description whether the feature fires anywhere in it: 1 if it does, 0 if it does not. Answer with one "
    "list of 0s and 1s, one per excerpt in order, and nothing else, e.g. [1, 0, 0, 1, 0].")
FUZZING_SYSTEM = _FEATURE + (
    "You will see a description of one feature and numbered text excerpts in which some tokens are marked "
    "<<like this>>. For each excerpt, decide from the description whether the marked tokens are ones the "
    "feature fires on: 1 if they are, 0 if they are not. Answer with one list of 0s and 1s, one per excerpt "
    "in order, and nothing else, e.g. [1, 0, 0, 1, 0].")
SIMULATION_SYSTEM = _FEATURE + (
    "You will see a description of one feature and a text split into numbered tokens. Predict the feature's "
    "activation on every token as an integer from 0 (does not fire) to 10 (fires as strongly as it ever "
    "does). Most tokens are usually 0. Answer with one line, \"Activations:\" followed by one integer per "
    "token in order, separated by commas, e.g. Activations: 0, 0, 8, 0.")
INTRUDER_SYSTEM = _FEATURE + (
    "You will see numbered text excerpts. In all but one of them the same feature fires; one excerpt is an "
    "intruder in which it does not. Find what the other excerpts have in common and answer with the number "
    "of the intruder only, e.g. 2.")


def classification_prompt(description: str, texts: Sequence[str], *, fuzz: bool) -> list[dict]:
    """Detection (fuzz False) or fuzzing (fuzz True) messages for one description and its excerpts."""
    what = "whose marked tokens the feature fires on" if fuzz else "in which the feature fires"
    user = (f"Description: {description}\n\n{_excerpts(texts)}\n\n"
            f"Label each excerpt 1 ({what}) or 0. Answer with a list of {len(texts)} numbers.")
    return [{"role": "system", "content": FUZZING_SYSTEM if fuzz else DETECTION_SYSTEM},
            {"role": "user", "content": user}]


def simulation_prompt(description: str, tokens: Sequence[str]) -> list[dict]:
    lines = "\n".join(f"{i}. {show_token(t)}" for i, t in enumerate(tokens, 1))
    user = (f"Description: {description}\n\nTokens:\n{lines}\n\n"
            f"Predict the activation (0 to 10) of each of the {len(tokens)} tokens. Answer with "
            f"\"Activations:\" and {len(tokens)} integers.")
    return [{"role": "system", "content": SIMULATION_SYSTEM}, {"role": "user", "content": user}]


def intruder_prompt(texts: Sequence[str]) -> list[dict]:
    user = f"{_excerpts(texts)}\n\nWhich excerpt (1 to {len(texts)}) is the intruder? Answer with its number."
    return [{"role": "system", "content": INTRUDER_SYSTEM}, {"role": "user", "content": user}]


# ---------------------------------------------------------------------------------------------
# Detection and fuzzing
# ---------------------------------------------------------------------------------------------
def fuzz_marks(s: ScoringSet, cfg: ScoringConfig, rng: np.random.Generator) -> list[list[int]]:
    """Marked token positions of each window of s in order positives, random, hard: positives mark tokens
    with activation >= highlight x max_act (at least their peak); negatives as many random tokens as a
    positive marks on average (rounded, >= 1)."""
    out = []
    for w in s.positives:
        acts = np.asarray(w["acts"], np.float64)
        hot = [int(i) for i in np.flatnonzero((acts > 0) & (acts >= cfg.highlight * s.max_act))]
        out.append(hot or [int(np.argmax(acts))])
    k = max(1, int(round(float(np.mean([len(m) for m in out])))) if out else 1)
    for w in s.random + s.hard:
        n = len(w["tokens"])
        out.append(sorted(int(i) for i in rng.choice(n, size=min(k, n), replace=False)))
    return out


def _marked(tokens: Sequence[str], marks: Sequence[int]) -> str:
    fake = [0.0] * len(tokens)
    for i in marks:
        fake[i] = 1.0
    return highlight_window(list(tokens), fake, 1.0, 1.0)


def _classification(method: str, items, descriptions, judge, cfg: ScoringConfig, seed: int) -> dict:
    cfg.validate()
    _need(judge, "llm", method)
    fuzz = method == "fuzzing"
    todo = _to_score(items, descriptions)
    prompts, jobs, trials = [], [], {}
    for f, desc in todo:
        s = items[f]
        rng = _rng(seed, f, method)
        windows = s.positives + s.random + s.hard
        kinds = ["pos"] * len(s.positives) + ["random"] * len(s.random) + ["hard"] * len(s.hard)
        marks = fuzz_marks(s, cfg, rng) if fuzz else None
        texts = [_marked(w["tokens"], marks[i]) if fuzz else shown(w["tokens"]) for i, w in enumerate(windows)]
        trials[f] = kinds
        order = [int(i) for i in rng.permutation(len(windows))]
        for b in range(0, len(order), cfg.per_prompt):
            chunk = order[b:b + cfg.per_prompt]
            prompts.append(classification_prompt(desc, [texts[i] for i in chunk], fuzz=fuzz))
            jobs.append((f, chunk))
    t0 = time.perf_counter()
    answers = judge.ask(prompts, max_tokens=4 * cfg.per_prompt + 8, temperature=cfg.temperature,
                        logprobs=cfg.logprobs, seed=seed)
    wall = time.perf_counter() - t0
    tallies = {f: Tally() for f, _ in todo}
    got: dict[int, dict[int, tuple[int, float | None]]] = {f: {} for f, _ in todo}
    for (f, chunk), ans in zip(jobs, answers):
        labels = tallies[f].read(ans, parse_labels, len(chunk))
        if labels is None:
            continue
        dists = aligned_distributions(ans, ["0", "1"], labels) if cfg.logprobs else None
        probs = [d["1"] if d else None for d in dists] if dists is not None else [None] * len(chunk)
        for i, lab, p in zip(chunk, labels, probs):
            got[f][i] = (lab, p)
    out = {}
    for f, _ in todo:
        kinds, done, tally = trials[f], got[f], tallies[f]
        idx = sorted(done)
        y_true = [int(kinds[i] == "pos") for i in idx]
        y_pred = [done[i][0] for i in idx]
        p1 = [done[i][1] if done[i][1] is not None else float(done[i][0]) for i in idx]
        metrics: dict[str, Any] = {}
        if idx:
            m = binary_metrics(y_true, y_pred, p1)
            metrics = {k: _round(m[k]) if isinstance(m[k], float) else m[k] for k in m}
            for neg in ("random", "hard"):
                sub = [j for j, i in enumerate(idx) if kinds[i] in ("pos", neg)]
                if any(kinds[idx[j]] == neg for j in sub):
                    mm = binary_metrics([y_true[j] for j in sub], [y_pred[j] for j in sub], [p1[j] for j in sub])
                    metrics[neg] = {k: _round(mm[k]) for k in ("balanced_accuracy", "auroc", "precision", "recall",
                                                               "f1")}
            metrics["logprob_fraction"] = _round(sum(done[i][1] is not None for i in idx) / len(idx))
        metrics.update(n_positive=kinds.count("pos"), n_random=kinds.count("random"), n_hard=kinds.count("hard"),
                       **tally.as_dict())
        value = metrics.get("balanced_accuracy")
        out[f] = make_score(method, value, judge, n=len(kinds), failed=len(kinds) - len(idx), seed=seed,
                            metrics=metrics, seconds=tally.seconds or wall / max(len(todo), 1),
                            tokens_in=tally.tokens_in, tokens_out=tally.tokens_out)
    return out


def detection(items: Mapping[int, ScoringSet], descriptions: Mapping[int, str], judge, cfg: ScoringConfig,
              seed: int = 0) -> dict[int, dict]:
    """Detection score per feature (module docstring): value = balanced accuracy, None if nothing scored."""
    return _classification("detection", items, descriptions, judge, cfg, seed)


def fuzzing(items: Mapping[int, ScoringSet], descriptions: Mapping[int, str], judge, cfg: ScoringConfig,
            seed: int = 0) -> dict[int, dict]:
    """Fuzzing score per feature (module docstring): value = balanced accuracy, None if nothing scored."""
    return _classification("fuzzing", items, descriptions, judge, cfg, seed)


# ---------------------------------------------------------------------------------------------
# Simulation
# ---------------------------------------------------------------------------------------------
def simulation_windows(s: ScoringSet, cfg: ScoringConfig) -> list[dict]:
    """sim_positive positives evenly spread over the list (top to lowest bin), then sim_negative random ones."""
    pos = s.positives
    k = min(cfg.sim_positive, len(pos))
    picks = sorted(set(int(round(x)) for x in np.linspace(0, len(pos) - 1, k))) if k else []
    return [pos[i] for i in picks] + list(s.random[:cfg.sim_negative])


_LEVELS = [str(v) for v in range(11)]


def simulated_activations(answer, n: int, use_logprobs: bool = True) -> tuple[list[float], int] | None:
    """(predicted activation per token, how many came from log-probs) from a simulation answer, None when
    malformed. A prediction is the expected value sum_v v P(v) over "0".."10" at the token where the judge
    wrote it, when the answer's last n number tokens are exactly the written integers (each written as one
    token); otherwise (no log-probs, "10" split into two tokens, ...) the written integer."""
    written = parse_activations(getattr(answer, "text", None), n)
    if written is None:
        return None
    dists = aligned_distributions(answer, _LEVELS, written) if use_logprobs else None
    if dists is None:
        return [float(w) for w in written], 0
    evs = [expected_value(d) for d in dists]
    return [ev if ev is not None else float(w) for ev, w in zip(evs, written)], sum(ev is not None for ev in evs)


def simulation(items: Mapping[int, ScoringSet], descriptions: Mapping[int, str], judge, cfg: ScoringConfig,
               seed: int = 0) -> dict[int, dict]:
    """Simulation score per feature (module docstring): value = pooled Pearson r, None if nothing scored."""
    cfg.validate()
    _need(judge, "llm", "simulation")
    todo = _to_score(items, descriptions)
    prompts, jobs, windows = [], [], {}
    for f, desc in todo:
        windows[f] = simulation_windows(items[f], cfg)
        for i, w in enumerate(windows[f]):
            prompts.append(simulation_prompt(desc, w["tokens"]))
            jobs.append((f, i))
    t0 = time.perf_counter()
    max_tokens = 4 * max((len(w["tokens"]) for ws in windows.values() for w in ws), default=1) + 16
    answers = judge.ask(prompts, max_tokens=max_tokens, temperature=cfg.temperature, logprobs=cfg.logprobs,
                        seed=seed)
    wall = time.perf_counter() - t0
    tallies = {f: Tally() for f, _ in todo}
    preds: dict[int, dict[int, list[float]]] = {f: {} for f, _ in todo}
    from_lp = defaultdict(int)
    for (f, i), ans in zip(jobs, answers):
        n = len(windows[f][i]["tokens"])
        tally = tallies[f]
        got = tally.read(ans, lambda _text: simulated_activations(ans, n, cfg.logprobs))
        if got is None:
            continue
        p, k = got
        preds[f][i] = p
        from_lp[f] += k
    out = {}
    for f, _ in todo:
        done = preds[f]
        true = [a for i in sorted(done) for a in windows[f][i]["acts"]]
        pred = [a for i in sorted(done) for a in done[i]]
        r = pearson(pred, true) if done else None
        per_window = [pearson(done[i], windows[f][i]["acts"]) for i in sorted(done)]
        per_window = [x for x in per_window if x is not None]
        metrics = {"pearson": _round(r), "tokens": len(true), "logprob_tokens": from_lp[f],
                   "mean_window_r": _round(np.mean(per_window)) if per_window else None,
                   **tallies[f].as_dict()}
        out[f] = make_score("simulation", r, judge, n=len(windows[f]), failed=len(windows[f]) - len(done),
                            seed=seed, metrics=metrics, seconds=tallies[f].seconds or wall / max(len(todo), 1),
                            tokens_in=tallies[f].tokens_in, tokens_out=tallies[f].tokens_out)
    return out


# ---------------------------------------------------------------------------------------------
# Embedding
# ---------------------------------------------------------------------------------------------
def embedding_score(items: Mapping[int, ScoringSet], descriptions: Mapping[int, str], judge, cfg: ScoringConfig,
                    seed: int = 0) -> dict[int, dict]:
    """Embedding score per feature (module docstring): value = AUROC of cosine(description, window) of
    positives against all negatives; metrics: auroc_random, auroc_hard, mean similarities."""
    cfg.validate()
    _need(judge, "embedding", "embedding")
    todo = _to_score(items, descriptions)
    texts = list(dict.fromkeys([d for _, d in todo] + [window_text(w) for f, _ in todo for w in
                                                        items[f].positives + items[f].random + items[f].hard]))
    t0 = time.perf_counter()
    emb = np.asarray(judge.embed(texts), np.float64) if texts else np.zeros((0, 1))
    wall = time.perf_counter() - t0
    row = {t: i for i, t in enumerate(texts)}
    out = {}
    for f, desc in todo:
        s = items[f]
        d = emb[row[desc]]
        sim = {k: [float(emb[row[window_text(w)]] @ d) for w in ws]
               for k, ws in (("pos", s.positives), ("random", s.random), ("hard", s.hard))}
        value = auroc(sim["pos"], sim["random"] + sim["hard"])
        metrics = {"auroc_random": _round(auroc(sim["pos"], sim["random"])),
                   "auroc_hard": _round(auroc(sim["pos"], sim["hard"])),
                   "n_positive": len(sim["pos"]), "n_random": len(sim["random"]), "n_hard": len(sim["hard"]),
                   **{f"mean_sim_{k}": _round(np.mean(v)) if v else None for k, v in sim.items()}}
        n = sum(len(v) for v in sim.values())
        out[f] = make_score("embedding", value, judge, n=n, failed=0, seed=seed, metrics=metrics,
                            seconds=wall / max(len(todo), 1))
    return out


# ---------------------------------------------------------------------------------------------
# Intruder
# ---------------------------------------------------------------------------------------------
def intruder_trials(s: ScoringSet, cfg: ScoringConfig, seed: int) -> list[tuple[list[dict], int]]:
    """[(windows, index of the intruder)]: per trial intruder_n - 1 windows of one group (a quantile bin or
    the top windows; groups large enough, in turn; all positives as one group when none is) and one
    intruder from the hard (cfg.intruder_from) or random negatives, at a random place."""
    n = cfg.intruder_n
    groups: dict[int, list] = defaultdict(list)
    for w in s.positives:
        groups[int(w.get("bin", -1))].append(w)
    eligible = [groups[b] for b in sorted(groups, reverse=True) if len(groups[b]) >= n - 1]
    if not eligible and len(s.positives) >= n - 1:
        eligible = [s.positives]
    source = s.hard if cfg.intruder_from == "hard" and s.hard else s.random
    if not eligible or not source:
        return []
    rng = _rng(seed, s.feature, "intruder")
    out = []
    for t in range(cfg.intruder_trials):
        group = eligible[t % len(eligible)]
        members = [group[int(i)] for i in rng.choice(len(group), size=n - 1, replace=False)]
        intruder = source[int(rng.integers(len(source)))]
        at = int(rng.integers(n))
        out.append((members[:at] + [intruder] + members[at:], at))
    return out


def intruder(items: Mapping[int, ScoringSet], descriptions: Mapping[int, str] | None, judge, cfg: ScoringConfig,
             seed: int = 0) -> dict[int, dict]:
    """Intruder score per feature (module docstring; descriptions are not used): value = accuracy, chance
    1 / intruder_n. An LLM judge is asked; the embedding judge picks the window least similar on average to
    the others."""
    cfg.validate()
    kind = getattr(judge, "kind", None)
    if kind not in ("llm", "embedding"):
        raise ConfigError(f"intruder needs an LLM or embedding judge, got {type(judge).__name__}")
    todo = _to_score(items, None, needs_description=False)
    trials = {f: intruder_trials(items[f], cfg, seed) for f, _ in todo}
    n = cfg.intruder_n
    picks: dict[int, list] = {f: [] for f, _ in todo}  # (correct, p_correct or None) per answered trial
    tallies = {f: Tally() for f, _ in todo}
    t0 = time.perf_counter()
    if kind == "llm":
        prompts, jobs = [], []
        for f, _ in todo:
            for ws, at in trials[f]:
                prompts.append(intruder_prompt([shown(w["tokens"]) for w in ws]))
                jobs.append((f, at))
        answers = judge.ask(prompts, max_tokens=8, temperature=cfg.temperature, logprobs=cfg.logprobs, seed=seed)
        choices = [str(i) for i in range(1, n + 1)]
        for (f, at), ans in zip(jobs, answers):
            choice = tallies[f].read(ans, parse_choice, n)
            if choice is None:
                continue
            dist = choice_probability(ans, choices) if cfg.logprobs else None
            picks[f].append((choice - 1 == at, dist[str(at + 1)] if dist else None))
    else:
        texts = list(dict.fromkeys(window_text(w) for f, _ in todo for ws, _ in trials[f] for w in ws))
        emb = np.asarray(judge.embed(texts), np.float64) if texts else np.zeros((0, 1))
        row = {t: i for i, t in enumerate(texts)}
        for f, _ in todo:
            for ws, at in trials[f]:
                e = emb[[row[window_text(w)] for w in ws]]
                sim = e @ e.T
                mean_other = (sim.sum(axis=1) - np.diag(sim)) / (len(ws) - 1)
                picks[f].append((int(np.argmin(mean_other)) == at, None))
    wall = time.perf_counter() - t0
    out = {}
    for f, _ in todo:
        done = picks[f]
        acc = sum(c for c, _ in done) / len(done) if done else None
        probs = [p for _, p in done if p is not None]
        metrics = {"accuracy": _round(acc), "chance": _round(1.0 / n), "trials": len(trials[f]),
                   "p_correct": _round(np.mean(probs)) if probs else None}
        if kind == "llm":
            metrics.update(tallies[f].as_dict())
        out[f] = make_score("intruder", acc, judge, n=len(trials[f]), failed=len(trials[f]) - len(done), seed=seed,
                            metrics=metrics, seconds=tallies[f].seconds or wall / max(len(todo), 1),
                            tokens_in=tallies[f].tokens_in, tokens_out=tallies[f].tokens_out)
    return out


SCORERS = {"detection": detection, "fuzzing": fuzzing, "simulation": simulation, "embedding": embedding_score,
           "intruder": intruder}
"""Scorer name -> function (items, descriptions, judge, cfg, seed) -> {feature: Score}."""


def score(method: str, items, descriptions, judge, cfg: ScoringConfig, seed: int = 0) -> dict[int, dict]:
    """Run the scorer `method` (one of METHODS)."""
    if method not in SCORERS:
        raise ConfigError(f"unknown scorer {method!r}; choose from {', '.join(SCORERS)}")
    return SCORERS[method](items, descriptions, judge, cfg, seed)


__all__ = [
    "METHODS", "PROMPT_VERSIONS", "SCORERS", "ScoringConfig", "ScoringSet", "build_scoring_sets", "scoring_sets",
    "select_positives", "pick_hard_negatives", "window_max_acts", "window_text", "shown", "make_score",
    "classification_prompt", "simulation_prompt", "intruder_prompt", "fuzz_marks", "simulation_windows",
    "simulated_activations", "intruder_trials", "detection", "fuzzing", "simulation", "embedding_score",
    "intruder", "score",
]
