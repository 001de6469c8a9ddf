"""Reconstruction metrics vs hand-computed values and plain-numpy references."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from featureatlas.eval import metrics


def _x_xhat_codes():
    x = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]], np.float32)
    x_hat = np.array([[1.0, 2.0], [2.0, 4.0], [5.0, 1.0]], np.float32)
    codes = np.array([[0.0, 1.5, 0.0, 0.0], [2.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 1.0]], np.float32)
    return x, x_hat, codes


def test_hand_computed_values():
    x, x_hat, codes = _x_xhat_codes()
    m = metrics.finalize(metrics.update(metrics.init(2, 4), x, x_hat, codes))
    # errors (0,0), (1,0), (0,-1): squared error sum 2 over 3 tokens x 2 dims
    assert m["n_tokens"] == 3
    assert m["mse"] == pytest.approx(2 / 6)
    assert m["mse_per_token_sum"] == pytest.approx(2 / 3)
    # mean (3, 2); deviations (-2,0), (0,2), (2,-2): sum of squares 16 (about zero it would be 55)
    assert m["explained_variance"] == pytest.approx(1 - 2 / 16)
    assert m["fvu"] == pytest.approx(2 / 16)
    assert m["l0"] == pytest.approx(4 / 3)
    assert m["l1"] == pytest.approx(5 / 3)
    # cos: 1; (3,4).(2,4) = 22 / (5 * sqrt 20); (5,0).(5,1) = 25 / (5 * sqrt 26)
    assert m["cosine"] == pytest.approx((1 + 22 / (5 * math.sqrt(20)) + 25 / (5 * math.sqrt(26))) / 3, rel=1e-6)
    assert m["norm_ratio"] == pytest.approx((1 + math.sqrt(20) / 5 + math.sqrt(26) / 5) / 3, rel=1e-6)
    np.testing.assert_allclose(m["density_F"], [1 / 3, 1 / 3, 0, 2 / 3])
    assert m["dead_frac"] == 0.25
    assert m["frac_density_gt_1pct"] == 0.75
    assert m["frac_density_gt_10pct"] == 0.75
    hist = m["log10_density_hist"]
    # log10(1/3) = -0.477 lies in [-0.5, -0.25) (bin 30), log10(2/3) = -0.176 in [-0.25, 0] (bin 31)
    expected = [0] * 32
    expected[30], expected[31] = 2, 1
    assert hist["counts"] == expected
    assert hist["n_dead"] == 1
    assert len(hist["edges"]) == 33


def _numpy_reference(x, x_hat, codes):
    x, x_hat, codes = (np.asarray(a, np.float64) for a in (x, x_hat, codes))
    err = ((x - x_hat) ** 2).sum(1)
    var = ((x - x.mean(0)) ** 2).sum(1)
    nx, nh = np.linalg.norm(x, axis=1), np.linalg.norm(x_hat, axis=1)
    return {
        "mse": err.mean() / x.shape[1],
        "explained_variance": 1 - err.sum() / var.sum(),
        "l0": (codes != 0).sum(1).mean(),
        "l1": np.abs(codes).sum(1).mean(),
        "cosine": ((x * x_hat).sum(1) / (nx * nh)).mean(),
        "norm_ratio": (nh / nx).mean(),
    }


def _random_case(n=1000, d=16, f=32, offset=0.0, seed=0):
    rng = np.random.default_rng(seed)
    x = (offset + rng.normal(size=(n, d))).astype(np.float32)
    x_hat = (x + 0.3 * rng.normal(size=(n, d))).astype(np.float32)
    codes = np.maximum(rng.normal(size=(n, f)) - 1.0, 0).astype(np.float32)
    codes[:, :3] = 0  # three dead latents
    return x, x_hat, codes


def test_streaming_equals_all_at_once_and_numpy():
    x, x_hat, codes = _random_case()
    whole = metrics.finalize(metrics.update(metrics.init(16, 32), x, x_hat, codes))
    stats = metrics.init(16, 32)
    for lo, hi in [(0, 100), (100, 101), (101, 500), (500, 1000)]:
        stats = metrics.update(stats, jnp.asarray(x[lo:hi]), jnp.asarray(x_hat[lo:hi]), jnp.asarray(codes[lo:hi]))
    streamed = metrics.finalize(stats)
    ref = _numpy_reference(x, x_hat, codes)
    for key, value in ref.items():
        assert streamed[key] == pytest.approx(value, rel=1e-5), key
        assert streamed[key] == pytest.approx(whole[key], rel=1e-5), key
    np.testing.assert_array_equal(streamed["density_F"], whole["density_F"])
    np.testing.assert_array_equal(streamed["density_F"], (codes != 0).mean(0))
    assert streamed["dead_frac"] == 3 / 32
    assert streamed["log10_density_hist"] == whole["log10_density_hist"]


def test_explained_variance_is_about_the_mean_with_large_offset():
    # Residual streams have a large shared mean; variance about zero would give EV ~ 1.
    x, x_hat, codes = _random_case(offset=100.0, seed=1)
    stats = metrics.init(16, 32)
    for lo in range(0, 1000, 250):
        stats = metrics.update(stats, x[lo:lo + 250], x_hat[lo:lo + 250], codes[lo:lo + 250])
    m = metrics.finalize(stats)
    ref = _numpy_reference(x, x_hat, codes)
    assert m["explained_variance"] == pytest.approx(ref["explained_variance"], rel=1e-4)
    assert m["explained_variance"] == pytest.approx(1 - 0.09, abs=0.02)  # noise var 0.09 vs 1


class _Linear:
    """A tiny linear dictionary: codes = relu(x W), x_hat = codes W^T (test fixture)."""

    hook = "resid_post.0"

    def __init__(self, W_DxF):
        self.W = jnp.asarray(W_DxF)
        self.n_features = self.W.shape[1]

    def encode(self, x):
        return jnp.maximum(x @ self.W, 0)

    def decode(self, c):
        return c @ self.W.T


def test_evaluate_reconstruction_matches_reference_and_transcoder_target():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    W = rng.normal(size=(8, 12)).astype(np.float32) / 4
    dic = _Linear(W)
    codes = np.maximum(x @ W, 0)
    x_hat = codes @ W.T
    batches = [x[i:i + 64] for i in range(0, 300, 64)]  # last batch is short
    m = metrics.evaluate_reconstruction(dic, iter(batches), n_batches=None)
    ref = _numpy_reference(x, x_hat, codes)
    for key, value in ref.items():
        assert m[key] == pytest.approx(value, rel=1e-5), key
    assert m["n_tokens"] == 300
    # n_batches stops early
    assert metrics.evaluate_reconstruction(dic, iter(batches), n_batches=2)["n_tokens"] == 128
    # transcoder: targets come from another hook
    y = rng.normal(size=(300, 8)).astype(np.float32)
    mt = metrics.evaluate_reconstruction(dic, iter(batches), None, target_hook_batches=[y[i:i + 64] for i in range(0, 300, 64)])
    ref_t = _numpy_reference(y, x_hat, codes)
    for key, value in ref_t.items():
        assert mt[key] == pytest.approx(value, rel=1e-5), key


def test_bad_input_is_named():
    x, x_hat, codes = _x_xhat_codes()
    with pytest.raises(ValueError, match="features"):
        metrics.update(metrics.init(2, 5), x, x_hat, codes)
    with pytest.raises(ValueError, match="no tokens"):
        metrics.finalize(metrics.init(2, 4))
    with pytest.raises(ValueError, match="shape"):
        metrics.update(metrics.init(2, 4), x, x_hat[:2], codes)


def test_scalars_drop_arrays_and_are_json_writable():
    import json

    x, x_hat, codes = _x_xhat_codes()
    m = metrics.finalize(metrics.update(metrics.init(2, 4), x, x_hat, codes))
    s = metrics.scalars(m)
    assert "density_F" not in s
    json.dumps(s)


def test_evaluate_reconstruction_with_a_trained_sae_object():
    from featureatlas.saes import SAEConfig, sae_from_params

    rng = np.random.default_rng(3)
    D, F = 10, 24
    W_enc = rng.normal(size=(D, F)).astype(np.float32)
    b_enc = rng.normal(size=F).astype(np.float32) * 0.1
    W_dec = rng.normal(size=(F, D)).astype(np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    b_dec = rng.normal(size=D).astype(np.float32)
    sae = sae_from_params(SAEConfig(architecture="topk", d_in=D, width=F, k=3, hook_in="resid_post.0"),
                          {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec})
    x = (rng.normal(size=(500, D)) + 3.0).astype(np.float32)
    m = metrics.evaluate_reconstruction(sae, (x[i:i + 128] for i in range(0, 500, 128)))
    # plain-numpy TopK SAE: keep the 3 largest relu(pre) per token
    pre = np.maximum(x.astype(np.float64) @ W_enc + b_enc, 0)
    top = np.argsort(-pre, axis=1)[:, :3]
    codes = np.zeros_like(pre)
    np.put_along_axis(codes, top, np.take_along_axis(pre, top, 1), 1)
    ref = _numpy_reference(x, codes @ W_dec + b_dec, codes)
    for key, value in ref.items():
        assert m[key] == pytest.approx(value, rel=1e-4), key
    assert m["l0"] <= 3


def _planted_massive(n=400, d=8, seed=4):
    """Ordinary tokens (norm ~ 3) reconstructed with 10% relative noise, plus row 7: a massive token
    (norm ~ 3000) reconstructed to within 1%: it alone holds almost all the variance about the mean."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x_hat = x + 0.3 * rng.normal(size=(n, d)).astype(np.float32)
    x[7] = 0.0
    x[7, 0] = 3000.0
    x_hat[7] = x[7]
    x_hat[7, 1] = 30.0  # squared error 900 on this one token, 0.0001 of its squared norm
    codes = np.maximum(rng.normal(size=(n, 5)), 0).astype(np.float32)
    return x, x_hat, codes


