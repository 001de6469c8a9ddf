"""KL-calibrated steering, steered generation and the capability cost of steering, batched over features.

Steering edit (at `hook`, every edited position, prompt and generated):
    add (code_fn None):   x ← x + α·v                       (SNMF, DiffMeans, neurons: α·direction at their hook;
                                                             the SNMF paper adds α·unit vector, so pass unit rows)
    latent clamp:         x ← x + (α − a_f(x))·d_f           (SAEs: the latent f is set to α and the
                                                             reconstruction error is kept, Gur-Arieh et al. 2025;
                                                             `activation_store.models.edits.set_code`)
  a_f(x) = code_fn(x_BxTxD, f) (`latent_code_fn(dic)` builds it from a Dictionary's encode).
  Position 0 (BOS, the attention sink) is not edited unless edit_bos; positions count from the first
  real token, so left padding does not move them.

KL calibration (`kl_calibrate`; Gur-Arieh et al. 2025 output evaluation, Shafran et al. 2025 steering):
  for each pair (v_g, t_g) find α_g = sign(t_g)·s with s ∈ [lo, hi] such that
      KL_g(s) = mean over (prompt b, position p) of Σ_v p(v | b, ≤p) · [log p − log q_s](v | b, ≤p)
  (p clean, q_s steered) lies in [|t_g|, |t_g| + band].
  positions="all": every edited real position (padding and BOS excluded: an
  unedited position cannot change); positions="last": the last token of each prompt only.
  Search: KL grows roughly like a power of s, so s is searched in log space, in rounds (`_Search`): the
  first try is sqrt(lo·hi); while the target is bracketed on one side only, the next s extrapolates
  KL ∝ s²; once bracketed, regula falsi on (log s, log KL) kept inside the bracket's middle 80% (a
  safeguarded bisection). A pair stops as soon as a KL lies inside the band. KL(hi) < |t| is
  "too_weak" (reported with KL(hi)), KL(lo) above the band "too_strong", a pair still outside after
  `iters` evaluations "not_converged", reported with the closest KL it saw. The pairs of one vector
  and sign (the targets 0.25 and 0.5) share all their evaluations.
  Batching: each round's proposals of the unfinished pairs are packed into forwards of up to `batch`
  (direction, α) rows, vmapped; the layers before the edited hook do not depend on the row and run once
  per forward. Finished pairs take no rows, and a (direction, α) needed by several pairs is computed
  once. Prompts run in groups of equal length (no padding), and only the positions the KL averages
  over are unembedded. Clean log-probabilities are computed once per call. The search's rounds do not
  depend on the batching, so batch=1 (one row per forward: one feature at a time) gives the same α up
  to float rounding.
  Cost on a CPU is FLOPs: per row, the layers after the hook on the prompts' tokens plus one
  unembedding per averaged position (scripts/bench_evaluate.py).

Generation (`steered_generations`): the model's KV-cache generation loop (`generate_core`) vmapped over
  G (vector, α) rows inside one jit, each on the same batch of prompts × samples; the sampling key is
  shared by all rows, so two features' generations differ by their steering only (common random
  numbers) and a feature's text does not depend on how it was batched.

Capability cost (`capability_cost`): mean per-token NLL of corpus text with the steering edit minus
  without; `mean_nll` / `perplexity`: the unsteered model's NLL of texts (the offline fluency judge).
"""
from __future__ import annotations

import dataclasses
import math
import time
import weakref
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from featureatlas.activation_store.configs import Config, setting
from featureatlas.activation_store.errors import ConfigError
from featureatlas.activation_store.models import Sampling, transformer
from featureatlas.activation_store.models.edits import add, set_code
from featureatlas.activation_store.models.generate import GenPlan, generate_core
from featureatlas.eval.adapters import DictionaryError, write_hook
from featureatlas.eval.outputs import _compiled

# The two protocols' prompts and sampling (shared/RESEARCH.md).
OUTPUT_EVAL_PROMPTS = ("The explanation is simple:", "I think", "We")
OUTPUT_EVAL_TARGETS = (0.25, 0.5, -0.25, -0.5)
OUTPUT_EVAL_SAMPLING = Sampling(temperature=0.75)
SNMF_EVAL_PROMPTS = ("I think that",)
SNMF_EVAL_TARGETS = (0.025, 0.05, 0.1, 0.15, 0.25, 0.35, 0.5)
SNMF_EVAL_SAMPLING = Sampling(temperature=1.0, top_k=30, top_p=0.3)

STATUSES = ("reached", "too_weak", "too_strong", "not_converged")


# ---- settings and results ---------------------------------------------------------------------

