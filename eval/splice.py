"""Spliced-model metrics: how much of the language model's behaviour a dictionary keeps.

The dictionary's reconstruction replaces the activations at its hook inside the real forward
pass (a `replace` edit), and we compare next-token predictions with the clean model and with
the hook zero-ablated. Over all predicted positions (position t predicts token t+1; both real):

    CE_x          = mean_t  -log p_x(token_{t+1} | tokens_<=t)
    KL_x          = mean_t  Sum_v p_clean(v) (log p_clean(v) - log p_x(v))      (KL(clean || x))
    ce_score      = (CE_zero - CE_spliced) / (CE_zero - CE_clean)
    kl_score      = (KL_zero - KL_spliced) / KL_zero
    delta_lm_loss = CE_spliced - CE_clean

(the "loss recovered" / "CE score" of Bricken et al. 2023 and SAEBench's core evaluation;
1 = as good as the clean model, 0 = as bad as zero ablation). Means are token-weighted over all
contexts. Splicing the reconstruction plus its error term x - x_hat must give the clean model
back: `ce_with_error` is reported as a built-in sanity check.

Transcoders (reading hook_in, writing hook_out) replace hook_out by decode(encode(hook_in)).
Both hooks are met in the same traced forward pass: an identity `replace` at hook_in records
its value, and the `replace` at hook_out reads it. One pass, one compile, no second model call.

By default position 0 (BOS) is left untouched: stores exclude BOS from training
(exclude_bos=True), so its outlier activations are outside every dictionary's training data.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from featureatlas.activation_store.models import replace
from featureatlas.activation_store.models.config import HOOK_KINDS as _SITE_ORDER  # in block order
from featureatlas.eval.adapters import write_hook


def _site_rank(hook: str) -> tuple[int, int]:
    kind, _, layer = hook.partition(".")
    if kind not in _SITE_ORDER or not layer.isdigit():
        raise ValueError(f"hook {hook!r} is not of the form <site>.<layer> with site in {_SITE_ORDER}")
    return int(layer), _SITE_ORDER.index(kind)


def reconstruct_BxTxD(dictionary, x_BxTxD: jax.Array) -> jax.Array:
    """decode(encode(x)) applied token-wise to a [B, T, D] block of activations."""
    B, T, D = x_BxTxD.shape
    x_hat_NxE = dictionary.decode(dictionary.encode(x_BxTxD.reshape(B * T, D)))
    return x_hat_NxE.reshape(B, T, -1).astype(x_BxTxD.dtype)


def splice_fns(dictionary, *, error_term: bool = False) -> tuple[tuple[str, Callable], ...]:
    """(hook, fn) pairs to pass to `replace` so the dictionary's reconstruction replaces its
    output hook. error_term=True adds x - x_hat back (exactly the clean value up to rounding).
    Build once and reuse: each fn object is part of the model's compile key."""
    hook_in, hook_out = dictionary.hook, write_hook(dictionary)
    if hook_out == hook_in:
        def splice(x_BxTxD):
            x_hat = reconstruct_BxTxD(dictionary, x_BxTxD)
            return x_hat + (x_BxTxD - x_hat) if error_term else x_hat

        return ((hook_in, splice),)

    if _site_rank(hook_in) >= _site_rank(hook_out):
        raise ValueError(f"transcoder reads {hook_in} which does not come before {hook_out} in the forward pass")
    seen: dict[str, jax.Array] = {}

    def record(x_BxTxD):
        # Runs while the forward pass is traced; the hook_out fn below runs later in the same trace.
        seen["x_in"] = x_BxTxD
        return x_BxTxD

    def splice_out(y_BxTxD):
        if "x_in" not in seen:
            raise RuntimeError(f"transcoder splice: {hook_in} was not recorded before {hook_out}")
        y_hat = reconstruct_BxTxD(dictionary, seen.pop("x_in"))
        return y_hat + (y_BxTxD - y_hat) if error_term else y_hat

    return ((hook_in, record), (hook_out, splice_out))


@jax.jit
def _loss_sums(logits_clean_BxTxV, logits_BxTxV, tokens_BxT, valid_BxT):
    """(Sum CE of logits, Sum KL(clean || logits)) over valid positions; valid_BxT marks position t
    when both t and t+1 are real tokens (its last column is always False)."""
    logp_clean = jax.nn.log_softmax(logits_clean_BxTxV.astype(jnp.float32), axis=-1)[:, :-1]
    logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)[:, :-1]
    next_BxT = tokens_BxT[:, 1:]
    valid = valid_BxT[:, :-1]
    nll = -jnp.take_along_axis(logp, next_BxT[..., None], axis=-1)[..., 0]
    kl = jnp.sum(jnp.exp(logp_clean) * (logp_clean - logp), axis=-1)
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(jnp.where(valid, kl, 0.0))


