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

Crash safety: pass t reads Yᵀ from file `cur` and writes file `nxt` (never `cur` or the
best-so-far file), then atomically replaces the small checkpoint (Z, s, counters, which file
is which). A SIGKILL mid-pass leaves the checkpoint and `cur` intact; resuming redoes the pass.
"""
from __future__ import annotations

import math
import os
import queue
import threading
from functools import partial
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from featureatlas.snmf.init import make_initializer, sample_columns
from featureatlas.snmf.solver import (INITS, SNMFConfig, SNMFFit, check_finite, check_informative,
                         gram_of_sparse, multiplicative_update, row_scales, save_npz_atomic,
                         sparse_ZtA, validate_config, winner_take_all,
                         z_least_squares, densify)

STATE_FILE = "stream_state.npz"


class YFile:
    """Yᵀ (n×k float32) on disk, read and written by row ranges (created on first write)."""

    def __init__(self, path: str, n: int, k: int):
        self.path, self.n, self.k = path, n, k
        self.shape = (n, k)
        self.dtype = np.dtype(np.float32)

    def read(self, start: int, count: int) -> np.ndarray:
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"{self.path} is gone (streaming Y files are deleted once a result "
                                    "is saved); fit again without --resume")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            buf = os.pread(fd, count * self.k * 4, start * self.k * 4)
        finally:
            os.close(fd)
        return np.frombuffer(buf, np.float32).reshape(count, self.k)

    def write(self, start: int, Yt_CxK: np.ndarray) -> None:
        data = np.ascontiguousarray(Yt_CxK, np.float32).tobytes()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, data, start * self.k * 4)
        finally:
            os.close(fd)

    def flush(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)

    def __array__(self, dtype=None, copy=None):
        out = self.read(0, self.n)
        return out.astype(dtype) if dtype is not None else out


def remove_y_files(workdir: str) -> None:
    """Delete the streaming solver's Yᵀ files (n×k float32 each) once the result is saved."""
    for i in range(3):
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


