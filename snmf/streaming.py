"""Streaming semi-NMF for activation matrices larger than memory.

Memory is O(chunk·d + k·d), independent of n (measured peak RSS ≈ 1.4 GB at chunk 32,768,
d 1536, k 100 for both 200,000 and 2,000,000 tokens; scripts/bench_snmf.py): A is read chunk by chunk from the source each
pass, and Yᵀ (n×k float32) lives in files in `workdir`, read and written chunk by chunk with
pread/pwrite (no memory map, so the resident set does not grow with n).

Why this is the same algorithm: step 4's multiplicative update of Y is separable over tokens
(column j of Y needs only column j of ZᵀA and Q = ZᵀZ), and step 1 needs only the sums
A·Yᵀ = Σ_chunks A_c Y_cᵀ and Y·Yᵀ = Σ_chunks Y_c Y_cᵀ. So the full-batch iteration can be
reordered around a pass over the data:

  pass 0 (initialization): for each chunk, Y_c ← init(A_c); accumulate A_cY_cᵀ, Y_cY_cᵀ,
          ‖A_c‖²; then steps 1–3 give Z_1 and the pending row scale s (Y is divided by s
          lazily, when each chunk is next read).
  pass t ≥ 1 (one streaming iteration): for each chunk, Y_c ← Y_c / s, then `mu_steps`
          multiplicative updates of Y_c with Z_t (step 4); accumulate A_cY_cᵀ, Y_cY_cᵀ and
          Σ (Z_tᵀA_c) ⊙ Y_c. The pass ends with loss_t = ‖A − Z_t Y_t‖²_F by the trace identity
          (step 5), best-so-far tracking, then steps 1–3 on the sums give Z_{t+1} and s.

With mu_steps = 1, pass t computes exactly full-batch iteration t (same Z_t, Y_t, loss_t, up
to float summation order). mu_steps > 1 is a block-coordinate variant of the same objective
‖A − ZY‖²_F: each read of A refines Y further before Z moves; the loss still never needs Z·Y.

Crash safety: pass t reads Yᵀ from file `cur` and writes a new version of file `nxt` (never
`cur` or the best-so-far file) to a temporary name that replaces it once complete
(`runs.atomic_write`); then the small state (Z, s, counters, which file is which) is saved as an
orbax checkpoint (`runs.Checkpoints`). A SIGKILL mid-pass leaves the checkpoint and `cur` intact;
resuming redoes the pass.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from featureatlas.activation_store.errors import ConfigError
from featureatlas.activation_store.prefetch import Prefetcher
from featureatlas.activation_store.runs import atomic_write, recover_publish
from featureatlas.snmf.init import make_initializer, sample_columns
from featureatlas.snmf.solver import (SNMFConfig, SNMFFit, check_finite, check_informative, densify, gram_of_sparse,
                                      multiplicative_update, relative_error, row_scales, sparse_ZtA, winner_take_all,
                                      z_least_squares)

Y_FILES = 3  # the current Yᵀ, the best state's Yᵀ (with save_y), and the one a pass writes
# The state between passes: numpy arrays of fixed dtypes, a pytree that orbax checkpoints as is.
STATE_DTYPES = {"iteration": np.int64, "sq_norm": np.float64, "idx": np.int32, "vals": np.float32,
                "Q": np.float32, "s": np.float32, "cur": np.int64, "best_file": np.int64, "loss": np.float64,
                "best_loss": np.float64, "best_Zt": np.float32, "bad_iters": np.int64}


def stream_state(**values) -> dict:
    """The streaming state from its values, each cast to its dtype in `STATE_DTYPES`."""
    return {key: np.asarray(values[key], dtype) for key, dtype in STATE_DTYPES.items()}


def stream_state_like(k: int, d: int, m: int) -> dict:
    """A zero state with the shapes of a (k features, dimension d, m kept) fit, to restore into."""
    shapes = {"idx": (k, m), "vals": (k, m), "Q": (k, k), "s": (k,), "best_Zt": (k, d)}
    return stream_state(**{key: np.zeros(shapes.get(key, ())) for key in STATE_DTYPES})


class YFile:
    """Yᵀ (n×k float32) in a file, read by row slices; each pass writes a whole new version
    (`rewrite_y`)."""

    def __init__(self, path: str, n: int, k: int):
        self.path, self.n, self.k, self.shape = path, n, k, (n, k)

    def __getitem__(self, rows: slice) -> np.ndarray:
        """Rows rows.start .. rows.stop (both given, stop <= n), like the same slice of an n×k array."""
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"{self.path} is gone (streaming Y files are deleted once a result "
                                    "is saved); fit again without --resume")
        count = rows.stop - rows.start
        with open(self.path, "rb", buffering=0) as f:
            buf = os.pread(f.fileno(), count * self.k * 4, rows.start * self.k * 4)
        return np.frombuffer(buf, np.float32).reshape(count, self.k)

    def __array__(self, dtype=None, copy=None):
        out = self[0:self.n]
        return out.astype(dtype) if dtype is not None else out


def rewrite_y(path: str, fill: Callable) -> object:
    """Write a new version of the Yᵀ file at `path`: `fill(write)` calls write(start, Yt_CxK) for
    row ranges; the file replaces the old one atomically (`runs.atomic_write`) once `fill` returns.
    Returns what `fill` returns."""
    result = []

    def write_file(tmp) -> None:
        with open(tmp, "r+b", buffering=0) as f:  # the temporary file atomic_write made; pwrite at row offsets
            result.append(fill(lambda start, Yt_CxK: os.pwrite(
                f.fileno(), np.ascontiguousarray(Yt_CxK, np.float32).tobytes(), start * Yt_CxK.shape[1] * 4)))

    atomic_write(path, write_file)
    return result[0]


def remove_y_files(workdir: str) -> None:
    """Delete the streaming solver's Yᵀ files (n×k float32 each) once the result is saved."""
    for i in range(Y_FILES):
        path = os.path.join(workdir, f"y_{i}.f32")
        if os.path.exists(path):
            os.unlink(path)


