"""VocabProj, TokenChange and the weight statistics against direct computations on tiny models and matrices."""
from __future__ import annotations

import dataclasses
import gc
import weakref

import jax.numpy as jnp
import numpy as np
import pytest

from featureatlas.activation_store.errors import ConfigError
from featureatlas.activation_store.models import add, clamp, random_model
from featureatlas.eval.adapters import DictionaryError, NeuronDictionary
from featureatlas.eval.outputs import (TokenChangeConfig, corpus_sequences, dictionary_vocab_proj, logit_change,
                                       token_change, token_strings, vocab_proj)
from featureatlas.eval.weights import (dark_subspace, effective_unembedding, log_unigram, nearest_features,
                                       null_space_fraction, read_tokens, unigram_alignment, unigram_counts,
                                       weight_statistics)


@pytest.fixture(scope="module")
def llama():
    return random_model("llama", n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=48, vocab_size=300, seed=3)


@pytest.fixture(scope="module")
def gpt2():
    return random_model("gpt2", n_layers=2, d_model=32, n_heads=4, d_mlp=48, vocab_size=300, seed=4)


@dataclasses.dataclass
class Directions:
    """A minimal direction-only Dictionary (codes = relu of projections), optionally a transcoder."""

    hook: str
    V: np.ndarray
    hook_out: str | None = None

    @property
    def n_features(self):
        return self.V.shape[0]

    @property
    def directions_FxD(self):
        return jnp.asarray(self.V)

    def encode(self, x):
        return jnp.maximum(jnp.asarray(x) @ self.directions_FxD.T, 0)

    def decode(self, c):
        return jnp.asarray(c) @ self.directions_FxD

    def residual_directions(self, model):
        W = model.write_matrix(self.hook_out or self.hook)
        return self.directions_FxD if W is None else self.directions_FxD @ W


def np_final_norm(lm, x):
    p = lm.params
    x = np.asarray(x, np.float64)
    if lm.config.arch == "gpt2":
        xc = x - x.mean(-1, keepdims=True)
        return xc / np.sqrt((xc ** 2).mean(-1, keepdims=True) + lm.config.norm_eps) * np.asarray(p["ln_f_w"]) \
            + np.asarray(p["ln_f_b"])
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + lm.config.norm_eps) * np.asarray(p["ln_f_w"])


def sequences(lm, n=5, T=9, seed=0):
    rng = np.random.default_rng(seed)
    toks = rng.integers(3, lm.config.vocab_size, size=(n, T)).astype(np.int32)
    toks[:, 0] = lm.config.bos_id
    return toks