def prefetch(it: Iterator, depth: int = 1) -> Iterator:
    """Run a producer iterator on a background thread, `depth` items ahead (reads overlap compute)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    sentinel = object()

    def run():
        try:
            for item in it:
                q.put(item)
            q.put(sentinel)
        except BaseException as err:  # re-raised on the consumer side
            q.put(err)

    threading.Thread(target=run, daemon=True).start()
    while True:
        item = q.get()
        if item is sentinel:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


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


def pad_rows(Yt_CxK: np.ndarray, size: int) -> np.ndarray:
    if len(Yt_CxK) == size:
        return Yt_CxK
    return np.concatenate([Yt_CxK, np.zeros((size - len(Yt_CxK), Yt_CxK.shape[1]), Yt_CxK.dtype)])


def fit_streaming(
    source,
    cfg: SNMFConfig,
    *,
    chunk_size: int,
    workdir: str,
    mu_steps: int = 1,
    save_y: bool = False,
    resume: bool = False,
    on_iter: Callable[[int, float, float, float], None] | None = None,
    progress: bool = False,
) -> SNMFFit:
    """Fit A ≈ Z·Y over `source` (see `snmf.data`) in passes of `chunk_size` tokens.

    Returns an `SNMFFit` with the best Z; with save_y its `Yt_NxK` is the best state's Yᵀ
    as a `YFile` in `workdir` (else None). Checkpoints after every pass; resume=True continues.
    """
    n, d = source.n, source.d
    validate_config(cfg, d, n)
    if chunk_size < 1 or mu_steps < 1 or cfg.iters < 1:
        raise ValueError("chunk_size, mu_steps and iters must be positive for the streaming solver")
    chunk_size = min(chunk_size, n)
    m = cfg.kept_per_column(d)
    os.makedirs(workdir, exist_ok=True)
    state_path = os.path.join(workdir, STATE_FILE)
    signature = np.asarray([d, n, cfg.k, m, cfg.seed, INITS.index(cfg.init), chunk_size,
                            mu_steps], np.int64)
    files = [YFile(os.path.join(workdir, f"y_{i}.f32"), n, cfg.k) for i in range(3)]

    st = None
    if resume and os.path.exists(state_path):
        with np.load(state_path) as ck:
            if not np.array_equal(ck["signature"], signature):
                raise ValueError(f"checkpoint {state_path} was written for a different problem "
                                 "(shape, k, p, seed, init, chunk size or mu_steps differ); "
                                 "remove it or drop --resume")
            st = {key: ck[key] for key in ck.files}
    if st is None:
        st = _pass_zero(source, cfg, chunk_size, files[0], m, signature)
        save_npz_atomic(state_path, **st)

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.iters, initial=int(st["iteration"]), desc="snmf-stream", unit="pass")
    losses: list[float] = []
    while int(st["iteration"]) < cfg.iters and int(st["bad_iters"]) < cfg.patience:
        st = _one_pass(source, st, chunk_size, files, mu_steps, cfg, save_y, m, progress)
        losses.append(float(st["loss"]))
        if on_iter:  # before the checkpoint: a kill in between only repeats this pass's record
            on_iter(int(st["iteration"]), float(st["loss"]), float(st["best_loss"]), float(st["sq_norm"]))
        save_npz_atomic(state_path, **st)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(rel_err=f"{math.sqrt(max(float(st['loss']), 0) / float(st['sq_norm'])):.4f}")
    if bar is not None:
        bar.close()

    iters = int(st["iteration"])
    if save_y and int(st["best_file"]) < 0:
        raise ValueError("this streaming run kept no best-state Y (it was started without --save-y); "
                         "fit again without --resume to save Y")
    Yt = files[int(st["best_file"])] if save_y else None
    return SNMFFit(Z_DxK=np.asarray(st["best_Zt"]).T.copy(),
                   loss=float(st["best_loss"]), sq_norm_A=float(st["sq_norm"]), iterations=iters,
                   losses=losses, stopped_early=int(st["bad_iters"]) >= cfg.patience, Yt_NxK=Yt)


def _pass_zero(source, cfg, chunk_size, yfile, m, signature) -> dict:
    """Initialize Y chunk by chunk, validate the data, and compute Z_1."""
    cols = sample_columns(source.n, cfg.init_sample, cfg.seed)
    sample_DxS = (np.zeros((source.d, 1), np.float32) if cfg.init == "random"
                  else np.asarray(source.take(cols), np.float32).T)
    init = make_initializer(sample_DxS, cfg.k, cfg.init, cfg.seed, cfg.kmeans_iters)
    YAt = np.zeros((cfg.k, source.d), np.float64)
    YYt = np.zeros((cfg.k, cfg.k), np.float64)
    sum_D, sumsq_D = np.zeros(source.d), np.zeros(source.d)
    for start, count, A in prefetch(transposed_chunks(source, chunk_size)):
        check_finite(A[:, :count], col_offset=start)
        A_DxC = A[:, :count] if cfg.init == "random" else np.asarray(A[:, :count], np.float32)
        Yt = pad_rows(np.ascontiguousarray(init.Y_for(A_DxC, start).T), chunk_size)
        yfile.write(start, Yt[:count])
        ya, yy, sum_c, sumsq_c = stream_chunk_stats(A, Yt)
        YAt += np.asarray(ya, np.float64)
        YYt += np.asarray(yy, np.float64)
        sum_D += np.asarray(sum_c, np.float64)
        sumsq_D += np.asarray(sumsq_c, np.float64)
    sq_norm = float(sumsq_D.sum())
    var_sum = float((sumsq_D - sum_D ** 2 / source.n).sum())
    check_informative(sq_norm, var_sum)
    yfile.flush()
    idx, vals, Q, s = stream_z_update(jnp.asarray(YAt, jnp.float32), jnp.asarray(YYt, jnp.float32), m=m)
    return dict(signature=signature, iteration=np.asarray(0), sq_norm=np.asarray(sq_norm),
                idx=np.asarray(idx), vals=np.asarray(vals), Q=np.asarray(Q), s=np.asarray(s),
                cur=np.asarray(0), best_file=np.asarray(-1), loss=np.asarray(np.inf),
                best_loss=np.asarray(np.inf), best_Zt=np.zeros((cfg.k, source.d), np.float32),
                bad_iters=np.asarray(0))


def _one_pass(source, st, chunk_size, files, mu_steps, cfg, save_y, m, progress) -> dict:
    cur, best_file = int(st["cur"]), int(st["best_file"]) if save_y else -1
    nxt = next(i for i in range(3) if i not in (cur, best_file))
    s, idx, vals, Q = (jnp.asarray(st[key]) for key in ("s", "idx", "vals", "Q"))
    YAt = np.zeros((cfg.k, source.d), np.float64)
    YYt = np.zeros((cfg.k, cfg.k), np.float64)
    cross = 0.0
    for start, count, A in prefetch(transposed_chunks(source, chunk_size)):
        Yt = pad_rows(files[cur].read(start, count), chunk_size)
        Yt_new, ya, yy, cr = stream_chunk_step(A, Yt, s, idx, vals, Q, mu_steps=mu_steps)
        files[nxt].write(start, np.asarray(Yt_new)[:count])
        YAt += np.asarray(ya, np.float64)
        YYt += np.asarray(yy, np.float64)
        cross += float(cr)
    files[nxt].flush()
    Zt_used = np.asarray(densify(idx, vals, source.d))
    # step 5 by the trace identity, with this pass's Z and the Y it just wrote
    loss = float(st["sq_norm"]) - 2.0 * cross + float(np.sum(np.asarray(Q, np.float64) * YYt))
    improved = loss < float(st["best_loss"]) * (1.0 - cfg.tol)
    new = dict(st)
    new.update(iteration=np.asarray(int(st["iteration"]) + 1), loss=np.asarray(loss), cur=np.asarray(nxt))
    if improved:
        new.update(best_loss=np.asarray(loss), best_Zt=Zt_used, bad_iters=np.asarray(0),
                   best_file=np.asarray(nxt if save_y else -1))
    else:
        new.update(bad_iters=np.asarray(int(st["bad_iters"]) + 1))
    idx, vals, Q, s = stream_z_update(jnp.asarray(YAt, jnp.float32), jnp.asarray(YYt, jnp.float32), m=m)
    new.update(idx=np.asarray(idx), vals=np.asarray(vals), Q=np.asarray(Q), s=np.asarray(s))
    return new
