"""`featureatlas harvest`: run a model over a corpus and write (or resume) an HDF5 activation store.

    featureatlas harvest --model smollm2-135m --corpus bbc --hooks resid_post.15 mlp_hidden.15 \\
        --max-tokens 100000 --out runs/x/store.h5 [--dtype float16] [--overwrite]

Running the same command again after an interruption continues from the last committed chunk.
Sharded (one job per host or process, any order, concurrently): `--shard i/n --out runs/x/store`
for i = 0..n-1 writes runs/x/store/shard-<i>-of-<n>.h5; every reader opens runs/x/store as one store.
The flags and their help come from HarvestConfig and CorpusConfig (activation_store).
"""
from __future__ import annotations

import sys
from pathlib import Path

from featureatlas.activation_store import configs
from featureatlas.activation_store.corpus import CorpusConfig
from featureatlas.activation_store.harvest import HarvestConfig, describe, harvest, store_file
from featureatlas.activation_store.store import ActivationStore


def register(subparsers) -> None:
    p = subparsers.add_parser("harvest", help="run a model over a corpus and store activations (resumable)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="store file to write, or to resume if it exists, e.g. runs/x/store.h5 "
                   "(with --shard: the directory of the sharded store, the same for every shard job)")
    configs.add_config_arguments(p, HarvestConfig, title="what to harvest (recorded in the store)")
    configs.add_config_arguments(p, CorpusConfig, title="corpus (recorded in the store)")
    run_group = p.add_argument_group("run")
    run_group.add_argument("--overwrite", action="store_true",
                           help="replace an existing store instead of resuming it (default: resume)")
    run_group.add_argument("--no-progress", action="store_true", help="hide the progress bar (default: shown)")
    p.set_defaults(func=run)


def config_from_args(args) -> HarvestConfig:
    corpus = configs.config_from_args(CorpusConfig, args)
    return configs.config_from_args(HarvestConfig, args, corpus=corpus)


def _notice(line: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stderr)


def interrupted_message(out: Path) -> str:
    """One line for Ctrl-C: what is on disk and how to continue."""
    head = "featureatlas harvest: interrupted"
    if not out.is_file():
        return f"{head} before the store was created; nothing was written"
    try:
        store = ActivationStore.open(out)
    except Exception:  # not a store (e.g. interrupted before an --overwrite replaced it): say nothing wrong
        return f"{head}; {out} was not changed"
    return (f"{head}; {out} is safe with {store.n_committed} of {store.n_planned} contexts committed: run the same "
            "command again to resume")


def run(args) -> int:
    config = config_from_args(args)
    out = Path(args.out)
    try:
        result = harvest(config, out, overwrite=args.overwrite, progress=not args.no_progress, notify=_notice)
    except KeyboardInterrupt:
        print(interrupted_message(store_file(config, out)), file=sys.stderr)
        return 130
    print(describe(result))
    return 0
