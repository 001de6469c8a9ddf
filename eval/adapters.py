"""Dictionary adapters that live in eval/, and the checks every pipeline runs on a Dictionary.

The protocol (eval/dictionary.py) is implemented by
  * SAEs and transcoders          saes/sae.py `SAE` (also SAEs imported from SAELens)
  * SNMF, DiffMeans, PCA          snmf/dictionary.py
  * raw MLP neurons               `NeuronDictionary` (here)
  * one level of an SNMF tree     `HierarchyLevelDictionary` (here; built by scripts/dictionaries.py)
eval/ never imports saes/ or snmf/: saved dictionaries are loaded by `scripts.dictionaries.load_dictionary`.

Optional protocol attributes (read with getattr, never by type):
  hook_out               the hook the decoder writes (transcoders); default `hook`. `write_hook(dic)`.
                         `directions_FxD` and `decode` live in this hook's space, `encode` reads `hook`.
  read_directions(model) F x d_model read (input) directions in the residual stream, when the
                         dictionary has them (neurons: the up-projection rows); used for LM-head decoding.

Transcoders: `SAE.residual_directions` maps W_dec through `model.write_matrix(hook_out)`, i.e. from
hook_out's space, which is right (checked in tests/test_adapters.py).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from featureatlas.activation_store.errors import FeatureAtlasError
from featureatlas.eval.dictionary import Dictionary


class DictionaryError(FeatureAtlasError, ValueError):
    """A dictionary that cannot be used as asked (wrong hook, width, level ...); the message names the fix."""


def write_hook(dic) -> str:
    """The hook a dictionary's decoder writes: `hook_out` for transcoders, else `hook`."""
    return getattr(dic, "hook_out", None) or dic.hook


def write_directions(model, dic) -> tuple[str, np.ndarray]:
    """(write hook, directions_FxD as float32 numpy), checked against the model's width at that hook."""
    hook = write_hook(dic)
    D = model.hook_dim(hook)
    V = np.asarray(dic.directions_FxD, np.float32)
    if V.shape != (dic.n_features, D):
        raise DictionaryError(f"directions_FxD has shape {V.shape}; {hook} is {D} wide in {model.model_id}: "
                              "use the model the dictionary was trained on")
    return hook, V


def feature_ids(features, n_features: int) -> np.ndarray:
    """Checked int64 feature ids (None: all); DictionaryError naming the valid range otherwise."""
    f = np.arange(n_features) if features is None else np.atleast_1d(np.asarray(features))
    if f.ndim != 1 or (f.size and not np.issubdtype(f.dtype, np.integer)):
        raise DictionaryError(f"features must be a 1-D list of integer feature ids, got {features!r}")
    if f.size and (f.min() < 0 or f.max() >= n_features):
        bad = f[(f < 0) | (f >= n_features)][:5].tolist()
        raise DictionaryError(f"feature ids {bad} out of range: the dictionary has {n_features} features "
                              f"(ids 0..{n_features - 1})")
    return f.astype(np.int64)


# ---- raw MLP neurons ------------------------------------------------------------------------

