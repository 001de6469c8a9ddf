"""`featureatlas train-snmf`: semi-NMF (or DiffMeans / PCA baselines) on one hook of a store.

    featureatlas train-snmf --store runs/x/store.h5 --hook mlp_hidden.15 --k 100 --p 0.01 \\
        --init random --iters 1000 --patience 20 --out runs/x/snmf [--chunk-size 32768] [--resume]

Writes config.json, weights.safetensors (Z, and Y with --save-y), loss.png, metrics.jsonl,
run.json (settings) and results.json to --out; --resume continues an interrupted run from its
last checkpoint. The flags come from `snmf.train.SNMFJobConfig` and `snmf.solver.SNMFConfig`.
"""
from __future__ import annotations

import argparse

from featureatlas.activation_store.configs import add_config_arguments, config_from_args, field_docs
from featureatlas.snmf.solver import SNMFConfig
from featureatlas.snmf.train import SNMFJobConfig, train


def _ranks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"want comma-separated ranks like 400,200,100,50, got {text!r}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser("train-snmf", help="fit semi-NMF (or DiffMeans / PCA) features on a stored hook",
                              description=__doc__.split("\n\n")[0])
    add_config_arguments(p, SNMFJobConfig, skip=("hierarchy",))
    p.add_argument("--hierarchy", type=_ranks, default=None, metavar="R0,R1,...",
                   help=field_docs(SNMFJobConfig)["hierarchy"] + " (default: none)")
    add_config_arguments(p, SNMFConfig, title="semi-NMF")
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = config_from_args(SNMFJobConfig, args, snmf=config_from_args(SNMFConfig, args))
    print(train(cfg)["summary"])
    print(f"saved to {cfg.out}")
    return 0
