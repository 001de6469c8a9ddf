"""Interventions on hook values inside the jitted forward pass.

An `Edit` says: at hook H, at token positions P, replace the hook's value x by
  add:     x + alpha * v                                   (activation steering / addition,
                                                            Turner et al. 2023, "ActAdd")
  clamp:   x + (value - <x, u>) u,  u = d / ||d||          (set the component along d to `value`;
                                                            the TokenChange intervention of
                                                            Gur-Arieh et al. 2025)
  replace: fn(x)                                           (splice e.g. an SAE's decode(encode(x)))
  set_code: x + (value - code_fn(x[, index])) v             (set one dictionary latent to `value` and keep
                                                            the reconstruction error: for an SAE latent f with
                                                            decoder row v = d_f, a_f(x) -> value, everything
                                                            else about x unchanged; Gur-Arieh et al. 2025)
Edits change the hook's value and therefore everything downstream; a captured hook returns
the edited value. Several edits may target the same hook: they apply in the order given.

Positions are token positions counted from the first real token (0 = first non-padding
token), so an edit means the same thing for left-, right- or unpadded inputs and during
generation. None = every position.

Jit structure: the hook, kind, replace-/code-fn and number of positions are static (part of the
compile key); the vector, the scalar (alpha / value), set_code's index and the positions themselves
are traced arguments, so sweeping a steering strength, a direction or a latent never recompiles.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

@dataclass(frozen=True, eq=False)
class Edit:
    """One intervention; build it with `add`, `clamp`, `replace` or `set_code`."""

    hook: str
    kind: str
    vector: Any = None  # add: v_D, clamp: direction_D, set_code: decoder row v_D, replace: None
    scale: Any = 1.0  # add: alpha, clamp / set_code: value, replace: unused
    fn: Callable | None = None  # replace: acts_BxTxD -> acts_BxTxD; set_code: code_fn (a jax function)
    positions: np.ndarray | None = None  # int positions, or None for all
    index: Any = None  # set_code only: the latent's id, passed to code_fn (traced int32), or None

    def static_key(self) -> tuple:
        """What the compiled function depends on (everything else is a traced argument)."""
        n_pos = None if self.positions is None else int(self.positions.shape[0])
        return (self.hook, self.kind, self.fn, n_pos)

    def dynamic_args(self) -> dict:
        """The traced part of the edit."""
        args = {"scale": jnp.asarray(self.scale, jnp.float32)}
        for name, dtype in (("vector", jnp.float32), ("positions", jnp.int32), ("index", jnp.int32)):
            if getattr(self, name) is not None:
                args[name] = jnp.asarray(getattr(self, name), dtype)
        return args


def _positions(positions) -> np.ndarray | None:
    if positions is None:
        return None
    arr = np.atleast_1d(np.asarray(positions))
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"edit positions must be None or a 1-D array of ints, got {positions!r}")
    if arr.size and arr.min() < 0:
        raise ValueError("edit positions count from the first real token and must be >= 0 "
                         f"(got {arr.tolist()}); compute the index of the last token yourself")
    return arr.astype(np.int32)


def _vector(v, what: str):
    arr = jnp.asarray(v, jnp.float32)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D vector of the hook's width, got shape {arr.shape}")
    return arr


def add(hook: str, vector_D, alpha: float = 1.0, positions=None) -> Edit:
    """x <- x + alpha * vector at `positions` of `hook`."""
    return Edit(hook, "add", _vector(vector_D, "add vector"), alpha, None, _positions(positions))


def clamp(hook: str, direction_D, value: float, positions=None) -> Edit:
    """x <- x + (value - <x, u>) u with u = direction / ||direction||: the component along u becomes `value`."""
    d = _vector(direction_D, "clamp direction")
    if not isinstance(d, jax.core.Tracer) and not bool(jnp.any(d != 0)):
        raise ValueError(f"clamp direction at {hook} is the zero vector; it has no component to set")
    return Edit(hook, "clamp", d, value, None, _positions(positions))


def replace(hook: str, fn: Callable, positions=None) -> Edit:
    """x <- fn(x) at `positions` of `hook`; fn maps acts_BxTxD -> acts_BxTxD and must be jax-traceable.

    fn is part of the compile key (by identity): reuse one function object across calls,
    e.g. `sae_fn = lambda x: sae.decode(sae.encode(x))` defined once.
    """
    if not callable(fn):
        raise ValueError(f"replace needs a callable acts -> acts, got {type(fn).__name__}")
    return Edit(hook, "replace", None, 0.0, fn, _positions(positions))


def set_code(hook: str, code_fn: Callable, vector_D, value: float, index=None, positions=None) -> Edit:
    """x <- x + (value - code(x)) * vector at `positions` of `hook`, code(x) = code_fn(x) or code_fn(x, index).

    code_fn maps acts_BxTxD -> code_BxT (one latent's activation per token, e.g. an SAE's a_f(x)); with
    `index` (an int, traced: one compiled function serves every latent) it is called code_fn(x, index).
    With vector = the latent's decoder row this sets the latent to `value` and keeps the rest of x,
    reconstruction error included. code_fn is part of the compile key by identity, as replace's fn.
    """
    if not callable(code_fn):
        raise ValueError(f"set_code needs a callable acts_BxTxD -> code_BxT, got {type(code_fn).__name__}")
    return Edit(hook, "set_code", _vector(vector_D, "set_code vector"), value, code_fn, _positions(positions), index)


def apply_edit(kind: str, fn, args: dict, x_BxTxD: jax.Array, pos_BxT: jax.Array) -> jax.Array:
    """The edited hook value (see module docstring for the formulas)."""
    if kind == "add":
        y = x_BxTxD + args["scale"] * args["vector"]
    elif kind == "set_code":
        code_BxT = fn(x_BxTxD) if "index" not in args else fn(x_BxTxD, args["index"])
        if code_BxT.shape != x_BxTxD.shape[:-1]:
            raise ValueError(f"set_code fn returned shape {code_BxT.shape}, expected {x_BxTxD.shape[:-1]}")
        y = x_BxTxD + (args["scale"] - code_BxT.astype(x_BxTxD.dtype))[..., None] * args["vector"]
    elif kind == "clamp":
        u_D = args["vector"] / jnp.linalg.norm(args["vector"])
        coef_BxT = x_BxTxD @ u_D
        y = x_BxTxD + (args["scale"] - coef_BxT)[..., None] * u_D
    else:
        y = fn(x_BxTxD)
        if y.shape != x_BxTxD.shape:
            raise ValueError(f"replace fn returned shape {y.shape}, expected {x_BxTxD.shape}")
        y = y.astype(x_BxTxD.dtype)
    if "positions" not in args:
        return y
    at_BxT = jnp.any(pos_BxT[..., None] == args["positions"], axis=-1)
    return jnp.where(at_BxT[..., None], y, x_BxTxD)
