"""Cost of the Langevin chain inside the jitted LPC train step.

    python -m benchmarks.chain            # full: T = 300 timed 3x, K = 8 sweeps at T = 30
    python -m benchmarks.chain --quick    # fewer repetitions: T = 300 timed once (~20 min, 2 loaded cores)
    python -m benchmarks.chain --table4   # only the paper's Table 4: seconds per SGD step
    python -m benchmarks.chain --devices  # only data-parallel steps/s on 1, 2, 4 forced CPU devices

Setting: batch 64, latent 40, the paper's networks, discretised Gaussian, Jeffreys
warm start, preconditioning on (decay 0.99), Adam; 28x28x1 (a real Fashion-MNIST
batch when the IDX files are installed, else random 8-bit images) and 64x64x3
(CelebA's shape, random 8-bit images). Every program is compiled ahead of time
(``jit(...).lower(...).compile()``), so compile and run times are separate; run
times are medians of repeated calls, and programs compared with each other are
timed in interleaved rounds (the machine may be shared).

Printed: human-readable rows, then as the LAST line one JSON object:

* ``standalone_grad_ms``: one jitted grad of sum_b log p(x_b, z_b; theta) w.r.t. (theta, z), 28x28x1.
* ``chain_step_ms``: marginal cost of one Langevin step inside the full train step,
  (t(T=300) - t(T=T_small)) / (300 - T_small), 28x28x1.
* ``step_overhead_ratio``: ``chain_step_ms / standalone_grad_ms`` (1.0 = the rolled
  scan costs what the standalone VJP costs); ``step_overhead_ratio_T300_avg`` uses
  ``train_step_ms_T300 / 300`` instead (includes the encoder, the Adam update...).
* ``train_step_ms_T300``, ``compile_s_T300``: one full train step at T = 300.
* ``peak_mem_ratio_T1000_vs_T10``: compiled ``memory_analysis()``
  (argument + output + temp bytes) at T = 1000 over T = 10 (compile only).
* ``sweep_speedup_K8``: 8 sequential single-member steps / one K = 8 sweep step, same
  T: the single steps as separate runs make them (one device, the whole CPU: this
  process), the sweep as ``experiments.sweep`` runs it by default on a CPU, one JAX
  device per core (``--cpu_devices``), members spread over them, ``lax.map`` on each
  (a subprocess; ``sweep_K8_cpu_devices_*``, whose ``speedup`` compares with single
  steps in that subprocess). ``sweep_speedup_K8_1device`` and the ``_vmap`` /
  ``_map`` variants: both sides on one device.
* per shape S in ``28x28x1``, ``64x64x3``, from the real ``lpc_train_step`` at T = 10 and
  a longer T (``chain_T_<S>``), the four variants timed in the same rounds:
  ``chain_step_ms_1device_<S>`` (marginal ms per chain step, float32, k = 1, this
  process: one device, the whole CPU); ``chain_step_ratio_{bf16,k2,k5}_<S>``: the
  marginal cost of ``chain_dtype=bfloat16``, ``theta_grad_every=2``, ``=5`` over it;
  ``chain_step_ms_<S>``: float32, k = 1, as the launchers run it, on a multi-core CPU
  one JAX device per core with the batch sharded over them (``--cpu_devices``; a
  subprocess, after the variants; the chain under ``shard_map``, one all-reduce after its
  loop), else the one-device figure; ``chain_step_speedup_cpu_devices_<S>`` = one device /
  that; ``chain_step_ms_gspmd_<S>``: the same devices with the chain partitioned by XLA
  (an all-reduce on every chain step, as before ``shard_map``), timed in the same rounds,
  and ``chain_step_ratio_shard_map_vs_gspmd_<S>``; ``chain_step_gflop_<S>``
  (XLA cost analysis of one kernel step: joint VJP w.r.t. (theta, z) and update) and
  ``_zonly_<S>`` (VJP w.r.t. z only); ``chain_gflops_<S>`` = flop per step / the
  ``chain_step_ms_<S>`` seconds; ``chain_gflops`` is the 28x28x1 one.
* ``theta_grad_every_5_{cond,scans,joint,zonly}_ms``: the chain alone (28x28x1, T = 40,
  no encoder or Adam), per step: one scan with ``lax.cond`` (the train step's way), nested
  scans (4 z-only steps then one joint step per block of 5), every step joint, every step
  z-only; ``theta_grad_every_5_ideal_ms`` = (joint + 4 zonly) / 5.
* ``device``.

``--table4``: seconds per SGD step for the VAE and LPC (reverse_kl, jeffreys) at
T = 300, batch 64, for 64x64x3 and 28x28x1, each the median of ``--table4_reps`` calls,
with the ratios LPC / VAE beside the paper's (Table 4, one GPU: VAE 0.022 s, LPC
reverse KL 0.533 s, LPC Jeffreys 0.798 s per batch, x24 and x36).

``--devices[=1,2,4]``: the single run's data-parallel train step (``train.make_group``:
batch 64 sharded over the devices, state replicated; the main job's settings, T = 3)
in one subprocess per device count with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
(CPU devices share the host's cores: up to one per core this is the speed-up the
launchers' ``--cpu_devices`` default gets, beyond it only correctness and overhead).
``scaling_<N>``: ``devices``, ``steps_per_s`` (median of ``--device_reps``
blocks of ``--device_steps`` steps, each step's metrics fetched as the loop does),
``compile_s``; ``param_rel_diff_step1_vs_1`` and ``param_rel_diff_vs_1`` =
||params_N - params_1|| / ||params_1|| (all parameters, L2) after the first step and
after all steps: float32 summation order only at step 1; training amplifies it over
many steps as it amplifies any perturbation (a 1e-7 relative change of the initial
params on one device grows to ~10% in 60 steps).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from lpc_jax.data import pipeline, sources
from lpc_jax.model import chain
from lpc_jax.model.state import create_train_state
from lpc_jax.runtime import distributed
from lpc_jax.sampling import langevin
from lpc_jax.training import build, sweep
from lpc_jax.training.config import Config

T_LONG = 300
SHAPES = {"28x28x1": "fashion_mnist", "64x64x3": "celeba"}
CHAIN_T = {"28x28x1": (10, 60), "64x64x3": (10, 40)}  # (short, long) chain lengths per shape
VARIANTS = {"float32": {}, "bf16": {"chain_dtype": "bfloat16"}, "k2": {"theta_grad_every": 2},
            "k5": {"theta_grad_every": 5}}
PAPER_TABLE4 = {"vae": 0.022, "lpc_reverse_kl": 0.533, "lpc_jeffreys": 0.798}


def _median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _compile(fn, *args):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def _mem_bytes(compiled) -> int | None:
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - getattr(m, "alias_size_in_bytes", 0))


def _batch(dataset: str, batch_size: int) -> tuple[jax.Array, str]:
    shape = sources.image_shape(dataset)
    try:
        if dataset != "fashion_mnist":
            raise FileNotFoundError(dataset)
        images = sources.load("fashion_mnist", "train", "idx", None, batch_size).images
        return jnp.asarray(sources.to_float(images[:batch_size])), "Fashion-MNIST train[:64]"
    except Exception:  # noqa: BLE001  (no dataset: shapes are what matter)
        x = jax.random.randint(jax.random.key(1), (batch_size, *shape), 0, 256)
        return jnp.asarray(sources.to_float(np.asarray(x, np.uint8))), "random 8-bit images"


def _setup(dataset: str, **overrides):
    """Config, model, initial state, batch and its source for one image shape."""
    config = Config(dataset=dataset, batch_size=64, latent_dim=40, warm_start="jeffreys", preconditioner=True,
                    step_size=0.1, decay=0.99, **overrides)
    model = build.build_model(config)
    shape = sources.image_shape(dataset)
    state = jax.jit(create_train_state, static_argnums=(1, 2, 3))(jax.random.key(0), model, shape, 40)
    x, source = _batch(dataset, config.batch_size)
    return config, model, state, x, source


def _row(name, value, unit=""):
    print(f"  {name:<52} {value:>10.3f} {unit}" if isinstance(value, float) else f"  {name:<52} {value} {unit}")


def _step_of(config, model, mesh=None, **overrides):
    return build.make_train_step(dataclasses.replace(config, **overrides), model, mesh)


def _interleaved_ms(programs: dict, reps: int) -> dict:
    """Median ms of each zero-argument program, timed in ``reps`` interleaved rounds."""
    times = {name: [] for name in programs}
    for _ in range(reps):
        for name, fn in programs.items():
            times[name].append(_median_ms(fn, 1))
    return {name: statistics.median(t) for name, t in times.items()}


@contextlib.contextmanager
def swapped(module, name: str, value):
    """``module.name = value`` for the duration (a formulation under test, looked up at trace time)."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def chain_step_ms_by_formulation(shape: str, formulations: dict, rounds: int,
                                 placement: distributed.Placement | None = None) -> dict:
    """Marginal ms per chain step of the real ``lpc_train_step`` for each formulation.

    ``formulations`` maps a name to a zero-argument context-manager factory entered while
    the step is traced (e.g. ``functools.partial(swapped, module, name, value)``;
    ``contextlib.nullcontext`` for the library as it is). The step (Jeffreys,
    preconditioned, batch 64) is compiled at both ``CHAIN_T[shape]`` lengths per
    formulation, and all programs are timed in the same ``rounds`` interleaved rounds;
    with ``placement`` (``distributed.data_parallel``) the state and batch live there and
    the step gets its mesh, as in ``train.make_group``. Returns {name: ms}: (median ms at T_long - median ms at
    T_short) / (T_long - T_short).
    """
    config, model, state, x, _ = _setup(SHAPES[shape])
    key, hp = jax.random.key(2), langevin.hparams(config.step_size, config.decay, config.eps)
    jit_kw, mesh = {}, None
    if placement is not None:
        state, x = placement.put_state(state), jax.device_put(x, placement.batch)
        jit_kw, mesh = {"out_shardings": (placement.state, placement.replicated)}, placement.batch.mesh
    programs = {}
    for name, formulation in formulations.items():
        for num_steps in CHAIN_T[shape]:
            with formulation():
                step = jax.jit(_step_of(config, model, mesh, num_steps=num_steps), **jit_kw)
                fn = step.lower(state, x, key, hp).compile()
            programs[name, num_steps] = functools.partial(fn, state, x, key, hp)
            jax.block_until_ready(programs[name, num_steps]())
    ms = _interleaved_ms(programs, rounds)
    t_short, t_long = CHAIN_T[shape]
    return {name: (ms[name, t_long] - ms[name, t_short]) / (t_long - t_short) for name in formulations}


