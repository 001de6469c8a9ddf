"""Sparse encoder/decoder products for the TopK family, forward and backward.

A batch of sparse codes is held as N coordinate entries (rows_N, feats_N, vals_N): code[rows[n],
feats[n]] = vals[n]. TopK gives N = k·B, BatchTopK N = k·B (padded entries carry val 0).
Three primitives, each a loop over chunks of entries whose gathers/scatters XLA fuses, so nothing of
size B×F (dense codes) or N×D (gathered rows) is ever materialised:

  gather_dot(rows, feats, A_RxD, W_FxD)[n]      = A[rows[n]] · W[feats[n]]
  scatter_rows(rows, feats, vals, W_FxD, R)[r]  = Σ_{n: rows[n]=r} vals[n] · W[feats[n]]
  scatter_feats(rows, feats, vals, A_RxD, F)[f] = Σ_{n: feats[n]=f} vals[n] · A[rows[n]]

Decoding, x̂ = scatter_rows(vals, W_dec), costs 2·N·D flops instead of 2·B·F·D; its backward is
d vals = gather_dot(g, W_dec), d W_dec = scatter_feats(vals, g). The encoder's selected
pre-activations, pre[rows, feats] = gather_dot(x, W_enc), have the backward d x = scatter_rows(g, W_enc),
d W_enc = scatter_feats(g, x): the encoder gradient is sparse too (the dense pre-activations that
choose the entries are computed without gradient).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

CHUNK = 4096  # entries per loop iteration: big enough to vectorise, small enough to stay in cache


def _chunked(n: int) -> tuple[int, int]:
    size = min(CHUNK, n)
    return size, -(-n // size)


def _pad(a: jax.Array, n_total: int) -> jax.Array:
    return jnp.pad(a, (0, n_total - a.shape[0]))


def gather_dot(rows_N, feats_N, A_RxD, W_FxD):
    """out[n] = A[rows[n]] · W[feats[n]] (no autodiff rule; see encode_selected)."""
    n = rows_N.shape[0]
    size, n_chunks = _chunked(n)
    rows, feats = _pad(rows_N, size * n_chunks), _pad(feats_N, size * n_chunks)
    dtype = jnp.result_type(A_RxD, W_FxD)

    def body(c, out):
        r = jax.lax.dynamic_slice_in_dim(rows, c * size, size)
        f = jax.lax.dynamic_slice_in_dim(feats, c * size, size)
        part = jnp.sum(A_RxD[r].astype(jnp.float32) * W_FxD[f].astype(jnp.float32), axis=-1)
        return jax.lax.dynamic_update_slice_in_dim(out, part.astype(out.dtype), c * size, 0)

    out = jax.lax.fori_loop(0, n_chunks, body, jnp.zeros((size * n_chunks,), dtype))
    return out[:n]


def scatter_rows(rows_N, feats_N, vals_N, W_FxD, n_rows: int):
    """out[r] = Σ_{n: rows[n]=r} vals[n] · W[feats[n]]  (sparse codes times a dense matrix)."""
    n = rows_N.shape[0]
    size, n_chunks = _chunked(n)
    total = size * n_chunks
    rows, feats, vals = _pad(rows_N, total), _pad(feats_N, total), _pad(vals_N, total)
    dtype = jnp.result_type(vals_N, W_FxD)

    def body(c, out):
        r = jax.lax.dynamic_slice_in_dim(rows, c * size, size)
        f = jax.lax.dynamic_slice_in_dim(feats, c * size, size)
        v = jax.lax.dynamic_slice_in_dim(vals, c * size, size)
        return out.at[r].add(v[:, None].astype(dtype) * W_FxD[f].astype(dtype))

    return jax.lax.fori_loop(0, n_chunks, body, jnp.zeros((n_rows, W_FxD.shape[1]), dtype))


def scatter_feats(rows_N, feats_N, vals_N, A_RxD, n_feats: int):
    """out[f] = Σ_{n: feats[n]=f} vals[n] · A[rows[n]]  (the transpose product, for weight gradients)."""
    return scatter_rows(feats_N, rows_N, vals_N, A_RxD, n_feats)


@jax.custom_vjp
def encode_selected(rows_N, feats_N, x_BxD, W_FxD):
    """Selected encoder pre-activations without bias: x[rows[n]] · W_enc[feats[n]], with a sparse backward."""
    return gather_dot(rows_N, feats_N, x_BxD, W_FxD)


def _encode_fwd(rows_N, feats_N, x_BxD, W_FxD):
    return gather_dot(rows_N, feats_N, x_BxD, W_FxD), (rows_N, feats_N, x_BxD, W_FxD)


def _encode_bwd(res, g_N):
    rows_N, feats_N, x_BxD, W_FxD = res
    d_x = scatter_rows(rows_N, feats_N, g_N, W_FxD, x_BxD.shape[0]).astype(x_BxD.dtype)
    d_W = scatter_feats(rows_N, feats_N, g_N, x_BxD, W_FxD.shape[0]).astype(W_FxD.dtype)
    return None, None, d_x, d_W


encode_selected.defvjp(_encode_fwd, _encode_bwd)


def decode_sparse(rows_N, feats_N, vals_N, W_FxD, n_rows: int):
    """x̂[r] = Σ_{n: rows[n]=r} vals[n] · W_dec[feats[n]] (no bias), with a sparse backward."""
    return _decode(rows_N, feats_N, vals_N, W_FxD, n_rows)


def _decode_impl(rows_N, feats_N, vals_N, W_FxD, n_rows):
    return scatter_rows(rows_N, feats_N, vals_N, W_FxD, n_rows)


_decode = jax.custom_vjp(_decode_impl, nondiff_argnums=(4,))


def _decode_fwd(rows_N, feats_N, vals_N, W_FxD, n_rows):
    return scatter_rows(rows_N, feats_N, vals_N, W_FxD, n_rows), (rows_N, feats_N, vals_N, W_FxD)


def _decode_bwd(n_rows, res, g_RxD):
    rows_N, feats_N, vals_N, W_FxD = res
    d_vals = gather_dot(rows_N, feats_N, g_RxD, W_FxD).astype(vals_N.dtype)
    d_W = scatter_feats(rows_N, feats_N, vals_N, g_RxD, W_FxD.shape[0]).astype(W_FxD.dtype)
    return None, None, d_vals, d_W


_decode.defvjp(_decode_fwd, _decode_bwd)


def dense_codes(rows_N, feats_N, vals_N, n_rows: int, n_feats: int):
    """The dense [R, F] code matrix of coordinate entries (for tests and small evaluations)."""
    return jnp.zeros((n_rows, n_feats), vals_N.dtype).at[rows_N, feats_N].add(vals_N)
