"""`featureatlas train-sae`: train one or several SAEs/transcoders on an activation store in one pass.

    featureatlas train-sae --store runs/demo/store.h5 --hook resid_post.15 --arch topk --width 4608 --k 32 \\
        --tokens 600000 --out runs/demo/sae

Several SAEs from the same batches (each hook read once per step): repeat --sae with key=value
overrides of the SAE flags, e.g.

    featureatlas train-sae --store S --hook resid_post.15 --tokens 1000000 --out runs/sweep \\
        --sae arch=topk,k=32 --sae arch=topk,k=64,width=9216 --sae arch=batchtopk,k=32 \\
        --sae arch=topk,hook=resid_mid.15,hook_out=mlp_out.15

--sae keys are the SAE settings by field name (l1_coef) or by flag without dashes (l1), with
tuples colon-separated (prefixes=288:1152:4608). One SAE writes to --out itself; several to
--out/<name>/. Each SAE directory gets config.json + weights.safetensors (saes/io.py), metrics.jsonl
and PNG plots; --out is a run directory (run.json, results.json, checkpoints/), so an interrupted run
continues with --resume (same settings required; the differences are listed otherwise).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import typing
from dataclasses import dataclass

from featureatlas.activation_store.configs import Config, add_config_arguments, config_from_args, flags_of, setting
from featureatlas.activation_store.errors import ConfigError
from featureatlas.saes.config import SAEConfig, SAETrainConfig


@dataclass
class TrainSAECommand(Config):
    """What the command itself needs besides the SAE and training settings."""

    store: str = setting()
    """Activation store (.h5) written by `featureatlas harvest`."""
    out: str = setting()
    """Output directory (the SAE directory for one SAE; one sub-directory per SAE for several)."""
    resume: bool = setting(False)
    """Continue the run in --out from its latest checkpoint (same settings)."""
    overwrite: bool = setting(False)
    """Replace a run already in --out (deleted only once every setting has been checked)."""
    mesh: str = setting("data=1,feature=1")
    """Device mesh: the batch split over data, the latents over feature (e.g. data=4,feature=2); 'all' = the batch split over every device of every process"""
    distributed: bool = setting(False)
    """Multi-host: join the other processes through jax.distributed (one command per process; the mesh spans every process's devices)"""
    coordinator: str = setting("")
    """With --distributed: HOST:PORT of process 0's coordinator; empty = from JAX_COORDINATOR_ADDRESS or the cluster (SLURM, Open MPI, Cloud TPU)"""
    num_processes: int | None = setting(None, gt=0)
    """With --distributed: how many processes take part (default: from the cluster)"""
    process_id: int | None = setting(None, ge=0)
    """With --distributed: this process's index, 0 .. num_processes-1 (default: from the cluster)"""
    eval: bool = setting(True)
    """Evaluate on the validation split (reconstruction metrics; the spliced CE score at the end)."""
    eval_tokens: int = setting(20_000, gt=0)
    """Validation tokens for the reconstruction metrics."""
    ce_contexts: int = setting(32, ge=0)
    """Validation contexts for the spliced CE/KL score at the end (0 = skip)."""
    model: str = setting("")
    """Model for the CE score (default: the store's model_id; 'none' skips it)."""
    progress: bool = setting(True)
    """Show a progress bar."""


def _spec_keys() -> dict[str, str]:
    """{--sae key: SAEConfig field}: every command-line SAE setting by field name and by flag (l1_coef, l1)."""
    flags = flags_of(SAEConfig)
    return {**{flag.lstrip("-").replace("-", "_"): n for n, flag in flags.items()}, **{n: n for n in flags}}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-sae", help="train SAEs / transcoders on an activation store (several per pass, resumable)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, TrainSAECommand, title="data and output")
    add_config_arguments(p, SAEConfig, defaults={"width": None}, title="SAE (defaults for every --sae)")
    p.add_argument("--sae", action="append", default=[], metavar="KEY=VAL,...",
                   help="one SAE to train (repeatable): key=value overrides of the SAE flags, keys "
                        + ", ".join(sorted(set(_spec_keys()))))
    add_config_arguments(p, SAETrainConfig, title="training")
    p.set_defaults(func=run)


def parse_mesh(text: str) -> tuple[int, int]:
    """(data, feature) sizes of --mesh; 'all' is data = jax.device_count() (call it after joining a
    multi-process run, which adds the other processes' devices)."""
    if text.strip() == "all":
        import jax

        return jax.device_count(), 1
    sizes = {"data": 1, "feature": 1}
    for part in filter(None, text.split(",")):
        key, _, val = part.partition("=")
        if key.strip() not in sizes or not val.strip().isdigit() or int(val) < 1:
            raise ConfigError(f"--mesh must look like data=2,feature=4 (positive sizes), got {text!r}")
        sizes[key.strip()] = int(val)
    return sizes["data"], sizes["feature"]


