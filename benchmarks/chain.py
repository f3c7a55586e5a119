"""Cost of the Langevin chain inside the jitted LPC train step.

    python -m benchmarks.chain            # full: T = 300 timed 3x, K = 8 sweeps at T = 30
    python -m benchmarks.chain --quick    # fewer repetitions: T = 300 timed once (~20 min, 2 loaded cores)
    python -m benchmarks.chain --table4   # only the paper's Table 4: seconds per SGD step
    python -m benchmarks.chain --devices  # only data-parallel steps/s on 1, 2, 4 forced CPU devices

Setting and timing: :mod:`benchmarks.harness` (batch 64, latent 40, the paper's networks,
Jeffreys, preconditioned; programs compiled ahead of time, compared in interleaved rounds).
``--table4`` and ``--devices`` run :mod:`benchmarks.scaling`.

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
import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness, scaling
from lpc_jax.model import chain
from lpc_jax.runtime import distributed
from lpc_jax.sampling import langevin
from lpc_jax.training import build, sweep

VARIANTS = {"float32": {}, "bf16": {"chain_dtype": "bfloat16"}, "k2": {"theta_grad_every": 2},
            "k5": {"theta_grad_every": 5}}


def _lpc_section(out: dict, quick: bool, reps: int) -> None:
    """Standalone grad, train step at T_small and T = 300, memory at T = 10 / 1000 (28x28x1)."""
    t_small, reps_long = (10, 1) if quick else (20, 3)
    config, model, state, x, source = harness.setup("fashion_mnist")
    key, hp = jax.random.key(2), langevin.hparams(config.step_size, config.decay, config.eps)
    print(f"28x28x1 data: {source}; batch 64, latent 40, Jeffreys, preconditioned")

    z = jax.random.normal(jax.random.key(3), (config.batch_size, config.latent_dim))
    grad_fn = jax.grad(lambda th, z_: model.log_joint(th, x, z_).sum(), argnums=(0, 1))
    g, c_s = harness.compile_ahead(grad_fn, state.params["decoder"], z)
    jax.block_until_ready(g(state.params["decoder"], z))  # warm-up, finished before timing
    out["standalone_grad_ms"] = harness.median_ms(lambda: g(state.params["decoder"], z), 5 * reps)
    harness.row("standalone grad (theta, z): compile", c_s, "s")
    harness.row("standalone grad (theta, z)", out["standalone_grad_ms"], "ms")

    small, c_small = harness.compile_ahead(build.make_train_step(dataclasses.replace(config, num_steps=t_small), model), state, x, key, hp)
    jax.block_until_ready(small(state, x, key, hp))
    ms_small = harness.median_ms(lambda: small(state, x, key, hp), reps)
    harness.row(f"train step T={t_small}: compile", c_small, "s")
    harness.row(f"train step T={t_small}", ms_small, "ms")
    long, out["compile_s_T300"] = harness.compile_ahead(build.make_train_step(dataclasses.replace(config, num_steps=harness.T_LONG), model), state, x, key, hp)
    harness.row(f"train step T={harness.T_LONG}: compile", out["compile_s_T300"], "s")
    out["train_step_ms_T300"] = harness.median_ms(lambda: long(state, x, key, hp), reps_long)
    harness.row(f"train step T={harness.T_LONG} (median of {reps_long})", out["train_step_ms_T300"], "ms")
    out["chain_step_ms"] = (out["train_step_ms_T300"] - ms_small) / (harness.T_LONG - t_small)
    out["step_overhead_ratio"] = out["chain_step_ms"] / out["standalone_grad_ms"]
    out["step_overhead_ratio_T300_avg"] = out["train_step_ms_T300"] / harness.T_LONG / out["standalone_grad_ms"]
    out[f"train_step_ms_T{t_small}"] = ms_small
    harness.row("chain step (marginal, per Langevin step)", out["chain_step_ms"], "ms")
    harness.row("step_overhead_ratio (marginal / standalone)", out["step_overhead_ratio"])
    harness.row("step_overhead_ratio_T300_avg", out["step_overhead_ratio_T300_avg"])

    mem = {}
    for T in (10, 1000):
        compiled = small if T == t_small else harness.compile_ahead(build.make_train_step(dataclasses.replace(config, num_steps=T), model), state, x, key, hp)[0]
        mem[T] = harness.memory_bytes(compiled)
        harness.row(f"compiled memory T={T} (arg+out+temp)", f"{mem[T] / 2**20:.1f}" if mem[T] else "n/a", "MiB")
    out["peak_mem_bytes_T10"], out["peak_mem_bytes_T1000"] = mem[10], mem[1000]
    out["peak_mem_ratio_T1000_vs_T10"] = mem[1000] / mem[10] if mem[10] and mem[1000] else None
    harness.row("peak_mem_ratio_T1000_vs_T10", out["peak_mem_ratio_T1000_vs_T10"])


def _sweep_section(out: dict, quick: bool, reps: int) -> None:
    """K = 8 sweep vs 8 sequential single steps, same T (28x28x1); each repetition times
    the 8 single calls right next to the sweep call."""
    t_sweep, K = (10 if quick else 30), 8
    config, model, state, x, _ = harness.setup("fashion_mnist", num_steps=10 if quick else 30)
    key, hp = jax.random.key(2), langevin.hparams(config.step_size, config.decay, config.eps)
    single = harness.compile_ahead(build.make_train_step(config, model), state, x, key, hp)[0]
    states = sweep.stack_trees([state] * K)
    keys = jax.random.split(key, K)
    hps = langevin.stack_hparams(list(np.geomspace(1e-3, 0.5, K)), [0.99] * K)
    seq_all = []
    for mode in sweep.SWEEP_MODES:
        fn, c_k = harness.compile_ahead(sweep.make_sweep_step(config, model, mode=mode), states, x, keys, hps)
        hlo = fn.as_text() or ""
        grouped = hlo.count("feature_group_count=") + hlo.count("batch_group_count=")
        jax.block_until_ready(fn(states, x, keys, hps))
        seq, swp = [], []
        for _ in range(reps):
            seq.append(harness.median_ms(lambda: [single(state, x, k, hp) for k in keys], 1))
            swp.append(harness.median_ms(lambda: fn(states, x, keys, hps), 1))
        seq_all += seq
        ms_seq, ms_k = statistics.median(seq), statistics.median(swp)
        out.update({f"sweep_K8_{mode}_ms": ms_k, f"sweep_K8_{mode}_sequential_ms": ms_seq,
                    f"sweep_K8_{mode}_compile_s": c_k, f"sweep_K8_{mode}_grouped_convs": grouped,
                    f"sweep_speedup_K8_{mode}": ms_seq / ms_k})
        harness.row(f"sweep K=8 {mode}: compile", c_k, "s")
        harness.row(f"8 sequential single steps, T={t_sweep}", ms_seq, "ms")
        harness.row(f"sweep K=8 {mode}, T={t_sweep} ({grouped} grouped convs)", ms_k, "ms")
        harness.row(f"sweep_speedup_K8_{mode}", out[f"sweep_speedup_K8_{mode}"])
    out["sequential_K8_ms"] = statistics.median(seq_all)
    out["sweep_speedup_K8_1device"] = out[f"sweep_speedup_K8_{sweep.resolve_mode(sweep.DEFAULT_MODE)}"]
    out["sweep_default_mode"] = f"{sweep.DEFAULT_MODE} ({sweep.resolve_mode(sweep.DEFAULT_MODE)} here)"
    out["sweep_T"] = t_sweep
    # experiments.sweep's default on a CPU: one JAX device per core, members spread over them.
    n = distributed.cpu_devices_for(0)
    result = harness.run_worker("chain", f"sweep_worker({t_sweep}, {reps})", {"JAX_NUM_CPU_DEVICES": str(n)},
                                f"sweep on {n} CPU devices")
    out.update({f"sweep_K8_cpu_devices_{k}": v for k, v in result.items()})
    # Against separate runs as a user starts them: one device, the whole CPU (this process).
    out["sweep_speedup_K8"] = out["sequential_K8_ms"] / result["sweep_ms"]
    harness.row(f"sweep K=8 map on {result['devices']} CPU devices (experiments.sweep default), T={t_sweep}",
         result["sweep_ms"], "ms")
    harness.row(f"8 sequential single steps on one of those devices, T={t_sweep}", result["sequential_ms"], "ms")
    harness.row("sweep_speedup_K8 (8 single steps on one whole-CPU device / that sweep step)", out["sweep_speedup_K8"])


def sweep_worker(num_steps: int, reps: int) -> dict:
    """In a process with N CPU devices: K = 8 sweep step spread over them (``member_parallel``,
    map) against 8 sequential single steps on one device, same T (28x28x1)."""
    K = 8
    config, model, state, x, _ = harness.setup("fashion_mnist", num_steps=num_steps)
    key, hp = jax.random.key(2), langevin.hparams(config.step_size, config.decay, config.eps)
    single = harness.compile_ahead(build.make_train_step(config, model), state, x, key, hp)[0]
    placement = distributed.member_parallel(K)
    keys = jax.random.split(key, K)
    args = [placement.put_state(a) for a in (sweep.stack_trees([state] * K), keys,
                                              langevin.stack_hparams(list(np.geomspace(1e-3, 0.5, K)), [0.99] * K))]
    fn = harness.compile_ahead(sweep.make_sweep_step(config, model, mode="map", mesh=placement.state.mesh),
                  args[0], x, *args[1:])[0]
    seq, swp = [], []
    for _ in range(reps):
        seq.append(harness.median_ms(lambda: [single(state, x, k, hp) for k in keys], 1))
        swp.append(harness.median_ms(lambda: fn(args[0], x, *args[1:]), 1))
    ms_seq, ms_k = statistics.median(seq), statistics.median(swp)
    return {"devices": jax.device_count(), "members_per_device": K // len(placement.state.device_set),
            "sweep_ms": ms_k, "sequential_ms": ms_seq, "speedup": ms_seq / ms_k}


def data_parallel_worker(shape: str, reps: int) -> dict:
    """In a process with N CPU devices: the marginal ms per chain step of the real train step
    as the launchers run it there, the batch sharded over the N devices (``train.make_group``'s
    ``distributed.data_parallel`` placement), T = ``harness.CHAIN_T[shape]``: ``chain_step_ms``
    with the step given the mesh (the chain under ``shard_map``: the library),
    ``chain_step_ms_gspmd`` without it (the same sharded inputs, the chain partitioned by XLA,
    which all-reduces grad_theta on every chain step, as before ``shard_map``), in the same rounds."""
    placement = distributed.data_parallel(64)  # the harness batch
    ms = harness.chain_step_ms(shape, {
        "shard_map": build.make_train_step,
        "gspmd": lambda config, model, mesh: build.make_train_step(config, model, None)}, reps, placement=placement)
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
    joint = harness.compile_ahead(lambda k, s, th: kernel(k, s, hp, th), key, lstate, theta)[0]
    zonly = harness.compile_ahead(lambda k, s: z_kernel(k, s, hp), key, lstate)[0]
    return harness.flops(joint) / 1e9, harness.flops(zonly) / 1e9


def _variants_section(out: dict, shape: str, reps: int) -> None:
    """Marginal ms per chain step of the real train step, float32 / bf16 / k = 2 / k = 5."""
    config, model, state, x, source = harness.setup(harness.SHAPES[shape])
    hp = langevin.hparams(config.step_size, config.decay, config.eps)
    t_short, t_long = harness.CHAIN_T[shape]
    print(f"{shape} ({source}): real train step at T={t_short} and T={t_long}, variants in the same rounds")
    marginal = harness.chain_step_ms(shape, {name: harness.with_config(**overrides)
                                             for name, overrides in VARIANTS.items()}, reps)
    for name in VARIANTS:
        ms_short, ms_long = marginal.ms[name, t_short], marginal.ms[name, t_long]
        harness.row(f"{shape} {name}: T={t_short} / T={t_long}", f"{ms_short:.1f} / {ms_long:.1f}", "ms")
        harness.row(f"{shape} {name}: chain step (marginal)", marginal[name], "ms")
    out[f"chain_T_{shape}"] = [t_short, t_long]
    out[f"chain_step_ms_1device_{shape}"] = out[f"chain_step_ms_{shape}"] = marginal["float32"]
    # The launchers' default on a CPU: one JAX device per core, the batch sharded over them.
    n = distributed.cpu_devices_for(0, config.batch_size)
    if n > 1:
        result = harness.run_worker("chain", f"data_parallel_worker({shape!r}, {reps})",
                                    {"JAX_NUM_CPU_DEVICES": str(n)}, f"data-parallel chain on {n} CPU devices")
        out[f"chain_step_ms_{shape}"] = result["chain_step_ms"]
        out[f"chain_step_speedup_cpu_devices_{shape}"] = marginal["float32"] / result["chain_step_ms"]
        out[f"chain_step_ms_gspmd_{shape}"] = result["chain_step_ms_gspmd"]
        out[f"chain_step_ratio_shard_map_vs_gspmd_{shape}"] = result["chain_step_ms"] / result["chain_step_ms_gspmd"]
        harness.row(f"{shape} float32 on {n} CPU devices, batch sharded (the launchers' default)", result["chain_step_ms"],
             "ms")
        harness.row(f"{shape} the same, chain partitioned by XLA (before shard_map)", result["chain_step_ms_gspmd"], "ms")
        for key in (f"chain_step_ratio_shard_map_vs_gspmd_{shape}", f"chain_step_speedup_cpu_devices_{shape}"):
            harness.row(key, out[key])
    for name in VARIANTS:
        out[f"chain_step_ms_{name}_{shape}"] = marginal[name]
        if name != "float32":
            out[f"chain_step_ratio_{name}_{shape}"] = marginal[name] / marginal["float32"]
            harness.row(f"chain_step_ratio_{name}_{shape}", out[f"chain_step_ratio_{name}_{shape}"])
    joint, zonly = _chain_step_gflop(model, state, x, hp)
    out[f"chain_step_gflop_{shape}"], out[f"chain_step_gflop_zonly_{shape}"] = joint, zonly
    out[f"chain_gflops_{shape}"] = joint / (out[f"chain_step_ms_{shape}"] / 1e3)
    harness.row(f"{shape}: GFLOP per chain step (joint / z-only)", f"{joint:.3f} / {zonly:.3f}")
    harness.row(f"chain_gflops_{shape}", out[f"chain_gflops_{shape}"], "GFLOP/s")


def _cond_vs_scans(out: dict, reps: int, k: int = 5, num_steps: int = 40) -> None:
    """theta_grad_every = k on the chain alone (28x28x1): one scan with lax.cond vs nested scans."""
    config, model, state, x, _ = harness.setup("fashion_mnist")
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
        fn = harness.compile_ahead(program, z0, keys)[0]
        jax.block_until_ready(fn(z0, keys))
        programs[name] = lambda fn=fn: fn(z0, keys)
    ms = harness.interleaved_ms(programs, max(reps, 7))  # under a second each: more rounds
    for name in chains:
        out[f"theta_grad_every_{k}_{name}_ms"] = ms[name] / num_steps
        harness.row(f"chain alone, T={num_steps}, k={k}: {name}, per step", ms[name] / num_steps, "ms")
    out[f"theta_grad_every_{k}_ideal_ms"] = (ms["joint"] + (k - 1) * ms["zonly"]) / k / num_steps
    harness.row(f"chain alone, k={k}: ideal (joint + {k - 1} z-only) / {k}", out[f"theta_grad_every_{k}_ideal_ms"], "ms")


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
        scaling.scaling(out, [int(n) for n in args.devices.split(",")], args.device_steps, args.device_reps)
    elif args.table4:
        scaling.table4(out, args.table4_reps)
    else:
        _lpc_section(out, args.quick, reps)
        _sweep_section(out, args.quick, reps)
        for shape in harness.SHAPES:  # 28x28x1 rounds are cheap: two more of them
            _variants_section(out, shape, reps + 2 if shape == "28x28x1" else reps)
        out["chain_gflops"] = out["chain_gflops_28x28x1"]
        _cond_vs_scans(out, reps)
    out["total_s"] = time.perf_counter() - t_total
    harness.row("total benchmark time", out["total_s"], "s")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}))
    return out


if __name__ == "__main__":
    main()
