"""Sharded stores: `harvest --shard i/n` jobs write one file each; the directory reads as one store,
equal to the store one unsharded harvest writes (rows, tokens, split, batches, stats, training)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from featureatlas.activation_store.harvest import HarvestError, harvest
from featureatlas.activation_store.store import ActivationStore, StoreError
from featureatlas.scripts.cli import main as cli
from harvest_kill_helper import HOOKS, tiny_config, tiny_hf_dir, tiny_model

N_SHARDS = 3


@pytest.fixture(scope="module")
def lm():
    return tiny_model()


@pytest.fixture(scope="module")
def corpus_path(tmp_path_factory):
    """~90 contexts of 32 byte-tokens (labels alternate by document)."""
    rng = np.random.default_rng(1)
    words = "shards of one harvest read as a single store with the same rows and split".split()
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w") as fh:
        for i in range(30):
            fh.write(json.dumps({"text": " ".join(rng.choice(words, size=int(rng.integers(5, 60)))),
                                 "label": ["a", "b"][i % 2]}) + "\n")
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory, lm, corpus_path):
    """(one-file store, sharded store directory) of the same harvest."""
    root = tmp_path_factory.mktemp("stores")
    cfg = tiny_config(corpus_path, dtype="float32")
    harvest(cfg, root / "whole.h5", lm=lm, progress=False)
    for i in reversed(range(N_SHARDS)):  # any order
        harvest(cfg.replace(shard=f"{i}/{N_SHARDS}"), root / "sharded", lm=lm, progress=False)
    return root / "whole.h5", root / "sharded"


class _Stop(Exception):
    pass


def _harvest_one_commit(cfg, out, lm):
    """A harvest stopped right after its first commit (a partial store, as after a kill)."""
    def stop(name, index):
        if name == "committed" and index == 0:
            raise _Stop

    with pytest.raises(_Stop):
        harvest(cfg, out, lm=lm, progress=False, on_phase=stop)


def test_shards_read_as_the_unsharded_store(stores):
    whole, sharded = (ActivationStore.open(p) for p in stores)
    assert sorted(p.name for p in stores[1].iterdir() if p.suffix == ".h5") == [
        f"shard-{i:05d}-of-{N_SHARDS:05d}.h5" for i in range(N_SHARDS)]
    assert sharded.sharded and not whole.sharded and len(sharded.parts) == N_SHARDS
    assert sharded.n_contexts == whole.n_contexts and sharded.complete
    assert sharded.fingerprint == whole.fingerprint  # the whole corpus's fingerprint
    for name in ("tokens", "n_valid", "doc_ids", "labels"):
        assert np.array_equal(getattr(sharded, name), getattr(whole, name)), name
    for split in ("train", "val", "all"):
        assert np.array_equal(sharded.context_split(split), whole.context_split(split)), split
    assert sharded.context_split("val").any()
    for hook in HOOKS:
        rows = whole.token_rows("all", exclude_bos=False)
        assert np.array_equal(sharded.read_rows(hook, rows[::-1]), whole.read_rows(hook, rows[::-1]))
        assert all(np.array_equal(a, b) for a, b in zip(sharded.iter_chunks(hook, 50), whole.iter_chunks(hook, 50)))
        assert sharded.block_rows(hook) == whole.block_rows(hook)
        mean_s, sq_s = sharded.stats(hook)
        mean_w, sq_w = whole.stats(hook)
        np.testing.assert_allclose(mean_s, mean_w, rtol=1e-12, atol=1e-12)
        assert sq_s == pytest.approx(sq_w, rel=1e-12)
    assert np.array_equal(sharded.sample(HOOKS[0], 100, seed=3), whole.sample(HOOKS[0], 100, seed=3))
    with sharded.batches(list(HOOKS), 24, seed=5, start_step=2) as a, whole.batches(list(HOOKS), 24, seed=5,
                                                                                    start_step=2) as b:
        for _, x, y in zip(range(12), a, b):  # more than one epoch
            for h in HOOKS:
                assert np.array_equal(np.asarray(x[h]), np.asarray(y[h]))
    assert sharded.verify() == []
    summary = sharded.summary()
    assert summary["shards"] == N_SHARDS and summary["contexts"] == whole.n_contexts


@pytest.mark.parametrize("phase,arg", [("hook_written", 1), ("rows_flushed", 2)])
def test_sigkilled_shard_resumes_to_the_same_bytes(tmp_path, corpus_path, lm, phase, arg):
    import hashlib
    import subprocess
    import sys

    helper = Path(__file__).with_name("harvest_kill_helper.py")
    name = f"shard-00001-of-{N_SHARDS:05d}.h5"
    proc = subprocess.run([sys.executable, str(helper), str(corpus_path), str(tmp_path / "s"), phase, str(arg),
                           f"1/{N_SHARDS}"], cwd=helper.parent.parent, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr  # really killed
    assert ActivationStore.open(tmp_path / "s" / name).n_contexts == arg * 8
    # the float16 reference shard, written uninterrupted
    harvest(tiny_config(corpus_path, shard=f"1/{N_SHARDS}"), tmp_path / "ref", lm=lm, progress=False)
    harvest(tiny_config(corpus_path, shard=f"1/{N_SHARDS}"), tmp_path / "s", lm=lm, progress=False)
    sha = [hashlib.sha256((d / name).read_bytes()).hexdigest() for d in (tmp_path / "s", tmp_path / "ref")]
    assert sha[0] == sha[1]


def test_one_shard_alone_is_a_store_with_the_corpus_split(stores):
    whole = ActivationStore.open(stores[0])
    part = ActivationStore.open(stores[1] / f"shard-00001-of-{N_SHARDS:05d}.h5")
    a = int(part.attrs["context_offset"])
    assert a > 0 and part.verify() == []
    assert np.array_equal(part.tokens, whole.tokens[a:a + part.n_contexts])
    assert np.array_equal(part.context_split("val"), whole.context_split("val")[a:a + part.n_contexts])
    T = whole.context_length
    assert np.array_equal(part.read_rows(HOOKS[1], np.arange(part.n_contexts * T)),
                          whole.read_rows(HOOKS[1], np.arange(a * T, (a + part.n_contexts) * T)))


def test_partial_and_missing_shards(tmp_path, stores, lm, corpus_path):
    sharded = tmp_path / "s"
    shutil.copytree(stores[1], sharded)
    (sharded / f"shard-00001-of-{N_SHARDS:05d}.h5").unlink()
    with pytest.raises(StoreError, match=r"lacks shard\(s\) \[1\] of 3.*--shard 1/3"):
        ActivationStore.open(sharded)
    # a shard killed after its first commit contributes its committed contexts, with their own split
    cfg = tiny_config(corpus_path, dtype="float32", shard=f"1/{N_SHARDS}")
    _harvest_one_commit(cfg, sharded, lm)
    partial, whole = ActivationStore.open(sharded), ActivationStore.open(stores[0])
    assert not partial.complete and partial.n_contexts < whole.n_contexts
    keep = np.concatenate([np.arange(p.first_context, p.first_context + p.n_committed) for p in partial.parts])
    assert np.array_equal(partial.tokens, whole.tokens[keep])
    assert np.array_equal(partial.context_split("val"), whole.context_split("val")[keep])
    rows = (keep[:, None] * whole.context_length + np.arange(whole.context_length)).ravel()
    assert np.array_equal(partial.read_rows(HOOKS[0], np.arange(rows.size)), whole.read_rows(HOOKS[0], rows))
    partial.close()  # (one process: h5py will not reopen a file for writing while it is open for reading)
    harvest(cfg, sharded, lm=lm, progress=False)  # resumes that shard
    assert ActivationStore.open(sharded).complete


def test_shards_of_different_harvests_are_refused(tmp_path, stores, lm, corpus_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(stores[1], mixed)
    other = tmp_path / "other"
    harvest(tiny_config(corpus_path, dtype="float16", shard=f"2/{N_SHARDS}"), other, lm=lm, progress=False)
    shutil.copy(other / f"shard-00002-of-{N_SHARDS:05d}.h5", mixed)
    with pytest.raises(StoreError, match="not shard 2/3 of the same harvest.*dtype"):
        ActivationStore.open(mixed)
    (mixed / "shard-00000-of-00002.h5").write_bytes(b"")
    with pytest.raises(StoreError, match="mixes shards of"):
        ActivationStore.open(mixed)


def test_bad_shard_arguments(tmp_path, lm, corpus_path):
    for bad in ("3/3", "1", "-1/2", "a/b", "0/0"):
        with pytest.raises(StoreError, match="not of the form i/n"):
            harvest(tiny_config(corpus_path, shard=bad), tmp_path / "d", lm=lm, progress=False)
    with pytest.raises(HarvestError, match="with --shard --out is the directory"):
        harvest(tiny_config(corpus_path, shard="0/2"), tmp_path / "x.h5", lm=lm, progress=False)
    with pytest.raises(HarvestError, match="fewer than the 1000 shards"):
        harvest(tiny_config(corpus_path, shard="5/1000"), tmp_path / "d", lm=lm, progress=False)
    assert not (tmp_path / "d").exists() and not (tmp_path / "x.h5").exists()


def test_cli_sharded_harvest_then_train_sae_and_snmf_on_the_directory(tmp_path, corpus_path, capsys):
    model = tiny_hf_dir(tmp_path / "model")
    common = ["--model", str(model), "--corpus", str(corpus_path), "--context-length", "32", "--hooks", "resid_post.1",
              "--batch-size", "4", "--commit-contexts", "8", "--out", str(tmp_path / "store"), "--no-progress"]
    for i in range(2):
        assert cli(["harvest", *common, "--shard", f"{i}/2"]) == 0
    capsys.readouterr()
    assert cli(["store", "verify", str(tmp_path / "store")]) == 0
    assert "OK" in capsys.readouterr().out
    assert cli(["train-sae", "--store", str(tmp_path / "store"), "--hook", "resid_post.1", "--arch", "topk",
                "--k", "4", "--width", "64", "--tokens", "2048", "--batch-size", "64", "--out", str(tmp_path / "sae"),
                "--no-progress"]) == 0
    data = json.loads((tmp_path / "sae" / "config.json").read_text())["data"]
    assert data["store_complete"] and data["contexts_used"] == ActivationStore.open(tmp_path / "store").n_contexts
    assert cli(["train-snmf", "--store", str(tmp_path / "store"), "--hook", "resid_post.1", "--k", "8",
                "--iters", "3", "--out", str(tmp_path / "snmf")]) == 0


def test_a_store_written_before_the_shard_setting_resumes(tmp_path, lm, corpus_path):
    import h5py

    _harvest_one_commit(tiny_config(corpus_path), tmp_path / "s.h5", lm)
    with h5py.File(tmp_path / "s.h5", "r+") as f:  # as an older featureatlas wrote it
        settings = json.loads(f.attrs["harvest_config"])
        settings.pop("shard")
        f.attrs["harvest_config"] = json.dumps(settings)
    assert harvest(tiny_config(corpus_path), tmp_path / "s.h5", lm=lm, progress=False).store.complete
    with pytest.raises(HarvestError, match="names a file"):  # a one-file store is never resumed as a shard
        harvest(tiny_config(corpus_path, shard="0/1"), tmp_path / "s.h5", lm=lm, progress=False)