def as_float32(A_DxC):
    """float16 → float32 as its own pass: left fused, XLA feeds the products converted-on-the-fly
    float16 operands (measured 3x slower)."""
    return jax.lax.optimization_barrier(A_DxC.astype(jnp.float32))


@partial(jax.jit, static_argnames=("mu_steps",))
def stream_chunk_step(A_DxC, Yt_CxK, s_K, idx_KxM, vals_KxM, Q_KxK, *, mu_steps: int):
    """One chunk of a streaming pass: rescale, `mu_steps` × step 4, and the chunk's sums.

    Returns (Yt_CxK new, Y·Aᵀ k×d, Y·Yᵀ k×k, Σ (ZᵀA) ⊙ Y). Zero-padded tokens must come
    with zero Y (then they stay zero and add nothing).
    """
    A_DxC = as_float32(A_DxC)
    Y_KxC = Yt_CxK.T / s_K[:, None]
    ZtA_KxC = sparse_ZtA(idx_KxM, vals_KxM, A_DxC)
    for _ in range(mu_steps):
        Y_KxC = multiplicative_update(Y_KxC, ZtA_KxC, Q_KxK)
    return Y_KxC.T, Y_KxC @ A_DxC.T, Y_KxC @ Y_KxC.T, jnp.sum(ZtA_KxC * Y_KxC)


@jax.jit
def stream_chunk_stats(A_DxC, Yt_CxK):
    """Pass 0: the chunk's Y·Aᵀ, Y·Yᵀ, and per-dimension sums and sums of squares (for ‖A‖²
    and the constant-matrix check)."""
    A_DxC = as_float32(A_DxC)
    Y_KxC = Yt_CxK.T
    return Y_KxC @ A_DxC.T, Y_KxC @ Y_KxC.T, jnp.sum(A_DxC, axis=1), jnp.sum(A_DxC * A_DxC, axis=1)


@partial(jax.jit, static_argnames=("m",))
def stream_z_update(YAt_KxD, YYt_KxK, *, m: int):
    """Steps 1–3 from the accumulated sums: Z, its sparse form, Q = ZᵀZ and the pending scale."""
    Zt_KxD = z_least_squares(YAt_KxD, YYt_KxK)
    idx_KxM, vals_KxM = winner_take_all(Zt_KxD, m)
    s_K = row_scales(YYt_KxK)
    vals_KxM = vals_KxM * s_K[:, None]
    return idx_KxM, vals_KxM, gram_of_sparse(idx_KxM, vals_KxM, Zt_KxD.shape[1]), s_K


