"""Train several SAEs from one stream of batches, sharded over a (data, feature) mesh, resumable.

One jitted step updates every SAE: each hook's batch is read once and shared by all SAEs on it.
Per SAE: loss and grads (its record in saes/architectures.py), the decoder-row gradient component
along each row removed, global-norm clipping, Adam with linear warmup and final linear decay (optax
schedules), decoder rows renormalised, dead-latent and architecture buffers updated.

The whole device state is one `TrainState` (a flax.struct pytree): the SAEs, the step, the metric
sums since the last log, and the first step that met a NaN/Inf batch or loss. The host reads it only
every `log_every` steps, before a checkpoint or evaluation, and at the end, so steps are dispatched
back to back. A batch with NaN/Inf (or a loss that becomes NaN/Inf) freezes the state at the step
before it; the next read stops training with that step, the offending hooks and rows (found by
re-reading that batch: the stream is a pure function of the step), and no checkpoint after it.

Sharding: a Mesh with axes ("data", "feature"); batches are split over data, encoder/decoder rows,
b_enc-like vectors and the dead-latent counters over feature (optimizer state alike); jit + GSPMD
partitions the step (the TopK/BatchTopK selection and the sparse gathers included; a test checks that
8 simulated devices reproduce 1 device). Multi-host: call jax.distributed.initialize() first (the CLI's
--distributed); the mesh then spans every process's devices, each process reads only its own rows of
each global batch (store.batches with the batch sharding), orbax writes checkpoints collectively, and
process 0 alone writes metrics and saved SAEs.

Output directory, a run of activation_store/runs.py (one SAE: `out/` itself is the SAE directory;
several: `out/<name>/` each):
  out/run.json                                 requested settings; --resume must match them
  out/results.json                             what the run produced: scales, steps, data used, last metrics
  <sae dir>/config.json, weights.safetensors   saved SAE (saes/io.py), published together at the end
  <sae dir>/metrics.jsonl                      {"kind": "train"|"eval", "step", "tokens", "sae", ...}
  out/checkpoints/<step>/                      orbax checkpoints of {"step", "saes": [{params, opt, buffers}]}
Run directories written before run.json existed (out/run_config.json) resume as before.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from featureatlas.activation_store.configs import flags_of
from featureatlas.activation_store.errors import ConfigError, FeatureAtlasError
from featureatlas.activation_store.massive import store_norm_threshold
from featureatlas.activation_store.runs import Checkpoints, MetricsLog, Run, read_json
from featureatlas.saes import architectures as A
from featureatlas.saes.config import SAEConfig, SAETrainConfig
from featureatlas.saes.io import save_sae
from featureatlas.saes.sae import SAE, sae_from_params

JOB = "train-sae"
FEATURE_AXIS_PARAMS = ("enc_FxD", "dec_FxE")
FEATURE_VECTORS = ("b_enc", "b_gate", "r_mag", "b_mag", "log_threshold", "since_fired")
# Settings that only change what is logged or saved, so --resume accepts a change to them.
RESUMABLE_KEYS = ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "store")
# SAEConfig fields that are not requested settings: measured from the data (recorded in results.json),
# or folded into another field (expansion only chooses the width, which is recorded).
NOT_SETTINGS = ("input_scale", "output_scale", "normalisation_folded", "expansion")
FLAGS = {**flags_of(SAEConfig, SAETrainConfig), "mesh_data": "--mesh", "mesh_feature": "--mesh",
         "source": "--store (its contents)"}

POOLED = {"fvu": ("fvu_sse", "fvu_var"), "fvu_excl_massive": ("fvu_sse_kept", "fvu_var_kept")}
"""Metrics logged as one ratio of the window's sums (A.forward_loss), as eval FVU is one ratio over all eval
tokens: a few massive-norm tokens weigh in train and eval alike. Every other metric is the window's mean."""

EvalFn = Callable[[int, dict[str, SAE]], dict[str, dict]]


class NonFiniteBatchError(FeatureAtlasError, ValueError):
    """A training batch held NaN or Inf."""


class TrainingDivergedError(FeatureAtlasError, ValueError):
    """The loss became NaN/Inf although the batch was finite."""


