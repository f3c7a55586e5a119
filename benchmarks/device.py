"""One command to measure a device: prints ONE JSON line (progress goes to stderr).

    python -m benchmarks.device            # the full set; at most ~8 min on one H100, compile included
    python -m benchmarks.device --quick    # tiny shapes, seconds-to-a-minute on a CPU (tests run it)

What it times, each program compiled ahead (``jit(...).lower(...).compile()``, compile
time reported apart) and run ``reps`` times (median, ``block_until_ready``); programs
compared with each other are timed in interleaved rounds:

* ``chain_step_ms/<shape>/<conv_impl>/<chain_dtype>``: the marginal cost of one
  Langevin step inside the real LPC train step (Jeffreys warm start, preconditioning,
  batch 64), (t(T_long) - t(T_short)) / (T_long - T_short), for 28x28x1 and 64x64x3,
  the CPU-tuned and XLA's convolutions (``Config.conv_impl``), float32 and bf16
  (``Config.chain_dtype``);
* ``table4/<shape>``: seconds per SGD step of the VAE and LPC (reverse KL, Jeffreys) at
  T = 300 (the paper's Table 4, one 24 GB GPU: 0.022 / 0.533 / 0.798 s, x24 and x36),
  ``conv_impl="auto"``, and the ratios LPC / VAE;
* ``main_job``: steps/s of ``python -m experiments.fashion_mnist``'s step (its
  ``DEFAULTS``: T = 3, reverse KL, batch 64) on one device, at the default matmul
  precision and at ``highest`` (``precision_highest_over_default``: time ratio);
* ``sweep_K8``: one K = 8 sweep step (``training.sweep.make_sweep_step``, T = 30 full /
  short in quick) in each mode, ``vmap``, ``map``, ``auto`` (what ``auto`` picks here),
  and ``speedup_<mode>`` = 8 single steps / one sweep step.

``--quick``: batch 4, 28x28x1 only, T pairs (1, 2), Table 4 at T = 2, K = 2 at T = 1,
one round, LLVM optimisations off: it checks that everything runs, its numbers mean
nothing. Uses the
library's public modules only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import fashion_mnist
from lpc_jax.model import convolutions
from lpc_jax.model.state import create_train_state
from lpc_jax.sampling import langevin
from lpc_jax.training import build, sweep
from lpc_jax.training.config import Config

SHAPES = {"28x28x1": ("fashion_mnist", (28, 28, 1)), "64x64x3": ("celeb_a", (64, 64, 3))}
PAPER_TABLE4_S = {"vae": 0.022, "reverse_kl": 0.533, "jeffreys": 0.798}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one invocation measures (static sizes)."""

    shapes: tuple[str, ...]
    chain_batch: int
    chain_steps: tuple[int, int]  # (T_short, T_long) of the marginal chain-step cost
    table4_steps: int
    table4_batch: int
    sweep_k: int
    sweep_steps: int
    reps: int
    compiler_options: tuple = ()  # quick: LLVM optimisations off (about half the compile time)


FULL = Plan(("28x28x1", "64x64x3"), 64, (10, 60), 300, 64, 8, 30, 5)
QUICK = Plan(("28x28x1",), 4, (1, 2), 2, 4, 2, 1, 1, (("xla_backend_optimization_level", 0),))
_OPTIONS: dict = {}  # the plan's compiler options, set by main


def _log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def _compiled(fn, *args):
    """(compiled fn, compile seconds)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile(compiler_options=_OPTIONS or None)
    return compiled, time.perf_counter() - t0


def _interleaved_s(programs: dict, reps: int) -> dict:
    """Median seconds per call of each ``name -> (compiled, args)``, timed in interleaved rounds."""
    times = {name: [] for name in programs}
    for name, (fn, args) in programs.items():  # warm-up
        jax.block_until_ready(fn(*args))
    for _ in range(reps):
        for name, (fn, args) in programs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _images(shape, batch: int, seed: int = 0) -> jax.Array:
    """Random 8-bit images in [-1, 1], (batch, H, W, C) float32."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(batch, *shape))
    return jnp.asarray(pixels / 127.5 - 1.0, jnp.float32)


def _lpc_program(config: Config, shape, batch: int):
    """(train step, its args) of ``config`` for one batch of ``shape``."""
    model = build.build_model(config)
    state = create_train_state(jax.random.key(0), model, shape, config.latent_dim)
    hp = langevin.hparams(config.step_size, config.decay, config.eps)
    step = build.make_train_step(config, model)
    return step, (state, _images(shape, batch), jax.random.key(1), hp)


def chain_steps(plan: Plan) -> dict:
    """Marginal ms per chain step, per shape / conv_impl / chain_dtype."""
    out, compile_s = {}, 0.0
    for name in plan.shapes:
        dataset, shape = SHAPES[name]
        programs = {}
        for impl in ("tuned", "xla"):
            for dtype in ("float32", "bfloat16"):
                for t in plan.chain_steps:
                    config = Config(dataset=dataset, num_steps=t, batch_size=plan.chain_batch, conv_impl=impl,
                                    chain_dtype=dtype, prior_init_batches=0)
                    step, args = _lpc_program(config, shape, plan.chain_batch)
                    compiled, c = _compiled(step, *args)
                    compile_s += c
                    programs[(impl, dtype, t)] = (compiled, args)
        _log(f"chain {name}: compiled {len(programs)} programs")
        times = _interleaved_s(programs, plan.reps)
        t0, t1 = plan.chain_steps
        for impl in ("tuned", "xla"):
            for dtype in ("float32", "bfloat16"):
                out[f"{name}/{impl}/{dtype}"] = 1e3 * (times[(impl, dtype, t1)] - times[(impl, dtype, t0)]) / (t1 - t0)
    return {"chain_step_ms": out, "chain_compile_s": compile_s}


