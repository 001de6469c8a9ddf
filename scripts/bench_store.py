"""Benchmark harvesting and the store reader.

    .venv/bin/python scripts/bench_store.py [--tokens 24000] [--batch-size 16] [--random-weights]

SmolLM2-135M at context 128 capturing resid_post.15 and mlp_hidden.15 in float16 over BBC News:
harvest tokens/s (after a warm-up batch that compiles), the share of harvest time the writer thread
spends writing, the bare forward's tokens/s and effective GFLOP/s next to this machine's fp32 matmul
GFLOP/s, and the shuffled reader's tokens/s and MB/s (stored bytes) for resid_post.15, from the one
store file and from the same harvest written as `--shards` shard files (`harvest --shard i/n`) and read
as one store. Prints one JSON object on its last line.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from featureatlas.activation_store.corpus import CorpusConfig
from featureatlas.activation_store.harvest import HarvestConfig, harvest
from featureatlas.activation_store.models import load_model
from featureatlas.activation_store.store import ActivationStore
from featureatlas.scripts.benchlib import (emit, llama_flops_per_token, matmul_gflops, peak_rss_mb,
                                          smollm2_shaped_random, timed)

HOOKS = ("resid_post.15", "mlp_hidden.15")


def reader_speed(store, batch: int, n_batches: int) -> tuple[float, float]:
    """(rows/s, stored MB/s) of `n_batches` shuffled batches of HOOKS[0], after one that opens the reader."""
    hook = HOOKS[0]
    with store.batches(hook, batch, seed=0) as it:
        np.asarray(next(it))  # the first batch pays for opening and the first shuffle buffer
        t0 = time.perf_counter()
        for _ in range(n_batches):
            np.asarray(next(it))
        seconds = time.perf_counter() - t0
    rows = batch * n_batches
    return rows / seconds, rows * store.dim(hook) * np.dtype(store.dtype).itemsize / seconds / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=24000, help="tokens to harvest for the measurement")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--reader-batch", type=int, default=4096)
    p.add_argument("--reader-batches", type=int, default=40)
    p.add_argument("--random-weights", action="store_true", help="SmolLM2-shaped random model (no weights needed)")
    p.add_argument("--shards", type=int, default=2, help="also harvest in this many shards and time their reader "
                   "(0 = skip)")
    args = p.parse_args()

    matmul = matmul_start = matmul_gflops()
    model = "random-smollm2-shape" if args.random_weights else "smollm2-135m"
    lm, load_s = timed(smollm2_shaped_random if args.random_weights else lambda: load_model(model))
    T, B = 128, args.batch_size

    # Warm-up: compile the exact forward the harvest runs, then time the bare forward.
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, lm.config.vocab_size, (B, T)).astype(np.int32)
    tokens[:, 0] = lm.tokenizer.bos_id
    mask = np.ones_like(tokens)

    def forward():
        _, caps = lm.forward(lm.params, tokens, attention_mask_BxT=mask, capture=HOOKS, stop_at="capture")
        return jax.block_until_ready(caps)

    _, compile_s = timed(forward)
    forward_tps = B * T / min(timed(forward)[1] for _ in range(2))
    n_layers = 1 + max(int(h.split(".")[1]) for h in HOOKS)
    forward_gflops = llama_flops_per_token(lm.config, n_layers, T) * forward_tps / 1e9

    cfg = HarvestConfig(model=model, hooks=HOOKS, corpus=CorpusConfig(source="bbc", context_length=T,
                                                                        max_tokens=args.tokens),
                        dtype="float16", batch_size=B, commit_contexts=4 * B)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        path = Path(tmp) / "store.h5"
        result = harvest(cfg, path, lm=lm, progress=False)
        reader_tps, reader_mbps = reader_speed(result.store, args.reader_batch, args.reader_batches)
        size_mb = path.stat().st_size / 2**20
        sharded = {}
        if args.shards > 0:
            for i in range(args.shards):
                harvest(cfg.replace(shard=f"{i}/{args.shards}"), Path(tmp) / "sharded", lm=lm, progress=False)
            tps, _ = reader_speed(ActivationStore.open(Path(tmp) / "sharded"), args.reader_batch, args.reader_batches)
            sharded = {"shards": args.shards, "sharded_reader_tokens_per_s": round(tps, 1)}

    # The machine is shared: measure the matmul rate again at the end and keep the better one.
    matmul_end = matmul_gflops()
    matmul = max(matmul, matmul_end)
    emit({
        "model": model,
        "harvest_tokens_per_s": round(result.tokens_per_s, 1),
        "harvest_tokens": result.new_tokens,
        "harvest_wall_s": round(result.wall_s, 2),
        "write_share": round(result.write_s / result.wall_s, 4),
        "write_stall_share": round(result.stall_s / result.wall_s, 4),
        "padding_share": round(1 - result.new_tokens / (result.new_contexts * T), 4),
        "batch_size": B,
        "forward_tokens_per_s": round(forward_tps, 1),
        "forward_gflops": round(forward_gflops, 2),
        "matmul_gflops": round(matmul, 2),
        "matmul_gflops_start_end": [round(matmul_start, 2), round(matmul_end, 2)],
        "forward_over_matmul": round(forward_gflops / matmul, 3),
        "reader_tokens_per_s": round(reader_tps, 1),
        "reader_mb_per_s": round(reader_mbps, 1),
        "reader_batch": args.reader_batch,
        **sharded,
        "store_mb": round(size_mb, 2),
        "load_s": round(load_s, 2),
        "compile_s": round(compile_s, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    })


if __name__ == "__main__":
    main()