# ---------------------------------------------------------------------------------------------
# Names, mesh, shardings
# ---------------------------------------------------------------------------------------------
def unique_names(cfgs: Sequence[SAEConfig]) -> list[str]:
    """arch_hook[-to-hook_out]_wWIDTH[_kK] per SAE, with _2, _3, ... on repeats."""
    names, seen = [], {}
    for c in cfgs:
        hooks = c.hook_in if not c.is_transcoder else f"{c.hook_in}-to-{c.hook_out}"
        n = f"{c.architecture}_{hooks}_w{c.width}" + (f"_k{c.k}" if A.architecture(c).uses_k else "")
        seen[n] = seen.get(n, 0) + 1
        names.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return names


def make_mesh(data: int = 1, feature: int = 1) -> Mesh:
    """A (data, feature) mesh over the first data·feature devices (all processes' devices)."""
    devices = jax.devices()
    if data * feature > len(devices) or data < 1 or feature < 1:
        raise ConfigError(
            f"--mesh data={data},feature={feature} needs {data * feature} devices, {len(devices)} available "
            "(on CPU simulate more with XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    return Mesh(np.asarray(devices[: data * feature]).reshape(data, feature), ("data", "feature"))


def _leaf_spec(path, leaf) -> P:
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
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
def lr_schedule(base_lr: float, total_steps: int, warmup_steps: int, decay_frac: float) -> optax.Schedule:
    """lr(t) = base · min(1, (t+1)/W) · clip((T − t)/d, 0, 1), W = max(1, warmup), d = max(1, decay_frac·T):
    a linear warmup from base/W, a plateau, and a linear decay to 0 over the final d steps, joined with
    optax.join_schedules. The warmup ends before the decay starts (SAETrainConfig caps W at T/10 and
    decay_frac at 0.9), so the joined pieces equal the product."""
    warm = max(1, warmup_steps)
    decay = max(1.0, decay_frac * total_steps)
    warmup = (optax.linear_schedule(base_lr / warm, base_lr, warm - 1) if warm > 1
              else optax.constant_schedule(base_lr))
    return optax.join_schedules([warmup, optax.constant_schedule(base_lr), optax.linear_schedule(base_lr, 0.0, decay)],
                                [warm - 1, total_steps - decay])


def warmup_steps(tcfg: SAETrainConfig) -> int:
    """The configured warmup, at most a tenth of the run (short runs on small stores)."""
    return max(1, min(tcfg.warmup_steps, tcfg.total_steps // 10))


def make_optimizer(cfg: SAEConfig, tcfg: SAETrainConfig):
    schedule = lr_schedule(cfg.lr, tcfg.total_steps, warmup_steps(tcfg), tcfg.decay_frac)
    parts = [optax.clip_by_global_norm(tcfg.grad_clip)] if tcfg.grad_clip > 0 else []
    parts.append(optax.adam(schedule, b1=tcfg.adam_b1, b2=tcfg.adam_b2, eps=tcfg.adam_eps))
    return optax.chain(*parts), schedule


def sparsity_warmup(cfg: SAEConfig, tcfg: SAETrainConfig, step):
    n = max(1.0, cfg.sparsity_warmup_frac * tcfg.total_steps)
    return A.sparsity_coef(cfg) * jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1) / n)


# ---------------------------------------------------------------------------------------------
# The state and the step
# ---------------------------------------------------------------------------------------------
@flax.struct.dataclass
class SAEState:
    """One SAE's training state."""

    params: dict
    opt: Any
    buffers: dict


@flax.struct.dataclass
class TrainState:
    """Everything the jitted step carries from one step to the next (see the module docstring)."""

    step: jax.Array
    """Steps applied."""
    saes: tuple[SAEState, ...]
    sums: tuple[dict, ...] | None = None
    """Per SAE, the sum of each scalar metric over the steps since the last log."""
    n_summed: jax.Array = dataclasses.field(default_factory=lambda: jnp.zeros((), jnp.int32))
    bad_step: jax.Array = dataclasses.field(default_factory=lambda: jnp.full((), -1, jnp.int32))
    """-1, or the first step whose batch or loss was NaN/Inf (no step has been applied since)."""
    bad_sae: jax.Array = dataclasses.field(default_factory=lambda: jnp.full((), -1, jnp.int32))
    """At bad_step: -1 if the batch held NaN/Inf, else the SAE whose loss diverged on a finite batch."""

    def checkpoint(self) -> dict:
        """The checkpointed part, in the layout every train-sae checkpoint has had."""
        return {"step": self.step, "saes": [{"params": s.params, "opt": s.opt, "buffers": s.buffers}
                                            for s in self.saes]}

    def from_checkpoint(self, ckpt: dict) -> "TrainState":
        saes = tuple(SAEState(s["params"], s["opt"], s["buffers"]) for s in ckpt["saes"])
        return self.replace(step=ckpt["step"], saes=saes)


def build_step(cfgs: Sequence[SAEConfig], tcfg: SAETrainConfig, mesh: Mesh | None = None,
               massive_thresholds: Sequence[float | None] | None = None):
    """(step, optimizers, zero_sums): step(state, batch) -> state, for a TrainState whose sums come
    from zero_sums(saes, batch_shapes). massive_thresholds: per SAE, the target norm (training units) above
    which a token is massive, to sum the FVU parts without such tokens too (None: not summed)."""
    massive_thresholds = massive_thresholds or [None] * len(cfgs)
    optimizers = [make_optimizer(c, tcfg) for c in cfgs]
    dtype = jnp.dtype(tcfg.compute_dtype)

    def sae_updates(saes, batch, step):
        """(new SAE states, metrics per SAE, loss finite per SAE, batch finite)."""
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in batch.values()]))
        new_saes, metrics, ok = [], [], []
        for i, (cfg, (opt, schedule), s, thr) in enumerate(zip(cfgs, optimizers, saes, massive_thresholds)):
            x, y = batch[cfg.hook_in] * cfg.input_scale, batch[cfg.hook_out] * cfg.output_scale
            coef = sparsity_warmup(cfg, tcfg, step)
            if mesh is not None:
                x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P("data", None)))
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(tcfg.seed), step), i)

            def loss_fn(params):
                return A.forward_loss(cfg, params, s.buffers, x, y, coef, key, dtype, massive_threshold=thr)

            (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(s.params)
            grads = A.project_decoder_grad(s.params, grads)
            updates, opt_state = opt.update(grads, s.opt, s.params)
            params = A.normalise_decoder(optax.apply_updates(s.params, updates))
            buffers = A.update_buffers(cfg, s.buffers, stats, x.shape[0])
            new_saes.append(SAEState(params, opt_state, buffers))
            m = {**{k: v for k, v in stats.items() if k != "fired_F" and jnp.ndim(v) == 0},
                 "dead_frac": jnp.mean(buffers["since_fired"] >= cfg.dead_tokens), "lr": schedule(step),
                 "sparsity_coef": coef}
            if "batch_threshold" in stats:
                m["threshold"] = buffers["threshold"]
            metrics.append({k: jnp.asarray(v, jnp.float32) for k, v in m.items()})
            ok.append(jnp.isfinite(loss))
        return tuple(new_saes), tuple(metrics), jnp.stack(ok), finite

    def step_fn(state: TrainState, batch) -> TrainState:
        saes, metrics, loss_ok, finite = sae_updates(state.saes, batch, state.step)
        live = state.bad_step < 0
        ok = live & finite & jnp.all(loss_ok)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        failed = live & ~ok
        return state.replace(
            step=jnp.where(ok, state.step + 1, state.step), saes=keep(saes, state.saes),
            sums=keep(jax.tree.map(jnp.add, state.sums, metrics), state.sums),
            n_summed=state.n_summed + ok.astype(jnp.int32), bad_step=jnp.where(failed, state.step, state.bad_step),
            bad_sae=jnp.where(failed, jnp.where(finite, jnp.argmin(loss_ok), -1), state.bad_sae).astype(jnp.int32))

    def zero_sums(saes, batch_shapes):
        shapes = jax.eval_shape(sae_updates, saes, batch_shapes, jnp.zeros((), jnp.int32))[1]
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    return step_fn, optimizers, zero_sums


def reset_sums(state: TrainState) -> TrainState:
    return state.replace(sums=jax.tree.map(jnp.zeros_like, state.sums), n_summed=jnp.zeros_like(state.n_summed))


# ---------------------------------------------------------------------------------------------
# Set-up: configs, scales, initial state
# ---------------------------------------------------------------------------------------------
def resolve_configs(cfgs: Sequence[SAEConfig], source, tcfg: SAETrainConfig) -> list[SAEConfig]:
    """Validate against the source (no data read) and fill in sizes, dead window, model id, fingerprint."""
    out = []
    for c in cfgs:
        c = dataclasses.replace(c)
        if not c.hook_in:
            raise ConfigError("no hook: pass --hook (or hook=... in every --sae), e.g. --hook resid_post.15")
        for hook in (c.hook_in, c.hook_out):
            if hook not in source.hooks:
                raise ConfigError(f"hook {hook!r} is not in the data source; it has {', '.join(source.hooks)}")
        d_in, d_out = source.dim(c.hook_in), source.dim(c.hook_out)
        c.d_in, c.d_out = c.d_in or d_in, c.d_out or d_out
        if c.d_in != d_in:
            raise ConfigError(f"SAE d_in={c.d_in} but hook {c.hook_in} has width {d_in} in the store; "
                              f"pass d_in={d_in} (or leave it 0 to take it from the store)")
        if c.d_out != d_out:
            raise ConfigError(f"SAE d_out={c.d_out} but hook {c.hook_out} has width {d_out} in the store")
        if c.width is None:
            c.width = int(round(c.expansion * c.d_in))
        c.validate()
        if c.width % tcfg.mesh_feature:
            raise ConfigError(f"width {c.width} is not divisible by the mesh feature axis {tcfg.mesh_feature}; "
                              "choose a --width that is, or another --mesh")
        if c.dead_tokens <= 0:  # 10M tokens (Gao et al. 2024), or a tenth of a shorter run so dead latents revive
            c.dead_tokens = int(min(10_000_000, max(1, tcfg.total_tokens // 10)))
        c.model_id = c.model_id or source.model_id
        c.store_fingerprint = source.fingerprint
        c.normalisation_folded = False
        out.append(c)
    return out


def measure_scales(cfgs: Sequence[SAEConfig], source) -> list[SAEConfig]:
    """input_scale, output_scale = sqrt(d / E‖x‖²) of each SAE's hooks (reads the data once per hook)."""
    def scale(d: int, hook: str) -> float:
        sq = source.mean_sq_norm(hook)
        if not math.isfinite(sq):
            raise NonFiniteBatchError(
                f"the mean squared norm of {hook} is NaN/Inf, so the data hold non-finite values: "
                f"{source.locate_nonfinite(hook)}. Hint: a float16 harvest can overflow; re-harvest with "
                "--dtype float32 or drop those contexts.")
        return float(math.sqrt(d / max(sq, 1e-30)))

    return [dataclasses.replace(c, input_scale=scale(c.d_in, c.hook_in), output_scale=scale(c.d_out, c.hook_out))
            for c in cfgs]


def massive_thresholds(cfgs: Sequence[SAEConfig], source, tcfg: SAETrainConfig) -> list[float | None]:
    """Per SAE, the massive-token norm of its target in training units: activation_store.massive's threshold
    of hook_out (the one eval uses) times output_scale, so train rows also log fvu_excl_massive. None when
    training leaves massive tokens out already, or the source has no store (in-memory arrays)."""
    store = getattr(source, "store", None)
    if tcfg.exclude_massive or store is None:
        return [None] * len(cfgs)
    raw = {h: store_norm_threshold(store, h) for h in dict.fromkeys(c.hook_out for c in cfgs)}
    return [raw[c.hook_out] * c.output_scale for c in cfgs]


def initial_state(cfgs: Sequence[SAEConfig], tcfg: SAETrainConfig, source, optimizers) -> TrainState:
    """Step 0: b_dec (and a transcoder's b_in) at the geometric median of a sample, architecture init."""
    saes = []
    sample = functools.cache(lambda hook: source.sample(hook, tcfg.geometric_median_samples, tcfg.seed))
    for i, (c, (opt, _)) in enumerate(zip(cfgs, optimizers)):
        key = jax.random.fold_in(jax.random.key(tcfg.seed), i + c.init_seed_offset)
        if tcfg.geometric_median_samples > 0:
            x_sample, y_sample = sample(c.hook_in) * c.input_scale, sample(c.hook_out) * c.output_scale
            b_dec = A.geometric_median(y_sample)
            b_in = A.geometric_median(x_sample) if c.is_transcoder else np.zeros(c.d_in)
        else:
            x_sample, y_sample, b_dec, b_in = None, None, np.zeros(c.d_out), np.zeros(c.d_in)
        params, buffers = A.init_params(c, key, b_dec, b_in, x_sample, y_sample)
        saes.append(SAEState(params, opt.init(params), buffers))
    return TrainState(step=jnp.zeros((), jnp.int32), saes=tuple(saes))


def init_distributed(coordinator: str = "", num_processes: int | None = None, process_id: int | None = None) -> None:
    """Join a multi-process run through JAX's own runtime: `jax.distributed.initialize`, with CPU
    collectives over gloo (so CPU processes, on one machine or several, train together; GPUs and TPUs
    use their own collectives). Unset arguments come from the environment or the cluster."""
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise ConfigError(f"--process-id {process_id} must be below --num-processes {num_processes}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator or None, num_processes, process_id)
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"--distributed could not start ({err}); give --coordinator HOST:PORT --num-processes N "
                          "--process-id I on every process, or run under SLURM, Open MPI or a Cloud TPU") from None


def _barrier(name: str) -> None:
    """Wait until every process of a multi-host run reaches this point (no-op in one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def addressable_rows(x) -> np.ndarray:
    """The rows of a global batch that this process holds."""
    return np.concatenate([np.asarray(s.data) for s in x.addressable_shards]) if hasattr(x, "addressable_shards") \
        else np.asarray(x)


def saved_sae(cfg: SAEConfig, params: dict, buffers: dict) -> SAE:
    """The raw-space SAE of one training state (normalisation folded; see saes/io.py)."""
    tree = {"params": params, "buffers": buffers}  # a numpy copy, gathered from every process of a multi-host run
    host = multihost_utils.process_allgather(tree, tiled=True) if jax.process_count() > 1 else jax.device_get(tree)
    weights = A.to_saved(cfg, host["params"], host["buffers"], cfg.input_scale, cfg.output_scale)
    return sae_from_params(dataclasses.replace(cfg, normalisation_folded=True), weights)


# ---------------------------------------------------------------------------------------------
# The run: requested settings, legacy run directories
# ---------------------------------------------------------------------------------------------
def _sae_settings(cfg: SAEConfig) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if k not in NOT_SETTINGS}


def run_settings(cfgs: Sequence[SAEConfig], tcfg: SAETrainConfig, source) -> dict:
    """The requested settings of a run (run.json): the training loop's fields, each SAE (resolved sizes,
    no measured scales), the data's fingerprint and path."""
    return {**tcfg.to_dict(), "saes": [_sae_settings(c) for c in cfgs], "source": source.fingerprint,
            "store": getattr(source, "path", "")}


def legacy_settings(out: Path) -> dict | None:
    """The settings of a run directory written before run.json (out/run_config.json), in today's form."""
    path = out / "run_config.json"
    if not path.exists():
        return None
    old = read_json(path)
    return {**SAETrainConfig.from_dict(old.get("train", {})).to_dict(),
            "saes": [_sae_settings(SAEConfig.from_dict(s)) for s in old.get("saes", [])],
            "source": old.get("source", "")}


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
    state: TrainState | None = None  # the final (sharded) training state, for inspection


@dataclasses.dataclass
class _Job:
    """What the loop uses besides the device state."""

    cfgs: list[SAEConfig]
    hooks: list[str]
    """Every hook the SAEs read, sorted."""
    tcfg: SAETrainConfig
    names: list[str]
    dirs: list[Path]
    logs: list[MetricsLog]
    source: Any
    run: Run
    ckpt: Checkpoints
    jstep: Callable
    jreset: Callable
    batch_sharding: NamedSharding
    eval_fn: EvalFn | None
    progress: bool
    stop_after: int | None
    last: dict[str, dict] = dataclasses.field(default_factory=dict)
    t_window: float = dataclasses.field(default_factory=time.perf_counter)


def train_saes(configs: Sequence[SAEConfig], train_config: SAETrainConfig, source, out_dir: str | Path, *,
               resume: bool = False, overwrite: bool = False, eval_fn: EvalFn | None = None, progress: bool = True,
               stop_after: int | None = None) -> TrainResult:
    """Train every SAE in `configs` on the same batches from `source` (saes/sources.py) into `out_dir`.

    Every setting is checked, and the run directory prepared (activation_store.runs.Run), before any
    data is read. `eval_fn(step, {name: SAE}) -> {name: metrics}` runs every eval_every steps and at the
    end; its rows go to metrics.jsonl with kind "eval". `stop_after` stops (after checkpointing) at that
    step, as if the job had been killed; for tests.
    """
    tcfg = dataclasses.replace(train_config).validate()
    if not configs:
        raise ConfigError("no SAE configs to train")
    cfgs = resolve_configs(configs, source, tcfg)
    mesh = make_mesh(tcfg.mesh_data, tcfg.mesh_feature)
    names = unique_names(cfgs)
    out = Path(out_dir)
    dirs = [out] if len(cfgs) == 1 else [out / n for n in names]
    # Process 0 alone writes files (metrics, saved SAEs); every process takes part in checkpoints.
    run = Run.prepare(out, JOB, run_settings(cfgs, tcfg, source), resume=resume, overwrite=overwrite, flags=FLAGS,
                      ignore=RESUMABLE_KEYS, legacy_settings=legacy_settings, main=jax.process_index() == 0)
    _barrier("featureatlas: every process checked --out")  # before process 0 writes run.json into it
    with run.active():
        _barrier("featureatlas: run directory ready")
        if tcfg.exclude_massive:
            source.exclude_massive()
        cfgs = measure_scales(cfgs, source)
        step_fn, optimizers, zero_sums = build_step(cfgs, tcfg, mesh, massive_thresholds(cfgs, source, tcfg))
        state = initial_state(cfgs, tcfg, source, optimizers)
        hooks = sorted({h for c in cfgs for h in (c.hook_in, c.hook_out)})
        shapes = {h: jax.ShapeDtypeStruct((tcfg.batch_size, source.dim(h)), jnp.float32) for h in hooks}
        state = state.replace(sums=zero_sums(state.saes, shapes))
        shardings = state_shardings(state, mesh)
        state = jax.device_put(state, shardings)
        with run.checkpoints(tcfg.keep_checkpoints) as ckpt:
            start = 0
            if run.resuming and ckpt.latest_step() is not None:
                start = ckpt.latest_step()
                like = state.checkpoint()
                state = state.from_checkpoint(ckpt.restore(start, like, state_shardings(like, mesh)))
            logs = [MetricsLog(d / "metrics.jsonl", enabled=run.main) for d in dirs]
            for d, log in zip(dirs, logs):
                if run.main:
                    d.mkdir(parents=True, exist_ok=True)
                log.truncate_after(start)
            job = _Job(cfgs, hooks, tcfg, names, dirs, logs, source, run, ckpt,
                       jax.jit(step_fn, donate_argnums=(0,), out_shardings=shardings),
                       jax.jit(reset_sums, donate_argnums=(0,), out_shardings=shardings),
                       NamedSharding(mesh, P("data", None)), eval_fn, progress, stop_after)
            return _loop(job, state, start)


def _loop(job: _Job, state: TrainState, start: int) -> TrainResult:
    from tqdm.auto import tqdm

    tcfg, B, total = job.tcfg, job.tcfg.batch_size, job.tcfg.total_steps
    bar = tqdm(total=total * B, initial=start * B, unit="tok", unit_scale=True, disable=not job.progress,
               desc=JOB, dynamic_ncols=True)
    batches = job.source.batches(B, tcfg.seed, start, sharding=job.batch_sharding)
    step = start
    try:
        while step < total:
            batch = next(batches)
            state = job.jstep(state, {h: batch[h] for h in job.hooks})
            step += 1
            bar.update(B)
            checkpoint = bool(tcfg.checkpoint_every) and step % tcfg.checkpoint_every == 0 and step < total
            evaluate = job.eval_fn is not None and tcfg.eval_every and step % tcfg.eval_every == 0 and step < total
            stop = job.stop_after is not None and step >= job.stop_after
            if step % tcfg.log_every == 0 or step == total or checkpoint or evaluate or stop:
                _check(job, state)
            if step % tcfg.log_every == 0 or step == total:
                state = _log(job, state, step, bar)
            if checkpoint or stop:
                job.ckpt.save(step, state.checkpoint())
            if evaluate:
                _run_eval(job, step, state)
            if stop:
                return TrainResult([], job.dirs, job.names, job.last, step, state)
    finally:
        bar.close()
        getattr(batches, "close", lambda: None)()
    _check(job, state)
    job.ckpt.save(step, state.checkpoint())
    saes = [saved_sae(c, s.params, s.buffers) for c, s in zip(job.cfgs, state.saes)]
    data = job.source.record()
    for sae, d in zip(saes, job.dirs):
        if job.run.main:
            save_sae(sae, d, train_config=tcfg.to_dict(), data=data)
    if job.eval_fn is not None:
        job.last.update(_run_eval(job, step, state, saes))
    job.run.write_results({
        "steps": step, "tokens": step * B, "data": data,
        "saes": {n: {"dir": str(d), "input_scale": c.input_scale, "output_scale": c.output_scale,
                     "last_metrics": job.last.get(n, {})} for n, d, c in zip(job.names, job.dirs, job.cfgs)}})
    return TrainResult(saes, job.dirs, job.names, job.last, step, state)


def _check(job: _Job, state: TrainState) -> None:
    """Stop with the step, hooks and rows if a batch or loss was NaN/Inf (one small device read)."""
    bad_step, bad_sae = (int(v) for v in jax.device_get((state.bad_step, state.bad_sae)))
    if bad_step < 0:
        return
    B = job.tcfg.batch_size
    latest = job.ckpt.latest_step()
    if bad_sae >= 0:
        raise TrainingDivergedError(
            f"SAE {job.names[bad_sae]}: loss became NaN/Inf at step {bad_step} on a finite batch; lower its lr "
            f"(now {job.cfgs[bad_sae].lr:g}) or raise warmup. Last checkpoint: step {latest}.")
    replay = job.source.batches(B, job.tcfg.seed, bad_step, sharding=job.batch_sharding)
    try:
        batch = next(replay)  # the stream is a pure function of the step: this is the batch that failed
    finally:
        getattr(replay, "close", lambda: None)()
    bad = [h for h in job.hooks if not np.all(np.isfinite(addressable_rows(batch[h])))] or job.hooks
    where = "; ".join(f"{h}: {job.source.locate_nonfinite(h)}" for h in bad)
    raise NonFiniteBatchError(
        f"batch of step {bad_step} (tokens {bad_step * B}-{(bad_step + 1) * B}) contains NaN/Inf in "
        f"{', '.join(bad)}: {where}. The training state was not updated and no checkpoint was written after "
        f"step {latest}. Hint: a float16 harvest can overflow; re-harvest with --dtype float32 "
        "or re-harvest/drop the contexts named above, then --resume.")


def window_metrics(sums: dict, n: int) -> dict:
    """The logged metrics of one SAE from its sums over n steps: POOLED ratios, every other one the mean."""
    parts = {p for pair in POOLED.values() for p in pair}
    out = {k: float(v) / n for k, v in sums.items() if k not in parts}
    out.update({k: float(sums[a]) / max(float(sums[b]), 1e-12) for k, (a, b) in POOLED.items() if a in sums})
    return dict(sorted(out.items()))


def _log(job: _Job, state: TrainState, step: int, bar) -> TrainState:
    """One metrics.jsonl row per SAE from the metric sums since the last log (window_metrics), then reset them."""
    sums, n = jax.device_get((state.sums, state.n_summed))
    n = max(int(n), 1)
    rate = n * job.tcfg.batch_size / max(time.perf_counter() - job.t_window, 1e-9)
    for name, log, s in zip(job.names, job.logs, sums):
        row = {"kind": "train", "step": step, "tokens": step * job.tcfg.batch_size, "sae": name,
               **window_metrics(s, n), "tokens_per_s": rate}
        job.last[name] = row
        log.append([row])
    r0 = job.last[job.names[0]]
    bar.set_postfix(loss=f"{r0['loss']:.4g}", l0=f"{r0['l0']:.1f}", fvu=f"{r0['fvu']:.3f}",
                    dead=f"{r0['dead_frac']:.2f}")
    job.t_window = time.perf_counter()
    return job.jreset(state)


def _run_eval(job: _Job, step: int, state: TrainState, saes=None) -> dict:
    saes = saes or [saved_sae(c, s.params, s.buffers) for c, s in zip(job.cfgs, state.saes)]  # multi-host collective
    if not job.run.main:
        return {}
    results = job.eval_fn(step, dict(zip(job.names, saes))) or {}
    out = {n: {"kind": "eval", "step": step, "tokens": step * job.tcfg.batch_size, "sae": n, **results[n]}
           for n in job.names if n in results}
    for name, log in zip(job.names, job.logs):
        if name in out:
            log.append([out[name]])
    return out


__all__ = ["NonFiniteBatchError", "SAEState", "TrainResult", "TrainState", "TrainingDivergedError", "build_step",
           "init_distributed", "initial_state", "lr_schedule", "make_mesh", "resolve_configs", "train_saes"]
