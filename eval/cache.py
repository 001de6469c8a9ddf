"""The feature activation cache: one streaming pass of a Dictionary over a store.

Per feature f, in memory O(F·N) whatever the corpus size (N the per-feature example counts):

- top-N contexts (exact): the N contexts with the largest per-context max activation max_t a[c,t,f];
- quantile examples: a uniform sample of R activating contexts is kept by priority sampling (the R
  smallest hashed keys u(c, f) among contexts where f fires: a uniform sample without replacement that
  does not depend on the order or chunking of the pass). At the end the sample is cut into
  `n_quantiles` equal-count bins by activation (delphi's quantiles of the activating examples), and
  `per_bin` contexts are drawn from each bin (again by smallest key);
- random non-activating contexts: the K_neg contexts with the smallest keys among those where f never fires;
- density (fraction of tokens with a > 0), max, mean (over all tokens), mean where active: exact;
- a histogram of token activations on log-spaced bins (`HIST_EDGES`, 4 per decade, 1e-6..1e6) and
  co-occurrence counts #{tokens: a_f > 0 and a_g > 0} of the `cooccur_top` densest features of the first
  chunk with every feature g: both over the tokens of contexts c with c mod hist_stride = 0 (exact when
  hist_stride = 1; the default samples 1 context in 8, because these two are the pass's costliest parts).

Positions are not kept: the max position of a kept context is recovered when its window is cut
(eval/maxact.py re-encodes the context), which saves an argmax over every token of the pass.

Examples are split by context id into an explain set and a disjoint held-out set before anything is
kept: context c is held out iff splitmix64(c ⊕ seed) / 2^64 < held_out_fraction. Explainers read only
the explain set, scorers only the held-out set; they can never share a context (delphi samples both from
one pool). Tokens are stored once: examples are context ids into the store's /tokens.

The state is a pytree updated by one jitted step per chunk of contexts, checkpointed through the run
layer; a killed pass resumes from its last checkpoint to the same result, and a store that grew since
the pass (a resumed harvest) is cached further by resuming.

cache.h5 layout (S = 2 splits: 0 explain, 1 held-out):
  /top_act [S,F,N] f32, /top_ctx [S,F,N] i32                 descending by activation, ctx -1 = empty
  /bin_act [S,F,Q,K] f32, /bin_ctx [S,F,Q,K] i32             quantile bins, lowest first; in a bin descending
  /quantile_edges [S,F,Q+1] f32                              activation range of each bin (from the sample)
  /neg_ctx [S,F,K_neg] i32                                   non-activating contexts
  /density [F] f64, /max [F] f32, /mean [F] f64, /mean_active [F] f64, /active_tokens [F] i64
  /hist [F,B] i64, /hist_edges [B+1] f64, /hist_tokens i64   histogram and the tokens it counted
  /cooc_features [M] i32, /cooc [M,F] i64
  attrs: format, store path and fingerprint, hook, n_features, n_tokens, n_contexts, settings (JSON)
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from featureatlas.activation_store.configs import Config, setting
from featureatlas.activation_store.errors import ConfigError
from featureatlas.activation_store.prefetch import Prefetcher
from featureatlas.activation_store.store_format import splitmix64
from featureatlas.eval.adapters import feature_ids, validate_dictionary

CACHE_FORMAT = "featureatlas-cache/2"
BINS_PER_DECADE = 4
HIST_EDGES = 10.0 ** (np.arange(-6 * BINS_PER_DECADE, 6 * BINS_PER_DECADE + 1) / BINS_PER_DECADE)
N_HIST = len(HIST_EDGES) - 1
EXPLAIN, HELD_OUT = 0, 1


@dataclasses.dataclass
class CacheConfig(Config):
    """Settings of one cache pass (what is kept per feature)."""

    top_n: int = setting(20, gt=0)
    """Top-activating contexts kept per feature and split (exact)."""
    n_quantiles: int = setting(10, gt=0)
    """Activation-quantile bins (equal counts of activating contexts)."""
    per_bin: int = setting(8, gt=0)
    """Contexts sampled per quantile bin and split."""
    sample_size: int = setting(0, ge=0)
    """Activating contexts sampled per feature and split, cut into the quantile bins (0 = 2·n_quantiles·per_bin)."""
    n_negative: int = setting(20, ge=0)
    """Random non-activating contexts kept per feature and split."""
    held_out_fraction: float = setting(0.5, gt=0, lt=1)
    """Share of contexts held out for scoring (never shown to explainers)."""
    contexts_per_chunk: int = setting(64, gt=0)
    """Contexts encoded per step."""
    hist_stride: int = setting(8, gt=0)
    """Histogram and co-occurrences from contexts c with c mod n = 0 (1 = exact, every context)."""
    cooccur_top: int = setting(32, ge=0)
    """Features (densest in the first chunk) whose co-occurrence with every feature is counted."""
    exclude_bos: bool = setting(True)
    """Ignore the BOS position of each context."""
    max_contexts: int = setting(0, ge=0)
    """Cache only the first n contexts (0 = all committed contexts)."""
    checkpoint_every: int = setting(50, gt=0)
    """Chunks between checkpoints."""
    seed: int = setting(0)
    """Seed of the explain/held-out split and of the samples."""

    @property
    def reservoir(self) -> int:
        return self.sample_size or 2 * self.n_quantiles * self.per_bin


# ---------------------------------------------------------------------------------------------
# Pure pieces
# ---------------------------------------------------------------------------------------------
def held_out_mask(contexts: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """True where a context belongs to the held-out set: splitmix64(c ⊕ seed)/2^64 < fraction."""
    h = splitmix64(np.asarray(contexts, np.uint64) ^ np.uint64(seed * 0x9E3779B1 + 0x51ED))
    return (h >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction


def _hash_keys(ctx_C: jax.Array, n_features: int, seed: int) -> jax.Array:
    """Uniform keys u(c, f) in [0, 1) from a murmur3 finaliser of (c, f, seed); [C, F]."""
    c = ctx_C.astype(jnp.uint32)[:, None] * jnp.uint32(0x9E3779B1)
    f = jnp.arange(n_features, dtype=jnp.uint32)[None, :] * jnp.uint32(0x85EBCA77)
    h = c ^ f ^ jnp.uint32((seed * 0xC2B2AE3D + 0x27D4EB2F) & 0xFFFFFFFF)
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    h = h ^ (h >> 16)
    return (h >> 8).astype(jnp.float32) / float(1 << 24)


def hist_bin(a: jax.Array) -> jax.Array:
    """Index of the log-spaced bin of HIST_EDGES holding a (> 0), clipped to the grid."""
    b = jnp.floor((jnp.log10(jnp.maximum(a, 1e-30)) + 6.0) * BINS_PER_DECADE)
    return jnp.clip(b, 0, N_HIST - 1).astype(jnp.int32)


def _keep_best(key_FxN, payload_old: tuple, key_new_FxC, payload_new: tuple, largest: bool):
    """Keep, per feature, the N best candidates of old and new (largest keys, or smallest), with their payloads."""
    key = jnp.concatenate([key_FxN, key_new_FxC], axis=1)
    _, idx = jax.lax.top_k(key if largest else -key, key_FxN.shape[1])
    take = lambda a: jnp.take_along_axis(a, idx, axis=1)  # noqa: E731
    return take(key), tuple(take(jnp.concatenate([o, n], axis=1)) for o, n in zip(payload_old, payload_new))


def init_state(n_features: int, cfg: CacheConfig) -> dict:
    F, S, N, R, Kn = n_features, 2, cfg.top_n, cfg.reservoir, max(cfg.n_negative, 1)
    full = lambda shape, v, dt: jnp.full(shape, v, dt)  # noqa: E731
    return {
        "top_act": full((S, F, N), -1.0, jnp.float32), "top_ctx": full((S, F, N), -1, jnp.int32),
        "res_key": full((S, F, R), jnp.inf, jnp.float32), "res_ctx": full((S, F, R), -1, jnp.int32),
        "res_act": full((S, F, R), 0.0, jnp.float32),
        "neg_key": full((S, F, Kn), jnp.inf, jnp.float32), "neg_ctx": full((S, F, Kn), -1, jnp.int32),
        "max": full((F,), 0.0, jnp.float32),
    }


def context_reductions(a_CxTxF):
    """Per context and feature: max, count of a > 0, and sum over tokens, in ONE pass (a variadic reduce;
    three separate reductions read the chunk three times and cost 3.6x as much on CPU)."""
    def combine(x, y):
        return jnp.maximum(x[0], y[0]), x[1] + y[1], x[2] + y[2]

    on = (a_CxTxF > 0).astype(jnp.float32)  # exact counts up to 2^24 tokens per context
    zero = jnp.float32(0)
    mx, count, total = jax.lax.reduce((a_CxTxF, on, a_CxTxF), (zero, zero, zero), combine, (1,))
    return mx, count.astype(jnp.int32), total


def chunk_step(state: dict, codes_CxTxF, valid_CxT, ctx_C, split_C, sampled_C, cooc_idx_M, *, seed: int,
               n_sampled: int):
    """One chunk of C contexts: update the example state; return per-chunk sums for the host accumulators.

    codes_CxTxF: activations (anything at invalid positions); valid_CxT: real, counted tokens;
    ctx_C: context ids (-1 = padding context); split_C: 0 explain / 1 held-out; sampled_C: contexts whose
    tokens enter the histogram and co-occurrences (at most n_sampled of them); cooc_idx_M: features whose
    co-occurrences are counted.
    """
    C, T, F = codes_CxTxF.shape
    a = jnp.where(valid_CxT[:, :, None], jnp.maximum(codes_CxTxF, 0.0), 0.0)
    ctx_max_CxF, active_CxF, sum_CxF = context_reductions(a)
    real_C = ctx_C >= 0
    ctx_FxC = jnp.broadcast_to(ctx_C[None, :], (F, C))
    keys_FxC = _hash_keys(ctx_C, F, seed).T
    active_ctx_FxC = ((ctx_max_CxF > 0) & real_C[:, None]).T
    max_FxC = ctx_max_CxF.T
    new = dict(state)
    parts = {k: [] for k in ("top_act", "top_ctx", "res_key", "res_ctx", "res_act", "neg_key", "neg_ctx")}
    for s in (EXPLAIN, HELD_OUT):
        in_s = (real_C & (split_C == s))[None, :]
        act_s, quiet_s = in_s & active_ctx_FxC, in_s & ~active_ctx_FxC
        v, (c,) = _keep_best(state["top_act"][s], (state["top_ctx"][s],), jnp.where(act_s, max_FxC, -1.0),
                             (ctx_FxC,), largest=True)
        parts["top_act"].append(v), parts["top_ctx"].append(c)
        k, (c, v) = _keep_best(state["res_key"][s], (state["res_ctx"][s], state["res_act"][s]),
                               jnp.where(act_s, keys_FxC, jnp.inf), (ctx_FxC, max_FxC), largest=False)
        parts["res_key"].append(k), parts["res_ctx"].append(c), parts["res_act"].append(v)
        k, (c,) = _keep_best(state["neg_key"][s], (state["neg_ctx"][s],), jnp.where(quiet_s, keys_FxC, jnp.inf),
                             (ctx_FxC,), largest=False)
        parts["neg_key"].append(k), parts["neg_ctx"].append(c)
    new.update({k: jnp.stack(v) for k, v in parts.items()})
    new["max"] = jnp.maximum(state["max"], ctx_max_CxF.max(axis=0))

    # histogram and co-occurrences over the sampled contexts only (a fixed number of slots, padded)
    (slots,) = jnp.nonzero(sampled_C & real_C, size=n_sampled, fill_value=C)
    filled = slots < C
    sub = jnp.where(filled[:, None, None], a[jnp.minimum(slots, C - 1)], 0.0).reshape(n_sampled * T, F)
    on = sub > 0
    idx = jnp.arange(F)[None, :] * N_HIST + hist_bin(sub)
    hist = jnp.zeros(F * N_HIST, jnp.int32).at[idx.ravel()].add(on.ravel().astype(jnp.int32)).reshape(F, N_HIST)
    sub_valid = jnp.where(filled[:, None], valid_CxT[jnp.minimum(slots, C - 1)], False)
    sums = {
        "active": active_CxF.sum(axis=0, dtype=jnp.int32),
        "sum": sum_CxF.sum(axis=0),
        "tokens": valid_CxT.sum(dtype=jnp.int32),
        "hist": hist,
        "hist_tokens": sub_valid.sum(dtype=jnp.int32),
        "cooc": (on[:, cooc_idx_M].astype(jnp.float32).T @ on.astype(jnp.float32)).astype(jnp.int32),
    }
    return new, sums


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------
_jit_step = jax.jit(chunk_step, static_argnames=("seed", "n_sampled"), donate_argnums=(0,))


@dataclasses.dataclass
class ChunkInput:
    """One chunk of whole contexts: ids (-1 = padding), activations [C·T, d] and valid-token mask [C, T]."""

    ctx_C: np.ndarray
    acts: np.ndarray
    valid_CxT: np.ndarray


def store_chunks(store, hook: str, c_start: int, c_stop: int, contexts_per_chunk: int,
                 exclude_bos: bool) -> Iterator[ChunkInput]:
    """Contexts [c_start, c_stop) of a store in order, C at a time (the last chunk padded to C)."""
    T, C = store.context_length, contexts_per_chunk
    for c0 in range(c_start, c_stop, C):
        c1 = min(c0 + C, c_stop)
        acts = store.read_rows(hook, np.arange(c0 * T, c1 * T))
        valid = np.arange(T)[None, :] < np.asarray(store.n_valid[c0:c1])[:, None]
        if exclude_bos:
            valid[:, 0] = False
        pad = C - (c1 - c0)
        ctx = np.concatenate([np.arange(c0, c1), -np.ones(pad, np.int64)]).astype(np.int32)
        if pad:
            acts = np.concatenate([acts, np.zeros((pad * T, acts.shape[1]), acts.dtype)])
            valid = np.concatenate([valid, np.zeros((pad, T), bool)])
        yield ChunkInput(ctx, acts, valid)


def _host_init(n_features: int, n_cooc: int) -> dict:
    return {"active": np.zeros(n_features, np.int64), "sum": np.zeros(n_features, np.float64),
            "tokens": np.zeros((), np.int64), "hist": np.zeros((n_features, N_HIST), np.int64),
            "hist_tokens": np.zeros((), np.int64),
            "cooc": np.zeros((n_cooc, n_features), np.int64), "cooc_idx": np.full(n_cooc, -1, np.int64),
            "next_ctx": np.zeros((), np.int64)}


def _first_cooc_features(codes_NxF, valid_N, m: int) -> np.ndarray:
    """The m features firing on the most valid tokens of the first chunk (ties: lower index)."""
    counts = np.asarray(((jnp.asarray(codes_NxF) > 0) & jnp.asarray(valid_N)[:, None]).sum(axis=0))
    return np.argsort(-counts, kind="stable")[:m].astype(np.int64)


def cache_pass(store, dictionary, cfg: CacheConfig, run, *, progress: bool = True,
               stop_after_chunks: int | None = None) -> dict | None:
    """Stream the store's contexts through `dictionary.encode`, checkpointing in `run`; return the final
    state pytree ({"state", "host"}), or None when stopped early by `stop_after_chunks` (for tests)."""
    from tqdm.auto import tqdm

    F, T, C = dictionary.n_features, store.context_length, cfg.contexts_per_chunk
    n_ctx = store.n_contexts if not cfg.max_contexts else min(cfg.max_contexts, store.n_contexts)
    n_cooc = min(cfg.cooccur_top, F)
    like = {"state": init_state(F, cfg), "host": _host_init(F, n_cooc)}
    ckpt = run.checkpoints(keep=1)
    start = 0
    if run.resuming and ckpt.latest_step() is not None:
        like = ckpt.restore(ckpt.latest_step(), like=like)
        start = int(like["host"]["next_ctx"])
    state, host = like["state"], like["host"]
    bar = tqdm(total=(n_ctx - start) * T, unit="tok", unit_scale=True, disable=not progress, desc="cache",
               dynamic_ncols=True)
    chunks_done = 0
    chunks = Prefetcher(lambda: store_chunks(store, dictionary.hook, start, n_ctx, C, cfg.exclude_bos), depth=2)
    try:
        for chunk in chunks:
            codes = dictionary.encode(chunk.acts)
            real = chunk.ctx_C >= 0
            if host["cooc_idx"].size and host["cooc_idx"][0] < 0:
                host["cooc_idx"] = _first_cooc_features(codes, chunk.valid_CxT.reshape(-1), n_cooc)
            split = held_out_mask(np.maximum(chunk.ctx_C, 0), cfg.held_out_fraction, cfg.seed).astype(np.int32)
            sampled = real & (chunk.ctx_C % cfg.hist_stride == 0)
            state, sums = _jit_step(state, jnp.reshape(codes, (C, T, F)), jnp.asarray(chunk.valid_CxT),
                                    jnp.asarray(chunk.ctx_C), jnp.asarray(split), jnp.asarray(sampled),
                                    jnp.asarray(host["cooc_idx"], jnp.int32), seed=cfg.seed,
                                    n_sampled=-(-C // cfg.hist_stride))
            sums = jax.device_get(sums)
            host["active"] += sums["active"]
            host["sum"] += sums["sum"].astype(np.float64)
            host["tokens"] += int(sums["tokens"])
            host["hist"] += sums["hist"]
            host["hist_tokens"] += int(sums["hist_tokens"])
            host["cooc"] += sums["cooc"]
            host["next_ctx"] = np.asarray(int(chunk.ctx_C[real].max()) + 1, np.int64)
            chunks_done += 1
            bar.update(int(real.sum()) * T)
            done = int(host["next_ctx"]) >= n_ctx
            if chunks_done % cfg.checkpoint_every == 0 or done:
                ckpt.save(int(host["next_ctx"]), {"state": state, "host": host})
            if stop_after_chunks is not None and chunks_done >= stop_after_chunks and not done:
                ckpt.save(int(host["next_ctx"]), {"state": state, "host": host})
                return None
    finally:
        chunks.close()
        bar.close()
        ckpt.close()
    return {"state": state, "host": host}


# ---------------------------------------------------------------------------------------------
# Finalising: quantile bins and the published cache.h5
# ---------------------------------------------------------------------------------------------
def quantile_sample(ctx_R, act_R, key_R, n_quantiles: int, per_bin: int):
    """Cut a uniform sample of activating contexts into equal-count bins by activation (lowest first) and
    draw `per_bin` from each by smallest key; returns (ctx [Q,K], act [Q,K], edges [Q+1]), -1/0 padded,
    each bin's picks in descending activation."""
    ok = ctx_R >= 0
    ctx, act, key = ctx_R[ok], act_R[ok], key_R[ok]
    order = np.argsort(act, kind="stable")
    ctx, act, key = ctx[order], act[order], key[order]
    out_c = -np.ones((n_quantiles, per_bin), np.int32)
    out_a = np.zeros((n_quantiles, per_bin), np.float32)
    edges = np.zeros(n_quantiles + 1, np.float32)
    if not ctx.size:
        return out_c, out_a, edges
    bounds = np.floor(np.linspace(0, ctx.size, n_quantiles + 1)).astype(np.int64)
    for q in range(n_quantiles):
        lo, hi = bounds[q], bounds[q + 1]
        if hi <= lo:
            continue
        edges[q], edges[q + 1] = act[lo], act[hi - 1]
        pick = lo + np.argsort(key[lo:hi], kind="stable")[:per_bin]
        pick = pick[np.argsort(-act[pick], kind="stable")]
        out_c[q, :pick.size], out_a[q, :pick.size] = ctx[pick], act[pick]
    return out_c, out_a, edges