def _lpc_section(out: dict, quick: bool, reps: int) -> None:
    """Standalone grad, train step at T_small and T = 300, memory at T = 10 / 1000 (28x28x1)."""
    t_small, reps_long = (10, 1) if quick else (20, 3)
    config, model, state, x, source = _setup("fashion_mnist")
    key, hp = jax.random.key(2), langevin.hparams(config.step_size, config.decay, config.eps)
    print(f"28x28x1 data: {source}; batch 64, latent 40, Jeffreys, preconditioned")

    z = jax.random.normal(jax.random.key(3), (config.batch_size, config.latent_dim))
    grad_fn = jax.grad(lambda th, z_: model.log_joint(th, x, z_).sum(), argnums=(0, 1))
    g, c_s = _compile(grad_fn, state.params["decoder"], z)
    jax.block_until_ready(g(state.params["decoder"], z))  # warm-up, finished before timing
    out["standalone_grad_ms"] = _median_ms(lambda: g(state.params["decoder"], z), 5 * reps)
    _row("standalone grad (theta, z): compile", c_s, "s")
    _row("standalone grad (theta, z)", out["standalone_grad_ms"], "ms")

    small, c_small = _compile(_step_of(config, model, num_steps=t_small), state, x, key, hp)
    jax.block_until_ready(small(state, x, key, hp))
    ms_small = _median_ms(lambda: small(state, x, key, hp), reps)
    _row(f"train step T={t_small}: compile", c_small, "s")
    _row(f"train step T={t_small}", ms_small, "ms")
    long, out["compile_s_T300"] = _compile(_step_of(config, model, num_steps=T_LONG), state, x, key, hp)
    _row(f"train step T={T_LONG}: compile", out["compile_s_T300"], "s")
    out["train_step_ms_T300"] = _median_ms(lambda: long(state, x, key, hp), reps_long)
    _row(f"train step T={T_LONG} (median of {reps_long})", out["train_step_ms_T300"], "ms")
    out["chain_step_ms"] = (out["train_step_ms_T300"] - ms_small) / (T_LONG - t_small)
    out["step_overhead_ratio"] = out["chain_step_ms"] / out["standalone_grad_ms"]
    out["step_overhead_ratio_T300_avg"] = out["train_step_ms_T300"] / T_LONG / out["standalone_grad_ms"]
    out[f"train_step_ms_T{t_small}"] = ms_small
    _row("chain step (marginal, per Langevin step)", out["chain_step_ms"], "ms")
    _row("step_overhead_ratio (marginal / standalone)", out["step_overhead_ratio"])
    _row("step_overhead_ratio_T300_avg", out["step_overhead_ratio_T300_avg"])

    mem = {}
    for T in (10, 1000):
        compiled = small if T == t_small else _compile(_step_of(config, model, num_steps=T), state, x, key, hp)[0]
        mem[T] = _mem_bytes(compiled)
        _row(f"compiled memory T={T} (arg+out+temp)", f"{mem[T] / 2**20:.1f}" if mem[T] else "n/a", "MiB")
    out["peak_mem_bytes_T10"], out["peak_mem_bytes_T1000"] = mem[10], mem[1000]
    out["peak_mem_ratio_T1000_vs_T10"] = mem[1000] / mem[10] if mem[10] and mem[1000] else None
    _row("peak_mem_ratio_T1000_vs_T10", out["peak_mem_ratio_T1000_vs_T10"])


