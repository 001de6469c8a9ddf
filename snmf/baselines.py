"""Baselines saved in the SNMF format: difference-in-means directions and PCA.

DiffMeans (as in the SNMF paper's steering comparison): for each label ℓ with tokens T_ℓ,
    d_ℓ = mean_{t ∈ T_ℓ} x_t − mean_{t ∉ T_ℓ} x_t,
where "∉ T_ℓ" is every other token of the split (other labels and unlabelled ones). Labels
come from the store's per-context /label, so every token of a context shares its label.
Computed in one streaming pass (per-label sums and counts), memory O(labels·d).

PCA: scikit-learn's PCA on the tokens (centred), or IncrementalPCA over chunks when a chunk
size is given (memory O(chunk·d)).
"""
from __future__ import annotations

import numpy as np

from featureatlas.activation_store.errors import ConfigError
from featureatlas.snmf.dictionary import DiffMeansDictionary, PCADictionary
from featureatlas.snmf.solver import check_finite


def check_labels(labels_N: np.ndarray) -> np.ndarray:
    """The labels present (≥ 0); ConfigError when there are none or one label covers every token."""
    present = np.unique(labels_N[labels_N >= 0])
    if len(present) == 0:
        raise ConfigError("DiffMeans needs labelled tokens, but every token has label -1; harvest a "
                          "labelled corpus (e.g. BBC News categories) or choose another --method")
    if len(present) == 1 and (labels_N == present[0]).all():
        raise ConfigError(f"every token has label {present[0]}: there is no 'rest' to contrast with; "
                          "harvest a corpus with several labels or choose another --method")
    return present


def check_pca_rank(k: int, d: int, n: int) -> None:
    if not 0 < k < min(d, n):
        raise ConfigError(f"k={k} must be in [1, min(d, n)) = [1, {min(d, n)}): lower --k or fit on more tokens")


def fit_diffmeans(source, hook: str, *, label_names=(), chunk_size: int = 65536) -> DiffMeansDictionary:
    """One unit direction per label present in `source.labels()` (labels ≥ 0)."""
    labels_N = np.asarray(source.labels(), np.int64)
    present = check_labels(labels_N)
    L = int(present.max()) + 1
    sums_LxD = np.zeros((L, source.d))
    counts_L = np.zeros(L, np.int64)
    total_D = np.zeros(source.d)
    for start, X in source.chunks(chunk_size):
        check_finite(X.T, col_offset=start)
        X = np.asarray(X, np.float64)
        lab = labels_N[start:start + len(X)]
        total_D += X.sum(0)
        keep = lab >= 0
        np.add.at(sums_LxD, lab[keep], X[keep])
        counts_L += np.bincount(lab[keep], minlength=L)
    c_P = counts_L[present][:, None]
    diff_PxD = sums_LxD[present] / c_P - (total_D - sums_LxD[present]) / (source.n - c_P)
    norms_P = np.array([np.linalg.norm(diff) for diff in diff_PxD])
    directions = diff_PxD / np.where(norms_P > 0, norms_P, 1.0)[:, None]
    names = tuple(label_names[ell] if ell < len(label_names) else str(int(ell)) for ell in present)
    return DiffMeansDictionary(hook, directions.astype(np.float32), norms_P.astype(np.float32), names,
                               {"labels": present.tolist(), "label_counts": counts_L[present].tolist()})


def fit_pca(source, hook: str, k: int, *, chunk_size: int | None = None, seed: int = 0) -> PCADictionary:
    """Top-k principal axes of the tokens (k < min(d, n))."""
    check_pca_rank(k, source.d, source.n)
    if chunk_size is None:
        from sklearn.decomposition import PCA

        X = np.concatenate([np.asarray(x, np.float32) for _, x in source.chunks(65536)])
        check_finite(X.T)
        pca = PCA(n_components=k, random_state=seed).fit(X)
    else:
        from sklearn.decomposition import IncrementalPCA

        pca = IncrementalPCA(n_components=k)
        for start, X in source.chunks(max(chunk_size, k)):
            check_finite(X.T, col_offset=start)
            if len(X) >= k:  # IncrementalPCA needs at least k samples per batch
                pca.partial_fit(np.asarray(X, np.float32))
    return PCADictionary(hook, pca.components_.astype(np.float32), pca.mean_.astype(np.float32),
                         pca.explained_variance_.astype(np.float32))
