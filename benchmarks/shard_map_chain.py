"""Probe for the next chain speed-up on a multi-core CPU: the chain under ``shard_map``.

    python -m benchmarks.shard_map_chain                 # both shapes, 3 rounds
    python -m benchmarks.shard_map_chain --rounds 5

The launchers shard a single run's batch over one JAX device per core and let GSPMD
partition the train step (``distributed.data_parallel``). GSPMD then all-reduces the
decoder gradient inside the chain's while loop, once per chain step. This probe
times the chain alone (``train_step._run_chain``: Jeffreys' chain, preconditioned,
batch 64, T = 10 and 40, marginal ms per step) three ways, each in its own process:

* ``1device``: one JAX device, the whole CPU;
* ``gspmd``: one device per core, batch sharded, GSPMD (what the launchers run);
* ``shard_map``: one device per core, the chain inside ``jax.shard_map`` over the
  batch, each device accumulating its own decoder gradient, one ``psum`` after the
  loop.

The ``shard_map`` variant is a timing probe, not a usable chain: every shard draws
its noise from the same per-step key, so the shards' noise rows repeat (a real one
would draw each example's noise from its own key), and ``check_vma`` is off because
the likelihood's custom VJP does not type its outputs for manual axes.

Printed: one row per shape and variant, then as the LAST line one JSON object
``{variant}_ms_{shape}`` and ``shard_map_vs_gspmd_{shape}``, and ``devices``.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax

from benchmarks import chain as bc
from lpc_jax import distributed, langevin
from lpc_jax import train_step as ts

VARIANTS = ("1device", "gspmd", "shard_map")


def worker(shape: str, variant: str, rounds: int) -> dict:
    """In a process with the variant's device count: marginal ms per chain step."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    config, model, state, x, _ = bc._setup(bc.SHAPES[shape])
    mesh = distributed.mesh()
    hp = langevin.hparams(config.step_size, config.decay, config.eps)
    theta = jax.device_put(state.params["decoder"], NamedSharding(mesh, P()))
    x = jax.device_put(x, NamedSharding(mesh, P(distributed.AXIS)))
    z0 = jax.device_put(jax.random.normal(jax.random.key(5), (x.shape[0], config.latent_dim)),
                        NamedSharding(mesh, P(distributed.AXIS)))

    def chain(theta, x, z0, keys):
        c = ts._run_chain(ts.chain_log_joint(model, x), theta, z0, z0, hp, keys, precondition=True, selected=None)
        return c.state.z, c.grad_theta

    def shard_mapped(theta, x, z0, keys):
        def local(theta, x, z0, keys):
            z, g = chain(theta, x, z0, keys)
            return z, jax.lax.psum(g, distributed.AXIS)
        batch = P(distributed.AXIS)
        return jax.shard_map(local, mesh=mesh, in_specs=(P(), batch, batch, P()), out_specs=(batch, P()),
                             check_vma=False)(theta, x, z0, keys)

    fn = shard_mapped if variant == "shard_map" else chain
    programs = {}
    for num_steps in bc.CHAIN_T["64x64x3"]:  # T = 10 and 40 for both shapes
        keys = jax.random.split(jax.random.key(2), num_steps)
        compiled = jax.jit(fn).lower(theta, x, z0, keys).compile()
        programs[num_steps] = functools.partial(compiled, theta, x, z0, keys)
        jax.block_until_ready(programs[num_steps]())
    ms = bc._interleaved_ms(programs, rounds)
    t_short, t_long = bc.CHAIN_T["64x64x3"]
    return {"devices": jax.device_count(), "chain_step_ms": (ms[t_long] - ms[t_short]) / (t_long - t_short)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    cores = distributed.cpu_devices_for(0, 64)
    out = {"devices": cores}
    for shape in ("28x28x1", "64x64x3"):
        for variant in VARIANTS:
            n = 1 if variant == "1device" else cores
            result = bc._worker(f"worker({shape!r}, {variant!r}, {args.rounds})", {"JAX_NUM_CPU_DEVICES": str(n)},
                                f"{variant} chain on {n} CPU device(s)", module="shard_map_chain")
            out[f"{variant}_ms_{shape}"] = result["chain_step_ms"]
            print(f"{shape}  {variant:<9} ({n} device(s))  {result['chain_step_ms']:8.2f} ms per chain step")
        out[f"shard_map_vs_gspmd_{shape}"] = out[f"shard_map_ms_{shape}"] / out[f"gspmd_ms_{shape}"]
        print(f"{shape}  shard_map / gspmd {out[f'shard_map_vs_gspmd_{shape}']:.3f}")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
