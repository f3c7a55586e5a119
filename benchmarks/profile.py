"""Where a chain step's time goes: XLA:CPU's own per-op profile of the chain's kernel.

    python -m benchmarks.profile                      # both shapes, batch 32 (one core's share)
    python -m benchmarks.profile --shape 64x64x3 --batch 64 --top 20

Setting: ``benchmarks.harness``'s networks and batch (Jeffreys' log joint, discretised
Gaussian, latent 40), ``--batch`` rows; the default 32 is what each of the launchers'
two CPU devices runs on this 2-core machine (pin the process to one core, e.g.
``taskset -c 1``, to see one device's work). The program is the chain's own kernel
(``langevin.build_kernel(..., with_param_grad=True)``: one VJP of log p w.r.t. (theta,
z), the preconditioned update, the decoder gradient accumulated) in a rolled
``lax.scan`` of ``--steps`` steps, traced three times with ``jax.profiler`` and read back
with ``jax.profiler.ProfileData``. Each XLA op's time is summed over the calls and
divided by the steps run.

Printed per shape: the ops' total ms per step, the share of each kind of op, and the
``--top`` ops with their HLO shape. Kinds, from the HLO opcode and fusion: ``conv``
(convolutions, YNNPACK conv fusions), ``matmul`` (dots, the kernel gradients and the
dense layer), ``copies`` (pads, slices, concatenations, transposes, copies: layout
work), ``elementwise`` (the likelihood, activations, the Langevin update, the rest).
As the LAST line one JSON object: ``{shape}_ms_per_step``, ``{shape}_{kind}_ms`` and
``device``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import re
import tempfile

import jax
import jax.numpy as jnp

from benchmarks import harness
from lpc_jax.model import chain
from lpc_jax.sampling import langevin

KINDS = ("conv", "matmul", "copies", "elementwise")
_COPY_OPS = ("pad", "slice", "concatenate", "transpose", "copy", "bitcast")


def _kind(opcode: str, line: str, computations: dict[str, str]) -> str:
    """The kind of one HLO instruction, from its opcode, or for a fusion what it calls."""
    name = line.split(" = ", 1)[0].strip().lstrip("%")
    called = re.search(r"calls=%([\w.\-]+)", line)
    body = computations.get(called.group(1), "") if called else ""
    if opcode == "convolution" or " convolution(" in body:
        return "conv"
    if opcode == "dot" or " dot(" in body:
        return "matmul"
    words = [w for w in re.findall(r"[a-z]+", name.split(".")[0]) if w not in ("wrapped", "fusion")]
    if opcode in _COPY_OPS or (opcode == "fusion" and words and all(w in _COPY_OPS for w in words)):
        return "copies"
    return "elementwise"


def _instructions(hlo: str) -> dict[str, tuple[str, str, str]]:
    """{instruction name: (opcode, shape, line)} of a compiled HLO module's text."""
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%(\S+) = (\S+(?:\{[^}]*\})?) ([\w-]+)\(.*$", hlo, re.M):
        out[m.group(1)] = (m.group(3), m.group(2), m.group(0))
    return out


def _computations(hlo: str) -> dict[str, str]:
    """{computation name: its body text} of a compiled HLO module's text."""
    return dict(re.findall(r"^(?:ENTRY )?%(\S+) .*?\{\n(.*?)^\}", hlo, re.M | re.S))


def profile(shape: str, batch: int, steps: int) -> tuple[dict, float, dict, dict]:
    """{op: ms per chain step}, their total, each op's (opcode, shape, line), and the
    module's computations."""
    config, model, state, x, _ = harness.setup(harness.SHAPES[shape])
    x, theta = x[:batch], state.params["decoder"]
    hp = langevin.hparams(config.step_size, config.decay, config.eps)
    kernel = langevin.build_kernel(chain.chain_log_joint(model, x), precondition=True, with_param_grad=True)

    def run(theta, z):
        def step(carry, key):
            lstate, acc = carry
            lstate, _, g = kernel(key, lstate, hp, theta)
            return (lstate, jax.tree.map(jnp.add, acc, g)), None
        carry = (langevin.init(z), jax.tree.map(jnp.zeros_like, theta))
        return jax.lax.scan(step, carry, jax.random.split(jax.random.key(0), steps))[0]

    z = jax.random.normal(jax.random.key(5), (batch, config.latent_dim))
    compiled = jax.jit(run).lower(theta, z).compile()
    jax.block_until_ready(compiled(theta, z))
    calls = 3
    with tempfile.TemporaryDirectory() as logdir:
        with jax.profiler.trace(logdir):
            for _ in range(calls):
                jax.block_until_ready(compiled(theta, z))
        data = jax.profiler.ProfileData.from_file(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0])
    hlo = compiled.as_text()
    ops, computations = _instructions(hlo), _computations(hlo)
    ns = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in ops:
                    ns[event.name] += event.duration_ns
    ms = {name: t / 1e6 / calls / steps for name, t in ns.items()}
    return ms, sum(ms.values()), ops, computations


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=list(harness.SHAPES), action="append", help="default: both")
    p.add_argument("--batch", type=int, default=32, help="rows (32: one of two CPU devices' share)")
    p.add_argument("--steps", type=int, default=20, help="chain steps per traced call")
    p.add_argument("--top", type=int, default=12, help="ops to list per shape")
    args = p.parse_args(argv)
    out = {}
    for shape in args.shape or list(harness.SHAPES):
        ms, total, ops, computations = profile(shape, args.batch, args.steps)
        kind = {name: _kind(ops[name][0], ops[name][2], computations) for name in ms}
        kinds = collections.Counter()
        for name, t in ms.items():
            kinds[kind[name]] += t
        print(f"{shape}, batch {args.batch}: {total:.2f} ms per chain step in XLA ops; "
              + ", ".join(f"{k} {kinds[k]:.2f} ms ({kinds[k] / total:.0%})" for k in KINDS))
        for name, t in sorted(ms.items(), key=lambda kv: -kv[1])[: args.top]:
            opcode, hlo_shape, _ = ops[name]
            print(f"  {t:7.3f} ms  {kind[name]:<11} {opcode:<12} {hlo_shape:<28} {name}")
        out[f"{shape}_ms_per_step"] = total
        out.update({f"{shape}_{k}_ms": kinds[k] for k in KINDS})
    out["batch"], out["device"] = args.batch, str(jax.devices()[0].device_kind)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