def _sweep_section(out: dict, quick: bool, reps: int) -> None:
    """K = 8 sweep vs 8 sequential single steps, same T (28x28x1); each repetition times
    the 8 single calls right next to the sweep call."""
    t_sweep, K = (10 if quick else 30), 8
    config, model, state, x, _ = _setup("fashion_mnist", num_steps=10 if quick else 30)
    key, hp = jax.random.key(2), langevin.hparams(config.step_size, config.decay, config.eps)
    single = _compile(build.make_train_step(config, model), state, x, key, hp)[0]
    states = sweep.stack_trees([state] * K)
    keys = jax.random.split(key, K)
    hps = langevin.stack_hparams(list(np.geomspace(1e-3, 0.5, K)), [0.99] * K)
    seq_all = []
    for mode in sweep.SWEEP_MODES:
        fn, c_k = _compile(sweep.make_sweep_step(config, model, mode=mode), states, x, keys, hps)
        hlo = fn.as_text() or ""
        grouped = hlo.count("feature_group_count=") + hlo.count("batch_group_count=")
        jax.block_until_ready(fn(states, x, keys, hps))
        seq, swp = [], []
        for _ in range(reps):
            seq.append(_median_ms(lambda: [single(state, x, k, hp) for k in keys], 1))
            swp.append(_median_ms(lambda: fn(states, x, keys, hps), 1))
        seq_all += seq
        ms_seq, ms_k = statistics.median(seq), statistics.median(swp)
        out.update({f"sweep_K8_{mode}_ms": ms_k, f"sweep_K8_{mode}_sequential_ms": ms_seq,
                    f"sweep_K8_{mode}_compile_s": c_k, f"sweep_K8_{mode}_grouped_convs": grouped,
                    f"sweep_speedup_K8_{mode}": ms_seq / ms_k})
        _row(f"sweep K=8 {mode}: compile", c_k, "s")
        _row(f"8 sequential single steps, T={t_sweep}", ms_seq, "ms")
        _row(f"sweep K=8 {mode}, T={t_sweep} ({grouped} grouped convs)", ms_k, "ms")
        _row(f"sweep_speedup_K8_{mode}", out[f"sweep_speedup_K8_{mode}"])
    out["sequential_K8_ms"] = statistics.median(seq_all)
    out["sweep_speedup_K8_1device"] = out[f"sweep_speedup_K8_{sweep.resolve_mode(sweep.DEFAULT_MODE)}"]
    out["sweep_default_mode"] = f"{sweep.DEFAULT_MODE} ({sweep.resolve_mode(sweep.DEFAULT_MODE)} here)"
    out["sweep_T"] = t_sweep
    # experiments.sweep's default on a CPU: one JAX device per core, members spread over them.
    n = distributed.cpu_devices_for(0)
    result = _worker(f"sweep_worker({t_sweep}, {reps})", {"JAX_NUM_CPU_DEVICES": str(n)}, f"sweep on {n} CPU devices")
    out.update({f"sweep_K8_cpu_devices_{k}": v for k, v in result.items()})
    # Against separate runs as a user starts them: one device, the whole CPU (this process).
    out["sweep_speedup_K8"] = out["sequential_K8_ms"] / result["sweep_ms"]
    _row(f"sweep K=8 map on {result['devices']} CPU devices (experiments.sweep default), T={t_sweep}",
         result["sweep_ms"], "ms")
    _row(f"8 sequential single steps on one of those devices, T={t_sweep}", result["sequential_ms"], "ms")
    _row("sweep_speedup_K8 (8 single steps on one whole-CPU device / that sweep step)", out["sweep_speedup_K8"])


