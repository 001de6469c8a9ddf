"""Full-batch semi-NMF with winner-take-all sparsity (Shafran, Geiger & Geva 2025).

Factorizes A ∈ ℝ^{d×n} (hook dimension × tokens; tokens are columns) as A ≈ Z·Y with
Z ∈ ℝ^{d×k} of any sign (the features) and Y ∈ ℝ^{k×n}, Y ≥ 0 (token coefficients).
The updates are Ding, Li & Jordan (2010), "Convex and Semi-Nonnegative Matrix
Factorizations", plus the SNMF paper's winner-take-all sparsity on Z and row rescaling.

One iteration (`snmf_step`, one `jax.jit`), for the state (Z_{t-1}, Y_{t-1}):
  1. Z ← A Yᵀ (Y Yᵀ + 1e-6·I)⁻¹                     (least squares for Z given Y)
  2. winner-take-all: each column of Z keeps its m = ⌈p·d⌉ largest-|·| entries
  3. s_j = ‖Y_j,:‖₂; Y_j,: ← Y_j,:/s_j, Z_:,j ← s_j·Z_:,j   (ZY unchanged)
  4. G = Yᵀ, P = AᵀZ, Q = ZᵀZ, G ← G ⊙ sqrt((P⁺ + G Q⁻) / (P⁻ + G Q⁺ + 1e-6)),
     X⁺ = (|X|+X)/2, X⁻ = (|X|−X)/2                  (Ding et al. 2010, eq. 8)
  5. loss_t = ‖A − Z_t Y_t‖²_F with Z_t from step 3 and Y_t from step 4, i.e. the loss
     of the state the iteration returns, computed by the trace identity
     ‖A‖² − 2·tr(Z_tᵀ A Y_tᵀ) + tr(Z_tᵀZ_t · Y_t Y_tᵀ), where tr(Zᵀ A Yᵀ) = Σ (ZᵀA) ⊙ Y
     reuses step 4's P = AᵀZ, and Y_t Y_tᵀ is also next iteration's step-1 Gram
     matrix. The d×n product Z·Y is never formed.
Best-so-far: a state whose loss is below best·(1 − tol) becomes the best and resets the
patience counter; otherwise the counter grows, and the fit stops once it reaches
`patience` (tol is relative, so the rule does not depend on the scale of A).

Layout and cost (d 1536, n 20,000, k 100, p 0.01): A is kept d×n in fp32 so that rows of
A are contiguous. Step 1 is Y·Aᵀ (k×d, 2·d·n·k flops, the only dense big product).
After winner-take-all each column of Z has m nonzeros, so ZᵀA (k×n) is a sum of m
gathered, weighted rows of A per feature: 2·m·k·n flops instead of 2·d·k·n.
Measured on the 2-core CPU (same run): Y·Aᵀ 36 ms with A d×n vs 72 ms with A n×d
(Aᵀ·G); the gathered ZᵀA 4 ms with A d×n (whole contiguous rows) vs 190 ms with A n×d
(strided columns) vs 80–95 ms as a dense product. Hence d×n.
"""
from __future__ import annotations

import dataclasses
import math
import time
from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from featureatlas.activation_store.configs import Config, setting
from featureatlas.activation_store.errors import ConfigError, FeatureAtlasError
from featureatlas.snmf.init import initial_factors

RIDGE = 1e-6  # step 1's Tikhonov term (the authors' value)
MU_EPS = 1e-6  # step 4's denominator guard (the authors' value)
# Above this many kept entries per column the gathered product loses to one dense matmul
# (measured: one gathered slot ≈ 0.3 ms vs ≈ 40 ms dense at n 20,000, k 100).
MAX_GATHER_SLOTS = 64
INITS = ("random", "svd", "kmeans")


