"""KL-calibrated steering, steered generation, capability cost and NLL (eval/steering.py) against direct
computations: on the real SmolLM2 (session fixture) for the calibration, on tiny random models for formulas."""
from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from featureatlas.activation_store.errors import ConfigError
from featureatlas.activation_store.models import Sampling, add, random_model
from featureatlas.activation_store.models.edits import set_code
from featureatlas.eval import steering as st

PROMPTS = ("I think", "We")
TARGETS = (0.25, 0.5, -0.25, -0.5)


def unit_rows(rng, n, d):
    V = rng.normal(size=(n, d)).astype(np.float32)
    return V / np.linalg.norm(V, axis=1, keepdims=True)


class ReluSAE:
    """A small random ReLU SAE-like dictionary: a(x) = relu(x W_enc + b_enc), x̂ = a W_dec + b_dec."""

    def __init__(self, hook, d, F, seed=0):
        rng = np.random.default_rng(seed)
        self.hook, self.n_features = hook, F
        self.W_enc = jnp.asarray(rng.normal(size=(d, F)) / np.sqrt(d), jnp.float32)
        self.b_enc = jnp.asarray(rng.normal(size=F) * 0.1, jnp.float32)
        self.W_dec = jnp.asarray(rng.normal(size=(F, d)) / np.sqrt(d), jnp.float32)
        self.b_dec = jnp.asarray(rng.normal(size=d) * 0.1, jnp.float32)

    @property
    def directions_FxD(self):
        return self.W_dec

    def encode(self, x):
        return jax.nn.relu(jnp.asarray(x) @ self.W_enc + self.b_enc)

    def decode(self, c):
        return jnp.asarray(c) @ self.W_dec + self.b_dec


@pytest.fixture(scope="module")
def tiny():
    return random_model("llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=48, vocab_size=300, seed=5)


# ---- KL calibration on the real model -------------------------------------------------------------

def test_batched_equals_one_at_a_time_and_lands_in_band(smollm2):
    hook = "resid_pre.22"
    V = unit_rows(np.random.default_rng(0), 2, smollm2.config.d_model)
    Vg = np.repeat(V, len(TARGETS), axis=0)
    tg = np.tile(TARGETS, len(V))
    batched = st.kl_calibrate(smollm2, hook, Vg, tg, PROMPTS, batch=4)
    single = st.kl_calibrate(smollm2, hook, Vg, tg, PROMPTS, batch=1)
    assert batched.forwards < single.forwards
    np.testing.assert_allclose(batched.alpha_G, single.alpha_G, rtol=1e-5)
    np.testing.assert_allclose(batched.kl_G, single.kl_G, rtol=1e-3, atol=1e-5)
    assert batched.reached_G.all(), batched.status_G
    t = np.abs(tg)
    assert np.all((batched.kl_G >= t) & (batched.kl_G <= t + 0.1))
    assert np.all(np.sign(batched.alpha_G) == np.sign(tg))
    assert np.all((np.abs(batched.alpha_G) >= 1) & (np.abs(batched.alpha_G) <= 1000))
    # the same target needs a larger strength for 0.5 than for 0.25
    assert np.all(np.abs(batched.alpha_G[1::4]) > np.abs(batched.alpha_G[0::4]))
    # the reported KL is the KL of the reported strength, computed directly (full logits of the left-padded
    # prompts, every real position after BOS)
    toks, mask = st.left_pad(st.prompt_tokens(smollm2, PROMPTS))
    real = (mask > 0) & (np.cumsum(mask, 1) > 1)
    clean, _ = smollm2.forward(smollm2.params, toks, attention_mask_BxT=mask)
    edit = add(hook, Vg[2], float(batched.alpha_G[2]), np.arange(1, toks.shape[1]))
    steered, _ = smollm2.forward(smollm2.params, toks, attention_mask_BxT=mask, edits=[edit])
    lp = jax.nn.log_softmax(np.asarray(clean, np.float64)[real], axis=-1)
    lq = jax.nn.log_softmax(np.asarray(steered, np.float64)[real], axis=-1)
    np.testing.assert_allclose(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)), batched.kl_G[2], rtol=2e-3)


def test_unreachable_targets_are_reported(smollm2):
    D = smollm2.config.d_model
    V = np.zeros((2, D), np.float32)
    V[1] = unit_rows(np.random.default_rng(1), 1, D)[0] * 1e-6  # tiny: never reaches KL 0.25 within [1, 1000]
    cal = st.kl_calibrate(smollm2, "resid_pre.22", V, [0.25, -0.5], PROMPTS, batch=4)
    assert not cal.reached_G.any()
    assert list(cal.status_G) == ["too_weak", "too_weak"]
    assert np.all(cal.kl_G < 1e-3) and np.all(cal.iters_G == 2)  # sqrt(lo·hi), then hi
    np.testing.assert_allclose(cal.alpha_G, [1000.0, -1000.0])
    rec = cal.record(1)
    assert rec["reached"] is False and rec["status"] == "too_weak" and rec["target"] == -0.5


