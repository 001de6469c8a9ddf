"""Cheap weight-based statistics of feature directions (no forward pass; RESEARCH.md "Cheap weight-based
statistics").

Orientation. W_U here is the model's unembedding as used in code, [d_model, vocab] (`model.W_U`,
logits = h @ W_U; TransformerLens's orientation). Its SVD W_U = U S Vᵀ has U [d_model, d_model]: the
LEFT singular vectors live in the residual stream. (Written as a [vocab, d_model] matrix, logits =
W_U·d, these are the RIGHT singular vectors; same subspace.) The final norm's gain γ is folded in
(W_eff = diag(γ) W_U, and for LayerNorm also the mean-removal (I − 11ᵀ/D)), as TransformerLens's
fold_ln does, because a direction reaches the logits through the final norm: what matters is how
much W_eff, not the raw W_U, lets it through. `effective_unembedding(model)`.

Per feature with residual write direction d (`dic.residual_directions(model)` row):
  norm                ‖d‖
  null_space_frac     ‖U_darkᵀ d‖ / ‖d‖, U_dark = the left singular vectors of W_eff with the smallest
                      singular values, the bottom `frac` (1%, at least one) of d_model. Entropy neurons
                      write there: large norm, little direct effect on the logits (Stolfo et al. 2024,
                      "Confidence Regulation Neurons"). 0 for a zero d.
  unigram_alignment   Pearson correlation over the vocabulary between the direct logit effect
                      ℓ = dᵀ W_eff and log p(token), p = (count + 1) / (N + V) (add-one smoothing, counts
                      from the store's tokens, BOS and padding excluded): cos(ℓ − mean ℓ, f − mean f).
                      ℓ is centred too because softmax ignores a constant shift of the logits. High
                      for token-frequency neurons. 0 for a zero d.
  nearest             the `k` (10) other features with the largest decoder cosine, self excluded; blocks of
                      rows against all rows, so F = 16k never needs an F × F matrix at once. By default
                      the decoder rows as written into the residual stream (residual_directions): the
                      same as `directions_FxD` for residual-stream dictionaries, and for mlp_hidden
                      dictionaries the cosine after W_down, what later layers see (for neurons, whose
                      hook-space directions are the identity basis, the only informative choice).
                      nearest_space="decoder" uses `directions_FxD` in the dictionary's own hook space.
  read_tokens         LM-head decoding of a read direction w (neurons: the up-projection row):
                      softmax(w @ W_U) and its top tokens (raw W_U, no norm, as in the literature).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from featureatlas.activation_store.errors import ConfigError
from featureatlas.eval.adapters import DictionaryError, feature_ids


def effective_unembedding(model) -> np.ndarray:
    """W_eff [d_model, vocab] = diag(γ_final) W_U, with the mean removal of a LayerNorm folded in (GPT-2)."""
    W = np.asarray(model.W_U, np.float32) * np.asarray(model.params["ln_f_w"], np.float32)[:, None]
    if "ln_f_b" in model.params:  # LayerNorm: x − mean(x) first, i.e. (I − 11ᵀ/D)
        W = W - W.mean(axis=0, keepdims=True)
    return W


def dark_subspace(W_U_DxV, frac: float = 0.01, n: int | None = None) -> np.ndarray:
    """U_dark [d_model, n]: left singular vectors of W_U (d_model × vocab) with the n smallest singular
    values; n = max(1, round(frac · d_model)) unless given. Columns ordered by ascending singular value."""
    W = np.asarray(W_U_DxV, np.float64)
    D = W.shape[0]
    if n is None:
        if not 0 < frac <= 1:
            raise ConfigError(f"frac={frac} must be in (0, 1]")
        n = max(1, int(round(frac * D)))
    if not 0 < n <= D:
        raise ConfigError(f"n={n} dark directions must be in 1..d_model={D}")
    # U and S² are the eigenvectors and eigenvalues of the Gram matrix W Wᵀ (d_model²): in float64 this is
    # accurate for W_U's singular values (SmolLM2: 13 to ~150) and ~15x faster than an SVD of d_model × vocab.
    _, U = np.linalg.eigh(W @ W.T)  # eigenvalues ascending
    return np.ascontiguousarray(U[:, :n], np.float32)


def direction_norms(resid_FxD) -> np.ndarray:
    return np.linalg.norm(np.asarray(resid_FxD, np.float64), axis=1).astype(np.float32)


def null_space_fraction(resid_FxD, U_dark_DxN) -> np.ndarray:
    """‖U_darkᵀ d‖ / ‖d‖ per row d (0 for a zero row)."""
    R = np.asarray(resid_FxD, np.float64)
    proj = np.linalg.norm(R @ np.asarray(U_dark_DxN, np.float64), axis=1)
    norm = np.linalg.norm(R, axis=1)
    return np.where(norm > 0, proj / np.where(norm > 0, norm, 1.0), 0.0).astype(np.float32)


def unigram_counts(tokens_NxT, n_valid_N, vocab_size: int, exclude_bos: bool = True) -> np.ndarray:
    """Token counts [vocab] over the real tokens of a store's /tokens (padding, and BOS at position 0
    when exclude_bos, left out)."""
    toks = np.asarray(tokens_NxT)
    t = np.arange(toks.shape[1])[None, :]
    keep = (t < np.asarray(n_valid_N)[:, None]) & (t >= (1 if exclude_bos else 0))
    ids = toks[keep]
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ConfigError(f"token ids [{ids.min()}, {ids.max()}] do not fit a vocabulary of {vocab_size}: "
                          "the store was tokenized for another model")
    return np.bincount(ids, minlength=vocab_size).astype(np.int64)


def log_unigram(counts_V) -> np.ndarray:
    """log p(token) with add-one smoothing: log((count + 1) / (N + V))."""
    c = np.asarray(counts_V, np.float64)
    return np.log((c + 1.0) / (c.sum() + c.size))


def unigram_alignment(resid_FxD, W_U_DxV, log_freq_V, block: int = 4096) -> np.ndarray:
    """cos(ℓ − mean ℓ, f − mean f) per row d, ℓ = d @ W_U, f = log_freq (module docstring)."""
    W = jnp.asarray(W_U_DxV, jnp.float32)
    f = np.asarray(log_freq_V, np.float64)
    if f.shape != (W.shape[1],):
        raise ConfigError(f"log frequencies have shape {f.shape}, the vocabulary is {W.shape[1]}")
    f = f - f.mean()
    f_unit = jnp.asarray(f / max(np.linalg.norm(f), 1e-30), jnp.float32)
    R = np.asarray(resid_FxD, np.float32)
    out = []
    for s in range(0, R.shape[0], block):
        out.append(np.asarray(_centred_cosine(jnp.asarray(R[s:s + block]), W, f_unit)))
    return np.concatenate(out) if out else np.zeros(0, np.float32)


@jax.jit
def _centred_cosine(R_BxD, W_DxV, f_unit_V):
    logits = R_BxD @ W_DxV
    logits = logits - logits.mean(axis=1, keepdims=True)
    norm = jnp.linalg.norm(logits, axis=1)
    return jnp.where(norm > 0, (logits @ f_unit_V) / jnp.where(norm > 0, norm, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _nearest_block(Q_BxD, U_FxD, self_B, k: int):
    cos = Q_BxD @ U_FxD.T
    cos = cos.at[jnp.arange(Q_BxD.shape[0]), self_B].set(-jnp.inf, mode="drop")  # exclude self
    return jax.lax.top_k(cos, k)


def nearest_features(directions_FxD, k: int = 10, block: int = 1024, rows=None) -> tuple[np.ndarray, np.ndarray]:
    """(indices [R, k], cosines [R, k]) of the nearest other features by decoder cosine, descending, for
    the features `rows` (default all) among all F. Zero rows have cosine 0 with everything.
    Memory: one block × F matrix at a time."""
    V = np.asarray(directions_FxD, np.float32)
    F = V.shape[0]
    rows = np.arange(F) if rows is None else np.asarray(rows, np.int64)
    if F < 2:
        return np.zeros((len(rows), 0), np.int64), np.zeros((len(rows), 0), np.float32)
    k = min(k, F - 1)
    norms = np.linalg.norm(V, axis=1, keepdims=True)
    U_np = V / np.where(norms > 0, norms, 1.0)
    U = jnp.asarray(U_np)
    block = min(block, len(rows)) or 1
    idx, val = [], []
    for s in range(0, len(rows), block):
        r = rows[s:s + block]
        n = len(r)
        q = np.zeros((block, V.shape[1]), np.float32)
        q[:n] = U_np[r]
        self_B = np.full(block, F, np.int64)  # F: out of range, dropped (padding rows)
        self_B[:n] = r
        v, i = _nearest_block(jnp.asarray(q), U, jnp.asarray(self_B), k)
        idx.append(np.asarray(i)[:n])
        val.append(np.asarray(v)[:n])
    if not idx:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    return np.concatenate(idx).astype(np.int64), np.concatenate(val)


@functools.partial(jax.jit, static_argnames="k")
def _softmax_top(R_BxD, W_DxV, k: int):
    p = jax.nn.softmax(R_BxD @ W_DxV, axis=-1)
    return jax.lax.top_k(p, k)


def read_tokens(read_FxD, W_U_DxV, top: int = 10, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(token ids [F, top], probabilities [F, top]) of softmax(w @ W_U) for each read direction w."""
    R = np.asarray(read_FxD, np.float32)
    W = jnp.asarray(W_U_DxV, jnp.float32)
    ids, probs = [], []
    for s in range(0, R.shape[0], block):
        p, i = _softmax_top(jnp.asarray(R[s:s + block]), W, k=top)
        ids.append(np.asarray(i))
        probs.append(np.asarray(p))
    return np.concatenate(ids), np.concatenate(probs)


