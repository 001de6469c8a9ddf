"""`featureatlas cache`: one streaming pass of a dictionary over a store: the feature activation cache.

    featureatlas cache --store runs/x/store.h5 --dictionary runs/x/sae --out runs/x/cache-sae
    featureatlas cache --store S --dictionary runs/x/snmf@2 --out runs/x/cache-snmf-L2   # hierarchy level 2
    featureatlas cache --store S --dictionary neurons:mlp_hidden.15 --out runs/x/cache-neurons
    featureatlas cache --model smollm2-135m --corpus docs.jsonl --dictionary D --out runs/x/cache-d
        # no store holds the hook: the model runs over the corpus first (into --out/store.h5), then the pass

Per feature: exact top activating contexts, samples per activation-quantile bin, random non-activating
contexts, density, max, mean, a log-spaced histogram and co-occurrences, split by context into an
explain set and a disjoint held-out set (eval/cache.py). Writes cache.h5 into --out; a killed pass
resumes with --resume, and --resume after the store grew caches the new contexts.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from featureatlas.activation_store.configs import RunOptions, add_config_arguments, config_from_args, flags_of, setting
from featureatlas.activation_store.corpus import CorpusConfig
from featureatlas.activation_store.errors import ConfigError


@dataclasses.dataclass(kw_only=True)
class CacheJob(RunOptions):
    """Inputs and output of the cache job."""

    dictionary: str = setting()
    """Saved dictionary: an SAE/SNMF/DiffMeans/PCA folder (SNMF level: PATH@LEVEL), SAELens folder, or neurons:HOOK."""
    out: str = setting()
    """Run directory for cache.h5."""
    store: str = setting("")
    """Activation store (HDF5) holding the dictionary's hook; without it, --model runs over --corpus."""
    model: str = setting("")
    """Language model to run over --corpus when no --store is given (its activations go to --out/store.h5)."""


def register(subparsers) -> None:
    from featureatlas.eval.cache import CacheConfig

    p = subparsers.add_parser("cache", help="feature activation cache: top/quantile/negative examples, density, "
                              "histograms", description=__doc__.split("\n\n")[0])
    add_config_arguments(p, CacheJob)
    add_config_arguments(p, CacheConfig, title="what is kept")
    add_config_arguments(p, CorpusConfig, title="corpus (with --model, when no --store holds the hook)",
                         skip=("max_contexts", "seed", "shuffle_documents"))
    p.set_defaults(func=run)


def corpus_config(args) -> CorpusConfig:
    """The corpus flags; the ones it shares a name with the cache's (max_contexts, seed) keep the harvest defaults."""
    d = CorpusConfig()
    return config_from_args(CorpusConfig, args, max_contexts=d.max_contexts, seed=d.seed)


def store_from_corpus(job: CacheJob, corpus, hook: str, progress: bool):
    """Harvest `hook` of job.model over the corpus into --out/store.h5 (resumable like any harvest)."""
    from featureatlas.activation_store.harvest import HarvestConfig, harvest
    from featureatlas.activation_store.runs import check_output_path

    check_output_path(Path(job.out))
    cfg = HarvestConfig(model=job.model, hooks=(hook,), corpus=corpus).validate()
    path = Path(job.out) / "store.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    harvest(cfg, path, progress=progress)
    return path


def run(args) -> int:
    from featureatlas.activation_store.store import ActivationStore
    from featureatlas.eval.cache import CacheConfig, build_cache
    from featureatlas.scripts.dictionaries import load_for_store

    job = config_from_args(CacheJob, args).validate()
    cfg = config_from_args(CacheConfig, args).validate()
    if not job.store:
        if not job.model:
            raise ConfigError("give --store (a store holding the dictionary's hook), or --model and --corpus to "
                              "run the model over a corpus first")
        from featureatlas.scripts.dictionaries import load_dictionary, parse_spec

        spec = parse_spec(job.dictionary)[0]
        hook = spec.split(":")[1] if spec.startswith("neurons:") else load_dictionary(job.dictionary).hook
        job = job.replace(store=str(store_from_corpus(job, corpus_config(args), hook, job.progress)))
    store = ActivationStore.open(job.store)
    dic = load_for_store(job.dictionary, store)
    path = build_cache(store, dic, cfg, job.out, dictionary_id=job.dictionary, resume=job.resume,
                       overwrite=job.overwrite, flags=flags_of(CacheJob, CacheConfig), progress=job.progress)
    from featureatlas.eval.cache import FeatureCache

    cache = FeatureCache(path)
    print(f"cached {int(cache['n_tokens'])} tokens of {int(cache.attrs['n_contexts'])} contexts for "
          f"{cache.n_features} features ({int(cache.dead.sum())} dead) -> {path}")
    return 0
