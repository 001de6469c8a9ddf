"""Every SAE architecture as one record: its parameters, training encoder and loss, saved form and
SAELens name. `ARCHITECTURES` maps each name to its record; adding an architecture is one class here
and one entry in that registry.

Training space: inputs x' = s_in·x, targets y' = s_out·y (E‖x'‖² = d_in, E‖y'‖² = d_out); for a
plain SAE y = x. Training parameters (F latents, D = d_in, E = d_out):

  enc_FxD [F, D]  encoder rows (the saved W_enc is its transpose, folded; see saes/io.py)
  dec_FxE [F, E]  decoder rows, kept unit norm        b_dec [E]
  b_enc [F]       (all but gated)     log_threshold [F] (jumprelu)
  b_gate, r_mag, b_mag [F] (gated)

Buffers (state that is not trained by gradient): b_in [D] (the input centre of a transcoder; a plain
SAE centres its input on b_dec instead, as in Bricken et al. 2023), since_fired [F] (tokens since
each latent last fired), threshold [] and threshold_seen [] (BatchTopK's running inference threshold).

Pre-activations: pre = (x' − c) @ enc_FxDᵀ + b_enc with c = b_dec (SAE) or b_in (transcoder).
Loss (per token, divided by d_out so coefficients match the usual sum-over-dimensions convention):
  mse      = E_b ‖y' − ŷ'‖² / E
  relu     + λ_t · E_b Σ_i f_i ‖dec_i‖ / E                       (Anthropic, April 2024 update)
  jumprelu + λ_t · E_b ‖f‖₀ / E, rectangle-kernel STE           (Rajamanoharan et al. 2024b)
  gated    + λ_t · E_b Σ_i relu(π_gate)_i ‖dec_i‖ / E + E_b ‖y' − relu(π_gate)·sg(dec) − sg(b_dec)‖² / E
                                                                (Rajamanoharan et al. 2024a)
  topk, batchtopk, matryoshka + auxk_coef · Σ_b ‖e − ê‖² / Σ_b ‖e − ē‖², e = sg(y' − ŷ'), ê decoded
  from up to k_aux dead latents (Gao et al. 2024, "Scaling and evaluating SAEs"; see _auxk)
  matryoshka: mse is the mean over nested prefixes p_1 < … < p_m = F of the mse of the
  reconstruction from latents [0, p_i) (Bussmann et al. 2025; Nabeshima 2024).
λ_t ramps linearly from 0 over the first sparsity_warmup_frac of training.

Saved (raw-space) forms, what a trained SAE computes at inference (pre = x @ W_enc + b_enc):

  relu      f = relu(pre)
  topk      f = relu(pre) kept at its k largest entries per token
  jumprelu  f = pre · 1[pre > threshold]      (BatchTopK runs as JumpReLU with its learned threshold)
  gated     f = 1[x @ W_enc + b_gate > 0] · relu((x @ W_enc) ⊙ exp(r_mag) + b_mag)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Callable

import jax
import jax.numpy as jnp
import numpy as np

from featureatlas.activation_store.errors import ConfigError
from featureatlas.saes import sparse, topk

if TYPE_CHECKING:
    from featureatlas.saes.config import SAEConfig

# BatchTopK looks for its k·B winners among each token's top `BATCHTOPK_ROW_CAP·k` pre-activations,
# i.e. one token can use at most 4k latents (exactly the batch top-k·B whenever no token would use more;
# `saturated_frac` in the logs reports how often the cap binds).
BATCHTOPK_ROW_CAP = 4
DENSE_ENC_INIT_SCALE = 0.1


# ---------------------------------------------------------------------------------------------
# Saved forms: how a saved SAE encodes, which tensors it has, and its SAELens name
# ---------------------------------------------------------------------------------------------
def _encode_relu(params, x_NxD, k):
    return jax.nn.relu(x_NxD @ params["W_enc"] + params["b_enc"])


def _encode_topk(params, x_NxD, k):
    pre_NxF = x_NxD @ params["W_enc"] + params["b_enc"]
    vals_NxK, idx_NxK = topk.top_k(jax.nn.relu(pre_NxF), k)
    rows = jnp.arange(pre_NxF.shape[0])[:, None]
    return jnp.zeros_like(pre_NxF).at[rows, idx_NxK].set(vals_NxK, unique_indices=True)


def _encode_jumprelu(params, x_NxD, k):
    pre_NxF = x_NxD @ params["W_enc"] + params["b_enc"]
    return jnp.where(pre_NxF > params["threshold"], pre_NxF, 0.0)


def _encode_gated(params, x_NxD, k):
    proj_NxF = x_NxD @ params["W_enc"]
    mag_NxF = jax.nn.relu(proj_NxF * jnp.exp(params["r_mag"]) + params["b_mag"])
    return jnp.where(proj_NxF + params["b_gate"] > 0, mag_NxF, 0.0)


@dataclasses.dataclass(frozen=True)
class SavedForm:
    """What a saved SAE computes (module docstring) and how SAELens names it."""

    name: str
    param_names: tuple[str, ...]
    """The tensors in weights.safetensors, besides their shapes: W_enc [D, F], W_dec [F, E], b_dec [E], others [F]."""
    encode: Callable
    """encode(params, x_NxD, k) -> codes_NxF, raw activation space."""
    saelens_architecture: str
    """SAELens cfg.json `architecture` of an SAE with this form."""
    saelens_transcoder: str | None
    """SAELens `architecture` of a transcoder with this form; None: SAELens has none."""


_DENSE = ("W_enc", "b_enc", "W_dec", "b_dec")
RELU_FORM = SavedForm("relu", _DENSE, _encode_relu, "standard", "transcoder")
TOPK_FORM = SavedForm("topk", _DENSE, _encode_topk, "topk", None)
JUMPRELU_FORM = SavedForm("jumprelu", _DENSE + ("threshold",), _encode_jumprelu, "jumprelu", "jumprelu_transcoder")
GATED_FORM = SavedForm("gated", ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"), _encode_gated, "gated", None)
SAVED_FORMS = {f.name: f for f in (RELU_FORM, TOPK_FORM, JUMPRELU_FORM, GATED_FORM)}


# ---------------------------------------------------------------------------------------------
# Straight-through estimators for JumpReLU (Rajamanoharan et al. 2024b, eqs. 11-12)
# ---------------------------------------------------------------------------------------------
def _d_theta(scale, z, theta, bandwidth, g):
    """The pseudo-derivative −(scale/ε) K((z − θ)/ε) · g, summed to θ's shape; K(u) = 1[|u| < 1/2] (rectangle)."""
    u = (z - theta) / bandwidth
    d = -(scale / bandwidth) * (jnp.abs(u) < 0.5).astype(u.dtype) * g
    return d.reshape((-1,) + theta.shape).sum(0) if d.shape != theta.shape else d


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(z, theta, bandwidth):
    """z · H(z − θ); ∂/∂z = H(z − θ), ∂/∂θ ≈ −(θ/ε) K((z − θ)/ε)."""
    return jnp.where(z > theta, z, 0.0)


