"""Multi-host training on JAX's own distributed runtime, with CPU processes on this machine: two
`train-sae --distributed` processes (2 CPU devices each, a data=2 x feature=2 mesh across them) each
reading their own rows of every batch from a sharded store, killed after their first checkpoint and
resumed, give the SAE that one uninterrupted process with 4 devices trains, bit for bit."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from featureatlas.activation_store.harvest import harvest
from harvest_kill_helper import tiny_config, tiny_model

STEPS = 256
TRAIN = ["train-sae", "--hook", "resid_post.0", "--arch", "topk", "--k", "4", "--width", "64", "--tokens", 64 * STEPS,
         "--batch-size", "64", "--mesh", "data=2,feature=2", "--log-every", "16", "--checkpoint-every", "16",
         "--no-eval", "--no-progress"]


def _cli(args, devices: int, **kw):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen([sys.executable, "-m", "featureatlas.scripts.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mh")
    rng = np.random.default_rng(0)
    words = "a multi host run reads its own rows of every batch".split()
    (root / "c.jsonl").write_text("\n".join(json.dumps({"text": " ".join(rng.choice(words, size=int(rng.integers(
        5, 60))))}) for _ in range(40)))
    lm = tiny_model()
    for i in range(2):
        harvest(tiny_config(root / "c.jsonl", dtype="float32", shard=f"{i}/2"), root / "store", lm=lm, progress=False)
    return root / "store"


def _kill_after_first_checkpoint(procs, ckpt_dir: Path, timeout: float = 300.0) -> None:
    """SIGKILL every process once a checkpoint is on disk (a job killed mid-run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (ckpt_dir.is_dir() and any(ckpt_dir.iterdir())):
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.02)
    ended = [p.poll() is not None for p in procs]
    for p in procs:
        p.kill()
    logs = [p.communicate()[0][-3000:] for p in procs]
    assert not any(ended), "a process ended before its first checkpoint:\n" + "\n".join(logs)


def test_two_processes_killed_then_resumed_train_the_sae_one_process_trains(store, tmp_path):
    multi = tmp_path / "multi"

    def launch(*extra):
        port = _free_port()
        return [_cli([*TRAIN, "--store", store, "--out", multi, "--distributed", "--coordinator", f"127.0.0.1:{port}",
                      "--num-processes", 2, "--process-id", i, *extra], devices=2) for i in range(2)]

    _kill_after_first_checkpoint(launch(), multi / "checkpoints")
    assert not (multi / "weights.safetensors").exists(), "the run finished before it was killed"
    procs = launch("--resume")
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    single = _cli([*TRAIN, "--store", store, "--out", tmp_path / "single"], devices=4)
    log = single.communicate(timeout=600)[0]
    assert single.returncode == 0, log[-3000:]
    a, b = load_file(multi / "weights.safetensors"), load_file(tmp_path / "single" / "weights.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    rows = [[(r["step"], r["loss"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
            for d in (multi, tmp_path / "single")]
    assert rows[0] == rows[1] and len(rows[0]) == STEPS // 16
    # process 0 alone wrote the files; both processes wrote the checkpoints (orbax)
    assert json.loads((multi / "config.json").read_text())["data"]["store_complete"]


def test_bad_distributed_arguments_are_refused_before_work(store, tmp_path):
    p = _cli([*TRAIN, "--store", store, "--out", tmp_path / "x", "--distributed", "--coordinator", "127.0.0.1:1",
              "--num-processes", 2, "--process-id", 2], devices=2)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 2 and "--process-id 2 must be below --num-processes 2" in out
    assert "Traceback" not in out and not (tmp_path / "x").exists()


def test_mesh_all_spans_every_device():
    import jax

    from featureatlas.scripts.cmd_train_sae import parse_mesh

    assert parse_mesh("all") == (jax.device_count(), 1)
    assert parse_mesh("data=2,feature=4") == (2, 4)
