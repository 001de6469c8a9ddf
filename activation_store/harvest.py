"""Harvest: run a language model over a packed corpus and write its activations to a store.

Contexts go through the model in fixed batches (`lm.forward(..., capture=hooks, stop_at="capture")`,
one pass for every hook); a writer thread commits every `commit_contexts` contexts while the model
computes the next batches. The batch boundaries depend only on the config, and a resumed run starts
at the committed counter (a multiple of the batch size), so a harvest killed at any point and run
again produces the same file, byte for byte, as one that was never interrupted.
"""
from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featureatlas.activation_store.corpus import CorpusConfig, PackedCorpus, build_corpus
from featureatlas.activation_store.store import (DTYPES, FLOAT16_MAX, ActivationStore, StoreWriter, check_compatible,
                                    create_store)


class HarvestError(ValueError):
    """A harvest that cannot run as configured."""


class Float16OverflowError(HarvestError):
    """An activation does not fit in float16."""


@dataclass(frozen=True)
class HarvestConfig:
    """What to harvest. `commit_contexts` must be a multiple of `batch_size` (resume keeps batches aligned)."""

    model: str = "smollm2-135m"
    hooks: tuple[str, ...] = ("resid_post.15",)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    dtype: str = "float16"
    batch_size: int = 16
    commit_contexts: int = 64
    val_fraction: float = 0.05

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hooks"] = list(self.hooks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HarvestConfig":
        d = dict(d)
        d["hooks"] = tuple(d.get("hooks", ()))
        d["corpus"] = CorpusConfig(**d.get("corpus", {}))
        return cls(**d)


@dataclass
class HarvestResult:
    """The finished (or already complete) store and how the run spent its time."""

    store: ActivationStore
    new_contexts: int = 0
    new_tokens: int = 0
    wall_s: float = 0.0
    write_s: float = 0.0  # writer thread busy writing/flushing (overlaps compute)
    stall_s: float = 0.0  # compute thread waiting for the writer

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0


def validate_config(config: HarvestConfig) -> None:
    if config.dtype not in DTYPES:
        raise HarvestError(f"dtype must be one of {DTYPES}, got {config.dtype!r}")
    if not config.hooks:
        raise HarvestError("give at least one hook to capture (e.g. --hooks resid_post.15)")
    if len(set(config.hooks)) != len(config.hooks):
        raise HarvestError(f"hooks listed twice: {list(config.hooks)}")
    if config.batch_size < 1 or config.commit_contexts < 1:
        raise HarvestError(f"batch_size and commit_contexts must be positive, got {config.batch_size}, "
                           f"{config.commit_contexts}")
    if config.commit_contexts % config.batch_size:
        raise HarvestError(f"commit_contexts ({config.commit_contexts}) must be a multiple of batch_size "
                           f"({config.batch_size}) so that a resumed run keeps the same batches")
    if not 0.0 <= config.val_fraction < 1.0:
        raise HarvestError(f"val_fraction must lie in [0, 1), got {config.val_fraction}")


def store_identity(lm, config: HarvestConfig, corpus: PackedCorpus) -> dict:
    """Root attributes a resumed harvest must agree with (plus descriptive ones)."""
    return {
        "model_id": lm.model_id,
        "weights_hash": lm.weights_hash,
        "model_config": lm.config.to_dict(),
        "tokenizer": corpus.tokenizer_name,
        "hooks": list(config.hooks),
        "dims": {h: int(lm.hook_dim(h)) for h in config.hooks},
        "context_length": corpus.context_length,
        "dtype": config.dtype,
        "corpus_fingerprint": corpus.fingerprint,
        "corpus_source": config.corpus.source,
        "n_documents": corpus.n_documents,
        "val_fraction": float(config.val_fraction),
        "commit_contexts": int(config.commit_contexts),
        "harvest_config": config.to_dict(),
    }