def _jumprelu_bwd(bandwidth, res, g):
    z, theta = res
    return jnp.where(z > theta, g, 0.0), _d_theta(theta, z, theta, bandwidth, g)


jumprelu.defvjp(sparse.fwd_saving_args(jumprelu, 2), _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def heaviside(z, theta, bandwidth):
    """H(z − θ); ∂/∂z = 0, ∂/∂θ ≈ −(1/ε) K((z − θ)/ε)."""
    return (z > theta).astype(z.dtype)


def _heaviside_bwd(bandwidth, res, g):
    z, theta = res
    return jnp.zeros_like(z), _d_theta(1.0, z, theta, bandwidth, g)


heaviside.defvjp(sparse.fwd_saving_args(heaviside, 2), _heaviside_bwd)


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------
_NT = (((1,), (1,)), ((), ()))  # a @ bᵀ
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _dot(a, b, dims, dtype):
    return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), dims, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _low_matmul(a, b, transpose_b: bool, dtype):
    """a @ bᵀ (transpose_b) or a @ b with operands in a low-precision `dtype` and float32 sums; the
    backward's two matmuls alike (autodiff would run them on the float32 cotangent, in float32)."""
    return _dot(a, b, _NT if transpose_b else _NN, dtype)


def _low_matmul_bwd(transpose_b, dtype, res, g):
    a, b = res
    if transpose_b:  # out[B, F] = a[B, D] · b[F, D]ᵀ
        d_a, d_b = _dot(g, b, _NN, dtype), _dot(g.T, a, _NN, dtype)
    else:  # out[B, E] = a[B, F] · b[F, E]
        d_a, d_b = _dot(g, b, _NT, dtype), _dot(a.T, g, _NN, dtype)
    return d_a.astype(a.dtype), d_b.astype(b.dtype)


_low_matmul.defvjp(sparse.fwd_saving_args(_low_matmul, 2), _low_matmul_bwd)


def _mm(a, b_T, dtype, transpose_b: bool = True):
    """a @ b_Tᵀ (or a @ b_T when not transpose_b) computed in `dtype` with float32 accumulation (forward and
    backward)."""
    if jnp.dtype(dtype) == jnp.float32:
        return _dot(a, b_T, _NT if transpose_b else _NN, dtype)
    return _low_matmul(a, b_T, transpose_b, jnp.dtype(dtype))


