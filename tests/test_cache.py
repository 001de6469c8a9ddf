"""The feature activation cache against a brute-force dense computation on a small store."""
import dataclasses
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from featureatlas.activation_store.errors import ConfigError, RunError
from featureatlas.activation_store.store import write_store
from featureatlas.eval.adapters import DictionaryError
from featureatlas.eval.cache import (EXPLAIN, HIST_EDGES, HELD_OUT, CacheConfig, FeatureCache, build_cache,
                                     held_out_mask)

HOOK = "resid_post.0"
N_CTX, T, D, F = 37, 12, 8, 6


@dataclasses.dataclass
class ReluDict:
    """A tiny dictionary: codes = ReLU(x W - b); feature 5 never fires (dead)."""

    W_DxF: np.ndarray
    b_F: np.ndarray
    hook: str = HOOK

    @property
    def n_features(self):
        return self.W_DxF.shape[1]

    @property
    def directions_FxD(self):
        return jnp.asarray(self.W_DxF.T)

    def encode(self, x):
        return jnp.maximum(jnp.asarray(x) @ self.W_DxF - self.b_F, 0.0)

    def decode(self, c):
        return jnp.asarray(c) @ self.directions_FxD

    def residual_directions(self, model):
        return self.directions_FxD


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(N_CTX * T, D)).astype(np.float32) * np.exp(rng.normal(size=(N_CTX * T, 1)))
    n_valid = rng.integers(3, T + 1, size=N_CTX)
    path = tmp_path_factory.mktemp("s") / "s.h5"
    store = write_store(path, acts={HOOK: acts}, tokens=rng.integers(3, 50, size=(N_CTX, T)), n_valid=n_valid)
    W = rng.normal(size=(D, F)).astype(np.float32)
    b = np.array([0.5, 1.0, 2.0, 0.0, 3.0, 1e9], np.float32)
    return store, ReluDict(W, b), acts, n_valid


def brute(acts, n_valid, dic):
    codes = np.maximum(acts @ dic.W_DxF - dic.b_F, 0).reshape(N_CTX, T, F)
    valid = (np.arange(T)[None] < n_valid[:, None]) & (np.arange(T)[None] > 0)
    return np.where(valid[..., None], codes, 0.0), valid


CFG = CacheConfig(top_n=5, n_quantiles=3, per_bin=4, sample_size=64, n_negative=4, contexts_per_chunk=4,
                  hist_stride=1, cooccur_top=3, checkpoint_every=2)


def test_cache_equals_brute_force(setup, tmp_path):
    store, dic, acts, n_valid = setup
    path = build_cache(store, dic, CFG, tmp_path / "c", dictionary_id="relu", progress=False)
    cache = FeatureCache(path)
    codes, valid = brute(acts, n_valid, dic)
    ctx_max = codes.max(1)
    held = held_out_mask(np.arange(N_CTX), CFG.held_out_fraction, CFG.seed)
    assert 0 < held.sum() < N_CTX
    n_tok = valid.sum()
    flat = codes[valid]
    np.testing.assert_allclose(cache["density"], (flat > 0).sum(0) / n_tok)
    np.testing.assert_allclose(cache["max"], flat.max(0), rtol=1e-6)
    np.testing.assert_allclose(cache["mean"], flat.sum(0) / n_tok, rtol=1e-5)
    assert cache.dead.tolist() == [False] * 5 + [True]
    for f in range(F):
        pos = flat[:, f][flat[:, f] > 0]
        hist = np.histogram(np.clip(pos, HIST_EDGES[0], HIST_EDGES[-1] * 0.999), HIST_EDGES)[0]
        np.testing.assert_array_equal(cache["hist"][f], hist)
        for split, mask in ((EXPLAIN, ~held), (HELD_OUT, held)):
            ex = cache.examples(f, split)
            cands = [c for c in np.flatnonzero(mask) if ctx_max[c, f] > 0]
            want = sorted(cands, key=lambda c: (-ctx_max[c, f], c))[:CFG.top_n]
            assert [c for c, _ in ex["top"]] == want
            np.testing.assert_allclose([v for _, v in ex["top"]], [ctx_max[c, f] for c in want], rtol=1e-5)
            quant = [x for q in ex["quantiles"] for x in q]
            assert all(mask[c] and ctx_max[c, f] > 0 for c, _ in quant)
            assert len({c for c, _ in quant}) == len(quant)  # a context at most once
            np.testing.assert_allclose([v for c, v in quant], [ctx_max[c, f] for c, _ in quant], rtol=1e-5)
            # the sample covers every activating context here (sample_size >= candidates): exact quantiles
            acts_sorted = np.sort([ctx_max[c, f] for c in cands])
            bounds = np.floor(np.linspace(0, len(cands), CFG.n_quantiles + 1)).astype(int)
            for q, items in enumerate(ex["quantiles"]):
                want_q = acts_sorted[bounds[q]:bounds[q + 1]]
                assert len(items) == min(CFG.per_bin, len(want_q))
                got = [v for _, v in items]
                assert all(want_q.min() * (1 - 1e-5) <= v <= want_q.max() * (1 + 1e-5) for v in got), (got, want_q)
            assert all(mask[c] and ctx_max[c, f] == 0 for c in ex["negative"])
    # co-occurrence of the tracked features with every feature
    active = flat > 0
    for m, f in enumerate(cache["cooc_features"]):
        np.testing.assert_array_equal(cache["cooc"][m], (active[:, f:f + 1] & active).sum(0))


