"""`featureatlas describe`: describe a dictionary's features from its cache (MaxAct, VocabProj, TokenChange,
weight statistics; template, local or OpenAI-compatible explainers).

    featureatlas describe --cache runs/x/cache-sae --dictionary runs/x/sae --sample 32 \\
        --methods maxact vocabproj tokenchange ensemble-concat --explainer template --out runs/x/describe-sae
    featureatlas describe ... --explainer openai --base-url http://127.0.0.1:8080/v1 --api-model m  # key: $OPENAI_API_KEY

Writes records.jsonl (one features.jsonl record per feature; the chosen ones with evidence and
descriptions) into --out. A rerun with --resume asks the explainer only for what is missing (failed
calls are retried, answers come from the response cache).
"""
from __future__ import annotations

import dataclasses

from featureatlas.activation_store.configs import RunOptions, add_config_arguments, config_from_args, flags_of, setting


@dataclasses.dataclass(kw_only=True)
class DescribeJob(RunOptions):
    """Inputs and output of the describe job."""

    cache: str = setting()
    """Feature cache run directory (from `featureatlas cache`)."""
    out: str = setting()
    """Run directory for records.jsonl."""
    dictionary: str = setting("")
    """The dictionary the cache was made for (default: the one recorded in the cache)."""
    name: str = setting("")
    """Dictionary name in the catalog (default: the dictionary folder's name)."""
    store: str = setting("")
    """Activation store (default: the one recorded in the cache)."""
    model: str = setting("")
    """Language model (default: the store's model)."""


def register(subparsers) -> None:
    from featureatlas.eval.describe import DescribeConfig
    from featureatlas.eval.outputs import TokenChangeConfig

    p = subparsers.add_parser("describe", help="describe features (MaxAct, VocabProj, TokenChange; explainers)",
                              description=__doc__.split("\n\n")[0])
    add_config_arguments(p, DescribeJob)
    add_config_arguments(p, DescribeConfig, title="descriptions")
    add_config_arguments(p, TokenChangeConfig, title="TokenChange")
    p.set_defaults(func=run)


def run(args) -> int:
    from featureatlas.activation_store.models import load_model
    from featureatlas.activation_store.store import ActivationStore
    from featureatlas.eval.cache import FeatureCache
    from featureatlas.eval.describe import DescribeConfig, describe
    from featureatlas.eval.outputs import TokenChangeConfig
    from featureatlas.scripts.dictionaries import dictionary_info, load_for_store

    job = config_from_args(DescribeJob, args).validate()
    cfg = config_from_args(DescribeConfig, args).validate()
    tc = config_from_args(TokenChangeConfig, args).validate()
    cache = FeatureCache(job.cache)
    store = ActivationStore.open(job.store or cache.attrs["store_path"])
    spec = job.dictionary or str(cache.attrs["dictionary"])
    dic = load_for_store(spec, store)
    if cfg.explainer == "openai":  # a missing key or a dead endpoint is reported before the model loads
        from featureatlas.eval.describe import make_explainer_for
        from pathlib import Path

        make_explainer_for(cfg, Path(job.out))[0].check()
    model = load_model(job.model or store.model_id)
    info = dictionary_info(spec, dic, job.name or None)
    results = describe(store, model, dic, cache, cfg, tc, job.out, info=info, resume=job.resume,
                       overwrite=job.overwrite, flags=flags_of(DescribeJob, DescribeConfig, TokenChangeConfig),
                       progress=job.progress)
    print(f"{info['name']}: {len(results['described'])} features described ({results['n_new']} new descriptions, "
          f"{results['n_failed']} failed calls), {results['n_dead']} of {results['n_features']} dead -> {job.out}")
    return 0
