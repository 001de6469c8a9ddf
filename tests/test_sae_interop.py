"""SAELens export/import: exact round trips, and SAELens's documented forward pass on import."""
import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from featureatlas.saes import SAEConfig, sae_from_params
from featureatlas.saes.saelens import (
    SAELensFormatError,
    export_saelens,
    from_transformerlens_hook,
    import_saelens,
    to_transformerlens_hook,
)
from featureatlas.saes.sae import param_names

D, F = 12, 40


def _random_sae(arch, seed=0, transcoder=False, **kw):
    rng = np.random.default_rng(seed)
    cfg = SAEConfig(architecture=arch, d_in=D, width=F, k=5, hook_in="resid_mid.3",
                    hook_out="mlp_out.3" if transcoder else "", model_id="tiny", **kw)
    shapes = {"W_enc": (D, F), "W_dec": (F, D), "b_dec": (D,)}
    params = {}
    for name in param_names(cfg):
        params[name] = rng.normal(size=shapes.get(name, (F,))).astype(np.float32) * 0.5
    params["W_dec"] /= np.linalg.norm(params["W_dec"], axis=1, keepdims=True)
    if "threshold" in params:
        params["threshold"] = np.abs(params["threshold"])
    return sae_from_params(cfg, params)


CASES = [
    ("relu", {}), ("topk", {}), ("batchtopk", {}), ("jumprelu", {}), ("gated", {}),
    ("matryoshka", {"matryoshka_base": "batchtopk"}), ("matryoshka", {"matryoshka_base": "topk"}),
]


def _x(seed=1, n=64):
    return np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)


@pytest.mark.parametrize("arch,kw", CASES)
def test_export_import_is_bit_exact(tmp_path, arch, kw):
    sae = _random_sae(arch, **kw)
    out = export_saelens(sae, tmp_path / "sl")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["d_in"] == D and cfg["d_sae"] == F and cfg["apply_b_dec_to_input"] is False
    assert cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_mid" and cfg["hook_layer"] == 3
    back = import_saelens(out)
    assert back.config.architecture == arch
    x = _x()
    np.testing.assert_array_equal(np.asarray(back.encode(x)), np.asarray(sae.encode(x)))
    codes = np.asarray(sae.encode(x))
    np.testing.assert_array_equal(np.asarray(back.decode(codes)), np.asarray(sae.decode(codes)))

    # Without our metadata, the plain SAELens reading computes the same thing, bit for bit.
    del cfg["metadata"]["featureatlas"]
    (out / "cfg.json").write_text(json.dumps(cfg))
    plain = import_saelens(out)
    assert plain.hook == "resid_mid.3"
    np.testing.assert_array_equal(np.asarray(plain.encode(x)), codes)
    np.testing.assert_array_equal(np.asarray(plain.decode(codes)), np.asarray(sae.decode(codes)))


def test_saelens_architecture_names(tmp_path):
    expected = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu", "gated": "gated"}
    for arch, name in expected.items():
        cfg = json.loads((export_saelens(_random_sae(arch), tmp_path / arch) / "cfg.json").read_text())
        assert cfg["architecture"] == name
    cfg = json.loads((tmp_path / "topk" / "cfg.json").read_text())
    assert cfg["k"] == 5 and cfg["rescale_acts_by_decoder_norm"] is False


def test_transcoder_round_trip(tmp_path):
    sae = _random_sae("relu", transcoder=True)
    out = export_saelens(sae, tmp_path / "tc")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "transcoder" and cfg["d_out"] == D
    assert cfg["metadata"]["hook_name_out"] == "blocks.3.hook_mlp_out"
    del cfg["metadata"]["featureatlas"]
    (out / "cfg.json").write_text(json.dumps(cfg))
    back = import_saelens(out)
    assert back.hook == "resid_mid.3" and back.hook_out == "mlp_out.3"
    x = _x()
    np.testing.assert_array_equal(np.asarray(back.reconstruct(x)), np.asarray(sae.reconstruct(x)))
    with pytest.raises(SAELensFormatError, match="transcoder"):
        export_saelens(_random_sae("topk", transcoder=True), tmp_path / "bad")


