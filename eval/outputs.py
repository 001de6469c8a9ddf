"""Output-centric feature descriptions: VocabProj and TokenChange (Gur-Arieh, Mayan, Agassy, Geiger, Geva 2025,
"Enhancing Automated Interpretability with Output-Centric Feature Descriptions").

VocabProj: for a feature's residual write direction d (`dic.residual_directions(model)` row),
    logits = final_norm(d) @ W_U   (`model.unembed`), the top and bottom `top` (50) tokens.
  One matmul for a block of features (`vocab_proj`).

TokenChange: on n_seq (32) corpus sequences of seq_len (32) tokens, intervene on the feature at every
  position and take the mean change of the logits against the clean forward,
      Δ_V = mean_{b, t} [logits_edit(b, t) − logits_clean(b, t)],
  once with +c and once with −c; the top `top` (10) tokens of Δ (up) and of −Δ (down) for each sign.
  The intervention acts where the dictionary writes (`write_hook(dic)`: hook_out for transcoders) on
  the feature's decoder direction v (`directions_FxD` row, in that hook's space):
    mode="clamp" (default): x ← x + (c − ⟨x, u⟩) u, u = v/‖v‖ (`activation_store.models.edits.clamp`): the
        component along the feature becomes exactly c, whatever it was. For an SAE latent with unit decoder
        row this is "set the latent to c" with the encoder replaced by the projection; it is defined
        the same way for every direction-only dictionary (SNMF, DiffMeans, PCA, neurons: neuron := c).
        The paper clamps SAE latents to ±10; default c = 10.
    mode="add": x ← x + c·v (steering by c units of the decoder row; the other component is kept).
  c may be one number or one per feature (e.g. a multiple of each feature's max activation).
  Positions: BOS (position 0, the attention sink whose residual is huge and whose change would
  measure the sink, not the feature) is not edited unless edit_bos; Δ is averaged over the edited
  positions only (t ≥ 1), since unedited earlier positions cannot change.
  A zero direction (a dead decoder row) writes nothing: its Δ is 0.

Batching: logits are affine in the final normalised residual h, so
      Δ = (mean_{b,t} h_edit − mean_{b,t} h_clean) @ W_U,
  and the per-token unembedding is never formed. Many features share one compiled forward: the
  forward is `jax.vmap`ped over (direction, c) pairs (edit vectors and strengths are traced
  arguments of the edits), so the layers before the edited hook run once for the whole block (they
  do not depend on the feature) and everything after runs as one batch of 2·feature_batch × n_seq
  sequences. Tokens and directions are fixed per call, so the compiled function is reused.
"""
from __future__ import annotations

import dataclasses
import functools
import weakref

import jax
import numpy as np

from featureatlas.activation_store.configs import Config, setting
from featureatlas.activation_store.errors import ConfigError
from featureatlas.activation_store.models import add, clamp, transformer
from featureatlas.eval.adapters import DictionaryError, feature_ids, write_directions


def token_strings(tokenizer, ids) -> list[str]:
    """Readable text of each token id (`tokenizer.decode([id])`: ' the', not the BPE piece 'Ġthe')."""
    return [tokenizer.decode([int(i)]) for i in np.asarray(ids).ravel()]


def _pairs(tokenizer, ids, vals) -> list[list]:
    return [[s, float(v)] for s, v in zip(token_strings(tokenizer, ids), np.asarray(vals).ravel())]


# ---- VocabProj ---------------------------------------------------------------------------------

@dataclasses.dataclass
class VocabProj:
    """Top/bottom tokens of final_norm(d) @ W_U per feature; arrays are [F, top], logits descending for
    `top_*` and ascending (most negative first) for `bottom_*`."""

    features: np.ndarray
    top_ids: np.ndarray
    top_logits: np.ndarray
    bottom_ids: np.ndarray
    bottom_logits: np.ndarray

    def record(self, row: int, tokenizer) -> dict:
        """The catalog's "vocab_proj" field of the row-th feature (see notes/feature_schema.md)."""
        return {"top": _pairs(tokenizer, self.top_ids[row], self.top_logits[row]),
                "bottom": _pairs(tokenizer, self.bottom_ids[row], self.bottom_logits[row])}


@functools.partial(jax.jit, static_argnames="k")
def _top_bottom(logits_FxV, k: int):
    tv, ti = jax.lax.top_k(logits_FxV, k)
    bv, bi = jax.lax.top_k(-logits_FxV, k)
    return ti, tv, bi, -bv


