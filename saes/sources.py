"""Where training batches come from: an activation store, or in-memory arrays (tests, benchmarks).

A source yields, for step s, 0, 1, ..., a dict {hook: [B, d] array} in which every hook's rows are
the same token rows (so a transcoder's input and target line up). The stream is a pure function of
(seed, batch_size, step), so training resumes at any step with the same data order.
"""
from __future__ import annotations

import threading
from typing import Iterator, Protocol

import jax
import numpy as np


class BatchSource(Protocol):
    hooks: tuple[str, ...]
    fingerprint: str
    model_id: str

    def dim(self, hook: str) -> int: ...

    def mean_sq_norm(self, hook: str) -> float: ...

    def sample(self, hook: str, n: int, seed: int) -> np.ndarray: ...

    def batches(self, batch_size: int, seed: int, start_step: int, sharding=None) -> Iterator[dict]: ...

    def locate_nonfinite(self, hook: str) -> str: ...


def _put(x: np.ndarray, sharding):
    return jax.device_put(x, sharding) if sharding is not None else jax.device_put(x)


class ArraySource:
    """Batches from in-memory arrays {hook: [N, d]} (rows aligned across hooks).

    The stream concatenates epochs; epoch e is a permutation drawn from (seed, e), so batch s holds
    stream positions [s·B, (s+1)·B).
    """

    def __init__(self, arrays: dict[str, np.ndarray], *, shuffle: bool = True, fingerprint: str = "arrays",
                 model_id: str = ""):
        n = {len(a) for a in arrays.values()}
        if len(n) != 1:
            raise ValueError(f"all arrays must have the same number of rows, got {sorted(n)}")
        self.arrays = {h: np.asarray(a, np.float32) for h, a in arrays.items()}
        self.hooks = tuple(arrays)
        self.n = n.pop()
        self.shuffle = shuffle
        self.fingerprint = fingerprint
        self.model_id = model_id

    def dim(self, hook: str) -> int:
        self._check(hook)
        return self.arrays[hook].shape[1]

    def _check(self, hook: str) -> None:
        if hook not in self.arrays:
            raise ValueError(f"no activations for hook {hook!r}; have {', '.join(self.hooks)}")

    def mean_sq_norm(self, hook: str) -> float:
        a = self.arrays[hook].astype(np.float64)
        return float(np.einsum("nd,nd->", a, a) / len(a))

    def sample(self, hook: str, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng([seed, 7])
        return self.arrays[hook][np.sort(rng.choice(self.n, size=min(n, self.n), replace=False))]

    def _order(self, epoch: int, seed: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([seed, epoch]).permutation(self.n)

    def rows(self, batch_size: int, seed: int, step: int) -> np.ndarray:
        pos = np.arange(step * batch_size, (step + 1) * batch_size)
        epochs, offs = np.divmod(pos, self.n)
        out = np.empty(batch_size, np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._order(int(e), seed)[offs[sel]]
        return out

    def batches(self, batch_size: int, seed: int, start_step: int, sharding=None) -> Iterator[dict]:
        step = start_step
        while True:
            rows = self.rows(batch_size, seed, step)
            yield {h: _put(a[rows], sharding) for h, a in self.arrays.items()}
            step += 1

    def locate_nonfinite(self, hook: str) -> str:
        bad = np.flatnonzero(~np.isfinite(self.arrays[hook]).all(axis=1))
        return _describe_rows(bad, "array rows")


def _describe_rows(bad: np.ndarray, what: str, context_length: int | None = None) -> str:
    if not bad.size:
        return f"no non-finite {what} found"
    text = f"{bad.size} {what} with NaN/Inf, first {bad[:8].tolist()}; range [{bad.min()}, {bad.max()}]"
    if context_length:
        ctx = np.unique(bad // context_length)
        text += f" (contexts {ctx[:8].tolist()}{'...' if ctx.size > 8 else ''})"
    return text


class StoreSource:
    """Batches from an ActivationStore (activation_store.store), all hooks at the same shuffled rows.

    When every hook shares one HDF5 block layout, the store's own `batches` iterators (one per hook,
    same seed) already visit the same rows in the same order; otherwise rows are planned once with the
    first hook's layout and each hook is gathered at those rows (slower: ~0.1 s per 2048-row batch of
    a 1536-d float16 hook, on the prefetch thread). With aligned=False (no transcoder reads two of the
    hooks) each hook simply streams in its own store order.
    """

    def __init__(self, store, hooks, *, split: str = "train", exclude_bos: bool = True, aligned: bool = True):
        self.store = store
        self.aligned = aligned  # False: hooks may visit rows in different orders (no transcoder pairs them)
        self.hooks = tuple(dict.fromkeys(hooks))
        for h in self.hooks:
            store.check_hook(h)
        self.split, self.exclude_bos = split, exclude_bos
        self.fingerprint = store.fingerprint
        self.model_id = store.model_id

    def dim(self, hook: str) -> int:
        return self.store.dim(hook)

    def mean_sq_norm(self, hook: str) -> float:
        return float(self.store.stats(hook)[1])

    def sample(self, hook: str, n: int, seed: int) -> np.ndarray:
        rows = self.store.token_rows(self.split, self.exclude_bos)
        rng = np.random.default_rng([seed, 7])
        pick = np.sort(rng.choice(rows, size=min(n, rows.size), replace=False))
        return self.store.read_rows(hook, pick)

    def _same_layout(self) -> bool:
        return len({self.store.block_rows(h) for h in self.hooks}) == 1

    def batches(self, batch_size: int, seed: int, start_step: int, sharding=None) -> Iterator[dict]:
        if self._same_layout() or not self.aligned:
            its = [
                self.store.batches(h, batch_size, shuffle=True, seed=seed, start_step=start_step, split=self.split,
                                   exclude_bos=self.exclude_bos, sharding=sharding)
                for h in self.hooks
            ]
            try:
                for xs in zip(*its):
                    yield dict(zip(self.hooks, xs))
            finally:
                for it in its:
                    it.close()
        else:
            yield from self._paired(batch_size, seed, start_step, sharding)

    def _paired(self, batch_size, seed, start_step, sharding):
        from featureatlas.activation_store.store import BatchIterator, ShufflePlan

        if jax.process_count() > 1:
            raise ValueError(
                f"hooks {', '.join(self.hooks)} have different HDF5 layouts; multi-host training cannot pair "
                "their rows yet: train the transcoder on one host, or its hooks in a store harvested alone"
            )
        st = self.store
        rows = st.token_rows(self.split, self.exclude_bos)
        R = st.block_rows(self.hooks[0])
        n_blocks = -(-(st.n_committed * st.context_length) // R)
        plan = ShufflePlan(rows, R, n_blocks, max(1, (1 << 16) // R), True, seed)
        stop = threading.Event()

        def gen():
            for batch_rows in plan.batch_rows(batch_size, start_step):
                if stop.is_set():
                    return
                yield {h: _put(st.read_rows(h, batch_rows), sharding) for h in self.hooks}

        it = BatchIterator(gen())
        try:
            yield from it
        finally:
            stop.set()
            it.close()

    def locate_nonfinite(self, hook: str) -> str:
        rows = self.store.token_rows(self.split, self.exclude_bos)
        bad = []
        for start in range(0, rows.size, 1 << 16):
            chunk = rows[start:start + (1 << 16)]
            x = self.store.read_rows(hook, chunk)
            bad.append(chunk[~np.isfinite(x).all(axis=1)])
        return _describe_rows(np.concatenate(bad) if bad else np.zeros(0, np.int64), f"store rows of {hook}",
                              self.store.context_length)