def finalize(final: dict, cfg: CacheConfig) -> dict:
    """The published arrays (see the module docstring) from the final pass state."""
    st = {k: np.asarray(v) for k, v in final["state"].items()}
    host = final["host"]
    S, F, Q, K = 2, st["max"].shape[0], cfg.n_quantiles, cfg.per_bin
    bin_ctx = -np.ones((S, F, Q, K), np.int32)
    bin_act = np.zeros((S, F, Q, K), np.float32)
    q_edges = np.zeros((S, F, Q + 1), np.float32)
    for s in range(S):
        for f in range(F):
            bin_ctx[s, f], bin_act[s, f], q_edges[s, f] = quantile_sample(
                st["res_ctx"][s, f], st["res_act"][s, f], st["res_key"][s, f], Q, K)
    tokens = max(int(host["tokens"]), 1)
    active = host["active"]
    top_ok = st["top_act"] > 0
    neg_ctx = st["neg_ctx"][:, :, :cfg.n_negative]
    return {
        "top_act": np.where(top_ok, st["top_act"], 0).astype(np.float32),
        "top_ctx": np.where(top_ok, st["top_ctx"], -1).astype(np.int32),
        "bin_act": bin_act, "bin_ctx": bin_ctx, "quantile_edges": q_edges,
        "neg_ctx": neg_ctx.astype(np.int32),
        "density": active / tokens, "max": st["max"].astype(np.float32), "mean": host["sum"] / tokens,
        "mean_active": np.where(active > 0, host["sum"] / np.maximum(active, 1), 0.0),
        "active_tokens": active.astype(np.int64),
        "hist": host["hist"], "hist_edges": HIST_EDGES, "hist_tokens": np.asarray(int(host["hist_tokens"]), np.int64),
        "cooc_features": host["cooc_idx"].astype(np.int32), "cooc": host["cooc"],
        "n_tokens": np.asarray(int(host["tokens"]), np.int64),
    }