def sweep_worker(num_steps: int, reps: int) -> dict:
    """In a process with N CPU devices: K = 8 sweep step spread over them (``member_parallel``,
    map) against 8 sequential single steps on one device, same T (28x28x1)."""
    K = 8
    config, model, state, x, _ = _setup("fashion_mnist", num_steps=num_steps)
    key, hp = jax.random.key(2), langevin.hparams(config.step_size, config.decay, config.eps)
    single = _compile(build.make_train_step(config, model), state, x, key, hp)[0]
    placement = distributed.member_parallel(K)
    keys = jax.random.split(key, K)
    args = [placement.put_state(a) for a in (sweep.stack_trees([state] * K), keys,
                                              langevin.stack_hparams(list(np.geomspace(1e-3, 0.5, K)), [0.99] * K))]
    fn = _compile(sweep.make_sweep_step(config, model, mode="map", mesh=placement.state.mesh),
                  args[0], x, *args[1:])[0]
    seq, swp = [], []
    for _ in range(reps):
        seq.append(_median_ms(lambda: [single(state, x, k, hp) for k in keys], 1))
        swp.append(_median_ms(lambda: fn(args[0], x, *args[1:]), 1))
    ms_seq, ms_k = statistics.median(seq), statistics.median(swp)
    return {"devices": jax.device_count(), "members_per_device": K // len(placement.state.device_set),
            "sweep_ms": ms_k, "sequential_ms": ms_seq, "speedup": ms_seq / ms_k}


