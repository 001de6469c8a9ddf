"""Autoregressive generation with a KV cache, edits applied at every position.

The prompt batch is left-padded, so every row's next token goes into the same cache slot:
slot T0 + i holds the i-th generated token's keys/values for all rows, and the key mask
(prompt mask, then ones) hides padding. Positions still come from the mask, so each row
computes exactly what it would compute alone. The whole loop (prefill + lax.while_loop over
steps) is one jitted function per static structure.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .config import ModelConfig
from .transformer import Sites, attention, logits_from_resid, make_site, position_ids, run_layers, self_attention_mask


@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy (argmax). Otherwise sample from softmax(logits / temperature)
    restricted to the top_k tokens and/or the smallest set whose probability reaches top_p
    (nucleus sampling, Holtzman et al. 2020)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be None or >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be None or in (0, 1], got {self.top_p}")


class GenPlan(NamedTuple):
    """Static structure of one generate call (part of the compile key)."""

    sites: Sites
    max_new: int
    greedy: bool
    top_k: int | None
    use_top_p: bool
    stop_at_eos: bool
    eos_id: int
    fill_id: int
    return_logits: bool


def sample_token(logits_BxV, key, temperature, top_p, *, greedy: bool, top_k: int | None, use_top_p: bool):
    """Next token per row. top_k and top_p filter logits to -inf before the categorical draw."""
    if greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    z_BxV = logits_BxV / temperature
    if top_k is not None:
        kth_Bx1 = jax.lax.top_k(z_BxV, top_k)[0][:, -1:]
        z_BxV = jnp.where(z_BxV < kth_Bx1, -jnp.inf, z_BxV)
    if use_top_p:
        sorted_BxV = jnp.sort(z_BxV, axis=-1)[:, ::-1]
        p_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        # keep a token if the mass strictly before it is < top_p (the first token always survives)
        keep_BxV = (jnp.cumsum(p_BxV, axis=-1) - p_BxV) < top_p
        cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        z_BxV = jnp.where(z_BxV < cutoff_Bx1, -jnp.inf, z_BxV)
    return jax.random.categorical(key, z_BxV, axis=-1).astype(jnp.int32)


def generate_core(cfg: ModelConfig, plan: GenPlan, params, prompt_BxT, mask_BxT, edit_args,
                  key, temperature, top_p):
    """Returns (tokens [B, max_new], logits [B, max_new, V] or None); logits[:, i] is what token i
    was chosen from. Rows that hit EOS (when stop_at_eos) are filled with `fill_id` afterwards."""
    B, T0 = prompt_BxT.shape
    S = T0 + plan.max_new
    pick = lambda logits, i: sample_token(  # noqa: E731
        logits, jax.random.fold_in(key, i), temperature, top_p,
        greedy=plan.greedy, top_k=plan.top_k, use_top_p=plan.use_top_p)

    # Prefill: the ordinary forward pass over the prompt, keeping each layer's k, v.
    pos_BxT = position_ids(mask_BxT)
    keep_BxTxT = self_attention_mask(mask_BxT)
    site, _ = make_site(plan.sites, edit_args, pos_BxT)
    kv: list = []

    def attend_prefill(layer, q, k, v):
        kv.append((k, v))
        return attention(q, k, v, keep_BxTxT)

    x_BxTxD = run_layers(cfg, params, prompt_BxT, pos_BxT, site, attend_prefill, cfg.n_layers)
    logits_BxV = logits_from_resid(cfg, params, x_BxTxD[:, -1])
    pad = lambda a: jnp.pad(a, ((0, 0), (0, plan.max_new), (0, 0), (0, 0)))  # noqa: E731
    cache = [(pad(k), pad(v)) for k, v in kv]
    key_valid_BxS = jnp.concatenate([mask_BxT.astype(bool), jnp.ones((B, plan.max_new), bool)], axis=1)
    n_real_B = jnp.sum(mask_BxT.astype(jnp.int32), axis=1)

    tok_B = pick(logits_BxV, 0)
    out_BxN = jnp.full((B, plan.max_new), plan.fill_id, jnp.int32).at[:, 0].set(tok_B)
    logits_buf = (jnp.zeros((B, plan.max_new, logits_BxV.shape[-1]), jnp.float32).at[:, 0].set(logits_BxV)
                  if plan.return_logits else None)
    done_B = (tok_B == plan.eos_id) & plan.stop_at_eos

    def step(carry):
        i, tok_B, cache, out_BxN, logits_buf, done_B = carry
        slot = T0 + i - 1  # cache slot of the token we feed now (generated token i - 1)
        pos_Bx1 = (n_real_B + i - 1)[:, None]
        keep_Bx1xS = (key_valid_BxS & (jnp.arange(S) <= slot)[None])[:, None, :]
        site, _ = make_site(plan.sites, edit_args, pos_Bx1)
        new_cache = []

        def attend_step(layer, q, k, v):
            k_cache, v_cache = cache[layer]
            k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k, slot, axis=1)
            v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v, slot, axis=1)
            new_cache.append((k_cache, v_cache))
            return attention(q, k_cache, v_cache, keep_Bx1xS)

        x_Bx1xD = run_layers(cfg, params, tok_B[:, None], pos_Bx1, site, attend_step, cfg.n_layers)
        logits_BxV = logits_from_resid(cfg, params, x_Bx1xD[:, 0])
        new_B = jnp.where(done_B, plan.fill_id, pick(logits_BxV, i))
        out_BxN = jax.lax.dynamic_update_slice_in_dim(out_BxN, new_B[:, None], i, axis=1)
        if logits_buf is not None:
            logits_buf = jax.lax.dynamic_update_slice_in_dim(logits_buf, logits_BxV[:, None], i, axis=1)
        done_B = done_B | ((new_B == plan.eos_id) & plan.stop_at_eos)
        return i + 1, new_B, new_cache, out_BxN, logits_buf, done_B

    def more(carry):
        i, *_, done_B = carry
        return (i < plan.max_new) & ~jnp.all(done_B)

    carry = (jnp.int32(1), tok_B, cache, out_BxN, logits_buf, done_B)
    _, _, _, out_BxN, logits_buf, _ = jax.lax.while_loop(more, step, carry)
    return out_BxN, logits_buf