def _mm_n(a, b, dtype):
    """a @ b computed in `dtype` with float32 accumulation (forward and backward)."""
    return _mm(a, b, dtype, transpose_b=False)


def _zeros_F(F: int):
    # Fresh buffers: the training step donates its state, so no two leaves may share one.
    return jnp.zeros((F,), jnp.float32)


def _decoder_norms(params):
    return jnp.linalg.norm(params["dec_FxE"], axis=1)


def _mse(recon_BxE, y_BxE):
    B, E = y_BxE.shape
    return jnp.sum((recon_BxE - y_BxE) ** 2) / (B * E)


BATCHTOPK_BISECTION_STEPS = 40


def batchtopk_entries(pre_BxF, k: int, impl: str | None = None):
    """Top k·B of relu(pre) over the whole batch (Bussmann et al. 2024), as N = k·B coordinate entries.

    Candidates are each token's top min(F, 4k) values; the k·B-th largest candidate is found by
    bisection (40 halvings of [0, max], unrolled so the step has no loop), and the entries above it are
    compacted in row order. Returns (entries, values_N, threshold, saturated_frac); entries.valid is
    False on padding entries (placed last, on the last row, so rows stay ascending), whose values must
    be zeroed.
    """
    B, F = pre_BxF.shape
    m = min(F, BATCHTOPK_ROW_CAP * k)
    n_keep = k * B
    cand_BxM, idx_BxM = topk.top_k(jax.nn.relu(pre_BxF), m, sparse.topk_method(impl))
    cand = cand_BxM.astype(jnp.float32)
    lo, hi = jnp.float32(0.0), jnp.max(cand)
    for _ in range(BATCHTOPK_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        enough = jnp.sum(cand > mid) >= n_keep
        lo, hi = jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)
    # Entries strictly above lo: at least k·B of them unless fewer are positive.
    keep_BxM = cand > lo
    flat = jnp.nonzero(keep_BxM.reshape(-1), size=n_keep, fill_value=B * m - 1)[0]
    valid = jnp.arange(n_keep) < jnp.sum(keep_BxM)
    rows = (flat // m).astype(jnp.int32)
    feats = idx_BxM.reshape(-1)[flat].astype(jnp.int32)
    # (Counting kept entries per row rather than reading cand_BxM[:, -1]: slicing a top_k output makes
    # XLA:CPU fall back to a full sort.)
    saturated = jnp.mean(jnp.sum(keep_BxM, axis=1) == m) if m < F else jnp.float32(0.0)
    entries = sparse.coo_entries(rows, feats, B, valid, impl)
    return entries, cand.reshape(-1)[flat], lo, saturated


def _auxk(cfg, params, buffers, x_c_BxD, resid_BxE, key, dtype):
    """AuxK (Gao et al. 2024): dead latents reconstruct the detached residual e; 0 when none is dead.

    The dead latents compete for the residual through a dense sub-dictionary of M = min(k_aux, F)
    dead latents: all of them when at most k_aux are dead (then identical to the per-token top-k_aux
    of dead latents, as every other dead latent is absent), otherwise a random M of them per step.
    A small dense matmul is far cheaper than a per-token top-256 over all F latents on CPU.
    """
    F = cfg.width
    M = min(cfg.k_aux, F)
    dead_F = buffers["since_fired"] >= cfg.dead_tokens

    def with_dead(_):
        score_F = jnp.where(dead_F, jax.random.uniform(key, (F,)), -1.0)
        _, sel_M = topk.top_k(score_F, M, sparse.topk_method())
        enc_MxD, dec_MxE = params["enc_FxD"][sel_M], params["dec_FxE"][sel_M]
        pre_BxM = _mm(x_c_BxD, enc_MxD, dtype) + params["b_enc"][sel_M]
        codes_BxM = jax.nn.relu(pre_BxM) * dead_F[sel_M]
        e_hat = _mm_n(codes_BxM, dec_MxE, dtype)
        # Normalised by the residual's own variance, as in Gao et al.'s code: the residual shrinks
        # as training goes on, and the dead latents' signal should not shrink with it.
        centred = resid_BxE - jnp.mean(resid_BxE, axis=0)
        return jnp.sum((e_hat - resid_BxE) ** 2) / jnp.maximum(jnp.sum(centred**2), 1e-12)

    return jax.lax.cond(jnp.any(dead_F), with_dead, lambda _: jnp.float32(0.0), None)


# ---------------------------------------------------------------------------------------------
# The records
# ---------------------------------------------------------------------------------------------
class Architecture:
    """One SAE architecture. Subclasses set what differs; `ARCHITECTURES` holds one instance of each.

    loss(cfg, params, buffers, x_c, y, coef, key, dtype) -> (loss, mse, recon_BxE, stats): x_c is the
    centred training-space input, stats holds fired_F (tokens each latent fired on), l0 and the
    architecture's own scalars. init_params / to_saved add the architecture's own tensors to the
    shared ones (enc, dec, b_dec); update_buffers its own buffers (dead tracking is shared).
    """

    name = ""
    form: SavedForm = RELU_FORM
    uses_k = False
    """k chooses its active latents (TopK family): 1 <= k <= width, and the name carries k."""
    uses_auxk = False
    """Dead latents are trained on the residual (AuxK)."""
    sparsity_field: str | None = None
    """The SAEConfig field holding its sparsity coefficient (L1 or L0), if it has one."""
    enc_init_scale = 1.0

    def selection(self, cfg: SAEConfig) -> "Architecture":
        """The record that chooses the active latents, and so owns the sparsity coefficient, the buffers
        (update_buffers), the saved tensors (to_saved) and the saved form (Matryoshka: its base)."""
        return self

    def saved_form(self, cfg: SAEConfig) -> SavedForm:
        return self.selection(cfg).form

    def validate(self, cfg: SAEConfig) -> None:
        if self.uses_k and not 0 < cfg.k <= cfg.width:
            raise ConfigError(f"k={cfg.k} must be in 1..width={cfg.width} for {cfg.architecture}; "
                              "lower --k or raise --width")

    def init_params(self, cfg: SAEConfig, enc_FxD, x_sample_NxD, centre_D) -> dict:
        return {"b_enc": _zeros_F(cfg.width)}

    def loss(self, cfg, params, buffers, x_c, y, coef, key, dtype):
        raise NotImplementedError

    def update_buffers(self, cfg: SAEConfig, buffers: dict, stats: dict) -> dict:
        return buffers

    def to_saved(self, cfg: SAEConfig, p: dict, buffers: dict, centre_proj_F, s_out: float) -> dict:
        """The architecture's own saved tensors (folded as in saes/io.py), given numpy training params."""
        return {"b_enc": (p["b_enc"] - centre_proj_F) / s_out}

    def train_flops(self, B: int, D: int, F: int, k: int) -> float:
        """Flops of one training step (bench_sae): encoder forward 2BDF, decoder forward 2BFD, decoder
        backward 2·2BFD, encoder weight gradient 2BDF."""
        return 10.0 * B * D * F


class _Dense(Architecture):
    """Dense codes from the dense projection x_c @ enc_FxDᵀ, a sparsity penalty on them, and for Gated
    the auxiliary reconstruction of its gate path through the frozen decoder."""

    def codes(self, cfg, params, proj_BxF):
        """(codes_BxF, sparsity per token summed over the batch, Gated's gate activations relu(π_gate) or
        None) from proj = x_c @ enc_FxDᵀ."""
        raise NotImplementedError

    def loss(self, cfg, params, buffers, x_c, y, coef, key, dtype):
        B, E = y.shape
        codes, sparsity, gate = self.codes(cfg, params, _mm(x_c, params["enc_FxD"], dtype))
        recon = _mm_n(codes, params["dec_FxE"], dtype) + params["b_dec"]
        mse = _mse(recon, y)
        fired_F = jnp.sum((codes > 0).astype(jnp.float32), axis=0)
        stats = {"sparsity": sparsity / B, "fired_F": fired_F, "l0": jnp.sum(fired_F) / B}
        loss = mse + coef * stats["sparsity"] / E
        if gate is not None:
            frozen = _mm_n(gate, jax.lax.stop_gradient(params["dec_FxE"]), dtype)
            stats["gate_aux"] = _mse(frozen + jax.lax.stop_gradient(params["b_dec"]), y)
            loss = loss + stats["gate_aux"]
        return loss, mse, recon, stats


class ReLU(_Dense):
    """ReLU with an L1 penalty weighted by decoder norms (Anthropic, April 2024 update)."""

    name = "relu"
    form = RELU_FORM
    sparsity_field = "l1_coef"
    # Small codes at the start, as with Anthropic's 0.1-norm decoder init (April 2024 update):
    # unit-scale codes on ~F/2 active latents would start the reconstruction far too large.
    enc_init_scale = DENSE_ENC_INIT_SCALE

    def codes(self, cfg, params, proj_BxF):
        codes = jax.nn.relu(proj_BxF + params["b_enc"])
        return codes, jnp.sum(codes * _decoder_norms(params)), None


class JumpReLU(_Dense):
    """JumpReLU with an L0 penalty through straight-through estimators (Rajamanoharan et al. 2024b)."""

    name = "jumprelu"
    form = JUMPRELU_FORM
    sparsity_field = "l0_coef"

    def init_params(self, cfg, enc_FxD, x_sample_NxD, centre_D) -> dict:
        """θ starts at each latent's (1 − k/F) quantile of its pre-activations on the sample (training
        space), so the run starts near L0 = k instead of spending its first thousands of steps moving
        log θ (whose Adam steps are ~lr per step); without a sample θ = jumprelu_init_threshold."""
        theta = np.full((cfg.width,), cfg.jumprelu_init_threshold)
        if x_sample_NxD is not None and len(x_sample_NxD):
            pre = (np.asarray(x_sample_NxD) - centre_D) @ np.asarray(enc_FxD).T
            q = np.quantile(pre, 1.0 - min(1.0, cfg.k / cfg.width), axis=0)
            theta = np.maximum(q, cfg.jumprelu_init_threshold)
        return {"b_enc": _zeros_F(cfg.width), "log_threshold": jnp.asarray(np.log(theta), jnp.float32)}

    def codes(self, cfg, params, proj_BxF):
        pre, theta = proj_BxF + params["b_enc"], jnp.exp(params["log_threshold"])
        codes = jumprelu(pre, theta, cfg.jumprelu_bandwidth)
        return codes, jnp.sum(heaviside(pre, theta, cfg.jumprelu_bandwidth)), None

    def to_saved(self, cfg, p, buffers, centre_proj_F, s_out) -> dict:
        return {**super().to_saved(cfg, p, buffers, centre_proj_F, s_out),
                "threshold": np.exp(p["log_threshold"]) / s_out}


class Gated(_Dense):
    """Gated SAE (Rajamanoharan et al. 2024a): a gate path chooses latents, a magnitude path sizes them."""

    name = "gated"
    form = GATED_FORM
    sparsity_field = "l1_coef"
    enc_init_scale = DENSE_ENC_INIT_SCALE

    def init_params(self, cfg, enc_FxD, x_sample_NxD, centre_D) -> dict:
        return {"b_gate": _zeros_F(cfg.width), "r_mag": _zeros_F(cfg.width), "b_mag": _zeros_F(cfg.width)}

    def codes(self, cfg, params, proj_BxF):
        pi_gate = proj_BxF + params["b_gate"]
        pi_mag = proj_BxF * jnp.exp(params["r_mag"]) + params["b_mag"]
        gate = jax.nn.relu(pi_gate)
        return jnp.where(pi_gate > 0, jax.nn.relu(pi_mag), 0.0), jnp.sum(gate * _decoder_norms(params)), gate

    def to_saved(self, cfg, p, buffers, centre_proj_F, s_out) -> dict:
        return {"b_gate": (p["b_gate"] - centre_proj_F) / s_out, "r_mag": p["r_mag"],
                "b_mag": (p["b_mag"] - centre_proj_F * np.exp(p["r_mag"])) / s_out}

    def train_flops(self, B, D, F, k) -> float:
        return 14.0 * B * D * F  # + the auxiliary reconstruction through the frozen decoder, both ways


class TopK(Architecture):
    """TopK (Gao et al. 2024): the k largest pre-activations of each token, with AuxK.

    Sparse training: the dense pre-activations choose N = k·B entries without gradient; the selected
    values, the decoding and both gradients go through saes/sparse.py, never a dense B×F code matrix.
    """

    name = "topk"
    form = TOPK_FORM
    uses_k = True
    uses_auxk = True

    def select(self, cfg, pre_BxF, impl):
        """(entries, values_N, stats): the active entries (saes.sparse.Entries) and their pre-activations;
        here each row's top k (k entries per row, values [B·k])."""
        vals_BxK, idx_BxK = topk.top_k(pre_BxF, cfg.k, sparse.topk_method(impl))
        return sparse.row_entries(idx_BxK, impl), vals_BxK.reshape(-1), {}

    def reconstruct(self, cfg, params, entries, vals, y, dtype):
        """(mse, recon_BxE, stats) from the active entries."""
        recon = sparse.decode(entries, vals, params["dec_FxE"], dtype) + params["b_dec"]
        return _mse(recon, y), recon, {}

    def loss(self, cfg, params, buffers, x_c, y, coef, key, dtype):
        B = y.shape[0]
        impl = sparse.impl()
        pre = jax.lax.stop_gradient(_mm(x_c, params["enc_FxD"], dtype) + params["b_enc"])
        if impl != "legacy":
            pre = pre.astype(dtype)  # selection reads the compute dtype (half the bytes in bfloat16)
        entries, values, stats = self.selection(cfg).select(cfg, pre, impl)
        # float32: the selected values are the pre-activations themselves; bfloat16: recomputed from the
        # selected pairs with float32 sums, so the codes are not rounded to bfloat16.
        exact = impl != "legacy" and jnp.dtype(dtype) == jnp.float32
        pre_N = sparse.selected_preacts(entries, x_c, params["enc_FxD"], params["b_enc"], dtype,
                                        values if exact else None)
        vals = jax.nn.relu(pre_N)
        if entries.valid is not None:
            vals = vals * entries.valid
        mse, recon, more = self.reconstruct(cfg, params, entries, vals, y, dtype)
        fired = (vals > 0).astype(jnp.float32)
        stats = {**stats, **more, "fired_F": sparse.feat_totals(entries, fired, cfg.width), "l0": jnp.sum(fired) / B}
        loss = mse
        if cfg.k_aux > 0 and cfg.auxk_coef > 0:
            key = jax.random.key(0) if key is None else key
            stats["auxk"] = _auxk(cfg, params, buffers, x_c, jax.lax.stop_gradient(y - recon), key, dtype)
            loss = loss + cfg.auxk_coef * stats["auxk"]
        return loss, mse, recon, stats

    def train_flops(self, B, D, F, k) -> float:
        return 2.0 * B * D * F + 10.0 * k * B * D  # dense pre-activations + the sparse products


class BatchTopK(TopK):
    """BatchTopK (Bussmann et al. 2024): the k·B largest pre-activations of the batch; at inference a
    JumpReLU whose threshold is an EMA of the batch thresholds seen in training."""

    name = "batchtopk"
    form = JUMPRELU_FORM

    def select(self, cfg, pre_BxF, impl):
        entries, values, thr, sat = batchtopk_entries(pre_BxF, cfg.k, impl)
        return entries, values, {"batch_threshold": thr, "saturated_frac": sat}

    def update_buffers(self, cfg, buffers, stats) -> dict:
        """threshold ← decay·threshold + (1 − decay)·batch threshold (the first batch's value at first)."""
        t, decay = stats["batch_threshold"], cfg.batchtopk_threshold_decay
        seen = buffers["threshold_seen"] > 0
        return {**buffers, "threshold": jnp.where(seen, decay * buffers["threshold"] + (1 - decay) * t, t),
                "threshold_seen": jnp.ones((), jnp.float32)}

    def to_saved(self, cfg, p, buffers, centre_proj_F, s_out) -> dict:
        return {**super().to_saved(cfg, p, buffers, centre_proj_F, s_out),
                "threshold": np.full((cfg.width,), float(buffers["threshold"]) / s_out)}


class Matryoshka(TopK):
    """Matryoshka SAE (Bussmann et al. 2025; Nabeshima 2024): the latents [0, p_i) of each nested
    prefix reconstruct on their own; latents are chosen by the base architecture (topk or batchtopk), whose
    buffers and saved tensors it has (`selection`)."""

    name = "matryoshka"
    bases = ("batchtopk", "topk")

    def selection(self, cfg):
        return ARCHITECTURES[cfg.matryoshka_base]

    def validate(self, cfg) -> None:
        if cfg.matryoshka_base not in self.bases:
            raise ConfigError(f"--matryoshka-base must be one of {', '.join(self.bases)}, got {cfg.matryoshka_base!r}")
        super().validate(cfg)
        p = cfg.prefixes()
        if any(b <= a for a, b in zip(p, p[1:])) or p[0] <= 0 or p[-1] != cfg.width:
            raise ConfigError(f"--prefixes {' '.join(map(str, p))} must be strictly increasing, positive and end "
                              f"at the width {cfg.width}")

    def reconstruct(self, cfg, params, entries, vals, y, dtype):
        B, E = y.shape
        prefixes = jnp.asarray(cfg.prefixes(), jnp.int32)
        m = len(cfg.prefixes())
        # One decode into m·B rows: row g·B + b sums token b's entries in prefix group g.
        group = jnp.searchsorted(prefixes, entries.feats, side="right").astype(jnp.int32)
        rows, feats = group * B + entries.rows, entries.feats
        if entries.impl == "gather":  # its row sums need ascending rows
            order = jnp.argsort(rows)
            rows, feats, vals = rows[order], feats[order], vals[order]
        grouped = sparse.coo_entries(rows, feats, m * B, None, entries.impl)
        parts = sparse.decode(grouped, vals, params["dec_FxE"], dtype)
        recons_MxBxE = jnp.cumsum(parts.reshape(m, B, E), axis=0) + params["b_dec"]
        mse_each = jnp.sum((recons_MxBxE - y[None]) ** 2, axis=(1, 2)) / (B * E)
        return jnp.mean(mse_each), recons_MxBxE[-1], {"mse_full": mse_each[-1]}


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (ReLU(), TopK(), BatchTopK(), JumpReLU(), Gated(),
                                                               Matryoshka())}