@dataclasses.dataclass
class CalibrationConfig(Config):
    """How the steering strength is searched (defaults: the output-centric paper; `SNMF_CALIBRATION`: SNMF paper)."""

    positions: str = setting("all", choices=("all", "last"))
    """KL averaged over every real edited position of the prompts (all) or over each prompt's last token (last)."""
    lo: float = setting(1.0, gt=0)
    """Smallest strength |α| searched."""
    hi: float = setting(1000.0, gt=0)
    """Largest strength |α| searched; a pair whose KL at hi is below its target is reported too_weak."""
    iters: int = setting(20, gt=0)
    """Most KL evaluations per (feature, target) pair (the SNMF paper's bisection: 20)."""
    band: float = setting(0.1, gt=0)
    """Success when the KL lies in [|target|, |target| + band]."""
    batch: int = setting(64, gt=0)
    """(direction, strength) rows per vmapped forward: more is faster until memory runs out (1 = one at a time)."""
    edit_bos: bool = setting(False)
    """Also steer position 0 (BOS, the attention sink); off by default, as in TokenChange."""

    def validate(self):
        super().validate()
        if self.hi <= self.lo:
            raise ConfigError(f"--hi ({self.hi:g}) must be larger than --lo ({self.lo:g})")
        return self


OUTPUT_CALIBRATION = CalibrationConfig()
"""Gur-Arieh et al. 2025: s ∈ [1, 1000], KL over all positions in [t, t + 0.1]."""
SNMF_CALIBRATION = CalibrationConfig(positions="last", lo=1.0, hi=2000.0, iters=20, band=0.01)
"""Shafran et al. 2025: s ∈ [1, 2000], 20 steps, last token, tolerance 0.01."""


@dataclasses.dataclass
class Calibration:
    """Per (direction, target) pair g: the signed strength found and what it reached.

    alpha_G: signed strength (negative for negative targets); for unreached pairs the strength whose KL
    was closest to the band. kl_G: KL(clean‖steered) at alpha_G. reached_G: kl_G ∈ [|t|, |t| + band].
    status_G: one of STATUSES. iters_G: KL evaluations the pair used (shared ones included).
    forwards: vmapped forwards run; rows: (direction, α) rows computed (shared rows counted once)."""

    alpha_G: np.ndarray
    kl_G: np.ndarray
    reached_G: np.ndarray
    target_G: np.ndarray
    status_G: np.ndarray
    iters_G: np.ndarray
    band: float
    forwards: int = 0
    rows: int = 0
    seconds: float = 0.0

    def record(self, g: int) -> dict:
        """JSON-ready summary of pair g."""
        return {"target": float(self.target_G[g]), "alpha": float(self.alpha_G[g]), "kl": float(self.kl_G[g]),
                "reached": bool(self.reached_G[g]), "status": str(self.status_G[g]), "iters": int(self.iters_G[g])}


# ---- argument checks --------------------------------------------------------------------------

def check_hook_vectors(model, hook: str, vectors_GxD) -> np.ndarray:
    model.check_hook(hook)
    D = model.hook_dim(hook)
    V = np.asarray(vectors_GxD, np.float32)
    if V.ndim != 2 or V.shape[1] != D:
        raise ConfigError(f"steering vectors must be [G, {D}] ({hook} is {D} wide in {model.model_id}), got "
                          f"shape {V.shape}: use directions in the hook's space (directions_FxD)")
    if not np.all(np.isfinite(V)):
        raise ConfigError("steering vectors contain NaN or inf; check the dictionary's decoder rows")
    return V


def padded_blocks(nb: int, V_GxD: np.ndarray, alphas_G: np.ndarray, feats_G: np.ndarray):
    """(start, m, V_nbxD, a_nb, f_nb) per block of nb rows; the last block is zero-padded to nb rows (one compiled
    shape), its padded rows computed and dropped by the caller."""
    G = V_GxD.shape[0]
    for s in range(0, G, nb):
        m = min(nb, G - s)
        Vb = np.zeros((nb, V_GxD.shape[1]), np.float32)
        ab = np.zeros(nb, np.float32)
        fb = np.zeros(nb, np.int32)
        Vb[:m], ab[:m], fb[:m] = V_GxD[s:s + m], alphas_G[s:s + m], feats_G[s:s + m]
        yield s, m, Vb, ab, fb


def _check_code(code_fn, features_G, G: int) -> np.ndarray:
    """int32 latent ids [G] for code_fn (zeros without one)."""
    if code_fn is None:
        if features_G is not None:
            raise ConfigError("features_G names latents for code_fn; pass code_fn too (e.g. latent_code_fn(dic)) "
                              "or drop features_G to add α·vector")
        return np.zeros(G, np.int32)
    if not callable(code_fn):
        raise ConfigError(f"code_fn must be a function (acts_BxTxD, feature) -> code_BxT, got {type(code_fn).__name__}")
    if features_G is None:
        raise ConfigError("code_fn needs features_G: the latent id of each steering vector")
    f = np.asarray(features_G)
    if f.shape != (G,) or (G and not np.issubdtype(f.dtype, np.integer)) or (G and f.min() < 0):
        raise ConfigError(f"features_G must hold one latent id >= 0 per vector ({G}), got {features_G!r}")
    return f.astype(np.int32)