def batch_inputs(corpus: PackedCorpus, c0: int, batch_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens_BxT, mask_BxT, n_real) for contexts [c0, c0+B); missing rows are BOS-only dummies so
    every batch has the same shape (one compiled function)."""
    T = corpus.context_length
    tokens = corpus.tokens_NxT[c0:c0 + batch_size]
    n_valid = corpus.n_valid_N[c0:c0 + batch_size]
    n_real = tokens.shape[0]
    if n_real < batch_size:
        filler = np.repeat(tokens[:1, :], batch_size - n_real, axis=0)
        tokens = np.concatenate([tokens, filler])
        n_valid = np.concatenate([n_valid, np.ones(batch_size - n_real, np.int32)])
    mask = (np.arange(T)[None, :] < n_valid[:, None]).astype(np.int32)
    return tokens, mask, n_real


def to_store_rows(acts_BxTxD, mask_BxT, n_real: int, dtype: str, hook: str, first_row: int) -> np.ndarray:
    """[n_real·T, d] rows in the store dtype, padding rows zeroed; refuses non-finite values and
    float16 overflow (naming the hook, row and value) before anything is written."""
    a = np.asarray(acts_BxTxD, np.float32)[:n_real]
    keep = mask_BxT[:n_real].astype(bool)
    a = np.where(keep[..., None], a, 0.0).reshape(-1, a.shape[-1])
    finite = np.isfinite(a).all(axis=1)
    if not finite.all():
        r = int(np.flatnonzero(~finite)[0])
        raise HarvestError(f"{hook}: the model produced NaN/Inf at row {first_row + r}; nothing was written "
                           "for this batch (check the model weights)")
    if dtype == "float16":
        row_max = np.abs(a).max(axis=1)
        if row_max.max() > FLOAT16_MAX:
            r = int(np.argmax(row_max))
            T = mask_BxT.shape[1]
            raise Float16OverflowError(
                f"{hook}: row {first_row + r} (context {(first_row + r) // T}, position {(first_row + r) % T}) has "
                f"|value| {row_max[r]:.4g} > float16 max {FLOAT16_MAX:g}; nothing of this batch was written. "
                "Harvest with --dtype float32 (and --overwrite to replace this store)")
    return a.astype(dtype)


class _CommitThread:
    """Collects per-batch rows into commit blocks and commits them on a background thread."""

    def __init__(self, writer: StoreWriter, hooks, T: int, n_contexts: int, commit_contexts: int):
        self.writer, self.hooks, self.T = writer, hooks, T
        self.n_contexts, self.commit_contexts = n_contexts, commit_contexts
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.write_s = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        block: dict[str, list[np.ndarray]] = {h: [] for h in self.hooks}
        block_c0, block_n = None, 0
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    return
                c0, n, rows = item
                if block_c0 is None:
                    block_c0 = c0
                for h in self.hooks:
                    block[h].append(rows[h])
                block_n += n
                c1 = block_c0 + block_n
                if block_n == self.commit_contexts or c1 == self.n_contexts:
                    t0 = time.perf_counter()
                    self.writer.commit(block_c0, c1, {h: np.concatenate(block[h]) for h in self.hooks})
                    self.write_s += time.perf_counter() - t0
                    block = {h: [] for h in self.hooks}
                    block_c0, block_n = None, 0
        except BaseException as err:
            self.error = err
            # Drain so the producer never blocks on a dead consumer.
            while True:
                try:
                    if self.queue.get(timeout=0.5) is None:
                        return
                except queue.Empty:
                    return

    def put(self, item) -> float:
        """Queue a batch; returns seconds spent waiting for room."""
        t0 = time.perf_counter()
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(item, timeout=0.1)
                return time.perf_counter() - t0
            except queue.Full:
                continue

    def finish(self) -> None:
        """Commit everything queued, then stop; re-raises a writer error."""
        if self.thread.is_alive():
            try:
                self.queue.put(None, timeout=60)
            except queue.Full:
                pass
            self.thread.join()
        if self.error is not None:
            raise self.error


def harvest(config: HarvestConfig, out, *, lm=None, overwrite: bool = False, progress: bool = True,
            fsync: bool = True, on_phase=None) -> HarvestResult:
    """Harvest `config.hooks` of `lm` (default: load_model(config.model)) over the corpus into `out`.

    An existing store is resumed from its committed counter if it was made with the same settings
    (model, weights, hooks, context length, dtype, corpus, batch/commit sizes, val fraction) and
    refused otherwise; `overwrite=True` replaces it (the old file stays until the new skeleton is
    complete). Every check runs before the output file is touched. `on_phase(name, commit_index)`
    is called at "created", "hook_written", "rows_flushed" and "committed" (for crash tests).
    """
    validate_config(config)
    if lm is None:
        from featureatlas.activation_store.models import load_model

        lm = load_model(config.model)
    elif config.model != lm.model_id:
        config = dataclasses.replace(config, model=lm.model_id)  # record the model actually used
    for hook in config.hooks:
        lm.check_hook(hook)
    corpus = build_corpus(config.corpus, lm.tokenizer, max_ctx=lm.config.max_ctx)
    identity = store_identity(lm, config, corpus)
    out = Path(out)
    on_phase = on_phase or (lambda name, index: None)

    if out.exists() and not overwrite:
        existing = ActivationStore.open(out)
        expected = dict(identity)
        # The model is identified by model_id + weights_hash, not by how it was named on the command line.
        expected["harvest_config"] = {**identity["harvest_config"], "model": existing.harvest_config.get("model")}
        check_compatible(existing.attrs, expected, out)
        if existing.complete:
            return HarvestResult(existing)
        existing.close()
    else:
        if out.is_dir():
            raise HarvestError(f"--out {out} is a directory; give a file path such as {out / 'store.h5'}")
        create_store(out, tokens_NxT=corpus.tokens_NxT, n_valid_N=corpus.n_valid_N, doc_id_N=corpus.doc_id_N,
                     label_N=corpus.label_N, label_names=corpus.label_names, dims=identity["dims"],
                     dtype=config.dtype, attrs=identity, commit_contexts=config.commit_contexts,
                     val_fraction=config.val_fraction, bos_id=lm.tokenizer.bos_id, tokenizer=corpus.tokenizer_name)
        on_phase("created", -1)
    writer = StoreWriter(out, fsync=fsync, on_phase=on_phase)
    try:
        result = _run(lm, config, corpus, writer, progress)
    finally:
        writer.close()
    result.store = ActivationStore.open(out)
    return result


def _run(lm, config: HarvestConfig, corpus: PackedCorpus, writer: StoreWriter, progress: bool) -> HarvestResult:
    from tqdm.auto import tqdm

    N, T, B = corpus.n_contexts, corpus.context_length, config.batch_size
    start = writer.n_committed
    hooks = tuple(config.hooks)
    done_tokens = int(corpus.n_valid_N[:start].sum())
    bar = tqdm(total=corpus.n_tokens, initial=done_tokens, unit="tok", unit_scale=True, disable=not progress,
               desc=f"harvest {','.join(hooks)}", smoothing=0.1)
    committer = _CommitThread(writer, hooks, T, N, config.commit_contexts)
    t_start = time.perf_counter()
    stall = 0.0

    def dispatch(c0):
        tokens, mask, n_real = batch_inputs(corpus, c0, B)
        _, caps = lm.forward(lm.params, tokens, attention_mask_BxT=mask, capture=hooks, stop_at="capture")
        return c0, caps, mask, n_real

    try:
        starts = list(range(start, N, B))
        pending = dispatch(starts[0]) if starts else None
        for i in range(len(starts)):
            c0, caps, mask, n_real = pending
            # Dispatch the next batch before converting this one, so the device is never idle.
            pending = dispatch(starts[i + 1]) if i + 1 < len(starts) else None
            rows = {h: to_store_rows(caps[h], mask, n_real, config.dtype, h, c0 * T) for h in hooks}
            stall += committer.put((c0, n_real, rows))
            bar.update(int(corpus.n_valid_N[c0:c0 + n_real].sum()))
    except BaseException:
        # Let complete blocks already queued commit; an in-flight partial block stays invisible.
        try:
            committer.finish()
        except BaseException:
            pass  # the original error is the one to report
        finally:
            bar.close()
        raise
    committer.finish()
    bar.close()
    wall = time.perf_counter() - t_start
    return HarvestResult(store=None, new_contexts=N - start, new_tokens=corpus.n_tokens - done_tokens,
                         wall_s=wall, write_s=committer.write_s, stall_s=stall)


def describe(result: HarvestResult) -> str:
    s = result.store
    return json.dumps({"store": str(s.path), "contexts": s.n_contexts, "tokens": int(s.n_valid.sum()),
                       "new_tokens": result.new_tokens, "tokens_per_s": round(result.tokens_per_s, 1),
                       "write_share": round(result.write_s / result.wall_s, 4) if result.wall_s else 0.0})
