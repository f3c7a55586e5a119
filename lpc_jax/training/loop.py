"""The one training loop: a single run and a sweep both train K members here.

* :func:`setup` gives the :class:`Run` every run builds the same way: the
  validated config, the model, the uint8 train/test images and the number of
  SGD steps; :func:`run_keys` the PRNG keys of a seed and :func:`init_state` the
  initial ``TrainState``.
* A :class:`Group` is members advanced by one compiled step function: a single
  run is one group of one unstacked member; a sweep has one group per
  preconditioner setting, its members stacked on a leading axis. A group's
  ``placement`` (:mod:`lpc_jax.runtime.distributed`) puts its state on the device mesh
  once and each batch with one transfer per step: a single run's batch sharded
  over every device (each process reading only its rows), a sweep's members
  spread over the devices. Logs and config files are written by process 0.
* :class:`Trainer` feeds every group the batches of :func:`lpc_jax.data.pipeline.step_batches`
  with step keys ``fold_in(step_key, step)``, checks each member for NaN/Inf after
  every step (:func:`members_finite`, on device, fetched one step late) and runs the periodic actions
  (:mod:`lpc_jax.runtime.periodic`): the FD monitor, the JSON-lines log with a progress
  line, and orbax checkpoints. It resumes from the newest checkpoint, so an
  interrupted run, single or sweep, continues on exactly the batches and keys
  an uninterrupted one would have used.

What a single run and a sweep do differently is in :mod:`lpc_jax.training.run_kinds`:
a single run raises :class:`DivergenceError` at a non-finite step (nothing is
saved for it) and checkpoints its bare ``TrainState`` (what
:func:`lpc_jax.training.restore.load_run` restores); a sweep records the member as
diverged at that step, trains the others on, and checkpoints the stacked states
with a JSON record of the divergences and last metrics.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lpc_jax.data import pipeline
from lpc_jax.model.state import Model, TrainState, create_train_state
from lpc_jax.runtime import (
    checkpoints,
    distributed,
    logs,
    periodic,
    workdir_lock,
    writers,
)
from lpc_jax.sampling import langevin
from lpc_jax.training import build
from lpc_jax.training.config import Config
from lpc_jax.training.run_kinds import DivergenceError, SingleRun, Sweep

Array = jax.Array


# --------------------------------------------------------------------------- #
# Run set-up
# --------------------------------------------------------------------------- #


class Run(NamedTuple):
    """What every run sets up the same way."""

    config: Config
    model: Model
    train_images: np.ndarray  # (N, H, W, C) uint8
    test_images: np.ndarray  # (M, H, W, C) uint8, M may be 0
    num_total: int  # SGD steps the run trains to
    workdir: str

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.train_images.shape[1:])

    @property
    def steps_per_epoch(self) -> int:
        return self.train_images.shape[0] // self.config.batch_size


def total_train_steps(config: Config, num_examples: int) -> int:
    """``config.num_train_steps``, or ``ceil(num_epochs * steps_per_epoch)`` when it is 0."""
    steps_per_epoch = num_examples // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size={config.batch_size} exceeds the {num_examples} training examples; "
                         f"lower batch_size or raise max_train_examples")
    if config.num_train_steps:
        return config.num_train_steps
    return max(1, int(math.ceil(config.num_epochs * steps_per_epoch)))


def setup(config: Config, workdir: str, *, model: Model | None = None,
          train_images: np.ndarray | None = None, test_images: np.ndarray | None = None) -> Run:
    """Validates ``config``, loads the data and creates ``workdir``.

    Args:
      config: the run's settings.
      workdir: output directory (created).
      model: overrides ``train_step.build_model(config)`` (tests).
      train_images, test_images: uint8 (N, H, W, C) overrides of the dataset's
        train split (first ``max_train_examples``) and test split (first ``eval_examples``).

    Raises:
      ValueError: invalid config.
      sources.DatasetNotFoundError: the dataset is not available offline.
    """
    config.validate()
    if train_images is None:  # big splits open lazily (sources.LazyImages): rows are decoded when batched
        train_images = build.open_images(config, "train", config.max_train_examples or None)
    if test_images is None:
        test_images = build.open_images(config, "test", config.eval_examples or None)
    num_total = total_train_steps(config, train_images.shape[0])
    os.makedirs(workdir, exist_ok=True)
    return Run(config, model or build.build_model(config), train_images, test_images, num_total, workdir)


class RunKeys(NamedTuple):
    """The PRNG keys of a run with one seed: ``split(key(seed), 4)``."""

    init: Array  # initial params
    step: Array  # step s uses fold_in(step, s)
    sample: Array  # prior samples (samples.png, FD monitor)
    eval: Array  # test ELBO


def run_keys(seed: int) -> RunKeys:
    return RunKeys(*jax.random.split(jax.random.key(seed), 4))


_create_train_state = jax.jit(create_train_state, static_argnums=(1, 2, 3))


def init_state(rng_key: Array, model: Model, image_shape: Sequence[int], latent_dim: int) -> TrainState:
    """``jax.jit(create_train_state)``: every run (single or sweep member) starts from this call."""
    return _create_train_state(rng_key, model, tuple(int(d) for d in image_shape), int(latent_dim))


# --------------------------------------------------------------------------- #
# Members and their finiteness
# --------------------------------------------------------------------------- #


class Group(NamedTuple):
    """Members advanced by one compiled step function."""

    members: tuple[int, ...]  # their indices among the run's K members
    step_fn: Callable  # jitted, donates its state: (state, x, rng_key(s), hparams) -> (state, metrics)
    step_keys: Array  # the members' step keys: shape (), or (K_g,) when stacked
    hparams: langevin.LangevinHParams  # scalar fields, or (K_g,) when stacked
    stacked: bool = False  # state, keys, hparams and metrics carry a leading member axis
    # Where the state and each batch live (distributed.data_parallel / member_parallel);
    # None: the default device, the whole batch in this process.
    placement: distributed.Placement | None = None

    def rng(self, step: int) -> Array:
        """The step's keys ``fold_in(step_key, step)`` (per member when stacked)."""
        return _fold_in_all(self.step_keys, step) if self.stacked else jax.random.fold_in(self.step_keys, step)


