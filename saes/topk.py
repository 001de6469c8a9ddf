"""Exact row-wise top-k without sorting whole rows: the same values and indices as `jax.lax.top_k`.

On GPUs `lax.top_k` with k > 16 lowers to a sort of every full row plus a slice (openxla/xla issue
25487), which for an SAE of width F = 65536 costs more than the encoder matmul. `chunked_top_k` sorts
only small arrays:

  1. split each row into C = ⌈F/s⌉ chunks of s consecutive entries and take each chunk's maximum;
  2. the k largest chunk maxima name k chunks (chunk ids sorted ascending);
  3. gather their k·s entries (the candidates, still in original index order) and take the top k.

Why it is exact: let t be the k-th largest chunk maximum. The k chosen chunks each hold an entry ≥ t,
so the k-th largest entry v_k ≥ t, and every entry > t lies in a chunk whose maximum is > t, all of
which are chosen. Entries equal to v_k = t tie: `lax.top_k` keeps the lowest indices; a chunk left
out with maximum t has a higher id than every chosen chunk with maximum t (ties between chunk maxima
also go to the lowest id), and those chosen chunks already hold enough entries equal to t at lower
indices. Since the chosen chunk ids are sorted, candidate order is index order and stage 3 breaks ties
exactly as `lax.top_k` does. With s ≈ √(F/k) both small top-ks are about 2·√(F·k) wide.

Order: `lax.top_k` compares floats as integers, the total order −NaN < −Inf < −0 < +0 < +Inf < +NaN
with ties to the lower index (XLA's comparator and its CPU runtime alike). `order_key` maps a float
to that integer, so chunk maxima and padding follow the same order: a width that is not a multiple of s
is padded with the smallest key, and padded slots sit after every real entry, so they lose every tie
(a real −Inf or −NaN entry always wins over padding).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

_MIN_KEY = np.iinfo(np.int32).min
_FLIP = np.int32(0x7FFFFFFF)


def order_key(x) -> jax.Array:
    """int32 keys ordered as `lax.top_k` orders the floats x: bits b ↦ b if b ≥ 0 else b ^ 0x7fffffff.

    bfloat16/float16 widen to float32 first (exact, order-preserving). The map is its own inverse."""
    bits = jax.lax.bitcast_convert_type(jnp.asarray(x).astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ _FLIP, bits)


def key_to_float(key) -> jax.Array:
    """The float32 whose `order_key` is key."""
    return jax.lax.bitcast_convert_type(jnp.where(key < 0, key ^ _FLIP, key), jnp.float32)


def chunk_size(width: int, k: int) -> int:
    """Chunk length s for `chunked_top_k`: the power of two nearest √(width/k), with at least k chunks;
    1 when chunking saves nothing (narrow rows), meaning: use `lax.top_k`."""
    if k <= 0 or width < 4 * k:
        return 1
    s = 2 ** int(round(math.log2(math.sqrt(width / k))))
    while s > 1 and -(-width // s) < k:
        s //= 2
    return 1 if s <= 1 or -(-width // s) + k * s > width // 2 else s


def chunked_top_k(x, k: int, chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(values, indices) of the k largest entries of each row of x [..., F], exactly as `lax.top_k`
    (module docstring). chunk: entries per chunk (default `chunk_size`); 1 falls back to `lax.top_k`."""
    x = jnp.asarray(x)
    F = x.shape[-1]
    s = chunk_size(F, k) if chunk is None else int(chunk)
    if s <= 1:
        return jax.lax.top_k(x, k)
    n_chunks = -(-F // s)
    if n_chunks < k:
        raise ValueError(f"chunked_top_k: {n_chunks} chunks of {s} cannot hold k={k}; use a smaller chunk")
    lead = x.shape[:-1]
    keys = order_key(x)  # only the chunk maxima read these, so XLA computes them inside that reduction
    if n_chunks * s != F:
        keys = jnp.pad(keys, [(0, 0)] * len(lead) + [(0, n_chunks * s - F)], constant_values=_MIN_KEY)
    chunk_max = key_to_float(jnp.max(keys.reshape(*lead, n_chunks, s), axis=-1))
    _, chunk_ids = jax.lax.top_k(chunk_max, k)
    chunk_ids = jnp.sort(chunk_ids, axis=-1)  # candidates in index order: ties go to the lowest index
    pos = (chunk_ids[..., None] * s + jnp.arange(s, dtype=chunk_ids.dtype)).reshape(*lead, k * s)
    cand = jnp.take_along_axis(x, jnp.minimum(pos, F - 1), axis=-1)
    cand_key = jnp.where(pos < F, order_key(cand), _MIN_KEY)  # padded slots: below every entry
    _, j = jax.lax.top_k(key_to_float(cand_key), k)
    idx = jnp.take_along_axis(pos, j, axis=-1).astype(jnp.int32)
    return jnp.take_along_axis(x, idx, axis=-1), idx  # the entries themselves, NaN bits included


def default_method() -> str:
    """'lax' on CPU (XLA:CPU's top-k is a partial sort already), 'chunked' on accelerators."""
    return "lax" if jax.default_backend() == "cpu" else "chunked"


def top_k(x, k: int, method: str | None = None) -> tuple[jax.Array, jax.Array]:
    """Row-wise top k equal to `lax.top_k(x, k)`; method 'lax' | 'chunked' | None (`default_method`)."""
    method = method or default_method()
    if method == "chunked":
        return chunked_top_k(x, k)
    if method != "lax":
        raise ValueError(f"unknown top-k method {method!r}; choose 'lax' or 'chunked'")
    x = jnp.asarray(x)
    # XLA:CPU runs top-k as a partial sort only for float32 (widening is exact and keeps the order) and
    # only while its outputs are not sliced further; the barrier keeps later slices (row sums take one
    # column of indices at a time) from being folded into it, which would make it a full sort.
    vals, idx = jax.lax.top_k(x.astype(jnp.float32), k)
    # (One barrier per output: a barrier on both would be folded onto the top-k's tuple, which XLA's
    # partitioner does not expect.)
    vals, idx = jax.lax.optimization_barrier(vals), jax.lax.optimization_barrier(idx)
    return (vals if x.dtype == jnp.float32 else jnp.take_along_axis(x, idx, axis=-1)), idx


__all__ = ["chunk_size", "chunked_top_k", "default_method", "key_to_float", "order_key", "top_k"]
