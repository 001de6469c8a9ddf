"""`featureatlas cache`: one streaming pass of a dictionary over a store: the feature activation cache.

    featureatlas cache --store runs/x/store.h5 --dictionary runs/x/sae --out runs/x/cache-sae
    featureatlas cache --store S --dictionary runs/x/snmf@2 --out runs/x/cache-snmf-L2   # hierarchy level 2
    featureatlas cache --store S --dictionary neurons:mlp_hidden.15 --out runs/x/cache-neurons

Per feature: exact top activating contexts, samples per activation-quantile bin, random non-activating
contexts, density, max, mean, a log-spaced histogram and co-occurrences, split by context into an
explain set and a disjoint held-out set (eval/cache.py). Writes cache.h5 into --out; a killed pass
resumes with --resume, and --resume after the store grew caches the new contexts.
"""
from __future__ import annotations

import dataclasses

from featureatlas.activation_store.configs import Config, add_config_arguments, config_from_args, flags_of, setting


@dataclasses.dataclass
class CacheJob(Config):
    """Inputs and output of the cache job."""

    store: str = setting()
    """Activation store (HDF5) holding the dictionary's hook."""
    dictionary: str = setting()
    """Saved dictionary: an SAE/SNMF/DiffMeans/PCA folder (SNMF level: PATH@LEVEL), SAELens folder, or neurons:HOOK."""
    out: str = setting()
    """Run directory for cache.h5."""
    resume: bool = setting(False)
    """Continue an interrupted pass (or cache contexts added to the store since)."""
    overwrite: bool = setting(False)
    """Replace a cache already in --out."""
    progress: bool = setting(True)
    """Show a progress bar."""


def register(subparsers) -> None:
    from featureatlas.eval.cache import CacheConfig

    p = subparsers.add_parser("cache", help="feature activation cache: top/quantile/negative examples, density, "
                              "histograms", description=__doc__.split("\n\n")[0])
    add_config_arguments(p, CacheJob)
    add_config_arguments(p, CacheConfig, title="what is kept")
    p.set_defaults(func=run)


def run(args) -> int:
    from featureatlas.activation_store.store import ActivationStore
    from featureatlas.eval.cache import CacheConfig, build_cache
    from featureatlas.scripts.dictionaries import load_for_store

    job = config_from_args(CacheJob, args).validate()
    cfg = config_from_args(CacheConfig, args).validate()
    store = ActivationStore.open(job.store)
    dic = load_for_store(job.dictionary, store)
    path = build_cache(store, dic, cfg, job.out, dictionary_id=job.dictionary, resume=job.resume,
                       overwrite=job.overwrite, flags=flags_of(CacheJob, CacheConfig), progress=job.progress)
    from featureatlas.eval.cache import FeatureCache

    cache = FeatureCache(path)
    print(f"cached {int(cache['n_tokens'])} tokens of {int(cache.attrs['n_contexts'])} contexts for "
          f"{cache.n_features} features ({int(cache.dead.sum())} dead) -> {path}")
    return 0
