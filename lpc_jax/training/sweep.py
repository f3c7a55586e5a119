"""Langevin hyperparameter sweeps: K (step_size, decay) settings trained in one program.

Every member of a sweep has its own ``TrainState`` (theta, phi, Adam state) and
its own PRNG keys; all members see the same data batch at every SGD step. The
member axis is mapped over the plain LPC step (:func:`lpc_jax.model.steps.lpc_train_step`),
so there is one compiled program for every value of (step_size, decay) — they
are traced arrays (``LangevinHParams``).

    states = init_sweep(init_keys, model, (28, 28, 1), 40)           # leading axis K
    step = jax.jit(make_sweep_step(config, model), donate_argnums=0)
    states, metrics = step(states, x, rng_keys, langevin.stack_hparams(step_sizes, decays))  # metrics (K,)
    run_sweep(config, [0.01, 0.1, 0.5], ["off", 0.25, 0.99], "runs/sweep")          # the whole loop

Identity with separate runs
---------------------------
:func:`run_sweep` trains its members in the same loop as
``train.train_and_evaluate`` (:class:`lpc_jax.training.loop.Trainer`): member ``k`` with
seed ``s`` has the keys ``loop.run_keys(s)``, starts from ``loop.init_state``
and at step ``i`` gets ``fold_in(step_key, i)`` and the batch
``data.step_batches(images, batch_size, config.seed, ...)`` yields for step ``i``.
So a member whose seed is ``config.seed`` (the default for every member) trains
the same parameters as ``train_and_evaluate(config with its step_size/decay)``:
the per-member math is the same function, only mapped. Members with other seeds
(``seeds=``) still equal a loop of the jitted single step with their keys, but
see ``config.seed``'s batch order. A sweep checkpoints its stacked states and
resumes like a single run. What differs from a separate run: a member whose
step produces NaN/Inf is recorded as diverged (``diverged_at_step``) and its
results are reported as null; a separate run would stop with ``DivergenceError``.

Preconditioning on/off is static (a different program). ``decays`` may contain
``"off"``: those members run without the preconditioner (G = 1; the decay is
then meaningless) in a second compiled program fed the same batches. With
``config.preconditioner=False`` every member is ``"off"``.

vmap or lax.map
---------------
``mode="vmap"`` batches the members: every convolution of the decoder and
encoder becomes a grouped convolution over the member axis
(``feature_group_count``/``batch_group_count``), which XLA:CPU runs far slower
than K separate convolutions. ``mode="map"`` runs the members one after
another inside the same program (``lax.map``): each member runs exactly the
single-run computation (results bitwise equal to separate runs in the tests),
one dispatch per SGD step for all members, cost K single steps on one device.
Batching members wins nothing on a CPU; vmap may pay off on an accelerator.
``mode="auto"`` (the default) picks vmap on GPU/TPU and map on CPU, for the
platform the program is lowered for (``lax.platform_dependent``). What does
pay on a small CPU is running members concurrently, one JAX device per core
(``experiments.sweep --cpu_devices``, ``distributed.set_cpu_devices``; below).
Measured speeds: ``python -m benchmarks.chain`` and ``benchmarks/RESULTS.md``.

Across devices
--------------
:func:`run_sweep` lays each group's member axis on the local devices
(``distributed.member_parallel``, ``jax.shard_map``): K members on K devices
run one member each (the single step itself, no vmap, so no grouped
convolutions on any backend), K = q * n members on n devices run q per device
by ``mode``. Every device sees the whole batch; results equal separate runs as
above. A sweep runs in one process.

Library code only: no flags; the command line is ``python -m experiments.sweep``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import numbers
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lpc_jax import plotting
from lpc_jax.evaluation import bounds, monitor
from lpc_jax.model.state import Model, TrainState
from lpc_jax.runtime import distributed, logs, workdir_lock, writers
from lpc_jax.sampling import langevin
from lpc_jax.training import build, loop, train
from lpc_jax.training.config import Config, check_resumable

Array = jax.Array

SWEEP_MODES = ("vmap", "map")  # how one device runs its members
MODES = ("auto", *SWEEP_MODES)  # what a caller may ask for; "auto" -> resolve_mode
DEFAULT_MODE = "auto"
OFF = "off"  # a ``decays`` entry: no preconditioner

# Metrics a sweep can rank members by -> True if higher is better. "fd" means the
# dataset's classifier-space Frechet distance (fd_fmnist for Fashion-MNIST).
METRICS = {
    "elbo": True, "log_p_end": True, "log_p_chain": True, "log_p_start": True,
    "forward_kl": False, "loss": False,
    "test_elbo_nats": True, "test_elbo_bits_per_dim": False,
    "fd": False,
}
_TRAIN_METRICS = ("elbo", "log_p_end", "log_p_chain", "log_p_start", "forward_kl", "loss",
                  "drift_norm_start", "drift_norm_end")


# --------------------------------------------------------------------------- #
# Pure pieces
# --------------------------------------------------------------------------- #


def stack_trees(trees: Sequence[Any]) -> Any:
    """Stacks K pytrees of the same structure along a new leading member axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


