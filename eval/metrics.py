"""Reconstruction metrics for any Dictionary: the one place these formulas live.

Everything is computed by an exact streaming accumulator, so a metric over many
batches equals the metric over their concatenation (up to float rounding):

    stats = init(d, F)
    for x_NxD, x_hat_NxD, codes_NxF in ...:
        stats = update(stats, x_NxD, x_hat_NxD, codes_NxF)
    metrics = finalize(stats)

Per batch, a jitted reduction turns the (possibly large) device arrays into a
few sums (vectors of length d and F at most); the running totals are kept on
the host in float64 / int64, so precision does not degrade with the number of
tokens. Definitions follow the SAE literature (Bricken et al. 2023 "Towards
Monosemanticity"; Gao et al. 2024 "Scaling and evaluating sparse autoencoders";
SAEBench, Karvonen et al. 2025), with the variance taken about the mean, not
about zero (see `finalize`).
"""
from __future__ import annotations

import itertools
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

# log10(density) histogram edges: 1e-8 .. 1 in quarter decades. A latent that
# fires is counted in the bin of log10(density), clipped into [-8, 0]; latents
# that never fired are reported separately as `n_dead`.
LOG10_DENSITY_EDGES = np.linspace(-8.0, 0.0, 33)

# Guards the per-token ratios cos(x, x_hat) and ||x_hat|| / ||x|| against x = 0.
_NORM_EPS = 1e-12

# The running float totals that each batch adds to (`_batch_sums` computes them).
_SUMS = ("sse", "kept_sse", "sum_rel_err", "sum_sq_x", "sum_cos", "sum_norm_ratio", "sum_l0", "sum_l1")


def init(d: int, n_features: int, massive_threshold: float | None = None) -> dict:
    """Empty running totals for inputs of width `d` and `n_features` latents.

    massive_threshold: tokens whose target norm ||x|| exceeds it are "massive"
    (activation_store/massive.py); they count in every metric and are additionally
    left out of the `*_excl_massive` ones. None: no token is massive.
    """
    return {
        "n": 0,
        "mean_D": np.zeros(d, np.float64),
        "m2": 0.0,
        "massive_threshold": massive_threshold,
        "n_kept": 0,
        "kept_mean_D": np.zeros(d, np.float64),
        "kept_m2": 0.0,
        **dict.fromkeys(_SUMS, 0.0),
        "fires_F": np.zeros(n_features, np.int64),
    }


@jax.jit
def _batch_sums(x_NxD: jax.Array, x_hat_NxD: jax.Array, codes_NxF: jax.Array, threshold: jax.Array) -> dict:
    """Per-batch sums. m2 is taken about the batch's own mean so the float32
    sum stays well conditioned even when ||E[x]|| >> spread (residual streams);
    the kept_* sums are the same over the tokens with ||x|| <= threshold."""
    x = x_NxD.astype(jnp.float32)
    x_hat = x_hat_NxD.astype(jnp.float32)
    codes = codes_NxF.astype(jnp.float32)
    mean_D = jnp.mean(x, axis=0)
    err_sq_N = jnp.sum(jnp.square(x - x_hat), axis=-1)
    norm_x = jnp.linalg.norm(x, axis=-1)
    norm_hat = jnp.linalg.norm(x_hat, axis=-1)
    keep_N = (norm_x <= threshold).astype(jnp.float32)
    n_kept = jnp.sum(keep_N)
    kept_mean_D = jnp.sum(x * keep_N[:, None], axis=0) / jnp.maximum(n_kept, 1.0)
    fires = codes != 0
    return {
        "mean_D": mean_D,
        "m2": jnp.sum(jnp.square(x - mean_D)),
        "sse": jnp.sum(err_sq_N),
        "n_kept": n_kept,
        "kept_mean_D": kept_mean_D,
        "kept_m2": jnp.sum(keep_N * jnp.sum(jnp.square(x - kept_mean_D), axis=-1)),
        "kept_sse": jnp.sum(keep_N * err_sq_N),
        "sum_rel_err": jnp.sum(err_sq_N / jnp.maximum(jnp.square(norm_x), _NORM_EPS)),
        "sum_sq_x": jnp.sum(jnp.square(x)),
        "sum_cos": jnp.sum(jnp.sum(x * x_hat, axis=-1) / jnp.maximum(norm_x * norm_hat, _NORM_EPS)),
        "sum_norm_ratio": jnp.sum(norm_hat / jnp.maximum(norm_x, _NORM_EPS)),
        "sum_l0": jnp.sum(fires, dtype=jnp.float32),
        "sum_l1": jnp.sum(jnp.abs(codes)),
        "fires_F": jnp.sum(fires, axis=0, dtype=jnp.int32),
    }