# ---- VocabProj ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_vocab_proj_equals_direct_numpy(arch, llama, gpt2):
    lm = llama if arch == "llama" else gpt2
    rng = np.random.default_rng(0)
    R = rng.standard_normal((7, lm.config.d_model)).astype(np.float32)
    vp = vocab_proj(lm, R, top=50, block=3)  # several blocks, the last one padded
    W_U = np.asarray(lm.W_U, np.float64)
    for f in range(7):
        logits = np_final_norm(lm, R[f]) @ W_U
        order = np.argsort(-logits)
        np.testing.assert_array_equal(vp.top_ids[f], order[:50])
        np.testing.assert_allclose(vp.top_logits[f], logits[order[:50]], rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(vp.bottom_ids[f], order[::-1][:50])
        np.testing.assert_allclose(vp.bottom_logits[f], logits[order[::-1][:50]], rtol=1e-4, atol=1e-4)
    rec = vp.record(2, lm.tokenizer)
    assert len(rec["top"]) == 50 and rec["top"][0][0] == lm.tokenizer.decode([int(vp.top_ids[2, 0])])
    assert rec["bottom"][0][1] <= rec["bottom"][-1][1]


def test_dictionary_vocab_proj_uses_residual_directions(llama):
    dic = NeuronDictionary.for_model(llama, "mlp_hidden.1")
    vp = dictionary_vocab_proj(llama, dic, [3, 10], top=5)
    W_down = np.asarray(llama.write_matrix("mlp_hidden.1"))
    logits = np_final_norm(llama, W_down[10]) @ np.asarray(llama.W_U, np.float64)
    np.testing.assert_array_equal(vp.top_ids[1], np.argsort(-logits)[:5])
    assert vp.features.tolist() == [3, 10]
    with pytest.raises(DictionaryError, match="out of range"):
        dictionary_vocab_proj(llama, dic, [48])


# ---- TokenChange ----------------------------------------------------------------------------------

def hand_delta(lm, toks, edit, edit_bos=False):
    """Two explicit forwards, with and without the edit: mean logit difference over sequences and the
    edited positions."""
    clean, _ = lm.forward(lm.params, toks)
    steered, _ = lm.forward(lm.params, toks, edits=[edit])
    t0 = 0 if edit_bos else 1
    return (np.asarray(steered, np.float64) - np.asarray(clean, np.float64))[:, t0:].mean(axis=(0, 1))


@pytest.mark.parametrize("arch,hook", [("llama", "resid_post.0"), ("llama", "mlp_hidden.1"), ("gpt2", "resid_mid.1")])
def test_logit_change_equals_two_explicit_forwards(arch, hook, llama, gpt2):
    lm = llama if arch == "llama" else gpt2
    toks = sequences(lm)
    rng = np.random.default_rng(1)
    v = rng.standard_normal(lm.hook_dim(hook)).astype(np.float32)
    pos = np.arange(1, toks.shape[1])
    got = logit_change(lm, hook, np.stack([v, v]), [3.0, -3.0], toks)
    np.testing.assert_allclose(got[0], hand_delta(lm, toks, clamp(hook, v, 3.0, pos)), rtol=1e-3, atol=2e-5)
    np.testing.assert_allclose(got[1], hand_delta(lm, toks, clamp(hook, v, -3.0, pos)), rtol=1e-3, atol=2e-5)
    got = logit_change(lm, hook, v[None], [2.0], toks, mode="add", edit_bos=True)
    np.testing.assert_allclose(got[0], hand_delta(lm, toks, add(hook, v, 2.0), edit_bos=True), rtol=1e-3, atol=2e-5)


def test_token_change_batched_equals_one_at_a_time_and_hand(llama):
    toks = sequences(llama, n=4, T=8, seed=2)
    rng = np.random.default_rng(3)
    V = rng.standard_normal((7, llama.config.d_model)).astype(np.float32)
    V[4] = 0  # a dead (zero) decoder row writes nothing
    dic = Directions("resid_post.1", V)
    cfg = TokenChangeConfig(clamp=4.0, top=6, feature_batch=3)  # 7 features: blocks of 3, the last padded
    batched = token_change(llama, dic, toks, config=cfg)
    single = token_change(llama, dic, toks, config=dataclasses.replace(cfg, feature_batch=1))
    for name in ("pos_up", "pos_down", "neg_up", "neg_down"):
        np.testing.assert_allclose(getattr(batched, name), getattr(single, name), rtol=1e-4, atol=1e-6)
        live = np.arange(7) != 4
        np.testing.assert_array_equal(getattr(batched, name + "_ids")[live], getattr(single, name + "_ids")[live])
    assert np.all(batched.pos_up[4] == 0) and np.all(batched.neg_down[4] == 0)
    pos = np.arange(1, toks.shape[1])
    for f in (0, 6):
        for sign, up, down in ((1, "pos_up", "pos_down"), (-1, "neg_up", "neg_down")):
            d = hand_delta(llama, toks, clamp("resid_post.1", V[f], sign * 4.0, pos))
            order = np.argsort(-d)
            np.testing.assert_array_equal(getattr(batched, up + "_ids")[f], order[:6])
            np.testing.assert_allclose(getattr(batched, up)[f], d[order[:6]], rtol=1e-3, atol=2e-5)
            np.testing.assert_array_equal(getattr(batched, down + "_ids")[f], order[::-1][:6])
            np.testing.assert_allclose(getattr(batched, down)[f], d[order[::-1][:6]], rtol=1e-3, atol=2e-5)
    rec = batched.record(0, llama.tokenizer)
    assert rec["clamp"] == 4.0 and len(rec["pos"]["up"]) == 6 and len(rec["neg"]["down"]) == 6
    sub = token_change(llama, dic, toks, features=[6, 0], config=cfg, clamp_F=[4.0, 4.0])
    np.testing.assert_allclose(sub.pos_up, batched.pos_up[[6, 0]], rtol=1e-4, atol=1e-6)


def test_token_change_acts_where_a_transcoder_writes():
    """A transcoder reading resid_mid.0 and writing mlp_hidden.0 is clamped at mlp_hidden.0; the compiled
    functions cached for a model do not keep it alive."""
    llama = random_model("llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=48, vocab_size=300, seed=9)
    toks = sequences(llama, n=3, T=6)
    V = np.random.default_rng(5).standard_normal((2, llama.config.d_mlp)).astype(np.float32)
    dic = Directions("resid_mid.0", V, hook_out="mlp_hidden.0")
    tc = token_change(llama, dic, toks, config=TokenChangeConfig(clamp=2.0, top=4, mode="add"))
    d = hand_delta(llama, toks, add("mlp_hidden.0", V[1], -2.0, np.arange(1, 6)))
    np.testing.assert_array_equal(tc.neg_up_ids[1], np.argsort(-d)[:4])
    ref = weakref.ref(llama)
    del llama
    gc.collect()
    assert ref() is None


def test_token_change_bad_input(llama):
    dic = Directions("resid_post.1", np.ones((2, llama.config.d_model), np.float32))
    toks = sequences(llama, n=2, T=5)
    with pytest.raises(DictionaryError, match="out of range"):
        token_change(llama, dic, toks, features=[2])
    with pytest.raises(ConfigError, match="token ids"):
        token_change(llama, dic, toks + 1000)
    with pytest.raises(ConfigError, match="clamp_F"):
        token_change(llama, dic, toks, clamp_F=[1.0])
    with pytest.raises(DictionaryError, match="wide"):
        token_change(llama, Directions("resid_post.1", np.ones((2, 5), np.float32)), toks)
    with pytest.raises(ConfigError, match="mode"):
        token_change(llama, dic, toks, config=TokenChangeConfig(mode="steer"))


def test_corpus_sequences():
    toks = np.arange(60).reshape(6, 10)
    n_valid = np.array([10, 4, 10, 8, 10, 10])
    s = corpus_sequences(toks, n_valid, 3, 8, seed=1)
    assert s.shape == (3, 8)
    assert set(s[:, 0] // 10) <= {0, 2, 3, 4, 5}
    np.testing.assert_array_equal(s, corpus_sequences(toks, n_valid, 3, 8, seed=1))
    with pytest.raises(ConfigError, match="at least 9 tokens"):
        corpus_sequences(toks, n_valid, 5, 9)


# ---- weight statistics ----------------------------------------------------------------------------

def test_dark_subspace_and_null_space_fraction_by_hand():
    # W_U (d_model=3 x vocab=4) = U diag(5, 2, 0.1) with U the identity: the dark direction is e_2.
    W = np.array([[5.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0.1, 0]], np.float32)
    U = dark_subspace(W, n=1)
    np.testing.assert_allclose(np.abs(U[:, 0]), [0, 0, 1], atol=1e-6)
    assert dark_subspace(W, frac=0.01).shape == (3, 1)  # at least one direction
    R = np.array([[3.0, 0, 4.0], [1.0, 0, 0], [0, 0, 0]], np.float32)
    np.testing.assert_allclose(null_space_fraction(R, U), [0.8, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(np.abs(dark_subspace(W, n=2)), [[0, 0], [0, 1], [1, 0]], atol=1e-6)


def test_effective_unembedding_folds_the_final_norm(llama, gpt2):
    """d @ W_eff is parallel to what d does to the logits through the final norm (minus LayerNorm's bias):
    VocabProj's logits and the weight statistics see the same map."""
    for lm in (llama, gpt2):
        W = effective_unembedding(lm)
        R = np.random.default_rng(0).standard_normal((4, lm.config.d_model))
        bias = np.asarray(lm.params["ln_f_b"], np.float64) if "ln_f_b" in lm.params else 0.0
        through_norm = (np_final_norm(lm, R) - bias) @ np.asarray(lm.W_U, np.float64)
        lin = R @ W
        cos = (through_norm * lin).sum(1) / np.linalg.norm(through_norm, axis=1) / np.linalg.norm(lin, axis=1)
        np.testing.assert_allclose(cos, 1.0, atol=1e-5)


def test_unigram_counts_and_alignment_by_hand():
    toks = np.array([[1, 5, 5, 6, 0], [1, 6, 7, 0, 0]])
    n_valid = np.array([4, 3])
    c = unigram_counts(toks, n_valid, vocab_size=8)
    np.testing.assert_array_equal(c, [0, 0, 0, 0, 0, 2, 2, 1])
    np.testing.assert_array_equal(unigram_counts(toks, n_valid, 8, exclude_bos=False), [0, 2, 0, 0, 0, 2, 2, 1])
    lf = log_unigram(c)
    np.testing.assert_allclose(lf, np.log((c + 1) / (5 + 8)))
    W = np.eye(3, 8, dtype=np.float32)  # d_model 3, vocab 8: logits = the first 3 coordinates padded by zeros
    W[2] = lf  # direction e_2 writes exactly the log frequencies
    R = np.array([[0, 0, 1.0], [0, 0, -2.0], [0, 0, 0], [1.0, 0, 0]], np.float32)
    a = unigram_alignment(R, W, lf, block=3)
    np.testing.assert_allclose(a[:3], [1.0, -1.0, 0.0], atol=1e-5)
    ell = np.eye(8)[0] - 1 / 8
    f = lf - lf.mean()
    np.testing.assert_allclose(a[3], ell @ f / np.linalg.norm(ell) / np.linalg.norm(f), atol=1e-5)
    with pytest.raises(ConfigError, match="another model"):
        unigram_counts(toks, n_valid, vocab_size=6)


def test_nearest_features_by_hand_and_blocked():
    V = np.array([[1, 0], [1, 1], [0, 1], [-1, 0], [0, 0]], np.float32)
    idx, cos = nearest_features(V, k=2, block=2)
    s = 1 / np.sqrt(2)
    np.testing.assert_allclose(cos[0], [s, 0.0], atol=1e-6)
    assert idx[0, 0] == 1 and idx[1].tolist() in ([0, 2], [2, 0]) and idx[3, 0] in (2, 4)
    np.testing.assert_allclose(cos[1], [s, s], atol=1e-6)
    assert all(idx[i, j] != i for i in range(5) for j in range(2))
    rng = np.random.default_rng(0)
    W = rng.standard_normal((50, 8)).astype(np.float32)
    i1, c1 = nearest_features(W, k=10, block=7)
    U = W / np.linalg.norm(W, axis=1, keepdims=True)
    C = U @ U.T
    np.fill_diagonal(C, -np.inf)
    np.testing.assert_array_equal(i1, np.argsort(-C, axis=1)[:, :10])
    np.testing.assert_allclose(c1, np.sort(C, axis=1)[:, ::-1][:, :10], atol=1e-5)
    i2, c2 = nearest_features(W, k=10, rows=[5, 40], block=1)
    np.testing.assert_array_equal(i2, i1[[5, 40]])


def test_read_tokens_and_weight_statistics(llama):
    W = np.array([[2.0, 0, 0, -1], [0, 1.0, 0, 0]], np.float32)
    ids, p = read_tokens(np.array([[1.0, 0]], np.float32), W, top=2)
    e = np.exp([2.0, 0, 0, -1])
    np.testing.assert_array_equal(ids[0, 0], 0)
    np.testing.assert_allclose(p[0], [e[0] / e.sum(), 1 / e.sum()], rtol=1e-5)

    dic = NeuronDictionary.for_model(llama, "mlp_hidden.2", split_sign=True)
    toks = sequences(llama, n=4, T=10)
    counts = unigram_counts(toks, np.full(4, 10), llama.config.vocab_size)
    ws = weight_statistics(llama, dic, [0, 50], counts_V=counts, k_nearest=3, read_top=4)
    W_down = np.asarray(llama.write_matrix("mlp_hidden.2"))
    np.testing.assert_allclose(ws.norm, [np.linalg.norm(W_down[0]), np.linalg.norm(W_down[2])], rtol=1e-5)
    U = dark_subspace(effective_unembedding(llama), 0.01)
    np.testing.assert_allclose(ws.null_space_frac[1], np.linalg.norm(W_down[2] @ U) / np.linalg.norm(W_down[2]),
                               rtol=1e-4)
    signed = np.concatenate([W_down, -W_down])  # nearest by the decoder rows as written into the residual
    n_ids, n_cos = nearest_features(signed, k=3, rows=[0, 50])
    np.testing.assert_array_equal(ws.nearest_ids, n_ids)
    np.testing.assert_allclose(ws.nearest_cos, n_cos, rtol=1e-5)
    assert n_cos[0, 0] > 0 and 48 not in n_ids[0]  # its own negative half is the farthest, not the nearest
    ws_dec = weight_statistics(llama, dic, [0], k_nearest=3, nearest_space="decoder")
    np.testing.assert_allclose(ws_dec.nearest_cos, 0.0)  # hook space: the identity basis, all orthogonal
    up = np.asarray(llama.params["layers"][2]["w_gate_up"])[:, llama.config.d_mlp:]
    want_ids, want_p = read_tokens(-up[:, 2][None], np.asarray(llama.W_U), top=4)  # feature 50 = neuron 2, −
    np.testing.assert_array_equal(ws.read_ids[1], want_ids[0])
    rec = ws.record(1, llama.tokenizer)
    assert set(rec) == {"norm", "null_space_frac", "unigram_alignment", "nearest", "read_tokens"}
    assert len(rec["read_tokens"]) == 4 and -1 <= rec["unigram_alignment"] <= 1
    assert token_strings(llama.tokenizer, [72])[0] == "E"
