"""`featureatlas catalog`: a browsable feature catalog from one or more describe runs.

    featureatlas catalog --describe runs/x/describe-sae runs/x/describe-snmf --out runs/x/catalog

Writes features.jsonl (the documented schema, eval/schema.py), catalog.json, a self-contained
index.html that works from file:// (no server, no network), and a Neuronpedia export (eval/catalog.py).
"""
from __future__ import annotations

import dataclasses
import itertools

from featureatlas.activation_store.configs import Config, add_config_arguments, config_from_args, setting


@dataclasses.dataclass
class CatalogJob(Config):
    """Inputs and output of the catalog job."""

    describe: tuple[str, ...] = setting()
    """Describe run directories to include (one per dictionary)."""
    out: str = setting()
    """Catalog directory (index.html, features.jsonl, catalog.json, neuronpedia/)."""


def register(subparsers) -> None:
    p = subparsers.add_parser("catalog", help="features.jsonl + index.html + Neuronpedia export",
                              description=__doc__.split("\n\n")[0])
    add_config_arguments(p, CatalogJob)
    p.set_defaults(func=run)


def build(job: CatalogJob):
    from featureatlas.activation_store.errors import ConfigError
    from featureatlas.eval.catalog import write_catalog
    from featureatlas.eval.describe import load_describe_run
    from featureatlas.eval.schema import catalog_meta

    runs = [load_describe_run(d) for d in job.describe]
    infos = [info for info, _ in runs]
    names = [i["name"] for i in infos]
    if len(set(names)) != len(names):
        raise ConfigError(f"two describe runs use the dictionary name {names!r}; rerun one with --name")
    models = {i["model_id"] for i in infos}
    if len(models) != 1:
        raise ConfigError(f"the describe runs come from different models {sorted(models)}; make one catalog per model")
    return write_catalog(job.out, itertools.chain.from_iterable(recs for _, recs in runs),
                         catalog_meta(models.pop(), infos))


def run(args) -> int:
    job = config_from_args(CatalogJob, args).validate()
    result = build(job)
    print(f"catalog: {result.n_features} features ({result.n_dead} dead) -> {result.index_html}")
    return 0
