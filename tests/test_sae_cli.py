"""train-sae as a new user runs it: every bad input is refused before anything on disk changes, with a
message that names the problem and the fix and no traceback; a partial store is used with a warning and
recorded; a failed run leaves no output directory; saved weights are world-readable."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featureatlas.activation_store.store import StoreWriter, create_store, write_store
from featureatlas.saes import SAEConfig, SAETrainConfig, StoreBatches, train_saes

ROOT = Path(__file__).resolve().parents[1]
HOOK = "resid_post.0"
N_CTX, T, D = 40, 9, 16


def _acts(seed=0):
    return np.random.default_rng(seed).normal(size=(N_CTX * T, D)).astype(np.float32)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "s.h5"
    write_store(path, acts={HOOK: _acts()}, tokens=np.ones((N_CTX, T), np.int32), attrs={"model_id": "synthetic"})
    return path


def _cli(store, out, *extra):
    cmd = [sys.executable, "-m", "featureatlas.scripts.cli", "train-sae", "--store", str(store), "--hook", HOOK,
           "--width", "32", "--k", "4", "--tokens", "640", "--batch-size", "64", "--no-eval", "--no-progress",
           "--out", str(out), *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _tree(*roots):
    """{path: sha256} of every file under the given roots (directories listed too)."""
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


CASES = [
    (["--lr", "0"], ["--lr must be > 0"]),
    (["--lr=-1e-3"], ["--lr must be > 0"]),
    (["--tokens", "0"], ["--tokens must be > 0"]),
    (["--tokens=-5"], ["--tokens must be > 0"]),
    (["--width", "0"], ["--width must be > 0"]),
    (["--l1=-1"], ["--l1 must be >= 0"]),
    (["--k-aux", "100"], ["--k-aux 100 is larger than the width 32", "--k-aux <= --width"]),
    (["--batch-size", "0"], ["--batch-size must be > 0"]),
    (["--sae", "arch=topk,l2=3"], ["unknown setting 'l2'", "did you mean"]),
    (["--mesh", "data=0"], ["--mesh must look like data=2,feature=4"]),
]


@pytest.mark.parametrize("extra,words", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_flags_are_refused_before_any_change(store, tmp_path, extra, words):
    out = tmp_path / "out"
    before = _tree(tmp_path, store.parent)
    proc = _cli(store, out, *extra)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr
    assert _tree(tmp_path, store.parent) == before
    assert not out.exists()


def test_bad_output_paths_are_refused(store, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    before = _tree(tmp_path, store.parent)
    for out, words in ((tmp_path / "file", "exists and is not a directory"),
                       (tmp_path / "file" / "sub", "is not a directory; choose a path under a directory")):
        proc = _cli(store, out)
        assert proc.returncode == 2 and words in proc.stderr and "--out" in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        before = _tree(tmp_path, store.parent)
        proc = _cli(store, locked / "out")
        assert proc.returncode == 2 and "no permission" in proc.stderr and "Traceback" not in proc.stderr
    assert _tree(tmp_path, store.parent) == before


def test_fresh_run_after_a_kill_is_refused_and_resume_finishes(store, tmp_path):
    out = tmp_path / "out"
    from featureatlas.activation_store import ActivationStore

    src = StoreBatches(ActivationStore.open(store), [HOOK], aligned=False)
    cfg = SAEConfig(architecture="topk", width=32, k=4, hook_in=HOOK)
    tcfg = SAETrainConfig(batch_size=64, total_tokens=640, checkpoint_every=2, log_every=2)
    train_saes([cfg], tcfg, src, out, progress=False, stop_after=4)  # as if killed after step 4
    before = _tree(tmp_path, store.parent)
    proc = _cli(store, out, "--checkpoint-every", "2", "--log-every", "2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "already holds a train-sae run; pass --resume" in proc.stderr
    assert _tree(tmp_path, store.parent) == before
    proc = _cli(store, out, "--checkpoint-every", "2", "--log-every", "2", "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert oct((out / "weights.safetensors").stat().st_mode & 0o777) == "0o644"
    assert json.loads((out / "run.json").read_text())["job"] == "train-sae"


def test_partial_store_warns_and_records_the_contexts_used(tmp_path):
    path = tmp_path / "partial.h5"
    acts = _acts(1)
    create_store(path, tokens_NxT=np.ones((N_CTX, T), np.int32), n_valid_N=np.full(N_CTX, T, np.int32),
                 doc_id_N=np.arange(N_CTX), label_N=np.full(N_CTX, -1, np.int32), label_names=(), dims={HOOK: D},
                 dtype="float32", attrs={"model_id": "synthetic"}, commit_contexts=8, val_fraction=0.05)
    writer = StoreWriter(path, fsync=False)
    for c0 in range(0, 24, 8):  # a harvest killed after 24 of 40 contexts
        writer.commit(c0, c0 + 8, {HOOK: acts[c0 * T:(c0 + 8) * T]})
    writer.close()
    out = tmp_path / "sae"
    proc = _cli(path, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "partial: 24 of 40 planned contexts" in proc.stderr and "Re-run the same harvest" in proc.stderr
    data = json.loads((out / "config.json").read_text())["data"]
    assert data["contexts_used"] == 24 and data["contexts_planned"] == 40 and data["store_complete"] is False
    assert json.loads((out / "results.json").read_text())["data"]["contexts_used"] == 24


def test_failed_run_leaves_no_output_directory(tmp_path):
    path = tmp_path / "nan.h5"
    acts = _acts(2)
    acts[5 * T + 3, 0] = np.nan
    write_store(path, acts={HOOK: acts}, tokens=np.ones((N_CTX, T), np.int32), val_fraction=0.0)
    out = tmp_path / "deep" / "out"
    proc = _cli(path, out)
    assert proc.returncode == 2 and "NaN/Inf" in proc.stderr and "re-harvest" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
