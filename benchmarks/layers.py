"""Custom-VJP conv layers vs plain flax layers: the decoder's (theta, z) gradient, standalone
and per step inside a rolled ``lax.scan`` (the Langevin chain's shape of computation).

    python -m benchmarks.layers                 # 28x28x1 decoder, batch 64, 10 scan steps
    python -m benchmarks.layers --steps 20 --rounds 5

Setting: ``networks.Decoder((28, 28, 1))``, batch 64, latent 40, discretised Gaussian
(``networks.make_log_joint``). For each layer implementation, passed to the decoder as its ``conv_impl``
("reference": ``xla``, XLA's own convolutions with autodiff's backward pass, the layers
GPU and TPU runs use; "custom": ``tuned``, ``lpc_jax.model.layers``' hand-written VJPs):

* ``standalone``: one jitted ``grad`` of sum_b log p(x_b, z_b; theta) w.r.t. (theta, z);
* ``scan``: ``lax.scan`` (rolled, ``unroll=1``) of ``--steps`` such gradients, the carry
  being z (moved by a small step along its gradient) and a theta-gradient accumulator;
  reported per step;
* with ``--vmap V``: also that scan under ``jax.vmap`` over V copies of (theta, z) (a
  hyperparameter sweep), per step and per member, and as a ``lax.map`` over the members.

Programs are compiled ahead of time; the implementations are timed in interleaved
rounds (the machine may be shared), each figure the median of all its calls. Printed:
rows, then as the LAST line one JSON object with the ms figures, ``*_ratio`` =
scan-per-step / standalone of the same implementation, and ``speedup_*`` =
reference / custom.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lpc_jax.model import networks

# name -> the networks' conv_impl (model/convolutions.py), passed to networks.Decoder
IMPLEMENTATIONS = {"reference": "xla", "custom": "tuned"}


def _programs(conv_impl: str, batch: int, latent: int, steps: int, vmap: int = 0, seed: int = 0):
    """Compiled programs (standalone grad, rolled scan[, vmapped / mapped scans]) and their
    arguments."""
    shape = (28, 28, 1)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(np.round(rng.integers(0, 256, (batch,) + shape)) / 127.5 - 1.0, jnp.float32)
    z = jnp.asarray(rng.normal(size=(batch, latent)), jnp.float32)
    decoder = networks.Decoder(shape, conv_impl=conv_impl)
    params = decoder.init(jax.random.key(seed), z)["params"]
    log_joint = networks.make_log_joint(decoder, "discretized_gaussian")

    def grad(params, z):
        return jax.grad(lambda p, z: log_joint(p, x, z).sum(), argnums=(0, 1))(params, z)

    def chain(params, z):
        def body(carry, _):
            z, acc = carry
            g_params, g_z = grad(params, z)
            return (z + 1e-4 * g_z, jax.tree.map(jnp.add, acc, g_params)), None

        init = (z, jax.tree.map(jnp.zeros_like, params))
        return jax.lax.scan(body, init, None, length=steps)[0]

    out = {}
    programs = [("standalone", grad, (params, z)), ("scan", chain, (params, z))]
    if vmap:
        stacked = jax.tree.map(lambda a: jnp.stack([a] * vmap), (params, z))
        programs += [("scan_vmap", jax.vmap(chain), stacked),
                     ("scan_map", lambda p, z: jax.lax.map(lambda pz: chain(*pz), (p, z)), stacked)]
    for name, fn, fn_args in programs:
        t0 = time.perf_counter()
        out[name] = (jax.jit(fn).lower(*fn_args).compile(), fn_args)
        out[name + "_compile_s"] = time.perf_counter() - t0
    return out


def _time_ms(fn, args, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(1e3 * (time.perf_counter() - t0))
    return times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--latent", type=int, default=40)
    parser.add_argument("--steps", type=int, default=10, help="rolled scan length")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--calls", type=int, default=5, help="calls per program per round")
    parser.add_argument("--vmap", type=int, default=0, help="also time the scan vmapped over this many members")
    args = parser.parse_args(argv)

    names = ("standalone", "scan") + (("scan_vmap", "scan_map") if args.vmap else ())
    progs = {}
    for impl, conv_impl in IMPLEMENTATIONS.items():
        progs[impl] = _programs(conv_impl, args.batch, args.latent, args.steps, args.vmap)
        for name in names:
            jax.block_until_ready(progs[impl][name][0](*progs[impl][name][1]))  # warm up

    times = {(impl, name): [] for impl in progs for name in names}
    for _ in range(args.rounds):
        for impl, compiled in progs.items():
            for name in names:
                fn, fn_args = compiled[name]
                if name == "standalone":
                    times[impl, name] += _time_ms(fn, fn_args, args.calls)
                else:  # per chain step (and per member for the vmapped / mapped scans)
                    per = args.steps * (args.vmap if name != "scan" else 1)
                    times[impl, name] += [t / per for t in _time_ms(fn, fn_args, max(1, args.calls // 2))]

    result = {"device": str(jax.devices()[0]), "batch": args.batch, "latent": args.latent,
              "scan_steps": args.steps}
    print(f"28x28x1 decoder, batch {args.batch}, latent {args.latent}, discretised Gaussian; "
          f"grad of sum log p w.r.t. (theta, z); rolled lax.scan of {args.steps} steps")
    print(f"{'layers':<10} {'standalone ms':>14} {'scan ms/step':>13} {'ratio':>6} "
          f"{'compile s (standalone / scan)':>30}")
    for impl, compiled in progs.items():
        standalone = statistics.median(times[impl, "standalone"])
        scan = statistics.median(times[impl, "scan"])
        result[f"{impl}_standalone_ms"] = round(standalone, 2)
        result[f"{impl}_scan_step_ms"] = round(scan, 2)
        result[f"{impl}_ratio"] = round(scan / standalone, 3)
        result[f"{impl}_compile_s"] = [round(compiled["standalone_compile_s"], 1), round(compiled["scan_compile_s"], 1)]
        print(f"{impl:<10} {standalone:14.1f} {scan:13.1f} {scan / standalone:6.2f} "
              f"{compiled['standalone_compile_s']:14.1f} / {compiled['scan_compile_s']:.1f}")
    result["speedup_standalone"] = round(result["reference_standalone_ms"] / result["custom_standalone_ms"], 2)
    result["speedup_scan_step"] = round(result["reference_scan_step_ms"] / result["custom_scan_step_ms"], 2)
    print(f"custom vs reference: standalone {result['speedup_standalone']:.2f}x faster, "
          f"scan step {result['speedup_scan_step']:.2f}x faster")
    if args.vmap:
        print(f"vmap / lax.map over {args.vmap} members, ms per chain step per member "
              f"(ratio to the unbatched scan step):")
        for impl in progs:
            for name in ("scan_vmap", "scan_map"):
                ms = statistics.median(times[impl, name])
                result[f"{impl}_{name}_step_member_ms"] = round(ms, 2)
                result[f"{impl}_{name}_ratio"] = round(ms / result[f"{impl}_scan_step_ms"], 3)
                print(f"  {impl:<10} {name:<10} {ms:8.1f} ({ms / result[f'{impl}_scan_step_ms']:.2f})")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
