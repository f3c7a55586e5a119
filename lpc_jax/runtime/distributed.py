"""Scaling out with JAX's own runtime: ``jax.distributed`` and ``jax.sharding``.

One code path for one device, N local devices and N hosts:

* :func:`initialize` starts the multi-process runtime (``jax.distributed.initialize``)
  from the Config fields ``coordinator_address``, ``num_processes``, ``process_id``
  and ``coordinator_timeout``; ``coordinator_address="auto"`` lets JAX detect the
  cluster (SLURM, Cloud TPU, Open MPI, ...). It must run before anything touches a
  device; the launchers call it first.
* :func:`mesh` is a 1-D ``Mesh`` over every device of every process, axis ``"data"``
  (process-major device order, so process ``i``'s devices hold the ``i``-th
  contiguous block of a sharded axis).
* :class:`Placement` says where a :class:`lpc_jax.training.loop.Group` keeps its state and
  the step's batch:

  - :func:`data_parallel` (a single run): the global batch (``--batch_size``) is
    sharded along ``"data"``, params and Adam state are replicated. Each process
    reads only its rows of every global batch (``data.step_batches(...,
    shard_index=process_index, shard_count=process_count)``) and
    :meth:`Placement.put_batch` assembles the global array with
    ``jax.make_array_from_process_local_data``. The jitted step is the
    single-device one; XLA partitions it (GSPMD) and all-reduces the gradients, but
    for the LPC chain, which the step runs under ``shard_map`` on this mesh (one
    all-reduce after its loop; ``train_step.lpc_train_step``'s ``mesh``), so
    results equal a one-device run with the same global batch up to float32
    summation order.
  - :func:`member_parallel` (a sweep): the stacked member axis of K members is
    sharded along ``"data"`` over ``m`` devices, ``m`` the largest divisor of K not
    above the device count (K/m members per device); every device sees the whole
    batch.

Errors (all ``ValueError`` subclasses or ``TimeoutError``, raised before any work):
a global batch not divisible by the device count, a process id outside
``[0, num_processes)``, an unreachable coordinator (after ``coordinator_timeout`` s).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import socket
import time
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"  # the one mesh axis: batch rows (single run) or sweep members
AUTO = "auto"  # coordinator_address value: let JAX detect the cluster


class CoordinatorUnreachableError(TimeoutError):
    """A process could not reach the coordinator within ``coordinator_timeout`` seconds."""


# --------------------------------------------------------------------------- #
# jax.distributed
# --------------------------------------------------------------------------- #


def check_process_args(coordinator_address: str | None, num_processes: int, process_id: int) -> None:
    """Validates the multi-process settings without touching the network.

    Raises:
      ValueError: ``num_processes < 1``, ``process_id`` outside ``[0, num_processes)``,
        or a ``coordinator_address`` that is not ``host:port`` (nor "" or "auto")
        while ``num_processes > 1``.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes={num_processes} is invalid: must be >= 1")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} is invalid: it must lie in [0, {num_processes}) for "
                         f"num_processes={num_processes}; give each process a distinct id 0..{num_processes - 1}")
    if num_processes > 1 and not coordinator_address:
        raise ValueError(f"coordinator_address is empty but num_processes={num_processes}: give the "
                         "host:port of process 0 (the same on every process), or 'auto' on SLURM / Cloud TPU")
    if coordinator_address and coordinator_address != AUTO:
        _host_port(coordinator_address)


