"""The decoder-only transformer skeleton shared by every architecture, with hook sites.

A pre-norm block (what both GPT-2 and Llama compute), with the six hook sites in order:
  resid_pre  = x
  attn_out   = Attn(norm1(x))                      resid_mid  = x + attn_out
  mlp_hidden = act(norm2(resid_mid) W_in)          mlp_out    = mlp_hidden W_down
  resid_post = resid_mid + mlp_out                 (= resid_pre of the next layer)
The architecture module (llama.py / gpt2.py) supplies norms, projections and positions.

Compute dtype: every function here follows the dtype of its inputs, so the one code path runs in
float32 (the default) or, given bfloat16 params, in bfloat16 the way Hugging Face transformers runs a
bfloat16 model: weights, activations and matmul outputs bfloat16 (the matmuls themselves accumulate in
float32 on every backend), while the statistics of RMSNorm/LayerNorm and the attention softmax are
computed in float32 and cast back (transformers' LlamaRMSNorm and eager attention do the same).
`forward(..., compute_dtype)` casts the params (a no-op when they already have that dtype) and returns
captured hooks and logits as float32, so callers never see bfloat16. In float32 every cast below is the
identity and the computation is exactly what it was before the dtype existed.

Padding: positions come from the attention mask (pos = cumsum(mask) - 1), so a left- or
right-padded row computes exactly what the unpadded sequence computes; padded keys are
masked out. Each query may always attend to itself, so padded rows stay finite (their values
are meaningless but never NaN, and no real token ever reads them).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from . import gpt2, llama
from .config import ModelConfig
from .edits import apply_edit

ARCHS = {"llama": llama, "gpt2": gpt2}

COMPUTE_DTYPES = ("float32", "bfloat16")
"""Forward-pass compute dtypes (`forward(..., compute_dtype)`); float32 is the default everywhere."""

JIT_OPTIONS = {"float32": {}, "bfloat16": {"compiler_options": {"xla_allow_excess_precision": False}}}
"""jax.jit options per compute dtype. XLA may otherwise keep a fused chain of bfloat16 ops in float32 and
round only its end (e.g. the residual add feeding RMSNorm); with excess precision off every op rounds
where the program says, as torch does op by op. Measured on SmolLM2-135M (tests/test_bf16_forward.py):
layer 0 then equals transformers' bfloat16 forward to ~1e-4 relative instead of ~4e-3 (the size of
bfloat16 rounding itself), and the numbers no longer depend on the backend's fusion decisions."""


def cast_params(params, compute_dtype: str):
    """The params pytree in the compute dtype (arrays already in it are returned as they are)."""
    dtype = jnp.dtype(compute_dtype)
    return jax.tree.map(lambda a: a if a.dtype == dtype else a.astype(dtype), params)


def position_ids(mask_BxT):
    """Token position counted from the first real token: cumsum(mask) - 1 (0 on left padding)."""
    return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=1) - 1, 0)


def self_attention_mask(mask_BxT):
    """[B, T, S] keep-mask: causal, real keys only, plus the diagonal (keeps pad rows finite)."""
    T = mask_BxT.shape[1]
    causal_TxS = jnp.tril(jnp.ones((T, T), bool))
    return causal_TxS[None] & (mask_BxT.astype(bool)[:, None, :] | jnp.eye(T, dtype=bool)[None])


def attention(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, keep_BxTxS):
    """softmax(q kᵀ / sqrt(E)) v per head (Vaswani et al. 2017), grouped-query: query head h
    reads key/value head h // (H/K) (Ainslie et al. 2023) without materialising repeated keys.
    Scores and mixing run in q's dtype; the softmax runs in float32 and its weights are cast back
    (transformers' eager attention: softmax(..., dtype=float32).to(query.dtype))."""
    B, T, H, E = q_BxTxHxE.shape
    S, K = k_BxSxKxE.shape[1], k_BxSxKxE.shape[2]
    G = H // K
    # Fold each kv head's G query heads and the T queries into one row axis: XLA's CPU backend
    # runs B·K matmuls of (T·G × E)·(E × S) about twice as fast as B·K·G of (T × E)·(E × S).
    q_BKxTGxE = (q_BxTxHxE * (E**-0.5)).reshape(B, T, K, G, E).transpose(0, 2, 1, 3, 4).reshape(B * K, T * G, E)
    k_BKxSxE = k_BxSxKxE.transpose(0, 2, 1, 3).reshape(B * K, S, E)
    v_BKxSxE = v_BxSxKxE.transpose(0, 2, 1, 3).reshape(B * K, S, E)
    s_BxKxTxGxS = jnp.einsum("nqe,nse->nqs", q_BKxTGxE, k_BKxSxE).reshape(B, K, T, G, S)
    s_BxKxTxGxS = jnp.where(keep_BxTxS[:, None, :, None, :], s_BxKxTxGxS, -jnp.inf)
    w_BKxTGxS = jax.nn.softmax(s_BxKxTxGxS.astype(jnp.float32), axis=-1).astype(q_BxTxHxE.dtype)
    w_BKxTGxS = w_BKxTGxS.reshape(B * K, T * G, S)
    o_BxKxTxGxE = jnp.einsum("nqs,nse->nqe", w_BKxTGxS, v_BKxSxE).reshape(B, K, T, G, E)
    return o_BxKxTxGxE.transpose(0, 2, 1, 3, 4).reshape(B, T, H * E)


