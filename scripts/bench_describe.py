"""Benchmark of the describe pipeline's heavy parts; prints one JSON object on the last line.

cache      the feature-cache pass (eval/cache.py) over a synthetic float16 store, against the rate at which
           the dictionary's encode alone runs on the same chunks (the bookkeeping must not dominate:
           goal >= 60%); for a TopK SAE (d 576, width 4608, k 32) and SNMF (d 1536, k 100, NNLS encode).
memory     peak RSS of the cache pass (SAE) on a store and on one 10x larger, each in a fresh process
           (goal: < 10% growth).
tokenchange  `scripts/bench_tokenchange.py` (256 features, batched vs one feature per forward), unless
           --no-tokenchange.
Every section reports the machine's matmul rate measured in the same run.

    .venv/bin/python -m featureatlas.scripts.bench_describe [--tokens 32768] [--no-tokenchange]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from featureatlas.scripts.benchlib import emit, matmul_gflops, peak_rss_mb, run_json, timed

T = 128


def synthetic_store(path: Path, hook: str, d: int, n_tokens: int, seed: int = 0):
    from featureatlas.activation_store.store import write_store

    n_ctx = max(1, n_tokens // T)
    rng = np.random.default_rng(seed)
    acts = rng.normal(size=(n_ctx * T, d)).astype(np.float16)
    tokens = rng.integers(3, 49000, size=(n_ctx, T)).astype(np.int32)
    return write_store(path, acts={hook: acts}, tokens=tokens)


def topk_sae(hook: str, d: int = 576, width: int = 4608, k: int = 32, seed: int = 0):
    from featureatlas.saes.config import SAEConfig
    from featureatlas.saes.sae import sae_from_params

    rng = np.random.default_rng(seed)
    W = rng.normal(size=(d, width)).astype(np.float32) / np.sqrt(d)
    params = {"W_enc": W, "b_enc": np.zeros(width, np.float32), "W_dec": np.ascontiguousarray(W.T),
              "b_dec": np.zeros(d, np.float32)}
    return sae_from_params(SAEConfig(architecture="topk", d_in=d, width=width, k=k, hook_in=hook), params)


def snmf_dictionary(hook: str, d: int = 1536, k: int = 100, seed: int = 0):
    from featureatlas.snmf.dictionary import SNMFDictionary

    Z = np.random.default_rng(seed).normal(size=(d, k)).astype(np.float32)
    return SNMFDictionary(hook, Z / np.linalg.norm(Z, axis=0))


def encode_only_rate(store, dic, cfg) -> float:
    """Tokens/s of dic.encode alone over the same chunks the cache pass reads (reads excluded)."""
    import jax

    from featureatlas.eval.cache import store_chunks

    chunks = list(store_chunks(store, dic.hook, 0, store.n_contexts, cfg.contexts_per_chunk, cfg.exclude_bos))
    jax.block_until_ready(dic.encode(chunks[0].acts))
    t0 = time.perf_counter()
    for ch in chunks:
        jax.block_until_ready(dic.encode(ch.acts))
    return store.n_contexts * T / (time.perf_counter() - t0)


def cache_rate(store, dic, cfg, tmp: Path, name: str) -> dict:
    from featureatlas.eval.cache import build_cache

    warm = synthetic_store(tmp / f"{name}-warm.h5", dic.hook, store.dim(dic.hook), cfg.contexts_per_chunk * T * 2)
    build_cache(warm, dic, cfg, tmp / f"{name}-warm", dictionary_id=name, progress=False)  # compile
    enc = encode_only_rate(store, dic, cfg)
    _, seconds = timed(lambda: build_cache(store, dic, cfg, tmp / name, dictionary_id=name, progress=False))
    rate = store.n_contexts * T / seconds
    return {"cache_tokens_per_s": round(rate, 1), "encode_only_tokens_per_s": round(enc, 1),
            "cache_over_encode": round(rate / enc, 3)}


def memory_child(store_path: str) -> None:
    """The cache pass alone in a fresh process over an existing store: its peak RSS."""
    from featureatlas.activation_store.store import ActivationStore
    from featureatlas.eval.cache import CacheConfig, build_cache

    store = ActivationStore.open(store_path)
    with tempfile.TemporaryDirectory() as tmp:
        build_cache(store, topk_sae("resid_post.15"), CacheConfig(), Path(tmp) / "c", dictionary_id="sae",
                    progress=False)
    emit({"n_tokens": store.n_contexts * T, "peak_rss_mb": round(peak_rss_mb(), 1)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=32768, help="tokens of the synthetic store for the rate")
    p.add_argument("--memory-tokens", type=int, default=65536, help="small store of the memory test (x10 for large)")
    p.add_argument("--no-tokenchange", action="store_true")
    p.add_argument("--memory-child", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    from featureatlas.eval.cache import CacheConfig

    out = {"matmul_gflops_before": round(matmul_gflops(), 1)}
    cfg = CacheConfig()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        s_res = synthetic_store(tmp / "res.h5", "resid_post.15", 576, args.tokens)
        out["sae_w4608"] = cache_rate(s_res, topk_sae("resid_post.15"), cfg, tmp, "sae")
        s_mlp = synthetic_store(tmp / "mlp.h5", "mlp_hidden.15", 1536, args.tokens // 4)
        out["snmf_k100"] = cache_rate(s_mlp, snmf_dictionary("mlp_hidden.15"), cfg, tmp, "snmf")
    mem = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.memory_tokens, 10 * args.memory_tokens):
            path = Path(tmp) / f"mem{n}.h5"
            synthetic_store(path, "resid_post.15", 576, n).close()
            mem.append(run_json([sys.executable, "-m", "featureatlas.scripts.bench_describe", "--memory-child",
                                 str(path)]))
            path.unlink()
    out["memory"] = {"small": mem[0], "large": mem[1],
                     "rss_growth": round(mem[1]["peak_rss_mb"] / mem[0]["peak_rss_mb"] - 1, 3)}
    if not args.no_tokenchange:
        out["tokenchange"] = run_json([sys.executable, "-m", "featureatlas.scripts.bench_tokenchange"])
    out["matmul_gflops_after"] = round(matmul_gflops(), 1)
    emit(out)


if __name__ == "__main__":
    main()