def _merge_moments(n_a: int, mean_a, m2_a: float, n_b: int, mean_b, m2_b: float) -> tuple[np.ndarray, float]:
    """(mean, M2) of the union of two sets from their counts, means and sums of squared deviations
    (Chan, Golub & LeVeque 1979): delta = mean_b - mean_a,
    mean = mean_a + delta n_b / n,  M2 = M2_a + M2_b + ||delta||^2 n_a n_b / n,  n = n_a + n_b."""
    n = n_a + n_b
    if n_b == 0:
        return mean_a, m2_a
    mean_b = np.asarray(mean_b, np.float64)
    delta = mean_b - mean_a
    return mean_a + delta * (n_b / n), m2_a + float(m2_b) + float(delta @ delta) * n_a * n_b / n


def update(stats: dict, x_NxD, x_hat_NxD, codes_NxF) -> dict:
    """Fold one batch into the running totals (returns a new dict).

    x_NxD: the target (the input for an autoencoder, the output hook's
    activations for a transcoder); x_hat_NxD: the reconstruction; codes_NxF:
    the latent activations (a latent "fires" on a token when its code != 0).

    Mean and sum of squared deviations are merged with Chan, Golub & LeVeque's
    (1979) pairwise update (`_merge_moments`), once over all tokens and once
    over the non-massive ones. This is Sum ||x - E[x]||^2 over all tokens seen,
    exactly, without the cancellation of Sum ||x||^2 - n ||E[x]||^2.
    """
    n_b = int(x_NxD.shape[0])
    if x_hat_NxD.shape != x_NxD.shape:
        raise ValueError(f"x_hat shape {tuple(x_hat_NxD.shape)} != x shape {tuple(x_NxD.shape)}")
    if codes_NxF.shape[0] != n_b or codes_NxF.shape[1] != stats["fires_F"].shape[0]:
        raise ValueError(
            f"codes shape {tuple(codes_NxF.shape)} does not match {n_b} tokens x "
            f"{stats['fires_F'].shape[0]} features given to init()"
        )
    if x_NxD.shape[1] != stats["mean_D"].shape[0]:
        raise ValueError(f"x has width {x_NxD.shape[1]}, init() was given d={stats['mean_D'].shape[0]}")
    if n_b == 0:
        return dict(stats)
    threshold = stats["massive_threshold"]
    threshold = np.float32(np.inf if threshold is None else threshold)
    b = jax.device_get(_batch_sums(x_NxD, x_hat_NxD, codes_NxF, threshold))
    out = dict(stats)
    out["n"] = stats["n"] + n_b
    out["mean_D"], out["m2"] = _merge_moments(stats["n"], stats["mean_D"], stats["m2"], n_b, b["mean_D"], b["m2"])
    n_kept_b = int(round(float(b["n_kept"])))
    out["n_kept"] = stats["n_kept"] + n_kept_b
    out["kept_mean_D"], out["kept_m2"] = _merge_moments(stats["n_kept"], stats["kept_mean_D"], stats["kept_m2"],
                                                        n_kept_b, b["kept_mean_D"], b["kept_m2"])
    out["fires_F"] = stats["fires_F"] + np.asarray(b["fires_F"], np.int64)
    for key in _SUMS:
        out[key] = stats[key] + float(b[key])
    return out


def density_histogram(density_F: np.ndarray, edges: np.ndarray = LOG10_DENSITY_EDGES) -> dict:
    """Histogram of log10(density) over latents that fired at least once.

    Densities below 10**edges[0] go in the first bin; dead latents (density 0)
    are not in any bin but counted in `n_dead`.
    """
    density_F = np.asarray(density_F, np.float64)
    alive = density_F > 0
    logd = np.clip(np.log10(density_F[alive]), edges[0], edges[-1])
    counts, _ = np.histogram(logd, bins=edges)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts], "n_dead": int((~alive).sum())}


def _fvu(sse: float, m2: float) -> float:
    return sse / m2 if m2 > 0 else float("nan")


