"""SAELens interop against fixtures written by the real sae-lens package (no torch needed here).

tests/fixtures/saelens/ is made by scripts/make_saelens_fixtures.py (sae-lens 6.54, see its
docstring); each case holds SAELens's saved directory and SAELens's own encode/decode of a batch.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from featureatlas.activation_store.errors import FeatureAtlasError
from featureatlas.saes import SAEConfig, sae_from_params
from featureatlas.saes.saelens import SAELensFormatError, export_saelens, import_saelens
from featureatlas.saes.sae import param_names

ROOT = Path(__file__).parent / "fixtures" / "saelens"
MANIFEST = json.loads((ROOT / "MANIFEST.json").read_text())
CASES = MANIFEST["cases"]
RTOL = 1e-5


def _ref(name):
    with np.load(ROOT / name / "reference.npz") as z:
        return {k: z[k] for k in z.files}


def _close(got, want):
    """Relative agreement: |got - want| <= RTOL·|want| + RTOL·max|want|."""
    got = np.asarray(got, np.float64)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * max(float(np.max(np.abs(want))), 1e-12))


def _l0(codes):
    return float(np.mean(np.sum(np.asarray(codes) != 0, axis=1)))


def test_fixtures_are_small_and_from_saelens_6():
    size = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file())
    assert size < 1_000_000, size
    assert MANIFEST["sae_lens_version"].startswith("6.")
    assert {"standard", "topk", "jumprelu", "gated", "batchtopk_training", "matryoshka_batchtopk_training",
            "resaved_topk_k2"} <= set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_import_computes_what_saelens_computes(name):
    info, ref = CASES[name], _ref(name)
    sae = import_saelens(ROOT / name)
    assert sae.config.architecture == info["featureatlas_architecture"]
    codes = np.asarray(sae.encode(ref["x"]))
    assert np.array_equal(codes != 0, ref["codes"] != 0)  # the same latents fire, token by token
    assert _l0(codes) == pytest.approx(info["l0"], abs=1e-9)
    _close(codes, ref["codes"])
    _close(sae.decode(ref["codes"]), ref["recon"])
    _close(sae.decode(codes), ref["recon"])
    if info.get("transcoder"):
        assert sae.hook == "resid_post.2" and sae.hook_out == "mlp_out.2"
        assert sae.config.d_out == MANIFEST["d_out_transcoder"]
    else:
        assert sae.hook == ("resid_pre.5" if name == "resaved_relu_hook" else "resid_post.2")


@pytest.mark.parametrize("name", ["batchtopk_training", "matryoshka_batchtopk_training"])
def test_batchtopk_training_checkpoint_folds_the_decoder_norm(name):
    """SAELens's BatchTopK training checkpoint keeps W_dec unnormalised and thresholds h·‖W_dec_i‖
    (rescale_acts_by_decoder_norm, its default); the import folds the norms as SAELens does when it
    saves the inference model, so the L0 is SAELens's and not that of the unscaled h."""
    info, ref = CASES[name], _ref(name)
    assert info["saelens_architecture"] in ("batchtopk", "matryoshka_batchtopk")
    assert info["rescale_acts_by_decoder_norm"] and info["inference_architecture"] == "jumprelu"
    cfg = json.loads((ROOT / name / "cfg.json").read_text())
    assert cfg["rescale_acts_by_decoder_norm"] is True and cfg["architecture"] == info["saelens_architecture"]
    sae = import_saelens(ROOT / name)
    codes = np.asarray(sae.encode(ref["x"]))
    assert _l0(codes) == pytest.approx(info["l0"], abs=1e-9)
    np.testing.assert_allclose(np.asarray(sae.params["threshold"]), info["topk_threshold"], rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(sae.params["W_dec"]), axis=1), 1.0, rtol=1e-5)
    # The training-mode encode (batch top-k over this batch) keeps k per token on average; the
    # learnt threshold gives a comparable L0 at inference.
    assert _l0(ref["codes_train"]) == pytest.approx(info["k"], abs=1e-9)
    assert 0.5 * info["k"] < _l0(codes) < 2 * info["k"]


def test_resaved_unedited_export_restores_the_featureatlas_config():
    name = "resaved_batchtopk_unedited"
    sae = import_saelens(ROOT / name)
    original = CASES[name]["featureatlas_config"]
    assert sae.config == SAEConfig.from_dict(original)
    assert sae.config.architecture == "batchtopk" and sae.config.store_fingerprint == "fixture-fa_batchtopk"