@dataclasses.dataclass(frozen=True)
class SNMFConfig(Config):
    """Hyper-parameters of one semi-NMF fit (the paper's defaults)."""

    k: int = setting(100, gt=0)
    """Number of features (columns of Z); for --method pca, the number of components."""
    p: float = setting(0.01, gt=0, le=1)
    """Fraction of entries kept per feature (column of Z) by winner-take-all, in (0, 1]; the paper uses 0.01."""
    init: str = setting("random", choices=INITS)
    """Initialization of the factors."""
    iters: int = setting(1000, ge=1)
    """Maximum iterations (streaming solver: passes over the data)."""
    patience: int = setting(20, ge=1)
    """Stop after this many iterations without a relative loss improvement larger than --tol."""
    tol: float = setting(1e-4, ge=0)
    """Relative loss improvement that counts as progress."""
    seed: int = setting(0, ge=0)
    """Seed of the initialization and of the --max-tokens subset."""
    init_sample: int = setting(20_000, gt=0)
    """Tokens the svd / kmeans initializer is fitted on."""
    kmeans_iters: int = setting(15, ge=1)
    """Lloyd iterations of the kmeans initializer."""

    def kept_per_column(self, d: int) -> int:
        """m = ⌈p·d⌉, the number of nonzeros winner-take-all keeps in each column of Z."""
        return max(1, min(d, math.ceil(self.p * d - 1e-9)))

    def validate(self, d: int | None = None, n: int | None = None) -> "SNMFConfig":
        """The declared ranges, and with the matrix shape (d × n) k < min(d, n); ConfigError otherwise."""
        super().validate()
        if d is not None and n is not None and self.k >= min(d, n):
            raise ConfigError(f"k={self.k} must be smaller than min(d, n) = min({d}, {n}): lower --k "
                              "(with --hierarchy, its first rank) or fit on more tokens")
        return self


class MatrixError(FeatureAtlasError, ValueError):
    """The activation matrix cannot be factorized (non-finite values, all zeros, constant)."""


def check_finite(A_DxN: np.ndarray, *, col_offset: int = 0, what: str = "activations") -> None:
    """Raise naming the first NaN/Inf (token column and dimension) and how many there are."""
    bad = ~np.isfinite(A_DxN)
    if bad.any():
        col, dim = np.unravel_index(np.argmax(bad.T), bad.T.shape)  # the first in column order
        raise MatrixError(f"{what} contain {int(bad.sum())} non-finite values (NaN/Inf); the first is "
                          f"{A_DxN[dim, col]} at token column {col + col_offset}, dimension {dim}. "
                          "Re-harvest the store or drop those tokens.")


def check_informative(sq_norm: float, col_var_sum: float) -> None:
    """Raise for an all-zero matrix or one whose tokens are all identical (constant)."""
    if sq_norm == 0.0:
        raise MatrixError("the activation matrix is all zeros: there is nothing to factorize "
                          "(wrong hook, or the store was not filled)")
    if col_var_sum <= 1e-12 * sq_norm:
        raise MatrixError("the activation matrix is constant (every token has the same "
                          "activation vector): it has rank 1 and no features to find")


def check_matrix(A_DxN: np.ndarray) -> float:
    """Validate a full-batch matrix; returns ‖A‖²_F (accumulated in float64)."""
    if A_DxN.ndim != 2:
        raise ValueError(f"A must be 2-D (d × n), got shape {A_DxN.shape}")
    check_finite(A_DxN)
    sq = var_sum = 0.0
    for i in range(0, A_DxN.shape[0], 64):  # float64 accumulation, a few rows at a time
        rows = A_DxN[i:i + 64].astype(np.float64)
        sq += float(np.einsum("ij,ij->", rows, rows))
        var_sum += float(rows.var(axis=1).sum() * A_DxN.shape[1])
    check_informative(sq, var_sum)
    return sq


# ----------------------------------------------------------------------------- math


def z_least_squares(YAt_KxD, YYt_KxK):
    """Step 1 transposed: Zᵀ = (Y Yᵀ + 1e-6·I)⁻¹ (Y Aᵀ)  ⇔  Z = A Yᵀ (Y Yᵀ + 1e-6·I)⁻¹."""
    return jnp.linalg.solve(YYt_KxK + RIDGE * jnp.eye(YYt_KxK.shape[0], dtype=YYt_KxK.dtype), YAt_KxD)


def winner_take_all(Zt_KxD, m: int):
    """Step 2: keep the m largest-|·| entries of each feature (row of Zᵀ).

    Returns (idx_KxM, vals_KxM), the kept positions and values; zeros elsewhere.
    """
    _, idx_KxM = jax.lax.top_k(jnp.abs(Zt_KxD), m)
    return idx_KxM, jnp.take_along_axis(Zt_KxD, idx_KxM, axis=1)


def densify(idx_KxM, vals_KxM, d: int):
    """The sparse Zᵀ as a dense k×d array."""
    k = idx_KxM.shape[0]
    rows = jnp.broadcast_to(jnp.arange(k)[:, None], idx_KxM.shape)
    return jnp.zeros((k, d), vals_KxM.dtype).at[rows, idx_KxM].set(vals_KxM)