def _parse_value(tp, text: str, where: str):
    """`text` as a value of the field type `tp` (int, float, str, bool, int | None, tuple[int, ...])."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is tuple:
        return tuple(_parse_value(args[0], s, where) for s in text.split(":") if s)
    if args:
        tp = args[0]
    try:
        return {"true": True, "1": True, "false": False, "0": False}[text.lower()] if tp is bool else tp(text)
    except (KeyError, ValueError):
        raise ConfigError(f"{where} must be a {getattr(tp, '__name__', tp)}, got {text!r}") from None


def parse_spec(spec: str) -> dict:
    """{SAEConfig field: value} of one --sae key=value,... spec."""
    keys, hints, out = _spec_keys(), typing.get_type_hints(SAEConfig), {}
    for part in filter(None, spec.split(",")):
        key, eq, val = part.partition("=")
        key = key.strip()
        if not eq:
            raise ConfigError(f"--sae {spec!r}: {part!r} is not key=value (e.g. --sae arch=topk,k=32)")
        if key not in keys:
            SAEConfig.from_dict({key: None}, where=f"--sae {spec!r}")  # raises, naming the closest key
        out[keys[key]] = _parse_value(hints[keys[key]], val.strip(), f"--sae {key}")
    return out


def sae_configs(args) -> list[SAEConfig]:
    """SAEConfigs from the flags (one SAE) or from each --sae spec layered over them (not yet validated:
    the trainer checks them against the store)."""
    cfgs = []
    for spec in [parse_spec(s) for s in args.sae] or [{}]:
        if "hook_in" in spec and "hook_out" not in spec:
            spec["hook_out"] = ""
        cfgs.append(config_from_args(SAEConfig, args, **spec))
    return cfgs


def make_eval_fn(store, args, final_step: int):
    """eval_fn(step, {name: SAE}) -> {name: metrics}: reconstruction metrics on the val split, plus
    the spliced CE/KL score (at the end only) when the model loads."""
    try:
        from featureatlas.eval import metrics as em
    except ImportError:  # eval/ not available: train anyway
        return None

    @functools.cache  # loaded (or given up on) once
    def model():
        if args.ce_contexts <= 0 or args.model == "none":
            return None
        name = args.model or store.model_id
        try:
            from featureatlas.activation_store.models import load_model

            return load_model(name)
        except Exception as err:  # the CE score is optional: say why it is missing
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            print(f"[train-sae] no CE score: cannot load model {name!r}: {first}", file=sys.stderr)
        return None

    split = "val" if store.token_rows("val").size else "all"

    def eval_fn(step: int, saes: dict) -> dict:
        lm = model() if step >= final_step else None
        return {name: em.scalars(em.evaluate_dictionary(sae, store, lm=lm, n_tokens=args.eval_tokens,
                                                        n_contexts_ce=args.ce_contexts, split=split, error_term=False))
                for name, sae in saes.items()}

    return eval_fn


def run(args) -> int:
    """Check every setting and prepare --out (trainer), then read the store and train."""
    from featureatlas.activation_store import ActivationStore
    from featureatlas.saes.sources import StoreBatches
    from featureatlas.saes.trainer import init_distributed, train_saes

    data, feature = parse_mesh("data=1" if args.mesh.strip() == "all" else args.mesh)
    tcfg = config_from_args(SAETrainConfig, args, mesh_data=data, mesh_feature=feature).validate()
    cfgs = sae_configs(args)
    if args.distributed:
        given = args.process_id is not None and args.num_processes is not None
        who = f"process {args.process_id} of {args.num_processes}" if given else "process numbers from the cluster"
        print(f"[train-sae] joining the multi-process run ({who}, coordinator "
              f"{args.coordinator or 'from the environment'}); this waits until every process has started",
              file=sys.stderr)
        init_distributed(args.coordinator, args.num_processes, args.process_id)
    if args.mesh.strip() == "all":
        tcfg = tcfg.replace(mesh_data=parse_mesh("all")[0]).validate()
    store = ActivationStore.open(args.store)
    if not store.complete:
        print(f"[train-sae] warning: {args.store} is partial: {store.n_committed} of {store.n_planned} planned "
              "contexts are committed (a harvest was stopped, or is still running); training uses those "
              f"{store.n_committed}, recorded as data.contexts_used in each config.json. Re-run the same harvest "
              "command to complete the store first if you want all of them.", file=sys.stderr)
    hooks = [h for c in cfgs for h in (c.hook_in, c.hook_out or c.hook_in) if h]
    source = StoreBatches(store, hooks, split=tcfg.split,
                          exclude_bos=tcfg.exclude_bos, aligned=any(c.is_transcoder for c in cfgs))
    eval_fn = make_eval_fn(store, args, tcfg.total_steps) if args.eval else None
    result = train_saes(cfgs, tcfg, source, args.out, resume=args.resume, overwrite=args.overwrite,
                        eval_fn=eval_fn, progress=args.progress)
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
    keys = ("fvu_excl_massive", "fvu", "n_massive", "rel_err_per_token", "explained_variance", "l0", "dead_frac",
            "frac_dead", "ce_score", "kl_score", "delta_lm_loss")
    rule = ""
    for name, d in zip(result.names, result.dirs):
        row = result.last_metrics.get(name, {})
        shown = {k: round(row[k], 4) for k in keys if isinstance(row.get(k), (int, float))}
        print(f"{name}: {d}  {json.dumps(shown)}")
        rule = rule or (row.get("massive_rule") if "fvu_excl_massive" in shown else "")
    if rule:  # say which FVU to read (eval/metrics.py, activation_store/massive.py)
        print(f"fvu_excl_massive: FVU on the eval tokens without the n_massive massive-norm ones ({rule}); "
              "fvu: on all eval tokens, which those few can decide; rel_err_per_token: mean ||x - x_hat||^2/||x||^2")
