"""Hierarchical SNMF: factorize the features again (Shafran, Geiger & Geva 2025).

Level 0 is the main fit A ≈ Z₀Y₀ (rank k₀). Level l ≥ 1 fits the previous level's features
(unit-norm columns) as the data, Z_{l−1} ≈ Z_l Y_l, Y_l ≥ 0 (k_l × k_{l−1}), with the same
SNMF iteration (same p, init, seed). Because Z columns are saved unit-norm and Y carries the
scale (A ≈ Z₀Y₀ with Y₀ rescaled), the token coefficients of level L are
    C_L = Y_L · Y_{L−1} ··· Y_1 · Y₀     (k_L × n).
Tree rule: with G = Y_lᵀ (k_{l−1} × k_l), child f (level l−1) joins parent c (level l) when
G[f, c] ≥ 0.15 · max_f G[f, c]; a parent keeps at most 4 children, the largest G[f, c].
A child may have several parents (the rule is per parent), so the export lists children ids.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from featureatlas.activation_store.errors import ConfigError
from featureatlas.snmf.io import unit_columns
from featureatlas.snmf.solver import SNMFConfig, fit_full_batch

CHILD_FRACTION = 0.15
MAX_CHILDREN = 4


@dataclasses.dataclass
class Level:
    Z_DxK: np.ndarray  # unit-norm columns
    Y_KxKprev: np.ndarray | None  # None for level 0 (its Y is per token)
    children: list[list[int]]  # per feature, child ids at the level below
    rel_error: float


def children_of(Y_KxKprev: np.ndarray) -> list[list[int]]:
    """The tree rule on G = Yᵀ: for each parent c, children f with G[f,c] ≥ CHILD_FRACTION·max_f G[f,c],
    at most MAX_CHILDREN of them."""
    out = []
    for row in Y_KxKprev:  # row c of Y = column c of G
        top = row.max()
        cand = np.nonzero(row >= CHILD_FRACTION * top)[0] if top > 0 else np.zeros(0, np.int64)
        cand = cand[np.argsort(-row[cand], kind="stable")][:MAX_CHILDREN]
        out.append([int(f) for f in cand])
    return out


def check_ranks(ranks) -> None:
    """At least two positive ranks, strictly decreasing (e.g. 400,200,100,50)."""
    if len(ranks) < 2 or min(ranks) < 1 or list(ranks) != sorted(set(ranks), reverse=True):
        raise ConfigError(f"--hierarchy ranks must be at least two positive numbers, strictly decreasing "
                          f"(e.g. 400,200,100,50); got {','.join(map(str, ranks))}")


def fit_levels(Z0_DxK: np.ndarray, ranks: list[int], base: SNMFConfig) -> list[Level]:
    """Levels 1.. of the hierarchy above the main features Z0 (ranks[0] == Z0's k)."""
    check_ranks(ranks)
    Zprev, _ = unit_columns(np.asarray(Z0_DxK, np.float32))
    levels = [Level(Zprev, None, [[] for _ in range(Zprev.shape[1])], float("nan"))]
    for k in ranks[1:]:
        fit = fit_full_batch(Zprev, dataclasses.replace(base, k=k, init_sample=max(base.init_sample, Zprev.shape[1])))
        Z, norms = unit_columns(fit.Z_DxK)
        Y = (np.asarray(fit.Yt_NxK).T * norms[:, None]).astype(np.float32)
        levels.append(Level(Z, Y, children_of(Y), fit.rel_error))
        Zprev = Z
    return levels


def top_tokens_per_level(levels: list[Level], Yt_NxK, norms_K: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per level: (token indices k_l×10, coefficients k_l×10) of the 10 largest C_L entries.

    Yt_NxK is level 0's Yᵀ as the solver returns it, an ndarray or a streaming `YFile`, read by
    blocks; norms_K the norms of its Z's columns, which rescale it to the unit-Z scale.
    """
    n, block = Yt_NxK.shape[0], 65536
    best = [(np.zeros((lv.Z_DxK.shape[1], 0), np.int64), np.zeros((lv.Z_DxK.shape[1], 0), np.float32)) for lv in levels]
    for s in range(0, n, block):
        count = min(block, n - s)
        C_KxB = (np.asarray(Yt_NxK[s:s + count], np.float32) * norms_K).T
        for li, lv in enumerate(levels):
            if lv.Y_KxKprev is not None:
                C_KxB = lv.Y_KxKprev @ C_KxB
            idx = np.concatenate([best[li][0], np.broadcast_to(np.arange(s, s + count), C_KxB.shape)], 1)
            val = np.concatenate([best[li][1], C_KxB], 1)
            keep = np.argsort(-val, axis=1, kind="stable")[:, :10]
            best[li] = (np.take_along_axis(idx, keep, 1), np.take_along_axis(val, keep, 1))
    return best


def hierarchy_json(levels: list[Level], tops, token_ids_N: np.ndarray, token_str=None) -> dict:
    """The tree as JSON-ready data: levels from the finest (0) up, each feature with its
    top tokens and its children's ids at the level below."""
    out = {"ranks": [lv.Z_DxK.shape[1] for lv in levels],
           "rule": f"child f joins parent c if G[f,c] >= {CHILD_FRACTION}*max_f G[f,c], "
                   f"at most {MAX_CHILDREN} children; G = Y_l^T",
           "levels": []}
    for li, (lv, (idx, val)) in enumerate(zip(levels, tops)):
        feats = []
        for f in range(lv.Z_DxK.shape[1]):
            toks = [{"index": int(t), "token_id": int(token_ids_N[t]), "coef": float(v)}
                    for t, v in zip(idx[f], val[f])]
            if token_str is not None:
                for entry in toks:
                    entry["token"] = token_str(entry["token_id"])
            feats.append({"id": f, "children": lv.children[f], "top_tokens": toks})
        out["levels"].append({"level": li, "k": lv.Z_DxK.shape[1],
                              "rel_error": None if np.isnan(lv.rel_error) else lv.rel_error,
                              "features": feats})
    return out