def sparse_ZtA(idx_KxM, vals_KxM, A_DxN):
    """ZᵀA (k×n) for Z with m nonzeros per column: Σ_s vals[:, s] · A[idx[:, s], :].

    2·m·k·n flops. Each slot gathers k contiguous rows of A; XLA fuses gather, scale and
    add, so A is read once per slot and nothing of size m·k·n is materialized.
    """
    m = idx_KxM.shape[1]
    # Materialize (idx, vals) first: left to itself XLA fuses their producers (top-k slice,
    # take_along_axis, rescale) into the gather loop and recomputes them per output element
    # (measured 6x slower at k 100, n 20,000).
    idx_KxM, vals_KxM = jax.lax.optimization_barrier((idx_KxM, vals_KxM))
    if m > MAX_GATHER_SLOTS:
        return densify(idx_KxM, vals_KxM, A_DxN.shape[0]) @ A_DxN
    out_KxN = vals_KxM[:, 0, None] * A_DxN[idx_KxM[:, 0], :]
    for s in range(1, m):
        out_KxN = out_KxN + vals_KxM[:, s, None] * A_DxN[idx_KxM[:, s], :]
    return out_KxN


def gram_of_sparse(idx_KxM, vals_KxM, d: int):
    """Q = ZᵀZ (k×k) from the sparse columns of Z."""
    Zt_KxD = densify(idx_KxM, vals_KxM, d)
    return Zt_KxD @ Zt_KxD.T


def multiplicative_update(Y_KxN, ZtA_KxN, Q_KxK):
    """Step 4 in the k×n layout (G = Yᵀ, P = AᵀZ so Pᵀ = ZᵀA, and (G Q^±)ᵀ = Q^± Y):

    Y ← Y ⊙ sqrt((ZᵀA⁺ + Q⁻Y) / (ZᵀA⁻ + Q⁺Y + 1e-6)), which keeps Y ≥ 0 (Ding et al. 2010, eq. 8),
    with X⁺ = (|X| + X)/2 = max(X, 0) and X⁻ = (|X| − X)/2 = max(−X, 0).
    """
    k = Q_KxK.shape[0]
    QY = jnp.concatenate([jnp.maximum(Q_KxK, 0), jnp.maximum(-Q_KxK, 0)], axis=0) @ Y_KxN  # one (2k×k)·(k×n) product
    num = jnp.maximum(ZtA_KxN, 0) + QY[k:]
    den = jnp.maximum(-ZtA_KxN, 0) + QY[:k] + MU_EPS
    return Y_KxN * jnp.sqrt(num / den)


def trace_loss(sq_norm_A, ZtA_KxN, Y_KxN, Q_KxK, YYt_KxK):
    """‖A − ZY‖²_F = ‖A‖² − 2·Σ (ZᵀA) ⊙ Y + Σ (ZᵀZ) ⊙ (Y Yᵀ), without forming Z·Y."""
    return sq_norm_A - 2.0 * jnp.sum(ZtA_KxN * Y_KxN) + jnp.sum(Q_KxK * YYt_KxK)


def row_scales(YYt_KxK):
    """Step 3's s_j = ‖Y_j,:‖₂ from the Gram diagonal; an all-zero row keeps scale 1."""
    s = jnp.sqrt(jnp.diagonal(YYt_KxK))
    return jnp.where(s > 0, s, 1.0)


# ----------------------------------------------------------------------------- state + step


class SNMFState(NamedTuple):
    """Everything one iteration needs; Zᵀ is kept sparse (idx, vals) and dense (Zt_KxD)."""

    Zt_KxD: jax.Array  # current features, transposed (dense, zeros where WTA dropped)
    Y_KxN: jax.Array  # current coefficients, ≥ 0
    YYt_KxK: jax.Array  # Y Yᵀ of the current Y
    loss: jax.Array  # ‖A − ZY‖² of (Zt_KxD, Y_KxN); inf before the first iteration
    best_Zt_KxD: jax.Array
    best_Y_KxN: jax.Array
    best_loss: jax.Array
    bad_iters: jax.Array  # iterations since the last improvement > tol