@dataclasses.dataclass
class NeuronDictionary:
    """The neurons of one MLP as features: the identity basis at `mlp_hidden.L`.

    SwiGLU neurons (silu(x W_gate) ⊙ x W_up) are signed with both signs common; GELU neurons are
    nearly nonnegative. The protocol needs codes ≥ 0, so:
      split_sign=False (default): F = d, feature i = neuron i's positive part,
          encode(x) = relu(x), decode(c) = c (so decode(encode(x)) = relu(x): the negative parts are
          not represented, and reconstruction metrics show that loss honestly);
      split_sign=True: F = 2d, features [0, d) = relu(x_i), [d, 2d) = relu(−x_i),
          directions = [I; −I], decode(encode(x)) = x exactly.
    residual_directions(model) = the rows of W_down (model.write_matrix(hook), [d_mlp, d_model]: the
    neuron's output weights, the HF down_proj column), negated for the negative half; for a hook in the
    residual stream (write_matrix None) the identity rows themselves.
    read_directions(model) = the neuron's input weights in the residual stream (the up projection
    row, see `neuron_read_matrix`), negated for the negative half.
    """

    hook: str
    d: int
    split_sign: bool = False

    def __post_init__(self):
        if not isinstance(self.d, (int, np.integer)) or self.d <= 0:
            raise DictionaryError(f"NeuronDictionary needs the hook width d > 0 (e.g. model.hook_dim({self.hook!r})), "
                                  f"got {self.d!r}")
        self.d = int(self.d)

    @classmethod
    def for_model(cls, model, hook: str, split_sign: bool = False) -> "NeuronDictionary":
        return cls(hook, model.hook_dim(hook), split_sign)

    @property
    def n_features(self) -> int:
        return 2 * self.d if self.split_sign else self.d

    def neuron_of(self, feature: int) -> tuple[int, int]:
        """(neuron index, sign ±1) of a feature index."""
        if not 0 <= feature < self.n_features:
            raise DictionaryError(f"feature {feature} out of range [0, {self.n_features})")
        return (feature, 1) if feature < self.d else (feature - self.d, -1)

    @property
    def directions_FxD(self) -> jax.Array:
        eye = jnp.eye(self.d, dtype=jnp.float32)
        return jnp.concatenate([eye, -eye], axis=0) if self.split_sign else eye

    def encode(self, x_NxD) -> jax.Array:
        x = jnp.asarray(x_NxD, jnp.float32)
        if x.shape[-1] != self.d:
            raise DictionaryError(f"{self.hook} neurons: inputs have width {x.shape[-1]}, expected {self.d}")
        pos = jax.nn.relu(x)
        return jnp.concatenate([pos, jax.nn.relu(-x)], axis=-1) if self.split_sign else pos

    def decode(self, codes_NxF) -> jax.Array:
        c = jnp.asarray(codes_NxF, jnp.float32)
        return c[..., :self.d] - c[..., self.d:] if self.split_sign else c

    def _signed_rows(self, rows_dxD) -> jax.Array:
        rows = jnp.asarray(rows_dxD, jnp.float32)
        return jnp.concatenate([rows, -rows], axis=0) if self.split_sign else rows

    def residual_directions(self, model) -> jax.Array:
        W = model.write_matrix(self.hook)
        if W is None:
            return self.directions_FxD
        if W.shape[0] != self.d:
            raise DictionaryError(f"{self.hook}: the model's write matrix is {tuple(W.shape)}, the dictionary has "
                                  f"{self.d} neurons; use the model the dictionary was made for")
        return self._signed_rows(W)

    def read_directions(self, model, which: str = "up") -> jax.Array:
        kind, layer = model.check_hook(self.hook)
        if kind != "mlp_hidden":
            raise DictionaryError(f"read directions exist for mlp_hidden.L neurons only, not {self.hook}")
        return self._signed_rows(neuron_read_matrix(model, layer, which))


def neuron_read_matrix(model, layer: int, which: str = "up") -> jax.Array:
    """[d_mlp, d_model]: row i is neuron i's input weights (what it reads from the normalised residual).

    Llama (SwiGLU): which="up" -> the up projection (HF mlp.up_proj.weight row i = w_gate_up[:, F + i]),
    which="gate" -> the gate projection (w_gate_up[:, i]). GPT-2: w_up[:, i] (HF mlp.c_fc column i);
    there is no gate, so which must be "up".
    """
    p = model.params["layers"][layer]
    F = model.config.d_mlp
    if which not in ("up", "gate"):
        raise DictionaryError(f"which must be 'up' or 'gate', got {which!r}")
    if "w_gate_up" in p:
        W = p["w_gate_up"][:, F:] if which == "up" else p["w_gate_up"][:, :F]
    elif "w_up" in p:
        if which == "gate":
            raise DictionaryError(f"{model.config.arch} MLPs have no gate projection; use which='up'")
        W = p["w_up"]
    else:
        raise DictionaryError(f"no up projection found in layer {layer} of {model.config.arch}")
    return jnp.asarray(W, jnp.float32).T


# ---- one level of an SNMF hierarchy ----------------------------------------------------------