def _write_saelens_dir(path, cfg, weights):
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in weights.items()}, str(path / "sae_weights.safetensors"))


def _saelens_weights(seed=3, gated=False):
    rng = np.random.default_rng(seed)
    w = {
        "W_enc": rng.normal(size=(D, F)).astype(np.float32) * 0.4,
        "W_dec": rng.normal(size=(F, D)).astype(np.float32) * 0.3,  # rows deliberately not unit norm
        "b_dec": rng.normal(size=D).astype(np.float32),
    }
    if gated:
        w.update(b_gate=rng.normal(size=F).astype(np.float32) * 0.2,
                 b_mag=rng.normal(size=F).astype(np.float32) * 0.2,
                 r_mag=rng.normal(size=F).astype(np.float32) * 0.3)
    else:
        w["b_enc"] = rng.normal(size=F).astype(np.float32) * 0.2
    return w


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_import_standard_relu_matches_saelens_forward(tmp_path, apply_b_dec):
    w = _saelens_weights()
    cfg = {"architecture": "standard", "d_in": D, "d_sae": F, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": apply_b_dec, "normalize_activations": "none",
           "metadata": {"sae_lens_version": "6.5.0", "model_name": "gpt2", "hook_name": "blocks.4.hook_resid_post"}}
    _write_saelens_dir(tmp_path / "sl", cfg, w)
    sae = import_saelens(tmp_path / "sl")
    assert sae.hook == "resid_post.4" and sae.config.model_id == "gpt2"
    x = _x(n=200).astype(np.float64) * 2
    # SAELens StandardSAE: f = relu((x - b_dec·apply) W_enc + b_enc); x_hat = f W_dec + b_dec
    sae_in = x - w["b_dec"] * apply_b_dec
    f_ref = np.maximum(sae_in @ w["W_enc"] + w["b_enc"], 0)
    x_hat_ref = f_ref @ w["W_dec"] + w["b_dec"]
    f = np.asarray(sae.encode(x.astype(np.float32)))
    np.testing.assert_allclose(f, f_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(sae.decode(f)), x_hat_ref, rtol=1e-4, atol=1e-4)


def test_import_pre_v6_topk_with_decoder_norm_rescale_and_gated(tmp_path):
    x = _x(n=200).astype(np.float64)
    # pre-6 layout: flat fields, TopK given as activation_fn_str + kwargs; plus v6 rescale flag.
    w = _saelens_weights(seed=4)
    cfg = {"d_in": D, "d_sae": F, "dtype": "float32", "hook_name": "blocks.2.hook_mlp_out", "hook_layer": 2,
           "model_name": "m", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4},
           "apply_b_dec_to_input": True, "rescale_acts_by_decoder_norm": True}
    _write_saelens_dir(tmp_path / "topk", cfg, w)
    sae = import_saelens(tmp_path / "topk")
    assert sae.config.architecture == "topk" and sae.config.k == 4 and sae.hook == "mlp_out.2"
    n_F = np.linalg.norm(w["W_dec"], axis=1)
    h = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) * n_F
    keep = np.argsort(-h, axis=1)[:, :4]
    f_ref = np.zeros_like(h)
    np.put_along_axis(f_ref, keep, np.maximum(np.take_along_axis(h, keep, 1), 0), 1)
    x_hat_ref = (f_ref / n_F) @ w["W_dec"] + w["b_dec"]
    np.testing.assert_allclose(np.asarray(sae.reconstruct(x.astype(np.float32))), x_hat_ref, rtol=1e-4, atol=1e-4)

    w = _saelens_weights(seed=5, gated=True)
    cfg = {"architecture": "gated", "d_in": D, "d_sae": F, "apply_b_dec_to_input": True,
           "metadata": {"sae_lens_version": "6.0.0", "hook_name": "blocks.0.mlp.hook_post"}}
    _write_saelens_dir(tmp_path / "gated", cfg, w)
    sae = import_saelens(tmp_path / "gated")
    assert sae.hook == "mlp_hidden.0"
    s = x - w["b_dec"]
    gate = (s @ w["W_enc"] + w["b_gate"]) > 0
    mag = np.maximum(s @ (w["W_enc"] * np.exp(w["r_mag"])) + w["b_mag"], 0)
    f_ref = gate * mag
    np.testing.assert_allclose(np.asarray(sae.encode(x.astype(np.float32))), f_ref, rtol=1e-4, atol=1e-4)


