"""Cheap no-LLM scores (Arad et al. 2025): the input score against a brute-force computation on a synthetic
store, and the output score of a direction that writes " Paris" on the real SmolLM2."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from featureatlas.activation_store.errors import ConfigError
from featureatlas.activation_store.models import transformer
from featureatlas.activation_store.store import write_store
from featureatlas.eval.adapters import NeuronDictionary
from featureatlas.eval.cache import EXPLAIN, HELD_OUT, CacheConfig, FeatureCache, build_cache
from featureatlas.eval.cheap import CheapConfig, cheap_scores, input_scores, output_score_formula, output_scores
from featureatlas.eval.maxact import example_windows
from featureatlas.eval.outputs import vocab_proj
from featureatlas.eval.schema import validate_score

HOOK = "resid_post.0"
N_CTX, T, D = 40, 12, 4
PLANTED = 7  # feature 0 fires hardest on this token


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 15, size=(N_CTX, T))
    tokens[:, 0] = 1
    acts = rng.normal(size=(N_CTX, T, D)).astype(np.float32)
    acts[..., 0] = np.where(tokens == PLANTED, 3.0 + rng.random((N_CTX, T)), np.minimum(acts[..., 0], 1.0))
    acts[:, 0, :] = 100.0  # BOS: excluded everywhere
    n_valid = rng.integers(5, T + 1, size=N_CTX)
    tmp = tmp_path_factory.mktemp("cheap")
    store = write_store(tmp / "s.h5", acts={HOOK: acts.reshape(-1, D)}, tokens=tokens, n_valid=n_valid)
    dic = NeuronDictionary(HOOK, D)
    cfg = CacheConfig(top_n=6, n_quantiles=2, per_bin=2, n_negative=2, contexts_per_chunk=8, checkpoint_every=2)
    cache = FeatureCache(build_cache(store, dic, cfg, tmp / "c", dictionary_id="n", progress=False))
    return store, dic, cache, acts, tokens, n_valid


def brute_input_score(acts, tokens, n_valid, f, top_ids, n_top, cache, splits):
    """Top contexts by per-context max over the real tokens (from the cache's contexts of the splits), peak token
    at the first argmax, fraction in top_ids."""
    ctx = sorted({int(c) for s in splits for c in cache["top_ctx"][s, f] if c >= 0})
    real = (np.arange(T)[None] >= 1) & (np.arange(T)[None] < n_valid[:, None])
    a = np.where(real, np.maximum(acts[..., f], 0), -np.inf)
    ctx.sort(key=lambda c: (-a[c].max(), c))
    ctx = ctx[:n_top]
    peaks = [tokens[c, int(np.argmax(a[c]))] for c in ctx]
    return np.mean([p in top_ids for p in peaks]), len(ctx)


def test_input_score_hand_built_and_brute_force(synthetic):
    store, dic, cache, acts, tokens, n_valid = synthetic
    top = np.array([[PLANTED, 99], [99, 98], [3, 4], [5, 6]])
    res = input_scores(store, dic, cache, top, contexts_per_batch=5, min_examples=1)
    assert res.score[0] == 1.0 and res.n[0] == 12  # both splits' top 6
    assert res.score[1] == 0.0
    for f in range(D):
        for splits in ((EXPLAIN, HELD_OUT), (HELD_OUT,)):
            r = input_scores(store, dic, cache, top[[f]], [f], n_top=8, splits=splits, min_examples=1)
            want, n = brute_input_score(acts, tokens, n_valid, f, top[f], 8, cache, splits)
            assert (r.score[0], r.n[0]) == (pytest.approx(want), n)
    # the peak token is the token at the window's max_pos in eval/maxact.py
    windows = example_windows(store, dic, cache, [2], str, split=HELD_OUT, width=6)
    peaks = [int(w["tokens"][w["max_pos"]]) for w in windows[2]["top"]]
    r = input_scores(store, dic, cache, np.array([peaks[:1]]), [2], splits=(HELD_OUT,), min_examples=1)
    assert r.hits[0] == sum(p == peaks[0] for p in peaks)
    assert np.isnan(input_scores(store, dic, cache, top[:1], [0], min_examples=50).score[0])


# ---- output score on the real model ---------------------------------------------------------------

def paris_direction(model, steps=10):
    """A residual direction whose VocabProj puts nearly all probability on " Paris" (gradient ascent on
    log softmax(final_norm(d) W_U)[Paris], from the token's embedding)."""
    paris = model.tokenizer.encode(" Paris")[0]

    def loss(d):
        return -jax.nn.log_softmax(transformer.logits_from_resid(model.config, model.params, d))[paris]

    @jax.jit
    def step(d):
        g = jax.grad(loss)(d)
        return d - 2.0 * g / (jnp.linalg.norm(g) + 1e-12) * jnp.linalg.norm(d) * 0.05

    d = jnp.asarray(model.params["embed"][paris], jnp.float32)
    for _ in range(steps):
        d = step(d)
    return np.asarray(d / jnp.linalg.norm(d)), paris


@dataclasses.dataclass
class NormDict:
    """Directions at the last layer's resid_post; every code is ||x|| (so the paper's amplification unit
    max_g a_g(x_last) is the residual norm at the prompt's last token)."""

    V: np.ndarray
    hook: str = "resid_post.29"

    @property
    def n_features(self):
        return self.V.shape[0]

    @property
    def directions_FxD(self):
        return jnp.asarray(self.V)

    def encode(self, x):
        x = jnp.asarray(x, jnp.float32)
        return jnp.linalg.norm(x, axis=-1, keepdims=True) * jnp.ones((1, self.n_features))

    def decode(self, c):
        return jnp.asarray(c) @ self.directions_FxD

    def residual_directions(self, model):
        return self.directions_FxD


def test_output_score_of_a_token_writing_direction(smollm2, tmp_path):
    d, paris = paris_direction(smollm2)
    r = np.random.default_rng(0).normal(size=d.shape).astype(np.float32)
    dic = NormDict(np.stack([d, r / np.linalg.norm(r), np.zeros_like(d)]))
    vp = vocab_proj(smollm2, dic.directions_FxD, top=20)
    assert vp.top_ids[0, 0] == paris
    out = output_scores(smollm2, dic, vp.top_ids)
    assert out.best_rank[0] == 0 and out.score[0] > 0.9
    assert out.score[1] < out.score[0] - 0.3
    assert np.isnan(out.score[2])  # a zero direction writes nothing
    np.testing.assert_allclose(out.score[:2], output_score_formula(out.best_rank, out.max_prob, 49152)[:2])
    one = output_scores(smollm2, dic, vp.top_ids, feature_batch=1)  # batched == one at a time
    np.testing.assert_allclose(one.score[:2], out.score[:2], rtol=1e-4)
    np.testing.assert_array_equal(one.best_rank, out.best_rank)
    weak = output_scores(smollm2, dic, vp.top_ids[:1], [0], alpha_F=[1.0])
    assert weak.score[0] < 0.01  # barely amplified: " Paris" is not what follows "From my experience,"

    # end to end: Score dicts from a cache over a synthetic store at the same hook
    rng = np.random.default_rng(1)
    toks = rng.integers(3, 49152, size=(16, 8))
    toks[:, 0] = 1
    store = write_store(tmp_path / "s.h5", acts={dic.hook: rng.normal(size=(128, 576)).astype(np.float32)},
                        tokens=toks)
    cache = FeatureCache(build_cache(store, dic, CacheConfig(top_n=3, contexts_per_chunk=16), tmp_path / "c",
                                     dictionary_id="norm", progress=False))
    scores = cheap_scores(smollm2, store, dic, cache, [0, 1, 2], CheapConfig(strength="feature_max", min_examples=1))
    for f in (0, 1):
        for s in scores[f]:
            validate_score(s, "feature", "score")
        assert [s["method"] for s in scores[f]] == ["cheap_input", "cheap_output"]
        assert scores[f][0]["n"] == 6 and scores[f][1]["metrics"]["alpha"] == pytest.approx(10 * cache["max"][f])
    assert scores[0][1]["value"] > 0.9
    unscored = cheap_scores(smollm2, store, dic, cache, [0], CheapConfig(strength="feature_max"))  # needs 10 examples
    assert unscored[0][0]["value"] is None and unscored[0][1]["value"] is not None
    with pytest.raises(ConfigError, match="no tokens"):
        cheap_scores(smollm2, store, dic, cache, [0], CheapConfig(prompt=""))
