"""Training-time math of every SAE architecture, as pure functions over a params dict.

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
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from featureatlas.saes import sparse
from featureatlas.saes.config import SAEConfig

# BatchTopK looks for its k·B winners among each token's top `BATCHTOPK_ROW_CAP·k` pre-activations,
# i.e. one token can use at most 4k latents (exactly the batch top-k·B whenever no token would use more;
# `saturated_frac` in the logs reports how often the cap binds).
BATCHTOPK_ROW_CAP = 4
DENSE_ENC_INIT_SCALE = 0.1


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------
def init_params(cfg: SAEConfig, key: jax.Array, b_dec_E: np.ndarray, b_in_D: np.ndarray,
                x_sample_NxD: np.ndarray | None = None, y_sample_NxE: np.ndarray | None = None) -> tuple[dict, dict]:
    """Decoder rows random unit vectors; encoder = decoder transpose for SAEs (Gao et al. 2024), for
    transcoders the decoder rows mapped back through the sample's least-squares map; biases 0;
    b_dec from the geometric median of a target sample. JumpReLU thresholds start at each latent's
    (1 − k/F) quantile of its pre-activations on `x_sample` (training space), so the run starts near
    L0 = k instead of spending its first thousands of steps moving log θ (whose Adam steps are
    ~lr per step), and the L0 penalty tunes from there; without a sample θ = jumprelu_init_threshold."""
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
    if cfg.selection in ("relu", "gated"):
        # Small codes at the start, as with Anthropic's 0.1-norm decoder init (April 2024 update):
        # unit-scale codes on ~F/2 active latents would start the reconstruction far too large.
        enc = enc * DENSE_ENC_INIT_SCALE
    params = {"enc_FxD": enc, "dec_FxE": dec, "b_dec": jnp.asarray(b_dec_E, jnp.float32)}
    def zeros_F():  # fresh buffers: the training step donates its state, so no two leaves may share one
        return jnp.zeros((F,), jnp.float32)

    if cfg.architecture == "gated":
        params.update(b_gate=zeros_F(), r_mag=zeros_F(), b_mag=zeros_F())
    else:
        params["b_enc"] = zeros_F()
    if cfg.architecture == "jumprelu":
        theta = np.full((F,), cfg.jumprelu_init_threshold)
        if x_sample_NxD is not None and len(x_sample_NxD):
            centre = b_in_D if cfg.is_transcoder else b_dec_E
            pre = (np.asarray(x_sample_NxD) - centre) @ np.asarray(enc).T
            q = np.quantile(pre, 1.0 - min(1.0, cfg.k / F), axis=0)
            theta = np.maximum(q, cfg.jumprelu_init_threshold)
        params["log_threshold"] = jnp.asarray(np.log(theta), jnp.float32)
    buffers = {
        "b_in": jnp.asarray(b_in_D, jnp.float32),
        "since_fired": zeros_F(),
        "threshold": jnp.zeros((), jnp.float32),
        "threshold_seen": jnp.zeros((), jnp.float32),
    }
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
# Straight-through estimators for JumpReLU (Rajamanoharan et al. 2024b, eqs. 11-12)
# ---------------------------------------------------------------------------------------------
def _rect(u):
    """Rectangle kernel K(u) = 1[|u| < 1/2]."""
    return (jnp.abs(u) < 0.5).astype(u.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(z, theta, bandwidth):
    """z · H(z − θ); ∂/∂z = H(z − θ), ∂/∂θ ≈ −(θ/ε) K((z − θ)/ε)."""
    return jnp.where(z > theta, z, 0.0)


def _jumprelu_fwd(z, theta, bandwidth):
    return jnp.where(z > theta, z, 0.0), (z, theta)


def _jumprelu_bwd(bandwidth, res, g):
    z, theta = res
    d_z = jnp.where(z > theta, g, 0.0)
    d_theta = -(theta / bandwidth) * _rect((z - theta) / bandwidth) * g
    return d_z, _sum_to(d_theta, theta.shape)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def heaviside(z, theta, bandwidth):
    """H(z − θ); ∂/∂z = 0, ∂/∂θ ≈ −(1/ε) K((z − θ)/ε)."""
    return (z > theta).astype(z.dtype)


def _heaviside_fwd(z, theta, bandwidth):
    return (z > theta).astype(z.dtype), (z, theta)


def _heaviside_bwd(bandwidth, res, g):
    z, theta = res
    d_theta = -(1.0 / bandwidth) * _rect((z - theta) / bandwidth) * g
    return jnp.zeros_like(z), _sum_to(d_theta, theta.shape)


heaviside.defvjp(_heaviside_fwd, _heaviside_bwd)


def _sum_to(x, shape):
    return x.reshape((-1,) + tuple(shape)).sum(0) if x.shape != tuple(shape) else x


# ---------------------------------------------------------------------------------------------
# Forward pieces
# ---------------------------------------------------------------------------------------------
def _mm(a, b_T, dtype):
    """a @ b_Tᵀ computed in `dtype` with float32 accumulation."""
    return jax.lax.dot_general(
        a.astype(dtype), b_T.astype(dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )


def _mm_n(a, b, dtype):
    return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def input_centre(cfg: SAEConfig, params: dict, buffers: dict):
    return buffers["b_in"] if cfg.is_transcoder else params["b_dec"]


def topk_entries(pre_BxF, k: int):
    """Row-wise top k of relu(pre): coordinate entries (rows, feats), N = B·k, row-major."""
    B = pre_BxF.shape[0]
    _, idx_BxK = jax.lax.top_k(pre_BxF, k)
    return jnp.repeat(jnp.arange(B, dtype=jnp.int32), k), idx_BxK.reshape(-1).astype(jnp.int32)


def batchtopk_entries(pre_BxF, k: int):
    """Top k·B of relu(pre) over the whole batch (Bussmann et al. 2024), as N = k·B coordinate entries.

    Candidates are each token's top min(F, 4k) values; the k·B-th largest candidate is found by
    bisection (exact to float resolution), and the entries above it are compacted. Returns
    (rows, feats, valid, threshold, saturated_frac); invalid (padding) entries must be zeroed.
    """
    B, F = pre_BxF.shape
    m = min(F, BATCHTOPK_ROW_CAP * k)
    n_keep = k * B
    cand_BxM, idx_BxM = jax.lax.top_k(jax.nn.relu(pre_BxF), m)

    def bisect(_, lo_hi):
        lo, hi = lo_hi
        mid = 0.5 * (lo + hi)
        enough = jnp.sum(cand_BxM > mid) >= n_keep
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 40, bisect, (jnp.float32(0.0), jnp.max(cand_BxM)))
    # Entries strictly above lo: at least k·B of them unless fewer are positive.
    keep_BxM = cand_BxM > lo
    flat = jnp.nonzero(keep_BxM.reshape(-1), size=n_keep, fill_value=0)[0]
    valid = jnp.arange(n_keep) < jnp.sum(keep_BxM)
    rows = (flat // m).astype(jnp.int32)
    feats = idx_BxM.reshape(-1)[flat].astype(jnp.int32)
    # (Counting kept entries per row rather than reading cand_BxM[:, -1]: slicing a top_k output makes
    # XLA:CPU fall back to a full sort.)
    saturated = jnp.mean(jnp.sum(keep_BxM, axis=1) == m) if m < F else jnp.float32(0.0)
    return rows, feats, valid, lo, saturated


def _selected_values(cfg, params, x_c_BxD, rows, feats, dtype):
    pre_N = sparse.encode_selected(rows, feats, x_c_BxD.astype(dtype), params["enc_FxD"].astype(dtype))
    return jax.nn.relu(pre_N.astype(jnp.float32) + params["b_enc"][feats])


def _decoder_norms(params):
    return jnp.linalg.norm(params["dec_FxE"], axis=1)


def _auxk(cfg, params, buffers, x_c_BxD, resid_BxE, key, dtype):
    """AuxK (Gao et al. 2024): dead latents reconstruct the detached residual e; 0 when none is dead.

    The dead latents compete for the residual through a dense sub-dictionary of M = min(k_aux, F)
    dead latents: all of them when at most k_aux are dead (then identical to the per-token top-k_aux
    of dead latents, as every other dead latent is absent), otherwise a random M of them per step.
    A small dense matmul is far cheaper than a per-token top-256 over all F latents on CPU.
    """
    F = cfg.width
    B, E = resid_BxE.shape
    M = min(cfg.k_aux, F)
    dead_F = buffers["since_fired"] >= cfg.dead_tokens

    def with_dead(_):
        score_F = jnp.where(dead_F, jax.random.uniform(key, (F,)), -1.0)
        _, sel_M = jax.lax.top_k(score_F, M)
        enc_MxD, dec_MxE = params["enc_FxD"][sel_M], params["dec_FxE"][sel_M]
        pre_BxM = _mm(x_c_BxD, enc_MxD, dtype) + params["b_enc"][sel_M]
        codes_BxM = jax.nn.relu(pre_BxM) * dead_F[sel_M]
        e_hat = _mm_n(codes_BxM, dec_MxE, dtype)
        # Normalised by the residual's own variance, as in Gao et al.'s code: the residual shrinks
        # as training goes on, and the dead latents' signal should not shrink with it.
        centred = resid_BxE - jnp.mean(resid_BxE, axis=0)
        return jnp.sum((e_hat - resid_BxE) ** 2) / jnp.maximum(jnp.sum(centred**2), 1e-12)

    return jax.lax.cond(jnp.any(dead_F), with_dead, lambda _: jnp.float32(0.0), None)


def forward_loss(cfg: SAEConfig, params: dict, buffers: dict, x_BxD, y_BxE, coef, key=None, dtype=jnp.float32):
    """(loss, stats): stats has mse, l0, fvu (batch), fired_F (tokens each latent fired on), and
    for BatchTopK the batch threshold; formulas in the module docstring."""
    B = x_BxD.shape[0]
    E = cfg.d_out
    x_c = x_BxD - input_centre(cfg, params, buffers)
    sel = cfg.selection
    stats = {}
    if sel in ("topk", "batchtopk"):
        pre = jax.lax.stop_gradient(_mm(x_c, params["enc_FxD"], dtype) + params["b_enc"])
        if sel == "topk":
            rows, feats = topk_entries(pre, cfg.k)
            vals = _selected_values(cfg, params, x_c, rows, feats, dtype)
        else:
            rows, feats, valid, thr, sat = batchtopk_entries(pre, cfg.k)
            vals = _selected_values(cfg, params, x_c, rows, feats, dtype) * valid
            stats["batch_threshold"] = thr
            stats["saturated_frac"] = sat
        if cfg.architecture == "matryoshka":
            prefixes = jnp.asarray(cfg.prefixes(), jnp.int32)
            group = jnp.searchsorted(prefixes, feats, side="right").astype(jnp.int32)
            m = len(cfg.prefixes())
            parts = sparse.decode_sparse(
                group * B + rows, feats, vals.astype(dtype), params["dec_FxE"].astype(dtype), m * B
            ).reshape(m, B, E)
            recons_MxBxE = jnp.cumsum(parts.astype(jnp.float32), axis=0) + params["b_dec"]
            mse_each = jnp.sum((recons_MxBxE - y_BxE[None]) ** 2, axis=(1, 2)) / (B * E)
            mse = jnp.mean(mse_each)
            recon = recons_MxBxE[-1]
            stats["mse_full"] = mse_each[-1]
        else:
            recon = sparse.decode_sparse(rows, feats, vals.astype(dtype), params["dec_FxE"].astype(dtype), B)
            recon = recon.astype(jnp.float32) + params["b_dec"]
            mse = jnp.sum((recon - y_BxE) ** 2) / (B * E)
        fired = (vals > 0).astype(jnp.float32)
        stats["fired_F"] = jnp.zeros((cfg.width,), jnp.float32).at[feats].add(fired)
        stats["l0"] = jnp.sum(fired) / B
        loss = mse
        if cfg.k_aux > 0 and cfg.auxk_coef > 0:
            key = jax.random.key(0) if key is None else key
            aux = _auxk(cfg, params, buffers, x_c, jax.lax.stop_gradient(y_BxE - recon), key, dtype)
            stats["auxk"] = aux
            loss = loss + cfg.auxk_coef * aux
    elif sel in ("relu", "jumprelu"):
        pre = _mm(x_c, params["enc_FxD"], dtype) + params["b_enc"]
        if sel == "relu":
            codes = jax.nn.relu(pre)
            sparsity = jnp.sum(codes * _decoder_norms(params)) / B
        else:
            theta = jnp.exp(params["log_threshold"])
            codes = jumprelu(pre, theta, cfg.jumprelu_bandwidth)
            sparsity = jnp.sum(heaviside(pre, theta, cfg.jumprelu_bandwidth)) / B
        recon = _mm_n(codes, params["dec_FxE"], dtype) + params["b_dec"]
        mse = jnp.sum((recon - y_BxE) ** 2) / (B * E)
        loss = mse + coef * sparsity / E
        stats["sparsity"] = sparsity
        stats["fired_F"] = jnp.sum((codes > 0).astype(jnp.float32), axis=0)
        stats["l0"] = jnp.sum(stats["fired_F"]) / B
    elif sel == "gated":
        proj = _mm(x_c, params["enc_FxD"], dtype)
        pi_gate = proj + params["b_gate"]
        pi_mag = proj * jnp.exp(params["r_mag"]) + params["b_mag"]
        codes = jnp.where(pi_gate > 0, jax.nn.relu(pi_mag), 0.0)
        recon = _mm_n(codes, params["dec_FxE"], dtype) + params["b_dec"]
        mse = jnp.sum((recon - y_BxE) ** 2) / (B * E)
        gate_act = jax.nn.relu(pi_gate)
        sparsity = jnp.sum(gate_act * _decoder_norms(params)) / B
        frozen = _mm_n(gate_act, jax.lax.stop_gradient(params["dec_FxE"]), dtype)
        frozen = frozen + jax.lax.stop_gradient(params["b_dec"])
        aux = jnp.sum((frozen - y_BxE) ** 2) / (B * E)
        loss = mse + coef * sparsity / E + aux
        stats.update(sparsity=sparsity, gate_aux=aux)
        stats["fired_F"] = jnp.sum((codes > 0).astype(jnp.float32), axis=0)
        stats["l0"] = jnp.sum(stats["fired_F"]) / B
    else:
        raise ValueError(f"unknown selection {sel!r}")
    stats["mse"] = mse
    centred = y_BxE - jnp.mean(y_BxE, axis=0)
    stats["fvu"] = jnp.sum((recon - y_BxE) ** 2) / jnp.maximum(jnp.sum(centred**2), 1e-12)
    stats["loss"] = loss
    return loss, stats


def sparsity_coef(cfg: SAEConfig) -> float:
    if cfg.selection == "jumprelu":
        return cfg.l0_coef
    if cfg.selection in ("relu", "gated"):
        return cfg.l1_coef
    return 0.0


def update_buffers(cfg: SAEConfig, buffers: dict, stats: dict, n_tokens: int) -> dict:
    """Dead tracking (tokens since each latent fired) and BatchTopK's EMA threshold."""
    out = dict(buffers)
    out["since_fired"] = jnp.where(stats["fired_F"] > 0, 0.0, buffers["since_fired"] + n_tokens)
    if cfg.selection == "batchtopk":
        t = stats["batch_threshold"]
        decay = cfg.batchtopk_threshold_decay
        seen = buffers["threshold_seen"] > 0
        out["threshold"] = jnp.where(seen, decay * buffers["threshold"] + (1 - decay) * t, t)
        out["threshold_seen"] = jnp.ones((), jnp.float32)
    return out


def project_decoder_grad(params: dict, grads: dict) -> dict:
    """Remove from each decoder row's gradient its component along the (unit) row."""
    dec, g = params["dec_FxE"], grads["dec_FxE"]
    g = g - jnp.sum(g * dec, axis=1, keepdims=True) * dec
    return {**grads, "dec_FxE": g}


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
    if cfg.architecture == "gated":
        out["b_gate"] = (p["b_gate"] - centre_proj_F) / s_out
        out["r_mag"] = p["r_mag"]
        out["b_mag"] = (p["b_mag"] - centre_proj_F * np.exp(p["r_mag"])) / s_out
    else:
        out["b_enc"] = (p["b_enc"] - centre_proj_F) / s_out
    if cfg.selection == "jumprelu":
        out["threshold"] = np.exp(p["log_threshold"]) / s_out
    elif cfg.selection == "batchtopk":
        out["threshold"] = np.full((cfg.width,), float(buffers["threshold"]) / s_out)
    return {k: v.astype(np.float32) for k, v in out.items()}
