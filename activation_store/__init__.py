"""Model zoo, corpora, harvesting and the HDF5 activation store.

    from featureatlas.activation_store import ActivationStore, harvest, HarvestConfig, CorpusConfig
"""
from featureatlas.activation_store.corpus import CorpusConfig, CorpusError, PackedCorpus, build_corpus
from featureatlas.activation_store.harvest import Float16OverflowError, HarvestConfig, HarvestError, HarvestResult, harvest
from featureatlas.activation_store.prefetch import Prefetcher
from featureatlas.activation_store.store import (ActivationStore, StoreCorruptedError, StoreError, StoreMismatchError,
                                                 write_store)

__all__ = [
    "ActivationStore", "CorpusConfig", "CorpusError", "Float16OverflowError", "HarvestConfig", "HarvestError",
    "HarvestResult", "PackedCorpus", "Prefetcher", "StoreCorruptedError", "StoreError", "StoreMismatchError",
    "build_corpus", "harvest", "write_store",
]
