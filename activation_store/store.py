"""The HDF5 activation store: one file per harvest, written crash-safely, read as shuffled batches.

The public names live here; the code is split by concern:
    store_format   layout, constants, errors, pure helpers (split, CRCs, attribute encoding, diagnosis)
    store_writer   create_store, StoreWriter (committed appends, free-space check), store_lock, write_store
    store_reader   ActivationStore (metadata, rows, aligned shuffled batches, sample, stats, verify)
    shuffle        ShufflePlan (the row order) and the block-wise batch reads
"""
from featureatlas.activation_store.store_format import (DTYPES, FLOAT16_MAX, NotAStoreError, StoreCorruptedError,
                                                        StoreError, StoreMismatchError, check_compatible,
                                                        val_context_mask)
from featureatlas.activation_store.store_reader import ActivationStore, StoreNotFoundError, stats_path
from featureatlas.activation_store.store_writer import (DiskFullError, StoreBusyError, StoreWriter, check_free_space,
                                                        create_store, store_lock, write_store)

__all__ = [
    "ActivationStore", "DTYPES", "DiskFullError", "FLOAT16_MAX", "NotAStoreError", "StoreBusyError",
    "StoreCorruptedError", "StoreError", "StoreMismatchError", "StoreNotFoundError", "StoreWriter", "check_compatible",
    "check_free_space", "create_store", "stats_path", "store_lock", "val_context_mask", "write_store",
]
