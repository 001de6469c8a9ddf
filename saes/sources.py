"""Where training batches come from: an activation store (`StoreBatches`), or in-memory arrays
(`ArrayBatches`, for tests and benchmarks).

A source yields, for step s = 0, 1, ..., a dict {hook: [B, d] array} in which every hook's rows are
the same token rows when they must line up (a transcoder's input and target). The stream is a pure
function of (seed, batch_size, step), so training resumes at any step with the same data order.
`exclude_massive()` leaves massive-activation tokens out of everything the source gives from then on
(batches, samples, statistics); the rule is activation_store/massive.py's.

What the trainer uses of a source (both classes have it): attributes hooks (tuple of hook names),
fingerprint, model_id, path; dim(hook) -> int; mean_sq_norm(hook) -> float; sample(hook, n, seed) ->
[n, d] array; batches(batch_size, seed, start_step, sharding=None) -> iterator of {hook: [B, d]};
locate_nonfinite(hook) -> str; exclude_massive() -> dict; record() -> dict. StoreBatches also has
`store` (the trainer reads the massive-token thresholds from it).
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Iterator

import jax
import numpy as np

from featureatlas.activation_store.errors import ConfigError
from featureatlas.activation_store.massive import (DEFAULT_FACTOR, RULE, massive_mask, norm_threshold,
                                                   store_norm_threshold)

_READ_ROWS = 1 << 16  # rows read at once when scanning a store


def _massive_record(thresholds: dict[str, float], n_excluded: int, n_rows: int, n_median: int) -> dict:
    return {"rule": RULE.format(factor=DEFAULT_FACTOR, n=n_median), "thresholds": thresholds,
            "excluded_tokens": int(n_excluded), "of_tokens": int(n_rows)}


def _describe_rows(bad: np.ndarray, what: str, context_length: int | None = None) -> str:
    if not bad.size:
        return f"no non-finite {what} found"
    text = f"{bad.size} {what} with NaN/Inf, first {bad[:8].tolist()}; range [{bad.min()}, {bad.max()}]"
    if context_length:
        ctx = np.unique(bad // context_length)
        text += f" (contexts {ctx[:8].tolist()}{'...' if ctx.size > 8 else ''})"
    return text


class ArrayBatches:
    """Batches from in-memory arrays {hook: [N, d]} (rows aligned across hooks).

    The stream concatenates epochs over the kept rows (all, or those left after `exclude_massive`);
    epoch e is a permutation drawn from (seed, e), so batch s holds stream positions [s·B, (s+1)·B).
    """

    def __init__(self, arrays: dict[str, np.ndarray], *, shuffle: bool = True, fingerprint: str = "arrays",
                 model_id: str = ""):
        n = {len(a) for a in arrays.values()}
        if len(n) != 1:
            raise ConfigError(f"all arrays must have the same number of rows, got {sorted(n)}")
        self.arrays = {h: np.asarray(a, np.float32) for h, a in arrays.items()}
        self.hooks = tuple(arrays)
        self.keep = np.arange(n.pop())
        self.shuffle, self.fingerprint, self.model_id, self.path = shuffle, fingerprint, model_id, ""
        self._massive: dict | None = None

    def dim(self, hook: str) -> int:
        if hook not in self.arrays:
            raise ConfigError(f"no activations for hook {hook!r}; have {', '.join(self.hooks)}")
        return self.arrays[hook].shape[1]

    def mean_sq_norm(self, hook: str) -> float:
        a = self.arrays[hook][self.keep].astype(np.float64)
        return float(np.einsum("nd,nd->", a, a) / len(a))

    def sample(self, hook: str, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng([seed, 7])
        return self.arrays[hook][self.keep[np.sort(rng.choice(self.keep.size, size=min(n, self.keep.size),
                                                              replace=False))]]

    def rows(self, batch_size: int, seed: int, step: int) -> np.ndarray:
        """Array rows of batch `step`."""
        n = self.keep.size
        epochs, offs = np.divmod(np.arange(step * batch_size, (step + 1) * batch_size), n)
        out = np.empty(batch_size, np.int64)
        for e in np.unique(epochs):
            order = np.random.default_rng([seed, int(e)]).permutation(n) if self.shuffle else np.arange(n)
            sel = epochs == e
            out[sel] = self.keep[order[offs[sel]]]
        return out

    def batches(self, batch_size: int, seed: int, start_step: int, sharding=None) -> Iterator[dict]:
        for step in itertools.count(start_step):
            rows = self.rows(batch_size, seed, step)
            yield {h: jax.device_put(a[rows], sharding) for h, a in self.arrays.items()}

    def locate_nonfinite(self, hook: str) -> str:
        bad = np.flatnonzero(~np.isfinite(self.arrays[hook]).all(axis=1))
        return _describe_rows(bad, "array rows")

    def exclude_massive(self) -> dict:
        """Keep only rows that are not massive in any hook (norm > factor x median norm of that hook)."""
        if self._massive is None:
            massive = np.zeros(self.keep.size, bool)
            thresholds = {}
            for h, a in self.arrays.items():
                norms = np.linalg.norm(a[self.keep], axis=1)
                thresholds[h] = norm_threshold(norms)
                massive |= massive_mask(norms, thresholds[h])
            self._massive = _massive_record(thresholds, massive.sum(), self.keep.size, self.keep.size)
            self.keep = self.keep[~massive]
        return self._massive

    def record(self) -> dict:
        return {"source": "arrays", "tokens": int(self.keep.size),
                **({"massive_excluded": self._massive} if self._massive else {})}


class StoreBatches:
    """Batches from an ActivationStore through its public batching API (`store.batches`), prefetched on
    the store's background reader (activation_store/prefetch.py).

    aligned=True: one reader over all hooks, every hook at the same token rows (transcoders need it).
    aligned=False: one reader per hook, each in its own store order (the order an SAE trained on that
    hook alone would see). Only committed contexts are read; `record()` says how many of the planned
    ones that was, so a partial store (a harvest killed or still running) is visible in the results.
    """

    def __init__(self, store, hooks, *, split: str = "train", exclude_bos: bool = True, aligned: bool = True):
        self.store = store
        self.aligned = aligned
        self.hooks = tuple(dict.fromkeys(hooks))
        for h in self.hooks:
            store.check_hook(h)
        self.split, self.exclude_bos = split, exclude_bos
        self.fingerprint, self.model_id, self.path = store.fingerprint, store.model_id, str(store.path)
        self.rows: np.ndarray | None = None  # None: every token row of the split
        self._sq_norms: dict[str, float] = {}
        self._massive: dict | None = None

    def dim(self, hook: str) -> int:
        return self.store.dim(hook)

    def _selection(self) -> np.ndarray:
        return self.store.select_rows(self.split, self.exclude_bos, self.rows)

    def mean_sq_norm(self, hook: str) -> float:
        return self._sq_norms[hook] if hook in self._sq_norms else float(self.store.stats(hook)[1])

    def sample(self, hook: str, n: int, seed: int) -> np.ndarray:
        return self.store.sample(hook, n, seed, split=self.split, exclude_bos=self.exclude_bos, rows=self.rows)

    def batches(self, batch_size: int, seed: int, start_step: int, sharding=None) -> Iterator[dict]:
        groups = [self.hooks] if self.aligned else [(h,) for h in self.hooks]
        with contextlib.ExitStack() as stack:
            readers = [stack.enter_context(self.store.batches(
                list(g), batch_size, shuffle=True, seed=seed, start_step=start_step, split=self.split,
                exclude_bos=self.exclude_bos, sharding=sharding, rows=self.rows)) for g in groups]
            for parts in zip(*readers):
                yield {h: x for part in parts for h, x in part.items()}

    def _scan(self, hook: str):
        """(rows, activations) of the selected rows of `hook`, in chunks."""
        rows = self._selection()
        for start in range(0, rows.size, _READ_ROWS):
            chunk = rows[start:start + _READ_ROWS]
            yield chunk, self.store.read_rows(hook, chunk)

    def locate_nonfinite(self, hook: str) -> str:
        bad = [chunk[~np.isfinite(x).all(axis=1)] for chunk, x in self._scan(hook)]
        return _describe_rows(np.concatenate(bad) if bad else np.zeros(0, np.int64), f"store rows of {hook}",
                              self.store.context_length)

    def exclude_massive(self) -> dict:
        """Keep only rows that are not massive in any hook: norm > activation_store.massive's threshold
        (DEFAULT_FACTOR x the median norm of a fixed sample of train tokens). One pass over each hook,
        which also gives the mean squared norm of the kept rows (the normalisation scale)."""
        if self._massive is not None:
            return self._massive
        rows = self._selection()
        massive = np.zeros(rows.size, bool)
        norms = {}
        thresholds = {h: store_norm_threshold(self.store, h) for h in self.hooks}
        for h in self.hooks:
            norms[h] = np.concatenate([np.linalg.norm(x.astype(np.float64), axis=1) for _, x in self._scan(h)]
                                      or [np.zeros(0)])
            massive |= massive_mask(norms[h], thresholds[h])
        if massive.all():
            raise ConfigError(f"every selected token of {self.path} counts as massive; train without --exclude-massive")
        self.rows = rows[~massive]
        self._sq_norms = {h: float(np.mean(norms[h][~massive] ** 2)) for h in self.hooks}
        n_median = min(65536, self.store.token_rows("train", True).size or self.store.token_rows("all", True).size)
        self._massive = _massive_record(thresholds, massive.sum(), rows.size, n_median)
        return self._massive

    def record(self) -> dict:
        """What the SAEs are trained on, saved beside them (config.json "data", results.json)."""
        st = self.store
        return {"store": self.path, "contexts_used": int(st.n_committed), "contexts_planned": int(st.n_planned),
                "store_complete": bool(st.complete), "split": self.split, "exclude_bos": self.exclude_bos,
                "tokens": int(self._selection().size), **({"massive_excluded": self._massive} if self._massive else {})}
