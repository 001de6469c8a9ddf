"""train-snmf as a run of the run layer: refusals that change nothing on disk, resume checks against the
store, old .npz checkpoints, partial stores (issue 8, items 1, 2 and 10 (a), (b), (d), (e))."""
from __future__ import annotations

import hashlib
import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featureatlas.snmf import io
from featureatlas.snmf.solver import SNMFState
from test_snmf_store import cfg_for, planted_store

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--hook", "mlp_hidden.0", "--k", "6", "--p", "0.03", "--iters", "8", "--vocab-features", "0",
         "--no-progress"]


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "featureatlas.scripts.cli", "train-snmf", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def sha256s(*paths: Path) -> dict[str, str]:
    """{file: sha256} of every file under the given paths (files or directories)."""
    out = {}
    for root in paths:
        for p in sorted([root] if root.is_file() else root.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, one clear message containing every needle, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-3000:])


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two stores of the same shape (n_ctx, T, d) with different data, and one finished run on the first."""
    tmp = tmp_path_factory.mktemp("snmf_runs")
    a, b = tmp / "a.h5", tmp / "b.h5"
    planted_store(a, n_ctx=16, seed=0)
    planted_store(b, n_ctx=16, seed=1)
    done = tmp / "done"
    proc = cli("--store", a, "--out", done, *QUICK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return a, b, done


def test_bad_k_into_an_earlier_result_deletes_nothing(stores):
    a, _, done = stores
    before = sha256s(done, a)
    for extra in ([], ["--overwrite"]):  # refused before --overwrite could delete anything
        refused(cli("--store", a, "--out", done, *QUICK, "--k", "500", *extra),
                "k=500 must be smaller than min(d, n)", "lower --k")
    refused(cli("--store", a, "--out", done, *QUICK), "already holds a train-snmf run", "--resume", "--overwrite")
    assert sha256s(done, a) == before


def test_fresh_run_after_a_kill_is_refused_and_resume_finishes(tmp_path, monkeypatch):
    train_mod = importlib.import_module("featureatlas.snmf.train")  # the module (the package exports `train`)

    store = tmp_path / "s.h5"
    planted_store(store, n_ctx=16)
    out = tmp_path / "killed"

    def killed(*_):  # dies after the fit and its checkpoints, while the result is being published
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "plot_loss", killed)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(cfg_for(store, out, k=6, p=0.03, iters=8, checkpoint_every=2))
    assert (out / "checkpoints").is_dir() and not (out / io.WEIGHTS).exists()
    before = sha256s(out)
    refused(cli("--store", store, "--out", out, *QUICK), "already holds a train-snmf run", "pass --resume")
    assert sha256s(out) == before
    monkeypatch.undo()
    proc = cli("--store", store, "--out", out, *QUICK, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["iterations"] == 8
    assert [r["iteration"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == list(
        range(1, 9))


def test_resume_with_another_store_of_the_same_shape_lists_the_differences(stores):
    a, b, done = stores
    before = sha256s(done, a, b)
    proc = cli("--store", b, "--out", done, *QUICK, "--resume")
    refused(proc, "cannot resume", "store_fingerprint", "(set by --store)", "another --out")
    assert "n_tokens" not in proc.stderr  # same shape: only the data differs
    assert sha256s(done, a, b) == before
    settings = json.loads((done / "run.json").read_text())["settings"]
    assert settings["hook"] == "mlp_hidden.0" and settings["snmf"]["k"] == 6 and settings["store_fingerprint"]
    results = json.loads((done / "results.json").read_text())
    assert "rel_error" in results and "k" not in results  # results apart from the requested settings


@pytest.mark.parametrize("flags, needle", [
    (["--iters", "0"], "--iters must be >= 1 (got 0)"),
    (["--chunk-size", "0"], "--chunk-size must be > 0 (got 0)"),
    (["--max-tokens", "0"], "--max-tokens must be > 0"),
    (["--p", "0"], "--p must be > 0"),
    (["--hierarchy", "4,8"], "strictly decreasing"),
], ids=["iters0", "chunk0", "max_tokens0", "p0", "ranks"])
def test_bad_settings_are_refused(stores, tmp_path, flags, needle):
    a, _, _ = stores
    refused(cli("--store", a, "--out", tmp_path / "o", *QUICK, *flags), needle)
    assert not (tmp_path / "o").exists()


def test_invalid_out_is_refused(stores, tmp_path):
    a, _, _ = stores
    file = tmp_path / "file.txt"
    file.write_text("keep me")
    refused(cli("--store", a, "--out", file, *QUICK), "exists and is not a directory")
    refused(cli("--store", a, "--out", file / "sub", *QUICK), "is not a directory")
    assert file.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_old_npz_checkpoint_is_refused_with_what_to_do(stores, tmp_path):
    """A run directory of an earlier featureatlas, killed mid-fit: checkpoint.npz as np.savez wrote it."""
    a, _, _ = stores
    out = tmp_path / "old"
    out.mkdir()
    k, d, n = 6, 128, 100
    state = SNMFState(np.zeros((k, d), np.float32), np.ones((k, n), np.float32), np.eye(k, dtype=np.float32),
                      np.float32(1.0), np.zeros((k, d), np.float32), np.ones((k, n), np.float32), np.float32(1.0),
                      np.int32(0))
    np.savez(out / "checkpoint.npz", signature=np.asarray([d, n, k, 4, 0, 0], np.int64), iteration=np.asarray(3),
             **{f: np.asarray(v) for f, v in zip(SNMFState._fields, state)})
    (out / "metrics.jsonl").write_text("".join(json.dumps({"iteration": i, "loss": 1.0}) + "\n" for i in (1, 2, 3)))
    before = sha256s(out)
    for extra in ([], ["--resume"]):
        refused(cli("--store", a, "--out", out, *QUICK, *extra), "old .npz format", "checkpoint.npz",
                "pass --overwrite")
    assert sha256s(out) == before
    proc = cli("--store", a, "--out", out, *QUICK, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "checkpoint.npz").exists() and io.load(str(out)).n_features == 6


def test_partial_store_warns_and_records_the_contexts_used(tmp_path, capsys):
    from featureatlas.activation_store.store import StoreWriter, create_store
    from featureatlas.snmf.train import train

    full = tmp_path / "full.h5"
    planted_store(full, n_ctx=32)
    from featureatlas.activation_store import ActivationStore
    src = ActivationStore.open(full)
    T = src.context_length
    partial = tmp_path / "partial.h5"
    create_store(partial, tokens_NxT=np.asarray(src.tokens), n_valid_N=np.asarray(src.n_valid),
                 doc_id_N=np.asarray(src.doc_ids), label_N=np.asarray(src.labels), label_names=(),
                 dims={"mlp_hidden.0": 128}, dtype="float32", attrs={"model_id": "synthetic"}, commit_contexts=8,
                 val_fraction=src.val_fraction, bos_id=1)
    rows = src.read_rows("mlp_hidden.0", np.arange(16 * T))
    writer = StoreWriter(partial)
    try:
        writer.commit(0, 8, {"mlp_hidden.0": rows[:8 * T]})
        writer.commit(8, 16, {"mlp_hidden.0": rows[8 * T:]})
    finally:
        writer.close()
    result = train(cfg_for(partial, tmp_path / "snmf", k=6, p=0.03, iters=5))
    err = capsys.readouterr().err
    assert "warning" in err and "16 of its 32 contexts" in err and "Resume the harvest" in err
    assert result["n_contexts"] == 16
    assert json.loads((tmp_path / "snmf" / "results.json").read_text())["n_contexts"] == 16
    assert json.loads((tmp_path / "snmf" / "run.json").read_text())["settings"]["n_contexts"] == 16