def _check_values(name: str, values, G: int, *, nonzero: bool) -> np.ndarray:
    a = np.asarray(values, np.float64)
    if a.shape != (G,) or not np.all(np.isfinite(a)):
        raise ConfigError(f"{name} must hold one finite number per steering vector ({G}), got shape {a.shape}")
    if nonzero and np.any(a == 0):
        raise ConfigError(f"{name} must be nonzero (its sign is the steering sign); got 0 at rows "
                          f"{np.flatnonzero(a == 0)[:5].tolist()}")
    return a


def prompt_tokens(model, prompts) -> list[list[int]]:
    """Token lists from prompts given as strings (BOS prepended, as the model was trained) or token lists
    (used as given: include BOS yourself)."""
    if isinstance(prompts, str) or (hasattr(prompts, "ndim") and prompts.ndim == 1):
        prompts = [prompts]
    rows = []
    for p in prompts:
        if isinstance(p, str):
            bos = [] if model.config.bos_id is None else [model.config.bos_id]
            rows.append(bos + list(model.tokenizer.encode(p)))
        else:
            rows.append([int(t) for t in np.asarray(p).ravel()])
    if not rows or any(len(r) == 0 for r in rows):
        raise ConfigError("steering needs at least one non-empty prompt")
    V = model.config.vocab_size
    bad = [t for r in rows for t in r if not 0 <= t < V]
    if bad:
        raise ConfigError(f"prompt token ids must lie in [0, {V}); got {bad[:5]}: the prompts come from another "
                          "tokenizer")
    return rows


