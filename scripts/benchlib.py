"""Shared benchmark helpers: every benchmark reports the machine's matmul rate beside its own numbers,
because absolute times on a shared machine drift."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp


def matmul_gflops(m: int = 4096, k: int = 2048, n: int = 4096, repeats: int = 5) -> float:
    """Best-of-`repeats` fp32 JAX matmul rate, GFLOP/s = 2·m·k·n / seconds / 1e9."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (m, k), jnp.float32)
    b = jax.random.normal(kb, (k, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()  # compile
    best = min(timed(lambda: f(a, b).block_until_ready())[1] for _ in range(repeats))
    return 2.0 * m * k * n / best / 1e9


def timed(fn):
    """(fn(), seconds it took)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_json(cmd: list[str], **kwargs) -> dict:
    """Run `cmd` (a benchmark child or another benchmark) and return the JSON object on its last stdout line."""
    r = subprocess.run(cmd, capture_output=True, text=True, check=True, **kwargs)
    return json.loads(r.stdout.strip().splitlines()[-1])


def machine() -> dict:
    """Backend, device kind and JAX version, for the head of a result."""
    return {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}


def llama_flops_per_token(cfg, n_layers: int, T: int = 0) -> float:
    """Matmul FLOPs per token of `n_layers` Llama blocks: projections 2·(D·(H+2K)·E + H·E·D + 3·D·F) plus,
    for context length T, attention scores and mixing 2·2·T·H·E (the full T x T square, then masked)."""
    D, F, H, K, E = cfg.d_model, cfg.d_mlp, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    return float(n_layers * (2 * (D * (H + 2 * K) * E + H * E * D + 3 * D * F) + 4 * T * H * E))


def smollm2_shaped_random(seed: int = 0):
    """A random-weight model of SmolLM2-135M's exact shape (no weights needed)."""
    from featureatlas.activation_store.models import random_model

    return random_model("llama", n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, d_mlp=1536,
                        vocab_size=49152, max_ctx=8192, rope_base=100000.0, seed=seed)


def peak_rss_mb() -> float:
    """Peak resident memory of this program so far, in MB.

    Linux: VmHWM of /proc/self/status. Not ru_maxrss: Linux keeps ru_maxrss across execve, so a benchmark
    child started by a large parent would report the parent's peak (seen: 4.3 GB for a 1 GB child).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def emit(result: dict, out: str = "") -> dict:
    """Print the benchmark's result as one JSON object on the last line of stdout (and write it to `out`)."""
    if out:
        from featureatlas.activation_store.runs import atomic_write_json

        atomic_write_json(out, result)
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    return result