def _fvu_np(x, x_hat):
    x, x_hat = np.asarray(x, np.float64), np.asarray(x_hat, np.float64)
    return ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()


def test_massive_token_dominates_fvu_and_is_excluded():
    x, x_hat, codes = _planted_massive()
    m = metrics.finalize(metrics.update(metrics.init(8, 5, massive_threshold=100.0), x, x_hat, codes))
    others = np.arange(len(x)) != 7
    fvu_others = _fvu_np(x[others], x_hat[others])  # ~ 0.09 (noise variance 0.09 vs 1)
    assert fvu_others == pytest.approx(0.09, abs=0.02)
    # all tokens: variance ~ 3000^2 (1 - 1/400) from the one token, so FVU ~ (399*8*0.09 + 900) / 9e6
    assert m["fvu"] == pytest.approx(_fvu_np(x, x_hat), rel=1e-5)
    assert m["fvu"] < 1e-3 < fvu_others / 50
    assert m["fvu_excl_massive"] == pytest.approx(fvu_others, rel=1e-5)
    assert m["explained_variance_excl_massive"] == pytest.approx(1 - fvu_others, rel=1e-5)
    assert m["n_massive"] == 1
    assert m["massive_threshold"] == 100.0
    # per-token relative error: every token weighs 1/N
    rel = (((x - x_hat).astype(np.float64) ** 2).sum(1) / (x.astype(np.float64) ** 2).sum(1)).mean()
    assert m["rel_err_per_token"] == pytest.approx(rel, rel=1e-5)