def transposed_chunks(source, chunk_size: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, count, A_DxC): each chunk transposed to the solver's d×tokens layout (in its own
    dtype), the last one zero-padded to chunk_size columns so one compiled shape serves all.
    Runs on the prefetch thread, so the transpose overlaps the previous chunk's compute."""
    for start, X in source.chunks(chunk_size):
        count = len(X)
        A_DxC = np.zeros((X.shape[1], chunk_size), X.dtype)
        for i in range(0, count, 256):  # blocked: ~2x faster than one strided copy
            j = min(i + 256, count)
            A_DxC[:, i:j] = X[i:j].T
        yield start, count, A_DxC


def fit_streaming(source, cfg: SNMFConfig, *, chunk_size: int, workdir: str, mu_steps: int = 1, save_y: bool = False,
                  checkpoints=None, on_iter: Callable[[int, float, float, float], None] | None = None,
                  progress: bool = False) -> SNMFFit:
    """Fit A ≈ Z·Y over `source` (see `snmf.data`) in passes of `chunk_size` tokens.

    Returns an `SNMFFit` with the best Z; with save_y its `Yt_NxK` is the best state's Yᵀ
    as a `YFile` in `workdir` (else None). checkpoints: an `activation_store.runs.Checkpoints`,
    saved after every pass (step = passes done, 0 after the initialization); when it holds a
    checkpoint the fit continues from it (the caller checks that it belongs to this problem).
    """
    from tqdm import tqdm

    n, d = source.n, source.d
    cfg.validate(d, n)
    if chunk_size < 1 or mu_steps < 1:
        raise ConfigError(f"--chunk-size ({chunk_size}) and --mu-steps ({mu_steps}) must be positive")
    chunk_size = min(chunk_size, n)
    m = cfg.kept_per_column(d)
    os.makedirs(workdir, exist_ok=True)
    recover_publish(workdir)  # drops the temporary Yᵀ file of a pass that was killed
    files = [YFile(os.path.join(workdir, f"y_{i}.f32"), n, cfg.k) for i in range(Y_FILES)]

    step = checkpoints.latest_step() if checkpoints is not None else None
    if step is not None:
        st = checkpoints.restore(step, like=stream_state_like(cfg.k, d, m))
    else:
        st = _pass_zero(source, cfg, chunk_size, files[0].path, m)
        if checkpoints is not None:
            checkpoints.save(0, st)

    losses: list[float] = []
    with tqdm(total=cfg.iters, initial=int(st["iteration"]), desc="snmf-stream", unit="pass",
              disable=not progress) as bar:
        while int(st["iteration"]) < cfg.iters and int(st["bad_iters"]) < cfg.patience:
            st = _one_pass(source, st, chunk_size, files, mu_steps, cfg, save_y, m)
            losses.append(float(st["loss"]))
            if on_iter:  # before the checkpoint: a kill in between only repeats this pass's record
                on_iter(int(st["iteration"]), float(st["loss"]), float(st["best_loss"]), float(st["sq_norm"]))
            if checkpoints is not None:
                checkpoints.save(int(st["iteration"]), st)
            bar.update(1)
            bar.set_postfix(rel_err=f"{relative_error(float(st['loss']), float(st['sq_norm'])):.4f}")

    if save_y and int(st["best_file"]) < 0:
        raise ConfigError("this streaming fit kept no best-state Y (it was started without --save-y); "
                          "fit again with --save-y from the start")
    return SNMFFit(Z_DxK=np.asarray(st["best_Zt"]).T.copy(), loss=float(st["best_loss"]),
                   sq_norm_A=float(st["sq_norm"]), iterations=int(st["iteration"]), losses=losses,
                   stopped_early=int(st["bad_iters"]) >= cfg.patience,
                   Yt_NxK=files[int(st["best_file"])] if save_y else None)


