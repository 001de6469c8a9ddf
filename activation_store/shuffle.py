"""Shuffled batches from a store: the row order (a pure function of the selection and the seed) and
the block-wise reads that produce the batches.

Order. The store's rows are grouped in blocks of R rows (one HDF5 chunk of the widest-chunked hook).
Per epoch e the blocks are permuted by (seed, e); consecutive runs of G blocks (about
`shuffle_buffer_rows` rows) form a shuffle buffer whose selected rows are permuted by
(seed, e, buffer index). Every selected row appears exactly once per epoch, epochs follow one
another seamlessly, and batch i holds stream positions [i·B, (i+1)·B), so a reader started at
`start_step = i` continues exactly at batch i without reading the skipped data. Several hooks read
at the same rows give aligned batches (row j of every hook's batch is the same token).

Reads. Each batch is gathered block by block: a block of R rows is read once (contiguous, one
chunk) and kept while the shuffle buffer that needs it is being consumed, so the reader touches
each chunk about once per epoch.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import h5py
import numpy as np


class ShufflePlan:
    """The row order of every epoch, computed from the row selection alone (no data read).

    rows: sorted selected row indices; block_rows R: rows per block (one HDF5 chunk);
    group_blocks G: blocks per shuffle buffer.
    """

    def __init__(self, rows: np.ndarray, block_rows: int, n_blocks: int, group_blocks: int, shuffle: bool, seed: int):
        self.rows, self.R, self.n_blocks, self.G = rows, block_rows, n_blocks, group_blocks
        self.shuffle, self.seed = shuffle, seed
        # rows of block b are rows[starts[b]:starts[b+1]]
        self.starts = np.searchsorted(rows, np.arange(n_blocks + 1, dtype=np.int64) * block_rows)

    def segments(self, position: int) -> Iterator[np.ndarray]:
        """Row index arrays that, concatenated, form the infinite stream from `position` on: per epoch,
        the shuffle buffers (groups of G blocks in the epoch's block order) with their rows permuted."""
        epoch, offset = divmod(position, self.rows.size)
        while True:
            order = (np.random.default_rng([self.seed, epoch, 0]).permutation(self.n_blocks) if self.shuffle
                     else np.arange(self.n_blocks))
            per_group = np.add.reduceat(np.diff(self.starts)[order], np.arange(0, self.n_blocks, self.G))
            ends = np.cumsum(per_group)
            g = int(np.searchsorted(ends, offset, side="right"))
            skip = offset - (int(ends[g - 1]) if g else 0)
            for gi in range(g, len(per_group)):
                if per_group[gi] == 0:
                    continue
                rows = np.concatenate([self.rows[self.starts[b]:self.starts[b + 1]]
                                       for b in order[gi * self.G:(gi + 1) * self.G]])
                if self.shuffle:
                    rows = rows[np.random.default_rng([self.seed, epoch, 1, gi]).permutation(rows.size)]
                yield rows[skip:]
                skip = 0
            epoch, offset = epoch + 1, 0

    def batch_rows(self, batch_size: int, start_step: int = 0) -> Iterator[np.ndarray]:
        """Row indices of batch start_step, start_step+1, ..."""
        pending, n_pending = [], 0
        for seg in self.segments(start_step * batch_size):
            pending.append(seg)
            n_pending += seg.size
            while n_pending >= batch_size:
                cat = np.concatenate(pending) if len(pending) > 1 else pending[0]
                yield cat[:batch_size]
                pending, n_pending = [cat[batch_size:]], n_pending - batch_size


def gather_rows(ds, rows: np.ndarray, R: int, limit: int, cache: dict) -> np.ndarray:
    """ds rows in the given order, reading whole blocks of R rows once each (cached in `cache`)."""
    out = np.empty((rows.size, ds.shape[1]), ds.dtype)
    if not rows.size:
        return out
    blocks = rows // R
    order = np.argsort(blocks, kind="stable")
    for idx in np.split(order, np.flatnonzero(np.diff(blocks[order])) + 1):
        b = int(blocks[idx[0]])
        if b not in cache:
            cache[b] = ds[b * R:min((b + 1) * R, limit)]
        out[idx] = cache[b][rows[idx] - b * R]
    return out


class StackedRows:
    """The first n_rows[i] rows of each dataset, stacked: what a sharded store's hook reads as. Supports
    what the readers use of an h5py dataset: `shape`, `dtype`, `chunks` and contiguous slices; `chunks`
    is the block the readers read at once (the chunk of the unsharded store, so both give the same
    batches), which may span several of the files' own chunks."""

    def __init__(self, datasets: Sequence, n_rows: Sequence[int], block_rows: int):
        self.datasets = list(datasets)
        self.offsets = np.concatenate([[0], np.cumsum(n_rows)]).astype(np.int64)
        self.shape = (int(self.offsets[-1]), int(self.datasets[0].shape[1]))
        self.dtype = self.datasets[0].dtype
        self.chunks = (int(block_rows), self.shape[1])

    def __getitem__(self, rows: slice) -> np.ndarray:
        a, b, _ = rows.indices(self.shape[0])
        pieces = [ds[max(a, lo) - lo:min(b, hi) - lo]
                  for ds, lo, hi in zip(self.datasets, self.offsets[:-1], self.offsets[1:]) if a < hi and b > lo]
        if not pieces:
            return np.empty((0, self.shape[1]), self.dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def stacked_rows(handles: Sequence[h5py.File], n_rows: Sequence[int], hook: str, block_rows: int | None):
    """`hook`'s rows across the open files of a store (the dataset itself for a one-file store, whose
    block_rows is None: its chunk)."""
    datasets = [f["acts"][hook] for f in handles]
    return datasets[0] if block_rows is None else StackedRows(datasets, n_rows, block_rows)


def read_batches(files: Sequence[tuple[str, int]], blocks: dict, plan: ShufflePlan, batch_size: int,
                 start_step: int, sharding, dtype, limit: int) -> Iterator[dict]:
    """{hook: device array [batch_size, d]} for batch start_step, start_step+1, ... (all hooks at the
    same rows). `files`: the store's (path, committed rows) in row order; `blocks`: {hook: block rows
    of a sharded store, or None}. Opens its own handles, so it runs on the prefetch thread."""
    import jax

    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(h5py.File(path, "r", locking=False)) for path, _ in files]
        datasets = {h: stacked_rows(handles, [n for _, n in files], h, R) for h, R in blocks.items()}
        local = None  # the contiguous slice of the global batch this process must provide (None: all of it)
        if sharding is not None and jax.process_count() > 1:
            shape = (batch_size, next(iter(datasets.values())).shape[1])
            slices = [index[0] for index in sharding.addressable_devices_indices_map(shape).values()]
            local = slice(min(s.start or 0 for s in slices),
                          max(batch_size if s.stop is None else s.stop for s in slices))
        caches: dict[str, dict] = {h: {} for h in blocks}
        for rows in plan.batch_rows(batch_size, start_step):
            mine = rows if local is None else rows[local]
            out = {}
            for h, ds in datasets.items():
                R = int(ds.chunks[0])
                x = gather_rows(ds, mine, R, limit, caches[h]).astype(dtype, copy=False)
                # Keep about one shuffle buffer of blocks (a batch straddling two buffers holds both briefly):
                # drop the oldest beyond that, except those this batch reads.
                cache, keep = caches[h], (plan.G + 4) * max(1, plan.R // R)
                if len(cache) > keep:
                    needed = set((mine // R).tolist())
                    for b in list(cache)[:len(cache) - keep]:
                        if b not in needed:
                            del cache[b]
                # this process's slice of the host batch as a device array laid out by `sharding`
                out[h] = (jax.device_put(x, sharding) if local is None  # sharding None: the default device
                          else jax.make_array_from_process_local_data(sharding, x, (batch_size, x.shape[1])))
            yield out