def finalize(stats: dict) -> dict:
    """Metrics from the running totals. With N tokens of width d:

    mse                 = (1/N) Sum_n ||x_n - x_hat_n||^2 / d   (per element, as in SAELens/sparsify)
    mse_per_token_sum   = (1/N) Sum_n ||x_n - x_hat_n||^2       (summed over d)
    explained_variance  = 1 - Sum ||x - x_hat||^2 / Sum ||x - E[x]||^2
                          (variance about the mean, not about zero; E[x] over all N tokens)
    fvu                 = 1 - explained_variance  (fraction of variance unexplained, all tokens)
    fvu_excl_massive    = the same over the tokens with ||x_n|| <= massive_threshold only (their own
                          mean); n_massive tokens were left out (the rule is
                          activation_store/massive.py; evaluate_dictionary reports it as massive_rule). A few massive-norm tokens can hold most of
                          Sum ||x - E[x]||^2, and then decide `fvu` alone.
    explained_variance_excl_massive = 1 - fvu_excl_massive
    rel_err_per_token   = (1/N) Sum_n ||x_n - x_hat_n||^2 / ||x_n||^2   (all tokens, each weighs 1/N,
                          so no token can dominate; about zero, not about the mean)
    l0                  = (1/N) Sum_n #{i : c_ni != 0}
    l1                  = (1/N) Sum_n Sum_i |c_ni|
    cosine              = (1/N) Sum_n <x_n, x_hat_n> / (||x_n|| ||x_hat_n||)
    norm_ratio          = (1/N) Sum_n ||x_hat_n|| / ||x_n||
    density_F[i]        = (1/N) #{n : c_ni != 0}
    dead_frac           = fraction of latents with density 0 in this window
    frac_density_gt_1pct, frac_density_gt_10pct = fraction of latents with density > 0.01, > 0.1
    log10_density_hist  = see `density_histogram`

    Scalars are Python floats (massive_threshold is None when init() had none); density_F is a numpy
    array (drop it with `scalars()` before writing JSON).
    """
    n = stats["n"]
    if n == 0:
        raise ValueError("no tokens were accumulated: call update() with at least one batch before finalize()")
    d = stats["mean_D"].shape[0]
    density_F = stats["fires_F"] / n
    fvu = _fvu(stats["sse"], stats["m2"])
    fvu_excl = _fvu(stats["kept_sse"], stats["kept_m2"])
    return {
        "n_tokens": int(n),
        "mse": stats["sse"] / (n * d),
        "mse_per_token_sum": stats["sse"] / n,
        "explained_variance": 1.0 - fvu,
        "fvu": fvu,
        "fvu_excl_massive": fvu_excl,
        "explained_variance_excl_massive": 1.0 - fvu_excl,
        "n_massive": int(n - stats["n_kept"]),
        "massive_threshold": stats["massive_threshold"],
        "rel_err_per_token": stats["sum_rel_err"] / n,
        "l0": stats["sum_l0"] / n,
        "l1": stats["sum_l1"] / n,
        "cosine": stats["sum_cos"] / n,
        "norm_ratio": stats["sum_norm_ratio"] / n,
        "dead_frac": float(np.mean(density_F == 0)),
        "frac_density_gt_1pct": float(np.mean(density_F > 0.01)),
        "frac_density_gt_10pct": float(np.mean(density_F > 0.10)),
        "log10_density_hist": density_histogram(density_F),
        "density_F": density_F,
    }


def scalars(metrics: dict) -> dict:
    """The JSON-writable part of a metrics dict: everything but per-latent arrays."""
    return {k: v for k, v in metrics.items() if not isinstance(v, (np.ndarray, jax.Array))}


def evaluate_reconstruction(
    dictionary,
    batches_iter: Iterable,
    n_batches: int | None = None,
    target_hook_batches: Iterable | None = None,
    massive_threshold: float | None = None,
) -> dict:
    """Reconstruction metrics of `dictionary` over `n_batches` batches [N, d_in].

    For an autoencoder the target is the input itself. For a transcoder
    (reads hook_in, writes hook_out) pass `target_hook_batches`, an iterator of
    the hook_out activations for the same tokens in the same order; the
    metrics then compare decode(encode(x_in)) with x_out. n_batches=None
    consumes the (finite) iterator to its end. Targets with norm above
    `massive_threshold` are left out of the *_excl_massive metrics (see `init`).
    """
    targets: Iterator | None = None if target_hook_batches is None else iter(target_hook_batches)
    stats = None
    for i, x_NxD in enumerate(itertools.islice(batches_iter, n_batches)):  # islice(it, None): to the end
        x_NxD = jnp.asarray(x_NxD)
        codes_NxF = dictionary.encode(x_NxD)
        x_hat_NxD = dictionary.decode(codes_NxF)
        y_NxD = x_NxD
        if targets is not None:
            y_NxD = next(targets, None)
            if y_NxD is None:
                raise ValueError(f"target_hook_batches ran out after {i} batches; it must align with batches_iter")
            y_NxD = jnp.asarray(y_NxD)
            if y_NxD.shape[0] != x_NxD.shape[0]:
                raise ValueError(f"target batch {i} has {y_NxD.shape[0]} rows, input batch has {x_NxD.shape[0]}")
        if stats is None:
            stats = init(y_NxD.shape[1], codes_NxF.shape[1], massive_threshold)
        stats = update(stats, y_NxD, x_hat_NxD, codes_NxF)
    if stats is None:
        raise ValueError("batches_iter yielded no batches")
    return finalize(stats)