def _host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator_address={address!r} is invalid: expected host:port, e.g. "
                         "10.0.0.1:1234 (process 0's address and a free port), or 'auto'")
    return host.strip("[]"), int(port)


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Polls TCP ``address`` (host:port) until it accepts a connection.

    ``jax.distributed.initialize`` aborts the whole process (no Python exception)
    when the coordinator stays unreachable; this probe turns that into an error
    with a message.

    Raises:
      CoordinatorUnreachableError: no connection within ``timeout_s`` seconds.
    """
    host, port = _host_port(address)
    deadline, last = time.monotonic() + timeout_s, None
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, max(timeout_s, 0.1))):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            raise CoordinatorUnreachableError(
                f"cannot reach the coordinator at {address} within {timeout_s:g} s ({last}). Start process 0 "
                f"(--process_id=0) with the same --coordinator_address, check that the host and port are "
                f"reachable from this machine, or raise --coordinator_timeout.")
        time.sleep(0.25)


def set_cpu_devices(count: int) -> None:
    """Splits the host CPU into ``count`` JAX devices (``jax_num_cpu_devices``).

    A single run then shards its batch over them (:func:`data_parallel`), a sweep runs
    its members concurrently, K / count per device (:func:`member_parallel`): on a
    small CPU both use the cores better than XLA's intra-op threads do for one
    program (``benchmarks/RESULTS.md``: ``sweep_speedup_K8``, ``chain_step_ms_*``).
    A sweep member's result is unchanged, bit for bit; a data-parallel run's equals a
    one-device run's up to float32 summation order. Only the CPU backend is
    affected: on a GPU/TPU machine the default devices stay the accelerators.

    Raises:
      ValueError: ``count < 1``.
      RuntimeError: JAX's backends have already started (call this right after
        ``import jax``, before anything touches a device).
    """
    if count < 1:
        raise ValueError(f"cpu_devices={count} is invalid: must be >= 1 (1 = the whole CPU as one device)")
    platform = expected_platform()
    if platform != "cpu":
        logging.info("cpu_devices=%d not applied: JAX is set to run on %s", count, platform)
        return
    jax.config.update("jax_num_cpu_devices", int(count))


_ACCELERATORS = ("cuda", "rocm", "tpu")


def expected_platform() -> str:
    """The platform JAX will run on, without starting a backend: the first entry of
    ``JAX_PLATFORMS`` / ``jax_platforms`` if set, else the first installed accelerator
    plugin (``jax_plugins`` entry points: ``jax[cuda12]``, ``jax[tpu]``'s libtpu), else
    ``"cpu"``. A plugin that then fails to load leaves JAX on the CPU:
    :func:`check_accelerator_used` warns about that once the backend runs."""
    chosen = (jax.config.jax_platforms or "").split(",")[0].strip().lower()
    if chosen:
        return "cuda" if chosen == "gpu" else chosen
    names = {ep.name.lower() for ep in importlib.metadata.entry_points(group="jax_plugins")}
    if importlib.util.find_spec("libtpu") is not None:
        names.add("tpu")
    return next((a for a in _ACCELERATORS if any(a in n for n in names)), "cpu")


def gpu_present() -> bool:
    """An NVIDIA GPU on this machine: ``nvidia-smi`` on PATH or ``/dev/nvidia0``."""
    return shutil.which("nvidia-smi") is not None or os.path.exists("/dev/nvidia0")


def check_accelerator_used() -> str:
    """Logs this run's devices (:func:`describe`); warns when a GPU is present but JAX
    runs on the CPU (no ``jax[cuda12]`` installed, or its plugin failed to load).
    Returns the warning, or "" when there is none."""
    logging.info("JAX devices: %s", describe())
    if jax.default_backend() != "cpu" or not gpu_present():
        return ""
    message = ("a GPU is present (nvidia-smi / /dev/nvidia0) but JAX runs on the CPU: install "
               "`pip install -e .[cuda12]` (jax[cuda12] at the pinned jax version), or see why the CUDA "
               "plugin did not load (JAX_PLATFORMS=cuda makes that an error)")
    logging.warning(message)
    return message


def cpu_devices_for(requested: int, batch_size: int | None = None, num_processes: int = 1,
                    cores: int | None = None) -> int:
    """How many JAX devices :func:`set_cpu_devices` should split this host's CPU into.

    Args:
      requested: ``--cpu_devices``; >= 1 is returned as it is, 0 asks for one per core.
      batch_size: a single run's global batch, which :func:`data_parallel` splits evenly
        over ``num_processes`` x the devices of each; None (a sweep, which places its
        members itself) takes all ``cores``.
      num_processes: processes in the run.
      cores: CPU cores this process may run on (default: its affinity mask, e.g. under
        ``taskset``, else ``os.cpu_count()``).

    Returns:
      ``requested``, or for 0 the largest count <= ``cores`` that divides the batch rows
      of one process (1 when none but 1 does, e.g. an odd batch).

    Raises:
      ValueError: ``requested < 0``.
    """
    if requested < 0:
        raise ValueError(f"cpu_devices={requested} is invalid: must be >= 0 (0 = one per CPU core)")
    if requested:
        return requested
    cores = cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) or 1
    if batch_size is None:
        return cores
    rows = batch_size // num_processes if batch_size % num_processes == 0 else 1
    return max(d for d in range(1, cores + 1) if rows % d == 0)


def initialize(coordinator_address: str | None, num_processes: int = 1, process_id: int = 0,
               timeout_s: int = 300) -> bool:
    """Starts ``jax.distributed`` when the settings ask for more than one process.

    Args:
      coordinator_address: "" or None: a single process (nothing to do); "auto":
        ``jax.distributed.initialize()`` with JAX's cluster detection (SLURM, Cloud
        TPU, Open MPI; ``num_processes``/``process_id`` are then ignored);
        "host:port": process 0's address, identical on every process.
      num_processes: processes in the job (with an explicit address).
      process_id: this process's id in ``[0, num_processes)``.
      timeout_s: seconds to wait for the coordinator / the other processes.

    Returns:
      True if the multi-process runtime was started (or already was).

    Raises:
      ValueError: invalid settings (see :func:`check_process_args`).
      CoordinatorUnreachableError: a process other than 0 cannot reach the
        coordinator within ``timeout_s``.
      RuntimeError: JAX's own errors (e.g. a backend already initialised).
    """
    coordinator_address = coordinator_address or ""
    check_process_args(coordinator_address, num_processes, process_id)
    if jax.distributed.is_initialized():
        return True
    if not coordinator_address:
        return False
    if coordinator_address == AUTO:
        logging.info("jax.distributed: detecting the cluster (timeout %d s)", timeout_s)
        jax.distributed.initialize(initialization_timeout=timeout_s)
    else:
        if process_id != 0:
            wait_for_coordinator(coordinator_address, timeout_s)
        else:
            logging.info("jax.distributed: coordinator at %s, waiting up to %d s for %d processes",
                         coordinator_address, timeout_s, num_processes)
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=timeout_s)
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def initialize_from_config(config) -> bool:
    """:func:`initialize` with a ``Config``'s four fields."""
    return initialize(config.coordinator_address, config.num_processes, config.process_id,
                      config.coordinator_timeout)