@dataclasses.dataclass
class HierarchyLevelDictionary:
    """Level L ≥ 1 of a hierarchical SNMF (Shafran, Geiger & Geva 2025), given its level-0 dictionary.

    With unit-norm Z columns and Z_{l−1} ≈ Z_l Y_l (Y_l ≥ 0, k_l × k_{l−1}), the token coefficients of
    level L are C_L = Y_L ··· Y_1 · Y_0 (snmf/hierarchy.py). Here, per token (rows):
        encode(x) = base.encode(x) · Y_1ᵀ ··· Y_Lᵀ    (= C_Lᵀ rows; ≥ 0 since every factor is)
        decode(c) = c · Z_Lᵀ,   directions = Z_Lᵀ,   residual_directions = Z_Lᵀ · write_matrix(hook).
    The codes are the hierarchy's own coefficients (those its tree and top tokens are built from),
    not a fresh NNLS fit against Z_L.
    """

    base: Dictionary
    level: int
    Y_chain: tuple  # (Y_1, ..., Y_L), Y_l: k_l x k_{l-1}
    Z_DxK: np.ndarray  # level L features, unit columns
    config: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        k_prev = self.base.n_features
        for i, Y in enumerate(self.Y_chain, start=1):
            if Y.ndim != 2 or Y.shape[1] != k_prev:
                raise DictionaryError(f"hierarchy level {i}: Y has shape {Y.shape}, expected (k_{i}, {k_prev})")
            k_prev = Y.shape[0]
        if self.Z_DxK.shape[1] != k_prev:
            raise DictionaryError(f"hierarchy level {self.level}: Z has {self.Z_DxK.shape[1]} columns, Y chain "
                                  f"ends at {k_prev}")
        M = np.eye(self.base.n_features, dtype=np.float64)
        for Y in self.Y_chain:
            M = M @ np.asarray(Y, np.float64).T
        self._M = jnp.asarray(M, jnp.float32)  # k_0 x k_L

    @property
    def hook(self) -> str:
        return self.base.hook

    @property
    def n_features(self) -> int:
        return int(self.Z_DxK.shape[1])

    @property
    def directions_FxD(self) -> jax.Array:
        return jnp.asarray(self.Z_DxK.T, jnp.float32)

    def encode(self, x_NxD) -> jax.Array:
        return self.base.encode(x_NxD) @ self._M

    def decode(self, codes_NxF) -> jax.Array:
        return jnp.asarray(codes_NxF, jnp.float32) @ self.directions_FxD

    def residual_directions(self, model) -> jax.Array:
        W = model.write_matrix(self.hook)
        if W is None:
            return self.directions_FxD
        return self.directions_FxD @ jnp.asarray(W, jnp.float32)


# ---- checks ----------------------------------------------------------------------------------

def validate_dictionary(dic, *, model=None, d_in: int | None = None) -> None:
    """Check `dic` against the protocol, and against the model / input width when given.

    Cheap: one encode/decode of a single zero row. Raises DictionaryError naming the mismatch.
    d_in: the width of `dic.hook` in the data (e.g. store.dim(hook)); taken from the model when absent.
    """
    if not isinstance(dic, Dictionary):
        missing = [a for a in ("hook", "n_features", "encode", "decode", "directions_FxD", "residual_directions")
                   if not hasattr(dic, a)]
        raise DictionaryError(f"{type(dic).__name__} is not a Dictionary (missing {missing}); "
                              "wrap it in an adapter from eval/adapters.py")
    F = int(dic.n_features)
    if F <= 0:
        raise DictionaryError(f"dictionary at {dic.hook} has no features")
    D_out = int(np.shape(dic.directions_FxD)[1])
    if np.shape(dic.directions_FxD)[0] != F:
        raise DictionaryError(f"directions_FxD has {np.shape(dic.directions_FxD)[0]} rows, n_features is {F}")
    if model is not None:
        for h in {dic.hook, write_hook(dic)}:
            try:
                model.check_hook(h)
            except ValueError as e:
                raise DictionaryError(f"dictionary hook {h!r} does not exist in {model.model_id}: {e}") from None
        if model.hook_dim(write_hook(dic)) != D_out:
            raise DictionaryError(f"dictionary writes {D_out}-wide vectors at {write_hook(dic)}, which is "
                                  f"{model.hook_dim(write_hook(dic))} wide in {model.model_id}; "
                                  "use the model the dictionary was trained on")
        if d_in is None:
            d_in = model.hook_dim(dic.hook)
    if d_in is not None:
        try:
            codes = dic.encode(jnp.zeros((1, d_in), jnp.float32))
        except Exception as e:  # noqa: BLE001 - any failure here means the widths disagree
            raise DictionaryError(f"dictionary at {dic.hook} cannot encode {d_in}-wide inputs ({e}); "
                                  "the store/model and dictionary dimensions differ") from None
        if tuple(codes.shape) != (1, F):
            raise DictionaryError(f"encode returned shape {tuple(codes.shape)} for one row, expected (1, {F})")
        x_hat = dic.decode(codes)
        if tuple(x_hat.shape) != (1, D_out):
            raise DictionaryError(f"decode returned shape {tuple(x_hat.shape)}, expected (1, {D_out})")
    if model is not None:
        R = dic.residual_directions(model)
        if tuple(R.shape) != (F, model.config.d_model):
            raise DictionaryError(f"residual_directions has shape {tuple(R.shape)}, expected "
                                  f"({F}, {model.config.d_model})")
