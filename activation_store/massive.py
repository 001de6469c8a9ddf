"""Massive-activation tokens: the one rule that says which tokens to set apart.

A few tokens of a language model's residual stream carry activations orders of magnitude larger than
the rest ("massive activations", Sun, Chen, Kolter & Liu 2024, "Massive Activations in Large Language
Models", arXiv:2402.17762). They sit at fixed, content-poor positions (the first token after BOS,
delimiters) and act as attention sinks. Sun et al. flag single activation *values* above 100 and
about 1000x the median magnitude; featureatlas flags whole *tokens* by their vector norm:

    massive(x_n)  <=>  ||x_n||_2 > factor * median_m ||x_m||_2

with the median over the store's train tokens (BOS excluded; BOS is left out of every dictionary's
data anyway). Such tokens are rare yet hold most of the variance about the mean: on the demo store
(SmolLM2-135M, resid_post.15, BBC News, 100k tokens; median norm 171) 26 of 94,715 train tokens, all
at positions 1-2 of a context, have norms 4x-152x the median and hold 82% of Sum ||x - E[x]||^2 (they
also triple E||x||^2). Any metric pooled over squared errors (FVU, MSE) is then decided by how well a
dictionary fits those few tokens. Metrics report both (eval/metrics.py); training can leave them out.

DEFAULT_FACTOR, measured on that store: ordinary tokens (position >= 3) stay below 1.9x the median;
tokens at positions 1-2 spread from 2x to 152x. Factors 2 to 10 flag 30 to 22 tokens holding 81.8%
to 81.9% of the variance, so the choice inside that range hardly matters; 4 keeps a 2x margin above
the ordinary tokens (models whose ordinary norms spread wider are not cut) and is far below the
tokens that carry the variance.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from featureatlas.activation_store.errors import ConfigError

DEFAULT_FACTOR = 4.0
"""A token is massive when its norm exceeds DEFAULT_FACTOR x the median token norm (see module docstring)."""

RULE = "||x|| > {factor:g} x median ||x|| of the store's train tokens (BOS excluded)"
"""Human-readable form of the rule, for reports: RULE.format(factor=...)."""


_READ_ROWS = 8192  # rows read at once by store_norm_threshold (bounds memory for wide hooks)


def _check_factor(factor: float) -> None:
    if not np.isfinite(factor) or factor <= 1.0:
        raise ConfigError(f"massive-token factor must be a finite number > 1 (tokens above factor x the median "
                          f"norm), got {factor!r}; the default is {DEFAULT_FACTOR:g}")


def norm_threshold(norms_N, factor: float = DEFAULT_FACTOR) -> float:
    """factor * median(norms_N): the norm above which a token counts as massive (finite norms only)."""
    _check_factor(factor)
    norms = np.asarray(norms_N, np.float64).ravel()
    norms = norms[np.isfinite(norms)]
    if norms.size == 0:
        raise ConfigError("no finite token norms to take the median of; give at least one token "
                          "(harvest more contexts, or use split='all' on a tiny store)")
    return float(factor * np.median(norms))


def massive_mask(norms_N, threshold: float) -> np.ndarray:
    """Boolean [N]: True where the token's norm exceeds `threshold` (from `norm_threshold`)."""
    return np.asarray(norms_N) > threshold


def store_norm_threshold(store, hook: str, *, factor: float = DEFAULT_FACTOR, n_sample: int = 65536,
                         seed: int = 0) -> float:
    """`norm_threshold` of a fixed random sample of up to `n_sample` train rows (BOS excluded) of `hook`.

    `store`: an ActivationStore or the path of one. The sample depends only on (store, seed), so every
    job that asks gets the same threshold. A store without train rows (a tiny one) uses all its rows.
    """
    _check_factor(factor)
    if n_sample < 1:
        raise ConfigError(f"n_sample must be positive, got {n_sample}")
    if isinstance(store, (str, Path)):
        from featureatlas.activation_store.store import ActivationStore

        store = ActivationStore.open(store)
    rows = np.asarray(store.token_rows("train", exclude_bos=True))
    if rows.size == 0:
        rows = np.asarray(store.token_rows("all", exclude_bos=True))
    if rows.size > n_sample:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=n_sample, replace=False))
    norms = [np.linalg.norm(store.read_rows(hook, rows[i:i + _READ_ROWS]), axis=-1)
             for i in range(0, rows.size, _READ_ROWS)]
    return norm_threshold(np.concatenate(norms) if norms else np.zeros(0), factor)