def left_pad(rows: Sequence[Sequence[int]], pad_to: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_BxT, mask_BxT): rows left-padded (with 0, mask 0) to the longest, rounded up to pad_to; the
    last column is every row's last token."""
    T = -(-max(len(r) for r in rows) // pad_to) * pad_to
    toks = np.zeros((len(rows), T), np.int32)
    mask = np.zeros((len(rows), T), np.int32)
    for b, r in enumerate(rows):
        if len(r):
            toks[b, T - len(r):] = r
            mask[b, T - len(r):] = 1
    return toks, mask


def _edit_positions(n_pos: int, edit_bos: bool) -> np.ndarray | None:
    """Edited positions (counted from the first real token): all, or all but 0 (BOS)."""
    return None if edit_bos else np.arange(1, max(n_pos, 2), dtype=np.int32)


def _steer_edit(hook: str, code_fn, positions, v_D, alpha, feature):
    """The steering edit of one row (traced vector, strength and latent id)."""
    if code_fn is None:
        return add(hook, v_D, alpha, positions)
    return set_code(hook, code_fn, v_D, alpha, feature, positions)


# ---- latents of a Dictionary -------------------------------------------------------------------

_CODE_FNS: dict = {}


def latent_code_fn(dic) -> Callable:
    """code_fn(x_BxTxD, f) = dic.encode(x)[..., f]: the latent's current activation, for the latent clamp
    x + (α − a_f(x))·d_f. One function object per dictionary (it is part of the compile key).
    Under the vmapped forward the encoder runs once per forward, not once per row: x at the hook does
    not depend on the row. Transcoders read another hook than they write: clamp them by adding α·d_f."""
    if getattr(dic, "hook_out", None) and dic.hook_out != dic.hook:
        raise DictionaryError(f"{dic.hook} -> {dic.hook_out} is a transcoder: its latent is computed from another "
                              "hook than it writes, so it cannot be clamped in place; steer by adding (code_fn=None)")
    hit = _CODE_FNS.get(id(dic))
    if hit is not None and hit[0]() is dic:
        return hit[1]
    try:
        ref = weakref.ref(dic)
    except TypeError:  # no weak references: one function per call (recompiles each call)
        ref = lambda: dic  # noqa: E731

    def code(x_BxTxD, f):
        B, T, D = x_BxTxD.shape
        return jnp.asarray(ref().encode(x_BxTxD.reshape(B * T, D)))[:, f].reshape(B, T)

    if isinstance(ref, weakref.ref):  # the registry must not keep the dictionary alive
        _CODE_FNS[id(dic)] = (ref, code)
        weakref.finalize(dic, _CODE_FNS.pop, id(dic), None)
    return code


def steering_setup(dic, features, *, clamp_latent: bool):
    """(hook, vectors_GxD, code_fn, features_G) to steer a Dictionary's features: its decoder rows at the hook
    it writes. clamp_latent (SAEs): set the latent, keeping the reconstruction error; else add α·row (the
    SNMF protocol adds α·unit vector: rows are normalised then; zero rows stay zero)."""
    f = np.atleast_1d(np.asarray(features)).astype(np.int64)
    V = np.asarray(dic.directions_FxD, np.float32)[f]
    if clamp_latent:
        return dic.hook, V, latent_code_fn(dic), f.astype(np.int32)
    n = np.linalg.norm(V, axis=1, keepdims=True)
    return write_hook(dic), np.where(n > 0, V / np.where(n > 0, n, 1), 0).astype(np.float32), None, None


# ---- the vmapped KL forward ---------------------------------------------------------------------

def _selected_logp(model, params, toks_BxT, mask_BxT, edits, sel_N):
    """log-softmax of the logits at the selected flat positions sel_N (b·T + t) only: [N, V]: the positions the
    KL averages over are unembedded, BOS and padding are not."""
    cfg = model.config
    top = f"resid_post.{cfg.n_layers - 1}"
    _, acts = model.forward(params, toks_BxT, attention_mask_BxT=mask_BxT, capture=(top,), edits=edits,
                            stop_at="capture")
    x = acts[top].reshape(-1, cfg.d_model)[sel_N]
    return jax.nn.log_softmax(transformer.logits_from_resid(cfg, params, x), axis=-1)


def _clean_logp_fn(model):
    return _compiled(model, ("steer-clean-logp",), lambda ref: jax.jit(
        lambda params, toks, mask, sel: _selected_logp(ref(), params, toks, mask, (), sel)))


def _kl_fn(model, hook: str, code_fn, Ts: tuple[int, ...], edit_bos: bool):
    """jit: (params, groups, logps, V_RxD, a_R, f_R) -> KL_R: per row, the mean over the selected positions of
    all prompt groups (tokens, mask, sel_N; lengths Ts) of KL(clean‖steered), vmapped over the R rows."""
    positions = [_edit_positions(T, edit_bos) for T in Ts]

    def build(ref):
        def run(params, groups, logps, V, a, f):
            lm = ref()
            n = sum(sel.shape[0] for _, _, sel in groups)

            def one(v, alpha, feat):
                total = 0.0
                for (toks, mask, sel), lp_clean, pos in zip(groups, logps, positions):
                    edit = _steer_edit(hook, code_fn, pos, v, alpha, feat)
                    lp = _selected_logp(lm, params, toks, mask, (edit,), sel)
                    total = total + jnp.sum(jnp.exp(lp_clean) * (lp_clean - lp))
                return total / n

            return jax.vmap(one)(V, a, f)

        return jax.jit(run)

    return _compiled(model, ("steer-kl", hook, code_fn, Ts, edit_bos), build)


_POWER = 2.0
"""Exponent of the one-sided extrapolation KL ∝ s^_POWER. 2 is exact for small steering (KL is quadratic in the
logit change); measured on SmolLM2 the local exponent is 2.0-2.7 between KL 0.01 and 1, and 2.3 or 2.6 did
not need fewer evaluations than 2 over three hooks."""


class _Search:
    """The strength search of every pair (module docstring), host side, in synchronous rounds: each round
    every unfinished pair proposes one strength, all proposals are evaluated, then every pair looks at the
    points known so far. The pairs of one group (same vector and latent, same sign) share their points: an
    evaluation made for the target 0.5 also brackets 0.25. Rounds do not depend on how the evaluations are
    batched, so batch=1 walks the same path.

    Proposal of pair g (target band [t, t + band], aim m = t + band/2) from its group's points {s: KL}, with
    b = the smallest s above the band and a = the largest s < b below it:
      1. no point yet: s = sqrt(lo·hi);
      2. only a: s = a·sqrt(m / KL(a)) (KL ∝ s² for small steering: the logit change is linear in s), at
         most hi (hi itself when KL(a) = 0); KL(hi) < t then ends the pair too_weak;
      3. only b: s = b·sqrt(m / KL(b)), at least lo; lo itself once b < lo·(hi/lo)^(1/8) (KL(lo) above the
         band ends it too_strong);
      4. both: a step of regula falsi on (log s, log KL) towards m, kept inside the middle 80% of
         [log a, log b] so a curved KL still shrinks the bracket (bisection in log s when KL(a) = 0)."""

    def __init__(self, group_G, targets, lo, hi, band, iters):
        G = len(targets)
        self.group = group_G
        self.t = np.abs(targets)
        self.sign = np.sign(targets)
        self.band, self.iters = band, iters
        self.lo, self.hi = float(np.float32(lo)), float(np.float32(hi))
        self.points: dict[int, dict[float, float]] = {}
        self.evals = np.zeros(G, np.int64)
        self.done = np.zeros(G, bool)
        self.status = np.full(G, "not_converged", dtype=object)
        self.best_s = np.full(G, np.nan)
        self.best_kl = np.full(G, np.nan)

    def _bracket(self, g):
        pts = self.points.get(int(self.group[g]), {})
        t, band = self.t[g], self.band
        above = [s for s, k in pts.items() if k > t + band]
        b = min(above) if above else None
        below = [s for s, k in pts.items() if k < t and (b is None or s < b)]
        a = max(below) if below else None
        return pts, a, b

    def propose(self, g: int) -> float:
        pts, a, b = self._bracket(g)
        lo, hi = self.lo, self.hi
        m = self.t[g] + 0.5 * self.band
        if a is None and b is None:
            x = 0.5 * (math.log(lo) + math.log(hi))
        elif b is None:
            if pts[a] <= 0 or a >= hi:
                return hi
            x = min(math.log(a) + (math.log(m) - math.log(pts[a])) / _POWER, math.log(hi))
        elif a is None:
            if b <= lo * (hi / lo) ** 0.125 or not np.isfinite(pts[b]):
                return lo if np.isfinite(pts[b]) else float(np.float32(math.sqrt(lo * b)))
            x = max(math.log(b) + (math.log(m) - math.log(pts[b])) / _POWER, math.log(lo))
        else:
            la, lb = math.log(a), math.log(b)
            ka, kb = pts[a], pts[b]
            x = 0.5 * (la + lb)
            if ka > 0 and np.isfinite(kb):
                x = la + (math.log(m) - math.log(ka)) * (lb - la) / (math.log(kb) - math.log(ka))
                x = min(max(x, la + 0.1 * (lb - la)), lb - 0.1 * (lb - la))
        return float(np.float32(math.exp(x)))

    def observe(self, group: int, s: float, kl: float) -> None:
        self.points.setdefault(int(group), {})[s] = kl if np.isfinite(kl) else np.inf

    def settle(self, g: int) -> None:
        """After a round: finish pair g if it reached its band, cannot reach it, or ran out of steps."""
        self.evals[g] += 1
        pts, a, b = self._bracket(g)
        t, band = self.t[g], self.band
        inside = [(abs(k - (t + 0.5 * band)), s) for s, k in pts.items() if t <= k <= t + band]
        if inside:
            s = min(inside)[1]
            self._finish(g, "reached", s, pts[s])
            return
        if pts.get(self.hi, np.inf) < t and b is None:
            self._finish(g, "too_weak", self.hi, pts[self.hi])
            return
        if pts.get(self.lo, -np.inf) > t + band and a is None:
            self._finish(g, "too_strong", self.lo, pts[self.lo])
            return
        stuck = a is not None and b is not None and math.log(b) - math.log(a) < 1e-6
        if self.evals[g] >= self.iters or stuck:
            gap, s = min((max(t - k, k - t - band), s) for s, k in pts.items())
            self._finish(g, "not_converged", s, pts[s])

    def _finish(self, g, status, s, kl):
        self.done[g], self.status[g], self.best_s[g], self.best_kl[g] = True, status, s, kl


MAX_PROMPT_GROUPS = 4
"""Prompts of up to this many distinct lengths run as unpadded groups (one forward each); more are left-padded
into one batch (fewer compiled shapes)."""


def _prompt_groups(model, prompts, edit_bos: bool, last: bool) -> tuple:
    """((tokens, mask, sel), ...): the prompts in groups of equal length (or one left-padded group, see
    MAX_PROMPT_GROUPS), each with the flat positions b·T + t the KL averages over (each prompt's last
    token, or every real token it steers). Padding would cost as much as real tokens in every layer:
    for the paper's three prompts (6, 3 and 2 tokens) a padded batch is 39% padding."""
    rows = prompt_tokens(model, prompts)
    if not edit_bos and any(len(r) < 2 for r in rows):
        raise ConfigError("every prompt needs a token after position 0 (BOS is not steered): add text to the "
                          "prompt or set edit_bos")
    lengths = sorted({len(r) for r in rows})
    parts = [[r for r in rows if len(r) == n] for n in lengths] if len(lengths) <= MAX_PROMPT_GROUPS else [rows]
    groups = []
    for part in parts:
        toks, mask = left_pad(part)
        B, T = toks.shape
        if last:
            sel = np.arange(B) * T + T - 1
        else:
            pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
            sel = np.flatnonzero(((mask > 0) & ((pos >= 1) | edit_bos)).ravel())
        groups.append((toks, mask, sel.astype(np.int32)))
    return tuple(groups)


def _kl_setup(model, hook, code_fn, prompts, cfg):
    """(groups, clean log-probs per group, the compiled KL function)."""
    groups = _prompt_groups(model, prompts, cfg.edit_bos, cfg.positions == "last")
    clean = _clean_logp_fn(model)
    logps = tuple(clean(model.params, *g) for g in groups)
    fn = _kl_fn(model, hook, code_fn, tuple(g[0].shape[1] for g in groups), cfg.edit_bos)
    return groups, logps, fn


def compile_calibration(model, hook: str, prompts, config: CalibrationConfig | None = None, *, code_fn=None,
                        **settings) -> float:
    """Compile kl_calibrate's forward for every row count it can use (1, 4, 16, ..., batch), so that later
    calls measure search time only (benchmarks; long jobs that report compile time apart). Returns seconds."""
    cfg = (config or OUTPUT_CALIBRATION)
    cfg = CalibrationConfig.from_dict({**cfg.to_dict(), **settings}).validate() if settings else cfg.validate()
    t0 = time.perf_counter()
    groups, logps, fn = _kl_setup(model, hook, code_fn, prompts, cfg)
    D = model.hook_dim(hook)
    for n in sorted({_rows_shape(k, cfg.batch) for k in range(1, cfg.batch + 1)}):
        np.asarray(fn(model.params, groups, logps, np.zeros((n, D), np.float32), np.zeros(n, np.float32),
                      np.zeros(n, np.int32)))
    return time.perf_counter() - t0


def kl_calibrate(model, hook: str, vectors_GxD, targets_G, prompts, config: CalibrationConfig | None = None, *,
                 code_fn=None, features_G=None, progress: bool = False, **settings) -> Calibration:
    """Strength per (vector, signed target) pair so that the mean per-token KL(clean‖steered) lands in
    [|t|, |t| + band] (module docstring). prompts: strings (BOS prepended) or token lists; settings override
    fields of `config` (CalibrationConfig; default OUTPUT_CALIBRATION), e.g. batch=1 for one at a time.
    code_fn (+ features_G): clamp latent features_G[g] to α keeping the error (`latent_code_fn`)."""
    cfg = (config or OUTPUT_CALIBRATION)
    cfg = CalibrationConfig.from_dict({**cfg.to_dict(), **settings}).validate() if settings else cfg.validate()
    V = check_hook_vectors(model, hook, vectors_GxD)
    G = V.shape[0]
    targets = _check_values("targets_G", targets_G, G, nonzero=True)
    feats = _check_code(code_fn, features_G, G)
    _prompt_groups(model, prompts, cfg.edit_bos, cfg.positions == "last")  # checks before any model work
    t_start = time.perf_counter()
    # a group: the pairs with the same vector (and latent) and the same sign; they share evaluations
    key_rows = np.concatenate([V, feats[:, None].astype(np.float32), np.sign(targets)[:, None]], axis=1)
    _, group = np.unique(key_rows, axis=0, return_inverse=True)
    search = _Search(group.ravel(), targets, cfg.lo, cfg.hi, cfg.band, cfg.iters)
    if G == 0:
        return _calibration(search, targets, cfg, 0, 0, 0.0)
    groups, logps, fn = _kl_setup(model, hook, code_fn, prompts, cfg)
    n, D = cfg.batch, V.shape[1]
    forwards = rows = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=G, desc="KL calibration", unit="pair")
    while not search.done.all():
        active = np.flatnonzero(~search.done)
        want: dict[tuple[int, float], int] = {}  # (group, |α|) -> a pair that asked for it
        for g in active:
            want.setdefault((int(search.group[g]), search.propose(g)), int(g))
        keys = list(want)
        for c in range(0, len(keys), n):
            chunk = keys[c:c + n]
            nr = _rows_shape(len(chunk), n)
            Vb = np.zeros((nr, D), np.float32)
            ab = np.zeros(nr, np.float32)
            fb = np.zeros(nr, np.int32)
            for i, k in enumerate(chunk):
                g0 = want[k]
                Vb[i], ab[i], fb[i] = V[g0], search.sign[g0] * k[1], feats[g0]
            kl = np.asarray(fn(model.params, groups, logps, Vb, ab, fb), np.float64)
            forwards += 1
            rows += len(chunk)
            for i, (grp, s) in enumerate(chunk):
                search.observe(grp, s, float(kl[i]))
        for g in active:
            search.settle(int(g))
        if bar is not None:
            bar.update(int(search.done.sum()) - bar.n)
    if bar is not None:
        bar.close()
    return _calibration(search, targets, cfg, forwards, rows, time.perf_counter() - t_start)