def test_last_position_and_mlp_hidden(smollm2):
    """SNMF protocol: a vector at mlp_hidden, KL on the last token only, band 0.01."""
    hook = "mlp_hidden.20"
    V = unit_rows(np.random.default_rng(2), 2, smollm2.config.d_mlp)
    cal = st.kl_calibrate(smollm2, hook, V, [0.1, -0.1], ["I think that"], st.SNMF_CALIBRATION, batch=4, iters=8)
    ok = cal.reached_G
    assert ok.any()
    assert np.all((cal.kl_G[ok] >= 0.1) & (cal.kl_G[ok] <= 0.11))
    assert set(cal.status_G) <= set(st.STATUSES)


# ---- the latent clamp ---------------------------------------------------------------------------

def test_latent_clamp_equals_formula(tiny):
    hook = "resid_mid.1"
    dic = ReluSAE(hook, tiny.config.d_model, 40)
    code_fn = st.latent_code_fn(dic)
    assert st.latent_code_fn(dic) is code_fn  # one function per dictionary: one compile
    other = ReluSAE(hook, tiny.config.d_model, 8)
    st.latent_code_fn(other)
    n_before = len(st._CODE_FNS)
    del other
    gc.collect()
    assert len(st._CODE_FNS) == n_before - 1  # the registry does not keep a dictionary alive
    toks = np.array([[1, 50, 60, 70, 80], [1, 90, 91, 92, 93]], np.int32)
    _, clean = tiny.forward(tiny.params, toks, capture=(hook,))
    x = np.asarray(clean[hook])
    f, alpha = 7, 3.5
    pos = np.arange(1, 5)
    edit = set_code(hook, code_fn, dic.W_dec[f], alpha, f, pos)
    _, got = tiny.forward(tiny.params, toks, capture=(hook,), edits=[edit])
    a_f = np.asarray(dic.encode(x))[..., f]
    want = x + (alpha - a_f)[..., None] * np.asarray(dic.W_dec[f])
    want[:, 0] = x[:, 0]  # BOS untouched
    np.testing.assert_allclose(np.asarray(got[hook]), want, rtol=1e-5, atol=1e-5)
    # the same as splicing the edited code into the reconstruction and keeping the error term
    c = np.asarray(dic.encode(x))
    c2 = c.copy()
    c2[..., f] = alpha
    spliced = x + np.asarray(dic.decode(c2)) - np.asarray(dic.decode(c))
    np.testing.assert_allclose(np.asarray(got[hook])[:, 1:], spliced[:, 1:], rtol=1e-4, atol=1e-4)


def test_latent_clamp_calibration_batched_equals_one(tiny):
    hook = "resid_mid.1"
    dic = ReluSAE(hook, tiny.config.d_model, 40, seed=1)
    hook_, V, code_fn, feats = st.steering_setup(dic, [3, 9], clamp_latent=True)
    Vg, fg = np.repeat(V, 2, axis=0), np.repeat(feats, 2)
    tg = np.tile([0.05, -0.05], 2)
    prompts = [[1, 50, 60, 70], [1, 80, 81]]
    kw = dict(code_fn=code_fn, features_G=fg, band=0.02, hi=200.0)
    a = st.kl_calibrate(tiny, hook_, Vg, tg, prompts, batch=4, **kw)
    b = st.kl_calibrate(tiny, hook_, Vg, tg, prompts, batch=1, **kw)
    np.testing.assert_allclose(a.alpha_G, b.alpha_G, rtol=1e-5)
    assert np.all((a.kl_G[a.reached_G] >= 0.05) & (a.kl_G[a.reached_G] <= 0.07))
    # adding the unit row instead (SNMF-style) is a different edit
    _, U, none, _ = st.steering_setup(dic, [3], clamp_latent=False)
    assert none is None
    np.testing.assert_allclose(np.linalg.norm(U, axis=1), 1.0, rtol=1e-6)


# ---- generation, capability cost, NLL ----------------------------------------------------------------