def test_massive_exclusion_streams_exactly():
    x, x_hat, codes = _planted_massive()
    whole = metrics.finalize(metrics.update(metrics.init(8, 5, 100.0), x, x_hat, codes))
    stats = metrics.init(8, 5, 100.0)
    # a batch holding only the massive token (no kept row), and one with no massive token
    for lo, hi in [(0, 7), (7, 8), (8, 9), (9, 250), (250, 400)]:
        stats = metrics.update(stats, x[lo:hi], x_hat[lo:hi], codes[lo:hi])
    streamed = metrics.finalize(stats)
    for key in ("fvu", "fvu_excl_massive", "rel_err_per_token", "n_massive", "mse"):
        assert streamed[key] == pytest.approx(whole[key], rel=1e-5), key


def test_no_threshold_keeps_every_token():
    x, x_hat, codes = _planted_massive()
    m = metrics.finalize(metrics.update(metrics.init(8, 5), x, x_hat, codes))
    assert m["n_massive"] == 0 and m["massive_threshold"] is None
    assert m["fvu_excl_massive"] == pytest.approx(m["fvu"], rel=1e-6)


def test_hand_computed_massive_and_relative_error():
    # x: (1,0), (0,1), (10,0); x_hat: (1,0), (0,0), (9,0); threshold 5 drops (10,0)
    x = np.array([[1.0, 0.0], [0.0, 1.0], [10.0, 0.0]], np.float32)
    x_hat = np.array([[1.0, 0.0], [0.0, 0.0], [9.0, 0.0]], np.float32)
    codes = np.ones((3, 1), np.float32)
    m = metrics.finalize(metrics.update(metrics.init(2, 1, 5.0), x, x_hat, codes))
    # all: mean (11/3, 1/3); deviations (-8/3,-1/3), (-11/3,2/3), (19/3,-1/3): sum sq = (64+1+121+4+361+1)/9
    assert m["fvu"] == pytest.approx(2 / (552 / 9))
    # kept (1,0), (0,1): mean (1/2, 1/2), sum sq dev = 4 * 1/4 = 1; sse = 1
    assert m["fvu_excl_massive"] == pytest.approx(1.0)
    assert m["n_massive"] == 1
    # per-token relative errors 0, 1, 1/100
    assert m["rel_err_per_token"] == pytest.approx((0 + 1 + 0.01) / 3)


