"""Bad input gets a clear error, and a failed run leaves its checkpoints intact."""
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from featureatlas.activation_store import ActivationStore
from featureatlas.activation_store.store import write_store
from featureatlas.saes import SAEConfig, SAEConfigError, SAETrainConfig
from featureatlas.saes.sources import ArrayBatches, StoreBatches
from featureatlas.saes.trainer import NonFiniteBatchError, train_saes

ROOT = Path(__file__).resolve().parents[1]
HOOK = "resid_post.3"


def test_nan_in_store_stops_with_step_rows_and_hint_and_keeps_checkpoints(tmp_path):
    n_ctx, T, d = 40, 17, 16
    acts = np.random.default_rng(0).normal(size=(n_ctx * T, d)).astype(np.float32)
    bad_rows = [25 * T + 5, 25 * T + 6]  # two tokens of context 25
    acts[bad_rows[0], 3] = np.nan
    acts[bad_rows[1], 0] = np.inf
    store = write_store(tmp_path / "s.h5", acts={HOOK: acts}, tokens=np.ones((n_ctx, T), np.int32), val_fraction=0.0)
    source = StoreBatches(store, [HOOK])
    # The store's statistics already show the problem, before any training step:
    with pytest.raises(NonFiniteBatchError, match=r"mean squared norm of resid_post.3 is NaN/Inf.*contexts \[25\]"):
        train_saes([SAEConfig(architecture="topk", width=32, k=2, hook_in=HOOK)], SAETrainConfig(),
                   source, tmp_path / "early", progress=False)
    # With clean statistics (e.g. from before the bad rows were appended) the step that meets them stops.
    source.mean_sq_norm = lambda hook: float(d)
    tcfg = SAETrainConfig(batch_size=64, total_tokens=64 * 40, checkpoint_every=2, geometric_median_samples=0)
    cfg = SAEConfig(architecture="topk", width=32, k=2, hook_in=HOOK)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteBatchError) as err:
        train_saes([cfg], tcfg, source, out, progress=False)
    msg = str(err.value)
    assert "step" in msg and HOOK in msg and "Hint" in msg
    assert str(bad_rows[0]) in msg and str(bad_rows[1]) in msg and "contexts [25]" in msg
    failed_step = int(msg.split("batch of step ")[1].split()[0])
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager((out / "checkpoints").absolute())
    latest = manager.latest_step()
    assert latest is not None and latest <= failed_step
    # The checkpoint restores and holds finite numbers only.
    restored = manager.restore(latest, args=ocp.args.StandardRestore())
    manager.close()
    leaves = [np.asarray(v) for v in jax.tree.leaves(restored)]
    assert all(np.all(np.isfinite(v)) for v in leaves if v.dtype.kind == "f")
    assert not (out / "weights.safetensors").exists()


def test_store_width_k_and_architecture_errors(tmp_path):
    src = ArrayBatches({HOOK: np.ones((64, 16), np.float32)})
    tcfg = SAETrainConfig(batch_size=16, total_tokens=32, geometric_median_samples=0)
    with pytest.raises(SAEConfigError, match=r"d_in=32 but hook resid_post.3 has width 16"):
        train_saes([SAEConfig(d_in=32, width=64, hook_in=HOOK)], tcfg, src, tmp_path / "a", progress=False)
    with pytest.raises(SAEConfigError, match=r"k=80 must be in 1..width=64"):
        train_saes([SAEConfig(width=64, k=80, hook_in=HOOK)], tcfg, src, tmp_path / "b", progress=False)
    with pytest.raises(SAEConfigError, match=r"unknown SAE architecture 'vanilla'; choose one of relu, topk"):
        train_saes([SAEConfig(architecture="vanilla", width=64, hook_in=HOOK)], tcfg, src, tmp_path / "c",
                   progress=False)
    with pytest.raises(SAEConfigError, match=r"hook 'resid_post.9' is not in the data source"):
        train_saes([SAEConfig(width=64, hook_in="resid_post.9")], tcfg, src, tmp_path / "d", progress=False)


def test_cli_help_and_cli_errors(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "featureatlas.scripts.cli", "train-sae", "--help"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout
    for flag in ("--store", "--hook", "--hook-out", "--arch", "--width", "--expansion", "--k", "--l1", "--l0-coef",
                 "--tokens", "--batch-size", "--lr", "--mesh", "--out", "--resume", "--eval-every", "--seed", "--sae",
                 "--distributed"):
        assert flag in help_text
    rng = np.random.default_rng(0)
    write_store(tmp_path / "s.h5", acts={HOOK: rng.normal(size=(8 * 9, 16)).astype(np.float32)},
                tokens=np.ones((8, 9), np.int32))
    bad = subprocess.run([sys.executable, "-m", "featureatlas.scripts.cli", "train-sae", "--store", str(tmp_path / "s.h5"),
                          "--hook", HOOK, "--width", "32", "--k", "64", "--out", str(tmp_path / "o"), "--no-eval"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "k=64 must be in 1..width=32" in bad.stderr
    assert ActivationStore.open(tmp_path / "s.h5").dim(HOOK) == 16
