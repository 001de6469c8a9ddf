"""Sparse encoder/decoder products for the TopK family, forward and backward, accumulated in float32.

A batch of sparse codes is held as N coordinate entries (`Entries`: rows_N, feats_N): code[rows[n],
feats[n]] = vals[n], rows ascending. TopK gives N = k·B entries, k per row in row order (`k` set), so
row sums are fixed-width gathers; BatchTopK gives N = k·B entries with a variable count per row
(padding entries carry val 0). Three products, none of which materialises a dense B×F code matrix:

  rows_sum(coef, W)[r]   = Σ_{n: rows[n]=r}  coef[n] · W[feats[n]]     (decode; encoder input gradient)
  pair_dots(A, W)[n]     = A[rows[n]] · W[feats[n]]                    (selected pre-activations; d vals)
  feats_sum(coef, A)[f]  = Σ_{n: feats[n]=f} coef[n] · A[rows[n]]      (weight gradients)

Decoding, x̂ = rows_sum(vals, W_dec), costs 2·N·D flops instead of 2·B·F·D; its backward is
d vals = pair_dots(g, W_dec), d W_dec = feats_sum(vals, g). The selected pre-activations
pre_n = x[rows[n]] · W_enc[feats[n]] + b_enc[feats[n]] have the backward d x = rows_sum(g, W_enc),
d W_enc = feats_sum(g, x), d b_enc[f] = Σ_{n: feats[n]=f} g[n]: the encoder gradient is sparse too
(the dense pre-activations that choose the entries are computed without gradient).

Operands are read in the compute dtype (bfloat16 halves the bytes moved); every product and
accumulator is float32, so a bfloat16 step has no bfloat16 scatter (XLA emits bfloat16 scatter-adds
as compare-and-swap loops on most GPUs, openxla/xla issue 26371) and no bfloat16 rounding of sums.

Implementations (`impl()`, chosen per backend; FEATUREATLAS_SPARSE_IMPL or `use_impl` override it):

  gather  (GPU, TPU) no loops and no atomics contention: row sums of TopK are gather-reduces (k
          gathered rows summed in registers), pair dots one gather-multiply-reduce, weight gradients
          one scatter each with indices sorted by one argsort of the feature ids
          (`indices_are_sorted=True`, which XLA:GPU emits as per-warp runs accumulated in registers);
          BatchTopK's row sums are sorted scatters over rows.
  loop    (CPU) loops over chunks whose working set stays in cache: TopK's row sums and pair dots as
          small batched dots over 32 rows at a time, weight gradients as scatter-adds of 4096 entries
          at a time (an argsort and whole-batch gathers cost more than they save on CPU: measured in
          scripts/bench_sae.py).
  legacy  the path before issue 11 (loops everywhere, accumulation in the compute dtype, selected
          values recomputed): kept only as the reference of tests and the benchmark's baseline.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp

from featureatlas.activation_store.errors import ConfigError

CHUNK = 4096  # entries per loop iteration: big enough to vectorise, small enough to stay in cache
ROW_CHUNK = 32  # rows per loop iteration of the CPU row sums and pair dots (32·k gathered rows stay in L2)
IMPLS = ("gather", "loop", "legacy")
ENV = "FEATUREATLAS_SPARSE_IMPL"
_override: list[str] = []


# ---------------------------------------------------------------------------------------------
# Which implementation
# ---------------------------------------------------------------------------------------------
def default_impl() -> str:
    """$FEATUREATLAS_SPARSE_IMPL if set, else 'loop' on CPU and 'gather' on GPU/TPU."""
    name = os.environ.get(ENV, "")
    if name:
        if name not in IMPLS:
            raise ConfigError(f"{ENV}={name!r} is not a sparse implementation; choose one of {', '.join(IMPLS)} "
                              "or unset it")
        return name
    return "loop" if jax.default_backend() == "cpu" else "gather"


def impl() -> str:
    """The implementation traced now (`use_impl` inside, else `default_impl`)."""
    return _override[-1] if _override else default_impl()


@contextlib.contextmanager
def use_impl(name: str):
    """Trace with implementation `name` inside the block (tests, benchmarks, the HLO check). Functions
    jitted before the block keep the implementation they were traced with."""
    if name not in IMPLS:
        raise ConfigError(f"unknown sparse implementation {name!r}; choose one of {', '.join(IMPLS)}")
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()


def topk_method(name: str | None = None) -> str:
    """The saes.topk method an implementation selects with: 'chunked' for gather, XLA's own otherwise
    (XLA:CPU's top-k is a partial sort, not a full one)."""
    return "chunked" if (name or impl()) == "gather" else "lax"


# ---------------------------------------------------------------------------------------------
# Entries
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Entries:
    """N coordinate entries of a batch of sparse codes (module docstring); lives inside a traced step."""

    rows: jax.Array
    """[N] int32; ascending wherever the gather implementation sums over rows."""
    feats: jax.Array
    """[N] int32."""
    n_rows: int
    k: int = 0
    """Entries per row when row r holds exactly entries r·k … r·k+k−1 (TopK), else 0."""
    by_feat: jax.Array | None = None
    """[N] argsort of feats (the gather implementation's sorted scatters), else None."""
    valid: jax.Array | None = None
    """[N] bool, False on padding entries (their values must be 0), or None when all are real."""
    impl: str = "gather"

    @property
    def idx_BxK(self):
        return self.feats.reshape(self.n_rows, self.k)


def row_entries(idx_BxK, name: str | None = None) -> Entries:
    """Entries of k latents per row (TopK): rows = 0…0 1…1 …, feats = idx row-major."""
    B, k = idx_BxK.shape
    e = coo_entries(jnp.repeat(jnp.arange(B, dtype=jnp.int32), k), idx_BxK.reshape(-1), B, None, name)
    # (k = 0 for legacy: the old path knew nothing of the row layout.)
    return e if e.impl == "legacy" else dataclasses.replace(e, k=k)


def coo_entries(rows_N, feats_N, n_rows: int, valid_N=None, name: str | None = None) -> Entries:
    """Entries with a variable count per row. The gather implementation needs rows_N ascending (padding
    entries last, on the last row); the loops take any order."""
    name = name or impl()
    feats = feats_N.astype(jnp.int32)
    return Entries(rows_N.astype(jnp.int32), feats, n_rows, 0, _by_feat(feats, name), valid_N, name)


def _by_feat(feats_N, name):
    return jnp.argsort(feats_N) if name == "gather" else None


# ---------------------------------------------------------------------------------------------
# Chunked loops (CPU and legacy)
# ---------------------------------------------------------------------------------------------
def _chunks(cap: int, *arrays):
    """(size, n_chunks, chunk) with size = min(cap, rows): chunk(c) is rows [c·size, (c+1)·size) of each
    array, zero-padded to n_chunks·size rows."""
    n = arrays[0].shape[0]
    size = max(1, min(cap, n))
    n_chunks = -(-n // size)
    padded = [jnp.pad(a, [(0, size * n_chunks - n)] + [(0, 0)] * (a.ndim - 1)) for a in arrays]
    return size, n_chunks, lambda c: [jax.lax.dynamic_slice_in_dim(a, c * size, size) for a in padded]


def gather_dot(rows_N, feats_N, A_RxD, W_FxD, out_dtype=None):
    """out[n] = A[rows[n]] · W[feats[n]], products summed in float32 (a loop over chunks of entries)."""
    size, n_chunks, chunk = _chunks(CHUNK, rows_N, feats_N)
    dtype = out_dtype or jnp.result_type(A_RxD, W_FxD)

    def body(c, out):
        r, f = chunk(c)
        part = jnp.sum(A_RxD[r].astype(jnp.float32) * W_FxD[f].astype(jnp.float32), axis=-1)
        return jax.lax.dynamic_update_slice_in_dim(out, part.astype(out.dtype), c * size, 0)

    return jax.lax.fori_loop(0, n_chunks, body, jnp.zeros((size * n_chunks,), dtype))[:rows_N.shape[0]]


def scatter_rows(rows_N, feats_N, vals_N, W_FxD, n_rows: int, acc_dtype=None):
    """out[r] = Σ_{n: rows[n]=r} vals[n] · W[feats[n]], accumulated in acc_dtype (default: the inputs')."""
    size, n_chunks, chunk = _chunks(CHUNK, rows_N, feats_N, vals_N)
    dtype = acc_dtype or jnp.result_type(vals_N, W_FxD)

    def body(c, out):
        r, f, v = chunk(c)
        return out.at[r].add(v[:, None].astype(dtype) * W_FxD[f].astype(dtype))

    return jax.lax.fori_loop(0, n_chunks, body, jnp.zeros((n_rows, W_FxD.shape[1]), dtype))


def scatter_feats(rows_N, feats_N, vals_N, A_RxD, n_feats: int, acc_dtype=None):
    """out[f] = Σ_{n: feats[n]=f} vals[n] · A[rows[n]]  (the transpose product, for weight gradients)."""
    return scatter_rows(feats_N, rows_N, vals_N, A_RxD, n_feats, acc_dtype)


def _row_chunks(part_fn, X_BxM, idx_BxK, W_FxD, out_width: int):
    """[B, out_width] float32, a loop over chunks of c = ROW_CHUNK rows: each chunk's rows are
    part_fn(X[chunk], W[idx[chunk]]), whose gathered rows [c, k, D] stay in cache (CPU)."""
    c, n_chunks, chunk = _chunks(ROW_CHUNK, X_BxM, idx_BxK)

    def body(i, out):
        x, idx = chunk(i)
        return jax.lax.dynamic_update_slice_in_dim(out, part_fn(x, W_FxD[idx]), i * c, 0)

    return jax.lax.fori_loop(0, n_chunks, body, jnp.zeros((n_chunks * c, out_width), jnp.float32))[:X_BxM.shape[0]]


# ---------------------------------------------------------------------------------------------
# Loop-free pieces (gather implementation)
# ---------------------------------------------------------------------------------------------
def _sorted_scatter(keys_N, coef_N, rows_of_A, A_RxD, n_out: int):
    """out[i] = Σ_{n: keys[n]=i} coef[n] · A[rows_of_A[n]] in float32, keys ascending."""
    upd = coef_N[:, None].astype(jnp.float32) * A_RxD[rows_of_A].astype(jnp.float32)
    return jnp.zeros((n_out, A_RxD.shape[1]), jnp.float32).at[keys_N].add(upd, indices_are_sorted=True)


# ---------------------------------------------------------------------------------------------
# The three products
# ---------------------------------------------------------------------------------------------
def _acc(e: Entries, dtype):
    return jnp.dtype(dtype) if e.impl == "legacy" else jnp.float32


def rows_sum(e: Entries, coef_N, W_FxD, dtype=jnp.float32):
    """[n_rows, D] float32: out[r] = Σ_{n: rows[n]=r} coef[n] · W[feats[n]] (module docstring)."""
    W = W_FxD.astype(dtype)
    if e.k:  # TopK: k entries per row
        coef_BxK = coef_N.reshape(e.n_rows, e.k).astype(jnp.float32)
        if e.impl == "gather":
            # One gather-multiply-reduce, which XLA:GPU keeps in one reduction fusion (no [B, k, D] array;
            # scripts/hlo_check.py reports it if it is not).
            return jnp.sum(coef_BxK[:, :, None] * W[e.idx_BxK].astype(jnp.float32), axis=1)
        # Chunks of ROW_CHUNK rows: a chain of k gathers is not kept in one fusion by XLA:CPU inside a training step.
        wsum = lambda coef, w: jnp.einsum("bk,bkd->bd", coef, w.astype(jnp.float32))  # noqa: E731
        return _row_chunks(wsum, coef_BxK, e.idx_BxK, W, W.shape[1])
    if e.impl == "gather":
        return _sorted_scatter(e.rows, coef_N, e.feats, W, e.n_rows)
    acc = _acc(e, dtype)
    return scatter_rows(e.rows, e.feats, coef_N.astype(acc), W, e.n_rows, acc).astype(jnp.float32)


def pair_dots(e: Entries, A_RxD, W_FxD, dtype=jnp.float32):
    """[N] float32: out[n] = A[rows[n]] · W[feats[n]]."""
    A, W = A_RxD.astype(dtype), W_FxD.astype(dtype)
    if e.impl == "gather":
        if e.k:
            prod = A[:, None, :].astype(jnp.float32) * W[e.idx_BxK].astype(jnp.float32)
            return jnp.sum(prod, axis=-1).reshape(-1)
        return jnp.sum(A[e.rows].astype(jnp.float32) * W[e.feats].astype(jnp.float32), axis=-1)
    if e.k:  # each chunk's gathered rows [c, k, D] stay in cache for one batched dot (CPU)
        dot = lambda a, w: jnp.einsum("bd,bkd->bk", a, w, preferred_element_type=jnp.float32)  # noqa: E731
        return _row_chunks(dot, A, e.idx_BxK, W, e.k).reshape(-1)
    return gather_dot(e.rows, e.feats, A, W, _acc(e, dtype)).astype(jnp.float32)


def feats_sum(e: Entries, coef_N, A_RxD, n_feats: int, dtype=jnp.float32):
    """[n_feats, D] float32: out[f] = Σ_{n: feats[n]=f} coef[n] · A[rows[n]]."""
    A = A_RxD.astype(dtype)
    if e.impl == "gather":
        o = e.by_feat
        return _sorted_scatter(e.feats[o], coef_N[o], e.rows[o], A, n_feats)
    acc = _acc(e, dtype)
    return scatter_feats(e.rows, e.feats, coef_N.astype(acc), A, n_feats, acc).astype(jnp.float32)


def feat_totals(e: Entries, coef_N, n_feats: int):
    """[n_feats] float32: out[f] = Σ_{n: feats[n]=f} coef[n] (bias gradients, firing counts)."""
    coef = coef_N.astype(jnp.float32)
    if e.impl == "gather":
        o = e.by_feat
        return jnp.zeros((n_feats,), jnp.float32).at[e.feats[o]].add(coef[o], indices_are_sorted=True)
    return jnp.zeros((n_feats,), jnp.float32).at[e.feats].add(coef)


# ---------------------------------------------------------------------------------------------
# Differentiable encode/decode
# ---------------------------------------------------------------------------------------------
def fwd_saving_args(f, n: int):
    """The forward rule of a jax.custom_vjp function f: f's value, with its first n arguments as residuals."""
    return lambda *args: (f(*args), args[:n])


def _entries(static, rows, feats, by_feat):
    n_rows, k, _, name = static
    return Entries(rows, feats, n_rows, k, by_feat, None, name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _preacts(rows, feats, by_feat, x, W, b, values, static):
    e, dtype = _entries(static, rows, feats, by_feat), static[2]
    if values is not None:
        return values.astype(jnp.float32)
    return pair_dots(e, x, W, dtype) + b[feats].astype(jnp.float32)


def _preacts_bwd(static, res, g_N):
    rows, feats, by_feat, x, W, b = res
    e, dtype = _entries(static, rows, feats, by_feat), static[2]
    d_x = rows_sum(e, g_N, W, dtype).astype(x.dtype)
    d_W = feats_sum(e, g_N, x, W.shape[0], dtype).astype(W.dtype)
    d_b = feat_totals(e, g_N, b.shape[0]).astype(b.dtype)
    return None, None, None, d_x, d_W, d_b, None


_preacts.defvjp(fwd_saving_args(_preacts, 6), _preacts_bwd)


def selected_preacts(e: Entries, x_BxD, W_FxD, b_F, dtype=jnp.float32, values_N=None):
    """[N] float32 pre_n = x[rows[n]] · W[feats[n]] + b[feats[n]], differentiable in x, W and b.

    values_N: the same numbers already known (the float32 top-k of the dense pre-activations), which
    skips recomputing them; their gradient is still the sparse one above."""
    static = (e.n_rows, e.k, jnp.dtype(dtype), e.impl)
    values = None if values_N is None else jax.lax.stop_gradient(values_N)
    return _preacts(e.rows, e.feats, e.by_feat, x_BxD, W_FxD, b_F, values, static)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _decode(rows, feats, by_feat, vals, W, static):
    return rows_sum(_entries(static, rows, feats, by_feat), vals, W, static[2])


def _decode_bwd(static, res, g_RxD):
    rows, feats, by_feat, vals, W = res
    e, dtype = _entries(static, rows, feats, by_feat), static[2]
    d_vals = pair_dots(e, g_RxD, W, dtype).astype(vals.dtype)
    d_W = feats_sum(e, vals, g_RxD, W.shape[0], dtype).astype(W.dtype)
    return None, None, None, d_vals, d_W


_decode.defvjp(fwd_saving_args(_decode, 5), _decode_bwd)


def decode(e: Entries, vals_N, W_FxD, dtype=jnp.float32):
    """[n_rows, D] float32 x̂[r] = Σ_{n: rows[n]=r} vals[n] · W[feats[n]] (no bias), differentiable in
    vals and W (module docstring)."""
    return _decode(e.rows, e.feats, e.by_feat, vals_N, W_FxD, (e.n_rows, e.k, jnp.dtype(dtype), e.impl))


def dense_codes(rows_N, feats_N, vals_N, n_rows: int, n_feats: int):
    """The dense [R, F] code matrix of coordinate entries (for tests and small evaluations)."""
    return jnp.zeros((n_rows, n_feats), vals_N.dtype).at[rows_N, feats_N].add(vals_N)


__all__ = ["CHUNK", "IMPLS", "Entries", "coo_entries", "decode", "default_impl", "dense_codes", "feat_totals",
           "feats_sum", "fwd_saving_args", "gather_dot", "impl", "pair_dots", "row_entries", "rows_sum",
           "scatter_feats", "scatter_rows", "selected_preacts", "topk_method", "use_impl"]
