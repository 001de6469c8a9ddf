"""SAE training on planted structure: dictionary recovery, unit-norm decoders, AuxK, transcoders."""
import json

import numpy as np
import pytest

from featureatlas.saes import SAEConfig, SAETrainConfig, load_sae
from featureatlas.saes.sources import ArrayBatches
from featureatlas.saes.trainer import train_saes


def planted(n, d, n_dirs, active, seed=0, subspace=None):
    """x = Σ_j c_j·u_j over `active` random unit directions u (of n_dirs), c ~ U(0.5, 2)."""
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(n_dirs, subspace or d))
    if subspace:
        basis = np.linalg.qr(rng.normal(size=(d, subspace)))[0]
        dirs = dirs @ basis.T
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    idx = np.stack([rng.choice(n_dirs, active, replace=False) for _ in range(n)])
    coef = rng.uniform(0.5, 2.0, size=(n, active))
    x = np.einsum("na,nad->nd", coef, dirs[idx])
    return x.astype(np.float32), dirs


def recovered(W_dec_FxD, dirs_NxD, threshold=0.9):
    W = W_dec_FxD / np.linalg.norm(W_dec_FxD, axis=1, keepdims=True)
    return float(((dirs_NxD @ W.T).max(axis=1) >= threshold).mean())


def test_planted_dictionary_recovered_by_topk_batchtopk_relu_in_one_pass(tmp_path):
    """1,024 unit directions in 128-d, 5 active per sample: each SAE finds >= 90% at cosine >= 0.9."""
    x, dirs = planted(60_000, 128, 1024, 5)
    tcfg = SAETrainConfig(batch_size=512, total_tokens=400_000, warmup_steps=50, log_every=100, checkpoint_every=0,
                       geometric_median_samples=2048)
    common = dict(width=2048, k=5, hook_in="acts", lr=3e-3, dead_tokens=100_000)
    cfgs = [SAEConfig(architecture="topk", **common), SAEConfig(architecture="batchtopk", **common),
            SAEConfig(architecture="relu", l1_coef=2.0, **common)]
    result = train_saes(cfgs, tcfg, ArrayBatches({"acts": x}), tmp_path, progress=False)
    for name, sae, d in zip(result.names, result.saes, result.dirs):
        W = np.asarray(sae.directions_FxD)
        assert recovered(W, dirs) >= 0.9, name
        np.testing.assert_allclose(np.linalg.norm(W, axis=1), 1.0, atol=1e-5)
        loaded = load_sae(d)
        np.testing.assert_array_equal(np.asarray(loaded.directions_FxD), W)
        rows = [json.loads(r) for r in (d / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] == tcfg.total_steps and rows[-1]["sae"] == name
        assert {"loss", "mse", "l0", "fvu", "dead_frac", "lr"} <= set(rows[-1])
    # TopK keeps exactly k latents per token; the BatchTopK inference threshold gives about k on average.
    topk, btk = result.saes[0], result.saes[1]
    assert (np.asarray(topk.encode(x[:2000])) > 0).sum(1).max() <= 5
    assert 3.5 <= (np.asarray(btk.encode(x[:2000])) > 0).sum(1).mean() <= 7.0


def test_auxk_revives_dead_latents(tmp_path):
    """Data in a 16-d subspace of 64-d with more planted directions than latents: latents that start
    pointing elsewhere lose every top-k race and die; AuxK (default coefficient 1/32) trains them on the
    residual until they fire again, so far fewer stay dead than without it."""
    x, _ = planted(20_000, 64, 256, 3, seed=1, subspace=16)
    tcfg = SAETrainConfig(batch_size=512, total_tokens=512 * 400, warmup_steps=10, log_every=25, checkpoint_every=0,
                       geometric_median_samples=1024)
    common = dict(architecture="topk", width=128, k=3, hook_in="acts", lr=2e-3, dead_tokens=512 * 20, k_aux=64)
    cfgs = [SAEConfig(auxk_coef=0.0, **common), SAEConfig(**common)]
    result = train_saes(cfgs, tcfg, ArrayBatches({"acts": x}), tmp_path, progress=False)
    rows = {n: [json.loads(r) for r in (d / "metrics.jsonl").read_text().splitlines()]
            for n, d in zip(result.names, result.dirs)}
    no_aux, with_aux = (rows[n] for n in result.names)
    assert max(r["dead_frac"] for r in with_aux) > 0.08  # the set-up does create dead latents
    assert no_aux[-1]["dead_frac"] > 0.08
    assert with_aux[-1]["dead_frac"] < 0.5 * no_aux[-1]["dead_frac"]
    assert with_aux[-1]["auxk"] > 0.0


def test_transcoder_learns_planted_linear_map(tmp_path):
    """hook_in carries sparse x (48-d), hook_out carries y = x·M (32-d): the transcoder predicts y."""
    x, dirs = planted(30_000, 48, 128, 3, seed=2)
    M = np.random.default_rng(3).normal(size=(48, 32)).astype(np.float32) / np.sqrt(48)
    y = x @ M
    tcfg = SAETrainConfig(batch_size=512, total_tokens=512 * 400, warmup_steps=20, log_every=50, checkpoint_every=0,
                       geometric_median_samples=1024)
    cfg = SAEConfig(architecture="topk", width=256, k=3, hook_in="mlp_in", hook_out="mlp_out", lr=3e-3,
                    dead_tokens=20_000)
    result = train_saes([cfg], tcfg, ArrayBatches({"mlp_in": x, "mlp_out": y}), tmp_path, progress=False)
    sae = load_sae(tmp_path)
    assert sae.hook == "mlp_in" and sae.hook_out == "mlp_out" and sae.config.d_out == 32
    x_test, _ = planted(2_000, 48, 128, 3, seed=2)  # same directions, fresh samples
    x_test = x_test[:2000]
    y_hat = np.asarray(sae(x_test))
    y_test = x_test @ M
    fvu = ((y_hat - y_test) ** 2).sum() / ((y_test - y_test.mean(0)) ** 2).sum()
    assert fvu < 0.1, fvu
    # The decoder rows point along the images M^T u of the planted input directions.
    images = dirs @ M
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    assert recovered(np.asarray(sae.directions_FxD), images, 0.9) >= 0.8
    assert result.steps == tcfg.total_steps


@pytest.mark.parametrize("arch,extra", [("jumprelu", {"l0_coef": 0.5}), ("gated", {"l1_coef": 5.0}),
                                        ("matryoshka", {"matryoshka_prefixes": (16, 64, 128)})])
def test_other_architectures_learn_a_sparse_code(tmp_path, arch, extra):
    """64 planted directions in 32-d, 2 active: a sparse, faithful code that finds most directions."""
    x, dirs = planted(20_000, 32, 64, 2, seed=4)
    tcfg = SAETrainConfig(batch_size=512, total_tokens=512 * 300, warmup_steps=10, log_every=50, checkpoint_every=0,
                       geometric_median_samples=1024)
    cfg = SAEConfig(architecture=arch, width=128, k=2, hook_in="a", lr=3e-3, dead_tokens=20_000, **extra)
    result = train_saes([cfg], tcfg, ArrayBatches({"a": x}), tmp_path, progress=False)
    row = result.last_metrics[result.names[0]]
    assert row["fvu"] < 0.2 and row["l0"] < 8, row
    assert recovered(np.asarray(result.saes[0].directions_FxD), dirs) >= 0.75