class Member(NamedTuple):
    label: dict  # fields naming the member in log rows ({} for a single run)
    keys: RunKeys


@jax.jit
def _fold_in_all(keys: Array, step) -> Array:
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)


@functools.partial(jax.jit, static_argnames="stacked")
def members_finite(params: Any, metrics: dict, *, stacked: bool) -> Array:
    """(K_g,) bool on device: every metric and every parameter of member k is finite.

    Computed where the step ran, so the host never waits for it: the loop
    fetches the flags with the metrics one step late, or at a logged step.

    Args:
      params: a group's params; leaves (K_g, ...) when ``stacked``, else one member's.
      metrics: the step's metrics on device, (K_g,) or scalar values.
      stacked: whether the group has a leading member axis (else K_g = 1).
    """
    leaves = jax.tree.leaves(params)
    k = leaves[0].shape[0] if stacked else 1
    checks = [jnp.isfinite(leaf.reshape(k, -1)).all(axis=1) for leaf in [*leaves, *metrics.values()]]
    return jnp.stack(checks).all(axis=0)


def fetch(tree: Any) -> Any:
    """Device -> host (``jax.device_get``): the one place the loop waits for the device."""
    return jax.device_get(tree)


def member_tree(tree: Any, k: int) -> Any:
    """Member ``k`` of a stacked pytree."""
    return jax.tree.map(lambda a: a[k], tree)


def _deleted(tree) -> bool:
    """True if an array of ``tree`` was donated to a jitted step (and freed)."""
    return any(isinstance(leaf, jax.Array) and leaf.is_deleted() for leaf in jax.tree.leaves(tree))


# --------------------------------------------------------------------------- #
# The loop
# --------------------------------------------------------------------------- #


class _InFlight(NamedTuple):
    """A dispatched step whose results the host has not looked at yet."""

    index: int  # the step is index + 1
    metrics: list  # per group: the step's metrics, on device
    finite: list  # per group: members_finite(...), (K_g,) bool on device


