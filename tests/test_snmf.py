"""Semi-NMF solvers: planted recovery, exact update equations, streaming, encoding, baselines."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from featureatlas.snmf.data import ArrayColumns
from featureatlas.snmf.encode import nnls_encode, nnls_residual
from featureatlas.snmf.solver import SNMFConfig, fit_full_batch, initial_state, snmf_step, snmf_update
from featureatlas.snmf.streaming import fit_streaming


def planted(d=120, k=8, n=2000, support=6, active=2, noise=0.01, seed=0):
    """A = Z·Y + noise: Z sparse (support nonzeros per column, mixed sign, unit columns),
    Y ≥ 0 sparse (each token uses `active` features with weights in [0.5, 1.5])."""
    rng = np.random.default_rng(seed)
    Z = np.zeros((d, k), np.float32)
    for j in range(k):
        Z[rng.choice(d, support, replace=False), j] = rng.standard_normal(support)
    Z /= np.linalg.norm(Z, axis=0)
    Y = np.zeros((k, n), np.float32)
    for t in range(n):
        Y[rng.choice(k, active, replace=False), t] = rng.uniform(0.5, 1.5, active)
    A = Z @ Y + noise * rng.standard_normal((d, n)).astype(np.float32)
    return A.astype(np.float32), Z, Y


def matched_cosines(Z_est, Z_true):
    """Cosines of the Hungarian-matched pairs of columns."""
    Zn = Z_est / np.maximum(np.linalg.norm(Z_est, axis=0), 1e-12)
    C = Zn.T @ (Z_true / np.linalg.norm(Z_true, axis=0))
    r, c = linear_sum_assignment(-C)
    return C[r, c]


@pytest.fixture(scope="module")
def problem():
    return planted()


@pytest.fixture(scope="module")
def fitted(problem):
    A, _, _ = problem
    return fit_full_batch(A, SNMFConfig(k=8, p=0.05, iters=400, patience=20, init="random", seed=0))


def test_planted_features_recovered(problem, fitted):
    _, Z_true, _ = problem
    cos = matched_cosines(fitted.Z_DxK, Z_true)
    assert (cos >= 0.9).mean() >= 0.9, cos
    # winner-take-all: exactly ⌈p·d⌉ = 6 nonzeros per feature
    assert ((fitted.Z_DxK != 0).sum(0) == 6).all()


@pytest.mark.parametrize("init", ["svd", "kmeans"])
def test_other_inits_recover(problem, init):
    A, Z_true, _ = problem
    fit = fit_full_batch(A, SNMFConfig(k=8, p=0.05, iters=300, patience=20, init=init))
    assert (matched_cosines(fit.Z_DxK, Z_true) >= 0.9).mean() >= 0.9


def numpy_iteration(A, Y, p):
    """RESEARCH.md's five steps transcribed literally in numpy (A d×n, G = Yᵀ, Z·Y formed)."""
    d = A.shape[0]
    k = Y.shape[0]
    Z = A @ Y.T @ np.linalg.inv(Y @ Y.T + 1e-6 * np.eye(k))  # 1
    m = int(np.ceil(p * d))
    for j in range(k):  # 2
        drop = np.argsort(-np.abs(Z[:, j]))[m:]
        Z[drop, j] = 0.0
    s = np.linalg.norm(Y, axis=1)  # 3
    Y = Y / s[:, None]
    Z = Z * s[None, :]
    G = Y.T  # 4
    P, Q = A.T @ Z, Z.T @ Z
    pos, neg = lambda X: (np.abs(X) + X) / 2, lambda X: (np.abs(X) - X) / 2
    G = G * np.sqrt((pos(P) + G @ neg(Q)) / (neg(P) + G @ pos(Q) + 1e-6))
    Y = G.T
    loss = np.sum((A - Z @ Y) ** 2)  # 5
    return Z, Y, loss


def test_jitted_step_equals_numpy_transcription():
    """The production step (`snmf_step`, one jit) against the literal numpy transcription, in float64."""
    import jax.numpy as jnp
    from jax import enable_x64

    A, _, _ = planted(d=60, k=5, n=300, support=4, seed=3)
    A = A.astype(np.float64)
    Y = np.random.default_rng(1).random((5, 300))
    with enable_x64(True):
        state = initial_state(np.zeros((5, 60)), Y)
        A_j, sq = jnp.asarray(A), jnp.asarray((A * A).sum())
        for it in range(4):  # several iterations, each from the same input in both
            Y_in = np.asarray(state.Y_KxN)
            state = snmf_step(state, A_j, sq, m=3, tol=1e-4)
            Z_n, Y_n, loss_n = numpy_iteration(A, Y_in, p=0.05)
            assert state.Y_KxN.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(state.Zt_KxD).T, Z_n, rtol=1e-9, atol=1e-11)
            np.testing.assert_allclose(np.asarray(state.Y_KxN), Y_n, rtol=1e-9, atol=1e-11)
            np.testing.assert_allclose(float(state.loss), loss_n, rtol=1e-8)
            assert int(state.bad_iters) == 0 and float(state.best_loss) == float(state.loss)


