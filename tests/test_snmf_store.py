"""SNMF on activation stores: train-snmf end to end, saved format, Dictionary protocol,
baselines, hierarchy, SIGKILL + resume, and (slow) the real model."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from featureatlas.activation_store.store import write_store
from featureatlas.snmf import io
from featureatlas.snmf.solver import SNMFConfig
from featureatlas.snmf.train import SNMFJobConfig, train

ROOT = Path(__file__).resolve().parents[1]


def planted_store(path, *, n_ctx=64, T=33, d=128, k=6, support=4, seed=0, n_labels=0, dtype=np.float32):
    """A store whose hook mlp_hidden.0 holds Z·Y + noise (BOS rows hold a huge decoy value)."""
    rng = np.random.default_rng(seed)
    Z = np.zeros((d, k), np.float32)
    for j in range(k):
        Z[rng.choice(d, support, replace=False), j] = rng.standard_normal(support)
    Z /= np.linalg.norm(Z, axis=0)
    n = n_ctx * T
    Y = np.zeros((k, n), np.float32)
    active = rng.integers(0, k, (2, n))
    Y[active[0], np.arange(n)] = rng.uniform(0.5, 1.5, n)
    Y[active[1], np.arange(n)] += rng.uniform(0.5, 1.5, n)
    X = (Z @ Y).T + 0.01 * rng.standard_normal((n, d)).astype(np.float32)
    X[::T] = 1000.0  # BOS rows: must be excluded from every fit
    tokens = rng.integers(3, 250, (n_ctx, T)).astype(np.int32)
    tokens[:, 0] = 1
    labels = rng.integers(0, n_labels, n_ctx) if n_labels else None
    write_store(path, {"mlp_hidden.0": X.astype(dtype)}, tokens, labels=labels,
                label_names=tuple(f"L{i}" for i in range(n_labels)),
                attrs={"model_id": "synthetic", "weights_hash": "none"},
                bos_id=1)
    return Z


def cfg_for(store, out, **kw) -> SNMFJobConfig:
    snmf = SNMFConfig(**{k: kw.pop(k) for k in list(kw) if k in SNMFConfig.__dataclass_fields__})
    return SNMFJobConfig(store=str(store), out=str(out), hook="mlp_hidden.0", snmf=snmf, vocab_features=0,
                         progress=False, **kw)


def best_cos(Z_est, Z_true):
    Zn = Z_est / np.maximum(np.linalg.norm(Z_est, axis=0), 1e-12)
    return np.abs(Zn.T @ Z_true).max(0)  # best match for every true feature


def test_train_snmf_saves_a_dictionary(tmp_path):
    from featureatlas.activation_store.models import random_model
    from featureatlas.eval.dictionary import Dictionary

    store = tmp_path / "s.h5"
    Z_true = planted_store(store)
    out = tmp_path / "snmf"
    result = train(cfg_for(store, out, k=6, p=0.03, iters=300, save_y=True))
    cfg = json.loads((out / "config.json").read_text())
    for key in ("method", "hook", "k", "p", "init", "iterations", "patience", "seed", "model_id",
                "store_fingerprint", "final_loss", "rel_error"):
        assert key in cfg, key
    from featureatlas.activation_store import ActivationStore
    n_train = len(ActivationStore.open(store).token_rows("train"))  # BOS and val contexts excluded
    assert cfg["method"] == "snmf" and cfg["n_tokens"] == n_train and cfg["model_id"] == "synthetic"
    assert cfg["rel_error"] < 0.2 and "relative reconstruction error" in result["summary"]
    assert (best_cos(io.load(str(out)).Z_DxK, Z_true) > 0.9).mean() >= 0.9
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == cfg["iterations"] and (out / "loss.png").stat().st_size > 1000

    dic = io.load(str(out))
    assert isinstance(dic, Dictionary) and dic.n_features == 6
    np.testing.assert_allclose(np.linalg.norm(np.asarray(dic.directions_FxD), axis=1), 1.0, rtol=1e-5)
    Yt, rows = io.load_codes(str(out))
    assert Yt.shape == (n_train, 6) and (Yt >= 0).all() and (rows % 33 != 0).all()
    # Z unit-normalised with Y rescaled: the product is the training reconstruction
    X = ActivationStore.open(store).read_rows("mlp_hidden.0", rows)
    rel = np.linalg.norm(X - np.asarray(dic.decode(Yt))) / np.linalg.norm(X)
    assert abs(rel - cfg["rel_error"]) < 1e-3
    codes = np.asarray(dic.encode(X[:100]))
    assert codes.shape == (100, 6) and (codes >= 0).all()

    lm = random_model("llama", d_mlp=128, d_model=64)
    R = np.asarray(dic.residual_directions(lm))
    assert R.shape == (6, 64)
    np.testing.assert_allclose(R, np.asarray(dic.directions_FxD) @ np.asarray(lm.write_matrix("mlp_hidden.0")),
                               rtol=1e-5, atol=1e-6)


def test_streaming_cli_matches_full_batch(tmp_path):
    from featureatlas.scripts.cli import main

    store = tmp_path / "s.h5"
    planted_store(store, dtype=np.float16)
    common = ["train-snmf", "--store", str(store), "--hook", "mlp_hidden.0", "--k", "6", "--p", "0.03",
              "--iters", "40", "--tol", "0", "--patience", "1000", "--vocab-features", "0", "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "full")]) == 0
    assert main(common + ["--out", str(tmp_path / "stream"), "--chunk-size", "300"]) == 0
    full = json.loads((tmp_path / "full" / "config.json").read_text())
    stream = json.loads((tmp_path / "stream" / "config.json").read_text())
    assert stream["solver"] == "streaming" and stream["iterations"] == 40
    assert abs(stream["final_loss"] - full["final_loss"]) <= 0.02 * full["final_loss"]
    np.testing.assert_allclose(io.load(str(tmp_path / "stream")).Z_DxK, io.load(str(tmp_path / "full")).Z_DxK,
                               atol=2e-3)


def test_cli_bad_input_is_a_clear_error(tmp_path, capsys):
    from featureatlas.scripts.cli import main

    store = tmp_path / "s.h5"
    planted_store(store, n_ctx=8)
    base = ["train-snmf", "--store", str(store), "--out", str(tmp_path / "o"), "--vocab-features", "0"]
    assert main(base + ["--hook", "mlp_hidden.0", "--p", "2"]) == 2
    assert "--p must be <= 1 (got 2.0)" in capsys.readouterr().err
    assert main(base + ["--hook", "mlp_hidden.0", "--k", "200"]) == 2
    assert "k=200 must be smaller than min(d, n)" in capsys.readouterr().err
    assert main(base + ["--hook", "resid_post.3"]) == 2
    assert "resid_post.3" in capsys.readouterr().err
    assert main(["train-snmf", "--store", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "o")]) == 2
    assert "no activation store" in capsys.readouterr().err
    assert main(base + ["--hook", "mlp_hidden.0", "--method", "diffmeans"]) == 2
    assert "label -1" in capsys.readouterr().err


def test_baselines_through_train(tmp_path):
    store = tmp_path / "s.h5"
    planted_store(store, n_labels=3)
    dm = train(cfg_for(store, tmp_path / "dm", method="diffmeans"))
    assert dm["n_features"] == 3 and dm["label_names"] == ["L0", "L1", "L2"]
    dic = io.load(str(tmp_path / "dm"))
    assert dic.directions_np.shape == (3, 128)
    pca = train(cfg_for(store, tmp_path / "pca", method="pca", k=6))
    dic = io.load(str(tmp_path / "pca"))
    assert pca["n_features"] == 12 and dic.n_features == 12 and pca["rel_error"] < 0.2


def test_hierarchy_tree_rule_and_export(tmp_path):
    from featureatlas.snmf.hierarchy import children_of

    Y = np.array([[1.0, 0.2, 0.1, 0.0, 0.5, 0.3],  # parent 0: 0.15·1.0 cut → 0, 4, 5, 1 (max 4)
                  [0.0, 0.0, 0.9, 0.1, 0.0, 0.0]])  # parent 1: 2 (0.1 < 0.135)
    assert children_of(Y) == [[0, 4, 5, 1], [2]]

    store = tmp_path / "s.h5"
    planted_store(store, k=8)
    out = tmp_path / "h"
    res = train(cfg_for(store, out, p=0.03, iters=200, hierarchy=(8, 4, 2)))
    tree = json.loads((out / "hierarchy.json").read_text())
    assert [lv["k"] for lv in tree["levels"]] == [8, 4, 2] and res["k"] == 8
    for lv_below, lv in zip(tree["levels"], tree["levels"][1:]):
        for feat in lv["features"]:
            assert len(feat["children"]) <= 4
            assert all(0 <= c < lv_below["k"] for c in feat["children"])
    top = tree["levels"][2]["features"][0]["top_tokens"]
    assert len(top) == 10 and all(t["index"] < 64 * 32 for t in top)
    assert [t["coef"] for t in top] == sorted((t["coef"] for t in top), reverse=True)
    from safetensors.numpy import load_file
    w = load_file(str(out / "hierarchy.safetensors"))
    assert w["Z1_DxK"].shape == (128, 4) and w["Y2_KxKprev"].shape == (2, 4)


@pytest.mark.parametrize("streaming", [False, True], ids=["full_batch", "streaming"])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, streaming):
    store = tmp_path / "s.h5"
    planted_store(store, n_ctx=320, T=65, d=256, k=16, support=6)
    extra = ["--chunk-size", "1024"] if streaming else ["--checkpoint-every", "1"]
    iters = 30 if streaming else 60
    args = ["train-snmf", "--store", str(store), "--hook", "mlp_hidden.0", "--k", "16", "--p", "0.02",
            "--iters", str(iters), "--tol", "0", "--patience", "100000", "--vocab-features", "0",
            "--no-progress", *extra]
    out = tmp_path / "killed"
    ckpt = out / "checkpoints"  # orbax: one folder per saved step, renamed into place when complete
    proc = subprocess.Popen([sys.executable, "-m", "featureatlas.scripts.cli", *args, "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_at = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists():
            it = max((int(p.name) for p in ckpt.iterdir() if p.name.isdigit()), default=0)
            if it >= 3:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = it
                break
        time.sleep(0.005)
    proc.wait()
    assert killed_at is not None and killed_at < iters, proc.stderr.read().decode()[-2000:]
    assert not (out / "weights.safetensors").exists()

    from featureatlas.scripts.cli import main
    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    a = json.loads((out / "config.json").read_text())
    b = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert a["iterations"] == b["iterations"] == iters
    assert a["final_loss"] == b["final_loss"]  # resumed = uninterrupted, bit for bit
    np.testing.assert_array_equal(io.load(str(out)).Z_DxK, io.load(str(tmp_path / "straight")).Z_DxK)
    its = [json.loads(ln)["iteration"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert its == list(range(1, iters + 1))


@pytest.mark.slow
def test_real_model_small_store(tmp_path, smollm2):
    """k = 20 on mlp_hidden.15 of a few BBC contexts run through SmolLM2-135M."""
    from featureatlas.activation_store import CorpusConfig, HarvestConfig, harvest
    from featureatlas.snmf.train import vocab_proj

    store = tmp_path / "bbc.h5"
    hc = HarvestConfig(model="smollm2-135m", hooks=("mlp_hidden.15",),
                       corpus=CorpusConfig(source="bbc", context_length=64, max_documents=40, max_contexts=24))
    harvest(hc, str(store), lm=smollm2, progress=False)
    out = tmp_path / "snmf"
    res = train(SNMFJobConfig(store=str(store), out=str(out), hook="mlp_hidden.15",
                              snmf=SNMFConfig(k=20, iters=60), vocab_features=0, progress=False))
    assert 0 < res["rel_error"] < 1
    dic = io.load(str(out))
    R = np.asarray(dic.residual_directions(smollm2))
    assert dic.directions_FxD.shape == (20, 1536) and R.shape == (20, 576) and np.isfinite(R).all()
    toks = vocab_proj(dic, smollm2, range(3))
    assert len(toks) == 3 and all(len(t) == 10 and all(isinstance(s, str) for s in t) for t in toks)
