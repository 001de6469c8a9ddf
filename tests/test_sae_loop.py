"""The training loop: host reads only at log/checkpoint time, the optax schedule is the documented
formula, massive-activation tokens can be left out of training, the registry drives every architecture."""
import dataclasses
import json

import jax
import numpy as np
import pytest

from featureatlas.activation_store import ActivationStore
from featureatlas.activation_store.store import write_store
from featureatlas.saes import ARCHITECTURES, SAEConfig, SAETrainConfig
from featureatlas.saes.architectures import SAVED_FORMS, saelens_architecture
from featureatlas.saes.sources import ArrayBatches, StoreBatches
from featureatlas.saes import architectures as A
from featureatlas.saes.trainer import lr_schedule, saved_sae, train_saes, window_metrics


def test_metrics_stay_on_device_between_logs(tmp_path, monkeypatch):
    x = np.random.default_rng(0).normal(size=(4096, 16)).astype(np.float32)
    calls = []
    real = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda tree: calls.append(1) or real(tree))
    tcfg = SAETrainConfig(batch_size=64, total_tokens=64 * 60, log_every=20, checkpoint_every=0,
                          geometric_median_samples=0)
    result = train_saes([SAEConfig(width=32, k=4, hook_in="h")], tcfg, ArrayBatches({"h": x}), tmp_path,
                        progress=False)
    assert result.steps == 60
    assert len(calls) <= 10, f"{len(calls)} host reads for 60 steps"  # 3 logs x (check + metrics) + saving
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [20, 40, 60] and all(np.isfinite(r["loss"]) for r in rows)


@pytest.mark.parametrize("T,warm,frac", [(300, 10, 0.2), (1, 1, 0.2), (57, 5, 0.0), (40, 4, 0.9)])
def test_lr_schedule_is_warmup_times_decay(T, warm, frac):
    sched = lr_schedule(2e-3, T, warm, frac)
    t = np.arange(T + 2, dtype=np.float64)
    want = 2e-3 * np.minimum(1, (t + 1) / warm) * np.clip((T - t) / max(1.0, frac * T), 0, 1)
    got = np.array([float(sched(int(s))) for s in t])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)


def test_exclude_massive_tokens_from_training(tmp_path):
    n_ctx, T, d = 60, 10, 16
    rng = np.random.default_rng(3)
    acts = rng.normal(size=(n_ctx * T, d)).astype(np.float32)
    massive = [c * T + 1 for c in range(0, n_ctx, 10)]  # position 1 of every tenth context
    acts[massive] *= 60.0
    path = tmp_path / "s.h5"
    write_store(path, acts={"h": acts}, tokens=np.ones((n_ctx, T), np.int32), val_fraction=0.0)
    store = ActivationStore.open(path)
    tcfg = SAETrainConfig(batch_size=50, total_tokens=50 * 12, log_every=4, checkpoint_every=0,
                          geometric_median_samples=64, exclude_massive=True)
    cfg = SAEConfig(width=32, k=4, hook_in="h")
    source = StoreBatches(store, ["h"])
    train_saes([cfg], tcfg, source, tmp_path / "out", progress=False)
    rec = json.loads((tmp_path / "out" / "config.json").read_text())["data"]["massive_excluded"]
    assert rec["excluded_tokens"] == len(massive) and "median" in rec["rule"]
    kept = np.setdiff1d(store.token_rows("train", True), massive)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    want_scale = np.sqrt(d / np.mean(np.sum(acts[kept].astype(np.float64) ** 2, axis=1)))
    assert saved["input_scale"] == pytest.approx(want_scale, rel=1e-6)
    it = source.batches(50, 0, 0)
    seen = np.concatenate([np.asarray(next(it)["h"]) for _ in range(15)])  # more than one epoch
    it.close()
    assert np.linalg.norm(seen, axis=1).max() < 10 * np.sqrt(d)
    # Arrays: the same rule.
    arrays = ArrayBatches({"h": acts})
    assert arrays.exclude_massive()["excluded_tokens"] == len(massive)
    assert np.linalg.norm(np.asarray(next(arrays.batches(500, 0, 0))["h"]), axis=1).max() < 10 * np.sqrt(d)