def test_trace_loss_equals_explicit_frobenius(problem, fitted):
    A, _, _ = problem
    Y = np.asarray(fitted.Yt_NxK, np.float64).T
    explicit = np.sum((A.astype(np.float64) - fitted.Z_DxK.astype(np.float64) @ Y) ** 2)
    np.testing.assert_allclose(fitted.loss, explicit, rtol=1e-3)
    # and in float64 the identity is exact to rounding
    import jax.numpy as jnp
    from jax import enable_x64
    with enable_x64(True):
        A64, Y0 = jnp.asarray(A, jnp.float64), jnp.asarray(np.random.default_rng(0).random((8, A.shape[1])))
        Zt, Y1, _, loss = snmf_update(A64, Y0, Y0 @ Y0.T, jnp.sum(A64 * A64), 6)
        np.testing.assert_allclose(float(loss), float(jnp.sum((A64 - Zt.T @ Y1) ** 2)), rtol=1e-10)


def test_loss_curve_and_best_state(fitted):
    losses = np.asarray(fitted.losses)
    assert np.isclose(fitted.loss, losses.min(), rtol=1e-3)
    assert losses[-1] <= losses[0]
    assert fitted.rel_error < 0.15  # noise floor ≈ 0.075; MU's locked zeros cost a bit more


def test_streaming_matches_full_batch(problem, tmp_path):
    A, _, _ = problem
    cfg = SNMFConfig(k=8, p=0.05, iters=60, patience=1000, init="random", tol=0.0)
    full = fit_full_batch(A, cfg)
    # 700 does not divide 2000: exercises the zero-padded last chunk
    stream = fit_streaming(ArrayColumns(A.T.copy()), cfg, chunk_size=700, workdir=str(tmp_path / "s1"))
    assert abs(stream.loss - full.loss) <= 0.02 * full.loss
    np.testing.assert_allclose(stream.losses, full.losses, rtol=1e-3)  # same iteration, pass by pass
    # the block-coordinate variant (3 Y updates per read) optimizes the same objective
    bc = fit_streaming(ArrayColumns(A.T.copy()), cfg, chunk_size=500, workdir=str(tmp_path / "s2"),
                       mu_steps=3, save_y=True)
    assert bc.loss <= 1.02 * full.loss
    Yt = np.asarray(bc.Yt_NxK)
    assert Yt.shape == (2000, 8) and (Yt >= 0).all()
    explicit = np.sum((A.astype(np.float64) - bc.Z_DxK @ Yt.T.astype(np.float64)) ** 2)
    np.testing.assert_allclose(bc.loss, explicit, rtol=1e-3)


def test_streaming_float16_chunks(problem, tmp_path):
    A, _, _ = problem
    cfg = SNMFConfig(k=8, p=0.05, iters=30, patience=1000, tol=0.0)
    full = fit_full_batch(A.astype(np.float16).astype(np.float32), cfg)
    stream = fit_streaming(ArrayColumns(A.T.astype(np.float16)), cfg, chunk_size=512, workdir=str(tmp_path))
    assert abs(stream.loss - full.loss) <= 1e-3 * full.loss


def test_encode_reproduces_training_Y(problem, fitted):
    A, _, _ = problem
    Yt_train = np.asarray(fitted.Yt_NxK)
    codes = np.asarray(nnls_encode(A.T, fitted.Z_DxK))
    assert (codes >= 0).all()
    rel = np.linalg.norm(codes - Yt_train) / np.linalg.norm(Yt_train)
    # Not 0: MU cannot revive an exact zero (here ZᵀZ ≥ 0, so a token whose ZᵀA entry is ever
    # negative gets that coefficient set to exactly 0 for good); NNLS is the true optimum for Z.
    assert rel < 0.1, rel
    assert float(nnls_residual(A.T, fitted.Z_DxK, codes)) < 1e-3
    enc_loss = np.sum((A.astype(np.float64) - fitted.Z_DxK @ codes.T.astype(np.float64)) ** 2)
    assert enc_loss <= fitted.loss * (1 + 1e-3)
    # per token the codes agree in support: the largest coefficient is the same feature
    assert (codes.argmax(1) == Yt_train.argmax(1)).mean() > 0.97


def test_encode_solves_nnls_exactly_on_small_problem():
    from scipy.optimize import nnls

    rng = np.random.default_rng(5)
    Z = rng.standard_normal((30, 6)).astype(np.float32)
    X = rng.standard_normal((20, 30)).astype(np.float32)
    codes = np.asarray(nnls_encode(X, Z, n_iter=2000))
    for i in range(20):
        ref, _ = nnls(Z.astype(np.float64), X[i].astype(np.float64))
        np.testing.assert_allclose(codes[i], ref, atol=2e-4)


