"""Benchmark the SNMF solvers; prints one JSON object on the last line.

  full batch: ms per iteration at d 1536, n 20,000, k 100, p 0.01 (target ≤ 150 ms; the
    authors' PyTorch code takes ≈ 380 ms on this 2-core machine), and the rate in GFLOP/s of
    the flops the step actually performs (`snmf.solver.step_flops`: Y·Aᵀ 2dnk, the gathered
    ZᵀA 2mkn, the Gram and Q·Y products 6nk², elementwise ≈ 12nk);
  streaming: tokens/s of one pass and the peak RSS of the process running it, over a store of
    2,000,000 × 1536 float16 activations (≈ 6 GB, written under /tmp chunk by chunk and deleted
    afterwards; --quick: 200,000). The fit runs in a child process so the RSS is its own.

    python scripts/bench_snmf.py [--quick] [--tokens N] [--chunk-size C]
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from featureatlas.scripts.benchlib import emit, matmul_gflops, peak_rss_mb, run_json, timed

D, N, K, P = 1536, 20_000, 100, 0.01
T = 129  # context length: BOS + 128 tokens


def mlp_like(rng, n: int, d: int) -> np.ndarray:
    """GELU of shifted Gaussians: mostly small negative values, a minority of larger positives
    (the shape of MLP hidden activations)."""
    pre = rng.standard_normal((n, d), np.float32) - 0.7
    return 0.5 * pre * (1.0 + np.tanh(0.7978845608 * (pre + 0.044715 * pre ** 3)))


def bench_full_batch(steps: int) -> dict:
    from featureatlas.snmf.solver import SNMFConfig, step_flops, time_steps

    A_DxN = mlp_like(np.random.default_rng(0), N, D).T.copy()
    cfg = SNMFConfig(k=K, p=P)
    best = time_steps(A_DxN, cfg, n_steps=steps)
    flops = step_flops(D, N, K, cfg.kept_per_column(D))
    return {"ms_per_iter": round(best * 1e3, 2), "gflops": round(flops / best / 1e9, 1),
            "flops_per_iter_g": round(flops / 1e9, 3), "dense_equiv_gflop_per_iter": round(2 * 2 * D * N * K / 1e9, 2)}


def write_bench_store(path: str, tokens: int) -> None:
    from featureatlas.activation_store.store import StoreWriter, create_store

    n_ctx = math.ceil(tokens / (T - 1))
    commit = 64
    create_store(path, tokens_NxT=np.ones((n_ctx, T), np.int32), n_valid_N=np.full(n_ctx, T, np.int32),
                 doc_id_N=np.arange(n_ctx, dtype=np.int64), label_N=np.full(n_ctx, -1, np.int32),
                 label_names=(), dims={"mlp_hidden.15": D}, dtype="float16", attrs={},
                 commit_contexts=commit, val_fraction=0.0, bos_id=1)
    rng = np.random.default_rng(1)
    pool = [mlp_like(rng, commit * T, D).astype(np.float16) for _ in range(4)]
    with contextlib.closing(StoreWriter(path, fsync=False)) as writer:
        for i, c0 in enumerate(range(0, n_ctx, commit)):
            c1 = min(c0 + commit, n_ctx)
            writer.commit(c0, c1, {"mlp_hidden.15": pool[i % len(pool)][:(c1 - c0) * T]})


def streaming_child(store_path: str, chunk_size: int, passes: int) -> dict:
    """Runs in its own process: open the store, one initialization pass + `passes` passes."""
    from featureatlas.activation_store import ActivationStore
    from featureatlas.snmf.data import StoreColumns
    from featureatlas.snmf.solver import SNMFConfig
    from featureatlas.snmf.streaming import fit_streaming

    source = StoreColumns.open(ActivationStore.open(store_path), "mlp_hidden.15")
    stamps = []
    work = tempfile.mkdtemp(prefix="snmf_bench_y_", dir=os.path.dirname(store_path))
    t0 = time.perf_counter()
    fit_streaming(source, SNMFConfig(k=K, p=P, iters=passes, patience=10**6, tol=0.0), chunk_size=chunk_size,
                  workdir=work, on_iter=lambda *a: stamps.append(time.perf_counter()))
    shutil.rmtree(work, ignore_errors=True)
    pass_times = np.diff(stamps)  # passes 2.. (the first stamp also covers the initialization pass)
    return {"n_tokens": source.n, "init_and_first_pass_s": round(stamps[0] - t0, 2),
            "pass_seconds": [round(float(x), 2) for x in pass_times],
            "streaming_tokens_per_s": round(source.n / float(np.min(pass_times)), 1),
            "streaming_peak_rss_mb": round(peak_rss_mb(), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="streaming over 200,000 tokens instead of 2,000,000")
    ap.add_argument("--tokens", type=int, default=None, help="streaming store size in tokens")
    ap.add_argument("--chunk-size", type=int, default=32768, help="streaming chunk size (tokens)")
    ap.add_argument("--passes", type=int, default=2, help="streaming passes after initialization (>= 2; "
                    "the rate is taken from passes 2..)")
    ap.add_argument("--steps", type=int, default=10, help="timed full-batch iterations (best is reported)")
    ap.add_argument("--tmp", default=tempfile.gettempdir(), help="where the temporary store goes")
    ap.add_argument("--streaming-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.passes < 2:
        ap.error("--passes must be at least 2")
    if args.streaming_child:
        emit(streaming_child(args.streaming_child, args.chunk_size, args.passes))
        return

    tokens = args.tokens or (200_000 if args.quick else 2_000_000)
    result = {"d": D, "n": N, "k": K, "p": P, "matmul_gflops": round(matmul_gflops(), 1)}
    result.update(bench_full_batch(args.steps))
    result["authors_pytorch_ms_per_iter"] = 380
    with tempfile.TemporaryDirectory(prefix="snmf_bench_", dir=args.tmp, ignore_cleanup_errors=True) as tmpdir:
        store = os.path.join(tmpdir, "bench.h5")
        _, write_s = timed(lambda: write_bench_store(store, tokens))
        result["store_write_s"] = round(write_s, 1)
        result.update(run_json([sys.executable, os.path.abspath(__file__), "--streaming-child", store,
                                "--chunk-size", str(args.chunk_size), "--passes", str(args.passes)]))
    result["chunk_size"] = args.chunk_size
    result["matmul_gflops_after"] = round(matmul_gflops(), 1)
    emit(result)


if __name__ == "__main__":
    main()
