"""Checkpoints: a train-sae run killed with SIGKILL and resumed ends where the uninterrupted run ends;
resuming with other settings is refused with the differences listed."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from featureatlas.activation_store.store import write_store
from featureatlas.saes import SAEConfig, SAETrainConfig
from featureatlas.saes.sources import ArrayBatches
from featureatlas.activation_store.errors import RunError
from featureatlas.saes.trainer import train_saes

ROOT = Path(__file__).resolve().parents[1]
HOOK = "resid_post.0"


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    n_ctx, T, d = 96, 33, 32
    dirs = rng.normal(size=(64, d))
    codes = rng.uniform(0.5, 2.0, size=(n_ctx * T, 64)) * (rng.random((n_ctx * T, 64)) < 0.06)
    acts = (codes @ dirs).astype(np.float32)
    path = tmp_path_factory.mktemp("store") / "store.h5"
    write_store(path, acts={HOOK: acts}, tokens=rng.integers(3, 200, size=(n_ctx, T)), attrs={"model_id": "synthetic"})
    return path


def _cmd(store, out, *extra):
    return [sys.executable, "-m", "featureatlas.scripts.cli", "train-sae", "--store", str(store), "--hook", HOOK,
            "--sae", "arch=topk,k=4,width=128", "--sae", "arch=batchtopk,k=4,width=96",
            "--tokens", str(128 * 300), "--batch-size", "128", "--checkpoint-every", "10", "--log-every", "5",
            "--dead-tokens", "2000", "--warmup-steps", "10", "--lr", "2e-3",
            "--out", str(out), "--no-eval", "--no-progress", *extra]


def _weights(out):
    return {d.name: load_file(str(d / "weights.safetensors")) for d in sorted(Path(out).iterdir())
            if (d / "weights.safetensors").exists()}


def test_sigkill_then_resume_equals_uninterrupted(store_path, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cmd(store_path, full), cwd=ROOT, check=True, capture_output=True, timeout=600)

    proc = subprocess.Popen(_cmd(store_path, killed), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = killed / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.exists() else []
        if steps and max(steps) >= 40:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not _weights(killed)  # killed before the end: no SAE was saved yet

    resumed = subprocess.run(_cmd(store_path, killed, "--resume"), cwd=ROOT, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _weights(full), _weights(killed)
    assert a.keys() == b.keys() and len(a) == 2
    for name in a:
        for p in a[name]:
            np.testing.assert_allclose(b[name][p], a[name][p], rtol=1e-5, atol=1e-6, err_msg=f"{name}/{p}")
    # The logs line up too: the rows written after the last checkpoint were dropped and redone.
    for name in a:
        rows_a = [json.loads(r) for r in (full / name / "metrics.jsonl").read_text().splitlines()]
        rows_b = [json.loads(r) for r in (killed / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
        np.testing.assert_allclose([r["loss"] for r in rows_b], [r["loss"] for r in rows_a], rtol=1e-4)


def test_resume_with_changed_config_is_refused_with_a_diff(tmp_path):
    x = np.random.default_rng(1).normal(size=(2048, 16)).astype(np.float32)
    tcfg = SAETrainConfig(batch_size=128, total_tokens=128 * 6, checkpoint_every=3, geometric_median_samples=256)
    cfg = SAEConfig(architecture="topk", width=64, k=4, hook_in="h")
    train_saes([cfg], tcfg, ArrayBatches({"h": x}), tmp_path, progress=False, stop_after=3)
    with pytest.raises(RunError, match="--resume"):
        train_saes([cfg], tcfg, ArrayBatches({"h": x}), tmp_path, progress=False)
    changed = SAEConfig(architecture="topk", width=64, k=8, hook_in="h", lr=1e-3)
    with pytest.raises(RunError) as err:
        train_saes([changed], tcfg, ArrayBatches({"h": x}), tmp_path, progress=False, resume=True)
    assert "saes.0.k: 4 -> 8" in str(err.value) and "saes.0.lr: 0.002 -> 0.001" in str(err.value)
    # Logging-only settings may change; the run then finishes from its checkpoint.
    relaxed = SAETrainConfig(**{**tcfg.to_dict(), "log_every": 1})
    result = train_saes([cfg], relaxed, ArrayBatches({"h": x}), tmp_path, progress=False, resume=True)
    assert result.steps == 6
