"""Sparse probing on the store's context labels (SAEBench-style; Gurnee et al. 2023, "Finding Neurons in a
Haystack"; Karvonen et al. 2025, SAEBench): how well do k features of a dictionary carry a label?

Data: the store's /label per context (−1 = none) with the class names in its `label_names` attribute (the
BBC store: 5 topics). Every labelled context becomes one example:
    pooled_c = mean_{t real, t ≥ 1} a(x_{c,t})             (mean over the real tokens, BOS excluded)
for the dictionary codes a (all F features) and, as the reference, for the raw hook activations x (all d
dims). The pass streams the store `contexts_per_chunk` contexts at a time: [contexts × T, F] codes live only
for one chunk, never [n_tokens, F]. When [n_contexts, F] itself is larger than `max_pooled_bytes`, the pass
runs twice: first the per-class sums on the train split (all that feature selection needs), then the pooled
values of the selected features only.

Split: by document, never by context, so one article never lands in both: document d is a test document
iff splitmix64(d ⊕ seed)/2^64 < test_fraction (eval/cache.py `held_out_mask`, the cache's hash).

Per class c, one vs rest (SAEBench):
  1. balance: the negatives of each split are subsampled (seeded) to the number of positives of that split,
     so chance accuracy is 0.5 (SAEBench balances the same way);
  2. select k ∈ {1, 2, 5} features by |mean_train(pooled | c) − mean_train(pooled | not c)| (largest first;
     SAEBench's `get_top_k_mean_diff_mask`);
  3. fit scikit-learn LogisticRegression (L2, C = 1, lbfgs) on the standardised (train mean/std) selected
     features of the train split; report accuracy on the test split with a 95% Wilson score interval
         (p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n),   z = 1.959964;
  4. the same probe on all raw dimensions (k = "all"), the reference a k-sparse probe is compared with.
Summary per k: accuracy = sum of correct / sum of test examples over the classes (micro average) with its
Wilson interval (classes share test contexts, so the interval is approximate), and macro_accuracy = the
mean of the per-class accuracies (what SAEBench reports).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from featureatlas.activation_store.configs import Config, setting
from featureatlas.activation_store.errors import ConfigError, FeatureAtlasError
from featureatlas.eval.adapters import validate_dictionary
from featureatlas.eval.cache import held_out_mask

Z95 = 1.959963984540054


class ProbingError(FeatureAtlasError, ValueError):
    """Sparse probing cannot run on this store (no labels, too few examples); the message names the fix."""


@dataclasses.dataclass
class ProbingConfig(Config):
    """Settings of sparse probing."""

    ks: tuple[int, ...] = setting((1, 2, 5))
    """Numbers of features per probe (SAEBench: 1, 2, 5)."""
    test_fraction: float = setting(0.3, gt=0, lt=1)
    """Share of documents (by doc id) whose contexts form the test split."""
    seed: int = setting(0)
    """Seed of the document split and of the class balancing."""
    balance: bool = setting(True)
    """Subsample the negatives of each split to the number of positives (chance = 0.5), as SAEBench."""
    C: float = setting(1.0, gt=0)
    """Inverse L2 regularisation strength of the logistic regression."""
    max_iter: int = setting(1000, gt=0)
    """Iterations of the lbfgs solver."""
    raw: bool = setting(True)
    """Also probe the raw activations (all dimensions), the reference."""
    min_examples: int = setting(4, gt=0)
    """A class needs at least this many positive contexts in each split to be probed."""
    contexts_per_chunk: int = setting(32, gt=0)
    """Contexts read and encoded at once."""
    max_pooled_bytes: int = setting(2 << 30, gt=0)
    """Largest [contexts, features] float32 matrix kept in memory; above it the pass runs twice."""


# ---- streaming pooled activations ---------------------------------------------------------------

@jax.jit
def _pool(x_CxTxD, w_CxT):
    """sum_t w[c, t] · x[c, t, :] (w = 1/n_real on real tokens, 0 elsewhere: the mean) and the max over
    w > 0 (0 where none; codes are >= 0)."""
    mean = jnp.einsum("ct,ctd->cd", w_CxT, x_CxTxD)
    mx = jnp.max(jnp.where(w_CxT[:, :, None] > 0, x_CxTxD, -jnp.inf), axis=1)
    return mean, jnp.where(jnp.isfinite(mx), mx, 0.0)


def context_weights(n_valid_C, T: int, exclude_bos: bool = True) -> np.ndarray:
    """[C, T]: 1/n on the n real tokens of each context (BOS excluded if asked), 0 elsewhere."""
    t = np.arange(T)[None, :]
    n_valid_C = np.asarray(n_valid_C)[:, None]
    real = (t >= (1 if exclude_bos else 0)) & (t < n_valid_C)
    return (real / np.maximum(real.sum(1, keepdims=True), 1)).astype(np.float32)


def pooled_chunks(store, dic, contexts, *, how: str = "mean", features=None, raw: bool = False,
                  contexts_per_chunk: int = 32, exclude_bos: bool = True) -> Iterator[tuple[slice, np.ndarray,
                                                                                           np.ndarray | None]]:
    """Yields (slice into `contexts`, pooled codes [C, F or len(features)], pooled raw [C, d] or None) for
    consecutive chunks of `contexts` (store context ids). how: "mean" or "max" over the real tokens."""
    if how not in ("mean", "max"):
        raise ConfigError(f"how must be 'mean' or 'max', got {how!r}")
    contexts = np.asarray(contexts, np.int64)
    T, C = store.context_length, contexts_per_chunk
    sel = None if features is None else jnp.asarray(np.asarray(features, np.int64))
    for s in range(0, len(contexts), C):
        ctx = contexts[s:s + C]
        n = len(ctx)
        rows = (ctx[:, None] * T + np.arange(T)[None, :]).ravel()
        x = store.read_rows(dic.hook, rows)
        w = np.zeros((C, T), np.float32)
        w[:n] = context_weights(store.n_valid[ctx], T, exclude_bos)
        if n < C:  # one compiled shape per chunk size
            x = np.concatenate([x, np.zeros(((C - n) * T, x.shape[1]), x.dtype)])
        codes = jnp.asarray(dic.encode(x), jnp.float32)
        if sel is not None:
            codes = codes[:, sel]
        m, mx = _pool(codes.reshape(C, T, -1), w)
        out = np.asarray(m if how == "mean" else mx)[:n]
        r = np.asarray(_pool(jnp.asarray(x, jnp.float32).reshape(C, T, -1), w)[0 if how == "mean" else 1])[:n] \
            if raw else None
        yield slice(s, s + n), out, r


def pooled_activations(store, dic, contexts, *, how: str = "mean", features=None, raw: bool = False,
                       contexts_per_chunk: int = 32, exclude_bos: bool = True, progress: bool = False):
    """(pooled codes [n, F or len(features)], pooled raw [n, d] or None) of the given contexts."""
    n = len(contexts)
    F = dic.n_features if features is None else len(features)
    out = np.zeros((n, F), np.float32)
    out_raw = np.zeros((n, store.dim(dic.hook)), np.float32) if raw else None
    it = pooled_chunks(store, dic, contexts, how=how, features=features, raw=raw,
                       contexts_per_chunk=contexts_per_chunk, exclude_bos=exclude_bos)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=-(-n // contexts_per_chunk), desc=f"pool {dic.hook}", unit="chunk")
    for sl, a, r in it:
        out[sl] = a
        if raw:
            out_raw[sl] = r
    return out, out_raw


# ---- the probe ------------------------------------------------------------------------------------

def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion correct/n ((0, 1) when n = 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def document_split(doc_ids, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean per context: True when its document is a test document (module docstring)."""
    return held_out_mask(np.asarray(doc_ids, np.int64), test_fraction, seed)


