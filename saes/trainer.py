"""Train several SAEs from one stream of batches, sharded over a (data, feature) mesh, resumable.

One jitted step updates every SAE: each hook's batch is read once and shared by all SAEs on it.
Per SAE: loss and grads (saes/architectures.py), the decoder-row gradient component along each row
removed, global-norm clipping, Adam with linear warmup and final linear decay, decoder rows
renormalised, dead-latent and BatchTopK-threshold buffers updated. A batch with NaN/Inf leaves the
state untouched and stops training with the step and the offending rows.

Sharding: a Mesh with axes ("data", "feature"); batches are split over data, encoder/decoder rows,
b_enc-like vectors and the dead-latent counters over feature (optimizer state alike); jit + GSPMD
partitions the step (the TopK/BatchTopK selection and the sparse gathers included; a test checks that
8 simulated devices reproduce 1 device). Multi-host: call jax.distributed.initialize() first (the CLI's
--distributed); the mesh then spans every process's devices, each process reads only its own rows of
each global batch (store.batches with the batch sharding), orbax writes checkpoints collectively, and
process 0 alone writes metrics and saved SAEs.

Output directory (one SAE: `out/` itself is the SAE directory; several: `out/<name>/` each):
  <sae dir>/config.json, weights.safetensors   saved SAE (saes/io.py), written at the end
  <sae dir>/metrics.jsonl                      {"kind": "train"|"eval", "step", "tokens", "sae", ...}
  out/run_config.json                          the resolved configs; --resume must match it
  out/checkpoints/<step>/                      orbax checkpoints of the whole training state
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from featureatlas.saes import architectures as A
from featureatlas.saes.config import SAEConfig, SAEConfigError, TrainConfig, config_diff
from featureatlas.saes.io import save_sae
from featureatlas.saes.sae import SAE, sae_from_params

FEATURE_AXIS_PARAMS = ("enc_FxD", "dec_FxE")
FEATURE_VECTORS = ("b_enc", "b_gate", "r_mag", "b_mag", "log_threshold", "since_fired")
# Settings that only change what is logged or saved, so --resume accepts a change to them.
RESUMABLE_KEYS = ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints")

EvalFn = Callable[[int, dict[str, SAE]], dict[str, dict]]


class NonFiniteBatchError(ValueError):
    """A training batch held NaN or Inf."""


class TrainingDivergedError(ValueError):
    """The loss became NaN/Inf although the batch was finite."""


class ResumeMismatchError(ValueError):
    """--resume with a configuration that differs from the checkpointed run."""


# ---------------------------------------------------------------------------------------------
# Names, mesh, shardings
# ---------------------------------------------------------------------------------------------
def sae_name(cfg: SAEConfig) -> str:
    hooks = cfg.hook_in if not cfg.is_transcoder else f"{cfg.hook_in}-to-{cfg.hook_out}"
    k = f"_k{cfg.k}" if cfg.selection in ("topk", "batchtopk") else ""
    return f"{cfg.architecture}_{hooks}_w{cfg.width}{k}"


def unique_names(cfgs: Sequence[SAEConfig]) -> list[str]:
    names, seen = [], {}
    for c in cfgs:
        n = sae_name(c)
        seen[n] = seen.get(n, 0) + 1
        names.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return names


def make_mesh(data: int = 1, feature: int = 1) -> Mesh:
    """A (data, feature) mesh over the first data·feature devices (all processes' devices)."""
    devices = jax.devices()
    if data * feature > len(devices) or data < 1 or feature < 1:
        raise ValueError(
            f"mesh data={data} x feature={feature} needs {data * feature} devices, {len(devices)} available "
            "(on CPU simulate more with XLA_FLAGS=--xla_force_host_platform_device_count=N)"
        )
    return Mesh(np.asarray(devices[: data * feature]).reshape(data, feature), ("data", "feature"))


def _leaf_spec(path, leaf) -> P:
    keys = [getattr(k, "key", None) for k in path]
    name = next((k for k in reversed(keys) if isinstance(k, str)), None)
    if name in FEATURE_AXIS_PARAMS and getattr(leaf, "ndim", 0) == 2:
        return P("feature", None)
    if name in FEATURE_VECTORS and getattr(leaf, "ndim", 0) == 1:
        return P("feature")
    return P()


def state_shardings(state, mesh: Mesh):
    return jax.tree_util.tree_map_with_path(lambda p, x: NamedSharding(mesh, _leaf_spec(p, x)), state)


# ---------------------------------------------------------------------------------------------
# Optimiser
# ---------------------------------------------------------------------------------------------
def lr_schedule(base_lr: float, total_steps: int, warmup_steps: int, decay_frac: float):
    """lr(t) = base · min(1, (t+1)/warmup) · min(1, (T − t)/(decay_frac·T))."""
    warm = max(1, warmup_steps)
    decay = max(1.0, decay_frac * total_steps)

    def schedule(t):
        t = jnp.asarray(t, jnp.float32)
        return base_lr * jnp.minimum(1.0, (t + 1) / warm) * jnp.clip((total_steps - t) / decay, 0.0, 1.0)

    return schedule


def warmup_steps(tcfg: TrainConfig) -> int:
    """The configured warmup, at most a tenth of the run (short runs on small stores)."""
    return max(1, min(tcfg.warmup_steps, tcfg.total_steps // 10))


def make_optimizer(cfg: SAEConfig, tcfg: TrainConfig):
    schedule = lr_schedule(cfg.learning_rate, tcfg.total_steps, warmup_steps(tcfg), tcfg.decay_frac)
    parts = [optax.clip_by_global_norm(tcfg.grad_clip)] if tcfg.grad_clip > 0 else []
    parts.append(optax.adam(schedule, b1=tcfg.adam_b1, b2=tcfg.adam_b2, eps=tcfg.adam_eps))
    return optax.chain(*parts), schedule


def sparsity_warmup(cfg: SAEConfig, tcfg: TrainConfig, step):
    n = max(1.0, cfg.sparsity_warmup_frac * tcfg.total_steps)
    return A.sparsity_coef(cfg) * jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1) / n)


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------
def build_step(cfgs: Sequence[SAEConfig], tcfg: TrainConfig, mesh: Mesh | None = None):
    """step(state, batch) -> (state, (finite, metrics)); state = {"step", "saes": [{params, opt, buffers}]}."""
    optimizers = [make_optimizer(c, tcfg) for c in cfgs]
    dtype = jnp.dtype(tcfg.compute_dtype)
    hooks = sorted({h for c in cfgs for h in (c.hook_in, c.hook_out)})

    def step_fn(state, batch):
        step = state["step"]
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(batch[h])) for h in hooks]))
        new_saes, metrics = [], []
        for cfg, (opt, schedule), s in zip(cfgs, optimizers, state["saes"]):
            x = batch[cfg.hook_in] * cfg.input_scale
            y = batch[cfg.hook_out] * cfg.output_scale
            B = x.shape[0]
            coef = sparsity_warmup(cfg, tcfg, step)
            if mesh is not None:
                x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P("data", None)))

            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(tcfg.seed), step), len(new_saes))

            def loss_fn(params):
                return A.forward_loss(cfg, params, s["buffers"], x, y, coef, key, dtype)

            (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(s["params"])
            grads = A.project_decoder_grad(s["params"], grads)
            updates, opt_state = opt.update(grads, s["opt"], s["params"])
            params = A.normalise_decoder(optax.apply_updates(s["params"], updates))
            buffers = A.update_buffers(cfg, s["buffers"], stats, B)
            ok = finite & jnp.isfinite(loss)
            new = {"params": params, "opt": opt_state, "buffers": buffers}
            new_saes.append(jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, s))
            m = {k: v for k, v in stats.items() if k != "fired_F" and jnp.ndim(v) == 0}
            m["dead_frac"] = jnp.mean(buffers["since_fired"] >= cfg.dead_tokens)
            m["lr"] = schedule(step)
            m["sparsity_coef"] = coef
            if cfg.selection == "batchtopk":
                m["threshold"] = buffers["threshold"]
            m["finite_loss"] = jnp.isfinite(loss)
            metrics.append(m)
        new_step = jnp.where(finite, step + 1, step)
        return {"step": new_step, "saes": new_saes}, (finite, metrics)

    return step_fn, optimizers


