"""SNMF, DiffMeans and PCA results as Dictionaries (the protocol of eval/dictionary.py).

All three keep F directions in the hook's space and satisfy, structurally:
  hook, n_features, encode(x_NxD) → codes_NxF ≥ 0, decode(codes_NxF) → x̂_NxD,
  directions_FxD, residual_directions(model) → F×d_model.

  SNMF:      directions = Zᵀ (unit-norm columns of Z, see `snmf.io`); encode = NNLS
             (`snmf.encode`); decode = codes·Zᵀ.
  DiffMeans: directions = unit(μ_label − μ_rest), one per label; encode = ReLU(x·dᵀ)
             (the projection's positive part); decode = codes·D.
  PCA:       C = top-k principal axes (k×d, orthonormal), μ the mean. Signed projections
             are split in two nonnegative halves, so F = 2k: codes = [ReLU(p), ReLU(−p)] with
             p = (x − μ)·Cᵀ, directions = [C; −C], decode = μ + codes·directions (exact
             rank-k PCA reconstruction).

residual_directions: `model.write_matrix(hook)` (d_hook × d_model, e.g. W_down for
`mlp_hidden.L`) maps a direction into the residual stream: directions·W. Residual-stream hooks
(write_matrix is None) return the directions unchanged. Not normalised after the mapping.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from featureatlas.activation_store.errors import ConfigError
from featureatlas.snmf.encode import NNLS_ITERS, nnls_encode


class _Directions:
    """What the three share: decode = codes·directions, residual directions through the write matrix."""

    def decode(self, codes_NxF):
        return jnp.asarray(codes_NxF, jnp.float32) @ self.directions_FxD

    def residual_directions(self, model):
        """directions·W_write for MLP-space hooks; identity for residual-stream hooks."""
        W = model.write_matrix(self.hook)
        d = jnp.asarray(self.directions_FxD, jnp.float32)
        if W is None:
            return d
        W = jnp.asarray(W, jnp.float32)
        if W.shape[0] != d.shape[1]:
            raise ConfigError(f"write matrix of {self.hook!r} is {W.shape}, directions are {d.shape}: "
                              "the model does not match the dictionary; pass the model it was trained on (--model)")
        return d @ W


@dataclasses.dataclass
class SNMFDictionary(_Directions):
    """Semi-NMF features Z (d×k) for one hook."""

    hook: str
    Z_DxK: np.ndarray
    config: dict = dataclasses.field(default_factory=dict)
    nnls_iters: int = NNLS_ITERS

    @property
    def n_features(self) -> int:
        return int(self.Z_DxK.shape[1])

    @property
    def directions_FxD(self):
        return jnp.asarray(self.Z_DxK.T)

    def encode(self, x_NxD):
        """Nonnegative least-squares codes: argmin_{c ≥ 0} ‖x − c·Zᵀ‖²."""
        return nnls_encode(jnp.asarray(x_NxD), jnp.asarray(self.Z_DxK), n_iter=self.nnls_iters)


@dataclasses.dataclass
class DiffMeansDictionary(_Directions):
    """One unit direction per label: unit(mean of the label's tokens − mean of all other tokens)."""

    hook: str
    directions_np: np.ndarray  # F×d, unit rows
    norms_F: np.ndarray  # ‖μ_label − μ_rest‖ before normalising
    label_names: tuple[str, ...] = ()
    config: dict = dataclasses.field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return int(self.directions_np.shape[0])

    @property
    def directions_FxD(self):
        return jnp.asarray(self.directions_np)

    def encode(self, x_NxD):
        return jnp.maximum(jnp.asarray(x_NxD, jnp.float32) @ self.directions_FxD.T, 0.0)


@dataclasses.dataclass
class PCADictionary(_Directions):
    """PCA axes C (k×d) with ± split codes (F = 2k) and the data mean μ."""

    hook: str
    components_KxD: np.ndarray
    mean_D: np.ndarray
    explained_variance_K: np.ndarray
    config: dict = dataclasses.field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return 2 * int(self.components_KxD.shape[0])

    @property
    def directions_FxD(self):
        C = jnp.asarray(self.components_KxD)
        return jnp.concatenate([C, -C], axis=0)

    def encode(self, x_NxD):
        p = (jnp.asarray(x_NxD, jnp.float32) - jnp.asarray(self.mean_D)) @ jnp.asarray(self.components_KxD).T
        return jnp.concatenate([jnp.maximum(p, 0.0), jnp.maximum(-p, 0.0)], axis=1)

    def decode(self, codes_NxF):
        return jnp.asarray(self.mean_D) + super().decode(codes_NxF)
