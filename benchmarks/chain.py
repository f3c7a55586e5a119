"""Cost of the Langevin chain inside the jitted LPC train step (Fashion-MNIST shapes).

    python -m benchmarks.chain            # full: T = 300 timed 3x, K = 8 sweeps at T = 30
    python -m benchmarks.chain --quick    # < 5 min on the 2-core CPU: T = 300 timed once

Setting: 28x28x1 images, batch 64, latent 40, the paper's networks, discretised
Gaussian, Jeffreys warm start, preconditioning on (decay 0.99), Adam; a real
Fashion-MNIST batch when the IDX files are installed, else random 8-bit images.
Every program is compiled ahead of time (``jit(...).lower(...).compile()``), so
compile and run times are separate; run times are medians of repeated calls.

Printed: human-readable rows, then as the LAST line one JSON object:

* ``standalone_grad_ms``: one jitted grad of sum_b log p(x_b, z_b; theta) w.r.t. (theta, z).
* ``chain_step_ms``: marginal cost of one Langevin step inside the full train step,
  (t(T=300) - t(T=T_small)) / (300 - T_small).
* ``step_overhead_ratio``: ``chain_step_ms / standalone_grad_ms`` (1.0 = the rolled
  scan costs what the standalone VJP costs); ``step_overhead_ratio_T300_avg`` uses
  ``train_step_ms_T300 / 300`` instead (includes the encoder, the Adam update...).
* ``train_step_ms_T300``, ``compile_s_T300``: one full train step at T = 300.
* ``peak_mem_ratio_T1000_vs_T10``: compiled ``memory_analysis()``
  (argument + output + temp bytes) at T = 1000 over T = 10 (compile only).
* ``sweep_speedup_K8``: 8 sequential single-member steps / one K = 8 sweep step
  (``lpc_jax.sweep``, default mode), same T; also ``_vmap`` and ``_map`` variants.
* ``device``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lpc_jax import data, langevin, sweep
from lpc_jax import train_step as ts
from lpc_jax.config import Config

T_LONG = 300


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


def _mem_bytes(compiled) -> int | None:
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - getattr(m, "alias_size_in_bytes", 0))


def _batch(batch_size: int) -> tuple[jax.Array, str]:
    try:
        images = data.load("fashion_mnist", "train", "idx", None, batch_size).images
        return jnp.asarray(data.to_float(images[:batch_size])), "Fashion-MNIST train[:64]"
    except Exception:  # noqa: BLE001  (no dataset: shapes are what matter)
        x = jax.random.randint(jax.random.key(1), (batch_size, 28, 28, 1), 0, 256)
        return jnp.asarray(data.to_float(np.asarray(x, np.uint8))), "random 8-bit images"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (< 5 minutes on 2 CPU cores)")
    args = parser.parse_args(argv)
    quick = args.quick
    t_total = time.perf_counter()
    reps = 3 if quick else 7
    t_small = 10 if quick else 20
    t_sweep = 10 if quick else 30
    reps_long = 1 if quick else 3

    config = Config(dataset="fashion_mnist", batch_size=64, latent_dim=40, warm_start="jeffreys",
                    preconditioner=True, step_size=0.1, decay=0.99)
    model = ts.build_model(config)
    state = jax.jit(ts.create_train_state, static_argnums=(1, 2, 3))(jax.random.key(0), model, (28, 28, 1), 40)
    x, source = _batch(config.batch_size)
    key = jax.random.key(2)
    hp = langevin.hparams(config.step_size, config.decay, config.eps)
    device = jax.devices()[0]
    out: dict = {"device": f"{device.platform}:{device.device_kind} ({jax.device_count()} device(s), "
                           f"jax {jax.__version__})", "quick": quick}
    print(f"device: {out['device']}; data: {source}; batch 64, latent 40, Jeffreys, preconditioned")

    def row(name, value, unit=""):
        print(f"  {name:<44} {value:>10.3f} {unit}" if isinstance(value, float) else f"  {name:<44} {value} {unit}")

    # 1. standalone grad of sum log p w.r.t. (theta, z)
    z = jax.random.normal(jax.random.key(3), (config.batch_size, config.latent_dim))
    grad_fn = jax.grad(lambda th, z_: model.log_joint(th, x, z_).sum(), argnums=(0, 1))
    g, c_s = _compile(grad_fn, state.params["decoder"], z)
    g(state.params["decoder"], z)
    out["standalone_grad_ms"] = _median_ms(lambda: g(state.params["decoder"], z), 5 * reps)
    row("standalone grad (theta, z): compile", c_s, "s")
    row("standalone grad (theta, z)", out["standalone_grad_ms"], "ms")

    step_of = lambda T, c=config: functools.partial(
        ts.lpc_train_step, model=model, num_steps=T, warm_start=c.warm_start, precondition=c.preconditioner,
        prior_scale=c.prior_scale, prior_init_batches=c.prior_init_batches)

    # 2. full train step at small T and at T = 300
    small, c_small = _compile(step_of(t_small), state, x, key, hp)
    small(state, x, key, hp)
    ms_small = _median_ms(lambda: small(state, x, key, hp), reps)
    row(f"train step T={t_small}: compile", c_small, "s")
    row(f"train step T={t_small}", ms_small, "ms")
    long, out["compile_s_T300"] = _compile(step_of(T_LONG), state, x, key, hp)
    row(f"train step T={T_LONG}: compile", out["compile_s_T300"], "s")
    out["train_step_ms_T300"] = _median_ms(lambda: long(state, x, key, hp), reps_long)
    row(f"train step T={T_LONG} (median of {reps_long})", out["train_step_ms_T300"], "ms")
    out["chain_step_ms"] = (out["train_step_ms_T300"] - ms_small) / (T_LONG - t_small)
    out["step_overhead_ratio"] = out["chain_step_ms"] / out["standalone_grad_ms"]
    out["step_overhead_ratio_T300_avg"] = out["train_step_ms_T300"] / T_LONG / out["standalone_grad_ms"]
    out[f"train_step_ms_T{t_small}"] = ms_small
    row("chain step (marginal, per Langevin step)", out["chain_step_ms"], "ms")
    row("step_overhead_ratio (marginal / standalone)", out["step_overhead_ratio"])
    row("step_overhead_ratio_T300_avg", out["step_overhead_ratio_T300_avg"])

    # 3. memory: T = 1000 vs T = 10 (compile only)
    mem = {}
    for T in (10, 1000):
        compiled = small if T == t_small else _compile(step_of(T), state, x, key, hp)[0]
        mem[T] = _mem_bytes(compiled)
        row(f"compiled memory T={T} (arg+out+temp)", f"{mem[T] / 2**20:.1f}" if mem[T] else "n/a", "MiB")
    out["peak_mem_bytes_T10"], out["peak_mem_bytes_T1000"] = mem[10], mem[1000]
    out["peak_mem_ratio_T1000_vs_T10"] = mem[1000] / mem[10] if mem[10] and mem[1000] else None
    row("peak_mem_ratio_T1000_vs_T10", out["peak_mem_ratio_T1000_vs_T10"])

    # 4. K = 8 sweep vs 8 sequential single steps, same T. The machine is shared,
    # so each repetition times the 8 single calls right next to the sweep call.
    K = 8
    single = small if t_sweep == t_small else _compile(step_of(t_sweep), state, x, key, hp)[0]
    states = sweep.stack_trees([state] * K)
    keys = jax.random.split(key, K)
    hps = sweep.stack_hparams(list(np.geomspace(1e-3, 0.5, K)), [0.99] * K)
    sweep_cfg = dataclasses.replace(config, num_steps=t_sweep)
    seq_all = []
    for mode in sweep.SWEEP_MODES:
        fn, c_k = _compile(sweep.make_sweep_step(sweep_cfg, model, mode=mode), states, x, keys, hps)
        hlo = fn.as_text() or ""
        grouped = hlo.count("feature_group_count=") + hlo.count("batch_group_count=")
        fn(states, x, keys, hps)
        seq, swp = [], []
        for _ in range(reps):
            seq.append(_median_ms(lambda: [single(state, x, k, hp) for k in keys], 1))
            swp.append(_median_ms(lambda: fn(states, x, keys, hps), 1))
        seq_all += seq
        ms_seq, ms_k = statistics.median(seq), statistics.median(swp)
        out[f"sweep_K8_{mode}_ms"] = ms_k
        out[f"sweep_K8_{mode}_sequential_ms"] = ms_seq
        out[f"sweep_K8_{mode}_compile_s"] = c_k
        out[f"sweep_K8_{mode}_grouped_convs"] = grouped
        out[f"sweep_speedup_K8_{mode}"] = ms_seq / ms_k
        row(f"sweep K=8 {mode}: compile", c_k, "s")
        row(f"8 sequential single steps, T={t_sweep}", ms_seq, "ms")
        row(f"sweep K=8 {mode}, T={t_sweep} ({grouped} grouped convs)", ms_k, "ms")
        row(f"sweep_speedup_K8_{mode}", out[f"sweep_speedup_K8_{mode}"])
    out["sequential_K8_ms"] = statistics.median(seq_all)
    out["sweep_speedup_K8"] = out[f"sweep_speedup_K8_{sweep.DEFAULT_MODE}"]
    out["sweep_default_mode"] = sweep.DEFAULT_MODE
    out["sweep_T"] = t_sweep
    out["total_s"] = time.perf_counter() - t_total
    row("total benchmark time", out["total_s"], "s")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}))
    return out


if __name__ == "__main__":
    main()