"""Every architecture by name (the --arch choices, in this order)."""


def architecture(cfg: SAEConfig) -> Architecture:
    """The record of `cfg.architecture`; ConfigError naming the choices if there is none."""
    try:
        return ARCHITECTURES[cfg.architecture]
    except KeyError:
        raise ConfigError(f"unknown SAE architecture {cfg.architecture!r}; choose one of "
                          f"{', '.join(ARCHITECTURES)} (--arch)") from None


def saved_form(cfg: SAEConfig) -> SavedForm:
    """How the saved SAE of `cfg` encodes (BatchTopK and Matryoshka-BatchTopK: as JumpReLU)."""
    return architecture(cfg).saved_form(cfg)


def saelens_architecture(cfg: SAEConfig) -> str | None:
    """SAELens's `architecture` name for the saved SAE of `cfg`; None when SAELens has no equivalent."""
    form = saved_form(cfg)
    return form.saelens_transcoder if cfg.is_transcoder else form.saelens_architecture


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------
def init_params(cfg: SAEConfig, key: jax.Array, b_dec_E: np.ndarray, b_in_D: np.ndarray,
                x_sample_NxD: np.ndarray | None = None, y_sample_NxE: np.ndarray | None = None) -> tuple[dict, dict]:
    """Decoder rows random unit vectors; encoder = decoder transpose for SAEs (Gao et al. 2024), for
    transcoders the decoder rows mapped back through the sample's least-squares map; biases 0;
    b_dec from the geometric median of a target sample; then the architecture's own parameters."""
    arch = architecture(cfg)
    F, D, E = cfg.width, cfg.d_in, cfg.d_out
    k_dec, k_enc = jax.random.split(key)
    dec = jax.random.normal(k_dec, (F, E), jnp.float32)
    dec = dec / jnp.linalg.norm(dec, axis=1, keepdims=True)
    if cfg.is_transcoder:
        if y_sample_NxE is not None and x_sample_NxD is not None and len(x_sample_NxD) > D:
            # The tied init generalised: encoder rows are the decoder rows pulled back through the
            # least-squares linear map x -> y of the sample (an SAE is the case map = identity).
            xc = np.asarray(x_sample_NxD, np.float64) - np.asarray(b_in_D)
            yc = np.asarray(y_sample_NxE, np.float64) - np.asarray(b_dec_E)
            map_DxE = np.linalg.lstsq(xc, yc, rcond=None)[0]
            enc = jnp.asarray(np.asarray(dec, np.float64) @ map_DxE.T, jnp.float32)
        else:
            enc = jax.random.normal(k_enc, (F, D), jnp.float32)
        enc = enc / jnp.maximum(jnp.linalg.norm(enc, axis=1, keepdims=True), 1e-12)
    else:
        enc = jnp.array(dec, copy=True)  # a distinct buffer: the two are trained separately
    enc = enc * arch.selection(cfg).enc_init_scale
    params = {"enc_FxD": enc, "dec_FxE": dec, "b_dec": jnp.asarray(b_dec_E, jnp.float32)}
    centre = b_in_D if cfg.is_transcoder else b_dec_E
    params.update(arch.init_params(cfg, enc, x_sample_NxD, centre))
    buffers = {"b_in": jnp.asarray(b_in_D, jnp.float32), "since_fired": _zeros_F(F),
               "threshold": jnp.zeros((), jnp.float32), "threshold_seen": jnp.zeros((), jnp.float32)}
    return params, buffers