def _gspmd_chain(mesh, run, inputs, *, init):
    """The data-parallel chain before ``shard_map``: the step's own, partitioned by XLA
    (GSPMD), which all-reduces grad_theta inside the loop, on every chain step."""
    del mesh, init
    return run(inputs)


def data_parallel_worker(shape: str, reps: int) -> dict:
    """In a process with N CPU devices: the marginal ms per chain step of the real train step
    as the launchers run it there, the batch sharded over the N devices (``train.make_group``'s
    ``distributed.data_parallel`` placement), T = ``CHAIN_T[shape]``: ``chain_step_ms`` with
    the chain under ``shard_map`` (the library), ``chain_step_ms_gspmd`` with it partitioned
    by XLA as before (:func:`_gspmd_chain`), in the same rounds."""
    placement = distributed.data_parallel(64)  # _setup's batch
    ms = chain_step_ms_by_formulation(shape, {
        "shard_map": contextlib.nullcontext,
        "gspmd": functools.partial(swapped, chain, "run_chain_data_parallel", _gspmd_chain)}, reps, placement)
    return {"devices": jax.device_count(), "chain_step_ms": ms["shard_map"], "chain_step_ms_gspmd": ms["gspmd"]}


def _kernels(model, x, theta, chain_dtype="float32"):
    """The train step's two chain kernels: joint (theta, z) VJP, and z-only VJP."""
    log_joint = chain.chain_log_joint(model, x, chain_dtype=chain_dtype)
    kernel = langevin.build_kernel(log_joint, precondition=True, with_param_grad=True)
    return kernel, langevin.build_kernel(lambda z: log_joint(theta, z), precondition=True)


def _chain_step_gflop(model, state, x, hp) -> tuple[float, float]:
    """XLA cost analysis of one kernel step (joint, z-only), GFLOP."""
    theta = state.params["decoder"]
    kernel, z_kernel = _kernels(model, x, theta)
    lstate = langevin.init(jnp.zeros((x.shape[0], 40)))
    key = jax.random.key(0)
    joint = _compile(lambda k, s, th: kernel(k, s, hp, th), key, lstate, theta)[0]
    zonly = _compile(lambda k, s: z_kernel(k, s, hp), key, lstate)[0]
    return _flops(joint) / 1e9, _flops(zonly) / 1e9