def initial_state(Zt_KxD, Y_KxN) -> SNMFState:
    """The state before iteration 1 (dtype of Y_KxN: float32 in practice, float64 in tests)."""
    Y = jnp.asarray(Y_KxN)
    Zt = jnp.asarray(Zt_KxD, Y.dtype)
    inf = np.asarray(np.inf, Y.dtype)
    # separate buffers: the step donates its input state
    return SNMFState(Zt, Y, Y @ Y.T, jnp.asarray(inf), jnp.array(Zt, copy=True),
                     jnp.array(Y, copy=True), jnp.asarray(inf), jnp.asarray(0, jnp.int32))


def snmf_update(A_DxN, Y_KxN, YYt_KxK, sq_norm_A, m: int):
    """Steps 1–5 on plain arrays; returns (Zt_KxD, Y_KxN, YYt_KxK, loss) of the new state."""
    d = A_DxN.shape[0]
    Zt_KxD = z_least_squares(Y_KxN @ A_DxN.T, YYt_KxK)  # 1
    idx_KxM, vals_KxM = winner_take_all(Zt_KxD, m)  # 2
    s_K = row_scales(YYt_KxK)  # 3
    Y_KxN = Y_KxN / s_K[:, None]
    vals_KxM = vals_KxM * s_K[:, None]
    ZtA_KxN = sparse_ZtA(idx_KxM, vals_KxM, A_DxN)  # 4
    Q_KxK = gram_of_sparse(idx_KxM, vals_KxM, d)
    Y_KxN = multiplicative_update(Y_KxN, ZtA_KxN, Q_KxK)
    YYt_KxK = Y_KxN @ Y_KxN.T  # 5
    loss = trace_loss(sq_norm_A, ZtA_KxN, Y_KxN, Q_KxK, YYt_KxK)
    return densify(idx_KxM, vals_KxM, d), Y_KxN, YYt_KxK, loss


@partial(jax.jit, static_argnames=("m", "tol"), donate_argnums=(0,))
def snmf_step(state: SNMFState, A_DxN, sq_norm_A, *, m: int, tol: float) -> SNMFState:
    """One full semi-NMF iteration (steps 1–5 + best-so-far), compiled as one XLA program.
    Best-so-far bookkeeping: improvement means loss < best·(1 − tol)."""
    Zt, Y, YYt, loss = snmf_update(A_DxN, state.Y_KxN, state.YYt_KxK, sq_norm_A, m)
    improved = loss < state.best_loss * (1.0 - tol)
    return SNMFState(Zt, Y, YYt, loss, jnp.where(improved, Zt, state.best_Zt_KxD),
                     jnp.where(improved, Y, state.best_Y_KxN), jnp.where(improved, loss, state.best_loss),
                     jnp.where(improved, 0, state.bad_iters + 1).astype(jnp.int32))


def step_flops(d: int, n: int, k: int, m: int) -> float:
    """Floating-point operations snmf_step performs (multiply-add = 2), leading terms:
    Y·Aᵀ 2dnk; Y·Yᵀ twice (input Gram is reused, new one) 2nk²; ZᵀA 2mkn (or 2dkn dense);
    [Q⁺;Q⁻]·Y 4nk²; elementwise MU + loss ≈ 12nk; solve and WTA O(k³ + kd log m), negligible."""
    ztA = 2 * m * k * n if m <= MAX_GATHER_SLOTS else 2 * d * k * n
    return float(2 * d * n * k + 2 * n * k * k + ztA + 4 * n * k * k + 12 * n * k + 2 * k ** 3)


# ----------------------------------------------------------------------------- driver


@dataclasses.dataclass
class SNMFFit:
    """Result of a fit: the best state (by loss) and the loss curve."""

    Z_DxK: np.ndarray
    loss: float  # ‖A − ZY‖²_F of the best state
    sq_norm_A: float
    iterations: int
    losses: list[float]  # per iteration of this call (a resumed fit lists only its own)
    stopped_early: bool
    Yt_NxK: object = None  # Yᵀ of the best state: ndarray (full batch) or streaming.YFile

    @property
    def rel_error(self) -> float:
        """‖A − ZY‖_F / ‖A‖_F."""
        return relative_error(self.loss, self.sq_norm_A)


def relative_error(loss: float, sq_norm_A: float) -> float:
    """‖A − ZY‖_F / ‖A‖_F from the loss ‖A − ZY‖²_F and ‖A‖²_F."""
    return math.sqrt(max(loss, 0.0) / sq_norm_A)