def table4(plan: Plan) -> dict:
    """Seconds per SGD step, VAE and LPC (reverse KL, Jeffreys), T = ``plan.table4_steps``."""
    out = {}
    for name in plan.shapes:
        dataset, shape = SHAPES[name]
        programs = {}
        for kind in ("vae", "reverse_kl", "jeffreys"):
            algorithm, warm = ("vae", "jeffreys") if kind == "vae" else ("lpc", kind)
            config = Config(dataset=dataset, algorithm=algorithm, warm_start=warm, num_steps=plan.table4_steps,
                            batch_size=plan.table4_batch, prior_init_batches=0)
            step, args = _lpc_program(config, shape, plan.table4_batch)
            programs[kind] = _compiled(step, *args)[0], args
        s = _interleaved_s(programs, plan.reps)
        out[name] = {**{f"{k}_s": v for k, v in s.items()},
                     "ratio_reverse_kl": s["reverse_kl"] / s["vae"], "ratio_jeffreys": s["jeffreys"] / s["vae"]}
    out["paper"] = {**{f"{k}_s": v for k, v in PAPER_TABLE4_S.items()}, "ratio_reverse_kl": 24, "ratio_jeffreys": 36}
    return {"table4": out, "table4_steps": plan.table4_steps}


def main_job(plan: Plan) -> dict:
    """``experiments.fashion_mnist``'s step: steps/s at the default precision and at highest."""
    fields = {f.name for f in dataclasses.fields(Config)}
    config = Config(**{k: v for k, v in fashion_mnist.DEFAULTS.items() if k in fields}, prior_init_batches=0)
    if plan is QUICK:
        config = dataclasses.replace(config, batch_size=plan.table4_batch)
    step, args = _lpc_program(config, (28, 28, 1), config.batch_size)
    programs = {"default": (_compiled(step, *args)[0], args)}
    with jax.default_matmul_precision("highest"):
        programs["highest"] = (_compiled(step, *args)[0], args)
    s = _interleaved_s(programs, 3 * plan.reps)
    return {"main_job": {"steps_per_s": 1.0 / s["default"], "steps_per_s_highest": 1.0 / s["highest"],
                         "precision_highest_over_default": s["highest"] / s["default"],
                         "num_steps": config.num_steps, "batch_size": config.batch_size}}


def sweep_modes(plan: Plan) -> dict:
    """One K-member sweep step per mode against K single steps (28x28x1, one device)."""
    k = plan.sweep_k
    config = Config(num_steps=plan.sweep_steps, batch_size=plan.table4_batch, prior_init_batches=0)
    model = build.build_model(config)
    state = create_train_state(jax.random.key(0), model, (28, 28, 1), config.latent_dim)
    x = _images((28, 28, 1), config.batch_size)
    states = sweep.stack_trees([state] * k)
    keys = jax.random.split(jax.random.key(1), k)
    hps = langevin.stack_hparams(list(np.geomspace(0.01, 0.3, k)), [0.99] * k)
    programs = {"single": (_compiled(build.make_train_step(config, model), state, x, keys[0],
                                     langevin.hparams(0.1, 0.99))[0], (state, x, keys[0], langevin.hparams(0.1, 0.99)))}
    for mode in sweep.MODES:
        step = sweep.make_sweep_step(config, model, mode=mode)
        programs[mode] = _compiled(step, states, x, keys, hps)[0], (states, x, keys, hps)
    s = _interleaved_s(programs, plan.reps)
    out = {f"{mode}_ms": 1e3 * s[mode] for mode in sweep.MODES}
    out.update({f"speedup_{mode}": k * s["single"] / s[mode] for mode in sweep.MODES})
    out.update(single_ms=1e3 * s["single"], k=k, num_steps=plan.sweep_steps,
               auto_picks=sweep.resolve_mode("auto", jax.default_backend()))
    return {f"sweep_K{k}": out}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: checks that everything runs")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    _OPTIONS.update(plan.compiler_options)
    t0 = time.perf_counter()
    d = jax.devices()[0]
    out = {"device": f"{jax.device_count()} x {d.device_kind} ({d.platform})", "quick": args.quick,
           "jax": jax.__version__, "conv_impls": list(convolutions.CONV_IMPLS[1:]),
           "default_matmul_precision": str(jax.config.jax_default_matmul_precision)}
    for section in (chain_steps, table4, main_job, sweep_modes):
        _log(f"{section.__name__} ...")
        out.update(section(plan))
    out["total_s"] = time.perf_counter() - t0
    print(json.dumps(out, sort_keys=True, default=float))
    return out


if __name__ == "__main__":
    main()
