"""cache / describe / catalog as a user runs them: a real SIGKILL during the cache pass then --resume
equals an uninterrupted pass; bad inputs exit 2 with one line naming the problem and the fix, no
traceback, nothing written and the store unchanged."""
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cli(*argv, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "featureatlas.scripts.cli", *map(str, argv)], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout, env=env)


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from harvest_kill_helper import tiny_hf_dir

    tmp = tmp_path_factory.mktemp("cli")
    model = tiny_hf_dir(tmp / "tiny-llama")
    words = "the a model store reads writes every token of text and keeps its label on disk".split()
    rng = np.random.default_rng(0)
    corpus = tmp / "docs.txt"
    corpus.write_text(" ".join(rng.choice(words, size=2500)))
    store = tmp / "store.h5"
    r = _cli("harvest", "--model", model, "--corpus", corpus, "--hooks", "mlp_hidden.1", "--context-length", "16",
             "--max-tokens", "100000", "--out", store, "--no-progress")
    assert r.returncode == 0, r.stderr
    return tmp, model, store


def _cache_args(store, out, *extra):
    return ["cache", "--store", store, "--dictionary", "neurons:mlp_hidden.1", "--out", out, "--no-progress",
            "--contexts-per-chunk", "2", "--hist-stride", "1", *extra]


def test_sigkill_during_cache_then_resume_equals_uninterrupted(setup):
    tmp, _, store = setup
    ref, killed = tmp / "ref", tmp / "killed"
    assert _cli(*_cache_args(store, ref)).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "featureatlas.scripts.cli",
                             *map(str, _cache_args(store, killed, "--checkpoint-every", "1"))], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not any((killed / "checkpoints").glob("[0-9]*")):
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "cache.h5").exists(), "the pass finished before the kill; make it longer"
    refused = _cli(*_cache_args(store, killed))
    _one_line_error(refused, "--resume")
    assert _cli(*_cache_args(store, killed, "--resume")).returncode == 0
    with h5py.File(ref / "cache.h5") as a, h5py.File(killed / "cache.h5") as b:
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(a[k][()], b[k][()], err_msg=k)


def test_bad_inputs_are_refused_with_the_fix_and_nothing_changes(setup, monkeypatch):
    tmp, model, store = setup
    before = _sha(store)
    bad = tmp / "bad"
    _one_line_error(_cli(*_cache_args(store, bad)[:4], "neurons:resid_post.0", "--out", bad),
                    "no hook 'resid_post.0'")
    other = tmp / "other-store.h5"
    from featureatlas.activation_store.store import write_store

    write_store(other, acts={"mlp_hidden.1": np.ones((4 * 16, 8), np.float32)}, tokens=np.ones((4, 16), np.int32))
    snmf = tmp / "pca8"
    assert _cli("train-snmf", "--store", other, "--hook", "mlp_hidden.1", "--method", "pca", "--k", "2",
                "--out", snmf, "--no-progress").returncode == 0
    _one_line_error(_cli("cache", "--store", store, "--dictionary", snmf, "--out", bad), "cannot encode 64-wide",
                    "dimensions differ")
    cache = tmp / "cache"
    assert _cli(*_cache_args(store, cache)).returncode == 0
    cache_sha = _sha(cache / "cache.h5")
    desc = ["describe", "--cache", cache, "--model", model, "--out", bad, "--no-progress"]
    _one_line_error(_cli(*desc, "--features", "3,999"), "out of range", "ids 0..63")
    _one_line_error(_cli(*desc, "--features", "3,x"), "'x' is not a feature id")
    env = {k: v for k, v in os.environ.items() if k != "FA_TEST_KEY"}
    api = ["--explainer", "openai", "--api-model", "m", "--api-key-env", "FA_TEST_KEY"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    _one_line_error(_cli(*desc, *api, "--base-url", url, env=env), "FA_TEST_KEY")
    env["FA_TEST_KEY"] = "sk-test-never-written"
    r = _cli(*desc, *api, "--base-url", url, env=env)
    _one_line_error(r, url)
    assert "sk-test-never-written" not in r.stderr + r.stdout
    assert not bad.exists() and _sha(store) == before and _sha(cache / "cache.h5") == cache_sha


def test_dead_features_are_listed_not_described(setup):
    tmp, model, store = setup
    cache = tmp / "cache-dead"
    assert _cli(*_cache_args(store, cache)).returncode == 0
    with h5py.File(cache / "cache.h5") as f:
        dead = np.flatnonzero(f["active_tokens"][()] == 0)
    out = tmp / "desc-dead"
    feats = [0, 1] + [int(d) for d in dead[:2]]
    r = _cli("describe", "--cache", cache, "--model", model, "--features", ",".join(map(str, feats)),
             "--out", out, "--no-progress", "--no-token-change")
    assert r.returncode == 0, r.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["dead_chosen"] == [int(d) for d in dead[:2]]
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    for d in dead:
        assert recs[d]["dead"] and recs[d]["descriptions"] == []
    cat = tmp / "catalog"
    r = _cli("catalog", "--describe", out, "--out", cat)
    assert r.returncode == 0, r.stderr
    assert (cat / "index.html").exists() and json.loads((cat / "catalog.json").read_text())["n_dead"] == len(dead)


def test_cache_over_a_corpus_through_the_model_equals_cache_over_its_store(setup):
    tmp, model, store = setup
    ref, direct = tmp / "ref-corpus", tmp / "direct"
    assert _cli(*_cache_args(store, ref)).returncode == 0
    corpus = tmp / "docs.txt"
    r = _cli("cache", "--model", model, "--corpus", corpus, "--context-length", "16", "--max-tokens", "100000",
             "--dictionary", "neurons:mlp_hidden.1", "--out", direct, "--no-progress", "--contexts-per-chunk", "2",
             "--hist-stride", "1")
    assert r.returncode == 0, r.stderr
    with h5py.File(ref / "cache.h5") as a, h5py.File(direct / "cache.h5") as b:
        for k in a:
            np.testing.assert_array_equal(a[k][()], b[k][()], err_msg=k)
    _one_line_error(_cli("cache", "--dictionary", "neurons:mlp_hidden.1", "--out", tmp / "none"), "--store", "--model")
