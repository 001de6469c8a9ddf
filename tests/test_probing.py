"""Sparse probing on a synthetic labelled store with a planted class-indicator feature."""
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from featureatlas.activation_store.store import write_store
from featureatlas.eval.probing import (ProbingConfig, ProbingError, class_split, document_split, pooled_activations,
                                       probe_accuracy, sparse_probing, top_k_features, wilson_interval)

HOOK = "resid_post.0"
N_CTX, T, D, N_CLASSES = 120, 10, 6, 3
F = D  # features 0..D-2: relu of dims 1..D-1; D-1: the planted class-0 indicator (reads dim 0)


@dataclasses.dataclass
class PlantedDict:
    """codes = [relu(x[:, 1:]), x[:, 0] > 50]: the last feature reads a marker written only into class-0 contexts."""

    hook: str = HOOK

    @property
    def n_features(self):
        return F

    @property
    def directions_FxD(self):
        return jnp.concatenate([jnp.eye(D)[1:], jnp.eye(D)[:1]])

    def encode(self, x):
        x = jnp.asarray(x, jnp.float32)
        return jnp.concatenate([jnp.maximum(x[:, 1:], 0), (x[:, :1] > 50).astype(jnp.float32)], axis=1)

    def decode(self, c):
        return jnp.asarray(c) @ self.directions_FxD

    def residual_directions(self, model):
        return self.directions_FxD


def _acts_and_labels(rng):
    labels = rng.integers(0, N_CLASSES, size=N_CTX)
    doc_ids = np.arange(N_CTX) // 2  # two contexts per document: the split must keep them together
    labels = labels[doc_ids * 2]
    acts = rng.normal(size=(N_CTX, T, D)).astype(np.float32)
    acts[labels == 0, 1:, 0] = 100.0  # the planted marker on every real token of class-0 contexts
    acts[:, 0, :] = 1e4  # a huge BOS row that pooling must ignore
    return acts, labels, doc_ids


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    acts, labels, doc_ids = _acts_and_labels(rng)
    n_valid = rng.integers(4, T + 1, size=N_CTX)
    path = tmp_path_factory.mktemp("p") / "s.h5"
    return write_store(path, acts={HOOK: acts.reshape(-1, D)}, tokens=rng.integers(3, 50, size=(N_CTX, T)),
                       doc_ids=doc_ids, labels=labels, label_names=("planted", "b", "c"), n_valid=n_valid), acts


def brute_pooled(acts, n_valid):
    codes = np.concatenate([np.maximum(acts[..., 1:], 0), (acts[..., :1] > 50)], axis=-1)
    real = (np.arange(T)[None] >= 1) & (np.arange(T)[None] < n_valid[:, None])
    w = real / real.sum(1, keepdims=True)
    return np.einsum("ct,ctf->cf", w, codes), np.einsum("ct,ctd->cd", w, acts)


def test_pooling_is_mean_over_real_tokens(store):
    s, acts = store
    ctx = np.arange(N_CTX)
    pooled, raw = pooled_activations(s, PlantedDict(), ctx, raw=True, contexts_per_chunk=7)
    want, want_raw = brute_pooled(acts, np.asarray(s.n_valid))
    np.testing.assert_allclose(pooled, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(raw, want_raw, rtol=1e-5, atol=1e-5)
    sub, _ = pooled_activations(s, PlantedDict(), ctx[5:40], features=[F - 1, 2], contexts_per_chunk=8)
    np.testing.assert_allclose(sub, want[5:40][:, [F - 1, 2]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("two_pass", [False, True])
def test_planted_feature_found_and_accuracy_equals_sklearn(store, two_pass):
    s, acts = store
    cfg = ProbingConfig(ks=(1, 2), contexts_per_chunk=16, max_pooled_bytes=1 if two_pass else 2 << 30)
    res = sparse_probing(s, PlantedDict(), cfg)
    # documents never straddle the split
    docs = np.asarray(s.doc_ids)[res.contexts]
    assert not set(docs[res.is_test]) & set(docs[~res.is_test])
    rec = {(r["class"], r["k"]): r for r in res.records}
    assert rec[("planted", 1)]["features"] == [F - 1]
    assert rec[("planted", 1)]["accuracy"] == 1.0
    lo, hi = rec[("planted", 1)]["ci"]
    assert lo > 0.8 and hi == 1.0
    # every record equals scikit-learn run directly on the brute-force pooled matrix
    pooled, raw = brute_pooled(acts, np.asarray(s.n_valid))
    pooled, raw = pooled[res.contexts], raw[res.contexts]
    for c, name in enumerate(res.label_names):
        y, tr, te = class_split(res.labels, res.is_test, c, cfg.seed, cfg.balance)
        pos, neg = tr[y[tr]], tr[~y[tr]]
        diff = np.abs(pooled[pos].mean(0) - pooled[neg].mean(0))
        for k in (1, 2):
            feats = top_k_features(diff, k)
            assert rec[(name, k)]["features"] == feats.tolist()
            correct, n = probe_accuracy(pooled[tr][:, feats], y[tr], pooled[te][:, feats], y[te])
            assert (rec[(name, k)]["correct"], rec[(name, k)]["n_test"]) == (correct, n)
        correct, n = probe_accuracy(raw[tr], y[tr], raw[te], y[te])
        assert (rec[(name, "all")]["correct"], rec[(name, "all")]["n_test"]) == (correct, n)
    assert set(res.summary) == {"1", "2", "all"}
    json.dumps(res.as_dict())
    planted = [r for r in res.records if r["k"] == 1]
    assert res.summary["1"]["macro_accuracy"] == pytest.approx(np.mean([r["accuracy"] for r in planted]))


def test_wilson_and_split_helpers():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4901625, abs=1e-6) and hi == pytest.approx(0.9433178, abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    m1 = document_split(np.arange(1000), 0.3, 0)
    assert 0.25 < m1.mean() < 0.35
    np.testing.assert_array_equal(m1, document_split(np.arange(1000), 0.3, 0))


def test_store_without_labels_is_a_clear_error(tmp_path):
    rng = np.random.default_rng(1)
    s = write_store(tmp_path / "u.h5", acts={HOOK: rng.normal(size=(8 * T, D)).astype(np.float32)},
                    tokens=rng.integers(3, 50, size=(8, T)))
    with pytest.raises(ProbingError, match="no context labels"):
        sparse_probing(s, PlantedDict())