member = loop.member_tree  # member(tree, k): member k of a stacked pytree


def init_sweep(rng_keys: Array, model: Model, image_shape, latent_dim: int) -> TrainState:
    """Stacked ``TrainState`` (leading axis K) from K init keys, shape (K,).

    Member ``k`` is ``loop.init_state(rng_keys[k], ...)``, the state a single
    run with that init key starts from.
    """
    return stack_trees([loop.init_state(k, model, image_shape, latent_dim) for k in rng_keys])


def resolve_mode(mode: str, backend: str | None = None) -> str:
    """``"auto"`` -> ``"vmap"`` on GPU/TPU, ``"map"`` on CPU; ``"vmap"``/``"map"`` as given.

    ``backend``: the platform (``"cpu"``, ``"gpu"``/``"cuda"``, ``"tpu"``); None: this
    host's default backend, for reports. The step itself does not use this:
    :func:`make_sweep_step` resolves ``"auto"`` by ``lax.platform_dependent``, for the
    platform the program is lowered for.

    Raises:
      ValueError: a mode not in ``MODES``.
    """
    if mode not in MODES:
        raise ValueError(f"sweep mode {mode!r} is invalid: choose one of {list(MODES)}")
    if mode != "auto":
        return mode
    return "map" if (backend or jax.default_backend()) == "cpu" else "vmap"


def make_sweep_step(config: Config, model: Model, *, precondition: bool | None = None,
                    mode: str = DEFAULT_MODE, mesh: jax.sharding.Mesh | None = None) -> Callable:
    """``step(states, x, rng_keys, hparams) -> (states, metrics)`` over K members.

    Args:
      config: run settings (T, warm start, ...); ``config.algorithm`` must be lpc.
      model: networks and optimiser (static), shared by all members.
      precondition: overrides ``config.preconditioner`` (static); the result is
        validated (``ConfigError`` for an Adam-style ``chain_metric`` with False).
      mode: ``"vmap"`` (batched members), ``"map"`` (``lax.map``, one member at a time)
        or ``"auto"`` (map on CPU, vmap elsewhere, by ``lax.platform_dependent``).
      mesh: a 1-D mesh (``distributed.mesh``): the member axis is split over its
        devices with ``jax.shard_map`` (K must be a multiple of its size), each
        device running its K / size members by ``mode``; a device with one member
        runs the single step itself (no vmap: no grouped convolutions on any backend).
        None: no sharding.

    The returned function (not jitted: wrap it in ``jax.jit``, e.g. with
    ``donate_argnums=0``) takes stacked states (leading axis K), ``x`` (B, H, W, C)
    shared by all members, ``rng_keys`` (K,) and stacked ``LangevinHParams`` (K,),
    and returns stacked states and a dict of (K,) float32 metrics. Member ``k``
    computes ``lpc_train_step(states[k], x, rng_keys[k], hparams[k])``.
    """
    if config.algorithm != "lpc":
        raise ValueError(f"--algorithm={config.algorithm!r}: a Langevin sweep needs --algorithm=lpc")
    resolve_mode(mode, "cpu")  # checks the name
    if precondition is not None:
        # validated again: an Adam-style chain_metric with precondition=False is refused as in Config
        config = dataclasses.replace(config, preconditioner=bool(precondition)).validate()
    single = build.make_train_step(config, model)
    vmapped = jax.vmap(single, in_axes=(0, None, 0, 0))

    def mapped(states, x, rng_keys, hparams):
        return jax.lax.map(lambda a: single(a[0], x, a[1], a[2]), (states, rng_keys, hparams))

    def auto(*args):  # the platform the program is lowered for decides, not this host
        return jax.lax.platform_dependent(*args, cpu=mapped, default=vmapped)

    step = {"vmap": vmapped, "map": mapped, "auto": auto}[mode]
    if mesh is None:
        return step

    def local(states, x, rng_keys, hparams):  # this device's members
        if rng_keys.shape[0] == 1:
            squeeze = lambda t: jax.tree.map(lambda a: a[0], t)
            return jax.tree.map(lambda a: a[None], single(squeeze(states), x, rng_keys[0], squeeze(hparams)))
        return step(states, x, rng_keys, hparams)

    members, whole = jax.sharding.PartitionSpec(distributed.AXIS), jax.sharding.PartitionSpec()
    # check_vma=False: the members never communicate, and the likelihood's custom VJP
    # returns a cotangent for the replicated x that varies over the devices.
    return jax.shard_map(local, mesh=mesh, in_specs=(members, whole, members, members),
                         out_specs=(members, members), check_vma=False)