def is_primary() -> bool:
    """True in process 0, the one that writes logs, plots and summaries."""
    return jax.process_index() == 0


# --------------------------------------------------------------------------- #
# Mesh and placements
# --------------------------------------------------------------------------- #


def mesh(num_devices: int | None = None) -> Mesh:
    """1-D mesh, axis ``"data"``, over the first ``num_devices`` (default: all) devices.

    ``jax.devices()`` is process-major, so each process's devices are a contiguous block.
    """
    devices = jax.devices()
    return Mesh(np.asarray(devices[: num_devices or len(devices)]), (AXIS,))


class Placement(NamedTuple):
    """Where a group's state and each step's batch live.

    ``state``/``batch`` are shardings (a single sharding is a pytree prefix for
    the whole state); ``shard_index``/``shard_count`` select the rows of every
    global batch this process reads (``data.step_batches`` keywords).
    """

    state: NamedSharding
    batch: NamedSharding
    shard_index: int = 0
    shard_count: int = 1

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.state.mesh, P())

    def put_state(self, tree: Any) -> Any:
        """``tree`` on the mesh with the state's sharding (one ``device_put``)."""
        return jax.device_put(tree, self.state)

    def put_batch(self, local: np.ndarray) -> jax.Array:
        """This process's rows of a global batch -> the global (B, ...) array.

        One ``jax.device_put`` in a single process; ``make_array_from_process_local_data``
        across processes (each contributes its ``B / process_count`` rows).
        """
        if self.shard_count == 1:
            return jax.device_put(local, self.batch)
        global_shape = (local.shape[0] * self.shard_count, *local.shape[1:])
        return jax.make_array_from_process_local_data(self.batch, local, global_shape)


