"""Every dictionary kind satisfies the eval.Dictionary protocol, checked against direct computation
on tiny random models: SAEs of each architecture, transcoders, SAELens imports, SNMF (every
hierarchy level), DiffMeans, PCA and raw MLP neurons. All loaded through scripts.dictionaries."""
from __future__ import annotations

import numpy as np
import pytest

from featureatlas.activation_store.models import random_model
from featureatlas.eval.adapters import (DictionaryError, HierarchyLevelDictionary, NeuronDictionary,
                                        neuron_read_matrix, validate_dictionary, write_hook)
from featureatlas.eval.dictionary import Dictionary
from featureatlas.saes.config import SAEConfig
from featureatlas.saes.io import save_sae
from featureatlas.saes.saelens import export_saelens
from featureatlas.saes.sae import sae_from_params
from featureatlas.scripts.dictionaries import dictionary_info, load_dictionary, parse_spec

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def llama():
    return random_model("llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=48, vocab_size=300, seed=1)


@pytest.fixture(scope="module")
def gpt2():
    return random_model("gpt2", n_layers=2, d_model=32, n_heads=4, d_mlp=48, vocab_size=300, seed=2)


def capture(lm, hooks, seed=0):
    """Activations [N, d] per hook on a few random sequences."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(3, lm.config.vocab_size, size=(3, 12))
    toks[:, 0] = lm.config.bos_id
    _, acts = lm.forward(lm.params, toks, capture=tuple(hooks))
    return {h: np.asarray(a).reshape(-1, a.shape[-1]) for h, a in acts.items()}


def check_protocol(dic, lm, x_NxD):
    """Shapes, codes >= 0, validate_dictionary; returns (codes, x_hat, residual directions) as numpy."""
    assert isinstance(dic, Dictionary)
    validate_dictionary(dic, model=lm, d_in=x_NxD.shape[1])
    F = dic.n_features
    codes = np.asarray(dic.encode(x_NxD))
    assert codes.shape == (x_NxD.shape[0], F)
    assert (codes >= 0).all()
    x_hat = np.asarray(dic.decode(codes))
    assert x_hat.shape == (x_NxD.shape[0], lm.hook_dim(write_hook(dic)))
    R = np.asarray(dic.residual_directions(lm))
    assert R.shape == (F, lm.config.d_model)
    return codes, x_hat, R


def random_sae_params(cfg: SAEConfig, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    D, F, E = cfg.d_in, cfg.width, cfg.d_out
    W_dec = rng.standard_normal((F, E)).astype(np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    p = {"W_enc": rng.standard_normal((D, F)).astype(np.float32) / np.sqrt(D), "W_dec": W_dec,
         "b_dec": 0.1 * rng.standard_normal(E).astype(np.float32),
         "b_enc": 0.1 * rng.standard_normal(F).astype(np.float32),
         "threshold": np.full(F, 0.2, np.float32),
         "b_gate": 0.1 * rng.standard_normal(F).astype(np.float32),
         "r_mag": 0.1 * rng.standard_normal(F).astype(np.float32),
         "b_mag": 0.1 * rng.standard_normal(F).astype(np.float32)}
    return p


def numpy_encode(arch, p, x, k):
    if arch == "gated":
        proj = x @ p["W_enc"]
        return np.where(proj + p["b_gate"] > 0, np.maximum(proj * np.exp(p["r_mag"]) + p["b_mag"], 0), 0)
    pre = x @ p["W_enc"] + p["b_enc"]
    if arch == "relu":
        return np.maximum(pre, 0)
    if arch in ("jumprelu", "batchtopk"):
        return np.where(pre > p["threshold"], pre, 0)
    assert arch == "topk"
    out = np.zeros_like(pre)
    r = np.maximum(pre, 0)
    idx = np.argsort(-r, axis=1)[:, :k]
    np.put_along_axis(out, idx, np.take_along_axis(r, idx, 1), 1)
    return out


# ---- SAEs and transcoders ---------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu", "batchtopk", "gated"])
@pytest.mark.parametrize("hook", ["resid_post.0", "mlp_hidden.1"])
def test_sae_protocol(llama, tmp_path, arch, hook):
    x = capture(llama, [hook])[hook]
    d = x.shape[1]
    cfg = SAEConfig(architecture=arch, d_in=d, width=40, k=5, hook_in=hook, model_id=llama.model_id)
    p = random_sae_params(cfg)
    sae = sae_from_params(cfg, p)
    save_sae(sae, tmp_path / "sae")
    dic = load_dictionary(tmp_path / "sae")
    codes, x_hat, R = check_protocol(dic, llama, x)
    kept = {n: p[n] for n in sae.params}
    np.testing.assert_allclose(codes, numpy_encode(arch, kept, x, 5), **TOL)
    np.testing.assert_allclose(x_hat, codes @ p["W_dec"] + p["b_dec"], **TOL)
    W = llama.write_matrix(hook)
    want_R = p["W_dec"] if W is None else p["W_dec"] @ np.asarray(W)
    np.testing.assert_allclose(R, want_R, **TOL)
    assert dictionary_info(tmp_path / "sae", dic)["kind"] == "sae"


@pytest.mark.parametrize("hook_in,hook_out", [("resid_mid.0", "mlp_out.0"), ("resid_mid.1", "mlp_hidden.1")])
def test_transcoder_reads_one_hook_writes_another(llama, tmp_path, hook_in, hook_out):
    """A transcoder encodes hook_in activations and decodes into hook_out's space; its residual
    directions come from hook_out's write matrix (W_down for an mlp_hidden output)."""
    acts = capture(llama, [hook_in, hook_out])
    x = acts[hook_in]
    cfg = SAEConfig(architecture="relu", d_in=x.shape[1], d_out=acts[hook_out].shape[1], width=24,
                    hook_in=hook_in, hook_out=hook_out)
    p = random_sae_params(cfg, seed=3)
    save_sae(sae_from_params(cfg, p), tmp_path / "tc")
    dic = load_dictionary(tmp_path / "tc")
    assert dic.hook == hook_in and write_hook(dic) == hook_out
    codes, x_hat, R = check_protocol(dic, llama, x)
    np.testing.assert_allclose(codes, np.maximum(x @ p["W_enc"] + p["b_enc"], 0), **TOL)
    assert x_hat.shape[1] == llama.hook_dim(hook_out)
    np.testing.assert_allclose(x_hat, codes @ p["W_dec"] + p["b_dec"], **TOL)
    W = llama.write_matrix(hook_out)
    np.testing.assert_allclose(R, p["W_dec"] if W is None else p["W_dec"] @ np.asarray(W), **TOL)
    info = dictionary_info(tmp_path / "tc", dic)
    assert info["kind"] == "transcoder" and info["hook_out"] == hook_out


def test_saelens_import_through_loader(llama, tmp_path):
    hook = "resid_pre.1"
    x = capture(llama, [hook])[hook]
    cfg = SAEConfig(architecture="topk", d_in=x.shape[1], width=40, k=6, hook_in=hook)
    p = random_sae_params(cfg, seed=5)
    sae = sae_from_params(cfg, p)
    export_saelens(sae, tmp_path / "lens")
    dic = load_dictionary(tmp_path / "lens")
    codes, x_hat, R = check_protocol(dic, llama, x)
    np.testing.assert_allclose(codes, np.asarray(sae.encode(x)), **TOL)
    np.testing.assert_allclose(R, p["W_dec"], **TOL)


# ---- raw neurons -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_neurons_split_sign_reproduce_mlp_out(arch, llama, gpt2):
    """Split-sign neuron codes times the residual directions (W_down rows) give mlp_out exactly
    (minus GPT-2's down-projection bias): the neuron basis is where the MLP writes."""
    lm = llama if arch == "llama" else gpt2
    acts = capture(lm, ["mlp_hidden.1", "mlp_out.1"])
    h, out = acts["mlp_hidden.1"], acts["mlp_out.1"]
    dic = load_dictionary("neurons:mlp_hidden.1:split", dim=lm.hook_dim("mlp_hidden.1"))
    assert dic.n_features == 2 * lm.config.d_mlp
    codes, x_hat, R = check_protocol(dic, lm, h)
    np.testing.assert_allclose(codes[:, :lm.config.d_mlp], np.maximum(h, 0), **TOL)
    np.testing.assert_allclose(codes[:, lm.config.d_mlp:], np.maximum(-h, 0), **TOL)
    np.testing.assert_allclose(x_hat, h, **TOL)
    bias = np.asarray(lm.params["layers"][1]["b_down"]) if arch == "gpt2" else 0.0
    np.testing.assert_allclose(codes @ R + bias, out, rtol=1e-4, atol=1e-4)
    W_down = np.asarray(lm.params["layers"][1]["w_down"])
    np.testing.assert_array_equal(R[5], W_down[5])
    np.testing.assert_array_equal(R[lm.config.d_mlp + 5], -W_down[5])
    assert dic.neuron_of(lm.config.d_mlp + 5) == (5, -1)


def test_neurons_positive_part_default(llama):
    h = capture(llama, ["mlp_hidden.0"])["mlp_hidden.0"]
    dic = NeuronDictionary.for_model(llama, "mlp_hidden.0")
    assert dic.n_features == llama.config.d_mlp
    codes, x_hat, R = check_protocol(dic, llama, h)
    assert (h < 0).any()  # SwiGLU neurons are signed: the default keeps the positive part
    np.testing.assert_allclose(codes, np.maximum(h, 0), **TOL)
    np.testing.assert_allclose(x_hat, np.maximum(h, 0), **TOL)
    np.testing.assert_array_equal(R, np.asarray(llama.write_matrix("mlp_hidden.0")))
    assert dictionary_info("neurons:mlp_hidden.0", dic)["kind"] == "neurons"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_neuron_read_directions_match_hf_up_proj(arch, llama, gpt2):
    lm = llama if arch == "llama" else gpt2
    hf = lm.to_hf_tensors()
    up = hf["model.layers.1.mlp.up_proj.weight"] if arch == "llama" else hf["h.1.mlp.c_fc.weight"].T
    np.testing.assert_array_equal(np.asarray(neuron_read_matrix(lm, 1)), up)  # [d_mlp, d_model]
    if arch == "llama":
        np.testing.assert_array_equal(np.asarray(neuron_read_matrix(lm, 1, "gate")),
                                      hf["model.layers.1.mlp.gate_proj.weight"])
    else:
        with pytest.raises(DictionaryError, match="no gate"):
            neuron_read_matrix(lm, 1, "gate")
    dic = NeuronDictionary.for_model(lm, "mlp_hidden.1", split_sign=True)
    rd = np.asarray(dic.read_directions(lm))
    np.testing.assert_array_equal(rd[lm.config.d_mlp:], -up)


# ---- SNMF, hierarchy levels, DiffMeans, PCA -------------------------------------------------------

def test_snmf_diffmeans_pca_protocol(llama, tmp_path):
    from featureatlas.snmf.dictionary import DiffMeansDictionary, PCADictionary
    from featureatlas.snmf.encode import nnls_encode
    from featureatlas.activation_store.runs import publish_files
    from featureatlas.snmf import io

    def save_diffmeans(out, dic, cfg):
        publish_files(out, io.diffmeans_files(dic, cfg))

    def save_pca(out, dic, cfg):
        publish_files(out, io.pca_files(dic, cfg))

    save_snmf = io.save_snmf

    hook = "mlp_hidden.0"
    x = capture(llama, [hook])[hook]
    d = x.shape[1]
    rng = np.random.default_rng(0)
    Z = rng.standard_normal((d, 6)).astype(np.float32)
    save_snmf(str(tmp_path / "snmf"), Z, {"hook": hook})
    dic = load_dictionary(tmp_path / "snmf")
    codes, x_hat, R = check_protocol(dic, llama, x)
    Zn = Z / np.linalg.norm(Z, axis=0)
    np.testing.assert_allclose(codes, np.asarray(nnls_encode(x, Zn, n_iter=dic.nnls_iters)), **TOL)
    np.testing.assert_allclose(x_hat, codes @ Zn.T, **TOL)
    np.testing.assert_allclose(R, Zn.T @ np.asarray(llama.write_matrix(hook)), **TOL)
    assert dictionary_info(tmp_path / "snmf", dic)["kind"] == "snmf"

    dirs = rng.standard_normal((3, d)).astype(np.float32)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    save_diffmeans(str(tmp_path / "dm"), DiffMeansDictionary(hook, dirs, np.ones(3, np.float32), ("a", "b", "c")), {})
    dic = load_dictionary(tmp_path / "dm")
    codes, x_hat, R = check_protocol(dic, llama, x)
    np.testing.assert_allclose(codes, np.maximum(x @ dirs.T, 0), **TOL)
    np.testing.assert_allclose(R, dirs @ np.asarray(llama.write_matrix(hook)), **TOL)

    C = np.linalg.qr(rng.standard_normal((d, 4)))[0].T.astype(np.float32)
    mu = x.mean(0)
    save_pca(str(tmp_path / "pca"), PCADictionary(hook, C, mu, np.ones(4, np.float32)), {})
    dic = load_dictionary(tmp_path / "pca")
    codes, x_hat, R = check_protocol(dic, llama, x)
    proj = (x - mu) @ C.T
    np.testing.assert_allclose(codes, np.concatenate([np.maximum(proj, 0), np.maximum(-proj, 0)], 1), **TOL)
    np.testing.assert_allclose(x_hat, mu + proj @ C, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def snmf_tree(llama, tmp_path_factory):
    """A real `train-snmf --hierarchy 8 4 2` run on a tiny store of the random model's mlp_hidden.0."""
    from featureatlas.activation_store.store import write_store
    from featureatlas.snmf.solver import SNMFConfig
    from featureatlas.snmf.train import SNMFJobConfig, train

    tmp = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(1)
    toks = rng.integers(3, 300, size=(24, 16)).astype(np.int32)
    toks[:, 0] = 1
    _, acts = llama.forward(llama.params, toks, capture=("mlp_hidden.0",))
    a = np.asarray(acts["mlp_hidden.0"]).reshape(-1, llama.config.d_mlp)
    write_store(tmp / "store.h5", {"mlp_hidden.0": a}, toks, attrs={"model_id": llama.model_id})
    out = tmp / "snmf"
    train(SNMFJobConfig(store=str(tmp / "store.h5"), out=str(out), hook="mlp_hidden.0",
                      snmf=SNMFConfig(k=8, iters=30, p=0.2, init_sample=200), hierarchy=(8, 4, 2),
                      progress=False, vocab_features=0))
    return out, a


def test_snmf_hierarchy_every_level(llama, snmf_tree):
    from safetensors.numpy import load_file

    out, a = snmf_tree
    x = a[:40]
    base = load_dictionary(out)
    assert load_dictionary(f"{out}@level=0").n_features == base.n_features == 8
    t = load_file(str(out / "hierarchy.safetensors"))
    c0 = np.asarray(base.encode(x))
    want = c0
    for level, k in ((1, 4), (2, 2)):
        dic = load_dictionary(f"{out}@level={level}")
        assert isinstance(dic, HierarchyLevelDictionary) and dic.n_features == k
        assert load_dictionary(out, level=level).n_features == k
        codes, x_hat, R = check_protocol(dic, llama, x)
        want = want @ t[f"Y{level}_KxKprev"].T  # C_L = Y_L ... Y_1 Y_0 (per token: rows)
        np.testing.assert_allclose(codes, want, rtol=1e-4, atol=1e-5)
        Z = t[f"Z{level}_DxK"]
        np.testing.assert_allclose(x_hat, codes @ Z.T, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(R, Z.T @ np.asarray(llama.write_matrix("mlp_hidden.0")), rtol=1e-4, atol=1e-5)
        assert dictionary_info(f"{out}@{level}", dic)["level"] == level
    with pytest.raises(DictionaryError, match="levels are 0..2"):
        load_dictionary(f"{out}@level=3")


# ---- bad input ----------------------------------------------------------------------------------

def test_loader_and_validation_errors(llama, tmp_path):
    with pytest.raises(DictionaryError, match="not found"):
        load_dictionary(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DictionaryError, match="not a saved dictionary"):
        load_dictionary(tmp_path / "empty")
    with pytest.raises(DictionaryError, match="pass dim"):
        load_dictionary("neurons:mlp_hidden.0")
    with pytest.raises(DictionaryError, match="bad neurons spec"):
        load_dictionary("neurons:mlp_hidden.0:both", dim=4)
    with pytest.raises(DictionaryError, match="give one"):
        parse_spec("x@level=2", level=1)
    assert parse_spec("runs/a@3") == ("runs/a", 3)
    cfg = SAEConfig(architecture="relu", d_in=32, width=8, hook_in="resid_post.0")
    save_sae(sae_from_params(cfg, random_sae_params(cfg)), tmp_path / "sae")
    with pytest.raises(DictionaryError, match="hierarchy levels exist for SNMF"):
        load_dictionary(f"{tmp_path / 'sae'}@1")
    sae = load_dictionary(tmp_path / "sae")
    with pytest.raises(DictionaryError, match="dimensions differ"):
        validate_dictionary(sae, d_in=48)
    wrong = NeuronDictionary("mlp_hidden.0", 40)
    with pytest.raises(DictionaryError, match="wide"):
        validate_dictionary(wrong, model=llama)
    bad_hook = NeuronDictionary("mlp_hidden.7", 48)
    with pytest.raises(DictionaryError, match="does not exist"):
        validate_dictionary(bad_hook, model=llama)
    with pytest.raises(DictionaryError, match="not a Dictionary"):
        validate_dictionary(object())
