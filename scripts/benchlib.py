"""Shared benchmark helpers: every benchmark reports the machine's matmul rate beside its own numbers,
because absolute times on a shared machine drift."""
from __future__ import annotations

import json
import resource
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
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best / 1e9


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


def emit(result: dict) -> None:
    """Print the benchmark's result as one JSON object on the last line of stdout."""
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