def data_parallel(batch_size: int, device_mesh: Mesh | None = None) -> Placement:
    """A single run: batch sharded along ``"data"``, state replicated.

    Raises:
      ValueError: ``batch_size`` (the global batch) is not divisible by the
        number of devices (over all processes).
    """
    device_mesh = device_mesh or mesh()
    n, procs = device_mesh.size, jax.process_count()
    if batch_size % n:
        where = f"{n} devices" + (f" ({procs} processes x {n // procs})" if procs > 1 else "")
        lower, upper = (batch_size // n) * n, -(-batch_size // n) * n
        raise ValueError(f"batch_size={batch_size} is invalid: the global batch is split evenly over {where}; "
                         f"use a multiple of {n} (e.g. {lower or upper} or {upper}), or fewer devices "
                         f"(--cpu_devices on a CPU, CUDA_VISIBLE_DEVICES on a GPU, --num_processes)")
    return Placement(NamedSharding(device_mesh, P()), NamedSharding(device_mesh, P(AXIS)),
                     jax.process_index(), procs)


def member_devices(num_members: int, num_devices: int | None = None) -> int:
    """The largest divisor of ``num_members`` not above ``num_devices`` (default: all devices)."""
    n = min(num_members, num_devices or jax.device_count())
    return max(d for d in range(1, n + 1) if num_members % d == 0)


def member_parallel(num_members: int) -> Placement:
    """A sweep group of K stacked members: the member axis sharded over
    :func:`member_devices` devices (K/m members each), the batch replicated.

    Raises:
      ValueError: more than one process (sweeps run in one process, on its devices).
    """
    if jax.process_count() > 1:
        raise ValueError(f"a sweep runs in one process (on all its local devices); got "
                         f"{jax.process_count()} processes: launch it without --coordinator_address")
    m = member_devices(num_members)
    if m < jax.device_count():
        logging.info("sweep: %d member(s) on %d of %d devices (%d per device)", num_members, m,
                     jax.device_count(), num_members // m)
    device_mesh = mesh(m)
    return Placement(NamedSharding(device_mesh, P(AXIS)), NamedSharding(device_mesh, P()))


def local_copy(tree: Any) -> Any:
    """Each array of ``tree`` as a single-device array on a local device.

    For evaluation and plots after (or beside) training: a replicated array is its
    first local shard (no copy); any other fully addressable array is copied to
    ``jax.local_devices()[0]``. Non-array leaves pass through.

    Raises:
      ValueError: an array sharded over devices of other processes.
    """
    def one(a):
        if not isinstance(a, jax.Array) or len(a.sharding.device_set) == 1:
            return a
        if a.is_fully_replicated:
            return a.addressable_shards[0].data
        if a.is_fully_addressable:
            return jax.device_put(a, jax.local_devices()[0])
        raise ValueError(f"an array of shape {a.shape} is sharded over other processes' devices "
                         f"({a.sharding}); it has no local copy")

    return jax.tree.map(one, tree)


def describe() -> str:
    """``"<n> device(s) (<platform>), <p> process(es)"`` for logs and benchmark JSON."""
    d = jax.devices()[0]
    return (f"{jax.device_count()} {d.platform} device(s), {jax.process_count()} process(es)"
            + (f", {jax.local_device_count()} local" if jax.process_count() > 1 else ""))


__all__ = ["AXIS", "AUTO", "CoordinatorUnreachableError", "Placement", "check_process_args", "data_parallel",
           "check_accelerator_used", "cpu_devices_for", "describe", "expected_platform", "gpu_present", "initialize", "initialize_from_config", "is_primary", "local_copy",
           "member_devices", "member_parallel", "mesh", "wait_for_coordinator"]
