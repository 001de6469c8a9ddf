"""Where the activation matrix comes from: an in-memory array or an activation store.

`ArrayColumns` and `StoreColumns` list tokens in a fixed order (column j of A is token j) and
yield them in row layout (X_CxD, tokens × hook dimension), which is how the store keeps them.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from featureatlas.activation_store.errors import ConfigError


@dataclasses.dataclass
class ArrayColumns:
    """Tokens from an in-memory array X_NxD (tests, benchmarks)."""

    X_NxD: np.ndarray
    labels_N: np.ndarray | None = None  # per-token label (−1 none), for DiffMeans

    @property
    def n(self) -> int:
        return self.X_NxD.shape[0]

    @property
    def d(self) -> int:
        return self.X_NxD.shape[1]

    def chunks(self, chunk_size: int) -> Iterator[tuple[int, np.ndarray]]:
        """(start, X_CxD) in order."""
        for start in range(0, self.n, chunk_size):
            yield start, self.X_NxD[start:start + chunk_size]

    def take(self, cols: np.ndarray) -> np.ndarray:
        """X rows for sorted token indices."""
        return np.asarray(self.X_NxD[cols])

    def labels(self) -> np.ndarray:
        return np.full(self.n, -1, np.int64) if self.labels_N is None else np.asarray(self.labels_N)


@dataclasses.dataclass
class StoreColumns:
    """Tokens of one hook of an `activation_store.ActivationStore` (BOS and padding excluded).

    rows_N: the store rows in order (`store.token_rows(split)`, optionally subsampled).
    """

    store: object
    hook: str
    rows_N: np.ndarray
    split: str = "train"
    full: bool = True  # rows_N is the whole split in store order (iter_chunks can be used)

    @classmethod
    def open(cls, store, hook: str, *, split: str = "train", max_tokens: int | None = None,
             seed: int = 0) -> "StoreColumns":
        if hook not in store.hooks:
            raise ConfigError(f"--hook {hook!r} is not in the store {store.path}; it has {', '.join(store.hooks)}")
        rows = np.asarray(store.token_rows(split=split, exclude_bos=True), np.int64)
        if len(rows) == 0:
            raise ConfigError(f"the store {store.path} has no {split} tokens ({store.n_committed} contexts "
                              "committed): harvest more contexts, or pick another --split")
        full = True
        if max_tokens is not None and max_tokens < len(rows):
            # a uniform, seeded subset in store order (sorted reads are fast in HDF5)
            pick = np.sort(np.random.default_rng([seed, 11]).choice(len(rows), max_tokens, replace=False))
            rows, full = rows[pick], False
        return cls(store, hook, rows, split, full)

    @property
    def n(self) -> int:
        return len(self.rows_N)

    @property
    def d(self) -> int:
        return int(self.store.dim(self.hook))

    def chunks(self, chunk_size: int) -> Iterator[tuple[int, np.ndarray]]:
        if self.full:
            start = 0
            native = np.float16 if self.store.dtype == "float16" else np.float32
            for X in self.store.iter_chunks(self.hook, chunk_size, split=self.split, exclude_bos=True,
                                            dtype=native):
                yield start, X
                start += len(X)
            if start != self.n:
                raise RuntimeError(f"store yielded {start} tokens, expected {self.n}")
        else:
            for start in range(0, self.n, chunk_size):
                yield start, self.store.read_rows(self.hook, self.rows_N[start:start + chunk_size])

    def take(self, cols: np.ndarray) -> np.ndarray:
        return np.asarray(self.store.read_rows(self.hook, self.rows_N[cols]))

    def labels(self) -> np.ndarray:
        """Per-token label: the label of the token's context (−1 none)."""
        return np.asarray(self.store.labels)[self.rows_N // int(self.store.context_length)]

    def token_ids(self) -> np.ndarray:
        """Per-token vocabulary id."""
        T = int(self.store.context_length)
        return np.asarray(self.store.tokens)[self.rows_N // T, self.rows_N % T]


def load_matrix(source, dtype=np.float32) -> np.ndarray:
    """The whole A as d×n (tokens as columns), for the full-batch solver."""
    A_DxN = np.empty((source.d, source.n), dtype)
    for start, X in source.chunks(65536):
        A_DxN[:, start:start + len(X)] = X.T
    return A_DxN