def _variants_section(out: dict, shape: str, reps: int) -> None:
    """Marginal ms per chain step of the real train step, float32 / bf16 / k = 2 / k = 5."""
    config, model, state, x, source = _setup(SHAPES[shape])
    key, hp = jax.random.key(2), langevin.hparams(config.step_size, config.decay, config.eps)
    t_short, t_long = CHAIN_T[shape]
    print(f"{shape} ({source}): real train step at T={t_short} and T={t_long}, variants in the same rounds")
    programs, compile_s = {}, 0.0
    for name, overrides in VARIANTS.items():
        for T in (t_short, t_long):
            fn, c = _compile(_step_of(config, model, num_steps=T, **overrides), state, x, key, hp)
            jax.block_until_ready(fn(state, x, key, hp))
            compile_s += c
            programs[name, T] = lambda fn=fn: fn(state, x, key, hp)
    _row(f"{shape}: compile 8 programs", compile_s, "s")
    ms = _interleaved_ms(programs, reps)
    marginal = {name: (ms[name, t_long] - ms[name, t_short]) / (t_long - t_short) for name in VARIANTS}
    for name in VARIANTS:
        _row(f"{shape} {name}: T={t_short} / T={t_long}", f"{ms[name, t_short]:.1f} / {ms[name, t_long]:.1f}", "ms")
        _row(f"{shape} {name}: chain step (marginal)", marginal[name], "ms")
    out[f"chain_T_{shape}"] = [t_short, t_long]
    out[f"chain_step_ms_1device_{shape}"] = out[f"chain_step_ms_{shape}"] = marginal["float32"]
    # The launchers' default on a CPU: one JAX device per core, the batch sharded over them.
    n = distributed.cpu_devices_for(0, config.batch_size)
    if n > 1:
        result = _worker(f"data_parallel_worker({shape!r}, {reps})", {"JAX_NUM_CPU_DEVICES": str(n)},
                         f"data-parallel chain on {n} CPU devices")
        out[f"chain_step_ms_{shape}"] = result["chain_step_ms"]
        out[f"chain_step_speedup_cpu_devices_{shape}"] = marginal["float32"] / result["chain_step_ms"]
        out[f"chain_step_ms_gspmd_{shape}"] = result["chain_step_ms_gspmd"]
        out[f"chain_step_ratio_shard_map_vs_gspmd_{shape}"] = result["chain_step_ms"] / result["chain_step_ms_gspmd"]
        _row(f"{shape} float32 on {n} CPU devices, batch sharded (the launchers' default)", result["chain_step_ms"],
             "ms")
        _row(f"{shape} the same, chain partitioned by XLA (before shard_map)", result["chain_step_ms_gspmd"], "ms")
        for key in (f"chain_step_ratio_shard_map_vs_gspmd_{shape}", f"chain_step_speedup_cpu_devices_{shape}"):
            _row(key, out[key])
    for name in VARIANTS:
        out[f"chain_step_ms_{name}_{shape}"] = marginal[name]
        if name != "float32":
            out[f"chain_step_ratio_{name}_{shape}"] = marginal[name] / marginal["float32"]
            _row(f"chain_step_ratio_{name}_{shape}", out[f"chain_step_ratio_{name}_{shape}"])
    joint, zonly = _chain_step_gflop(model, state, x, hp)
    out[f"chain_step_gflop_{shape}"], out[f"chain_step_gflop_zonly_{shape}"] = joint, zonly
    out[f"chain_gflops_{shape}"] = joint / (out[f"chain_step_ms_{shape}"] / 1e3)
    _row(f"{shape}: GFLOP per chain step (joint / z-only)", f"{joint:.3f} / {zonly:.3f}")
    _row(f"chain_gflops_{shape}", out[f"chain_gflops_{shape}"], "GFLOP/s")


