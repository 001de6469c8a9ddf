"""`featureatlas train-sae`: train one or several SAEs/transcoders on an activation store in one pass.

    featureatlas train-sae --store runs/demo/store.h5 --hook resid_post.15 --arch topk --width 4608 --k 32 \\
        --tokens 600000 --out runs/demo/sae

Several SAEs from the same batches (each hook read once per step): repeat --sae with key=value
overrides of the single-SAE flags, e.g.

    featureatlas train-sae --store S --hook resid_post.15 --tokens 1000000 --out runs/sweep \\
        --sae arch=topk,k=32 --sae arch=topk,k=64,width=9216 --sae arch=batchtopk,k=32 \\
        --sae arch=topk,hook=resid_mid.15,hook_out=mlp_out.15

--sae keys: arch, hook, hook_out, width, expansion, k, lr, l1, l0_coef, k_aux, auxk_coef, dead_tokens,
bandwidth, jumprelu_init_threshold, prefixes (colon-separated, e.g. 288:1152:4608), matryoshka_base,
sparsity_warmup. One SAE writes to --out itself; several to --out/<name>/. Each SAE directory gets
config.json + weights.safetensors (saes/io.py), metrics.jsonl, and PNG plots; --out/checkpoints holds
orbax checkpoints, so an interrupted run continues with --resume (same flags required).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from featureatlas.saes.config import ARCHITECTURES, SAEConfig, SAEConfigError, TrainConfig

_S = SAEConfig()
_T = TrainConfig()

SPEC_KEYS = {
    "arch": ("architecture", str), "hook": ("hook_in", str), "hook_out": ("hook_out", str),
    "width": ("width", int), "expansion": ("expansion", float), "k": ("k", int), "lr": ("lr", float),
    "l1": ("l1_coef", float), "l0_coef": ("l0_coef", float), "k_aux": ("k_aux", int),
    "auxk_coef": ("auxk_coef", float), "dead_tokens": ("dead_tokens", int), "bandwidth": ("jumprelu_bandwidth", float),
    "jumprelu_init_threshold": ("jumprelu_init_threshold", float), "prefixes": ("matryoshka_prefixes", str),
    "matryoshka_base": ("matryoshka_base", str), "sparsity_warmup": ("sparsity_warmup_frac", float),
}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-sae", help="train SAEs / transcoders on an activation store (several per pass, resumable)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--store", required=True, help="activation store (.h5) written by `featureatlas harvest`")
    g.add_argument("--hook", help="hook to read, e.g. resid_post.15 (default for every --sae)")
    g.add_argument("--hook-out", default="",
                   help="hook to reconstruct; a hook other than --hook trains a transcoder (default: --hook)")
    g.add_argument("--split", default=_T.split, choices=("train", "all"), help="store split to train on")
    g = p.add_argument_group("SAE (defaults for every --sae)")
    g.add_argument("--arch", default=_S.architecture, choices=ARCHITECTURES,
                   help="relu (L1), topk, batchtopk (saved as JumpReLU), jumprelu (L0), gated, matryoshka")
    g.add_argument("--width", type=int, default=0, help="number of latents F (overrides --expansion)")
    g.add_argument("--expansion", type=float, default=8.0, help="width = expansion x d_in when --width is not given")
    g.add_argument("--k", type=int, default=_S.k,
                   help="active latents per token (TopK) or on average (BatchTopK, Matryoshka)")
    g.add_argument("--lr", type=float, default=_S.lr,
                   help="peak Adam learning rate (default suits a few hundred steps on a ~100k-token store); "
                        "0 = 2e-4/sqrt(width/2^14), the usual choice for long runs")
    g.add_argument("--l1", type=float, default=_S.l1_coef,
                   help="L1 coefficient for relu and gated (inputs normalised to E||x||^2 = d_in)")
    g.add_argument("--l0-coef", type=float, default=_S.l0_coef, help="L0 coefficient for jumprelu")
    g.add_argument("--bandwidth", type=float, default=_S.jumprelu_bandwidth,
                   help="jumprelu straight-through rectangle-kernel width")
    g.add_argument("--k-aux", type=int, default=_S.k_aux, help="AuxK: dead latents that model the residual (TopK family)")
    g.add_argument("--auxk-coef", type=float, default=_S.auxk_coef, help="AuxK loss coefficient (0 disables)")
    g.add_argument("--dead-tokens", type=int, default=0,
                   help="a latent is dead after this many tokens without firing; 0 = min(10M, tokens/10)")
    g.add_argument("--sparsity-warmup", type=float, default=_S.sparsity_warmup_frac,
                   help="fraction of steps over which the L1/L0 coefficient ramps up from 0")
    g.add_argument("--prefixes", default="", help="matryoshka prefix sizes, colon-separated (default F/16:F/8:F/4:F/2:F)")
    g.add_argument("--matryoshka-base", default=_S.matryoshka_base, choices=("batchtopk", "topk"))
    g.add_argument("--sae", action="append", default=[], metavar="KEY=VAL,...",
                   help="one SAE to train (repeatable): key=value overrides of the flags above, keys "
                        + ", ".join(SPEC_KEYS))
    g = p.add_argument_group("training")
    g.add_argument("--tokens", type=int, default=_T.total_tokens, help="training tokens (epochs repeat the store)")
    g.add_argument("--batch-size", type=int, default=_T.batch_size, help="tokens per step")
    g.add_argument("--warmup-steps", type=int, default=_T.warmup_steps, help="linear learning-rate warmup steps (capped at a tenth of the run)")
    g.add_argument("--decay-frac", type=float, default=_T.decay_frac, help="final fraction of steps with linear lr decay to 0")
    g.add_argument("--grad-clip", type=float, default=_T.grad_clip, help="global gradient-norm clip per SAE (0 = off)")
    g.add_argument("--dtype", default=_T.compute_dtype, choices=("float32", "bfloat16"),
                   help="matmul compute dtype (bfloat16 pays off on accelerators; params stay float32)")
    g.add_argument("--seed", type=int, default=_T.seed, help="seed for initialisation and batch order")
    g.add_argument("--mesh", default="data=1,feature=1",
                   help="device mesh: batch split over data, latents over feature (e.g. data=4,feature=2)")
    g.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() (coordinator from the environment)")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="output directory")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    g.add_argument("--log-every", type=int, default=_T.log_every, help="steps between metrics.jsonl rows")
    g.add_argument("--checkpoint-every", type=int, default=_T.checkpoint_every, help="steps between checkpoints")
    g.add_argument("--eval-every", type=int, default=_T.eval_every,
                   help="steps between validation evaluations (0 = only at the end)")
    g.add_argument("--eval-tokens", type=int, default=20_000, help="validation tokens for reconstruction metrics")
    g.add_argument("--ce-contexts", type=int, default=32,
                   help="validation contexts for the spliced CE/KL score at the end (0 = skip)")
    g.add_argument("--model", default="",
                   help="model for the CE score (default: the store's model_id; 'none' skips it)")
    g.add_argument("--no-eval", action="store_true", help="skip all evaluation")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def parse_mesh(text: str) -> tuple[int, int]:
    sizes = {"data": 1, "feature": 1}
    for part in filter(None, text.split(",")):
        key, _, val = part.partition("=")
        if key.strip() not in sizes or not val.strip().isdigit():
            raise SAEConfigError(f"--mesh must look like data=2,feature=4, got {text!r}")
        sizes[key.strip()] = int(val)
    return sizes["data"], sizes["feature"]


def _parse_spec(spec: str) -> dict:
    out = {}
    for part in filter(None, spec.split(",")):
        key, eq, val = part.partition("=")
        key = key.strip()
        if not eq or key not in SPEC_KEYS:
            raise SAEConfigError(f"--sae {spec!r}: {key!r} is not a key=value with a known key ({', '.join(SPEC_KEYS)})")
        field, typ = SPEC_KEYS[key]
        try:
            out[field] = typ(val.strip())
        except ValueError:
            raise SAEConfigError(f"--sae {spec!r}: {key} must be a {typ.__name__}, got {val!r}") from None
    return out


def sae_configs(args, dims: dict[str, int]) -> list[SAEConfig]:
    """SAEConfigs from the flags (one SAE) or from each --sae spec layered over them."""
    base = {
        "architecture": args.arch, "hook_in": args.hook or "", "hook_out": args.hook_out, "width": args.width,
        "expansion": args.expansion, "k": args.k, "lr": args.lr, "l1_coef": args.l1, "l0_coef": args.l0_coef,
        "k_aux": args.k_aux, "auxk_coef": args.auxk_coef, "dead_tokens": args.dead_tokens,
        "jumprelu_bandwidth": args.bandwidth, "matryoshka_prefixes": args.prefixes,
        "matryoshka_base": args.matryoshka_base, "sparsity_warmup_frac": args.sparsity_warmup,
    }
    specs = [_parse_spec(s) for s in args.sae] or [{}]
    cfgs = []
    for spec in specs:
        d = {**base, **spec}
        if "hook_in" in spec and "hook_out" not in spec:
            d["hook_out"] = ""
        hook = d["hook_in"]
        if not hook:
            raise SAEConfigError("no hook: pass --hook (or hook=... in every --sae)")
        if hook not in dims:
            raise SAEConfigError(f"store has no hook {hook!r}; it has {', '.join(dims)}")
        if d["hook_out"] and d["hook_out"] not in dims:
            raise SAEConfigError(f"store has no hook {d['hook_out']!r}; it has {', '.join(dims)}")
        d["d_in"] = dims[hook]
        d["d_out"] = dims[d["hook_out"] or hook]
        expansion = d.pop("expansion")
        if not d["width"]:
            d["width"] = int(round(expansion * dims[hook]))
        prefixes = d.pop("matryoshka_prefixes")
        d["matryoshka_prefixes"] = tuple(int(p) for p in prefixes.split(":")) if prefixes else ()
        cfgs.append(SAEConfig(**d).validate())
    return cfgs


def make_eval_fn(store, args, final_step: int):
    """eval_fn(step, {name: SAE}) -> {name: metrics}: reconstruction metrics on the val split, plus
    the spliced CE/KL score (at the end only) when the model loads."""
    try:
        from featureatlas.eval import metrics as em
    except ImportError:  # eval/ not available: train anyway
        return None
    state = {"lm": None, "tried": False}

    def model():
        if state["tried"] or args.ce_contexts <= 0 or args.model == "none":
            return state["lm"]
        state["tried"] = True
        name = args.model or store.model_id
        try:
            from featureatlas.activation_store.models import load_model

            state["lm"] = load_model(name)
        except Exception as err:  # the CE score is optional: say why it is missing
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            print(f"[train-sae] no CE score: cannot load model {name!r}: {first}", file=sys.stderr)
        return state["lm"]

    split = "val" if store.token_rows("val").size else "all"

    def eval_fn(step: int, saes: dict) -> dict:
        lm = model() if step >= final_step else None
        out = {}
        for name, sae in saes.items():
            m = em.evaluate_dictionary(sae, store, lm=lm, n_tokens=args.eval_tokens, n_contexts_ce=args.ce_contexts,
                                       split=split, error_term=False)
            out[name] = em.scalars(m)
        return out

    return eval_fn


def run(args) -> int:
    from featureatlas.activation_store import ActivationStore

    if args.distributed:
        import jax

        jax.distributed.initialize()
    try:
        from featureatlas.saes.sources import StoreSource
        from featureatlas.saes.trainer import train_saes

        store = ActivationStore.open(args.store)
        dims = {h: store.dim(h) for h in store.hooks}
        data, feature = parse_mesh(args.mesh)
        tcfg = TrainConfig(
            batch_size=args.batch_size, total_tokens=args.tokens, seed=args.seed, warmup_steps=args.warmup_steps,
            decay_frac=args.decay_frac, grad_clip=args.grad_clip, compute_dtype=args.dtype, log_every=args.log_every,
            eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, mesh_data=data, mesh_feature=feature,
            split=args.split,
        )
        cfgs = sae_configs(args, dims)
        hooks = [h for c in cfgs for h in (c.hook_in, c.hook_out or c.hook_in)]
        source = StoreSource(store, hooks, split=args.split, aligned=any(c.is_transcoder for c in cfgs))
        eval_fn = None if args.no_eval else make_eval_fn(store, args, tcfg.total_steps)
        result = train_saes(cfgs, tcfg, source, args.out, resume=args.resume, eval_fn=eval_fn,
                            progress=not args.no_progress)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"train-sae: error: {err}", file=sys.stderr)
        return 2
    _plots(result.dirs)
    _summary(result)
    return 0


def _plots(dirs) -> None:
    try:
        from featureatlas.saes import plots
    except ImportError:
        return
    for d in dirs:
        try:
            plots.plot_run(d)
        except Exception as err:  # plots are a convenience; never fail a finished training run on them
            print(f"[train-sae] plots for {d} failed: {err}", file=sys.stderr)


def _summary(result) -> None:
    keys = ("fvu", "explained_variance", "l0", "dead_frac", "frac_dead", "ce_score", "kl_score", "delta_lm_loss")
    for name, d in zip(result.names, result.dirs):
        row = result.last_metrics.get(name, {})
        shown = {k: round(v, 4) for k, v in row.items() if k in keys and isinstance(v, (int, float))}
        print(f"{name}: {d}  {json.dumps(shown)}")