def test_resaved_export_with_edited_k_imports_the_new_k():
    name = "resaved_topk_k2"
    assert CASES[name]["featureatlas_config"]["k"] == 5  # the stale embedded value
    sae = import_saelens(ROOT / name)
    assert sae.config.architecture == "topk" and sae.config.k == 2
    assert _l0(sae.encode(_ref(name)["x"])) == 2.0


def test_resaved_export_with_edited_weights_or_hook_imports_the_edit():
    thr = import_saelens(ROOT / "resaved_batchtopk_threshold_x3")
    # The weights changed (digest mismatch): a plain SAELens JumpReLU with the new thresholds.
    assert thr.config.architecture == "jumprelu"
    np.testing.assert_allclose(np.asarray(thr.params["threshold"]), 3 * 0.4, rtol=1e-6)
    hook = import_saelens(ROOT / "resaved_relu_hook")
    assert hook.hook == "resid_pre.5" and hook.config.architecture == "relu"


def test_cfg_edited_by_hand_falls_back_to_the_plain_import(tmp_path):
    """The fallback does not depend on SAELens having rewritten the file: any deciding field."""
    src = ROOT / "resaved_batchtopk_unedited"

    def edited(tag, edit):
        d = tmp_path / tag
        d.mkdir()
        cfg = json.loads((src / "cfg.json").read_text())
        edit(cfg)
        (d / "cfg.json").write_text(json.dumps(cfg))
        (d / "sae_weights.safetensors").write_bytes((src / "sae_weights.safetensors").read_bytes())
        return import_saelens(d)

    # Rewriting a field with the value it already had, or a field that changes nothing, keeps ours.
    same = edited("same", lambda c: c.update(d_sae=32, architecture="jumprelu", dtype="float32"))
    assert same.config.architecture == "batchtopk"
    assert edited("device", lambda c: c.update(device="cuda")).config.architecture == "batchtopk"
    # A deciding field that differs: the plain SAELens reading.
    plain = edited("b_dec", lambda c: c.update(apply_b_dec_to_input=True))
    assert plain.config.architecture == "jumprelu"
    plain = edited("model", lambda c: c["metadata"].update(model_name="other-model"))
    assert plain.config.architecture == "jumprelu" and plain.config.model_id == "other-model"


def test_negative_threshold_jumprelu_import_uses_saelens_relu_semantics():
    """SAELens computes relu(h)·1[h > θ]: the import clamps θ at 0, so codes are never negative."""
    name = "jumprelu_negative_threshold"
    info, ref = CASES[name], _ref(name)
    assert info["n_negative_thresholds"] > 0 and info["negative_codes_without_relu"] > 0
    sae = import_saelens(ROOT / name)
    assert float(np.min(np.asarray(sae.params["threshold"]))) == 0.0
    codes = np.asarray(sae.encode(ref["x"]))
    assert codes.min() >= 0 and ref["codes"].min() >= 0
    _close(codes, ref["codes"])


def _jumprelu_sae(threshold_F):
    rng = np.random.default_rng(0)
    D, F = 8, len(threshold_F)
    cfg = SAEConfig(architecture="jumprelu", d_in=D, width=F, k=2, hook_in="resid_post.1")
    shapes = {"W_enc": (D, F), "W_dec": (F, D), "b_dec": (D,)}
    params = {n: rng.normal(size=shapes.get(n, (F,))).astype(np.float32) for n in param_names(cfg)}
    params["threshold"] = np.asarray(threshold_F, np.float32)
    return sae_from_params(cfg, params)


def test_negative_threshold_export_is_refused_before_writing(tmp_path):
    sae = _jumprelu_sae([0.3, -0.2, 0.1, -0.5])
    with pytest.raises(SAELensFormatError, match=r"2 of 4 JumpReLU thresholds are negative.*max\(θ, 0\)") as e:
        export_saelens(sae, tmp_path / "out")
    assert isinstance(e.value, FeatureAtlasError) and isinstance(e.value, ValueError)
    assert not (tmp_path / "out").exists()
    # The fix the message names: clamped thresholds export, and SAELens's semantics is then ours.
    clamped = _jumprelu_sae([0.3, 0.0, 0.1, 0.0])
    back = import_saelens(export_saelens(clamped, tmp_path / "ok"))
    x = np.random.default_rng(1).normal(size=(32, 8)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(back.encode(x)), np.asarray(clamped.encode(x)))
    assert np.asarray(back.encode(x)).min() >= 0


def test_saelens_format_error_is_a_featureatlas_error():
    assert issubclass(SAELensFormatError, FeatureAtlasError) and issubclass(SAELensFormatError, ValueError)