class Sites(NamedTuple):
    """Static description of what happens at hook sites: which hooks to capture and which edits
    (their static keys, in order) to apply. Hashable: part of every compile key."""

    capture: tuple[str, ...]
    edits: tuple[tuple, ...]  # Edit.static_key() = (hook, kind, fn, n_positions)


def make_site(sites: Sites, edit_args: list[dict], pos_BxT):
    """Returns (site, captured): site(layer, kind, x) applies this hook's edits, records x if
    captured, and returns the (edited) value."""
    captured: dict[str, jax.Array] = {}

    def site(layer: int, kind: str, x):
        name = f"{kind}.{layer}"
        for (hook, ekind, fn, _), args in zip(sites.edits, edit_args):
            if hook == name:
                # edit vectors are float32: round the edited value back to the stream's dtype
                x = apply_edit(ekind, fn, args, x, pos_BxT).astype(x.dtype)
        if name in sites.capture:
            captured[name] = x
        return x

    return site, captured


def block(arch, cfg: ModelConfig, p: dict, layer: int, x_BxTxD, ctx, site: Callable, attend: Callable):
    """One pre-norm transformer layer; `attend(layer, q, k, v)` does the attention (plain or
    through a KV cache)."""
    x_BxTxD = site(layer, "resid_pre", x_BxTxD)
    q, k, v = arch.qkv(p, cfg, arch.attn_norm(p, cfg, x_BxTxD), ctx)
    a_BxTxD = site(layer, "attn_out", arch.attn_proj(p, attend(layer, q, k, v)))
    x_BxTxD = site(layer, "resid_mid", x_BxTxD + a_BxTxD)
    m_BxTxF = site(layer, "mlp_hidden", arch.mlp_hidden(p, cfg, arch.mlp_norm(p, cfg, x_BxTxD)))
    o_BxTxD = site(layer, "mlp_out", arch.mlp_proj(p, m_BxTxF))
    return site(layer, "resid_post", x_BxTxD + o_BxTxD)


def run_layers(cfg: ModelConfig, params, tokens_BxT, pos_BxT, site, attend, n_layers: int):
    """Embedding then the first n_layers blocks; returns the residual stream after them."""
    arch = ARCHS[cfg.arch]
    ctx = arch.position_context(cfg, pos_BxT)
    x_BxTxD = arch.embed(params, cfg, tokens_BxT, pos_BxT)
    for layer in range(n_layers):
        x_BxTxD = block(arch, cfg, params["layers"][layer], layer, x_BxTxD, ctx, site, attend)
    return x_BxTxD


def unembed_matrix_DxV(params):
    return params["unembed"] if "unembed" in params else params["embed"].T


def logits_from_resid(cfg: ModelConfig, params, x_BxTxD):
    """final norm, then W_U. Tied models contract against the embedding directly (no transpose copy)."""
    h_BxTxD = ARCHS[cfg.arch].final_norm(params, cfg, x_BxTxD)
    if "unembed" in params:
        return h_BxTxD @ params["unembed"]
    return jnp.einsum("...d,vd->...v", h_BxTxD, params["embed"])


def forward(cfg: ModelConfig, sites: Sites, n_layers: int, want_logits: bool,
            params, tokens_BxT, mask_BxT, edit_args, compute_dtype: str = "float32"):
    """The whole forward pass as one pure function (jitted by LanguageModel per static structure).
    Runs in `compute_dtype` (see the module docstring); logits and captured hooks come back float32."""
    params = cast_params(params, compute_dtype)
    pos_BxT = position_ids(mask_BxT)
    keep_BxTxS = self_attention_mask(mask_BxT)
    site, captured = make_site(sites, edit_args, pos_BxT)
    x_BxTxD = run_layers(cfg, params, tokens_BxT, pos_BxT, site,
                         lambda layer, q, k, v: attention(q, k, v, keep_BxTxS), n_layers)
    logits = logits_from_resid(cfg, params, x_BxTxD).astype(jnp.float32) if want_logits else None
    return logits, {h: a.astype(jnp.float32) for h, a in captured.items()}
