"""A trained SAE at inference time, in raw (unscaled) activation space.

Saved parameters (names in weights.safetensors; F = width, D = d_in, E = d_out (= D unless transcoder)):

  every architecture   W_enc [D, F], W_dec [F, E] (unit-norm rows), b_dec [E]
  all but gated        b_enc [F]
  jumprelu, batchtopk, threshold [F]   (BatchTopK's learned threshold, so it runs as JumpReLU;
  matryoshka(batchtopk)                 the same value broadcast to all latents)
  gated                b_gate [F], r_mag [F], b_mag [F]      (no b_enc)

Encoders (pre = x @ W_enc + b_enc; no b_dec is subtracted from the input): one `SavedForm` per way
of encoding (relu, topk, jumprelu, gated) in saes/architectures.py, with their formulas.

Decoder: x̂ = f @ W_dec + b_dec.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from featureatlas.saes.architectures import SAVED_FORMS, saved_form
from featureatlas.saes.config import SAEConfig


def param_names(config: SAEConfig) -> tuple[str, ...]:
    """The saved parameter names of one architecture (see the module docstring)."""
    return saved_form(config).param_names


@functools.partial(jax.jit, static_argnames=("mode", "k"))
def _encode_jit(params, x_NxD, mode, k):
    """Codes of a saved SAE (formulas in the module docstring)."""
    return SAVED_FORMS[mode].encode(params, x_NxD.astype(params["W_enc"].dtype), k)


@jax.jit
def _decode_jit(params, codes_NxF):
    return codes_NxF.astype(params["W_dec"].dtype) @ params["W_dec"] + params["b_dec"]


@functools.partial(jax.jit, static_argnames=("mode", "k"))
def _reconstruct_jit(params, x_NxD, mode, k):
    return _decode_jit(params, _encode_jit(params, x_NxD, mode, k))


class SAE:
    """A saved/trained SAE or transcoder; implements the Dictionary protocol (eval/dictionary.py).

    Works on raw activations of `hook` (= hook_in); decodes into `hook_out`'s space.
    """

    def __init__(self, config: SAEConfig, params: dict[str, Any]):
        config.check_structure()
        missing = [n for n in param_names(config) if n not in params]
        if missing:
            raise ValueError(f"{config.architecture} SAE needs parameters {list(param_names(config))}; "
                             f"missing {missing}")
        self.config = config
        self.params = {n: jnp.asarray(params[n], jnp.float32) for n in param_names(config)}
        shapes = {"W_enc": (config.d_in, config.width), "W_dec": (config.width, config.d_out), "b_dec": (config.d_out,)}
        for n, p in self.params.items():
            want = shapes.get(n, (config.width,))
            if p.shape != want:
                raise ValueError(f"parameter {n} has shape {p.shape}, expected {want} for config {config.architecture}")

    # Dictionary protocol -------------------------------------------------------------------
    @property
    def hook(self) -> str:
        return self.config.hook_in

    @property
    def hook_out(self) -> str:
        return self.config.hook_out

    @property
    def n_features(self) -> int:
        return self.config.width

    @property
    def mode(self) -> str:
        """relu | topk | jumprelu | gated: how a saved SAE encodes (its saes.architectures.SavedForm)."""
        return saved_form(self.config).name

    def encode(self, x_NxD) -> jax.Array:
        return _encode_jit(self.params, jnp.asarray(x_NxD), self.mode, self.config.k)

    def decode(self, codes_NxF) -> jax.Array:
        return _decode_jit(self.params, jnp.asarray(codes_NxF))

    def reconstruct(self, x_NxD) -> jax.Array:
        return _reconstruct_jit(self.params, jnp.asarray(x_NxD), self.mode, self.config.k)

    __call__ = reconstruct

    @property
    def directions_FxD(self) -> jax.Array:
        return self.params["W_dec"]

    def residual_directions(self, model) -> jax.Array:
        """Where each latent writes in the residual stream: W_dec, or W_dec @ W_write for MLP-space hooks."""
        write = model.write_matrix(self.hook_out)
        return self.params["W_dec"] if write is None else self.params["W_dec"] @ jnp.asarray(write, jnp.float32)

    def __repr__(self) -> str:
        c = self.config
        kind = "transcoder" if c.is_transcoder else "SAE"
        io = f"{c.hook_in}->{c.hook_out}" if c.is_transcoder else c.hook_in
        return f"<{c.architecture} {kind} {io} d_in={c.d_in} width={c.width} k={c.k}>"


def sae_from_params(config: SAEConfig | dict, params: dict[str, Any]) -> SAE:
    """Build an SAE from a config (or its dict) and raw-space parameters named as in the module docstring."""
    if isinstance(config, dict):
        config = SAEConfig.from_dict(config)
    return SAE(config, {n: np.asarray(v) for n, v in params.items()})