def write_cache_file(path: Path, arrays: dict, attrs: dict) -> None:
    """Write cache.h5 atomically (temp file, fsync, rename) through the run layer."""
    import h5py

    from featureatlas.activation_store.runs import atomic_write

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            for name, arr in arrays.items():
                f.create_dataset(name, data=arr)
            f.attrs["format"] = CACHE_FORMAT
            for k, v in attrs.items():
                f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else v

    atomic_write(path, write)


# ---------------------------------------------------------------------------------------------
# The job and the reader
# ---------------------------------------------------------------------------------------------
CACHE_FILE = "cache.h5"


def check_inputs(store, dictionary) -> None:
    """Refuse a dictionary whose hook is not in the store or whose width does not match, before any work."""
    hook = dictionary.hook
    if hook not in store.hooks:
        raise ConfigError(f"the dictionary reads hook {hook!r} but store {store.path} has only "
                          f"{', '.join(store.hooks)}; harvest {hook} or pick a dictionary trained on a stored hook")
    validate_dictionary(dictionary, d_in=store.dim(hook))
    if store.n_contexts == 0:
        raise ConfigError(f"store {store.path} has no committed contexts yet; run or resume the harvest first")


def build_cache(store, dictionary, cfg: CacheConfig, out, *, dictionary_id: str, resume: bool = False,
                overwrite: bool = False, progress: bool = True, stop_after_chunks: int | None = None,
                flags: dict | None = None) -> Path | None:
    """The `featureatlas cache` job: a run directory `out` holding cache.h5 (see the module docstring)."""
    from featureatlas.activation_store.runs import Run

    cfg.validate()
    check_inputs(store, dictionary)
    kept = {k: v for k, v in cfg.to_dict().items() if k != "checkpoint_every"}  # changes no result
    settings = {"cache": kept, "store": {"path": str(Path(store.path).resolve()),
                                                  "fingerprint": store.fingerprint},
                "hook": dictionary.hook, "dictionary": dictionary_id, "n_features": dictionary.n_features}
    run = Run.prepare(out, "cache", settings, resume=resume, overwrite=overwrite, flags=flags,
                      ignore=("store",) if resume else ())
    with run.active():
        final = cache_pass(store, dictionary, cfg, run, progress=progress, stop_after_chunks=stop_after_chunks)
        if final is None:
            return None
        arrays = finalize(final, cfg)
        attrs = {"store_path": str(Path(store.path).resolve()), "store_fingerprint": store.fingerprint,
                 "hook": dictionary.hook, "dictionary": dictionary_id, "n_features": dictionary.n_features,
                 "n_contexts": int(final["host"]["next_ctx"]), "context_length": store.context_length,
                 "settings": cfg.to_dict()}
        write_cache_file(run.dir / CACHE_FILE, arrays, attrs)
        run.write_results({"n_tokens": int(arrays["n_tokens"]), "n_contexts": attrs["n_contexts"],
                           "dead_features": int((arrays["active_tokens"] == 0).sum()),
                           "n_features": dictionary.n_features})
    return run.dir / CACHE_FILE