def test_training_curves_share_axes_only_for_same_units_and_token_rule(tmp_path):
    from featureatlas.saes import plots

    train = [{"kind": "train", "step": s, "tokens": s * 100, "loss": 0.1, "mse": 0.05, "l0": 32, "fvu": 0.13,
              "dead_frac": 0.0} for s in (1, 2, 3)]
    ev = [{"kind": "eval", "step": 3, "tokens": 300, "mse": 8.3, "l0": 32, "fvu": 0.036, "fvu_excl_massive": 0.28,
           "n_massive": 3, "rel_err_per_token": 0.12, "dead_frac": 0.0}]
    by_title = lambda ps: {p.title.split(" (")[0].split(",")[0]: p for p in ps}  # noqa: E731
    # raw eval MSE is drawn in training units (x output_scale^2) only when the scale is known
    p = by_title(plots.panels(train, ev, {"output_scale": 0.1}))
    assert p["MSE per element"].eval_key == "mse" and p["MSE per element"].eval_scale == pytest.approx(0.01)
    assert by_title(plots.panels(train, ev, {}))["MSE per element"].eval_key is None
    # train FVU on all tokens sits with eval FVU on all tokens; the excluded panel is eval-only
    fvu_panels = [q for q in plots.panels(train, ev, {}) if q.eval_key in ("fvu", "fvu_excl_massive")]
    assert [(q.train_key, q.eval_key) for q in fvu_panels] == [("fvu", "fvu"), (None, "fvu_excl_massive")]
    assert not fvu_panels[0].note  # both pooled the same way: nothing to explain
    # training on massive tokens from a store also logs the excluded FVU: it joins that panel
    both = [dict(r, fvu_excl_massive=0.3) for r in train]
    fvu_panels = [q for q in plots.panels(both, ev, {}) if q.eval_key in ("fvu", "fvu_excl_massive")]
    assert [(q.train_key, q.eval_key) for q in fvu_panels] == [("fvu", "fvu"),
                                                               ("fvu_excl_massive", "fvu_excl_massive")]
    # training that left massive tokens out: its FVU joins the excluded panel
    cfg = {"train": {"exclude_massive": True}}
    fvu_panels = [q for q in plots.panels(train, ev, cfg) if q.eval_key in ("fvu", "fvu_excl_massive")]
    assert [(q.train_key, q.eval_key) for q in fvu_panels] == [(None, "fvu"), ("fvu", "fvu_excl_massive")]
    # old eval rows (no massive keys) still plot, and the frontier falls back to the all-token FVU
    out = plots.plot_curves(train, [{"step": 3, "tokens": 300, "fvu": 0.1, "l0": 30}], tmp_path / "c.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    runs = [{"l0": 16, "fvu": 0.04, "fvu_excl_massive": 0.33, "sae": "k16"},
            {"l0": 32, "fvu": 0.05, "fvu_excl_massive": 0.29, "sae": "k32"}]
    assert plots.plot_frontier(runs, tmp_path / "f.png").exists()
