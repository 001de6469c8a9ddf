"""Benchmark one SAE training step per architecture, with a per-op breakdown.

Presets (`--preset`; --d-in/--width/--batch/--k override single sizes):
  small    d_in 576,  width 4608,  batch 4096, k 32   (a SmolLM2-135M residual SAE; CPU-sized)
  gemma2b  d_in 2304, width 65536, batch 8192, k 64   (a Gemma-2-2B residual SAE; meant for a GPU. On
           a CPU a step takes tens of seconds: use --steps 1 --warmup 0)

Each (architecture, sparse implementation) runs in its own subprocess (clean compile cache and peak
RSS); the step is the trainer's real jitted step (loss, grads, decoder projection, Adam, buffers) in
`--dtype` compute (float32, or bfloat16 with float32 parameters, optimizer state and sums), timed in
steady state after compilation and `--warmup` more steps, on synthetic Gaussian batches. The TopK family
runs with the automatic sparse implementation (saes/sparse.py: 'gather' on GPU/TPU, 'loop' on CPU);
the architectures in --legacy also run the path before issue 11 ('legacy') in the same run, so the
speedup is measured at the same matmul rate.

ops_ms (automatic implementation only; each piece jitted alone on the step's shapes, median):
  encoder_matmul  pre = (x − b_dec) @ W_encᵀ + b_enc, compute dtype in, float32 sums, compute dtype out
  selection       TopK: top-k per row (saes/topk.py); BatchTopK: the batch's top k·B
  decode          x̂ = Σ_n vals[n] · W_dec[feats[n]] (the sparse decoder, forward)
  backward        the sparse backward: d vals, d W_dec, d x, d W_enc, d b_enc
  optimizer       decoder-gradient projection, clipping, Adam, decoder renormalisation
Dense architectures report encoder_matmul and optimizer only.

gflops counts the flops the step executes: dense architectures 10·B·D·F (encoder forward 2BDF,
decoder forward 2BFD, decoder backward 2·2BFD, encoder weight gradient 2BDF; Gated 14·B·D·F with its
auxiliary reconstruction through the frozen decoder, forward and backward); the TopK family
2·B·D·F for the dense pre-activations plus 10·N·D for the sparse products (N = k·B entries,
Matryoshka the same), which is why its rate looks low while its tokens/s is high. step_cpu_ms is the
process CPU time of a step (all threads, median): on a shared machine a steadier measure of the work
than wall time.

The last stdout line is one JSON object:
  {"benchmark", "backend", "device", "preset", "dtype", "matmul_gflops", "matmul_gflops_after", "config",
   "results": [{arch, impl, tokens_per_s, step_ms, best_step_ms, step_cpu_ms, gflops, compile_s, peak_rss_mb,
                l0, ops_ms}, ...],
   "summary": {"topk_speedup_vs_legacy", "batchtopk_over_topk", "tokens_per_s_per_matmul_gflops", ...},
   "complete"}   (--out is rewritten after every architecture; complete: all ran)

Usage: python -m featureatlas.scripts.bench_sae [--preset small] [--dtype float32] [--archs topk,batchtopk]
       [--steps 6] [--warmup 1] [--legacy topk] [--no-ops] [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PRESETS = {
    "small": {"d_in": 576, "width": 4608, "batch": 4096, "k": 32},
    "gemma2b": {"d_in": 2304, "width": 65536, "batch": 8192, "k": 64},
}
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")
HOOK = "bench"


def make_setup(arch: str, d_in: int, width: int, batch: int, k: int, dtype: str, abstract: bool = False):
    """(cfg, step_fn, optimizers, state, batch_shapes) of a one-SAE trainer step on synthetic sizes;
    abstract: the state as shapes only (nothing allocated; for lowering at sizes that do not fit)."""
    import jax
    import jax.numpy as jnp

    from featureatlas.saes.config import SAEConfig, SAETrainConfig
    from featureatlas.saes.trainer import build_step, initial_state, make_mesh

    tcfg = SAETrainConfig(batch_size=batch, total_tokens=batch * 10_000, geometric_median_samples=0,
                          compute_dtype=dtype).validate()
    cfg = SAEConfig(architecture=arch, d_in=d_in, width=width, k=k, hook_in=HOOK, dead_tokens=10_000_000).validate()

    step_fn, optimizers, zero_sums = build_step([cfg], tcfg, make_mesh(1, 1))
    shapes = {HOOK: jax.ShapeDtypeStruct((batch, d_in), jnp.float32)}

    def init():
        state = initial_state([cfg], tcfg, None, optimizers)  # no geometric-median samples: no source read
        return state.replace(sums=zero_sums(state.saes, shapes))

    state = jax.eval_shape(init) if abstract else init()
    return cfg, step_fn, optimizers, state, shapes


def _timed(fn, *args, repeats: int = 5) -> float:
    """Median seconds of fn(*args) after one compiling call and one warm call."""
    import jax
    import numpy as np

    from featureatlas.scripts.benchlib import timed

    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    return float(np.median([timed(lambda: jax.block_until_ready(fn(*args)))[1] for _ in range(repeats)]))


def op_timings(cfg, optimizers, params, opt_state, x, dtype_name: str, repeats: int) -> dict:
    """Milliseconds of each piece of the step, jitted alone (module docstring)."""
    import jax
    import jax.numpy as jnp
    import optax

    from featureatlas.saes import architectures as A
    from featureatlas.saes import sparse

    dtype = jnp.dtype(dtype_name)
    arch = A.architecture(cfg)
    out = {}

    @jax.jit
    def encoder(p, x):
        return (A._mm(x - p["b_dec"], p["enc_FxD"], dtype) + p["b_enc"]).astype(dtype)

    out["encoder_matmul"] = _timed(encoder, params, x, repeats=repeats)

    opt, _ = optimizers[0]
    grads = jax.tree.map(lambda p: p * 1e-3, params)

    @jax.jit
    def optimizer(params, opt_state, grads):
        grads = A.project_decoder_grad(params, grads)
        updates, opt_state = opt.update(grads, opt_state, params)
        return A.normalise_decoder(optax.apply_updates(params, updates)), opt_state

    out["optimizer"] = _timed(optimizer, params, opt_state, grads, repeats=repeats)
    if cfg.architecture in TOPK_FAMILY:
        impl = sparse.impl()
        sel_arch = arch.selection(cfg)
        pre = encoder(params, x)
        static = {}

        def select(pre):
            e, values, _ = sel_arch.select(cfg, pre, impl)
            static.update(n_rows=e.n_rows, k=e.k)
            return e.rows, e.feats, e.by_feat, e.valid, values

        jselect = jax.jit(select)
        out["selection"] = _timed(jselect, pre, repeats=repeats)
        arrays = jselect(pre)  # (rows, feats, by_feat, valid, values)
        exact = dtype == jnp.float32

        def entries(a):
            rows, feats, by_feat, valid, _ = a
            return sparse.Entries(rows, feats, static["n_rows"], static["k"], by_feat, valid, impl)

        def preacts(a, x, W, b):
            return sparse.selected_preacts(entries(a), x - params["b_dec"], W, b, dtype, a[4] if exact else None)

        @jax.jit
        def decode(a, x, p):
            vals = jax.nn.relu(preacts(a, x, p["enc_FxD"], p["b_enc"]))
            return sparse.decode(entries(a), vals, p["dec_FxE"], dtype)

        out["decode"] = _timed(decode, arrays, x, params, repeats=repeats)

        @jax.jit
        def backward(a, x, p, g_BxE):
            pre_N, pre_vjp = jax.vjp(lambda W, b: preacts(a, x, W, b), p["enc_FxD"], p["b_enc"])
            vals = jax.nn.relu(pre_N)
            _, dec_vjp = jax.vjp(lambda v, W: sparse.decode(entries(a), v, W, dtype), vals, p["dec_FxE"])
            d_vals, d_dec = dec_vjp(g_BxE)
            d_enc, d_b = pre_vjp(d_vals * (pre_N > 0))
            return d_dec, d_enc, d_b

        g = jax.random.normal(jax.random.key(5), (x.shape[0], cfg.d_out), jnp.float32) * 1e-3
        out["backward"] = _timed(backward, arrays, x, params, g, repeats=repeats)
    return {k: round(v * 1e3, 2) for k, v in out.items()}


def run_one(arch: str, impl: str, d_in: int, width: int, batch: int, k: int, dtype: str, steps: int,
            warmup: int, ops: bool) -> dict:
    import jax
    import numpy as np

    from featureatlas.saes import sparse
    from featureatlas.saes.architectures import ARCHITECTURES
    from featureatlas.saes.trainer import make_mesh, state_shardings
    from featureatlas.scripts.benchlib import peak_rss_mb, timed

    with sparse.use_impl(sparse.default_impl() if impl == "auto" else impl):
        used = sparse.impl()
        cfg, step_fn, optimizers, state, _ = make_setup(arch, d_in, width, batch, k, dtype)
        state = jax.device_put(state, state_shardings(state, make_mesh(1, 1)))
        jstep = jax.jit(step_fn, donate_argnums=(0,))
        keys = jax.random.split(jax.random.key(0), 3)
        # Activation-like data: a shared mean direction plus Gaussian spread.
        mean = jax.random.normal(keys[0], (d_in,)) * 0.5
        batches = [{HOOK: jax.random.normal(kk, (batch, d_in)) + mean} for kk in jax.random.split(keys[1], 3)]
        state, compile_s = timed(lambda: jax.block_until_ready(jstep(state, batches[0])))
        for i in range(warmup):
            state = jax.block_until_ready(jstep(state, batches[(i + 1) % 3]))
        times, cpu = [], []
        for i in range(steps):
            t0, c0 = time.perf_counter(), time.process_time()
            state = jax.block_until_ready(jstep(state, batches[i % 3]))
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        # Median: the machine may be shared, so single steps are sometimes slowed by other jobs.
        dt = float(np.median(times))
        metrics = jax.device_get(state.sums[0])
        res = {"arch": arch, "impl": used if arch in TOPK_FAMILY else "dense", "tokens_per_s": round(batch / dt, 1),
               "gflops": round(ARCHITECTURES[arch].train_flops(batch, d_in, width, k) / dt / 1e9, 2),
               "step_ms": round(dt * 1e3, 2), "best_step_ms": round(min(times) * 1e3, 2),
               "step_cpu_ms": round(float(np.median(cpu)) * 1e3, 2), "compile_s": round(compile_s, 1),
               "l0": round(float(metrics["l0"]) / (steps + warmup + 1), 1)}
        if ops:
            s = state.saes[0]
            res["ops_ms"] = op_timings(cfg, optimizers, s.params, s.opt, batches[0][HOOK], dtype, max(3, steps))
        res["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return res


def summary(results: list[dict], gf: float) -> dict:
    """Ratios the issue's targets are stated in: new TopK over legacy TopK, BatchTopK over TopK (tokens/s)."""
    by = {(r["arch"], r["impl"]): r for r in results if "tokens_per_s" in r}
    auto = {r["arch"]: r for r in results if "tokens_per_s" in r and r["impl"] != "legacy"}
    out = {}
    if "topk" in auto and ("topk", "legacy") in by:
        new, old = auto["topk"], by[("topk", "legacy")]
        out["topk_speedup_vs_legacy"] = round(new["tokens_per_s"] / old["tokens_per_s"], 3)
        out["topk_cpu_time_ratio_legacy_over_new"] = round(old["step_cpu_ms"] / new["step_cpu_ms"], 3)
    if "topk" in auto and "batchtopk" in auto:
        out["batchtopk_over_topk"] = round(auto["batchtopk"]["tokens_per_s"] / auto["topk"]["tokens_per_s"], 3)
        out["batchtopk_cpu_time_over_topk"] = round(auto["batchtopk"]["step_cpu_ms"] / auto["topk"]["step_cpu_ms"], 3)
    out["tokens_per_s_per_matmul_gflops"] = {f"{a}/{i}": round(r["tokens_per_s"] / gf, 2) for (a, i), r in by.items()}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=tuple(PRESETS), default="small", help="sizes (module docstring)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--archs", default="", help="comma list of architectures (default: all)")
    p.add_argument("--legacy", default="topk",
                   help="comma list of TopK-family archs also run on the legacy path ('' none, 'all')")
    for n in PRESETS["small"]:  # --d-in --width --batch --k
        p.add_argument(f"--{n.replace('_', '-')}", type=int, default=None)
    p.add_argument("--steps", type=int, default=6, help="timed steps per architecture (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the compiling one")
    p.add_argument("--no-ops", dest="ops", action="store_false", help="skip the per-op breakdown")
    p.add_argument("--timeout", type=float, default=0, help="seconds per architecture subprocess (0: none)")
    p.add_argument("--out", default="", help="also write the JSON object to this file")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = {n: getattr(args, n) if getattr(args, n) is not None else v for n, v in PRESETS[args.preset].items()}
    from featureatlas.scripts.benchlib import emit, machine, matmul_gflops

    if args.child:
        job = json.loads(args.child)
        res = run_one(job["arch"], job["impl"], sizes["d_in"], sizes["width"], sizes["batch"], sizes["k"],
                      args.dtype, args.steps, args.warmup, job["ops"])
        emit(res)
        return 0

    from featureatlas.saes.architectures import ARCHITECTURES

    archs = [a for a in args.archs.split(",") if a] or list(ARCHITECTURES)
    unknown = [a for a in archs if a not in ARCHITECTURES]
    if unknown:
        p.error(f"unknown architecture(s) {', '.join(unknown)}; choose from {', '.join(ARCHITECTURES)}")
    legacy = set(TOPK_FAMILY) if args.legacy == "all" else {a for a in args.legacy.split(",") if a}
    jobs = [(a, i) for a in archs for i in ("auto", "legacy") if i == "auto" or (a in legacy and a in TOPK_FAMILY)]
    gf = matmul_gflops()
    results = []
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def report(gf_after: float, complete: bool) -> dict:
        result = {"benchmark": "sae_train_step", **machine(), "preset": args.preset, "dtype": args.dtype,
                  "matmul_gflops": round(gf, 1), "matmul_gflops_after": round(gf_after, 1),
                  "config": {**sizes, "steps": args.steps, "warmup": args.warmup}, "results": results,
                  "summary": summary(results, 0.5 * (gf + gf_after)), "complete": complete}
        if args.out:  # after every architecture, so a run cut short still leaves what it measured
            from featureatlas.activation_store.runs import atomic_write_json

            atomic_write_json(args.out, result)
        return result

    for arch, impl in jobs:
        job = json.dumps({"arch": arch, "impl": impl, "ops": args.ops and impl == "auto"})
        cmd = [sys.executable, "-m", "featureatlas.scripts.bench_sae", "--child", job, "--preset", args.preset,
               "--dtype", args.dtype, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        for n, v in sizes.items():
            cmd += [f"--{n.replace('_', '-')}", str(v)]
        try:
            proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=args.timeout or None)
            error = "" if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["failed"])[-1]
        except subprocess.TimeoutExpired:
            proc, error = None, f"timed out after {args.timeout:g} s"
        if error:  # recorded, and the next architecture runs
            print(f"{arch:>10} {impl:>6}: timed out" if proc is None else proc.stderr[-3000:], file=sys.stderr,
                  flush=True)
            results.append({"arch": arch, "impl": impl, "error": error})
        else:
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            ops = " ".join(f"{k} {v:.1f}" for k, v in res.get("ops_ms", {}).items())
            print(f"{arch:>10} {res['impl']:>6}: {res['tokens_per_s']:>9.0f} tok/s  {res['step_ms']:>8.1f} ms/step  "
                  f"{res['gflops']:>7.1f} GFLOP/s  rss {res['peak_rss_mb']:.0f} MB  {ops}", flush=True)
            results.append(res)
        report(gf, False)
    emit(report(matmul_gflops(), True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