def _cond_vs_scans(out: dict, reps: int, k: int = 5, num_steps: int = 40) -> None:
    """theta_grad_every = k on the chain alone (28x28x1): one scan with lax.cond vs nested scans."""
    config, model, state, x, _ = _setup("fashion_mnist")
    hp = langevin.hparams(config.step_size, config.decay, config.eps)
    theta = state.params["decoder"]
    kernel, z_kernel = _kernels(model, x, theta)
    z0 = jax.random.normal(jax.random.key(3), (x.shape[0], 40))
    keys = jax.random.split(jax.random.key(4), num_steps)
    zeros = jax.tree.map(jnp.zeros_like, theta)

    def joint_step(carry, key):
        lstate, info, g_theta_t = kernel(key, carry[0], hp, theta)
        return (lstate, jax.tree.map(jnp.add, carry[1], g_theta_t)), info.log_prob.mean()

    def zonly_step(carry, key):
        lstate, info = z_kernel(key, carry[0], hp)
        return (lstate, carry[1]), info.log_prob.mean()

    def cond_chain(z0, keys):
        selected = chain.theta_grad_steps(num_steps, k, k - 1)
        step = lambda c, xs: jax.lax.cond(xs[1], joint_step, zonly_step, c, xs[0])
        return jax.lax.scan(step, (langevin.init(z0), zeros), (keys, selected))

    def nested_chain(z0, keys):
        def block(carry, block_keys):
            carry, _ = jax.lax.scan(zonly_step, carry, block_keys[:-1])
            return joint_step(carry, block_keys[-1])
        return jax.lax.scan(block, (langevin.init(z0), zeros), keys.reshape(num_steps // k, k))

    chains = {"cond": cond_chain, "scans": nested_chain,
              "joint": lambda z0, keys: jax.lax.scan(joint_step, (langevin.init(z0), zeros), keys),
              "zonly": lambda z0, keys: jax.lax.scan(zonly_step, (langevin.init(z0), zeros), keys)}
    programs = {}
    for name, program in chains.items():
        fn = _compile(program, z0, keys)[0]
        jax.block_until_ready(fn(z0, keys))
        programs[name] = lambda fn=fn: fn(z0, keys)
    ms = _interleaved_ms(programs, max(reps, 7))  # under a second each: more rounds
    for name in chains:
        out[f"theta_grad_every_{k}_{name}_ms"] = ms[name] / num_steps
        _row(f"chain alone, T={num_steps}, k={k}: {name}, per step", ms[name] / num_steps, "ms")
    out[f"theta_grad_every_{k}_ideal_ms"] = (ms["joint"] + (k - 1) * ms["zonly"]) / k / num_steps
    _row(f"chain alone, k={k}: ideal (joint + {k - 1} z-only) / {k}", out[f"theta_grad_every_{k}_ideal_ms"], "ms")


def table4(out: dict, reps: int) -> None:
    """Seconds per SGD step at T = 300, batch 64: VAE, LPC reverse_kl, LPC jeffreys."""
    for shape in ("64x64x3", "28x28x1"):
        config, model, state, x, source = _setup(SHAPES[shape], num_steps=T_LONG)
        key, hp = jax.random.key(2), langevin.hparams(config.step_size, config.decay, config.eps)
        steps = {"vae": dataclasses.replace(config, algorithm="vae"),
                 "lpc_reverse_kl": dataclasses.replace(config, warm_start="reverse_kl"),
                 "lpc_jeffreys": config}
        print(f"Table 4 analogue, {shape} ({source}), T={T_LONG}, batch 64, median of {reps} steps")
        for name, cfg in steps.items():
            fn, c = _compile(build.make_train_step(cfg, model), state, x, key, hp)
            if name == "vae":
                jax.block_until_ready(fn(state, x, key, hp))
            seconds = _median_ms(lambda: fn(state, x, key, hp), reps if name != "vae" else 5 * reps) / 1e3
            out[f"table4_{shape}_{name}_s"] = seconds
            _row(f"{shape} {name}: compile", c, "s")
            _row(f"{shape} {name}: seconds per SGD step", seconds, "s")
        for name in ("lpc_reverse_kl", "lpc_jeffreys"):
            ratio = out[f"table4_{shape}_{name}_s"] / out[f"table4_{shape}_vae_s"]
            paper = PAPER_TABLE4[name] / PAPER_TABLE4["vae"]
            out[f"table4_{shape}_ratio_{name}"] = ratio
            _row(f"{shape} {name} / vae (paper, one GPU: x{paper:.0f})", ratio)
    out["table4_paper_s"] = PAPER_TABLE4


def scaling_worker(steps: int, reps: int) -> dict:
    """In a process with N (forced) devices: steps/s of ``train.make_group``'s step, the main job's settings."""
    from experiments.fashion_mnist import DEFAULTS
    from lpc_jax.training import loop, train

    config = Config(**{**DEFAULTS, "batch_size": 64})
    model = build.build_model(config)
    keys = loop.run_keys(0)
    group = train.make_group(config, model, keys)
    state = group.placement.put_state(loop.init_state(keys.init, model, (28, 28, 1), config.latent_dim))
    try:
        images = sources.load("fashion_mnist", "train", "idx", None, 64 * 20).images
    except Exception:  # noqa: BLE001  (no dataset: random 8-bit images)
        images = np.random.default_rng(0).integers(0, 256, (64 * 20, 28, 28, 1), dtype=np.uint8)
    batches = [x for _, x in pipeline.step_batches(images, 64, 0, 0, 20)]

    def run(state, start, n):
        for i in range(start, start + n):
            state, metrics = group.step_fn(state, group.placement.put_batch(batches[i % 20]), group.rng(i),
                                           group.hparams)
            jax.device_get(metrics)
        return state

    t0 = time.perf_counter()
    state = jax.block_until_ready(run(state, 0, 1))
    compile_s = time.perf_counter() - t0
    after_one = [np.asarray(a, np.float64).ravel().tolist() for a in jax.tree.leaves(distributed.local_copy(state.params))]
    per_s = []
    for r in range(reps):
        t0 = time.perf_counter()
        state = jax.block_until_ready(run(state, 1 + r * steps, steps))
        per_s.append(steps / (time.perf_counter() - t0))
    params = distributed.local_copy(state.params)
    return {"devices": jax.device_count(), "steps_per_s": statistics.median(per_s), "compile_s": compile_s,
            "steps": 1 + reps * steps, "batch_devices": len(group.placement.batch.device_set),
            "params_step1": after_one,
            "params": [np.asarray(a, np.float64).ravel().tolist() for a in jax.tree.leaves(params)]}


def _worker(call: str, env: dict, what: str) -> dict:
    """``benchmarks.chain.<call>`` in a fresh Python process with ``env`` added (device
    settings must precede JAX's start); returns the dict it prints. RuntimeError names ``what``."""
    code = f"import json; from benchmarks import chain; print('RESULT', json.dumps(chain.{call}))"
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if proc.returncode:
        raise RuntimeError(f"{what}: {proc.stderr[-2000:]}")
    return json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])


