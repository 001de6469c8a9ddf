"""Cheap, no-LLM input and output scores of every feature (Arad, Mueller & Belinkov 2025, "SAEs Are Good
for Steering -- If You Select the Right Features"; definitions as in the paper's released code).

Input score (does the feature fire on the tokens it writes?):
    input(f) = (1/n) · #{top examples e of f : peak_token(e) ∈ VocabProj_K(f)}
  - top examples: the n = min(n_top, available) most activating contexts of f in the feature cache. The
    cache keeps the exact top `top_n` (CacheConfig, default 20) contexts per split; by default both splits
    are used (`splits=(EXPLAIN, HELD_OUT)`: no description is involved, so there is nothing to hold out),
    merged and sorted by activation: that is the exact global top-n for n ≤ top_n, and at most 2·top_n
    examples in all (the paper uses 100: build the cache with --top-n 50 or more to get there).
  - peak token: the input token at the context's max-activation position, i.e. the token where the feature
    fires hardest (first maximum over the real tokens, BOS excluded: the rule of eval/maxact.py, whose
    window `max_pos` points at the same token). Compared as token ids, not strings.
  - VocabProj_K(f): the top K = 20 tokens of final_norm(d_f) @ W_U (eval/outputs.py `vocab_proj`).
  Features with fewer than `min_examples` (10, as the paper's code) top examples get no score (None).

Output score (does amplifying the feature make the model say its VocabProj tokens?):
    output(f) = (1 − min_{t ∈ VocabProj_K(f)} rank(t) / |V|) · max_{t ∈ VocabProj_K(f)} p(t)
  where p is the next-token distribution at the last position of BOS + "From my experience," with the
  feature amplified, and rank(t) = #{tokens with a strictly larger logit} (0 = the most likely token).
  Amplification (the paper's code, `AmlifySAEHook`): the latent's activation at the last position is raised
  by factor · m, m = max_g a_g(x_last) the largest activation of ANY latent of the dictionary at the last
  prompt position (one number per dictionary), factor = 10, keeping the SAE error term. Raising latent f by
  α changes the reconstruction by α·d_f, so with the error kept the edit is exactly
        x_last ← x_last + α·d_f        (an `add` edit at `write_hook(dic)`, decoder row d_f),
  which is defined the same way for every Dictionary (SAE, transcoder, SNMF, DiffMeans, neurons).
  Options: strength="feature_max" uses α_f = factor · (f's max activation over the corpus, from the cache)
  instead; positions="all" edits every real position (BOS excluded) instead of the last one only.
  Features whose decoder row is zero, or whose α is 0, get no score (None).

Batching: the forward pass is vmapped over (direction, α) pairs with the edit vector and strength traced
(eval/outputs.py `_mean_final_hidden` at t0 = T−1, i.e. the last position's final-normed residual), so one
compiled function (kept in outputs.py's `_compiled` cache) scores `feature_batch` features per call; the
ranks and probabilities of the K tokens are computed on the device and only [G, K] numbers come back.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from featureatlas.activation_store.configs import Config, setting
from featureatlas.activation_store.errors import ConfigError
from featureatlas.eval.adapters import feature_ids, write_directions
from featureatlas.eval.cache import EXPLAIN, HELD_OUT, FeatureCache
from featureatlas.eval.outputs import _compiled, _mean_final_hidden, _unembed_linear, dictionary_vocab_proj

INPUT_METHOD, OUTPUT_METHOD = "cheap_input", "cheap_output"
JUDGE = "none"
"""Score.judge of the cheap scores: no judge is involved."""


@dataclasses.dataclass
class CheapConfig(Config):
    """Settings of the cheap input and output scores (Arad et al. 2025)."""

    n_top: int = setting(100, gt=0)
    """Top-activating examples per feature for the input score (the paper: 100; capped by what the cache holds)."""
    vocab_top: int = setting(20, gt=0)
    """VocabProj tokens per feature compared with peak tokens and output ranks (the paper: 20)."""
    min_examples: int = setting(10, gt=0)
    """Features with fewer top examples than this get no input score (the paper's code skips features with < 10)."""
    prompt: str = setting("From my experience,")
    """Neutral prompt the feature is amplified on (BOS is prepended, as in the store)."""
    factor: float = setting(10.0, gt=0)
    """Amplification factor (the paper: 10)."""
    strength: str = setting("prompt_max", choices=("prompt_max", "feature_max"))
    """prompt_max: alpha = factor x the largest activation of any feature at the prompt's last token (the paper's
    code); feature_max: alpha_f = factor x the feature's max activation over the corpus (from the cache)."""
    positions: str = setting("last", choices=("last", "all"))
    """Amplify at the last prompt position only (the paper's code) or at every real position but BOS."""
    feature_batch: int = setting(64, gt=0)
    """Features per compiled, vmapped forward of the output score."""
    contexts_per_batch: int = setting(16, gt=0)
    """Contexts encoded at once to find the peak tokens (memory: contexts x context length x features floats)."""


# ---- input score ----------------------------------------------------------------------------------

def top_examples(cache: FeatureCache, feature: int, n_top: int, splits: Sequence[int] = (EXPLAIN, HELD_OUT)
                 ) -> list[tuple[int, float]]:
    """The n_top most activating (context, activation) pairs of `feature` over the given cache splits,
    highest first (ties: lower context id first)."""
    pairs = [p for s in splits for p in cache.examples(feature, s)["top"]]
    pairs.sort(key=lambda p: (-p[1], p[0]))
    return pairs[:n_top]


@jax.jit
def _peak_positions(codes_CxTxF, valid_CxT):
    """[C, F]: first position of the max activation over the valid positions of each context."""
    masked = jnp.where(valid_CxT[:, :, None], codes_CxTxF, -jnp.inf)
    return jnp.argmax(masked, axis=1)


def peak_tokens(store, dic, contexts_by_feature: dict[int, Sequence[int]], *, contexts_per_batch: int = 16,
                exclude_bos: bool = True) -> dict[int, np.ndarray]:
    """{feature: token ids [n]}: the token at the feature's max-activation position in each of its contexts.

    Every context is read and encoded once, however many features need it; the argmax over positions runs
    for all features of a batch of contexts at once ([C, F] ints leave the device, never [C, T, F])."""
    need: dict[int, list[int]] = {}
    for f, ctxs in contexts_by_feature.items():
        for c in ctxs:
            need.setdefault(int(c), []).append(int(f))
    T, first = store.context_length, 1 if exclude_bos else 0
    pos_of: dict[tuple[int, int], int] = {}
    contexts = sorted(need)
    for b in range(0, len(contexts), contexts_per_batch):
        batch = np.asarray(contexts[b:b + contexts_per_batch], np.int64)
        C = len(batch)
        rows = (batch[:, None] * T + np.arange(T)[None, :]).ravel()
        x = store.read_rows(dic.hook, rows)
        if C < contexts_per_batch:  # one compiled shape for every batch
            x = np.concatenate([x, np.zeros(((contexts_per_batch - C) * T, x.shape[1]), x.dtype)])
        codes = jnp.asarray(dic.encode(x)).reshape(contexts_per_batch, T, -1)
        t = np.arange(T)[None, :]
        n_valid = np.zeros(contexts_per_batch, np.int64)
        n_valid[:C] = store.n_valid[batch]
        valid = (t >= first) & (t < n_valid[:, None])
        pos = np.asarray(_peak_positions(codes, valid))
        for j, c in enumerate(batch):
            for f in need[int(c)]:
                pos_of[(int(c), f)] = int(pos[j, f])
    return {int(f): np.array([int(store.tokens[int(c), pos_of[(int(c), int(f))]]) for c in ctxs], np.int64)
            for f, ctxs in contexts_by_feature.items()}


@dataclasses.dataclass
class InputScores:
    """Per feature (ids in `features`): score (NaN where unscored), examples used, and hits."""

    features: np.ndarray
    score: np.ndarray
    n: np.ndarray
    hits: np.ndarray


def input_scores(store, dic, cache: FeatureCache, top_ids_FxK, features=None, *, n_top: int = 100,
                 min_examples: int = 10, splits: Sequence[int] = (EXPLAIN, HELD_OUT), contexts_per_batch: int = 16,
                 exclude_bos: bool = True) -> InputScores:
    """Input scores of `features` (module docstring). top_ids_FxK: row i = the VocabProj token ids of
    features[i] (e.g. `dictionary_vocab_proj(model, dic, features, top=20).top_ids`)."""
    f = cache.check_features(features)
    top_ids = np.asarray(top_ids_FxK)
    if top_ids.ndim != 2 or top_ids.shape[0] != len(f):
        raise ConfigError(f"top_ids_FxK must have one row of token ids per feature ({len(f)}), got {top_ids.shape}")
    if n_top < 1 or min_examples < 1:
        raise ConfigError(f"n_top ({n_top}) and min_examples ({min_examples}) must be >= 1")
    if not set(splits) <= {EXPLAIN, HELD_OUT} or not splits:
        raise ConfigError(f"splits must be a non-empty subset of ({EXPLAIN}, {HELD_OUT}), got {splits!r}")
    examples = {int(g): [c for c, _ in top_examples(cache, int(g), n_top, splits)] for g in f}
    peaks = peak_tokens(store, dic, examples, contexts_per_batch=contexts_per_batch, exclude_bos=exclude_bos)
    n = np.array([len(examples[int(g)]) for g in f], np.int64)
    hits = np.array([int(np.isin(peaks[int(g)], top_ids[i]).sum()) for i, g in enumerate(f)], np.int64)
    score = np.where(n >= min_examples, hits / np.maximum(n, 1), np.nan)
    return InputScores(f, score, n, hits)


# ---- output score ---------------------------------------------------------------------------------

def prompt_tokens(tokenizer, prompt: str) -> np.ndarray:
    """[1, T]: BOS (when the tokenizer has one, as the store's contexts begin) + the prompt's tokens."""
    ids = list(tokenizer.encode(prompt))
    if not ids:
        raise ConfigError(f"the prompt {prompt!r} has no tokens; give a non-empty prompt")
    bos = getattr(tokenizer, "bos_id", None)
    return np.asarray([([int(bos)] if bos is not None else []) + [int(i) for i in ids]], np.int32)


def _edit_positions(T: int, positions: str) -> np.ndarray:
    return np.array([T - 1], np.int32) if positions == "last" else np.arange(1 if T > 1 else 0, T, dtype=np.int32)


def _output_fn(model, hook: str, T: int, positions: str):
    """jit: (params, tokens_1xT, V_GxD, alpha_G, ids_GxK) -> (rank_GxK, prob_GxK) of the next token at the last
    position after adding alpha·v at `hook` (compiled once per (model, hook, T, positions))."""
    pos = _edit_positions(T, positions)

    def build(ref):
        def run(params, toks, V_GxD, alpha_G, ids_GxK):
            lm = ref()
            one = lambda v, a: _mean_final_hidden(lm, hook, "add", pos, T - 1, params, toks, v, a)  # noqa: E731
            logits_GxV = _unembed_linear(params, jax.vmap(one)(V_GxD, alpha_G))
            tok_GxK = jnp.take_along_axis(logits_GxV, ids_GxK, axis=1)
            rank_GxK = jnp.sum(logits_GxV[:, None, :] > tok_GxK[:, :, None], axis=-1)
            logp_GxK = tok_GxK - jax.nn.logsumexp(logits_GxV, axis=1, keepdims=True)
            return rank_GxK, jnp.exp(logp_GxK)

        return jax.jit(run)

    return _compiled(model, ("cheap-output", hook, T, positions), build)


def prompt_max_activation(model, dic, toks_1xT) -> float:
    """m = max_g a_g(x) at the prompt's last position (the paper's amplification unit)."""
    _, acts = model.forward(model.params, toks_1xT, capture=(dic.hook,), stop_at="capture")
    return float(jnp.max(dic.encode(acts[dic.hook][0, -1:])))


def output_score_formula(best_rank, max_prob, vocab_size: int):
    """(1 − best_rank / |V|) · max_prob (Arad et al. 2025)."""
    return (1.0 - np.asarray(best_rank, np.float64) / vocab_size) * np.asarray(max_prob, np.float64)


@dataclasses.dataclass
class OutputScores:
    """Per feature (ids in `features`): score (NaN where unscored), best rank and max probability of its
    VocabProj tokens after amplification, and the strength alpha used."""

    features: np.ndarray
    score: np.ndarray
    best_rank: np.ndarray
    max_prob: np.ndarray
    alpha: np.ndarray


def output_scores(model, dic, top_ids_FxK, features=None, *, alpha_F=None, prompt: str = "From my experience,",
                  factor: float = 10.0, positions: str = "last", feature_batch: int = 64,
                  progress: bool = False) -> OutputScores:
    """Output scores of `features` (module docstring). alpha_F: per-feature strengths; default
    factor · max_g a_g(x_last) for all (the paper's rule)."""
    f = feature_ids(features, dic.n_features)
    top_ids = np.asarray(top_ids_FxK, np.int32)
    V = model.config.vocab_size
    if top_ids.ndim != 2 or top_ids.shape[0] != len(f) or top_ids.shape[1] < 1:
        raise ConfigError(f"top_ids_FxK must have one row of token ids per feature ({len(f)}), got {top_ids.shape}")
    if top_ids.size and (top_ids.min() < 0 or top_ids.max() >= V):
        raise ConfigError(f"token ids must lie in [0, {V}): the VocabProj ids come from another model")
    if positions not in ("last", "all"):
        raise ConfigError(f"positions must be 'last' or 'all', got {positions!r}")
    if feature_batch < 1:
        raise ConfigError(f"feature_batch must be >= 1, got {feature_batch}")
    hook, V_all = write_directions(model, dic)
    D = V_all.shape[1]
    toks = prompt_tokens(model.tokenizer, prompt)
    if alpha_F is None:
        alpha = np.full(len(f), factor * prompt_max_activation(model, dic, toks), np.float32)
    else:
        alpha = np.asarray(alpha_F, np.float32)
        if alpha.shape != (len(f),) or not np.all(np.isfinite(alpha)):
            raise ConfigError(f"alpha_F must hold one finite strength per feature ({len(f)}), got {alpha.shape}")
    fn = _output_fn(model, hook, toks.shape[1], positions)
    K = top_ids.shape[1]
    nb = max(1, min(feature_batch, len(f)))
    rank = np.zeros((len(f), K), np.int64)
    prob = np.zeros((len(f), K), np.float64)
    starts = range(0, len(f), nb)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="output score", unit="block")
    for s in starts:
        n = min(nb, len(f) - s)
        Vb = np.zeros((nb, D), np.float32)
        Vb[:n] = V_all[f[s:s + n]]
        ab = np.zeros(nb, np.float32)
        ab[:n] = alpha[s:s + n]
        ib = np.zeros((nb, K), np.int32)
        ib[:n] = top_ids[s:s + n]
        r, p = fn(model.params, toks, Vb, ab, ib)  # padded rows add 0: computed and dropped
        rank[s:s + n], prob[s:s + n] = np.asarray(r)[:n], np.asarray(p)[:n]
    best, top_p = rank.min(axis=1), prob.max(axis=1)
    scored = np.any(V_all[f] != 0, axis=1) & (alpha != 0)
    score = np.where(scored, output_score_formula(best, top_p, V), np.nan)
    return OutputScores(f, score, best, top_p, alpha)