@dataclasses.dataclass
class WeightStats:
    """Weight statistics of features `features` (rows); `read_*` only for dictionaries with read directions."""

    features: np.ndarray
    norm: np.ndarray
    null_space_frac: np.ndarray
    unigram_alignment: np.ndarray | None
    nearest_ids: np.ndarray
    nearest_cos: np.ndarray
    read_ids: np.ndarray | None = None
    read_probs: np.ndarray | None = None

    def record(self, row: int, tokenizer=None) -> dict:
        """The catalog's "weights" field of the row-th feature (see notes/feature_schema.md)."""
        rec = {"norm": float(self.norm[row]), "null_space_frac": float(self.null_space_frac[row]),
               "unigram_alignment": None if self.unigram_alignment is None else float(self.unigram_alignment[row]),
               "nearest": [[int(i), float(c)] for i, c in zip(self.nearest_ids[row], self.nearest_cos[row])]}
        if self.read_ids is not None and tokenizer is not None:
            rec["read_tokens"] = [[tokenizer.decode([int(i)]), float(p)]
                                  for i, p in zip(self.read_ids[row], self.read_probs[row])]
        return rec


def weight_statistics(model, dic, features=None, *, counts_V=None, dark_frac: float = 0.01, k_nearest: int = 10,
                      read_top: int = 10, W_eff=None, U_dark=None, nearest_space: str = "residual") -> WeightStats:
    """All weight statistics of a Dictionary's features (all, or the given ids).

    counts_V: unigram counts (`unigram_counts(store.tokens, store.n_valid, vocab)`); without them
    unigram_alignment is None. Nearest features are searched among ALL the dictionary's features.
    Read tokens: for dictionaries with `read_directions(model)` (neurons).
    W_eff / U_dark: `effective_unembedding(model)` / `dark_subspace(W_eff, dark_frac)` computed once and
    reused across dictionaries (a few seconds for SmolLM2 on 2 cores).
    """
    f = feature_ids(features, dic.n_features)
    if nearest_space not in ("residual", "decoder"):
        raise ConfigError(f"nearest_space must be 'residual' or 'decoder', got {nearest_space!r}")
    R_all = np.asarray(dic.residual_directions(model), np.float32)
    if R_all.shape != (dic.n_features, model.config.d_model):
        raise DictionaryError(f"residual_directions has shape {R_all.shape}, expected ({dic.n_features}, "
                              f"{model.config.d_model})")
    R = R_all[f]
    W_eff = effective_unembedding(model) if W_eff is None else W_eff
    U_dark = dark_subspace(W_eff, dark_frac) if U_dark is None else U_dark
    align = None
    if counts_V is not None:
        align = unigram_alignment(R, W_eff, log_unigram(counts_V))
    space = R_all if nearest_space == "residual" else dic.directions_FxD
    nn_ids, nn_cos = nearest_features(space, k=k_nearest, rows=f)
    read_ids = read_probs = None
    if hasattr(dic, "read_directions"):
        read = np.asarray(dic.read_directions(model), np.float32)[f]
        read_ids, read_probs = read_tokens(read, model.W_U, top=read_top)
    return WeightStats(f, direction_norms(R), null_space_fraction(R, U_dark), align, nn_ids, nn_cos,
                       read_ids, read_probs)