@functools.lru_cache(maxsize=16)
def jit_sweep_step(config: Config, model: Model, precondition: bool | None = None,
                   mode: str = DEFAULT_MODE, mesh: jax.sharding.Mesh | None = None) -> Callable:
    """``jax.jit(make_sweep_step(...), donate_argnums=0)``, cached per argument set.

    One jitted function per (config, model, precondition, mode, mesh) in the process,
    so repeated sweeps (and tests) reuse its compiled programs.
    """
    return jax.jit(make_sweep_step(config, model, precondition=precondition, mode=mode, mesh=mesh),
                   donate_argnums=0)


# --------------------------------------------------------------------------- #
# The sweep
# --------------------------------------------------------------------------- #


def resolve_members(config: Config, step_sizes: Sequence[float], decays: Sequence | None,
                    seeds: Sequence[int] | None = None) -> list[dict]:
    """The sweep grid, decay-major: ``[{step_size, decay, precondition, seed}, ...]``.

    Each member's values are checked by ``Config.validate`` on ``config`` with
    its ``step_size``, ``decay`` and ``preconditioner``.

    Raises:
      ValueError: an empty list or a duplicate (naming the list), an entry that is
        not a number (or ``"off"`` in ``decays``), a decay other than "off" while
        ``config.preconditioner`` is False, or a value ``Config.validate`` rejects.
    """
    step_sizes = list(step_sizes)
    if decays is None:
        decays = [config.decay] if config.preconditioner else [OFF]
    decays = [OFF if isinstance(d, str) and d.strip().lower() == OFF else d for d in decays]
    seeds = [config.seed] if seeds is None else [int(s) for s in seeds]
    for name, values in (("step_sizes", step_sizes), ("decays", decays), ("seeds", seeds)):
        if not values:
            raise ValueError(f"{name} is empty: give at least one value")
        if len(set(values)) != len(values):
            raise ValueError(f"{name}={','.join(map(str, values))} has a duplicate value")
        bad = [v for v in values if v != OFF and (isinstance(v, bool) or not isinstance(v, numbers.Real))]
        if bad:
            raise ValueError(f"{name}: {bad[0]!r} is invalid: each entry must be a number"
                             + (" or 'off' (no preconditioner)" if name == "decays" else ""))
    if not config.preconditioner and any(d != OFF for d in decays):
        raise ValueError(f"decays: {next(d for d in decays if d != OFF)!r} needs the preconditioner, but "
                         "preconditioner=False; use decays=off, or turn the preconditioner on")
    members = [{"step_size": float(s), "decay": d if d == OFF else float(d), "precondition": d != OFF,
                "seed": seed} for d in decays for s in step_sizes for seed in seeds]
    for m in members:
        dataclasses.replace(config, step_size=m["step_size"], preconditioner=m["precondition"], seed=m["seed"],
                            decay=config.decay if m["decay"] == OFF else m["decay"]).validate()
    return members


def _fd_monitor(config: Config, metric: str, fd_samples: int):
    """The FD monitor a sweep needs (built before any data loads: a dataset without
    a classifier fails at once), or None."""
    if (metric == "fd" or config.fd_every > 0) and fd_samples <= 0:
        fd_samples = config.fd_samples
    return monitor.FDMonitor.from_config(config, num_samples=fd_samples) if fd_samples > 0 else None


def _groups(run: loop.Run, members: list[dict], keys: list[loop.RunKeys],
            mode: str) -> tuple[list[loop.Group], list[TrainState]]:
    """One stacked group (and its initial states) per preconditioner setting present."""
    groups, states = [], []
    for precondition in (True, False):
        idx = tuple(i for i, m in enumerate(members) if m["precondition"] == precondition)
        if not idx:
            continue
        hparams = langevin.stack_hparams([members[i]["step_size"] for i in idx],
                                [0.0 if members[i]["decay"] == OFF else members[i]["decay"] for i in idx],
                                run.config.eps)
        placement = distributed.member_parallel(len(idx))
        groups.append(loop.Group(idx, jit_sweep_step(run.config, run.model, precondition, mode,
                                                     mesh=placement.state.mesh),
                                 placement.put_state(jnp.stack([keys[i].step for i in idx])),
                                 placement.put_state(hparams), stacked=True, placement=placement))
        states.append(init_sweep([keys[i].init for i in idx], run.model, run.image_shape, run.config.latent_dim))
    return groups, states


