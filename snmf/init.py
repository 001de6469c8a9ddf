"""Initial factors for semi-NMF: random, SVD or k-means (the SNMF paper's three options).

An `Initializer` is fitted once on a sample of tokens and then gives the initial Y for any
block of token columns, so the full-batch and the streaming solvers start from identical
factors whatever the chunking:
  random: Z ~ N(0, 1), Y ~ U(0, 1) (drawn in fixed 1024-token blocks, seeded by block index);
  svd:    A_s ≈ U S Vᵀ (rank k, sample A_s); Z = U S, Y = |S⁻¹ Uᵀ A| (= |Vᵀ| on the sample);
  kmeans: k-means on the sample's tokens (scikit-learn, `kmeans_iters` Lloyd iterations);
          Z = centroids, Y = one-hot(nearest centroid) + 0.2 (Ding, Li & Jordan 2010, §6).
Step 1 of every iteration recomputes Z from Y, so only Y's initial value steers the fit;
Z0 is kept for completeness (a zero-iteration fit returns it).
"""
from __future__ import annotations

import dataclasses

import numpy as np

RANDOM_BLOCK = 1024


@dataclasses.dataclass
class Initializer:
    method: str
    k: int
    seed: int
    Z0_DxK: np.ndarray
    basis_KxD: np.ndarray | None = None  # svd: S⁻¹Uᵀ; kmeans: centroids (k×d)

    def Y_for(self, A_DxC: np.ndarray, start: int) -> np.ndarray:
        """Initial Y (k×C) for the token columns start .. start+C of the full matrix."""
        C = A_DxC.shape[1]
        if self.method == "random":
            return random_columns(self.k, start, C, self.seed)
        if self.method == "svd":
            return np.abs(self.basis_KxD @ A_DxC).astype(np.float32)
        centroids_KxD = self.basis_KxD
        # squared distances up to the per-token constant ‖a‖²
        d2_KxC = (centroids_KxD ** 2).sum(1)[:, None] - 2.0 * centroids_KxD @ A_DxC
        Y = np.full((self.k, C), 0.2, np.float32)
        Y[np.argmin(d2_KxC, axis=0), np.arange(C)] += 1.0
        return Y


def random_columns(k: int, start: int, count: int, seed: int) -> np.ndarray:
    """U(0, 1) columns start .. start+count (count >= 1), identical however the range is split."""
    first, last = start // RANDOM_BLOCK, (start + count - 1) // RANDOM_BLOCK
    blocks = [np.random.default_rng([seed, b]).random((k, RANDOM_BLOCK), np.float32) for b in range(first, last + 1)]
    offset = start - first * RANDOM_BLOCK
    return np.concatenate(blocks, axis=1)[:, offset:offset + count]


def make_initializer(sample_DxS: np.ndarray, k: int, method: str, seed: int,
                     kmeans_iters: int = 15) -> Initializer:
    """Fit the initializer on sample columns (tokens) of A."""
    d = sample_DxS.shape[0]
    rng = np.random.default_rng([seed, 2**31 - 1])
    if method == "random":
        return Initializer(method, k, seed, rng.standard_normal((d, k)).astype(np.float32))
    if method == "svd":
        from sklearn.utils.extmath import randomized_svd

        U_DxK, S_K, _ = randomized_svd(sample_DxS.astype(np.float32), k, random_state=seed)
        S_K = np.maximum(S_K, S_K[0] * 1e-6)
        return Initializer(method, k, seed, (U_DxK * S_K).astype(np.float32), (U_DxK / S_K).T.astype(np.float32))
    if method == "kmeans":
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=k, max_iter=kmeans_iters, n_init=1, random_state=seed).fit(sample_DxS.T)
        centroids_KxD = km.cluster_centers_.astype(np.float32)
        return Initializer(method, k, seed, centroids_KxD.T.copy(), centroids_KxD)
    raise ValueError(f"init={method!r} is not one of random, svd, kmeans")


def sample_columns(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted column indices of a uniform sample of min(n, size) tokens."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 7]).choice(n, size, replace=False))


def initial_factors(A_DxN: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray]:
    """(Z0_DxK, Y0_KxN) for a full-batch fit (cfg: `snmf.solver.SNMFConfig`)."""
    cols = sample_columns(A_DxN.shape[1], cfg.init_sample, cfg.seed)
    sample = A_DxN if len(cols) == A_DxN.shape[1] else A_DxN[:, cols]
    init = make_initializer(sample, cfg.k, cfg.init, cfg.seed, cfg.kmeans_iters)
    return init.Z0_DxK, init.Y_for(A_DxN, 0)
