"""The run layer: one way for every long job (harvest, train-sae, train-snmf, cache, describe, evaluate)
to own an output directory, publish files, log metrics, checkpoint and resume.

A run directory holds:

    run.json          manifest: format, job, requested settings, created/updated times (written at begin)
    results.json      what the run produced (measured numbers), separate from the requested settings
    metrics.jsonl     one JSON row per log event; rows carry "step"; truncated to the checkpoint on resume
    checkpoints/      orbax checkpoints of the job's state pytree (`Checkpoints`)
    ...               the job's published files

Guarantees:
- `atomic_write`: a temp file in the same directory, fsync, rename over the target, fsync the directory;
  a reader never sees a half-written file, a crash leaves the old or the new file.
- `publish_files(dir, files)`: several files become visible together. All are written to temp names
  first; then a journal `.publish.json` naming every rename is written atomically (the commit point);
  then the renames; then the journal is removed. `recover_publish(dir)` (called by every loader through
  `published(dir)`) rolls an interrupted publish forward, so new weights are never read beside an old
  config.
- `Run.prepare(...)` checks everything (output path, existing run, resume settings) without touching
  the disk; `run.begin()` then creates the directory and writes the manifest. A resume with other
  settings is refused with every differing field and the flag that sets it. A fresh run into a
  directory holding a run is refused unless `overwrite=True`, and nothing is deleted before `begin()`.
- A run that fails before writing anything but its manifest leaves no directory behind (`run.active()`).

A new job in under 20 lines:

    run = Run.prepare(cfg.out, "my-job", cfg.to_dict(), resume=cfg.resume, flags=flags_of(MyConfig))
    with run.active():                                  # nothing on disk changed until here
        ckpt = run.checkpoints(keep=2)
        state, step = init_state(cfg), 0
        if run.resuming and ckpt.latest_step() is not None:
            step = ckpt.latest_step()
            state = ckpt.restore(step, like=state)
        run.metrics.truncate_after(step)
        for step in range(step + 1, cfg.steps + 1):
            state, m = jitted_step(state, next(batches))
            if step % cfg.log_every == 0:
                run.metrics.append([{"step": step, **jax.device_get(m)}])
            if step % cfg.checkpoint_every == 0:
                ckpt.save(step, state)
        run.publish({"weights.safetensors": weights_bytes, "config.json": config_bytes})
        run.write_results({"loss": final_loss})
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from featureatlas.activation_store.configs import config_diff
from featureatlas.activation_store.errors import RunError

RUN_FORMAT = "featureatlas-run/1"
MANIFEST = "run.json"
RESULTS = "results.json"
METRICS = "metrics.jsonl"
JOURNAL = ".publish.json"
FILE_MODE = 0o644


# ---------------------------------------------------------------------------------------------
# Atomic files
# ---------------------------------------------------------------------------------------------
def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it survives a power loss (no-op where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_temp(directory: Path, name: str, data: bytes | str | Callable[[Path], None]) -> Path:
    """Write `data` (bytes, text, or a function that writes a path) to a fresh fsynced temp file in `directory`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        if callable(data):
            data(tmp_path)
        else:
            tmp_path.write_bytes(data.encode() if isinstance(data, str) else data)
        with open(tmp_path, "rb+") as f:  # fsync reaches the file's data whichever descriptor wrote it
            os.fsync(f.fileno())
        os.chmod(tmp_path, FILE_MODE)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return tmp_path


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[Path], None]) -> None:
    """Replace `path` with `data` atomically: temp file in the same directory, fsync, rename, fsync dir.

    `data` may be bytes, text, or a function `write(tmp_path)` (for writers that want a path, e.g. safetensors).
    """
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a write that was killed
        stale.unlink(missing_ok=True)
    tmp = _write_temp(path.parent, path.name, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------------------------
# Publishing several files as one unit
# ---------------------------------------------------------------------------------------------
def recover_publish(directory: str | os.PathLike) -> None:
    """Roll an interrupted `publish_files` forward (idempotent); drop temp files of an uncommitted one."""
    directory = Path(directory)
    journal = directory / JOURNAL
    if journal.exists():
        try:
            renames = read_json(journal)["renames"]
        except (ValueError, KeyError):
            renames = {}  # the journal itself is written atomically; a bad one means no commit happened
        for tmp, final in renames.items():
            if (directory / tmp).exists():
                os.replace(directory / tmp, directory / final)
        fsync_dir(directory)
        journal.unlink(missing_ok=True)
        fsync_dir(directory)
    if directory.is_dir() and os.access(directory, os.W_OK):
        for stale in directory.glob(".*.tmp"):
            stale.unlink(missing_ok=True)


def publish_files(directory: str | os.PathLike, files: Mapping[str, bytes | str | Callable[[Path], None]]) -> None:
    """Make every file in `files` ({name: data}) visible in `directory` together (see module docstring)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    recover_publish(directory)
    temps = {}
    try:
        for name, data in files.items():
            temps[_write_temp(directory, name, data).name] = name
    except BaseException:
        for tmp in temps:
            (directory / tmp).unlink(missing_ok=True)
        raise
    fsync_dir(directory)
    atomic_write_json(directory / JOURNAL, {"renames": temps})  # the commit point
    recover_publish(directory)


def published(directory: str | os.PathLike) -> Path:
    """`directory`, after completing any interrupted publish in it: call before reading published files."""
    directory = Path(directory)
    if (directory / JOURNAL).exists() and os.access(directory, os.W_OK):
        recover_publish(directory)
    return directory


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
class MetricsLog:
    """`metrics.jsonl`: append rows; on resume keep only the rows up to the restored step."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled  # False on non-main processes of a multi-host run

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line torn by a kill mid-write; the resumed run logs it again
                rows.append(json.loads(line))
        return rows

    def append(self, rows: Iterable[dict]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int, key: str = "step") -> None:
        """Drop rows logged after `step` (they will be logged again by the resumed run); 0 clears the log."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in self.rows() if step and r.get(key, 0) <= step]
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in keep))


# ---------------------------------------------------------------------------------------------
# Checkpoints (orbax)
# ---------------------------------------------------------------------------------------------
class Checkpoints:
    """Orbax checkpoints of a job's state pytree in `dir`: periodic, atomic (orbax commits by rename), kept `keep`."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        import orbax.checkpoint as ocp

        self.dir = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), create=True,
                                               enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.dir, options=options)

    def latest_step(self) -> int | None:
        step = self._manager.latest_step()
        return None if step is None else int(step)

    def save(self, step: int, state) -> None:
        import orbax.checkpoint as ocp

        if self._manager.latest_step() == step:
            return
        self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()

    def restore(self, step: int, like, shardings=None):
        """The state saved at `step`, with the structure, shapes and dtypes of `like` (and `shardings`)."""
        import jax
        import numpy as np
        import orbax.checkpoint as ocp

        if shardings is None:  # numpy leaves (e.g. int64 host counters) come back as numpy, at full precision
            abstract = jax.tree.map(
                lambda a: np.asarray(a) if isinstance(a, (np.ndarray, np.generic))
                else jax.ShapeDtypeStruct(a.shape, a.dtype), like)
        else:
            abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), like, shardings)
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------
# The run directory
# ---------------------------------------------------------------------------------------------
def check_output_path(out: Path, what: str = "--out") -> None:
    """Raise RunError if `out` cannot become a directory we write (a file, unwritable parent, ...)."""
    if out.exists() and not out.is_dir():
        raise RunError(f"{what} {out} exists and is not a directory; choose a directory path for {what}")
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not probe.is_dir():
        raise RunError(f"{what} {out}: {probe} is not a directory; choose a path under a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunError(f"{what} {out}: no permission to write in {probe}; choose a writable location for {what}")


class Run:
    """A job's output directory. Create with `Run.prepare` (no disk change), then `begin()`."""

    def __init__(self, out: Path, job: str, settings: dict, resuming: bool, overwrite: bool, main: bool):
        self.dir, self.job, self.settings = out, job, settings
        self.resuming, self.overwrite = resuming, overwrite
        self.main = main  # process 0 of a multi-host run writes the shared files
        self.metrics = MetricsLog(out / METRICS, enabled=main)
        self._created = False

    @classmethod
    def prepare(cls, out: str | os.PathLike, job: str, settings: Mapping, *, resume: bool = False,
                overwrite: bool = False, flags: Mapping[str, str] | None = None, ignore: Sequence[str] = (),
                legacy_settings: Callable[[Path], Mapping | None] | None = None, main: bool = True,
                progress_markers: Sequence[str] = ("checkpoints", RESULTS)) -> "Run":
        """Check that `out` can hold this run; nothing on disk changes.

        resume: continue the run in `out` (its settings must equal `settings`, keys in `ignore` aside).
        overwrite: replace a run already in `out` (deleted only at `begin()`).
        flags: {field: flag} for naming the flag of each differing setting.
        legacy_settings(out): the settings of a run directory written before run.json existed, or None.
        progress_markers: files/folders whose presence means `out` holds a run's work.
        """
        out = Path(out)
        settings = json.loads(json.dumps(dict(settings)))
        check_output_path(out)
        manifest = out / MANIFEST
        old = None
        if manifest.exists():
            try:
                record = read_json(manifest)
            except ValueError:
                raise RunError(f"{manifest} is not valid JSON; move {out} aside or pass --overwrite") from None
            if record.get("job") != job:
                raise RunError(f"{out} holds a {record.get('job')!r} run, not a {job!r} run; choose another --out")
            old = record.get("settings", {})
        elif legacy_settings is not None and out.is_dir():
            old = legacy_settings(out)
        busy = out.is_dir() and (old is not None or any((out / m).exists() for m in progress_markers))
        if busy and not resume and not overwrite:
            raise RunError(
                f"{out} already holds a {job} run; pass --resume to continue it, --overwrite to replace it, "
                "or choose another --out")
        resuming = bool(resume and busy and not overwrite)  # nothing to resume: a fresh start, as documented
        if resuming and old is not None:
            strip = lambda d: {k: v for k, v in d.items() if k not in ignore}  # noqa: E731
            if diff := config_diff(strip(old), strip(settings), flags):
                raise RunError(
                    f"cannot resume the run in {out}: its settings differ in " + "; ".join(diff)
                    + ". Use the original settings, or start a new run in another --out (or pass --overwrite).")
        return cls(out, job, settings, resuming, overwrite and busy, main)

    def begin(self) -> "Run":
        """Create the directory (clearing a run being overwritten) and write the manifest."""
        if not self.main:
            return self
        if self.overwrite and self.dir.exists():
            shutil.rmtree(self.dir)
        self._created = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        recover_publish(self.dir)
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        manifest = self.dir / MANIFEST
        created = read_json(manifest).get("created", now) if manifest.exists() else now
        atomic_write_json(manifest, {"format": RUN_FORMAT, "job": self.job, "settings": self.settings,
                                     "created": created, "updated": now})
        return self

    @contextlib.contextmanager
    def active(self):
        """`begin()`, then run the body; if it fails leaving only the manifest, remove the new directory."""
        self.begin()
        try:
            yield self
        except BaseException:
            if self._created and self.main and self.dir.exists():
                left = [p.name for p in self.dir.iterdir() if p.name not in (MANIFEST, METRICS)]
                if not left:
                    shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def checkpoints(self, keep: int = 2, name: str = "checkpoints") -> Checkpoints:
        return Checkpoints(self.dir / name, keep)

    def publish(self, files: Mapping[str, bytes | str | Callable[[Path], None]], subdir: str | None = None) -> Path:
        """Publish several files together into the run directory (or `subdir` of it)."""
        target = self.dir / subdir if subdir else self.dir
        if self.main:
            publish_files(target, files)
        return target

    def write_results(self, results: Mapping) -> None:
        if self.main:
            atomic_write_json(self.dir / RESULTS, dict(results))


__all__ = ["Checkpoints", "MetricsLog", "Run", "atomic_write", "atomic_write_json", "check_output_path",
           "fsync_dir", "publish_files", "published", "read_json", "recover_publish"]
