"""`featureatlas store info|verify PATH`: summarise or check an activation store."""
from __future__ import annotations

import json

from featureatlas.activation_store.store import ActivationStore, StoreError


def register(subparsers) -> None:
    p = subparsers.add_parser("store", help="inspect an activation store")
    sub = p.add_subparsers(dest="store_command", required=True)
    info = sub.add_parser("info", help="hooks, dims, tokens, contexts, labels, dtype, size, committed fraction")
    info.add_argument("path")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=run_info)
    verify = sub.add_parser("verify", help="check shapes, counters, checksums, NaN/Inf and metadata")
    verify.add_argument("path")
    verify.add_argument("--quick", action="store_true", help="metadata only, skip reading the activations")
    verify.set_defaults(func=run_verify)


def run_info(args) -> int:
    summary = ActivationStore.open(args.path).summary()  # a StoreError is reported by the CLI (exit 2)
    if args.json:
        print(json.dumps(summary))
        return 0
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
        elif isinstance(value, float):
            value = f"{value:.4g}"
        print(f"{key:<{width}}  {value}")
    return 0


def run_verify(args) -> int:
    try:
        store = ActivationStore.open(args.path)
    except StoreError as err:
        print(f"FAIL {err}")
        return 1
    problems = store.verify(check_values=not args.quick)
    if not store.complete:
        print(f"note: partial store, {store.n_committed}/{store.n_planned} contexts committed "
              "(re-run the harvest command to finish it)")
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        return 1
    print(f"OK {args.path}: {store.n_committed} contexts, hooks {', '.join(store.hooks)}")
    return 0
