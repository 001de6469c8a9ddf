"""Harvest: run a language model over a packed corpus and write its activations to a store.

Pipeline. The model's forward passes run on a background `Prefetcher` thread, in fixed batches
(`lm.forward(..., capture=hooks, stop_at="capture")`, one pass for every hook; batch i+1 is
dispatched before batch i is converted, so the device never idles), and yield each batch's rows in
the store dtype. The calling thread gathers the rows into blocks of `commit_contexts` contexts and
commits each block (rows, CRCs, fsync, then the counter: see store_format) while the model computes
the next batches. The batch boundaries depend only on the config, and a resumed run starts at the
committed counter (a multiple of the batch size), so a harvest killed at any point and run again
produces the same file, byte for byte, as one that was never interrupted.

Checks, in order, before anything expensive or on disk happens: the settings (`HarvestConfig.validate`),
the output path, the hooks and context length against the model's config (read without its weights),
the corpus text (UTF-8, JSONL syntax), then, holding an exclusive lock on the store so that no other
harvest writes it meanwhile: the existing store (resumed only if made with the same settings), the free
disk space, and only then the model load, the skeleton and the commits.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from featureatlas.activation_store.configs import Config, setting
from featureatlas.activation_store.corpus import (CorpusConfig, PackedCorpus, build_corpus, check_context_length,
                                                  read_documents)
from featureatlas.activation_store.errors import FeatureAtlasError
from featureatlas.activation_store.prefetch import Prefetcher
from featureatlas.activation_store.store import (DTYPES, FLOAT16_MAX, ActivationStore, StoreWriter, check_compatible,
                                                 check_free_space, create_store, store_lock)
from featureatlas.activation_store.store_format import parse_shard, shard_name, shard_range


class HarvestError(FeatureAtlasError, ValueError):
    """A harvest that cannot run as configured."""


class Float16OverflowError(HarvestError):
    """An activation does not fit in float16."""


@dataclass(frozen=True)
class HarvestConfig(Config):
    """What to harvest: the settings recorded in the store, which a resumed harvest must repeat."""

    model: str = "smollm2-135m"
    """'smollm2-135m', a .gguf file or a local Hugging Face checkpoint directory"""
    hooks: tuple[str, ...] = ("resid_post.15",)
    """hook names to capture, <kind>.<layer> with kind resid_pre, attn_out, resid_mid, mlp_hidden, mlp_out or resid_post"""
    corpus: CorpusConfig = setting(default_factory=CorpusConfig, cli=False)
    """the text and how it is packed into contexts"""
    dtype: str = setting("float16", choices=DTYPES)
    """storage dtype of the activations (float32 for models whose activations exceed float16's range)"""
    compute_dtype: str = setting("float32", choices=("float32", "bfloat16"))
    """dtype of the model's forward pass: bfloat16 runs it as transformers runs a bfloat16 model (norm statistics and softmax in float32), the fast choice on a GPU/TPU, slower than float32 on CPU; rows are stored in --dtype either way"""
    batch_size: int = setting(16, gt=0)
    """contexts per forward pass"""
    commit_contexts: int = setting(64, gt=0)
    """contexts per committed chunk, a multiple of --batch-size (a killed harvest redoes at most one chunk)"""
    val_fraction: float = setting(0.05, ge=0.0, lt=1.0)
    """fraction of contexts held out for validation (chosen by a hash of the context index)"""
    shard: str = ""
    """this job's part of a sharded harvest, i/n: contexts [i·N/n, (i+1)·N/n) of the corpus's N go to --out/shard-<i>-of-<n>.h5, --out being the store's directory (read as one store); empty = the whole corpus into one file"""

    def validate(self) -> "HarvestConfig":
        super().validate()
        if not self.hooks:
            raise HarvestError("give at least one hook to capture (e.g. --hooks resid_post.15)")
        if len(set(self.hooks)) != len(self.hooks):
            raise HarvestError(f"hooks listed twice: {list(self.hooks)}; give each hook once")
        if self.shard:
            parse_shard(self.shard)
        if self.commit_contexts % self.batch_size:
            raise HarvestError(f"commit_contexts ({self.commit_contexts}) must be a multiple of batch_size "
                               f"({self.batch_size}) so that a resumed run keeps the same batches; "
                               "change --commit-contexts or --batch-size")
        return self


@dataclass
class HarvestResult:
    """The finished (or already complete) store and how the run spent its time."""

    store: ActivationStore
    new_contexts: int = 0
    new_tokens: int = 0
    wall_s: float = 0.0
    write_s: float = 0.0  # committing (overlaps compute)
    stall_s: float = 0.0  # the forward thread waiting for the committer

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0


def store_identity(lm, config: HarvestConfig, corpus: PackedCorpus) -> dict:
    """Root attributes a resumed harvest must agree with (plus descriptive ones)."""
    return {
        "model_id": lm.model_id, "weights_hash": lm.weights_hash, "model_config": lm.config.to_dict(),
        "tokenizer": corpus.tokenizer_name, "hooks": list(config.hooks),
        "dims": {h: int(lm.hook_dim(h)) for h in config.hooks}, "context_length": corpus.context_length,
        "dtype": config.dtype, "corpus_fingerprint": corpus.fingerprint, "corpus_source": config.corpus.source,
        "n_documents": corpus.n_documents, "val_fraction": float(config.val_fraction),
        "commit_contexts": int(config.commit_contexts), "harvest_config": config.to_dict(),
    }


def store_file(config: HarvestConfig, out) -> Path:
    """The file a harvest writes: `out`, or with --shard i/n `out/shard-<i>-of-<n>.h5`."""
    out = Path(out)
    if not config.shard:
        return out
    if out.is_file() or out.suffix == ".h5":
        raise HarvestError(f"--out {out} names a file, but with --shard --out is the directory that holds the "
                           f"shards (e.g. --out {out.with_suffix('')}); every shard job gets the same --out")
    return out / shard_name(*parse_shard(config.shard))


def shard_of(corpus: PackedCorpus, shard: str) -> tuple[PackedCorpus, dict]:
    """The contexts of shard `shard` ('i/n', empty = all) and the attributes that tie it to its harvest."""
    if not shard:
        return corpus, {}
    index, count = parse_shard(shard)
    a, b = shard_range(corpus.n_contexts, index, count)
    if a == b:
        raise HarvestError(f"--shard {shard}: the corpus packs into {corpus.n_contexts} contexts, fewer than the "
                           f"{count} shards; harvest with fewer shards")
    part = dataclasses.replace(corpus, tokens_NxT=corpus.tokens_NxT[a:b], n_valid_N=corpus.n_valid_N[a:b],
                               doc_id_N=corpus.doc_id_N[a:b], label_N=corpus.label_N[a:b])
    return part, {"shard": f"{index}/{count}", "context_offset": a, "sharded_contexts": corpus.n_contexts,
                  "sharded_fingerprint": corpus.fingerprint}


def batch_inputs(corpus: PackedCorpus, c0: int, batch_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens_BxT, mask_BxT, n_real) for contexts [c0, c0+B); missing rows are BOS-only dummies so
    every batch has the same shape (one compiled function)."""
    tokens = corpus.tokens_NxT[c0:c0 + batch_size]
    n_real = tokens.shape[0]
    tokens = np.concatenate([tokens, np.repeat(tokens[:1], batch_size - n_real, axis=0)])  # copies of the first
    n_valid = np.pad(corpus.n_valid_N[c0:c0 + batch_size], (0, batch_size - n_real), constant_values=1)
    mask = (np.arange(corpus.context_length)[None, :] < n_valid[:, None]).astype(np.int32)
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


def check_store_path(out: Path) -> None:
    """HarvestError/RunError unless `out` can be a store file we write (checked before any work)."""
    if out.is_dir():
        raise HarvestError(f"--out {out} is a directory; give a file path such as {out / 'store.h5'}")
    if out.exists() and not out.is_file():
        raise HarvestError(f"--out {out} exists and is not a regular file; give a path for the store's .h5 file")
    folder = next(p for p in (out.parent, *out.parent.parents) if p.exists())  # nearest existing folder
    if not folder.is_dir():
        raise HarvestError(f"--out {out}: {folder} is not a directory; choose a path under a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise HarvestError(f"--out {out}: no permission to write in {folder}; choose a writable location for --out")
    if out.exists() and not os.access(out, os.R_OK | os.W_OK):
        raise HarvestError(f"--out {out} is not writable (permission denied); fix its permissions or choose "
                           "another --out")


def harvest(config: HarvestConfig, out, *, lm=None, overwrite: bool = False, progress: bool = True,
            fsync: bool = True, on_phase=None, notify: Callable[[str], None] | None = None) -> HarvestResult:
    """Harvest `config.hooks` of `lm` (default: load_model(config.model)) over the corpus into `out`.

    An existing store is resumed from its committed counter if it was made with the same settings
    (model, weights, hooks, context length, dtype, corpus, batch/commit sizes, val fraction) and
    refused otherwise; `overwrite=True` replaces it (the old file stays until the new skeleton is
    complete). Every check runs before the output file is touched (see the module docstring); a
    failed run removes the folders it created. `on_phase(name, commit_index)` is called at
    "created", "hook_written", "rows_flushed" and "committed" (for crash tests); `notify(line)`
    receives notices for the user (e.g. when no token cap was given).
    """
    config.validate()
    out = store_file(config, out)
    check_store_path(out)
    if lm is None:
        from featureatlas.activation_store.models.registry import load_config

        model_config, model_name = load_config(config.model), config.model
    else:
        model_config, model_name = lm.config, lm.model_id
    if model_config is not None:  # hooks and context length against the model (errors naming the fix)
        for hook in config.hooks:
            model_config.check_hook(hook, model_name)
        check_context_length(config.corpus, model_config.max_ctx)
    documents = read_documents(config.corpus)
    created = [d for d in (out.parent, *out.parent.parents) if not d.exists()]  # deepest first
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with store_lock(out):
            existing = ActivationStore.open(out) if out.exists() and not overwrite else None
            if lm is None:
                from featureatlas.activation_store.models import load_model

                lm = load_model(config.model)
            elif config.model != lm.model_id:
                config = config.replace(model=lm.model_id)  # record the model actually used
            corpus = build_corpus(config.corpus, lm.tokenizer, max_ctx=lm.config.max_ctx, documents=documents)
            corpus, shard_attrs = shard_of(corpus, config.shard)
            identity = {**store_identity(lm, config, corpus), **shard_attrs}
            if existing is not None:
                # The model is identified by model_id + weights_hash, not by how it was named on the command line.
                old, defaults = existing.harvest_config, HarvestConfig().to_dict()
                asked = {**identity["harvest_config"], "model": old.get("model")}
                # A setting added after the store was written, asked at its default, is no difference.
                expected = {**identity, "harvest_config": {k: v for k, v in asked.items()
                                                           if k in old or v != defaults.get(k)}}
                check_compatible(existing.attrs, expected, out)  # (open holds no file handle: nothing to close)
                if existing.complete:
                    return HarvestResult(existing)
            start = existing.n_committed if existing is not None else 0
            row_bytes = sum(identity["dims"].values()) * np.dtype(config.dtype).itemsize * corpus.context_length
            check_free_space(out, (corpus.n_contexts - start) * row_bytes,
                             f"harvesting contexts [{start}, {corpus.n_contexts})")
            if existing is None:
                create_store(out, tokens_NxT=corpus.tokens_NxT, n_valid_N=corpus.n_valid_N,
                             doc_id_N=corpus.doc_id_N, label_N=corpus.label_N, label_names=corpus.label_names,
                             dims=identity["dims"], dtype=config.dtype, attrs=identity,
                             commit_contexts=config.commit_contexts, val_fraction=config.val_fraction,
                             bos_id=lm.tokenizer.bos_id, tokenizer=corpus.tokenizer_name)
                if on_phase is not None:
                    on_phase("created", -1)
            with contextlib.closing(StoreWriter(out, fsync=fsync, on_phase=on_phase)) as writer:
                result = _run(lm, config, corpus, writer, progress, notify)
    except BaseException:
        for d in created:  # remove the folders made above, deepest first, up to one something else was put in
            try:
                d.rmdir()
            except OSError:
                break
        raise
    result.store = ActivationStore.open(out)
    return result


def _forward_rows(lm, config: HarvestConfig, corpus: PackedCorpus, start: int, timing: dict):
    """(c0, n_real, {hook: rows}) for every batch from context `start` on (runs on the Prefetcher
    thread). timing["stall_s"] collects the time spent suspended at `yield`, i.e. waiting for room."""
    N, T, B = corpus.n_contexts, corpus.context_length, config.batch_size
    hooks = tuple(config.hooks)
    params = lm.params_in(config.compute_dtype)  # cast once, not inside every forward

    def dispatch(c0):
        tokens, mask, n_real = batch_inputs(corpus, c0, B)
        _, caps = lm.forward(params, tokens, attention_mask_BxT=mask, capture=hooks, stop_at="capture",
                             compute_dtype=config.compute_dtype)
        return c0, caps, mask, n_real

    starts = list(range(start, N, B))
    pending = dispatch(starts[0]) if starts else None
    for i in range(len(starts)):
        c0, caps, mask, n_real = pending
        # Dispatch the next batch before converting this one, so the device is never idle.
        pending = dispatch(starts[i + 1]) if i + 1 < len(starts) else None
        rows = {h: to_store_rows(caps[h], mask, n_real, config.dtype, h, c0 * T) for h in hooks}
        t0 = time.perf_counter()
        yield c0, n_real, rows
        timing["stall_s"] += time.perf_counter() - t0


RATE_BATCHES = 4  # batches (after the first, which compiles) timed for the whole-corpus estimate


def _whole_corpus_notice(corpus: PackedCorpus, remaining_tokens: int, rate: float | None) -> str:
    eta = f", about {remaining_tokens / rate / 60:.1f} min at the measured {rate:,.0f} tokens/s" if rate else ""
    return (f"note: no --max-tokens given, so the whole corpus is harvested: {corpus.n_tokens:,} tokens in "
            f"{corpus.n_contexts:,} contexts ({remaining_tokens:,} to go{eta}); pass --max-tokens N to harvest less")


def _run(lm, config: HarvestConfig, corpus: PackedCorpus, writer: StoreWriter, progress: bool,
         notify: Callable[[str], None] | None) -> HarvestResult:
    from tqdm.auto import tqdm

    N, C = corpus.n_contexts, config.commit_contexts
    start = writer.n_committed
    hooks = tuple(config.hooks)
    done_tokens = int(corpus.n_valid_N[:start].sum())
    remaining = corpus.n_tokens - done_tokens
    announce = notify if notify is not None and config.corpus.max_tokens is None else None
    n_batches = -(-(N - start) // config.batch_size)
    timing = {"stall_s": 0.0}
    write_s, t_start, t_first, seen_tokens = 0.0, time.perf_counter(), 0.0, 0
    block, block_n = [], 0  # the batches ({hook: rows}) gathered for the next commit, and their contexts
    with (tqdm(total=corpus.n_tokens, initial=done_tokens, unit="tok", unit_scale=True, disable=not progress,
               desc=f"harvest {','.join(hooks)}", smoothing=0.1) as bar,
          Prefetcher(lambda: _forward_rows(lm, config, corpus, start, timing), depth=2,
                     name="harvest-forward") as batches):
        for i, (c0, n_real, rows) in enumerate(batches):
            tokens = int(corpus.n_valid_N[c0:c0 + n_real].sum())
            if i == 0:
                t_first, first_tokens = time.perf_counter(), tokens  # the first batch also paid for compiling
            if announce is not None and i == min(RATE_BATCHES, n_batches - 1):
                # batches 1..i were produced between the arrivals of batch 0 and batch i
                rate = (seen_tokens - first_tokens + tokens) / (time.perf_counter() - t_first) if i else None
                announce(_whole_corpus_notice(corpus, remaining, rate))
                announce = None
            seen_tokens += tokens
            block.append(rows)
            block_n, c1 = block_n + n_real, c0 + n_real
            if block_n == C or c1 == N:
                t0 = time.perf_counter()
                writer.commit(c1 - block_n, c1, {h: np.concatenate([b[h] for b in block]) for h in hooks})
                write_s += time.perf_counter() - t0
                block, block_n = [], 0
            bar.update(tokens)
    return HarvestResult(store=None, new_contexts=N - start, new_tokens=remaining,
                         wall_s=time.perf_counter() - t_start, write_s=write_s, stall_s=timing["stall_s"])


def describe(result: HarvestResult) -> str:
    s = result.store
    return json.dumps({"store": str(s.path), "contexts": s.n_contexts, "tokens": int(s.n_valid.sum()),
                       "new_tokens": result.new_tokens, "tokens_per_s": round(result.tokens_per_s, 1),
                       "write_share": round(result.write_s / result.wall_s, 4) if result.wall_s else 0.0})