# ---------------------------------------------------------------------------------------------
# Set-up: scales, initial state
# ---------------------------------------------------------------------------------------------
def default_dead_tokens(total_tokens: int) -> int:
    """10M tokens (Gao et al. 2024), or a tenth of a shorter run so dead latents are seen and revived."""
    return int(min(10_000_000, max(1, total_tokens // 10)))


def resolve_configs(cfgs: Sequence[SAEConfig], source, tcfg: TrainConfig) -> list[SAEConfig]:
    """Validate against the source, fill in model id, store fingerprint and normalisation scales."""
    out = []
    for c in cfgs:
        c = dataclasses.replace(c)
        for hook in (c.hook_in, c.hook_out):
            if hook not in source.hooks:
                raise SAEConfigError(f"hook {hook!r} is not in the data source; it has {', '.join(source.hooks)}")
        d_in, d_out = source.dim(c.hook_in), source.dim(c.hook_out)
        if c.d_in == 0:
            c.d_in = d_in
        if c.d_out == 0 or (not c.is_transcoder and c.d_out != c.d_in):
            c.d_out = d_out if c.d_out == 0 else c.d_out
        if c.d_in != d_in:
            raise SAEConfigError(
                f"SAE d_in={c.d_in} but hook {c.hook_in} has width {d_in} in the store; "
                f"pass d_in={d_in} (or leave it 0 to take it from the store)"
            )
        if c.d_out != d_out:
            raise SAEConfigError(f"SAE d_out={c.d_out} but hook {c.hook_out} has width {d_out} in the store")
        c.validate()
        if c.dead_tokens <= 0:
            c.dead_tokens = default_dead_tokens(tcfg.total_tokens)
        c.model_id = c.model_id or source.model_id
        c.store_fingerprint = source.fingerprint
        for hook in (c.hook_in, c.hook_out):
            if not math.isfinite(source.mean_sq_norm(hook)):
                raise NonFiniteBatchError(
                    f"the mean squared norm of {hook} is NaN/Inf, so the data hold non-finite values: "
                    f"{source.locate_nonfinite(hook)}. Hint: a float16 harvest can overflow; re-harvest with "
                    "--dtype float32 or drop those contexts."
                )
        c.input_scale = float(math.sqrt(c.d_in / max(source.mean_sq_norm(c.hook_in), 1e-30)))
        c.output_scale = float(math.sqrt(c.d_out / max(source.mean_sq_norm(c.hook_out), 1e-30)))
        c.normalisation_folded = False
        out.append(c)
    return out


def initial_state(cfgs: Sequence[SAEConfig], tcfg: TrainConfig, source, optimizers) -> dict:
    saes = []
    samples: dict[str, np.ndarray] = {}

    def sample(hook):
        if hook not in samples:
            samples[hook] = source.sample(hook, tcfg.geometric_median_samples, tcfg.seed)
        return samples[hook]

    for i, (c, (opt, _)) in enumerate(zip(cfgs, optimizers)):
        key = jax.random.fold_in(jax.random.key(tcfg.seed), i + c.init_seed_offset)
        if tcfg.geometric_median_samples > 0:
            x_sample, y_sample = sample(c.hook_in) * c.input_scale, sample(c.hook_out) * c.output_scale
            b_dec = A.geometric_median(y_sample)
            b_in = A.geometric_median(x_sample) if c.is_transcoder else np.zeros(c.d_in)
        else:
            x_sample, y_sample, b_dec, b_in = None, None, np.zeros(c.d_out), np.zeros(c.d_in)
        params, buffers = A.init_params(c, key, b_dec, b_in, x_sample, y_sample)
        saes.append({"params": params, "opt": opt.init(params), "buffers": buffers})
    return {"step": jnp.zeros((), jnp.int32), "saes": saes}


def _is_main() -> bool:
    """Only process 0 writes files (metrics, saved SAEs); every process takes part in checkpoints."""
    return jax.process_index() == 0


def _to_host(tree):
    """Numpy copy of a (possibly multi-host sharded) pytree."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def _local_rows(x) -> np.ndarray:
    """The rows of a global batch that this process holds."""
    return np.concatenate([np.asarray(s.data) for s in x.addressable_shards]) if hasattr(x, "addressable_shards") \
        else np.asarray(x)


def saved_sae(cfg: SAEConfig, sae_state: dict) -> SAE:
    """The raw-space SAE of one training state (normalisation folded; see saes/io.py)."""
    host = _to_host({"params": sae_state["params"], "buffers": sae_state["buffers"]})
    weights = A.to_saved(cfg, host["params"], host["buffers"], cfg.input_scale, cfg.output_scale)
    return sae_from_params(dataclasses.replace(cfg, normalisation_folded=True), weights)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def _checkpoint_manager(path: Path, keep: int):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(path.absolute(), options=options)


def _restore(manager, step: int, state, shardings):
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def _save(manager, step: int, state):
    import orbax.checkpoint as ocp

    if manager.latest_step() == step:
        return
    manager.save(step, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()


def _run_record(cfgs, tcfg, source) -> dict:
    return {"saes": [c.to_dict() for c in cfgs], "train": tcfg.to_dict(), "source": source.fingerprint}


def _comparable(record: dict) -> dict:
    rec = json.loads(json.dumps(record))
    for k in RESUMABLE_KEYS:
        rec["train"].pop(k, None)
    rec["saes"] = {str(i): s for i, s in enumerate(rec["saes"])}
    return rec


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainResult:
    saes: list[SAE]
    dirs: list[Path]
    names: list[str]
    last_metrics: dict[str, dict]
    steps: int
    state: dict | None = None  # the final (sharded) training state, for inspection


def train_saes(
    configs: Sequence[SAEConfig],
    train_config: TrainConfig,
    source,
    out_dir: str | Path,
    *,
    resume: bool = False,
    eval_fn: EvalFn | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train every SAE in `configs` on the same batches from `source` (saes/sources.py).

    `eval_fn(step, {name: SAE}) -> {name: metrics}` runs every eval_every steps and at the end; its rows
    go to metrics.jsonl with kind "eval". `stop_after` stops (after checkpointing) at that step, as
    if the job had been killed; for tests.
    """
    tcfg = train_config
    if not configs:
        raise SAEConfigError("no SAE configs to train")
    cfgs = resolve_configs(configs, source, tcfg)
    names = unique_names(cfgs)
    out = Path(out_dir)
    dirs = [out] if len(cfgs) == 1 else [out / n for n in names]
    ckpt_dir = out / "checkpoints"
    record = _run_record(cfgs, tcfg, source)
    record_path = out / "run_config.json"
    has_ckpt = ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
    if has_ckpt and not resume:
        raise FileExistsError(f"{out} already has checkpoints; pass --resume to continue, or choose another --out")
    if resume and has_ckpt:
        old = json.loads(record_path.read_text()) if record_path.exists() else {}
        diff = config_diff(_comparable(old), _comparable(record)) if old else ["run_config.json missing"]
        if diff:
            raise ResumeMismatchError(
                "cannot resume: the configuration differs from the checkpointed run in "
                + "; ".join(diff)
                + ". Use the original flags, or start a new run in another --out directory."
            )
    if _is_main():
        out.mkdir(parents=True, exist_ok=True)
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(record, indent=2, sort_keys=True))

    mesh = make_mesh(tcfg.mesh_data, tcfg.mesh_feature)
    for c in cfgs:
        if c.width % tcfg.mesh_feature:
            raise SAEConfigError(f"width {c.width} is not divisible by the mesh feature axis {tcfg.mesh_feature}")
    if tcfg.batch_size % tcfg.mesh_data:
        raise SAEConfigError(f"batch size {tcfg.batch_size} is not divisible by the mesh data axis {tcfg.mesh_data}")

    step_fn, optimizers = build_step(cfgs, tcfg, mesh)
    state = initial_state(cfgs, tcfg, source, optimizers)
    shardings = state_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    manager = _checkpoint_manager(ckpt_dir, tcfg.keep_checkpoints)
    start = 0
    if resume and manager.latest_step() is not None:
        start = int(manager.latest_step())
        state = _restore(manager, start, state, shardings)
    if _is_main():
        _trim_metrics(dirs, start)

    batch_sharding = NamedSharding(mesh, P("data", None))
    metric_sharding = NamedSharding(mesh, P())
    try:
        jstep = jax.jit(step_fn, donate_argnums=(0,), out_shardings=(shardings, metric_sharding))
        result = _loop(cfgs, tcfg, names, dirs, source, state, jstep, manager, start, batch_sharding, eval_fn,
                       progress, stop_after)
    finally:
        manager.close()
    return result


def _trim_metrics(dirs, start: int) -> None:
    """On resume, drop metrics rows logged after the checkpoint (they will be logged again)."""
    for d in dirs:
        f = d / "metrics.jsonl"
        if not f.exists():
            continue
        rows = [r for r in f.read_text().splitlines() if r.strip()]
        keep = [r for r in rows if json.loads(r).get("step", 0) <= start] if start else []
        f.write_text("".join(r + "\n" for r in keep))


def _append(path: Path, rows: Iterable[dict]) -> None:
    if not _is_main():
        return
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _loop(cfgs, tcfg, names, dirs, source, state, jstep, manager, start, batch_sharding, eval_fn, progress,
          stop_after):
    from tqdm.auto import tqdm

    total = tcfg.total_steps
    B = tcfg.batch_size
    hooks = sorted({h for c in cfgs for h in (c.hook_in, c.hook_out)})
    window: list[list[dict]] = [[] for _ in cfgs]
    last: dict[str, dict] = {}
    bar = tqdm(total=total * B, initial=start * B, unit="tok", unit_scale=True, disable=not progress,
               desc="train-sae", dynamic_ncols=True)
    t_window = time.perf_counter()
    batches = source.batches(B, tcfg.seed, start, sharding=batch_sharding)
    step = start
    try:
        while step < total:
            batch = next(batches)
            batch = {h: batch[h] for h in hooks}
            state, (finite, metrics) = jstep(state, batch)
            finite, metrics = jax.device_get((finite, metrics))
            if not finite:
                bad = [h for h in hooks if not np.all(np.isfinite(_local_rows(batch[h])))] or hooks
                where = "; ".join(f"{h}: {source.locate_nonfinite(h)}" for h in bad)
                raise NonFiniteBatchError(
                    f"batch of step {step} (tokens {step * B}-{(step + 1) * B}) contains NaN/Inf in {', '.join(bad)}: "
                    f"{where}. The training state was not updated and no checkpoint was written after step "
                    f"{manager.latest_step()}. Hint: a float16 harvest can overflow; re-harvest with --dtype float32 "
                    "or re-harvest/drop the contexts named above, then --resume."
                )
            for i, m in enumerate(metrics):
                if not m.pop("finite_loss"):
                    raise TrainingDivergedError(
                        f"SAE {names[i]}: loss became NaN/Inf at step {step} on a finite batch; lower its lr "
                        f"(now {cfgs[i].learning_rate:g}) or raise warmup. Last checkpoint: step {manager.latest_step()}."
                    )
                window[i].append({k: float(v) for k, v in m.items()})
            step += 1
            bar.update(B)
            if step % tcfg.log_every == 0 or step == total:
                dt = time.perf_counter() - t_window
                rate = len(window[0]) * B / max(dt, 1e-9)
                for i, d in enumerate(dirs):
                    row = {"kind": "train", "step": step, "tokens": step * B, "sae": names[i]}
                    row.update({k: float(np.mean([w[k] for w in window[i]])) for k in window[i][0]})
                    row["tokens_per_s"] = rate
                    last[names[i]] = row
                    _append(d / "metrics.jsonl", [row])
                    window[i] = []
                r0 = last[names[0]]
                bar.set_postfix(loss=f"{r0['loss']:.4g}", l0=f"{r0['l0']:.1f}", fvu=f"{r0['fvu']:.3f}",
                                dead=f"{r0['dead_frac']:.2f}")
                t_window = time.perf_counter()
            if tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0 and step < total:
                _save(manager, step, state)
            if eval_fn is not None and tcfg.eval_every and step % tcfg.eval_every == 0 and step < total:
                _run_eval(eval_fn, step, B, cfgs, names, dirs, state)
            if stop_after is not None and step >= stop_after:
                _save(manager, step, state)
                return TrainResult([], dirs, names, last, step, state)
    finally:
        bar.close()
        close = getattr(batches, "close", None)
        if close:
            close()
    _save(manager, step, state)
    saes = [saved_sae(c, s) for c, s in zip(cfgs, state["saes"])]
    if _is_main():
        for sae, d in zip(saes, dirs):
            save_sae(sae, d, train_config=tcfg.to_dict())
    if eval_fn is not None:
        last.update(_run_eval(eval_fn, step, B, cfgs, names, dirs, state, saes))
    return TrainResult(saes, dirs, names, last, step, state)


def _run_eval(eval_fn, step, B, cfgs, names, dirs, state, saes=None) -> dict:
    saes = saes or [saved_sae(c, s) for c, s in zip(cfgs, state["saes"])]  # a collective on multi-host
    if not _is_main():
        return {}
    results = eval_fn(step, dict(zip(names, saes))) or {}
    out = {}
    for name, d in zip(names, dirs):
        if name in results:
            row = {"kind": "eval", "step": step, "tokens": step * B, "sae": name, **results[name]}
            _append(d / "metrics.jsonl", [row])
            out[name] = row
    return out
