"""The `featureatlas` command line.

Each subcommand lives in its own module `scripts/cmd_<name>.py`, which exposes
`register(subparsers)`; that function adds its parser and sets `func` (called
with the parsed args, returns an exit code).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from featureatlas.activation_store.errors import FeatureAtlasError

COMMAND_MODULES = ("cmd_harvest", "cmd_store", "cmd_train_sae", "cmd_train_snmf", "cmd_cache", "cmd_describe",
                   "cmd_catalog", "cmd_evaluate", "cmd_demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featureatlas", description="Harvest language-model activations, "
                                     "train sparse dictionaries, describe features.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"featureatlas.scripts.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. featureatlas's own errors (a user mistake, with its fix) print one line and exit 2;
    Ctrl-C prints one line and exits 130; anything else is an internal bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FeatureAtlasError as err:
        print(f"featureatlas {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"featureatlas {args.command}: interrupted; what was committed is safe, and re-running the same "
              "command resumes (train-* commands: add --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
