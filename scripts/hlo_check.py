"""Does the compiled SAE training step contain what makes TopK slow on accelerators?

Lowers and compiles the trainer's real step (scripts/bench_sae.py's set-up, state as shapes only, so
the gemma2b preset lowers on any machine) and reads two HLO texts:
  lowered   before XLA's optimisations (one op per JAX primitive; `topk` is still one op there: on GPU,
            k > 16 becomes a sort of every full row plus a slice, openxla/xla issue 25487)
  compiled  after them, for the backend at hand (fusions decided, loops and sorts as they will run)

and reports, per architecture and dtype:
  while_loop        a `while` op carrying floats (each iteration a host round trip on GPU: the legacy
                    loops). Loops of integers only are counted apart (integer_while_loops): on CPU,
                    JAX's threefry random bits are a rolled loop, on GPU a kernel
  full_width_sort   a sort over ≥ B·F elements (a [B, F] pre-activation sort), lowered or compiled
  full_width_topk   a top-k op or call over ≥ B·F elements (XLA:CPU's is a partial sort; on GPU with
                    k > 16 a full sort)
  bf16_scatter      a scatter producing bfloat16 (compare-and-swap loops on most GPUs, xla issue 26371)
  materialised_BkD  an array of ≥ B·k·D elements outside any fusion in the compiled step (the
                    gathered decoder rows written to memory instead of summed in registers)

The last stdout line is one JSON object {"backend", "device", "results": [{"arch", "dtype", "impl",
"preset", ..., "lowered": {...}, "compiled": {...}}, ...]}.

Usage: python -m featureatlas.scripts.hlo_check [--preset small] [--archs topk,batchtopk]
       [--dtypes float32,bfloat16] [--impl auto|gather|loop|legacy] [--no-compile] [--out file.json]
"""
from __future__ import annotations

import argparse
import math
import re
import sys

_ARRAY = re.compile(r"\b(pred|s4|s8|s16|s32|s64|u4|u8|u16|u32|u64|f8e4m3fn|f8e5m2|f16|bf16|f32|f64|c64|c128)"
                    r"\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?\s*(?:->\s*.*)?\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_NO_MEMORY = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple", "iota"}
FINDINGS = ("while_loop", "full_width_sort", "full_width_topk", "bf16_scatter", "materialised_BkD")


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _ARRAY.findall(shape)]


def parse_hlo(text: str) -> list[dict]:
    """Instructions of an HLO module's text: {comp, name, shape, op, args, fused} (fused: inside a
    fusion's computation, so never written to memory on its own)."""
    instrs, comp = [], None
    for line in text.splitlines():
        line = re.sub(r"/\*.*?\*/", "", line)  # tuple index comments: /*index=5*/
        m = _INSTR.match(line)
        if m:
            name, shape, op, rest = m.groups()
            instrs.append({"comp": comp, "name": name, "shape": shape, "op": op, "args": rest})
            continue
        c = _COMP.match(line)
        if c and "=" not in line.split("{")[0]:
            comp = c.group(1)
    fused = {m.group(1) for i in instrs if i["op"] == "fusion" for m in [_CALLS.search(i["args"])] if m}
    for i in instrs:
        i["fused"] = i["comp"] in fused
    return instrs


