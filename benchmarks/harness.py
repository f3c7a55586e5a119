"""What the benchmarks share: the benchmark setting, ahead-of-time compiles, interleaved timing.

Setting: batch 64, latent 40, the paper's networks, discretised Gaussian, Jeffreys
warm start, preconditioning on (decay 0.99), Adam; 28x28x1 (a real Fashion-MNIST
batch when the IDX files are installed, else random 8-bit images) and 64x64x3
(CelebA's shape, random 8-bit images). Programs are compiled ahead of time
(``jit(...).lower(...).compile()``), so compile and run times are separate; run times
are medians of repeated calls, and programs compared with each other are timed in
interleaved rounds (the machine may be shared).

Formulations to compare are passed in explicitly: :func:`chain_step_ms` takes, per
name, a ``StepBuilder`` ``(config, model, mesh) -> step`` (``training.build.make_train_step``
is the library as it is); nothing is patched into the library's modules.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lpc_jax.data import sources
from lpc_jax.model.state import Model, create_train_state
from lpc_jax.runtime import distributed
from lpc_jax.sampling import langevin
from lpc_jax.training import build
from lpc_jax.training.config import Config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"28x28x1": "fashion_mnist", "64x64x3": "celeba"}
CHAIN_T = {"28x28x1": (10, 60), "64x64x3": (10, 40)}  # (short, long) chain lengths per shape
T_LONG = 300  # the paper's Table 4 chain length
# (config, model, mesh) -> train step; the library's own is build.make_train_step
StepBuilder = Callable[[Config, Model, "jax.sharding.Mesh | None"], Callable]


def median_ms(fn: Callable[[], object], n: int) -> float:
    """Median wall time of ``n`` calls of ``fn`` (each waited for), in ms."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def compile_ahead(fn: Callable, *args):
    """``(compiled, seconds)``: ``jax.jit(fn)`` lowered for ``args`` and compiled."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def flops(compiled) -> float:
    """XLA's cost analysis of a compiled program: floating-point operations per call."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def memory_bytes(compiled) -> int | None:
    """Argument + output + temporary bytes of a compiled program (aliased bytes once); None if unknown."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - getattr(m, "alias_size_in_bytes", 0))


def batch(dataset: str, batch_size: int) -> tuple[jax.Array, str]:
    """A (B, H, W, C) float32 batch in [-1, 1] and where it came from."""
    shape = sources.image_shape(dataset)
    try:
        if dataset != "fashion_mnist":
            raise FileNotFoundError(dataset)
        images = sources.load("fashion_mnist", "train", "idx", None, batch_size).images
        return jnp.asarray(sources.to_float(images[:batch_size])), "Fashion-MNIST train[:64]"
    except Exception:  # noqa: BLE001  (no dataset: shapes are what matter)
        x = jax.random.randint(jax.random.key(1), (batch_size, *shape), 0, 256)
        return jnp.asarray(sources.to_float(np.asarray(x, np.uint8))), "random 8-bit images"


def setup(dataset: str, **overrides):
    """``(config, model, state, x, source)`` of the benchmark setting for one image shape."""
    config = Config(dataset=dataset, batch_size=64, latent_dim=40, warm_start="jeffreys", preconditioner=True,
                    step_size=0.1, decay=0.99, **overrides)
    model = build.build_model(config)
    shape = sources.image_shape(dataset)
    state = jax.jit(create_train_state, static_argnums=(1, 2, 3))(jax.random.key(0), model, shape, 40)
    x, source = batch(dataset, config.batch_size)
    return config, model, state, x, source


def row(name: str, value, unit: str = "") -> None:
    """Prints one aligned ``name value unit`` row."""
    print(f"  {name:<52} {value:>10.3f} {unit}" if isinstance(value, float) else f"  {name:<52} {value} {unit}")


def interleaved_ms(programs: dict, reps: int) -> dict:
    """Median ms of each zero-argument program, timed in ``reps`` interleaved rounds."""
    times = {name: [] for name in programs}
    for _ in range(reps):
        for name, fn in programs.items():
            times[name].append(median_ms(fn, 1))
    return {name: statistics.median(t) for name, t in times.items()}


def with_config(**overrides) -> StepBuilder:
    """The library's step for ``config`` with ``overrides`` (e.g. ``chain_dtype="bfloat16"``)."""
    return lambda config, model, mesh: build.make_train_step(dataclasses.replace(config, **overrides), model, mesh)


class ChainTimes(dict):
    """``{name: marginal ms per chain step}``; ``.ms[(name, T)]``: the median ms of each program."""

    ms: dict


def chain_step_ms(shape: str, builders: dict[str, StepBuilder], rounds: int, *,
                  placement: distributed.Placement | None = None) -> ChainTimes:
    """Marginal ms per chain step of the LPC train step for each builder, in the same rounds.

    Each builder's step (the benchmark setting: Jeffreys, preconditioned, batch 64) is
    compiled at both ``CHAIN_T[shape]`` lengths, and all programs are timed in the same
    ``rounds`` interleaved rounds. With ``placement`` (``distributed.data_parallel``) the
    state and batch live there and the builder gets its mesh, as in ``train.make_group``.

    Returns:
      ``{name: (median ms at T_long - median ms at T_short) / (T_long - T_short)}``, with
      each program's median ms in ``.ms``.
    """
    config, model, state, x, _ = setup(SHAPES[shape])
    key, hp = jax.random.key(2), langevin.hparams(config.step_size, config.decay, config.eps)
    jit_kw, mesh = {}, None
    if placement is not None:
        state, x = placement.put_state(state), jax.device_put(x, placement.batch)
        jit_kw, mesh = {"out_shardings": (placement.state, placement.replicated)}, placement.batch.mesh
    programs = {}
    for name, make_step in builders.items():
        for num_steps in CHAIN_T[shape]:
            cfg = dataclasses.replace(config, num_steps=num_steps)
            step = jax.jit(make_step(cfg, model, mesh), **jit_kw)
            fn = step.lower(state, x, key, hp).compile()
            programs[name, num_steps] = functools.partial(fn, state, x, key, hp)
            jax.block_until_ready(programs[name, num_steps]())
    ms = interleaved_ms(programs, rounds)
    t_short, t_long = CHAIN_T[shape]
    out = ChainTimes({name: (ms[name, t_long] - ms[name, t_short]) / (t_long - t_short) for name in builders})
    out.ms = ms
    return out


def run_worker(module: str, call: str, env: dict, what: str) -> dict:
    """``benchmarks.<module>.<call>`` in a fresh Python process with ``env`` added (device
    settings must precede JAX's start); returns the dict it prints.

    Raises:
      RuntimeError: the worker failed; the message names ``what`` and ends with its stderr.
    """
    code = f"import json; from benchmarks import {module}; print('RESULT', json.dumps({module}.{call}))"
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"{what}: {proc.stderr[-2000:]}")
    return json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
