"""The massive-activation token rule (activation_store/massive.py)."""
import numpy as np
import pytest

from featureatlas.activation_store import massive
from featureatlas.activation_store.errors import FeatureAtlasError


def test_threshold_is_factor_times_median_and_mask_is_strict():
    norms = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    assert massive.norm_threshold(norms, factor=4.0) == 12.0
    np.testing.assert_array_equal(massive.massive_mask(norms, 12.0), [False, False, False, False, True])
    np.testing.assert_array_equal(massive.massive_mask(np.array([12.0]), 12.0), [False])
    # non-finite norms do not move the median
    assert massive.norm_threshold(np.array([1.0, 2.0, 3.0, np.nan, np.inf]), factor=2.0) == 4.0


def test_default_factor_separates_a_planted_outlier():
    rng = np.random.default_rng(0)
    norms = 170 * (1 + 0.1 * rng.normal(size=10_000))
    norms[[5, 77, 900]] = [6 * 170, 40 * 170, 150 * 170]
    mask = massive.massive_mask(norms, massive.norm_threshold(norms))
    assert np.flatnonzero(mask).tolist() == [5, 77, 900]


@pytest.mark.parametrize("factor", [1.0, 0.5, -3, float("nan"), float("inf")])
def test_bad_factor_is_a_user_error(factor):
    with pytest.raises(FeatureAtlasError, match="factor"):
        massive.norm_threshold(np.ones(4), factor=factor)


def test_no_norms_is_a_user_error():
    with pytest.raises(FeatureAtlasError, match="no finite token norms"):
        massive.norm_threshold(np.array([]))


class _FakeStore:
    """The three reader methods store_norm_threshold uses, over an in-memory array."""

    def __init__(self, x_NxD, train_rows):
        self.x, self.train = x_NxD, np.asarray(train_rows)
        self.reads = []

    def token_rows(self, split="train", exclude_bos=True):
        assert exclude_bos
        return self.train if split == "train" else np.arange(len(self.x))

    def read_rows(self, hook, rows):
        self.reads.append(np.asarray(rows))
        return self.x[np.asarray(rows)]


def test_store_threshold_uses_a_fixed_sample_of_train_rows():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1000, 4)).astype(np.float32)
    x[:10] *= 1e4  # rows outside the train split must not count
    store = _FakeStore(x, np.arange(10, 1000))
    full = massive.store_norm_threshold(store, "h", factor=3.0)
    assert full == pytest.approx(3.0 * np.median(np.linalg.norm(x[10:], axis=1)))
    a = massive.store_norm_threshold(store, "h", n_sample=100, seed=5)
    b = massive.store_norm_threshold(store, "h", n_sample=100, seed=5)
    assert a == b
    sample = store.reads[-1]
    assert sample.size == 100 and np.all(np.diff(sample) > 0) and sample.min() >= 10


def test_store_threshold_on_a_real_store(tmp_path):
    from featureatlas.activation_store import ActivationStore, write_store

    rng = np.random.default_rng(2)
    n_ctx, T, D = 40, 8, 6
    acts = rng.normal(size=(n_ctx * T, D)).astype(np.float32)
    acts[1::T] *= 50.0  # position 1 of every context: massive
    path = tmp_path / "s.h5"
    write_store(path, acts={"resid_post.0": acts}, tokens=rng.integers(3, 100, size=(n_ctx, T)), val_fraction=0.2)
    store = ActivationStore.open(path)
    rows = store.token_rows("train", exclude_bos=True)
    norms = np.linalg.norm(store.read_rows("resid_post.0", rows), axis=1)
    threshold = massive.store_norm_threshold(path, "resid_post.0")
    assert threshold == pytest.approx(massive.DEFAULT_FACTOR * np.median(norms), rel=1e-6)
    assert np.flatnonzero(massive.massive_mask(norms, threshold)).tolist() == np.flatnonzero(rows % T == 1).tolist()