# ---- both, as Score dicts -------------------------------------------------------------------------

def _score(method: str, value: float, n: int, metrics: dict, seconds: float) -> dict:
    ok = bool(np.isfinite(value))
    return {"method": method, "value": float(value) if ok else None, "judge": JUDGE, "n": int(n) if ok else 0,
            "failed": 0, "seed": 0, "metrics": metrics, "seconds": float(seconds), "tokens_in": 0, "tokens_out": 0}


def cheap_scores(model, store, dic, cache: FeatureCache, features=None, config: CheapConfig | None = None, *,
                 splits: Sequence[int] = (EXPLAIN, HELD_OUT), progress: bool = False) -> dict[int, list[dict]]:
    """{feature: [input Score, output Score]} (eval_spec.md Score dicts, method "cheap_input" / "cheap_output",
    judge "none"); value None for a feature that cannot be scored (too few examples, zero direction)."""
    cfg = (config or CheapConfig()).validate()
    f = cache.check_features(features)
    if cache.n_features != dic.n_features or cache.hook != dic.hook:
        raise ConfigError(f"the cache ({cache.n_features} features at {cache.hook}) was not built for this "
                          f"dictionary ({dic.n_features} at {dic.hook}); run `featureatlas cache` for it")
    if cfg.vocab_top > model.config.vocab_size:
        raise ConfigError(f"vocab_top={cfg.vocab_top} exceeds the vocabulary ({model.config.vocab_size})")
    prompt_tokens(model.tokenizer, cfg.prompt)  # an empty prompt fails here, before any work
    t0 = time.perf_counter()
    vp = dictionary_vocab_proj(model, dic, f, top=cfg.vocab_top)
    t1 = time.perf_counter()
    ins = input_scores(store, dic, cache, vp.top_ids, f, n_top=cfg.n_top, min_examples=cfg.min_examples,
                       splits=splits, contexts_per_batch=cfg.contexts_per_batch)
    t2 = time.perf_counter()
    alpha = None
    if cfg.strength == "feature_max":
        alpha = cfg.factor * np.asarray(cache["max"], np.float32)[f]
    outs = output_scores(model, dic, vp.top_ids, f, alpha_F=alpha, prompt=cfg.prompt, factor=cfg.factor,
                         positions=cfg.positions, feature_batch=cfg.feature_batch, progress=progress)
    t3 = time.perf_counter()
    per = max(len(f), 1)
    t_in, t_out = (t2 - t0) / per, (t3 - t2 + t1 - t0) / per  # VocabProj counts towards both
    result = {}
    for i, g in enumerate(f):
        result[int(g)] = [
            _score(INPUT_METHOD, ins.score[i], ins.n[i],
                   {"hits": int(ins.hits[i]), "examples": int(ins.n[i]), "vocab_top": cfg.vocab_top,
                    "splits": [int(s) for s in splits]}, t_in),
            _score(OUTPUT_METHOD, outs.score[i], 1,
                   {"best_rank": int(outs.best_rank[i]), "max_prob": float(outs.max_prob[i]),
                    "alpha": float(outs.alpha[i]), "vocab_top": cfg.vocab_top, "prompt": cfg.prompt,
                    "strength": cfg.strength, "positions": cfg.positions}, t_out),
        ]
    return result
