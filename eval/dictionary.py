"""The Dictionary protocol: what every evaluation in featureatlas consumes.

SAEs, SNMF results, single neurons and DiffMeans directions all implement it
through small adapters, so one pipeline scores them alike.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax


@runtime_checkable
class Dictionary(Protocol):
    """A set of F feature directions in the space of one hook.

    encode(x_NxD) -> codes_NxF, all >= 0
    decode(codes_NxF) -> x_hat_NxD
    directions_FxD: decoder rows in the hook's space.
    residual_directions(model) -> F x d_model: where each feature writes in the
      residual stream (identity for residual hooks, W_down for `mlp_hidden.L`).
    """

    hook: str
    n_features: int

    def encode(self, x_NxD: jax.Array) -> jax.Array: ...

    def decode(self, codes_NxF: jax.Array) -> jax.Array: ...

    @property
    def directions_FxD(self) -> jax.Array: ...

    def residual_directions(self, model) -> jax.Array: ...
