"""Harvest-style forward speed of the JAX model core at SmolLM2-135M's exact shape (random weights).

Captures resid_post.15 and mlp_hidden.15 with stop_at="capture" (layers 0-15 only, no unembedding)
on batches of B x 128 tokens. Prints one JSON object on the last line (and writes it to --out).

    .venv/bin/python scripts/bench_lm.py [--batch 16 32] [--steps 6] [--dtype float32|bfloat16] [--out f.json]

--dtype is the forward's compute dtype (`lm.forward(..., compute_dtype=...)`, what `harvest --compute-dtype`
uses); bfloat16 params are cast once before timing, as the harvest does. `matmul_efficiency` divides the
forward's matmul FLOP rate by the machine's float32 matmul rate measured in the same run (for bfloat16 on an
accelerator it can exceed 1: bfloat16 matmuls have a higher peak). Reference on a GPU: transformers bf16
SmolLM2-135M at 256x128 was measured at 1.09M tokens/s (issue 11).
"""
from __future__ import annotations

import argparse

import jax
import numpy as np

from featureatlas.activation_store.models.transformer import COMPUTE_DTYPES
from featureatlas.scripts.benchlib import (emit, llama_flops_per_token, machine, matmul_gflops, peak_rss_mb,
                                          smollm2_shaped_random, timed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--dtype", choices=COMPUTE_DTYPES, default="float32", help="compute dtype of the forward")
    ap.add_argument("--out", default="", help="also write the JSON result to this file")
    args = ap.parse_args()

    lm = smollm2_shaped_random()
    hooks = ("resid_post.15", "mlp_hidden.15")
    fpt = llama_flops_per_token(lm.config, 16, args.ctx)
    result = {"benchmark": "lm_harvest_forward", "model": "smollm2-135m-shape (random)", "ctx": args.ctx,
              "dtype": args.dtype, **machine(), "hooks": list(hooks), "mflop_per_token": round(fpt / 1e6, 1),
              "per_batch": {}}
    params = lm.params_in(args.dtype)
    jax.block_until_ready(params)
    rng = np.random.default_rng(0)
    mm_before = matmul_gflops()  # the machine is shared: measure its rate on both sides of the run
    best_tps = 0.0
    for B in args.batch:
        toks = rng.integers(3, lm.config.vocab_size, size=(B, args.ctx))
        toks[:, 0] = lm.config.bos_id
        fwd = lambda: jax.block_until_ready(  # noqa: E731
            lm.forward(params, toks, capture=hooks, stop_at="capture", compute_dtype=args.dtype))
        compile_s, *times = [timed(fwd)[1] for _ in range(1 + args.steps)]  # the first call compiles
        best, med = min(times), float(np.median(times))
        tps_best, tps_med = B * args.ctx / best, B * args.ctx / med
        best_tps = max(best_tps, tps_best)
        result["per_batch"][str(B)] = {
            "first_call_s": round(compile_s, 2), "best_s": round(best, 4), "median_s": round(med, 4),
            "tokens_per_s_best": round(tps_best, 1), "tokens_per_s_median": round(tps_med, 1),
            "gflops_best": round(tps_best * fpt / 1e9, 1), "gflops_median": round(tps_med * fpt / 1e9, 1)}
        print(B, result["per_batch"][str(B)], flush=True)
    result["tokens_per_s"] = round(best_tps, 1)
    mm_after = matmul_gflops()
    result["machine_matmul_gflops_before_after"] = [round(mm_before, 1), round(mm_after, 1)]
    result["machine_matmul_gflops"] = round(max(mm_before, mm_after), 1)
    result["matmul_efficiency"] = round(best_tps * fpt / 1e9 / result["machine_matmul_gflops"], 3)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    emit(result, args.out)


if __name__ == "__main__":
    main()
