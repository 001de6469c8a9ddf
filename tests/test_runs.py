"""The run layer and the config builder: atomic publish, resume checks, metrics log, orbax checkpoints."""
import argparse
import dataclasses
import json
import os

import numpy as np
import pytest

from featureatlas.activation_store.configs import (Config, add_config_arguments, config_diff, config_from_args,
                                                   flags_of, setting)
from featureatlas.activation_store.errors import ConfigError, RunError
from featureatlas.activation_store.runs import (JOURNAL, Checkpoints, MetricsLog, Run, atomic_write, publish_files,
                                                published)


@dataclasses.dataclass
class Inner(Config):
    depth: int = setting(2, ge=1)
    """How deep."""


@dataclasses.dataclass
class Demo(Config):
    store: str = setting()
    """Path of the store."""
    lr: float = setting(1e-3, gt=0)
    """Peak learning rate."""
    l1_coef: float = setting(5.0, flag="--l1", ge=0)
    """L1 coefficient."""
    method: str = setting("snmf", choices=("snmf", "pca"))
    """Which fit."""
    hooks: tuple[str, ...] = setting(("a",))
    """Hooks to read."""
    shuffle: bool = setting(True)
    """Shuffle rows."""
    inner: Inner = setting(default_factory=Inner, cli=False)
    """Nested settings."""


def test_round_trip_and_unknown_key_names_closest():
    cfg = Demo(store="s.h5", hooks=("x", "y"), inner=Inner(3))
    back = Demo.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.hooks == ("x", "y") and isinstance(back.inner, Inner)
    with pytest.raises(ConfigError, match="unknown setting 'l1' in Demo; did you mean 'l1_coef'"):
        Demo.from_dict({"store": "s", "l1": 1.0})
    with pytest.raises(ConfigError, match="'deep'.*Demo.inner.*'depth'"):
        Demo.from_dict({"store": "s", "inner": {"deep": 1}})


def test_flags_help_and_validation_derive_from_the_dataclass(capsys):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Demo)
    args = parser.parse_args(["--store", "s.h5", "--l1", "0.5", "--hooks", "p", "q", "--no-shuffle"])
    cfg = config_from_args(Demo, args)
    assert cfg == Demo(store="s.h5", l1_coef=0.5, hooks=("p", "q"), shuffle=False)
    text = parser.format_help()
    assert "Peak learning rate. (default: 0.001)" in " ".join(text.split())
    assert "--l1" in text and "--inner" not in text
    with pytest.raises(ConfigError, match=r"--lr must be > 0 \(got -1"):
        Demo(store="s", lr=-1).validate()
    with pytest.raises(ConfigError, match="--method 'nmf' is not one of snmf, pca"):
        Demo(store="s", method="nmf").validate()
    with pytest.raises(ConfigError, match="--depth must be >= 1"):
        Demo(store="s", inner=Inner(0)).validate()
    with pytest.raises(SystemExit):
        parser.parse_args(["--store", "s", "--lr", "fast"])
    assert "--lr expects float, got 'fast'" in capsys.readouterr().err


def test_config_diff_names_path_and_flag():
    old = {"saes": [{"k": 4}], "train": {"l1_coef": 1.0}}
    new = {"saes": [{"k": 8}], "train": {"l1_coef": 2.0}}
    lines = config_diff(old, new, flags_of(Demo) | {"k": "--k"})
    assert lines == ["saes.0.k: 4 -> 8 (set by --k)", "train.l1_coef: 1.0 -> 2.0 (set by --l1)"]


def _tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_prepare_changes_nothing_and_refuses_without_resume(tmp_path):
    out = tmp_path / "run"
    run = Run.prepare(out, "job", {"k": 1})
    assert not out.exists()
    with run.active():
        run.write_results({"loss": 1.0})
    before = _tree(out)
    with pytest.raises(RunError, match="already holds a job run; pass --resume.*--overwrite"):
        Run.prepare(out, "job", {"k": 1})
    with pytest.raises(RunError, match=r"differ in k: 1 -> 2 \(set by --k\)"):
        Run.prepare(out, "job", {"k": 2}, resume=True, flags={"k": "--k"})
    with pytest.raises(RunError, match="holds a 'job' run, not a 'other' run"):
        Run.prepare(out, "other", {"k": 1}, resume=True)
    assert _tree(out) == before
    assert Run.prepare(out, "job", {"k": 1}, resume=True).resuming
    replaced = Run.prepare(out, "job", {"k": 2}, overwrite=True)
    assert _tree(out) == before  # nothing deleted before begin()
    replaced.begin()
    assert not (out / "results.json").exists()


def test_bad_output_paths_are_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunError, match="exists and is not a directory"):
        Run.prepare(tmp_path / "file", "job", {})
    with pytest.raises(RunError, match="is not a directory"):
        Run.prepare(tmp_path / "file" / "sub", "job", {})
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(RunError, match="no permission"):
            Run.prepare(locked / "out", "job", {})


def test_failed_run_leaves_no_empty_directory(tmp_path):
    out = tmp_path / "a" / "run"
    with pytest.raises(KeyError):
        with Run.prepare(out, "job", {}).active():
            raise KeyError("boom")
    assert not out.exists()


def test_publish_is_all_or_nothing_and_rolls_forward(tmp_path):
    d = tmp_path / "dic"
    publish_files(d, {"config.json": '{"v": 1}', "weights.bin": b"old"})
    # A crash after the commit point (journal written) but before the renames: readers see the new pair.
    publish_files(d, {"config.json": '{"v": 2}', "weights.bin": b"new"})
    import featureatlas.activation_store.runs as runs
    real = runs.recover_publish
    calls = []

    def crash_after_journal(directory):
        calls.append(directory)
        if len(calls) == 2:
            raise SystemExit("killed")
        return real(directory)

    runs.recover_publish = crash_after_journal
    try:
        with pytest.raises(SystemExit):
            publish_files(d, {"config.json": '{"v": 3}', "weights.bin": b"newest"})
    finally:
        runs.recover_publish = real
    assert (d / JOURNAL).exists() and (d / "weights.bin").read_bytes() == b"new"
    published(d)
    assert (d / "weights.bin").read_bytes() == b"newest" and json.loads((d / "config.json").read_text()) == {"v": 3}
    assert not (d / JOURNAL).exists() and not list(d.glob(".*.tmp"))
    assert oct((d / "weights.bin").stat().st_mode & 0o777) == "0o644"


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write(p, "one")

    def failing(path):
        path.write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(p, failing)
    assert p.read_text() == "one" and [q.name for q in tmp_path.iterdir()] == ["f.txt"]


def test_metrics_log_truncates_to_checkpoint(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append({"step": s, "loss": float(s)} for s in (10, 20, 30))
    log.truncate_after(20)
    assert [r["step"] for r in log.rows()] == [10, 20]
    log.truncate_after(0)
    assert log.rows() == []


def test_orbax_checkpoints_round_trip(tmp_path):
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.int32(3)}
    with Checkpoints(tmp_path / "ckpt", keep=1) as ck:
        ck.save(5, state)
        ck.save(7, {"w": state["w"] * 2, "step": np.int32(4)})
        assert ck.latest_step() == 7
        back = ck.restore(7, like=state)
    np.testing.assert_array_equal(np.asarray(back["w"]), state["w"] * 2)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == ["7"]