def balanced_indices(y: np.ndarray, idx: np.ndarray, rng: np.random.Generator, balance: bool) -> np.ndarray:
    """Sorted indices: the positives of idx and as many of its negatives (all if not balance)."""
    pos, neg = idx[y[idx]], idx[~y[idx]]
    if balance and len(neg) > len(pos):
        neg = rng.choice(neg, size=len(pos), replace=False)
    return np.sort(np.concatenate([pos, neg]))


def class_split(labels: np.ndarray, is_test: np.ndarray, cls: int, seed: int, balance: bool
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y, train indices, test indices) of the one-vs-rest problem of class `cls` over the labelled contexts."""
    y = np.asarray(labels) == cls
    rng = np.random.default_rng([seed, cls, 17])
    train = balanced_indices(y, np.flatnonzero(~is_test), rng, balance)
    test = balanced_indices(y, np.flatnonzero(is_test), rng, balance)
    return y, train, test


def mean_difference(sum_pos_F, n_pos: int, sum_neg_F, n_neg: int) -> np.ndarray:
    """|mean(positives) − mean(negatives)| per feature."""
    return np.abs(np.asarray(sum_pos_F, np.float64) / max(n_pos, 1) - np.asarray(sum_neg_F, np.float64) / max(n_neg, 1))


def top_k_features(diff_F: np.ndarray, k: int) -> np.ndarray:
    """The k features with the largest difference (ties: lower id first)."""
    order = np.lexsort((np.arange(len(diff_F)), -np.asarray(diff_F)))
    return order[:k]


def probe_accuracy(X_train, y_train, X_test, y_test, *, C: float = 1.0, max_iter: int = 1000, seed: int = 0
                   ) -> tuple[int, int]:
    """(correct, n) of a standardised L2 logistic regression fit on train, scored on test."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    clf.fit(np.asarray(X_train, np.float64), np.asarray(y_train))
    pred = clf.predict(np.asarray(X_test, np.float64))
    return int((pred == np.asarray(y_test)).sum()), int(len(y_test))