def test_import_jumprelu_and_unsupported(tmp_path):
    w = _saelens_weights(seed=6)
    w["threshold"] = np.abs(np.random.default_rng(0).normal(size=F)).astype(np.float32) * 0.3
    cfg = {"architecture": "jumprelu", "d_in": D, "d_sae": F, "apply_b_dec_to_input": False,
           "metadata": {"sae_lens_version": "6.0.0", "hook_name": "blocks.1.hook_resid_pre"}}
    _write_saelens_dir(tmp_path / "jr", cfg, w)
    sae = import_saelens(tmp_path / "jr")
    x = _x(n=100).astype(np.float64)
    h = x @ w["W_enc"] + w["b_enc"]
    f_ref = np.maximum(h, 0) * (h > w["threshold"])
    np.testing.assert_allclose(np.asarray(sae.encode(x.astype(np.float32))), f_ref, rtol=1e-4, atol=1e-4)

    for i, (field, value, match) in enumerate([
        ("normalize_activations", "expected_average_only_in", "fold"),
        ("normalize_activations", "layer_norm", "per-token"),
        ("architecture", "temporal", "not supported"),
    ]):
        bad = dict(cfg, **{field: value})
        _write_saelens_dir(tmp_path / f"bad{i}", bad, w)
        with pytest.raises(SAELensFormatError, match=match):
            import_saelens(tmp_path / f"bad{i}")
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        import_saelens(tmp_path / "nowhere")


def test_hook_name_mapping():
    for ours in ["resid_pre.0", "resid_mid.7", "resid_post.29", "attn_out.1", "mlp_out.2", "mlp_hidden.3"]:
        tl, layer = to_transformerlens_hook(ours)
        assert tl.startswith("blocks.") and layer == int(ours.split(".")[1])
        assert from_transformerlens_hook(tl) == ours
    assert from_transformerlens_hook("hook_embed") == "hook_embed"


def _fake_run(d, arch, l0_end, fvu_end, seed=0):
    from featureatlas.eval.metrics import density_histogram

    rng = np.random.default_rng(seed)
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"architecture": arch}))
    rows = []
    for step in range(1, 41):
        t = step / 40
        rows.append({"kind": "train", "step": step * 10, "tokens": step * 40960, "sae": d.name,
                     "loss": 2.0 * (1 - 0.8 * t) + 0.01 * rng.random(), "mse": 1.5 * (1 - 0.8 * t),
                     "l0": 200 * (1 - t) + l0_end * t, "fvu": 1 - (1 - fvu_end) * t, "dead_frac": 0.3 * (1 - t)})
    density = np.concatenate([10 ** rng.uniform(-5, -0.5, size=900), np.zeros(100)])
    rows.append({"kind": "eval", "step": 400, "tokens": 40 * 40960, "sae": d.name, "l0": l0_end, "fvu": fvu_end,
                 "log10_density_hist": density_histogram(density)})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plots_are_written(tmp_path):
    from featureatlas.saes.plots import plot_frontier, plot_run

    run = tmp_path / "run"
    for i, (arch, l0, fvu) in enumerate([("topk", 16, 0.3), ("topk", 32, 0.2), ("topk", 64, 0.12),
                                         ("relu", 40, 0.25), ("relu", 90, 0.15)]):
        _fake_run(run / f"{arch}_{l0}", arch, l0, fvu, seed=i)
    written = plot_run(run)
    assert len(written) == 5 * 2 + 1
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert (run / "frontier.png").exists() and (run / "topk_16" / "density_hist.png").exists()
    # summary rows work too
    out = plot_frontier([{"l0": 10, "fvu": 0.4, "sae": "a"}, {"l0": 20, "fvu": 0.3, "sae": "b"}], tmp_path / "f.png")
    assert out.stat().st_size > 5000
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(tmp_path / "empty_dir_that_does_not_exist")
