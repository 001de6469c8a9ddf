"""The `featureatlas` command line.

Each subcommand lives in its own module `scripts/cmd_<name>.py`, which exposes
`register(subparsers)`; that function adds its parser and sets `func` (called
with the parsed args, returns an exit code).
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = ("cmd_harvest", "cmd_store", "cmd_train_sae", "cmd_train_snmf", "cmd_demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="featureatlas",
        description="Harvest language-model activations, train sparse dictionaries, describe features.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"featureatlas.scripts.{name}")
        except ModuleNotFoundError as err:  # a command not built yet
            if err.name == f"featureatlas.scripts.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