def test_Y_nonnegative_always(problem):
    A, _, _ = problem
    for init in ("random", "svd", "kmeans"):
        fit = fit_full_batch(A, SNMFConfig(k=8, p=0.05, iters=5, patience=100, init=init))
        assert (np.asarray(fit.Yt_NxK) >= 0).all()
    # rows of A with mixed signs and large magnitudes do not break it either
    B = 100 * np.random.default_rng(2).standard_normal((40, 500)).astype(np.float32)
    fit = fit_full_batch(B, SNMFConfig(k=5, p=0.2, iters=20, patience=100))
    assert (np.asarray(fit.Yt_NxK) >= 0).all() and np.isfinite(fit.loss)


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("kwargs, match", [
    (dict(k=60), r"k=60 must be smaller than min\(d, n\)"),
    (dict(k=5, p=0.0), r"--p must be > 0 \(got 0.0\)"),
    (dict(k=5, p=1.5), r"--p must be <= 1 \(got 1.5\)"),
])
def test_bad_config_errors(kwargs, match):
    A = np.random.default_rng(0).random((60, 300)).astype(np.float32)
    with pytest.raises(ValueError, match=match):
        fit_full_batch(A, SNMFConfig(**kwargs))


def test_bad_matrix_errors(tmp_path):
    cfg = SNMFConfig(k=3, p=0.1)
    with pytest.raises(ValueError, match="all zeros"):
        fit_full_batch(np.zeros((20, 50), np.float32), cfg)
    with pytest.raises(ValueError, match="constant"):
        fit_full_batch(np.full((20, 50), 0.7, np.float32), cfg)
    with pytest.raises(ValueError, match="constant"):  # every token the same vector
        fit_full_batch(np.repeat(np.random.default_rng(0).random((20, 1)), 50, 1).astype(np.float32), cfg)
    A = np.random.default_rng(0).random((20, 50)).astype(np.float32)
    A[7, 31] = np.nan
    A[2, 40] = np.inf
    with pytest.raises(ValueError, match=r"2 non-finite .* token column 31, dimension 7"):
        fit_full_batch(A, cfg)
    with pytest.raises(ValueError, match=r"token column 31, dimension 7"):
        fit_streaming(ArrayColumns(A.T.copy()), cfg, chunk_size=16, workdir=str(tmp_path))
    with pytest.raises(ValueError, match="all zeros"):
        fit_streaming(ArrayColumns(np.zeros((50, 20), np.float32)), cfg, chunk_size=16, workdir=str(tmp_path))
    with pytest.raises(ValueError, match="k=30 must be smaller"):
        fit_streaming(ArrayColumns(A.T.copy()), SNMFConfig(k=30), chunk_size=16, workdir=str(tmp_path))


# ------------------------------------------------------------------ baselines

def test_diffmeans_finds_planted_direction():
    from featureatlas.snmf.baselines import fit_diffmeans

    rng = np.random.default_rng(0)
    d, n = 64, 6000
    dirs = np.linalg.qr(rng.standard_normal((d, 3)))[0].T  # 3 orthonormal concept directions
    labels = rng.integers(-1, 3, n)
    X = rng.standard_normal((n, d)) + 0.3
    X[labels >= 0] += 2.0 * dirs[labels[labels >= 0]]
    dic = fit_diffmeans(ArrayColumns(X.astype(np.float32), labels), "resid_post.0",
                        label_names=("a", "b", "c"), chunk_size=1000)
    assert dic.label_names == ("a", "b", "c") and dic.n_features == 3
    # the difference of means is 2·dir_ℓ minus the others' average shift; compare with that
    for ell in range(3):
        rest = labels != ell
        shift = np.zeros(d)
        for j in range(3):
            shift += 2.0 * dirs[j] * (labels[rest] == j).mean()
        expect = 2.0 * dirs[ell] - shift
        cos = float(np.asarray(dic.directions_np[ell]) @ expect / np.linalg.norm(expect))
        assert cos > 0.99, cos
    codes = np.asarray(dic.encode(X[:10]))
    assert codes.shape == (10, 3) and (codes >= 0).all()


def test_pca_dictionary_reconstructs_rank_k():
    from featureatlas.snmf.baselines import fit_pca

    rng = np.random.default_rng(0)
    X = (rng.standard_normal((800, 5)) @ rng.standard_normal((5, 40)) + 3.0).astype(np.float32)
    for chunk in (None, 200):
        dic = fit_pca(ArrayColumns(X), "resid_post.0", 5, chunk_size=chunk)
        codes = np.asarray(dic.encode(X))
        assert codes.shape == (800, 10) and (codes >= 0).all()
        assert (np.minimum(codes[:, :5], codes[:, 5:]) == 0).all()  # ± halves never both on
        np.testing.assert_allclose(np.asarray(dic.decode(codes)), X, atol=2e-3)
    with pytest.raises(ValueError, match="k=40"):
        fit_pca(ArrayColumns(X), "resid_post.0", 40)