def test_explain_and_held_out_never_share_a_context(setup, tmp_path):
    store, dic, _, _ = setup
    cache = FeatureCache(build_cache(store, dic, CFG, tmp_path / "c", dictionary_id="relu", progress=False))
    for f in range(F):
        seen = [{c for c, _ in e["top"]} | {c for q in e["quantiles"] for c, _ in q} | set(e["negative"])
                for e in (cache.examples(f, EXPLAIN), cache.examples(f, HELD_OUT))]
        assert not seen[0] & seen[1]


def test_interrupted_pass_resumes_to_the_same_result(setup, tmp_path):
    store, dic, _, _ = setup
    full = FeatureCache(build_cache(store, dic, CFG, tmp_path / "a", dictionary_id="relu", progress=False))
    assert build_cache(store, dic, CFG, tmp_path / "b", dictionary_id="relu", progress=False,
                       stop_after_chunks=3) is None
    with pytest.raises(RunError, match="--resume"):
        build_cache(store, dic, CFG, tmp_path / "b", dictionary_id="relu", progress=False)
    resumed = FeatureCache(build_cache(store, dic, CFG, tmp_path / "b", dictionary_id="relu", progress=False,
                                       resume=True))
    for k in full.arrays:
        np.testing.assert_array_equal(full[k], resumed[k], err_msg=k)


def test_bad_inputs_are_refused_before_any_work(setup, tmp_path):
    store, dic, _, _ = setup
    with pytest.raises(ConfigError, match="hook 'resid_post.3'.*has only resid_post.0"):
        build_cache(store, dataclasses.replace(dic, hook="resid_post.3"), CFG, tmp_path / "x", dictionary_id="d")
    wide = ReluDict(np.zeros((D + 1, F), np.float32), dic.b_F)
    wide.d_in = D + 1
    with pytest.raises(DictionaryError, match="cannot encode 8-wide inputs.*dimensions differ"):
        build_cache(store, wide, CFG, tmp_path / "x", dictionary_id="d")
    with pytest.raises(ConfigError, match="--top-n must be > 0"):
        build_cache(store, dic, dataclasses.replace(CFG, top_n=0), tmp_path / "x", dictionary_id="d")
    assert not (tmp_path / "x").exists()
    cache = FeatureCache(build_cache(store, dic, CFG, tmp_path / "c", dictionary_id="relu", progress=False))
    with pytest.raises(DictionaryError, match=r"feature ids \[6\] out of range.*ids 0..5"):
        cache.check_features([1, 6])


def test_maxact_windows_are_centred_and_carry_exact_activations(setup, tmp_path):
    from featureatlas.eval.maxact import example_windows, normalise, window_bounds

    store, dic, acts, n_valid = setup
    cache = FeatureCache(build_cache(store, dic, CFG, tmp_path / "c", dictionary_id="relu", progress=False))
    codes, _ = brute(acts, n_valid, dic)
    wins = example_windows(store, dic, cache, [0, 3, 5], lambda t: f"<t{t}>", width=6)
    for f in (0, 3):
        ex = cache.examples(f)
        assert len(wins[f]["top"]) == len(ex["top"])
        for (c, v), w in zip(ex["top"], wins[f]["top"]):
            p = int(np.argmax(codes[c, :, f]))
            assert w["context"] == c and 1 <= w["start"] <= p < w["start"] + len(w["tokens"])
            assert w["start"] + w["max_pos"] == p and abs(w["acts"][w["max_pos"]] - v) < 1e-4
            np.testing.assert_allclose(w["acts"], codes[c, w["start"]:w["start"] + len(w["tokens"]), f], atol=1e-5)
            assert w["tokens"] == [f"<t{t}>" for t in store.tokens[c, w["start"]:w["start"] + len(w["tokens"])]]
            assert len(w["tokens"]) == min(6, n_valid[c] - 1)
        assert all(max(w["acts"]) == 0 for w in wins[f]["random"])
    assert wins[5] == {"top": [], "quantiles": [[] for _ in range(CFG.n_quantiles)], "random": wins[5]["random"]}
    assert window_bounds(10, 1, 40, 32) == (1, 33) and window_bounds(30, 1, 40, 32) == (8, 40)
    assert window_bounds(20, 1, 100, 32) == (4, 36)
    assert normalise([0.0, 0.5, 1.0, -1.0], 1.0) == [0, 5, 10, 0]