def _pass_zero(source, cfg, chunk_size, path, m) -> dict:
    """Initialize Y chunk by chunk into the Yᵀ file `path`, validate the data, and compute Z_1."""
    cols = sample_columns(source.n, cfg.init_sample, cfg.seed)
    sample_DxS = (np.zeros((source.d, 1), np.float32) if cfg.init == "random"
                  else np.asarray(source.take(cols), np.float32).T)
    init = make_initializer(sample_DxS, cfg.k, cfg.init, cfg.seed, cfg.kmeans_iters)

    def fill(write):  # float64 sums of the chunks' Y·Aᵀ, Y·Yᵀ, per-dimension sums and sums of squares
        sums = (np.zeros((cfg.k, source.d)), np.zeros((cfg.k, cfg.k)), np.zeros(source.d), np.zeros(source.d))
        with Prefetcher(lambda: transposed_chunks(source, chunk_size), depth=1) as chunks:
            for start, count, A in chunks:
                check_finite(A[:, :count], col_offset=start)
                A_DxC = A[:, :count] if cfg.init == "random" else np.asarray(A[:, :count], np.float32)
                Yt = np.pad(np.ascontiguousarray(init.Y_for(A_DxC, start).T), ((0, chunk_size - count), (0, 0)))
                write(start, Yt[:count])
                for total, part in zip(sums, stream_chunk_stats(A, Yt)):
                    total += np.asarray(part, np.float64)
        return sums

    YAt, YYt, sum_D, sumsq_D = rewrite_y(path, fill)
    sq_norm = float(sumsq_D.sum())
    check_informative(sq_norm, float((sumsq_D - sum_D ** 2 / source.n).sum()))
    idx, vals, Q, s = stream_z_update(jnp.asarray(YAt, jnp.float32), jnp.asarray(YYt, jnp.float32), m=m)
    return stream_state(iteration=0, sq_norm=sq_norm, idx=idx, vals=vals, Q=Q, s=s, cur=0, best_file=-1,
                        loss=np.inf, best_loss=np.inf, best_Zt=np.zeros((cfg.k, source.d)), bad_iters=0)


def _one_pass(source, st, chunk_size, files, mu_steps, cfg, save_y, m) -> dict:
    cur, best_file = int(st["cur"]), int(st["best_file"]) if save_y else -1
    nxt = next(i for i in range(Y_FILES) if i not in (cur, best_file))
    s, idx, vals, Q = (jnp.asarray(st[key]) for key in ("s", "idx", "vals", "Q"))

    def fill(write):
        YAt, YYt, cross = np.zeros((cfg.k, source.d)), np.zeros((cfg.k, cfg.k)), 0.0
        with Prefetcher(lambda: transposed_chunks(source, chunk_size), depth=1) as chunks:
            for start, count, A in chunks:
                Yt = np.pad(files[cur][start:start + count], ((0, chunk_size - count), (0, 0)))
                Yt_new, ya, yy, cr = stream_chunk_step(A, Yt, s, idx, vals, Q, mu_steps=mu_steps)
                write(start, np.asarray(Yt_new)[:count])
                YAt += np.asarray(ya, np.float64)
                YYt += np.asarray(yy, np.float64)
                cross += float(cr)
        return YAt, YYt, cross

    YAt, YYt, cross = rewrite_y(files[nxt].path, fill)
    # step 5 by the trace identity, with this pass's Z and the Y it just wrote
    loss = float(st["sq_norm"]) - 2.0 * cross + float(np.sum(np.asarray(Q, np.float64) * YYt))
    new = {**st, "iteration": int(st["iteration"]) + 1, "loss": loss, "cur": nxt}
    if loss < float(st["best_loss"]) * (1.0 - cfg.tol):
        new.update(best_loss=loss, best_Zt=densify(idx, vals, source.d), bad_iters=0, best_file=nxt if save_y else -1)
    else:
        new.update(bad_iters=int(st["bad_iters"]) + 1)
    new["idx"], new["vals"], new["Q"], new["s"] = stream_z_update(
        jnp.asarray(YAt, jnp.float32), jnp.asarray(YYt, jnp.float32), m=m)
    return stream_state(**new)