def test_train_fvu_is_pooled_over_the_window_and_without_massive_tokens():
    """forward_loss sums the FVU parts (all rows, and rows below the massive threshold about their own mean);
    the log row divides the window's sums, as eval FVU is one ratio over all eval tokens."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    x[[3, 40]] *= 50.0
    cfg = SAEConfig(architecture="topk", d_in=8, width=32, k=4, hook_in="h", input_scale=1.0,
                    output_scale=1.0).validate()
    params, buffers = A.init_params(cfg, jax.random.key(0), np.zeros(8), np.zeros(8))
    thr = 10 * float(np.median(np.linalg.norm(x, axis=1)))
    _, stats = A.forward_loss(cfg, params, buffers, x, x, 0.0, massive_threshold=thr)
    err = np.sum((x - np.asarray(saved_sae(cfg, params, buffers).reconstruct(x), np.float64)) ** 2, axis=1)
    kept = np.linalg.norm(x, axis=1) <= thr
    assert kept.sum() == 62
    want = {"fvu_sse": err.sum(), "fvu_var": np.sum((x - x.mean(0)) ** 2),
            "fvu_sse_kept": err[kept].sum(), "fvu_var_kept": np.sum((x[kept] - x[kept].mean(0)) ** 2)}
    for key, value in want.items():
        assert float(stats[key]) == pytest.approx(value, rel=1e-4), key
    row = window_metrics({"fvu_sse": 3.0, "fvu_var": 6.0, "fvu_sse_kept": 1.0, "fvu_var_kept": 4.0, "l0": 8.0}, 2)
    assert row == {"fvu": 0.5, "fvu_excl_massive": 0.25, "l0": 4.0}
    assert window_metrics({"fvu_sse": 3.0, "fvu_var": 6.0}, 3) == {"fvu": 0.5}


def test_train_rows_log_fvu_excl_massive_when_massive_tokens_are_trained_on(tmp_path):
    n_ctx, T, d = 40, 10, 16
    acts = np.random.default_rng(2).normal(size=(n_ctx * T, d)).astype(np.float32)
    acts[[c * T + 1 for c in range(0, n_ctx, 5)]] *= 60.0
    write_store(tmp_path / "s.h5", acts={"h": acts}, tokens=np.ones((n_ctx, T), np.int32), val_fraction=0.0)
    store = ActivationStore.open(tmp_path / "s.h5")
    cfg = SAEConfig(width=32, k=4, hook_in="h")
    for excl in (False, True):
        tcfg = SAETrainConfig(batch_size=50, total_tokens=50 * 8, log_every=4, checkpoint_every=0,
                              geometric_median_samples=64, exclude_massive=excl)
        out = tmp_path / f"out{excl}"
        train_saes([cfg], tcfg, StoreBatches(store, ["h"]), out, progress=False)
        rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(("fvu_excl_massive" in r) is not excl and np.isfinite(r["fvu"]) for r in rows)
        if not excl:  # a different token rule, a different ratio
            assert all(r["fvu_excl_massive"] != r["fvu"] for r in rows)
    tcfg = dataclasses.replace(tcfg, exclude_massive=False)
    train_saes([cfg], tcfg, ArrayBatches({"h": acts}), tmp_path / "arrays", progress=False)  # no store: no threshold
    rows = [json.loads(r) for r in (tmp_path / "arrays" / "metrics.jsonl").read_text().splitlines()]
    assert rows and not any("fvu_excl_massive" in r for r in rows)


def test_registry_records_are_complete():
    for name, arch in ARCHITECTURES.items():
        assert arch.name == name
        cfg = SAEConfig(architecture=name, d_in=8, width=32, k=4, hook_in="h").validate()
        form = arch.saved_form(cfg)
        assert SAVED_FORMS[form.name] is form and saelens_architecture(cfg) == form.saelens_architecture
    for form in SAVED_FORMS.values():  # a SAELens import names the architecture that trains into its form
        assert ARCHITECTURES[form.name].form is form


def test_run_directory_from_before_run_json_resumes(tmp_path):
    """An out/ written by the earlier trainer (run_config.json, no run.json) resumes, and a change is listed."""
    from featureatlas.activation_store.errors import RunError

    x = np.random.default_rng(1).normal(size=(2048, 16)).astype(np.float32)
    tcfg = SAETrainConfig(batch_size=128, total_tokens=128 * 6, checkpoint_every=3, geometric_median_samples=64)
    cfg = SAEConfig(architecture="topk", width=64, k=4, hook_in="h")
    first = train_saes([cfg], tcfg, ArrayBatches({"h": x}), tmp_path, progress=False, stop_after=3)
    resolved = json.loads((tmp_path / "run.json").read_text())["settings"]["saes"]
    old_train = {k: v for k, v in tcfg.to_dict().items() if k != "exclude_massive"}
    (tmp_path / "run_config.json").write_text(json.dumps(
        {"saes": [{**s, "input_scale": 1.3, "output_scale": 1.3, "normalisation_folded": False} for s in resolved],
         "train": old_train, "source": "arrays"}))
    (tmp_path / "run.json").unlink()
    with pytest.raises(RunError, match=r"saes\.0\.k: 4 -> 8 \(set by --k\)"):
        train_saes([SAEConfig(architecture="topk", width=64, k=8, hook_in="h")], tcfg, ArrayBatches({"h": x}),
                   tmp_path, progress=False, resume=True)
    result = train_saes([cfg], tcfg, ArrayBatches({"h": x}), tmp_path, progress=False, resume=True)
    assert first.steps == 3 and result.steps == 6 and (tmp_path / "run.json").exists()
