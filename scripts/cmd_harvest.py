"""`featureatlas harvest`: run a model over a corpus and write (or resume) an HDF5 activation store.

    featureatlas harvest --model smollm2-135m --corpus bbc --hooks resid_post.15 mlp_hidden.15 \\
        --max-tokens 100000 --out runs/x/store.h5 [--dtype float16] [--overwrite]

Running the same command again after an interruption continues from the last committed chunk.
"""
from __future__ import annotations

import sys

from featureatlas.activation_store.corpus import CorpusConfig
from featureatlas.activation_store.harvest import HarvestConfig, describe, harvest

_CORPUS = CorpusConfig()
_HARVEST = HarvestConfig()


def register(subparsers) -> None:
    p = subparsers.add_parser("harvest", help="run a model over a corpus and store activations (resumable)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=_HARVEST.model, help="smollm2-135m, a .gguf file or a Hugging Face directory")
    p.add_argument("--corpus", default=_CORPUS.source, help="'bbc', a directory of .txt files, a .txt or a .jsonl file")
    p.add_argument("--hooks", nargs="+", required=True, help="hook names, e.g. resid_post.15 mlp_hidden.15")
    p.add_argument("--out", required=True, help="store file to write, e.g. runs/x/store.h5")
    p.add_argument("--dtype", choices=("float16", "float32"), default=_HARVEST.dtype)
    p.add_argument("--context-length", type=int, default=_CORPUS.context_length, help="tokens per context incl. BOS")
    p.add_argument("--batch-size", type=int, default=_HARVEST.batch_size, help="contexts per forward pass")
    p.add_argument("--commit-contexts", type=int, default=_HARVEST.commit_contexts,
                   help="contexts per committed chunk (a multiple of --batch-size)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens (BOS included)")
    p.add_argument("--max-contexts", type=int, default=None)
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--min-tokens", type=int, default=_CORPUS.min_tokens,
                   help="drop a document's trailing piece shorter than this")
    p.add_argument("--no-shuffle-documents", action="store_true", help="pack documents in corpus order")
    p.add_argument("--seed", type=int, default=_CORPUS.seed, help="document order seed")
    p.add_argument("--text-field", default=_CORPUS.text_field, help="JSONL field holding the text")
    p.add_argument("--label-field", default=_CORPUS.label_field, help="JSONL field holding the label (optional)")
    p.add_argument("--val-fraction", type=float, default=_HARVEST.val_fraction, help="contexts held out for validation")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store instead of resuming it")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def config_from_args(args) -> HarvestConfig:
    corpus = CorpusConfig(
        source=args.corpus, context_length=args.context_length, min_tokens=args.min_tokens,
        max_documents=args.max_documents, max_contexts=args.max_contexts, max_tokens=args.max_tokens,
        shuffle_documents=not args.no_shuffle_documents, seed=args.seed,
        text_field=args.text_field, label_field=args.label_field)
    return HarvestConfig(model=args.model, hooks=tuple(args.hooks), corpus=corpus, dtype=args.dtype,
                         batch_size=args.batch_size, commit_contexts=args.commit_contexts,
                         val_fraction=args.val_fraction)


def run(args) -> int:
    try:
        result = harvest(config_from_args(args), args.out, overwrite=args.overwrite, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as err:  # our errors say what is wrong and how to fix it
        print(f"featureatlas harvest: error: {err}", file=sys.stderr)
        return 2
    print(describe(result))
    return 0
