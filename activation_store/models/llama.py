"""Llama-family blocks (SmolLM2, Llama 2/3, Qwen2, Mistral): RMSNorm, RoPE, grouped-query
attention, SwiGLU MLP. Pure functions over one layer's params dict.

Internal layout (x @ W, no transposes at run time; q/k/v and gate/up fused so each is one matmul):
  embed [V, D], ln_f_w [D], unembed [D, V] (only when embeddings are untied)
  layers[i]: ln1_w [D], w_qkv [D, (H + 2K)·E] (+ b_qkv when config.qkv_bias), w_o [H·E, D],
             ln2_w [D], w_gate_up [D, 2F] (gate first), w_down [F, D]
HF checkpoints store nn.Linear weights as [out, in]; `from_hf`/`to_hf` convert.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig


def rms_norm(x, w_D, eps: float):
    """x / sqrt(mean(x²) + eps) · w (Zhang & Sennrich 2019). The normalisation runs in float32 and is
    cast back to x's dtype before the weight multiplies it (as transformers' LlamaRMSNorm does)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * w_D


def position_context(cfg: ModelConfig, pos_BxT):
    """RoPE angles for every token (Su et al. 2021, HF "rotate_half" convention):
    theta_j = pos · base^(-2j/E), j < E/2; returns (cos, sin) [B, T, 1, E/2]."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_base ** (np.arange(half, dtype=np.float64) * 2.0 / cfg.head_dim))
    ang_BxTxE2 = pos_BxT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(ang_BxTxE2)[:, :, None, :], jnp.sin(ang_BxTxE2)[:, :, None, :]


def rope(x_BxTxHxE, ctx):
    """Rotate the pairs (x_j, x_{j+E/2}) by theta_j: the HF layout, where each head's first half
    holds the 'real' and the second half the 'imaginary' parts. cos/sin (float32) are cast to x's dtype."""
    cos, sin = (c.astype(x_BxTxHxE.dtype) for c in ctx)
    half = x_BxTxHxE.shape[-1] // 2
    x1, x2 = x_BxTxHxE[..., :half], x_BxTxHxE[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def embed(params, cfg: ModelConfig, tokens_BxT, pos_BxT):
    return params["embed"][tokens_BxT]


def attn_norm(p, cfg: ModelConfig, x):
    return rms_norm(x, p["ln1_w"], cfg.norm_eps)


def mlp_norm(p, cfg: ModelConfig, x):
    return rms_norm(x, p["ln2_w"], cfg.norm_eps)


def final_norm(params, cfg: ModelConfig, x):
    return rms_norm(x, params["ln_f_w"], cfg.norm_eps)


def qkv(p, cfg: ModelConfig, h_BxTxD, ctx):
    """One fused projection, split into heads; RoPE on q and k."""
    B, T, _ = h_BxTxD.shape
    H, K, E = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    qkv_BxTxN = h_BxTxD @ p["w_qkv"]
    if "b_qkv" in p:
        qkv_BxTxN = qkv_BxTxN + p["b_qkv"]
    q, k, v = jnp.split(qkv_BxTxN, [H * E, (H + K) * E], axis=-1)
    return rope(q.reshape(B, T, H, E), ctx), rope(k.reshape(B, T, K, E), ctx), v.reshape(B, T, K, E)


def attn_proj(p, o_BxTxHE):
    return o_BxTxHE @ p["w_o"]


def mlp_hidden(p, cfg: ModelConfig, h_BxTxD):
    """SwiGLU (Shazeer 2020): silu(h W_gate) ⊙ (h W_up), the input of the down projection. silu runs in
    float32 and is rounded once to h's dtype (what torch's silu kernel does for bfloat16)."""
    gu_BxTx2F = h_BxTxD @ p["w_gate_up"]
    F = cfg.d_mlp
    gate = jax.nn.silu(gu_BxTx2F[..., :F].astype(jnp.float32)).astype(gu_BxTx2F.dtype)
    return gate * gu_BxTx2F[..., F:]


def mlp_proj(p, m_BxTxF):
    return m_BxTxF @ p["w_down"]


# ---- Hugging Face naming ------------------------------------------------------------------

def hf_spec(cfg: ModelConfig) -> dict:
    """HF tensor name -> (shape, init role); role is 'embed', 'norm', 'bias' or the fan-in."""
    D, F, V = cfg.d_model, cfg.d_mlp, cfg.vocab_size
    qd, kd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    qkv = {"q": qd, "k": kd, "v": kd}
    layer = {"input_layernorm.weight": ((D,), "norm"),
             **{f"self_attn.{n}_proj.weight": ((w, D), D) for n, w in qkv.items()},
             **({f"self_attn.{n}_proj.bias": ((w,), "bias") for n, w in qkv.items()} if cfg.qkv_bias else {}),
             "self_attn.o_proj.weight": ((D, qd), qd), "post_attention_layernorm.weight": ((D,), "norm"),
             "mlp.gate_proj.weight": ((F, D), D), "mlp.up_proj.weight": ((F, D), D), "mlp.down_proj.weight": ((D, F), F)}
    spec = {"model.embed_tokens.weight": ((V, D), "embed"), "model.norm.weight": ((D,), "norm")}
    spec |= {f"model.layers.{i}.{n}": s for i in range(cfg.n_layers) for n, s in layer.items()}
    if not cfg.tied_embeddings:
        spec["lm_head.weight"] = ((V, D), D)
    return spec


def from_hf(cfg: ModelConfig, t: dict) -> dict:
    """HF tensors (already checked against hf_spec) -> internal params (numpy, fp32)."""
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    layers = []
    for i in range(cfg.n_layers):
        pre = f"model.layers.{i}."
        a = pre + "self_attn."
        p = {
            "ln1_w": f32(t[pre + "input_layernorm.weight"]),
            "w_qkv": f32(np.concatenate([t[a + n + "_proj.weight"].T for n in "qkv"], axis=1)),
            "w_o": f32(t[a + "o_proj.weight"].T),
            "ln2_w": f32(t[pre + "post_attention_layernorm.weight"]),
            "w_gate_up": f32(np.concatenate([t[pre + f"mlp.{n}_proj.weight"].T for n in ("gate", "up")], axis=1)),
            "w_down": f32(t[pre + "mlp.down_proj.weight"].T),
        }
        if cfg.qkv_bias:
            p["b_qkv"] = f32(np.concatenate([t[a + n + "_proj.bias"] for n in "qkv"]))
        layers.append(p)
    params = {"embed": f32(t["model.embed_tokens.weight"]), "layers": layers, "ln_f_w": f32(t["model.norm.weight"])}
    if not cfg.tied_embeddings:
        params["unembed"] = f32(t["lm_head.weight"].T)
    return params


def to_hf(cfg: ModelConfig, params) -> dict:
    """Internal params -> HF tensors (numpy fp32), the inverse of from_hf."""
    npf = lambda a: np.ascontiguousarray(np.asarray(a, dtype=np.float32))  # noqa: E731
    qd, kd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": npf(params["embed"]), "model.norm.weight": npf(params["ln_f_w"])}
    for i, p in enumerate(params["layers"]):
        pre = f"model.layers.{i}."
        a = pre + "self_attn."
        out[pre + "input_layernorm.weight"] = npf(p["ln1_w"])
        for n, w in zip("qkv", np.split(np.asarray(p["w_qkv"]), [qd, qd + kd], axis=1)):
            out[a + n + "_proj.weight"] = npf(w.T)
        if "b_qkv" in p:
            for n, b in zip("qkv", np.split(np.asarray(p["b_qkv"]), [qd, qd + kd])):
                out[a + n + "_proj.bias"] = npf(b)
        out[a + "o_proj.weight"] = npf(np.asarray(p["w_o"]).T)
        out[pre + "post_attention_layernorm.weight"] = npf(p["ln2_w"])
        for n, w in zip(("gate", "up"), np.split(np.asarray(p["w_gate_up"]), 2, axis=1)):
            out[pre + f"mlp.{n}_proj.weight"] = npf(w.T)
        out[pre + "mlp.down_proj.weight"] = npf(np.asarray(p["w_down"]).T)
    if "unembed" in params:
        out["lm_head.weight"] = npf(np.asarray(params["unembed"]).T)
    return out