def geometric_median(points_NxD: np.ndarray, iters: int = 64, eps: float = 1e-6) -> np.ndarray:
    """Weiszfeld's algorithm: m ← Σ w_i x_i / Σ w_i, w_i = 1 / max(‖x_i − m‖, eps), started at the mean."""
    x = jnp.asarray(points_NxD, jnp.float32)

    def step(m, _):
        w = 1.0 / jnp.maximum(jnp.linalg.norm(x - m, axis=1), eps)
        return (w[:, None] * x).sum(0) / w.sum(), None

    m, _ = jax.lax.scan(step, x.mean(0), None, length=iters)
    return np.asarray(m)


# ---------------------------------------------------------------------------------------------
# Training step pieces
# ---------------------------------------------------------------------------------------------
def forward_loss(cfg: SAEConfig, params: dict, buffers: dict, x_BxD, y_BxE, coef, key=None, dtype=jnp.float32,
                 massive_threshold=None):
    """(loss, stats): stats has loss, mse, l0, fired_F (tokens each latent fired on), the architecture's own
    scalars (e.g. BatchTopK's batch threshold) and the parts of FVU = sse / var that the trainer sums over its
    log window (pooled like eval FVU):
      fvu_sse = Σ_b ‖y'_b − ŷ'_b‖²,  fvu_var = Σ_b ‖y'_b − mean_b(y')‖²
    and, given `massive_threshold` (a target norm in training units), the same over the rows with
    ‖y'_b‖ <= massive_threshold about their own mean: fvu_sse_kept, fvu_var_kept (activation_store/massive.py)."""
    x_c = x_BxD - (buffers["b_in"] if cfg.is_transcoder else params["b_dec"])  # the input centre
    loss, mse, recon, stats = architecture(cfg).loss(cfg, params, buffers, x_c, y_BxE, coef, key, dtype)
    err_B = jnp.sum((recon - y_BxE) ** 2, axis=1)
    stats["mse"] = mse
    stats["fvu_sse"], stats["fvu_var"] = jnp.sum(err_B), _centred_sq(y_BxE)
    if massive_threshold is not None:
        kept_B = jnp.linalg.norm(y_BxE, axis=1) <= massive_threshold
        stats["fvu_sse_kept"] = jnp.sum(jnp.where(kept_B, err_B, 0.0))
        stats["fvu_var_kept"] = _centred_sq(y_BxE, kept_B)
    stats["loss"] = loss
    return loss, stats