def vocab_proj(model, resid_FxD, *, top: int = 50, block: int = 1024, features=None) -> VocabProj:
    """VocabProj of residual write directions [F, d_model] (e.g. `dic.residual_directions(model)`):
    `model.unembed` (final norm, then W_U) on blocks of `block` features, then the top/bottom `top` tokens."""
    R = np.asarray(resid_FxD, np.float32)
    if R.ndim != 2 or R.shape[1] != model.config.d_model:
        raise DictionaryError(f"VocabProj needs residual directions [F, {model.config.d_model}], got {R.shape}")
    if not 0 < top <= model.config.vocab_size:
        raise ConfigError(f"top={top} must be in 1..vocab size {model.config.vocab_size}")
    feats = np.arange(R.shape[0]) if features is None else np.asarray(features)
    outs = [[], [], [], []]
    for s in range(0, R.shape[0], block):
        chunk = R[s:s + block]
        n = chunk.shape[0]
        if n < block and R.shape[0] > block:  # pad the last block: one compiled shape
            chunk = np.concatenate([chunk, np.zeros((block - n, R.shape[1]), np.float32)])
        res = _top_bottom(model.unembed(chunk), k=top)
        for o, r in zip(outs, res):
            o.append(np.asarray(r)[:n])
    return VocabProj(feats, *(np.concatenate(o) for o in outs))


def dictionary_vocab_proj(model, dic, features=None, *, top: int = 50) -> VocabProj:
    """VocabProj of a Dictionary's features (all, or the given ids)."""
    f = feature_ids(features, dic.n_features)
    R = np.asarray(dic.residual_directions(model), np.float32)[f]
    return vocab_proj(model, R, top=top, features=f)


# ---- TokenChange -------------------------------------------------------------------------------

@dataclasses.dataclass
class TokenChangeConfig(Config):
    """How TokenChange intervenes and on what text."""

    n_seq: int = setting(32, gt=0)
    """Corpus sequences the logit change is averaged over (the paper: 32)."""
    seq_len: int = setting(32, ge=2)
    """Tokens per sequence, BOS included (the paper: 32)."""
    clamp: float = setting(10.0, gt=0)
    """Intervention strength c: the feature is set to +c and to −c (the paper clamps SAE latents to ±10)."""
    mode: str = setting("clamp", choices=("clamp", "add"))
    """clamp: set the component along the unit decoder direction to ±c; add: add ±c times the decoder row."""
    top: int = setting(10, gt=0)
    """Tokens kept per sign and direction (up / down)."""
    feature_batch: int = setting(16, gt=0)
    """Features per compiled forward (each runs twice, ±c): more is faster until memory or cache runs out."""
    edit_bos: bool = setting(False)
    """Also intervene at position 0 (BOS, the attention sink); off by default."""
    seed: int = setting(0, ge=0)
    """Seed of the choice of corpus sequences."""