def test_generations_batched_equal_alone_and_generate(tiny):
    hook = "resid_pre.1"
    V = unit_rows(np.random.default_rng(3), 3, tiny.config.d_model)
    alphas = np.array([0.0, 4.0, -4.0], np.float32)
    prompts = [[1, 40, 41, 42], [1, 77]]
    kw = dict(n_new=6, sampling=Sampling(temperature=0.75), n_samples=2, seed=3)
    together = st.steered_generations(tiny, hook, V, alphas, prompts, max_rows=64, **kw)
    assert len(together) == 3 and all(len(x) == 4 for x in together)
    # row 0 (α = 0) of a batch of 3 equals the unsteered texts of a batch of 1: same random numbers
    assert together[0] == st.unsteered_generations(tiny, prompts, **kw)
    assert together[1] != together[0]
    # greedy: the same tokens as the model's own generate with the same add edit, for every row of the batch
    greedy = st.steered_generations(tiny, hook, V, alphas, prompts, n_new=5, sampling=Sampling())
    for g in (1, 2):
        ref = tiny.generate(tiny.params, prompts, 5, edits=[add(hook, V[g], float(alphas[g]), np.arange(1, 8 + 5))])
        assert greedy[g] == [tiny.tokenizer.decode(list(r)) for r in ref]


def test_capability_cost_and_nll_equal_direct(tiny):
    hook = "resid_pre.1"
    V = unit_rows(np.random.default_rng(4), 2, tiny.config.d_model)
    rng = np.random.default_rng(5)
    toks = rng.integers(3, 300, size=(3, 7)).astype(np.int32)
    toks[:, 0] = 1

    def nll(edits):
        logits, _ = tiny.forward(tiny.params, toks, edits=edits)
        lp = jax.nn.log_softmax(np.asarray(logits, np.float64)[:, :-1], axis=-1)
        return -np.take_along_axis(np.asarray(lp), toks[:, 1:, None], -1)[..., 0][:, 1:].mean()

    got = st.capability_cost(tiny, hook, V, [3.0, 0.0], toks, max_tokens=21)
    want = nll([add(hook, V[0], 3.0, np.arange(1, 7))]) - nll([])
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-5)
    assert abs(got[1]) < 1e-5
    texts = [[40, 41, 42], [50, 51, 52, 53, 54, 55], []]
    m = st.mean_nll(tiny, texts, prefixes=[[7], [], [9]])
    seq = np.array([[1, 7, 40, 41, 42]], np.int32)
    logits, _ = tiny.forward(tiny.params, seq)
    lp = np.asarray(jax.nn.log_softmax(np.asarray(logits)[0], axis=-1))
    np.testing.assert_allclose(m[0], -np.mean([lp[1, 40], lp[2, 41], lp[3, 42]]), rtol=1e-5)
    assert np.isnan(m[2])
    np.testing.assert_allclose(st.perplexity(tiny, texts[:2], prefixes=[[7], []]), np.exp(m[:2]), rtol=1e-6)


# ---- bad input ------------------------------------------------------------------------------------------

def test_bad_input_is_a_config_error(tiny):
    D = tiny.config.d_model
    V = np.ones((1, D), np.float32)
    with pytest.raises(ConfigError, match=r"\[G, 32\]"):
        st.kl_calibrate(tiny, "resid_pre.1", np.ones((1, 5)), [0.25], PROMPTS)
    with pytest.raises(ConfigError, match="nonzero"):
        st.kl_calibrate(tiny, "resid_pre.1", V, [0.0], PROMPTS)
    with pytest.raises(ConfigError, match="one finite number per"):
        st.kl_calibrate(tiny, "resid_pre.1", V, [0.25, 0.5], PROMPTS)
    with pytest.raises(ConfigError, match="--hi"):
        st.kl_calibrate(tiny, "resid_pre.1", V, [0.25], PROMPTS, lo=10.0, hi=5.0)
    with pytest.raises(ConfigError, match="did you mean 'iters'"):
        st.kl_calibrate(tiny, "resid_pre.1", V, [0.25], PROMPTS, iter=3)
    with pytest.raises(ConfigError, match="features_G"):
        st.kl_calibrate(tiny, "resid_pre.1", V, [0.25], PROMPTS, code_fn=lambda x, f: x[..., 0])
    with pytest.raises(ConfigError, match="after position 0"):
        st.kl_calibrate(tiny, "resid_pre.1", V, [0.25], [[1]])
    with pytest.raises(ConfigError, match="hook"):
        st.kl_calibrate(tiny, "resid_pre.9", V, [0.25], PROMPTS)
    with pytest.raises(ConfigError, match="n_new"):
        st.steered_generations(tiny, "resid_pre.1", V, [1.0], PROMPTS, n_new=0)
    with pytest.raises(ConfigError, match="another tokenizer"):
        st.capability_cost(tiny, "resid_pre.1", V, [1.0], np.full((2, 4), 999))