def analyse(text: str, B: int, F: int, k: int, D: int) -> dict:
    """The findings of the module docstring for one HLO text (either stage)."""
    instrs = parse_hlo(text)
    by_name = {(i["comp"], i["name"]): i for i in instrs}

    def operand_arrays(i):
        first = re.match(r"\s*%?([\w.\-]+)", i["args"])
        src = by_name.get((i["comp"], first.group(1))) if first else None
        return _arrays(src["shape"]) if src else _arrays(i["shape"])

    out = {"while_loops": 0, "integer_while_loops": 0, "sorts": [], "topks": [], "scatters": [], "full_width_sorts": [],
           "full_width_topks": [], "bf16_scatters": [], "materialised_BkD": [], "largest_unfused": []}
    unfused = []
    for i in instrs:
        op = i["op"]
        target = (_TARGET.search(i["args"]) or [None, ""])[1] if op == "custom-call" else ""
        if op == "while":
            integer = all(t[0] in "spu" for t, _ in _arrays(i["shape"]))
            out["integer_while_loops" if integer else "while_loops"] += 1
        is_sort = op == "sort" or "sort" in target.lower()
        is_topk = op == "topk" or "topk" in target.lower()
        if is_sort or is_topk:
            arrays = operand_arrays(i) if is_topk else _arrays(i["shape"])
            n = max((math.prod(d) for _, d in arrays), default=0)
            desc = f"{i['name']}: {', '.join(f'{t}{list(d)}' for t, d in arrays[:2])}"
            out["sorts" if is_sort else "topks"].append(desc)
            if n >= B * F:
                out["full_width_sorts" if is_sort else "full_width_topks"].append(desc)
        if op == "scatter":
            arrays = _arrays(i["shape"])
            out["scatters"].append(f"{i['name']}: {', '.join(f'{t}{list(d)}' for t, d in arrays[:1])}")
            if any(t == "bf16" for t, _ in arrays):
                out["bf16_scatters"].append(out["scatters"][-1])
        if not i["fused"] and op not in _NO_MEMORY:
            n = sum(math.prod(d) for _, d in _arrays(i["shape"]))
            unfused.append((n, f"{i['name']} ({op}): {i['shape'].split('{')[0]}"))
            if n >= B * k * D:
                out["materialised_BkD"].append(unfused[-1][1])
    out["largest_unfused"] = [d for _, d in sorted(unfused, reverse=True)[:5]]
    return out


def check_step(arch: str, dtype: str, impl: str, d_in: int, width: int, batch: int, k: int,
               compile_step: bool = True) -> dict:
    """Lower (and compile) one trainer step and analyse both HLO texts."""
    import jax

    from featureatlas.saes import sparse
    from featureatlas.scripts.bench_sae import make_setup

    name = sparse.default_impl() if impl == "auto" else impl
    with sparse.use_impl(name):
        _, step_fn, _, state, shapes = make_setup(arch, d_in, width, batch, k, dtype, abstract=True)
        lowered = jax.jit(step_fn, donate_argnums=(0,)).lower(state, shapes)
    res = {"arch": arch, "dtype": dtype, "impl": name, "d_in": d_in, "width": width, "batch": batch, "k": k,
           "lowered": analyse(lowered.as_text(dialect="hlo"), batch, width, k, d_in)}
    for unfused_only in ("materialised_BkD", "largest_unfused"):  # nothing is fused before compiling
        del res["lowered"][unfused_only]
    if compile_step:
        res["compiled"] = analyse(lowered.compile().as_text(), batch, width, k, d_in)
    stages = [res["lowered"]] + ([res["compiled"]] if compile_step else [])
    for flag in FINDINGS[:-1]:  # either stage; materialised_BkD: the compiled step only
        res[flag] = any(s[flag + "s"] for s in stages)
    res["materialised_BkD"] = bool(compile_step and res["compiled"]["materialised_BkD"])
    return res


def main(argv=None) -> int:
    from featureatlas.scripts.bench_sae import PRESETS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help=f"comma list of {', '.join(PRESETS)}")
    p.add_argument("--archs", default="topk,batchtopk")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--impl", default="auto", choices=("auto", "gather", "loop", "legacy"),
                   help="sparse implementation (saes/sparse.py; auto: the backend's)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="lowered HLO only")
    p.add_argument("--out", default="", help="also write the JSON object to this file")
    args = p.parse_args(argv)

    from featureatlas.scripts.benchlib import emit, machine

    results = []
    for preset in args.preset.split(","):
        s = PRESETS[preset]
        for arch in args.archs.split(","):
            for dtype in args.dtypes.split(","):
                r = check_step(arch, dtype, args.impl, s["d_in"], s["width"], s["batch"], s["k"], args.compile)
                r["preset"] = preset
                flags = {f: r[f] for f in FINDINGS}
                print(f"{preset:>8} {arch:>10} {dtype:>9} {r['impl']:>6}: {flags}", file=sys.stderr, flush=True)
                results.append(r)
    emit({"check": "sae_step_hlo", **machine(), "results": results}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