def _rows_shape(k: int, n: int) -> int:
    """Rows of the next forward: the next power of four ≥ k, at most n. Few compiled shapes (each costs a
    compile of the whole forward), and the last forwards, when most pairs have finished, do not pay for a
    full batch of padding rows."""
    r = 1
    while r < k:
        r *= 4
    return min(n, r)


def _calibration(search: _Search, targets, cfg, forwards, rows, seconds) -> Calibration:
    reached = search.status == "reached"
    return Calibration(
        alpha_G=(search.sign * search.best_s).astype(np.float32), kl_G=search.best_kl.astype(np.float32),
        reached_G=reached.astype(bool), target_G=np.asarray(targets, np.float32),
        status_G=search.status.astype(str), iters_G=search.evals.copy(), band=cfg.band,
        forwards=forwards, rows=rows, seconds=seconds)


# ---- generation ---------------------------------------------------------------------------------

def _gen_fn(model, hook: str, code_fn, n_pos: int, edit_bos: bool, plan: GenPlan):
    positions = _edit_positions(n_pos, edit_bos)

    def build(ref):
        cfg = ref().config

        def run(params, prompt, mask, V, a, f, key, temperature, top_p):
            def one(v, alpha, feat):
                args = [_steer_edit(hook, code_fn, positions, v, alpha, feat).dynamic_args()]
                return generate_core(cfg, plan, params, prompt, mask, args, key, temperature, top_p)[0]

            return jax.vmap(one)(V, a, f)

        return jax.jit(run)

    return _compiled(model, ("steer-gen", hook, code_fn, n_pos, edit_bos, plan), build)


