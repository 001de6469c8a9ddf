"""`featureatlas train-snmf`: semi-NMF (or DiffMeans / PCA baselines) on one hook of a store.

    featureatlas train-snmf --store runs/x/store.h5 --hook mlp_hidden.15 --k 100 --p 0.01 \\
        --init random --iters 1000 --patience 20 --out runs/x/snmf [--chunk-size 32768] [--resume]

Writes config.json, weights.safetensors (Z, and Y with --save-y), metrics.jsonl and loss.png
to --out; --resume continues an interrupted run from its last checkpoint.
"""
from __future__ import annotations

import argparse
import sys

from featureatlas.snmf.solver import INITS, SNMFConfig
from featureatlas.snmf.train import METHODS, TrainConfig, train

_S = SNMFConfig()
_T = TrainConfig(store="", out="")


def _ranks(text: str) -> tuple[int, ...]:
    try:
        ranks = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"want comma-separated ranks like 400,200,100,50, got {text!r}") from None
    if len(ranks) < 2:
        raise argparse.ArgumentTypeError("needs at least two ranks, e.g. 400,200")
    return ranks


def register(subparsers) -> None:
    p = subparsers.add_parser("train-snmf", help="fit semi-NMF (or DiffMeans / PCA) features on a stored hook",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="activation store (.h5) written by `featureatlas harvest`")
    p.add_argument("--hook", default=_T.hook, help="hook to factorize (default %(default)s; any hook works)")
    p.add_argument("--out", required=True, help="output directory for the result")
    p.add_argument("--method", choices=METHODS, default=_T.method,
                   help="snmf (default), diffmeans (one direction per store label) or pca (2k ± features)")
    p.add_argument("--k", type=int, default=_S.k, help="number of features (pca: components) (default %(default)s)")
    p.add_argument("--p", type=float, default=_S.p,
                   help="fraction of entries kept per feature by winner-take-all, in (0, 1] (default %(default)s)")
    p.add_argument("--init", choices=INITS, default=_S.init, help="initialization (default %(default)s)")
    p.add_argument("--iters", type=int, default=_S.iters, help="maximum iterations / streaming passes (default %(default)s)")
    p.add_argument("--patience", type=int, default=_S.patience,
                   help="stop after this many iterations without relative improvement > --tol (default %(default)s)")
    p.add_argument("--tol", type=float, default=_S.tol, help="relative loss improvement that counts (default %(default)s)")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="tokens per chunk: use the streaming solver (memory independent of the token count)")
    p.add_argument("--mu-steps", type=int, default=_T.mu_steps,
                   help="streaming only: multiplicative Y updates per chunk and pass (default %(default)s = exact full-batch iteration)")
    p.add_argument("--max-tokens", type=int, default=None, help="fit on a seeded random subset of this many tokens")
    p.add_argument("--split", choices=("train", "val", "all"), default=_T.split, help="store split (default %(default)s)")
    p.add_argument("--seed", type=int, default=_S.seed, help="seed for initialization and token subset (default %(default)s)")
    p.add_argument("--save-y", action="store_true", help="also save the token coefficients Y (Yt_NxK) and their store rows")
    p.add_argument("--hierarchy", type=_ranks, default=None, metavar="R0,R1,...",
                   help="also fit a hierarchy with these ranks, e.g. 400,200,100,50 (R0 replaces --k)")
    p.add_argument("--checkpoint-every", type=int, default=_T.checkpoint_every,
                   help="full batch: iterations between checkpoints (streaming checkpoints every pass)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--model", default=None, help="model for the VocabProj summary (default: the store's model)")
    p.add_argument("--vocab-features", type=int, default=_T.vocab_features,
                   help="print VocabProj top tokens of this many features (0 = skip loading the model)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def config_from_args(args) -> TrainConfig:
    snmf = SNMFConfig(k=args.k, p=args.p, init=args.init, iters=args.iters, patience=args.patience,
                      tol=args.tol, seed=args.seed)
    return TrainConfig(store=args.store, out=args.out, hook=args.hook, method=args.method, snmf=snmf,
                       chunk_size=args.chunk_size, mu_steps=args.mu_steps, max_tokens=args.max_tokens,
                       split=args.split, save_y=args.save_y, resume=args.resume, hierarchy=args.hierarchy,
                       checkpoint_every=args.checkpoint_every, vocab_features=args.vocab_features,
                       model=args.model, progress=not args.no_progress)


def run(args) -> int:
    try:
        result = train(config_from_args(args))
    except (ValueError, FileNotFoundError) as err:  # our errors name the problem and the fix
        print(f"featureatlas train-snmf: error: {err}", file=sys.stderr)
        return 2
    print(result["summary"])
    print(f"saved to {args.out}")
    return 0
