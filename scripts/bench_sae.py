"""Benchmark one SAE training step per architecture (d_in 576, width 4608, batch 4096, k 32).

Each architecture runs in its own subprocess (clean compile cache and peak RSS); the step is the
trainer's real jitted step (loss, grads, decoder projection, Adam, buffers), timed in steady state
after compilation on synthetic Gaussian batches. The last stdout line is one JSON object:
  {"matmul_gflops": ..., "config": {...}, "results": [{arch, tokens_per_s, gflops, step_ms, peak_rss_mb}, ...]}
gflops counts the flops the step executes: dense architectures 10·B·D·F (encoder forward 2BDF,
decoder forward 2BFD, decoder backward 2·2BFD, encoder weight gradient 2BDF; Gated 14·B·D·F with its
auxiliary reconstruction through the frozen decoder, forward and backward); the TopK family
2·B·D·F for the dense pre-activations plus 10·N·D for the sparse products (N = k·B entries,
Matryoshka the same), which is why its rate looks low while its tokens/s is high.

Usage: python scripts/bench_sae.py [--archs relu,topk,...] [--steps 6] [--batch 4096] ...
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def step_flops(arch: str, B: int, D: int, F: int, k: int) -> float:
    from featureatlas.saes.architectures import ARCHITECTURES

    return ARCHITECTURES[arch].train_flops(B, D, F, k)


def run_one(arch: str, d_in: int, width: int, batch: int, k: int, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from featureatlas.saes.config import SAEConfig, SAETrainConfig
    from featureatlas.saes.trainer import build_step, initial_state, make_mesh, state_shardings
    from featureatlas.scripts.benchlib import peak_rss_mb

    hook = "bench"
    tcfg = SAETrainConfig(batch_size=batch, total_tokens=batch * 10_000, geometric_median_samples=0)
    cfg = SAEConfig(architecture=arch, d_in=d_in, width=width, k=k, hook_in=hook, dead_tokens=10_000_000).validate()

    class _Source:  # just what initial_state needs
        pass

    mesh = make_mesh(1, 1)
    step_fn, optimizers, zero_sums = build_step([cfg], tcfg, mesh)
    state = initial_state([cfg], tcfg, _Source(), optimizers)
    state = state.replace(sums=zero_sums(state.saes, {hook: jax.ShapeDtypeStruct((batch, d_in), jnp.float32)}))
    state = jax.device_put(state, state_shardings(state, mesh))
    jstep = jax.jit(step_fn, donate_argnums=(0,))
    keys = jax.random.split(jax.random.key(0), 3)
    # Activation-like data: a shared mean direction plus Gaussian spread.
    mean = jax.random.normal(keys[0], (d_in,)) * 0.5
    batches = [{hook: jax.random.normal(kk, (batch, d_in)) + mean} for kk in jax.random.split(keys[1], 3)]
    t0 = time.perf_counter()
    state = jax.block_until_ready(jstep(state, batches[0]))
    compile_s = time.perf_counter() - t0
    state = jax.block_until_ready(jstep(state, batches[1]))  # one more warm step
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        state = jax.block_until_ready(jstep(state, batches[i % 3]))
        times.append(time.perf_counter() - t0)
    # Median: the machine is shared, so single steps are sometimes slowed by other jobs.
    dt = float(np.median(times))
    metrics = jax.device_get(state.sums[0])
    return {
        "arch": arch,
        "tokens_per_s": round(batch / dt, 1),
        "gflops": round(step_flops(arch, batch, d_in, width, k) / dt / 1e9, 2),
        "step_ms": round(dt * 1e3, 1),
        "best_step_ms": round(min(times) * 1e3, 1),
        "compile_s": round(compile_s, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "l0": round(float(metrics["l0"]) / (steps + 2), 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="", help="comma list of architectures (default: all)")
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--width", type=int, default=4608)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=6, help="timed steps per architecture (median reported)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        res = run_one(args.child, args.d_in, args.width, args.batch, args.k, args.steps)
        print(json.dumps(res), flush=True)
        return 0

    from featureatlas.scripts.benchlib import emit, matmul_gflops

    gf = matmul_gflops()
    results = []
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from featureatlas.saes.architectures import ARCHITECTURES

    for arch in args.archs.split(",") if args.archs else ARCHITECTURES:
        cmd = [sys.executable, "-m", "featureatlas.scripts.bench_sae", "--child", arch, "--d-in", str(args.d_in), "--width",
               str(args.width), "--batch", str(args.batch), "--k", str(args.k), "--steps", str(args.steps)]
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            results.append({"arch": arch, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"})
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{arch:>10}: {res['tokens_per_s']:>9.0f} tok/s  {res['step_ms']:>7.1f} ms/step  "
              f"{res['gflops']:>6.1f} GFLOP/s  rss {res['peak_rss_mb']:.0f} MB", flush=True)
        results.append(res)
    gf_after = matmul_gflops()
    emit({
        "benchmark": "sae_train_step",
        "matmul_gflops": round(gf, 1),
        "matmul_gflops_after": round(gf_after, 1),
        "config": {"d_in": args.d_in, "width": args.width, "batch": args.batch, "k": args.k, "steps": args.steps},
        "results": results,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