def _centred_sq(y_BxE, kept_B=None):
    """Σ_b ‖y_b − m‖² over all rows about their mean, or over the kept rows about theirs (0 if none is kept)."""
    if kept_B is None:
        return jnp.sum((y_BxE - jnp.mean(y_BxE, axis=0)) ** 2)
    w_B = kept_B.astype(y_BxE.dtype)
    mean_E = jnp.sum(y_BxE * w_B[:, None], axis=0) / jnp.maximum(jnp.sum(w_B), 1.0)
    return jnp.sum(jnp.sum((y_BxE - mean_E) ** 2, axis=1) * w_B)


def sparsity_coef(cfg: SAEConfig) -> float:
    """The sparsity coefficient (L1 or L0) of `cfg`'s architecture; 0 when it has none."""
    field = architecture(cfg).selection(cfg).sparsity_field
    return float(getattr(cfg, field)) if field else 0.0


def update_buffers(cfg: SAEConfig, buffers: dict, stats: dict, n_tokens: int) -> dict:
    """Dead tracking (tokens since each latent fired) and the architecture's own buffers."""
    out = {**buffers, "since_fired": jnp.where(stats["fired_F"] > 0, 0.0, buffers["since_fired"] + n_tokens)}
    return architecture(cfg).selection(cfg).update_buffers(cfg, out, stats)