def splice_metrics(
    lm,
    dictionary,
    tokens_BxT,
    attention_mask_BxT=None,
    *,
    batch_size: int = 8,
    skip_bos: bool = True,
    error_term: bool = True,
) -> dict:
    """CE / KL of the model with `dictionary` spliced in, vs clean and zero-ablated (formulas in the
    module docstring) over the given contexts. attention_mask: 1 = real token, 0 = padding.

    Returns ce_clean, ce_spliced, ce_zero_ablation, ce_score, delta_lm_loss, kl_spliced, kl_zero,
    kl_score, n_predictions, and with error_term=True also ce_with_error, kl_with_error.
    """
    tokens = np.asarray(tokens_BxT, np.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [n_contexts, T], got shape {tokens.shape}")
    mask = np.ones_like(tokens) if attention_mask_BxT is None else np.asarray(attention_mask_BxT, np.int32)
    if mask.shape != tokens.shape:
        raise ValueError(f"attention mask shape {mask.shape} != tokens shape {tokens.shape}")
    n, T = tokens.shape
    hook_out = write_hook(dictionary)
    positions = np.arange(1, T) if skip_bos else None

    variants = {
        "spliced": tuple(replace(h, fn, positions) for h, fn in splice_fns(dictionary)),
        "zero": (replace(hook_out, jnp.zeros_like, positions),),
    }
    if error_term:
        variants["with_error"] = tuple(replace(h, fn, positions) for h, fn in splice_fns(dictionary, error_term=True))

    sums = {"ce_clean": 0.0, **{f"ce_{v}": 0.0 for v in variants}, **{f"kl_{v}": 0.0 for v in variants}}
    count = 0
    bs = max(1, min(batch_size, n))
    for lo in range(0, n, bs):
        pad = ((0, max(0, lo + bs - n)), (0, 0))  # a fixed batch so nothing recompiles; padded rows count nowhere
        tok_b, mask_b = np.pad(tokens[lo:lo + bs], pad), np.pad(mask[lo:lo + bs], pad)
        valid_b = np.pad((mask_b[:, :-1] > 0) & (mask_b[:, 1:] > 0), ((0, 0), (0, 1)))  # t and t+1 both real
        tok_j, mask_j, valid_j = jnp.asarray(tok_b), jnp.asarray(mask_b), jnp.asarray(valid_b)
        logits_clean, _ = lm.forward(lm.params, tok_j, attention_mask_BxT=mask_j)
        ce, _ = _loss_sums(logits_clean, logits_clean, tok_j, valid_j)
        sums["ce_clean"] += float(ce)
        for name, edits in variants.items():
            logits, _ = lm.forward(lm.params, tok_j, attention_mask_BxT=mask_j, edits=edits)
            ce, kl = _loss_sums(logits_clean, logits, tok_j, valid_j)
            sums[f"ce_{name}"] += float(ce)
            sums[f"kl_{name}"] += float(kl)
        count += int(valid_b.sum())
    if count == 0:
        raise ValueError("no position has a real next token: give contexts with at least 2 real tokens")

    m = {k: v / count for k, v in sums.items()}
    out = {
        "ce_clean": m["ce_clean"],
        "ce_spliced": m["ce_spliced"],
        "ce_zero_ablation": m["ce_zero"],
        "ce_score": _ratio(m["ce_zero"] - m["ce_spliced"], m["ce_zero"] - m["ce_clean"]),
        "delta_lm_loss": m["ce_spliced"] - m["ce_clean"],
        "kl_spliced": m["kl_spliced"],
        "kl_zero": m["kl_zero"],
        "kl_score": _ratio(m["kl_zero"] - m["kl_spliced"], m["kl_zero"]),
        "n_predictions": count,
    }
    if error_term:
        out["ce_with_error"] = m["ce_with_error"]
        out["kl_with_error"] = m["kl_with_error"]
    return out


def _ratio(num: float, den: float) -> float:
    return num / den if den != 0 else float("nan")


def contexts_from_store(store, n_contexts: int, *, split: str = "val", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [n, T] int32, attention_mask [n, T] int32) of up to n_contexts contexts of `split`,
    drawn without replacement with a fixed seed (sorted, so HDF5 reads are in order).
    Padding (right, after n_valid real tokens) is masked out."""
    T = int(store.context_length)
    rows = np.asarray(store.token_rows(split, exclude_bos=False))
    if rows.size == 0:
        raise ValueError(f"store split {split!r} has no tokens; harvest more contexts or use split='all'")
    ctx_ids, n_valid = np.unique(rows // T, return_counts=True)  # a context's rows are its n_valid real tokens
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(ctx_ids.size, size=min(n_contexts, ctx_ids.size), replace=False))
    tokens = np.asarray(store.tokens[ctx_ids[pick]], np.int32)
    mask = (np.arange(T)[None, :] < n_valid[pick][:, None]).astype(np.int32)
    return tokens, mask
