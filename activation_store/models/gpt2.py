"""GPT-2 blocks (Radford et al. 2019): LayerNorm, learned absolute positions, multi-head
attention, GELU MLP (tanh approximation, "gelu_new"), tied unembedding.

Internal layout (identical to HF's Conv1D [in, out], so conversion is a rename):
  embed [V, D], pos_embed [P, D], ln_f_w / ln_f_b [D]
  layers[i]: ln1_w, ln1_b [D], w_qkv [D, 3D], b_qkv [3D], w_o [D, D], b_o [D],
             ln2_w, ln2_b [D], w_up [D, F], b_up [F], w_down [F, D], b_down [D]
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig

# HF name (within block h.{i}.) -> internal name
_LAYER_NAMES = {
    "ln_1.weight": "ln1_w", "ln_1.bias": "ln1_b",
    "attn.c_attn.weight": "w_qkv", "attn.c_attn.bias": "b_qkv",
    "attn.c_proj.weight": "w_o", "attn.c_proj.bias": "b_o",
    "ln_2.weight": "ln2_w", "ln_2.bias": "ln2_b",
    "mlp.c_fc.weight": "w_up", "mlp.c_fc.bias": "b_up",
    "mlp.c_proj.weight": "w_down", "mlp.c_proj.bias": "b_down",
}
_TOP_NAMES = {"wte.weight": "embed", "wpe.weight": "pos_embed", "ln_f.weight": "ln_f_w", "ln_f.bias": "ln_f_b"}


def layer_norm(x, w_D, b_D, eps: float):
    """(x - mean) / sqrt(var + eps) · w + b (Ba et al. 2016), computed in float32 and cast to x's dtype
    once at the end (what torch's layer_norm does for bfloat16 input)."""
    x32 = x.astype(jnp.float32)
    mu = jnp.mean(x32, axis=-1, keepdims=True)
    xc = x32 - mu
    y = xc * jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps) * w_D + b_D
    return y.astype(x.dtype)


def position_context(cfg: ModelConfig, pos_BxT):
    return None  # positions enter once, at the embedding


def embed(params, cfg: ModelConfig, tokens_BxT, pos_BxT):
    return params["embed"][tokens_BxT] + params["pos_embed"][pos_BxT]


def attn_norm(p, cfg: ModelConfig, x):
    return layer_norm(x, p["ln1_w"], p["ln1_b"], cfg.norm_eps)


def mlp_norm(p, cfg: ModelConfig, x):
    return layer_norm(x, p["ln2_w"], p["ln2_b"], cfg.norm_eps)


def final_norm(params, cfg: ModelConfig, x):
    return layer_norm(x, params["ln_f_w"], params["ln_f_b"], cfg.norm_eps)


def qkv(p, cfg: ModelConfig, h_BxTxD, ctx):
    B, T, _ = h_BxTxD.shape
    H, E = cfg.n_heads, cfg.head_dim
    qkv_BxTxN = h_BxTxD @ p["w_qkv"] + p["b_qkv"]
    return tuple(x.reshape(B, T, H, E) for x in jnp.split(qkv_BxTxN, 3, axis=-1))  # q, k, v


def attn_proj(p, o_BxTxHE):
    return o_BxTxHE @ p["w_o"] + p["b_o"]


def mlp_hidden(p, cfg: ModelConfig, h_BxTxD):
    """gelu_new(h W_up + b_up): 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z³))) (Hendrycks & Gimpel 2016),
    computed in float32 and rounded once to h's dtype (transformers' gelu_new rounds after every op in
    bfloat16, its fused GELUTanh once, as here)."""
    z = h_BxTxD @ p["w_up"] + p["b_up"]
    return jax.nn.gelu(z.astype(jnp.float32), approximate=True).astype(z.dtype)


def mlp_proj(p, m_BxTxF):
    return m_BxTxF @ p["w_down"] + p["b_down"]


# ---- Hugging Face naming ------------------------------------------------------------------

def hf_spec(cfg: ModelConfig) -> dict:
    """HF tensor name -> (shape, init role); role is 'embed', 'norm', 'bias' or the fan-in."""
    D, F, V = cfg.d_model, cfg.d_mlp, cfg.vocab_size
    spec = {"wte.weight": ((V, D), "embed"), "wpe.weight": ((cfg.max_ctx, D), "embed"),
            "ln_f.weight": ((D,), "norm"), "ln_f.bias": ((D,), "bias")}
    shapes = {
        "ln_1.weight": ((D,), "norm"), "ln_1.bias": ((D,), "bias"),
        "attn.c_attn.weight": ((D, 3 * D), D), "attn.c_attn.bias": ((3 * D,), "bias"),
        "attn.c_proj.weight": ((D, D), D), "attn.c_proj.bias": ((D,), "bias"),
        "ln_2.weight": ((D,), "norm"), "ln_2.bias": ((D,), "bias"),
        "mlp.c_fc.weight": ((D, F), D), "mlp.c_fc.bias": ((F,), "bias"),
        "mlp.c_proj.weight": ((F, D), F), "mlp.c_proj.bias": ((D,), "bias"),
    }
    return spec | {f"h.{i}.{name}": s for i in range(cfg.n_layers) for name, s in shapes.items()}


def from_hf(cfg: ModelConfig, t: dict) -> dict:
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    params = {ours: f32(t[hf]) for hf, ours in _TOP_NAMES.items()}
    params["layers"] = [{ours: f32(t[f"h.{i}.{hf}"]) for hf, ours in _LAYER_NAMES.items()} for i in range(cfg.n_layers)]
    return params


def to_hf(cfg: ModelConfig, params) -> dict:
    npf = lambda a: np.ascontiguousarray(np.asarray(a, dtype=np.float32))  # noqa: E731
    out = {hf: npf(params[ours]) for hf, ours in _TOP_NAMES.items()}
    return out | {f"h.{i}.{hf}": npf(p[ours]) for i, p in enumerate(params["layers"])
                  for hf, ours in _LAYER_NAMES.items()}