class Trainer:
    """Trains ``groups`` to ``run.num_total`` steps; resumable, logged, checkpointed.

    Args:
      run: from :func:`setup`.
      groups: the compiled programs; their ``members`` index ``members``.
      states: each group's initial state (stacked when the group is).
      members: the K members (log labels and keys; ``keys.sample`` seeds the FD monitor).
      log_file: JSON-lines log in the workdir: one row per member at every logged step.
        The same rows (and ``steps_per_s``) go to TensorBoard event files in
        ``workdir/tensorboard`` (a sweep: ``tensorboard/member_<i>``) through one
        :class:`lpc_jax.runtime.writers.MetricWriter` per member, made by process 0.
      config_file: ``(name, text)`` written into the workdir once a checkpoint
        has been restored (or none exists): what a later resume is checked against.
      fd_monitor: optional ``evaluation.FDMonitor``, run every ``config.fd_every`` steps.
      on_log: optional ``(step, rows)`` callback at each logged step.
      on_checkpoint: optional ``(step)`` callback after each periodic checkpoint.
      fd_images: optional ``(params, sample_key) -> (H, W, C)`` image in [0, 1], logged to
        TensorBoard as ``prior_samples`` at each FD monitor step.

    One unstacked group is a :class:`SingleRun`, anything else a :class:`Sweep`.
    The host never waits for a step before dispatching the next: each step's
    NaN/Inf check (:func:`members_finite`) runs on device and is fetched one step
    late, or before a periodic action looks at the state.

    After :meth:`fit`: ``step`` (SGD steps done), ``states``, ``diverged``
    ((K,) step of divergence or None), ``last`` (each member's last finite
    metrics), ``fd`` (FD values of ``fd_step``) and ``train_s`` (seconds).
    """

    def __init__(self, run: Run, groups: Sequence[Group], states: Sequence[Any], members: Sequence[Member], *,
                 log_file: str, config_file: tuple[str, str], fd_monitor=None,
                 on_log: Callable[[int, list[dict]], None] | None = None,
                 on_checkpoint: Callable[[int], None] | None = None, fd_images: Callable | None = None):
        self.run, self.groups, self.members = run, tuple(groups), tuple(members)
        self.states = [s if g.placement is None else g.placement.put_state(s) for g, s in zip(self.groups, states)]
        shards = {(g.placement.shard_index, g.placement.shard_count) if g.placement else (0, 1) for g in self.groups}
        if len(shards) != 1:
            raise ValueError(f"groups read different rows of the batch ({sorted(shards)}); give them one placement")
        (self._shard_index, self._shard_count), = shards
        single = len(self.groups) == 1 and not self.groups[0].stacked
        self.kind: SingleRun | Sweep = SingleRun() if single else Sweep()
        self._where = {i: (g, j) for g, group in enumerate(self.groups) for j, i in enumerate(group.members)}
        self.step, self.train_s, self.ckpt = 0, 0.0, None
        self.diverged: list[int | None] = [None] * len(members)
        self.last: list[dict] = [{} for _ in members]
        self.fd: list[dict] = [{} for _ in members]
        self.fd_step = None
        self._log_path = os.path.join(run.workdir, log_file)
        self._config_file, self._fd_monitor = config_file, fd_monitor
        self._on_log, self._on_checkpoint, self._fd_images = on_log, on_checkpoint, fd_images
        self._pending: list = []  # the (state, metrics) of each group for the step being dispatched
        self._in_flight: list[_InFlight] = []  # dispatched steps not yet checked, oldest first
        self._progress: periodic.ReportProgress | None = None
        self.metric_writers: list[writers.MetricWriter] = []  # per member, while fit runs
        c, n = run.config, run.num_total
        fd_every = c.fd_every if fd_monitor is not None else 0
        self._actions = (  # in this order: a logged row holds the FD computed at its step
            periodic.PeriodicAction(self._measure_fd, every_steps=fd_every, num_total=n),
            periodic.PeriodicAction(self._log, every_steps=(c.log_every, fd_every), num_total=n),
            periodic.PeriodicAction(self._checkpoint, every_steps=c.checkpoint_every, num_total=n),
        )

    def member_params(self, i: int) -> Any:
        """Params of member ``i`` (unstacked), on one local device (``distributed.local_copy``)."""
        g, j = self._where[i]
        params = self.states[g].params
        return distributed.local_copy(member_tree(params, j) if self.groups[g].stacked else params)

    def fit(self) -> None:
        """Restores the newest checkpoint (if any) and trains to ``run.num_total``.

        Raises:
          lpc_jax.runtime.workdir_lock.WorkdirLockedError: another process trains in ``run.workdir``.
          checkpoints.CheckpointError: the checkpoint cannot be restored.
          checkpoints.CheckpointSaveError: a checkpoint could not be saved (e.g. disk full).
          DivergenceError: a single run's step produced NaN/Inf.
          KeyboardInterrupt: re-raised after saving the last finished step.
        """
        with workdir_lock.lock(self.run.workdir, self.kind.purpose, process_index=jax.process_index()), \
                checkpoints.Checkpointer(self.run.workdir, self.run.config.keep_checkpoints) as self.ckpt:
            self._restore()
            name, text = self._config_file
            if distributed.is_primary():
                logs.write_atomic(os.path.join(self.run.workdir, name), text)
            self.metric_writers = writers.member_writers(
                self.run.workdir, self._log_path, [m.label for m in self.members],
                per_member=isinstance(self.kind, Sweep), primary=distributed.is_primary())
            try:
                self._train()
            finally:
                for w in self.metric_writers:
                    w.close()

    def _restore(self) -> None:
        start = self.ckpt.latest_step()
        if start is not None:  # onto the groups' placements on this process's devices, whatever saved it
            self.kind.restore(self, self.ckpt)
            logging.info("resumed from %s at step %d", self.ckpt.directory, start)
        self.step = start or 0
        # A run killed after its last checkpoint logged steps it will now redo (and
        # perhaps a torn last line): drop them.
        if distributed.is_primary() and os.path.exists(self._log_path):
            with open(self._log_path) as f:
                text = f.read()
            kept = "".join(json.dumps(r) + "\n" for r in logs.read_metrics(self._log_path)
                           if r.get("step", 0) <= self.step)
            if kept != text:
                logs.write_atomic(self._log_path, kept)

    def _train(self) -> None:
        run, c = self.run, self.run.config
        logging.info("training %d member(s) in %d program(s), %s %s: steps %d -> %d (%d per epoch), T=%d, "
                     "batch %d, on %s", len(self.members), len(self.groups), c.algorithm, c.dataset, self.step,
                     run.num_total, run.steps_per_epoch, c.num_steps, c.batch_size, distributed.describe())
        self._progress = periodic.ReportProgress(start_step=self.step, num_total=run.num_total)
        try:
            for index, x in pipeline.step_batches(run.train_images, c.batch_size, c.seed, self.step, run.num_total,
                                              num_threads=c.data_threads, shard_index=self._shard_index,
                                              shard_count=self._shard_count):
                if all(d is not None for d in self.diverged):
                    break
                self._dispatch(index, x)
                # One step late: step index - 1 finished while step index was queued behind it.
                self._check(keep=0 if any(a.should_trigger(self.step) for a in self._actions) else 1)
                if all(d is not None for d in self.diverged) and max(self.diverged) < self.step:
                    self.step = max(self.diverged)  # the last member diverged one step back: stop there,
                    break  # as a check before this step would have
                for action in self._actions:
                    action(self.step)
            self._check(keep=0)
        except KeyboardInterrupt:
            self._save_on_interrupt()
            raise
        self.train_s = self._progress.wall_s

    def _dispatch(self, index: int, x: np.ndarray) -> None:
        """Queues step ``index + 1`` of every group (no waiting) and its on-device NaN/Inf check."""
        self._pending, placed = [], {}  # one transfer per batch placement
        for group, state in zip(self.groups, self.states):
            where = group.placement and group.placement.batch
            if where not in placed:
                placed[where] = jnp.asarray(x) if where is None else group.placement.put_batch(x)
            self._pending.append(group.step_fn(state, placed[where], group.rng(index), group.hparams))
        self._adopt(index, self._pending)

    def _adopt(self, index: int, results: list) -> None:
        """Makes a dispatched step's results the current states; its check goes in flight."""
        finite = [members_finite(state.params, metrics, stacked=g.stacked)
                  for g, (state, metrics) in zip(self.groups, results)]
        self._in_flight.append(_InFlight(index, [metrics for _, metrics in results], finite))
        self.states, self.step = [state for state, _ in results], index + 1

    def _check(self, keep: int = 0) -> None:
        """Fetches and applies the checks of the steps in flight, all but the newest ``keep``.

        Raises:
          DivergenceError: a single run's step was not finite (nothing saved for it).
        """
        while len(self._in_flight) > keep:
            done = self._in_flight[0]
            metrics, finite = fetch((done.metrics, done.finite))
            self._in_flight.pop(0)
            for group, values, ok in zip(self.groups, metrics, finite):
                for j, i in enumerate(group.members):
                    if self.diverged[i] is not None:
                        continue
                    row = {k: float(np.reshape(v, -1)[j]) for k, v in values.items()}
                    if ok[j]:
                        self.last[i] = row
                    else:
                        self.kind.diverged(self, i, done.index + 1, row)

    def _save_on_interrupt(self) -> None:
        if any(_deleted(state) for state in self.states):
            # Ctrl-C landed while a step that consumed (donated) the states was being
            # dispatched: keep that step's result if every group has it.
            results = self._pending
            if len(results) < len(self.groups) or any(_deleted(state) for state, _ in results):
                return
            self._adopt(self.step, results)
        try:
            self._check(keep=0)
        except DivergenceError:
            return
        if self.step > (self.ckpt.latest_step() or 0):
            logging.warning("interrupted: saving step %d so the run can resume", self.step)
            self.kind.save(self, self.step)

    def _checkpoint(self, step: int) -> None:
        self.kind.save(self, step)
        if self._on_checkpoint:
            self._on_checkpoint(step)

    def _measure_fd(self, step: int) -> None:
        run = self.run
        for i, m in enumerate(self.members):
            if self.diverged[i] is None:
                params = self.member_params(i)
                self.fd[i] = self._fd_monitor(params, run.model, run.config, m.keys.sample)
                if self._fd_images is not None and distributed.is_primary():
                    self.metric_writers[i].write_images(step, {"prior_samples": self._fd_images(params, m.keys.sample)})
        self.fd_step = step

    def _log(self, step: int) -> None:
        run, progress = self.run, self._progress(step)
        common = {"epoch": step / run.steps_per_epoch,
                  "examples_per_s": progress.steps_per_s * run.config.batch_size, "wall_s": progress.wall_s}
        rows = []
        for i, m in enumerate(self.members):
            if self.diverged[i] is not None:
                values = {"diverged_at_step": self.diverged[i]}
            else:
                values = {**self.last[i], **(self.fd[i] if self.fd_step == step else {})}
            scalars = {**{k: logs.json_number(v) for k, v in values.items()}, **common}
            self.metric_writers[i].write_scalars(step, {**scalars, "steps_per_s": progress.steps_per_s})
            rows.append({"step": step, **m.label, **scalars})
        alive = [r for r in rows if r.get("elbo") is not None]
        best = max(alive, key=lambda r: r["elbo"]) if alive else {}
        logging.info("step %d/%d (%.1f%%) | %.2f steps/s, %.0f ex/s | ETA %s | loss %.1f elbo %.1f%s",
                     step, run.num_total, 100 * step / run.num_total, progress.steps_per_s,
                     common["examples_per_s"], periodic.format_time(progress.eta_s),
                     best.get("loss", math.nan), best.get("elbo", math.nan), self.kind.log_note(rows, alive))
        if self._on_log:
            self._on_log(step, rows)