@dataclasses.dataclass
class ProbingResult:
    """records: one dict per (class, k) with accuracy, ci, correct, n_train, n_test, features (None for raw);
    summary: per k ("1", "2", "5", "all"), the micro-averaged accuracy with its Wilson interval and the macro
    average; skipped: classes that could not be probed, with the reason; contexts / is_test / labels: the
    labelled contexts used (store context ids, test mask, class per context)."""

    records: list[dict]
    summary: dict
    skipped: dict
    label_names: tuple[str, ...]
    contexts: np.ndarray
    is_test: np.ndarray
    labels: np.ndarray

    def as_dict(self) -> dict:
        """JSON-ready: records, summary, skipped classes, label names and split sizes."""
        return {"records": self.records, "summary": self.summary, "skipped": self.skipped,
                "label_names": list(self.label_names), "contexts": int(len(self.contexts)),
                "test_contexts": int(self.is_test.sum())}


def labelled_contexts(store) -> tuple[np.ndarray, np.ndarray]:
    """(context ids, labels) of the committed contexts with a label and at least one real token after BOS;
    ProbingError when the store has no labels."""
    names = tuple(store.label_names)
    labels = np.asarray(store.labels)
    if not names or not (labels >= 0).any():
        raise ProbingError(f"store {store.path} has no context labels (label_names={list(names)}): sparse probing "
                           "needs a labelled corpus; harvest one with labels, e.g. `featureatlas harvest --corpus bbc` "
                           "or a directory of .txt files with one sub-directory per label")
    ctx = np.flatnonzero((labels >= 0) & (np.asarray(store.n_valid) > 1))
    return ctx, labels[ctx]


def _summary(records: list[dict], ks: Sequence) -> dict:
    out = {}
    for k in ks:
        rs = [r for r in records if r["k"] == k]
        if not rs:
            continue
        correct, n = sum(r["correct"] for r in rs), sum(r["n_test"] for r in rs)
        out[str(k)] = {"accuracy": correct / n, "ci": list(wilson_interval(correct, n)),
                       "macro_accuracy": float(np.mean([r["accuracy"] for r in rs])), "classes": len(rs),
                       "correct": correct, "n_test": n}
    return out