def project_decoder_grad(params: dict, grads: dict) -> dict:
    """Remove from each decoder row's gradient its component along the (unit) row."""
    dec, g = params["dec_FxE"], grads["dec_FxE"]
    return {**grads, "dec_FxE": g - jnp.sum(g * dec, axis=1, keepdims=True) * dec}


def normalise_decoder(params: dict) -> dict:
    dec = params["dec_FxE"]
    return {**params, "dec_FxE": dec / jnp.maximum(jnp.linalg.norm(dec, axis=1, keepdims=True), 1e-12)}


# ---------------------------------------------------------------------------------------------
# Saved (raw-space) parameters: the fold documented in saes/io.py
# ---------------------------------------------------------------------------------------------
def to_saved(cfg: SAEConfig, params: dict, buffers: dict, s_in: float, s_out: float) -> dict[str, np.ndarray]:
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    enc_FxD, dec = p["enc_FxD"], p["dec_FxE"]
    dec = dec / np.maximum(np.linalg.norm(dec, axis=1, keepdims=True), 1e-12)
    centre = np.asarray(buffers["b_in"], np.float64) if cfg.is_transcoder else p["b_dec"]
    centre_proj_F = enc_FxD @ centre  # (c @ W'): what the input centring subtracts from every latent
    out = {"W_enc": (enc_FxD.T * s_in / s_out), "W_dec": dec, "b_dec": p["b_dec"] / s_out}
    out.update(architecture(cfg).selection(cfg).to_saved(cfg, p, buffers, centre_proj_F, s_out))
    return {k: np.asarray(v).astype(np.float32) for k, v in out.items()}