def _decode(model, ids) -> str:
    ids = [int(t) for t in ids]
    eos = model.config.eos_id
    if eos is not None and eos in ids:
        ids = ids[:ids.index(eos)]
    return model.tokenizer.decode(ids)


def steered_generations(model, hook: str, vectors_GxD, alphas_G, prompts, *, n_new: int,
                        sampling: Sampling = OUTPUT_EVAL_SAMPLING, n_samples: int = 1, seed: int = 0, code_fn=None,
                        features_G=None, edit_bos: bool = False, max_rows: int = 256,
                        stop_at_eos: bool = True) -> list[list[str]]:
    """Texts generated under each steering edit: per g, n_prompts × n_samples continuations (prompt-major:
    prompt 0's samples first), the prompt not included, cut at EOS. prompts: strings (BOS prepended) or
    token lists. Rows of one call: min(G, max_rows // (n_prompts·n_samples)) edits × prompts × samples.
    Sampling key = key(seed), shared by all g (module docstring)."""
    V = check_hook_vectors(model, hook, vectors_GxD)
    G = V.shape[0]
    alphas = _check_values("alphas_G", alphas_G, G, nonzero=False)
    feats = _check_code(code_fn, features_G, G)
    if not isinstance(sampling, Sampling):
        raise ConfigError(f"sampling must be a models.Sampling, got {type(sampling).__name__}")
    for name, val in (("n_new", n_new), ("n_samples", n_samples), ("max_rows", max_rows)):
        if not isinstance(val, (int, np.integer)) or val < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {val!r}")
    rows = [r for r in prompt_tokens(model, prompts) for _ in range(n_samples)]
    if model.config.arch == "gpt2" and max(map(len, rows)) + n_new > model.config.max_ctx:
        raise ConfigError(f"prompt + n_new exceeds the model's {model.config.max_ctx} positions: lower n_new")
    if G == 0:
        return []
    prompt, mask = left_pad(rows, pad_to=8)
    T0 = prompt.shape[1]
    eos = model.config.eos_id
    fill = model.config.pad_id if model.config.pad_id is not None else eos
    positions = _edit_positions(T0 + n_new, edit_bos)
    edit = _steer_edit(hook, code_fn, positions, V[0], 0.0, 0)
    plan = GenPlan(sites=transformer.Sites((), (edit.static_key(),)), max_new=int(n_new),
                   greedy=sampling.temperature == 0.0, top_k=sampling.top_k, use_top_p=sampling.top_p is not None,
                   stop_at_eos=bool(stop_at_eos), eos_id=int(eos), fill_id=int(fill), return_logits=False)
    fn = _gen_fn(model, hook, code_fn, T0 + n_new, edit_bos, plan)
    temperature = jnp.float32(sampling.temperature if sampling.temperature > 0 else 1.0)
    top_p = jnp.float32(sampling.top_p if sampling.top_p is not None else 1.0)
    key = jax.random.key(seed)
    nb = max(1, min(G, max_rows // len(rows)))
    out: list[list[str]] = []
    for _, m, Vb, ab, fb in padded_blocks(nb, V, alphas, feats):
        toks = np.asarray(fn(model.params, prompt, mask, Vb, ab, fb, key, temperature, top_p))
        out.extend([_decode(model, r) for r in toks[i]] for i in range(m))
    return out


def unsteered_generations(model, prompts, *, n_new: int, sampling: Sampling = OUTPUT_EVAL_SAMPLING,
                          n_samples: int = 1, seed: int = 0, stop_at_eos: bool = True) -> list[str]:
    """Baseline texts without steering, drawn with the same random numbers as `steered_generations` (same
    seed): the zero edit α = 0 at the last layer."""
    hook = f"resid_post.{model.config.n_layers - 1}"
    V = np.zeros((1, model.config.d_model), np.float32)
    return steered_generations(model, hook, V, [0.0], prompts, n_new=n_new, sampling=sampling,
                               n_samples=n_samples, seed=seed, stop_at_eos=stop_at_eos)[0]


# ---- NLL: capability cost and fluency -------------------------------------------------------------

def _token_nll(model, params, toks, mask, edits):
    """−log p(token[t+1] | ≤ t) for t < T−1: [B, T−1]."""
    logits, _ = model.forward(params, toks, attention_mask_BxT=mask, edits=edits)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1)[..., 0]


def _nll_fn(model):
    return _compiled(model, ("steer-nll",), lambda ref: jax.jit(
        lambda params, toks, mask: _token_nll(ref(), params, toks, mask, ())))


def _cost_fn(model, hook: str, code_fn, T: int, edit_bos: bool):
    positions = _edit_positions(T, edit_bos)

    def build(ref):
        def run(params, toks, mask, w, V, a, f):
            lm = ref()

            def one(v, alpha, feat):
                nll = _token_nll(lm, params, toks, mask, (_steer_edit(hook, code_fn, positions, v, alpha, feat),))
                return jnp.sum(nll * w) / jnp.sum(w)

            return jax.vmap(one)(V, a, f)

        return jax.jit(run)

    return _compiled(model, ("steer-cost", hook, code_fn, T, edit_bos), build)


def capability_cost(model, hook: str, vectors_GxD, alphas_G, tokens_BxT, *, code_fn=None, features_G=None,
                    edit_bos: bool = False, max_tokens: int = 4096) -> np.ndarray:
    """nll_increase_G: mean per-token NLL of tokens_BxT (held-out corpus sequences, BOS first, e.g.
    `outputs.corpus_sequences`) under each steering edit minus the clean NLL. Averaged over the predictions
    made at edited positions (t ≥ 1 unless edit_bos; the prediction at an unedited BOS cannot change).
    One vmapped forward per max(1, max_tokens // (B·T)) edits."""
    V = check_hook_vectors(model, hook, vectors_GxD)
    G = V.shape[0]
    alphas = _check_values("alphas_G", alphas_G, G, nonzero=False)
    feats = _check_code(code_fn, features_G, G)
    toks = np.asarray(tokens_BxT)
    if toks.ndim != 2 or toks.shape[1] < 3 or not np.issubdtype(toks.dtype, np.integer):
        raise ConfigError(f"capability_cost needs integer token sequences [B, T >= 3], got {toks.shape} {toks.dtype}")
    if toks.min() < 0 or toks.max() >= model.config.vocab_size:
        raise ConfigError(f"token ids must lie in [0, {model.config.vocab_size}): the sequences come from another "
                          "tokenizer")
    toks = toks.astype(np.int32)
    mask = np.ones_like(toks)
    B, T = toks.shape
    w = np.ones((B, T - 1), np.float32)
    if not edit_bos:
        w[:, 0] = 0.0
    clean = float(np.sum(np.asarray(_nll_fn(model)(model.params, toks, mask)) * w) / w.sum())
    if G == 0:
        return np.zeros(0, np.float32)
    fn = _cost_fn(model, hook, code_fn, T, edit_bos)
    nb = max(1, min(G, max_tokens // (B * T)))
    out = []
    for _, m, Vb, ab, fb in padded_blocks(nb, V, alphas, feats):
        out.append(np.asarray(fn(model.params, toks, mask, w, Vb, ab, fb))[:m])
    return (np.concatenate(out) - clean).astype(np.float32)


def mean_nll(model, texts, *, prefixes=None, max_tokens: int = 4096, pad_to: int = 16) -> np.ndarray:
    """Per text, the unsteered model's mean NLL (nats per token) of the text's tokens given BOS and the
    text's prefix (e.g. the prompt a generation continued): −mean_t log p(x_t | BOS, prefix, x_<t).
    texts / prefixes: strings or token lists (without BOS). NaN for an empty text."""
    if isinstance(texts, str):
        raise ConfigError("texts must be a list of strings or token lists, not one string")
    texts = list(texts)
    if prefixes is not None and (isinstance(prefixes, str) or len(prefixes) != len(texts)):
        raise ConfigError(f"prefixes must be a list with one prefix per text ({len(texts)})")
    enc = lambda t: list(model.tokenizer.encode(t)) if isinstance(t, str) else [int(i) for i in t]  # noqa: E731
    bos = [] if model.config.bos_id is None else [model.config.bos_id]
    seqs, starts = [], []
    for i, t in enumerate(texts):
        head = bos + (enc(prefixes[i]) if prefixes is not None else [])
        body = enc(t)
        if not head:
            body, head = body[1:], body[:1]  # no BOS: the first token is context
        seqs.append(head + body)
        starts.append(len(head))
    if any(not 0 <= x < model.config.vocab_size for s in seqs for x in s):
        raise ConfigError(f"token ids must lie in [0, {model.config.vocab_size}): the texts come from another "
                          "tokenizer")
    out = np.full(len(texts), np.nan)
    order = np.argsort([len(s) for s in seqs], kind="stable")
    fn = _nll_fn(model)
    i = 0
    while i < len(order):
        T = max(2, -(-len(seqs[order[i]]) // pad_to) * pad_to)
        j = i
        while j < len(order) and len(seqs[order[j]]) <= T and (j - i + 1) * T <= max(max_tokens, T):
            j += 1
        idx = order[i:j]
        rows = _rows_shape(len(idx), 1 << 30)  # few compiled shapes; padding rows (mask 0) are dropped
        toks = np.zeros((rows, T), np.int32)
        mask = np.zeros((rows, T), np.int32)
        for b, k in enumerate(idx):
            toks[b, :len(seqs[k])] = seqs[k]
            mask[b, :len(seqs[k])] = 1
        nll = np.asarray(fn(model.params, toks, mask))
        for b, k in enumerate(idx):
            lo, hi = starts[k] - 1, len(seqs[k]) - 1  # predictions of tokens starts[k] .. end
            if hi > lo:
                out[k] = float(nll[b, lo:hi].mean())
        i = j
    return out


def perplexity(model, texts, *, prefixes=None, max_tokens: int = 4096) -> np.ndarray:
    """exp(mean_nll) per text (NaN for an empty text)."""
    return np.exp(mean_nll(model, texts, prefixes=prefixes, max_tokens=max_tokens))