def _check_resumable(workdir: str, config: Config, members: list[dict]) -> None:
    """Raises ValueError if the sweep saved in ``workdir`` has another model or grid."""
    path = os.path.join(workdir, "sweep_config.json")
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            saved = json.load(f)
        saved_config, saved_members = Config.from_json(json.dumps(saved["config"])), saved["members"]
    except (ValueError, TypeError, KeyError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is truncated or not a sweep config ({type(e).__name__}: {e}). Nothing was "
                         f"changed; restore the file, or use another --workdir.") from e
    check_resumable(saved_config, config, path)
    if saved_members != members:
        raise ValueError(f"{path} holds a sweep over other members (step_sizes, decays or seeds). Use another "
                         f"--workdir, or the saved grid to resume it.")


def _member_results(trainer: loop.Trainer, members: list[dict], monitor) -> list[dict]:
    """One result row per member: final training metrics, test ELBO and FD (None if diverged)."""
    run = trainer.run
    results = []
    for i, m in enumerate(members):
        ok, keys = trainer.diverged[i] is None, trainer.members[i].keys
        r = {"member": i, **m, "diverged_at_step": trainer.diverged[i],
             **{k: (logs.json_number(trainer.last[i].get(k)) if ok else None) for k in _TRAIN_METRICS}}
        if len(run.test_images):
            elbo = bounds.test_elbo(trainer.member_params(i), run.model, run.test_images, keys.eval) if ok else {}
            r.update({k: logs.json_number(elbo.get(k)) for k in ("test_elbo_nats", "test_elbo_bits_per_dim")})
        if monitor is not None:
            name = monitor.metric_name
            if not ok:
                fd = None
            elif trainer.fd_step == trainer.step:  # fd_every > 0 measured it at the final step
                fd = trainer.fd[i][name]
            else:
                fd = monitor(trainer.member_params(i), run.model, run.config, keys.sample)[name]
            r[name] = r["fd"] = logs.json_number(fd)
        results.append(r)
    return results


def _write_results(workdir: str, summary: dict) -> None:
    """``sweep_<metric>.png``, ``sweep_results.json``, ``sweep_results.md`` and each member's final
    metrics as ``test/...`` scalars in its TensorBoard run."""
    metric = summary["metric"]
    path = os.path.join(workdir, f"sweep_{metric}.png")
    with logs.atomic_path(path) as tmp:  # every file complete or absent, also on a full disk
        plotting.plot_sweep(summary["members"], metric, tmp, title=f"{summary['config']['dataset']}: {metric} after "
                            f"{summary['steps']} steps, T={summary['num_steps_T']}")
    summary["plot_png"] = path
    logs.write_json(os.path.join(workdir, "sweep_results.json"), summary, indent=2)
    logs.write_atomic(os.path.join(workdir, "sweep_results.md"), results_markdown(summary))
    for r in summary["members"]:  # each member's final metrics in its TensorBoard run
        tensorboard = writers.TensorBoardWriter(os.path.join(workdir, "tensorboard", f"member_{r['member']}"))
        tensorboard.write_scalars(summary["steps"], {f"test/{k}": v for k, v in r.items() if k != "member"})
        tensorboard.close()