def state_like(k: int, d: int, n: int) -> dict:
    """Shapes and dtypes of a full-batch `SNMFState` (as a dict), to restore a checkpoint into."""
    shapes = {"Zt_KxD": (k, d), "Y_KxN": (k, n), "YYt_KxK": (k, k), "best_Zt_KxD": (k, d), "best_Y_KxN": (k, n)}
    return {f: jax.ShapeDtypeStruct(shapes.get(f, ()), jnp.int32 if f == "bad_iters" else jnp.float32)
            for f in SNMFState._fields}


def fit_full_batch(A_DxN: np.ndarray, cfg: SNMFConfig, *, init: tuple[np.ndarray, np.ndarray] | None = None,
                   checkpoints=None, checkpoint_every: int = 10,
                   on_iter: Callable[[int, float, float, float], None] | None = None,
                   progress: bool = False) -> SNMFFit:
    """Fit A ≈ Z·Y by iterating `snmf_step` until `cfg.iters` or `cfg.patience` stale iterations.

    init: (Z0_DxK, Y0_KxN); default `snmf.init.initial_factors(A, cfg)`.
    checkpoints: an `activation_store.runs.Checkpoints` (orbax); the state (a pytree) is saved every
      `checkpoint_every` iterations and at the end, with the iteration as its step. When it already
      holds a checkpoint the fit continues from it, giving the same result as an uninterrupted run
      (the step is deterministic); the caller checks that it belongs to this problem (`runs.Run`).
    on_iter(iteration, loss, best_loss, ‖A‖²) is called after every iteration (1-based), before
      that iteration's checkpoint.
    """
    from tqdm import tqdm

    A_DxN = np.ascontiguousarray(A_DxN, dtype=np.float32)
    d, n = A_DxN.shape
    cfg.validate(d, n)
    sq_norm = check_matrix(A_DxN)
    m = cfg.kept_per_column(d)

    start = checkpoints.latest_step() if checkpoints is not None else None
    if start is not None:
        state = SNMFState(**checkpoints.restore(start, like=state_like(cfg.k, d, n)))
    else:
        start = 0
        Z0_DxK, Y0_KxN = init if init is not None else initial_factors(A_DxN, cfg)
        state = initial_state(np.asarray(Z0_DxK, np.float32).T, np.asarray(Y0_KxN, np.float32))

    A = jnp.asarray(A_DxN)
    sq = jnp.asarray(sq_norm, jnp.float32)
    losses: list[float] = []
    it = start
    with tqdm(total=cfg.iters, initial=start, desc="snmf", unit="it", disable=not progress) as bar:
        while it < cfg.iters and int(state.bad_iters) < cfg.patience:
            state = snmf_step(state, A, sq, m=m, tol=cfg.tol)
            it += 1
            loss = float(state.loss)
            losses.append(loss)
            if on_iter:
                on_iter(it, loss, float(state.best_loss), sq_norm)
            bar.update(1)
            bar.set_postfix(rel_err=f"{relative_error(loss, sq_norm):.4f}")
            if checkpoints is not None and it % checkpoint_every == 0:
                checkpoints.save(it, state._asdict())
    if checkpoints is not None:
        checkpoints.save(it, state._asdict())
    # iters >= 1 and patience >= 1 (SNMFConfig.validate): at least one iteration ran, so a best state exists
    return SNMFFit(Z_DxK=np.asarray(state.best_Zt_KxD).T.copy(), Yt_NxK=np.asarray(state.best_Y_KxN).T,
                   loss=float(state.best_loss), sq_norm_A=sq_norm, iterations=it, losses=losses,
                   stopped_early=int(state.bad_iters) >= cfg.patience)


def time_steps(A_DxN: np.ndarray, cfg: SNMFConfig, n_steps: int = 10) -> float:
    """Best wall time of one `snmf_step` in seconds (for the benchmark)."""
    A = jnp.asarray(A_DxN, jnp.float32)
    Z0, Y0 = initial_factors(np.asarray(A_DxN), dataclasses.replace(cfg, init="random"))
    state = initial_state(Z0.T, np.asarray(Y0, np.float32))
    sq = jnp.asarray(float(jnp.sum(A * A)), jnp.float32)
    m = cfg.kept_per_column(A.shape[0])
    times = []
    for _ in range(1 + n_steps):  # the first call compiles
        t0 = time.perf_counter()
        state = jax.block_until_ready(snmf_step(state, A, sq, m=m, tol=cfg.tol))
        times.append(time.perf_counter() - t0)
    return min(times[1:])