def corpus_sequences(tokens_NxT, n_valid_N, n_seq: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """[n_seq, seq_len]: the first seq_len tokens (BOS first, as stored) of n_seq random contexts that
    have at least seq_len real tokens (a store's /tokens and /n_valid)."""
    tokens_NxT = np.asarray(tokens_NxT)
    n_valid_N = np.asarray(n_valid_N)
    if tokens_NxT.ndim != 2 or n_valid_N.shape != tokens_NxT.shape[:1]:
        raise ConfigError(f"tokens must be [n_ctx, T] with n_valid [n_ctx], got {tokens_NxT.shape} and "
                          f"{n_valid_N.shape}")
    ok = np.flatnonzero(n_valid_N >= seq_len)
    if seq_len > tokens_NxT.shape[1] or len(ok) < n_seq:
        raise ConfigError(f"TokenChange needs {n_seq} contexts of at least {seq_len} tokens; the store has "
                          f"{len(ok)} (context length {tokens_NxT.shape[1]}): lower --n-seq / --seq-len or "
                          "harvest more text")
    pick = np.sort(np.random.default_rng(seed).choice(ok, size=n_seq, replace=False))
    return np.ascontiguousarray(tokens_NxT[pick, :seq_len], np.int32)


@dataclasses.dataclass
class TokenChange:
    """Per feature (rows, ids in `features`) and per sign: token ids and mean logit changes, [F, top].
    up: largest increases (descending); down: largest decreases (most negative first)."""

    features: np.ndarray
    clamp_F: np.ndarray
    mode: str
    pos_up_ids: np.ndarray
    pos_up: np.ndarray
    pos_down_ids: np.ndarray
    pos_down: np.ndarray
    neg_up_ids: np.ndarray
    neg_up: np.ndarray
    neg_down_ids: np.ndarray
    neg_down: np.ndarray

    def record(self, row: int, tokenizer) -> dict:
        """The catalog's "token_change" field of the row-th feature (see notes/feature_schema.md)."""
        return {"clamp": float(self.clamp_F[row]), "mode": self.mode,
                "pos": {"up": _pairs(tokenizer, self.pos_up_ids[row], self.pos_up[row]),
                        "down": _pairs(tokenizer, self.pos_down_ids[row], self.pos_down[row])},
                "neg": {"up": _pairs(tokenizer, self.neg_up_ids[row], self.neg_up[row]),
                        "down": _pairs(tokenizer, self.neg_down_ids[row], self.neg_down[row])}}


def _mean_final_hidden(model, hook, mode, positions, t0, params, tokens_BxT, v_D, c):
    """mean over sequences and positions t ≥ t0 of final_norm(resid) after the edit (v_D None: clean)."""
    last = f"resid_post.{model.config.n_layers - 1}"
    edits = ()
    if v_D is not None:
        edits = (clamp(hook, v_D, c, positions) if mode == "clamp" else add(hook, v_D, c, positions),)
    _, acts = model.forward(params, tokens_BxT, capture=(last,), edits=edits, stop_at="capture")
    h = transformer.ARCHS[model.config.arch].final_norm(params, model.config, acts[last])
    return h[:, t0:].mean(axis=(0, 1))


def _unembed_linear(params, h_GxD):
    """h @ W_U, no final norm (the norm was applied per token before averaging)."""
    return h_GxD @ transformer.unembed_matrix_DxV(params)


# Compiled functions per model. They reach the model through a weak reference, so the cache entry
# (a value of this weak-keyed dict) does not keep its own key alive.
_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _compiled(model, key, build):
    per_model = _COMPILED.setdefault(model, {})
    if key not in per_model:
        per_model[key] = build(weakref.ref(model))
    return per_model[key]


def _edit_positions(T: int, edit_bos: bool) -> tuple[np.ndarray | None, int]:
    """(positions to edit, first position averaged): every position, or all but BOS."""
    return (None, 0) if edit_bos else (np.arange(1, T, dtype=np.int32), 1)


def _clean_fn(model, T: int, edit_bos: bool):
    """jit: (params, tokens) -> mean final hidden state of the clean forward."""
    positions, t0 = _edit_positions(T, edit_bos)
    return _compiled(model, ("tc-clean", T, edit_bos), lambda ref: jax.jit(
        lambda params, toks: _mean_final_hidden(ref(), None, None, positions, t0, params, toks, None, None)))


def _delta_fn(model, hook: str, mode: str, T: int, edit_bos: bool, top: int):
    """jit: (params, tokens, V_GxD, c_G, h_clean_D) -> Δ_GxV, or its top/bottom `top` when top > 0."""
    positions, t0 = _edit_positions(T, edit_bos)

    def build(ref):
        def run(params, toks, V_GxD, c_G, h_clean_D):
            lm = ref()
            one = lambda v, c: _mean_final_hidden(lm, hook, mode, positions, t0, params, toks, v, c)  # noqa: E731
            H_GxD = jax.vmap(one)(V_GxD, c_G)
            delta_GxV = _unembed_linear(params, H_GxD - h_clean_D)
            if not top:
                return delta_GxV
            uv, ui = jax.lax.top_k(delta_GxV, top)
            dv, di = jax.lax.top_k(-delta_GxV, top)
            return ui, uv, di, -dv

        return jax.jit(run)

    return _compiled(model, ("tc-delta", hook, mode, T, edit_bos, top), build)


def _check_tokens(model, tokens_BxT) -> np.ndarray:
    toks = np.asarray(tokens_BxT)
    if toks.ndim != 2 or toks.shape[1] < 2 or not np.issubdtype(toks.dtype, np.integer):
        raise ConfigError(f"TokenChange needs integer token sequences [n_seq, seq_len >= 2], got {toks.shape} "
                          f"{toks.dtype}; see corpus_sequences")
    if toks.min() < 0 or toks.max() >= model.config.vocab_size:
        raise ConfigError(f"token ids must lie in [0, {model.config.vocab_size}); got [{toks.min()}, {toks.max()}]: "
                          "the sequences come from another tokenizer")
    return toks.astype(np.int32)


def _safe_directions(V_GxD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(directions with zero rows replaced by e_0, mask of the zero rows): a zero direction writes nothing,
    its Δ is set to 0 afterwards (the clamp edit would divide by its norm)."""
    zero = ~np.any(V_GxD != 0, axis=1)
    if zero.any():
        V_GxD = V_GxD.copy()
        V_GxD[zero] = 0
        V_GxD[zero, 0] = 1
    return V_GxD, zero


def logit_change(model, hook: str, vectors_GxD, values_G, tokens_BxT, *, mode: str = "clamp",
                 edit_bos: bool = False) -> np.ndarray:
    """Δ [G, V]: mean logit change of each (direction, value) intervention at `hook` (module docstring).
    All G interventions run in one vmapped forward; use for small G (returns G × vocab floats)."""
    toks = _check_tokens(model, tokens_BxT)
    V, zero = _safe_directions(np.asarray(vectors_GxD, np.float32))
    c = np.broadcast_to(np.asarray(values_G, np.float32), (V.shape[0],))
    T = toks.shape[1]
    h_clean = _clean_fn(model, T, edit_bos)(model.params, toks)
    delta = np.array(_delta_fn(model, hook, mode, T, edit_bos, 0)(model.params, toks, V, c, h_clean))
    delta[zero] = 0.0
    return delta


def token_change(model, dic, tokens_BxT, features=None, config: TokenChangeConfig | None = None, *,
                 clamp_F=None, progress: bool = False) -> TokenChange:
    """TokenChange of a Dictionary's features (all, or the given ids) on the sequences tokens_BxT
    (e.g. `corpus_sequences(store.tokens, store.n_valid, cfg.n_seq, cfg.seq_len, cfg.seed)`).

    clamp_F: per-feature strengths c (default config.clamp for all). Runs ⌈F / feature_batch⌉
    forwards of 2·feature_batch·n_seq sequences each (module docstring).
    """
    cfg = (config or TokenChangeConfig()).validate()
    toks = _check_tokens(model, tokens_BxT)
    f = feature_ids(features, dic.n_features)
    hook, V_all = write_directions(model, dic)
    D = V_all.shape[1]
    if not cfg.top <= model.config.vocab_size:
        raise ConfigError(f"--top {cfg.top} exceeds the vocabulary ({model.config.vocab_size})")
    c_F = np.full(len(f), cfg.clamp, np.float32) if clamp_F is None else np.asarray(clamp_F, np.float32)
    if c_F.shape != (len(f),) or not np.all(np.isfinite(c_F)):
        raise ConfigError(f"clamp_F must hold one finite strength per feature ({len(f)}), got shape {c_F.shape}")
    T = toks.shape[1]
    h_clean = _clean_fn(model, T, cfg.edit_bos)(model.params, toks)
    fn = _delta_fn(model, hook, cfg.mode, T, cfg.edit_bos, cfg.top)
    nb = min(cfg.feature_batch, len(f)) if len(f) else 1
    outs = [[] for _ in range(8)]
    starts = range(0, len(f), nb)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="TokenChange", unit="block")
    for s in starts:
        idx = f[s:s + nb]
        n = len(idx)
        V = np.zeros((nb, D), np.float32)
        V[:n] = V_all[idx]
        V, zero = _safe_directions(V)
        c = np.zeros(nb, np.float32)
        c[:n] = c_F[s:s + n]
        # rows [0, nb): +c, rows [nb, 2nb): −c; padded rows are computed and dropped
        ui, uv, di, dv = (np.array(a) for a in fn(model.params, toks, np.concatenate([V, V]),
                                                     np.concatenate([c, -c]), h_clean))
        z2 = np.concatenate([zero, zero])
        uv[z2] = 0.0
        dv[z2] = 0.0
        for o, a in zip(outs, (ui[:n], uv[:n], di[:n], dv[:n], ui[nb:nb + n], uv[nb:nb + n],
                               di[nb:nb + n], dv[nb:nb + n])):
            o.append(a)
    if not len(f):
        empty_i, empty_v = np.zeros((0, cfg.top), np.int32), np.zeros((0, cfg.top), np.float32)
        arrays = [empty_i, empty_v] * 4
    else:
        arrays = [np.concatenate(o) for o in outs]
    return TokenChange(f, c_F, cfg.mode, *arrays)