def _take_rows(chunks: Iterable, n_rows: int) -> Iterator:
    """The first n_rows rows of a stream of [<=B, d] arrays, the last chunk cut to fit."""
    left = n_rows
    for chunk in chunks:
        if left <= 0:
            return
        yield chunk[:left]
        left -= chunk.shape[0]


_THRESHOLDS: dict[tuple, float] = {}


def _store_threshold(store, hook: str, factor: float) -> float:
    """massive.store_norm_threshold, remembered per (store file, committed contexts, hook, factor): a
    training run evaluates every few hundred steps and the sample read would cost each time."""
    from featureatlas.activation_store import massive

    key = (str(store.path), int(store.n_committed), hook, float(factor))
    if key not in _THRESHOLDS:
        _THRESHOLDS[key] = massive.store_norm_threshold(store, hook, factor=factor)
    return _THRESHOLDS[key]


def evaluate_dictionary(
    dictionary,
    store,
    *,
    lm=None,
    n_tokens: int = 20_000,
    n_contexts_ce: int = 32,
    split: str = "val",
    batch_size: int = 4096,
    ce_batch_size: int = 8,
    seed: int = 0,
    error_term: bool = True,
    massive_threshold: float | None = None,
    massive_factor: float | None = None,
) -> dict:
    """Reconstruction metrics over the first `n_tokens` non-BOS tokens of `split` (store order), plus
    the spliced CE/KL metrics (eval/splice.py) on `n_contexts_ce` contexts of `split` when `lm` is given.

    Transcoders (a `hook_out` different from `hook`) are scored against the store's hook_out
    activations of the same tokens. error_term=True also splices x_hat + (x - x_hat) (reported as
    ce_with_error, which must equal ce_clean; costs one more forward pass per batch).

    Massive tokens (activation_store/massive.py): a target with ||x|| > massive_threshold; by default
    the threshold is massive_factor (default massive.DEFAULT_FACTOR) x the median target norm of the
    store's train split (`store_norm_threshold`; pass the threshold to skip reading that sample on
    repeated evaluations). The rule, threshold and count excluded are reported with the metrics.
    Returns one flat dict; `scalars()` drops density_F so the rest is JSON-writable.
    """
    from featureatlas.activation_store import massive
    from featureatlas.eval.adapters import write_hook
    from featureatlas.eval.splice import contexts_from_store, splice_metrics

    hook_in, hook_out = dictionary.hook, write_hook(dictionary)
    for hook in {hook_in, hook_out}:
        if hook not in store.hooks:
            raise ValueError(f"store {store.path} has no hook {hook!r} (it has {', '.join(store.hooks)}); "
                             "harvest it or evaluate on another store")
    if store.token_rows(split).size == 0:
        raise ValueError(f"split {split!r} of store {store.path} has no tokens; use split='all' or a larger store")
    inputs = _take_rows(store.iter_chunks(hook_in, batch_size, split=split, exclude_bos=True), n_tokens)
    targets = None
    if hook_out != hook_in:
        targets = _take_rows(store.iter_chunks(hook_out, batch_size, split=split, exclude_bos=True), n_tokens)
    factor = massive.DEFAULT_FACTOR if massive_factor is None else massive_factor
    if massive_threshold is None:
        massive_threshold = _store_threshold(store, hook_out, factor)
        rule = massive.RULE.format(factor=factor)
    else:
        rule = f"||x|| > {massive_threshold:g} (a given threshold)"
    out = {"hook": hook_in, "hook_out": hook_out, "split": split}
    out.update(evaluate_reconstruction(dictionary, inputs, None, target_hook_batches=targets,
                                       massive_threshold=massive_threshold))
    out["massive_rule"] = rule
    if lm is not None:
        if store.weights_hash and lm.weights_hash and store.weights_hash != lm.weights_hash:
            raise ValueError(f"store {store.path} was harvested from {store.model_id!r} (weights {store.weights_hash}), "
                             f"but lm is {lm.model_id!r} (weights {lm.weights_hash}); splice with the same model")
        tokens, mask = contexts_from_store(store, n_contexts_ce, split=split, seed=seed)
        out.update(splice_metrics(lm, dictionary, tokens, mask, batch_size=ce_batch_size, error_term=error_term))
    return out