def scaling(out: dict, device_counts: list[int], steps: int, reps: int) -> None:
    """``scaling_worker`` in one subprocess per device count (XLA_FLAGS before jax starts)."""
    ref = None
    for n in device_counts:
        env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
        result = _worker(f"scaling_worker({steps}, {reps})", env, f"{n} devices")
        params = {k: np.concatenate([np.asarray(p) for p in result.pop(k)]) for k in ("params_step1", "params")}
        ref = ref or params
        for k, name in (("params_step1", "param_rel_diff_step1_vs_1"), ("params", "param_rel_diff_vs_1")):
            result[name] = float(np.linalg.norm(params[k] - ref[k]) / np.linalg.norm(ref[k]))
        out[f"scaling_{n}"] = result
        _row(f"{n} forced CPU device(s): data-parallel steps/s (T=3, batch 64)", result["steps_per_s"])
        _row(f"{n} forced CPU device(s): compile", result["compile_s"], "s")
        _row(f"{n} forced CPU device(s): |params - params(1 device)| / |params|, step 1",
             result["param_rel_diff_step1_vs_1"])
        _row(f"{n} forced CPU device(s): the same after {result['steps']} steps", result["param_rel_diff_vs_1"])
    out["scaling_note"] = (f"CPU devices share this machine's {distributed.cpu_devices_for(0)} core(s): "
                           "speed-up up to one device per core, beyond it correctness and overhead only")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--table4", action="store_true", help="only the Table 4 analogue (s per SGD step)")
    parser.add_argument("--table4_reps", type=int, default=2, help="timed SGD steps per Table 4 entry")
    parser.add_argument("--devices", nargs="?", const="1,2,4", default=None,
                        help="only data-parallel steps/s on these forced CPU device counts (default 1,2,4)")
    parser.add_argument("--device_steps", type=int, default=20, help="steps per timed block (--devices)")
    parser.add_argument("--device_reps", type=int, default=3, help="timed blocks per device count (--devices)")
    args = parser.parse_args(argv)
    t_total = time.perf_counter()
    reps = 3 if args.quick else 7
    device = jax.devices()[0]
    out: dict = {"device": f"{device.platform}:{device.device_kind} ({jax.device_count()} device(s), "
                           f"jax {jax.__version__})", "quick": args.quick}
    print(f"device: {out['device']}")
    if args.devices:
        scaling(out, [int(n) for n in args.devices.split(",")], args.device_steps, args.device_reps)
    elif args.table4:
        table4(out, args.table4_reps)
    else:
        _lpc_section(out, args.quick, reps)
        _sweep_section(out, args.quick, reps)
        for shape in SHAPES:  # 28x28x1 rounds are cheap: two more of them
            _variants_section(out, shape, reps + 2 if shape == "28x28x1" else reps)
        out["chain_gflops"] = out["chain_gflops_28x28x1"]
        _cond_vs_scans(out, reps)
    out["total_s"] = time.perf_counter() - t_total
    _row("total benchmark time", out["total_s"], "s")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}))
    return out


if __name__ == "__main__":
    main()