@workdir_lock.locked("sweep")
def run_sweep(config: Config, step_sizes: Sequence[float], decays: Sequence | None, workdir: str, *,
              metric: str = "elbo", seeds: Sequence[int] | None = None, mode: str = DEFAULT_MODE,
              model: Model | None = None, train_images: np.ndarray | None = None,
              test_images: np.ndarray | None = None, fd_samples: int = 0,
              on_log: Callable[[int, list[dict]], None] | None = None, return_params: bool = False):
    """Trains every (step_size, decay[, seed]) member on the same batches; writes the results.

    Args:
      config: shared settings (``step_size``/``decay`` are ignored: the grid replaces them).
      step_sizes: Langevin step sizes, each > 0.
      decays: preconditioner decays in [0, 1), or ``"off"`` entries; None = ``[config.decay]``.
      workdir: output directory (created): ``sweep_results.json``, ``sweep_results.md``,
        ``sweep_<metric>.png``, ``sweep_metrics.jsonl`` (every ``log_every`` steps),
        ``sweep_config.json`` and ``checkpoints/`` (every ``checkpoint_every`` steps);
        a checkpoint there is resumed.
      metric: key of :data:`METRICS` to rank and plot.
      seeds: member seeds (default ``[config.seed]``); the grid is decays x step_sizes x seeds.
      mode: ``"auto"`` (vmap on GPU/TPU, map on CPU), ``"vmap"`` or ``"map"`` (see the
        module docstring). The members are spread over the local devices
        (``distributed.member_parallel``: K/m per device on m devices, m the largest
        divisor of each group's K not above the device count).
      model: override ``train_step.build_model(config)`` (tests).
      train_images, test_images: uint8 (N, H, W, C) overrides of the dataset (tests).
      fd_samples: > 0 adds the classifier-space Frechet distance (``fd_fmnist``) of
        that many prior samples per member at the end (``lpc_jax.evaluation.monitor.FDMonitor``,
        latents from the member's ``sample_key`` as in train.py); ``config.fd_samples``
        is used when ``metric == "fd"`` or ``config.fd_every > 0`` and 0 was given.
        With ``config.fd_every > 0`` it is also logged every ``fd_every`` steps.
      on_log: optional callback ``(step, rows)`` at each logged step.
      return_params: also return every member's final params.

    Returns:
      The dict written to ``sweep_results.json``; with ``return_params``,
      ``(that dict, [params of member 0, 1, ...])``.

    Raises:
      ValueError: invalid config, grid or metric, or a workdir holding another sweep.
      lpc_jax.runtime.workdir_lock.WorkdirLockedError: another process trains in ``workdir`` (raised first).
      data.DatasetNotFoundError: the dataset is not available offline.
      checkpoints.CheckpointError: an existing checkpoint cannot be restored.
    """
    config.validate()
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is invalid: choose one of {sorted(METRICS)}")
    mode = resolve_mode(mode)
    members = resolve_members(config, step_sizes, decays, seeds)
    monitor = _fd_monitor(config, metric, fd_samples)
    run = loop.setup(config, workdir, model=model, train_images=train_images, test_images=test_images)
    _check_resumable(workdir, config, members)
    keys = [loop.run_keys(m["seed"]) for m in members]  # a single run's keys for its seed
    groups, states = _groups(run, members, keys, mode)
    labels = [{"member": i, "step_size": m["step_size"], "decay": m["decay"], "seed": m["seed"]}
              for i, m in enumerate(members)]
    trainer = loop.Trainer(
        run, groups, states, [loop.Member(label, k) for label, k in zip(labels, keys)],
        log_file="sweep_metrics.jsonl", fd_monitor=monitor, on_log=on_log,
        fd_images=lambda params, key: train.prior_grid(run, params, key),
        config_file=("sweep_config.json", json.dumps({"config": json.loads(config.to_json()), "members": members,
                                                      "metric": metric, "mode": mode}, indent=2)))
    trainer.fit()

    results = _member_results(trainer, members, monitor)
    metric_key = monitor.metric_name if metric == "fd" else metric
    scored = [r for r in results if r.get(metric_key) is not None]
    best = (max if METRICS[metric] else min)(scored, key=lambda r: r[metric_key]) if scored else None
    summary = {"metric": metric_key, "higher_is_better": METRICS[metric], "steps": trainer.step,
               "num_steps_T": config.num_steps, "mode": mode, "train_wall_s": trainer.train_s,
               "best_member": best["member"] if best else None, "members": results,
               "config": json.loads(config.to_json())}
    _write_results(workdir, summary)
    logging.info("sweep done in %.0f s; best %s: member %s", trainer.train_s, metric_key, summary["best_member"])
    if return_params:
        return summary, [trainer.member_params(i) for i in range(len(members))]
    return summary


# --------------------------------------------------------------------------- #
# Reporting
# --------------------------------------------------------------------------- #


def results_markdown(summary: dict) -> str:
    """One table row per member; the best member by the chosen metric is starred."""
    results = summary["members"]
    cols = ["step_size", "decay", "seed", "elbo", "log_p_end", "log_p_chain", "forward_kl",
            "test_elbo_nats", "test_elbo_bits_per_dim"]
    cols += [k for k in results[0] if k.startswith("fd_")] if results else []
    cols.append("diverged_at_step")
    fmt = lambda v: "—" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    lines = [f"# Sweep: {summary['metric']} ({'higher' if summary['higher_is_better'] else 'lower'} is better), "
             f"{summary['steps']} SGD steps, T = {summary['num_steps_T']}", "",
             "Training metrics are the last step's (one batch, nats per example); test_* are on the test split.",
             "", "| member | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 1)]
    for r in results:
        mark = " *" if r["member"] == summary["best_member"] else ""
        lines.append(f"| {r['member']}{mark} | " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"