def sparse_probing(store, dic, config: ProbingConfig | None = None, *, progress: bool = False) -> ProbingResult:
    """Sparse probing of `dic` on the labels of `store` (module docstring)."""
    cfg = (config or ProbingConfig()).validate()
    ks = tuple(int(k) for k in cfg.ks)
    if not ks or min(ks) < 1:
        raise ConfigError(f"ks must be positive integers, got {cfg.ks!r}")
    if max(ks) > dic.n_features:
        raise ConfigError(f"k={max(ks)} exceeds the dictionary's {dic.n_features} features; lower --ks")
    store.check_hook(dic.hook)
    validate_dictionary(dic, d_in=store.dim(dic.hook))
    ctx, labels = labelled_contexts(store)
    names = tuple(store.label_names)
    is_test = document_split(np.asarray(store.doc_ids)[ctx], cfg.test_fraction, cfg.seed)
    if is_test.all() or not is_test.any():
        raise ProbingError(f"all {len(ctx)} labelled contexts of {store.path} fall in one split (their documents: "
                           f"{len(np.unique(np.asarray(store.doc_ids)[ctx]))}); change --test-fraction or --seed, or "
                           "harvest more documents")
    classes = sorted(set(int(c) for c in labels))
    splits, skipped = {}, {}
    for c in classes:
        y, tr, te = class_split(labels, is_test, c, cfg.seed, cfg.balance)
        n_pos = (int(y[tr].sum()), int(y[te].sum()))
        if min(n_pos) < cfg.min_examples or (~y[tr]).sum() == 0 or (~y[te]).sum() == 0:
            skipped[names[c] if c < len(names) else str(c)] = (f"{n_pos[0]} train / {n_pos[1]} test positives "
                                                               f"(need {cfg.min_examples} each, and negatives)")
            continue
        splits[c] = (y, tr, te)
    if not splits:
        raise ProbingError(f"no class of {store.path} has {cfg.min_examples} positive contexts in both splits: "
                           f"{skipped}; harvest more labelled text or lower --min-examples")

    F = dic.n_features
    one_pass = len(ctx) * F * 4 <= cfg.max_pooled_bytes
    kw = dict(contexts_per_chunk=cfg.contexts_per_chunk, progress=progress)
    if one_pass:
        pooled, raw = pooled_activations(store, dic, ctx, raw=cfg.raw, **kw)
        chosen = {c: {k: top_k_features(_diff(pooled, y, tr), k) for k in ks} for c, (y, tr, _) in splits.items()}
        columns = lambda feats: pooled[:, feats]  # noqa: E731
    else:  # pass 1: per-(class, side) train sums; pass 2: the selected features only
        sums = {c: [np.zeros(F), np.zeros(F)] for c in splits}
        members = {c: (np.isin(np.arange(len(ctx)), tr) & y, np.isin(np.arange(len(ctx)), tr) & ~y)
                   for c, (y, tr, _) in splits.items()}
        raw = np.zeros((len(ctx), store.dim(dic.hook)), np.float32) if cfg.raw else None
        for sl, a, r in pooled_chunks(store, dic, ctx, raw=cfg.raw, contexts_per_chunk=cfg.contexts_per_chunk):
            for c in splits:
                for side in (0, 1):
                    sums[c][side] += a[members[c][side][sl]].sum(0)
            if cfg.raw:
                raw[sl] = r
        chosen = {c: {k: top_k_features(mean_difference(sums[c][0], members[c][0].sum(), sums[c][1],
                                                        members[c][1].sum()), k) for k in ks} for c in splits}
        keep = np.unique(np.concatenate([v for per in chosen.values() for v in per.values()]))
        sub, _ = pooled_activations(store, dic, ctx, features=keep, **kw)
        columns = lambda feats: sub[:, np.searchsorted(keep, feats)]  # noqa: E731

    records = []
    for c, (y, tr, te) in splits.items():
        name = names[c] if c < len(names) else str(c)
        for k in ks:
            feats = chosen[c][k]
            X = columns(feats)
            Xtr, Xte = X[tr], X[te]
            correct, n = probe_accuracy(Xtr, y[tr], Xte, y[te], C=cfg.C, max_iter=cfg.max_iter, seed=cfg.seed)
            records.append(_record(name, k, feats, correct, n, len(tr)))
        if cfg.raw:
            correct, n = probe_accuracy(raw[tr], y[tr], raw[te], y[te], C=cfg.C, max_iter=cfg.max_iter, seed=cfg.seed)
            records.append(_record(name, "all", None, correct, n, len(tr)))
    summary = _summary(records, list(ks) + (["all"] if cfg.raw else []))
    return ProbingResult(records, summary, skipped, names, ctx, is_test, labels)


def _diff(pooled: np.ndarray, y: np.ndarray, tr: np.ndarray) -> np.ndarray:
    pos, neg = tr[y[tr]], tr[~y[tr]]
    return mean_difference(pooled[pos].sum(0), len(pos), pooled[neg].sum(0), len(neg))


def _record(name: str, k, feats, correct: int, n: int, n_train: int) -> dict:
    return {"class": name, "k": k, "features": None if feats is None else [int(f) for f in feats],
            "accuracy": correct / n if n else float("nan"), "ci": list(wilson_interval(correct, n)),
            "correct": correct, "n_test": n, "n_train": n_train}