class FeatureCache:
    """Read access to a published cache.h5 (arrays loaded on first use)."""

    def __init__(self, path):
        import h5py

        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / CACHE_FILE
        if not self.path.exists():
            raise ConfigError(f"no feature cache at {self.path}; run `featureatlas cache` first")
        with h5py.File(self.path, "r") as f:
            if f.attrs.get("format") != CACHE_FORMAT:
                raise ConfigError(f"{self.path} is not a featureatlas feature cache (format "
                                  f"{f.attrs.get('format')!r})")
            self.attrs = {k: (json.loads(v) if k == "settings" else v) for k, v in f.attrs.items()}
            self.arrays = {k: f[k][()] for k in f.keys()}
        self.n_features = int(self.attrs["n_features"])
        self.hook = str(self.attrs["hook"])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    @property
    def dead(self) -> np.ndarray:
        return self.arrays["active_tokens"] == 0

    def check_features(self, features) -> np.ndarray:
        return feature_ids(features, self.n_features)

    def examples(self, feature: int, split: int = EXPLAIN) -> dict:
        """{"top": [(ctx, act)], "quantiles": [[(ctx, act)] per bin, lowest first], "negative": [ctx]} of a split."""
        a = self.arrays
        top = [(int(c), float(v)) for c, v in zip(a["top_ctx"][split, feature], a["top_act"][split, feature]) if c >= 0]
        quant = [[(int(c), float(v)) for c, v in zip(a["bin_ctx"][split, feature, q], a["bin_act"][split, feature, q])
                  if c >= 0] for q in range(a["bin_ctx"].shape[2])]
        neg = [int(c) for c in a["neg_ctx"][split, feature] if c >= 0]
        return {"top": top, "quantiles": quant, "negative": neg}
