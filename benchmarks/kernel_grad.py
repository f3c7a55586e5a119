"""Convolution kernel gradients: previous vs current formulation, per layer and per chain step.

    python -m benchmarks.kernel_grad              # every decoder layer, 9 interleaved rounds
    python -m benchmarks.kernel_grad --rounds 15
    python -m benchmarks.kernel_grad --chain      # also the real train step's chain, old vs new

A Langevin step with the decoder gradient (paper eq. 8) computes, per transposed-conv
layer, ``D[i, j] = sum_{n,u,v} a[n, s u + i, s v + j]^T g[n, u, v]`` (``a`` the padded
output cotangent, ``g`` the layer input; ``lpc_jax.layers._kernel_grad``). "old" is
``_previous`` below, the formulation the layers used before, copied verbatim: one
matmul per kernel tap over a strided slice of ``a`` (from 16 channels of ``a``),
otherwise one convolution with the batch as the contracted feature axis. "new" is
``layers._kernel_grad``: one matmul of ``a`` space-to-depth'ed against the shifts of
``g`` (per-tap matmuls kept for small maps).

Per layer: the kernel gradient of each decoder layer of the 28x28x1 and 64x64x3 models
(batch 64, shapes as in the chain), ``--steps`` calls inside a rolled ``lax.scan`` (the
chain's loop), ms per call. ``--chain``: ``benchmarks.chain``'s real train step traced
with each formulation, the marginal ms per chain step. Programs are compiled ahead of
time and timed in interleaved rounds (the machine may be shared); each figure is the
median over rounds.

Printed: rows, the ratio new / old, then as the LAST line one JSON object:
``{layer}_old_ms``, ``{layer}_new_ms``, ``{layer}_ratio``, the per-shape sums
``decoder_{shape}_{old,new}_ms`` and ``decoder_{shape}_ratio``, with ``--chain``
``chain_step_ms_{old,new}_{shape}`` and ``chain_step_ratio_{shape}``, and ``device``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks import chain as bc
from lpc_jax import layers, models

Array = jax.Array

# --- the previous formulation, verbatim (lpc_jax/layers.py before this change), but for its
# per-tap branch, which the module still has as ``_kernel_grad_per_tap`` ---

_TAP_MATMUL_MIN_CHANNELS = 16


def _previous(a: Array, g: Array, s: int, k: int) -> Array:
    n, ha, wa, ca = a.shape
    _, u, v, cg = g.shape
    if ca >= _TAP_MATMUL_MIN_CHANNELS:
        return layers._kernel_grad_per_tap(a, g, s, k)
    kk = -(-k // s)
    hs, ws = u - 1 + kk, v - 1 + kk
    a = layers._pad_hw(a, (0, s * hs - ha), (0, s * ws - wa))
    lhs = a.reshape(n, hs, s, ws, s, ca).transpose(5, 2, 4, 1, 3, 0).reshape(ca * s * s, hs, ws, n)
    out = layers._conv(lhs, g.transpose(1, 2, 0, 3))  # (ca * s * s, kk, kk, cg)
    out = out.reshape(ca, s, s, kk, kk, cg).transpose(3, 1, 4, 2, 0, 5).reshape(kk * s, kk * s, ca, cg)
    return out[:k, :k]


# --- end of the previous formulation ---

FORMULATIONS = {"old": _previous, "new": layers._kernel_grad}


def decoder_kernel_grads(image_shape) -> list[tuple[str, tuple, tuple, int, int]]:
    """(name, a shape, g shape, stride, kernel) of every strided-conv kernel gradient of
    ``models.Decoder(image_shape)``'s backward pass at batch 64 (the 1x1-input first
    layer is a matmul and has none)."""
    out, h, c = [], 1, 256
    for i, (f, k, s, p) in enumerate(models._decoder_layers(image_shape)):
        h_out = (h - 1) * s + k - 2 * p
        if h > 1:  # a transposed conv's kernel gradient: a = cotangent padded by p, g = input
            out.append((f"{'x'.join(map(str, image_shape))}_layer{i + 1}", (64, h_out + p, h_out + p, f),
                        (64, h, h, c), s, k))
        h, c = h_out, f
    return out


def _scan_program(fn, a: Array, g: Array, s: int, k: int, steps: int):
    """``steps`` kernel gradients inside a rolled scan, each on a perturbed ``a`` (no hoisting)."""
    def body(c, _):
        d = fn(a + c, g, s, k)
        return c + 1e-9 * d[0, 0, 0, 0], None

    return jax.jit(lambda: lax.scan(body, jnp.float32(0), None, length=steps)[0]).lower().compile()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--steps", type=int, default=10, help="kernel gradients per rolled scan")
    p.add_argument("--chain", action="store_true",
                   help="also time the real train step's chain with each formulation (a few minutes)")
    args = p.parse_args(argv)
    out, rng = {}, np.random.default_rng(0)
    for image_shape in ((28, 28, 1), (64, 64, 3)):
        shape = "x".join(map(str, image_shape))
        totals = {name: 0.0 for name in FORMULATIONS}
        for layer, a_shape, g_shape, s, k in decoder_kernel_grads(image_shape):
            a = jnp.asarray(rng.standard_normal(a_shape), jnp.float32)
            g = jnp.asarray(rng.standard_normal(g_shape), jnp.float32)
            programs = {name: _scan_program(fn, a, g, s, k, args.steps) for name, fn in FORMULATIONS.items()}
            for fn in programs.values():
                jax.block_until_ready(fn())
            ms = {name: t / args.steps for name, t in bc._interleaved_ms(programs, args.rounds).items()}
            print(f"{layer}  a {a_shape} g {g_shape} s {s} k {k}: old {ms['old']:.3f} ms, new {ms['new']:.3f} ms,"
                  f" new / old {ms['new'] / ms['old']:.3f}")
            out.update({f"{layer}_old_ms": ms["old"], f"{layer}_new_ms": ms["new"],
                        f"{layer}_ratio": ms["new"] / ms["old"]})
            for name in totals:
                totals[name] += ms[name]
        print(f"decoder_{shape}  all kernel gradients: old {totals['old']:.3f} ms, new {totals['new']:.3f} ms,"
              f" new / old {totals['new'] / totals['old']:.3f}")
        out.update({f"decoder_{shape}_old_ms": totals["old"], f"decoder_{shape}_new_ms": totals["new"],
                    f"decoder_{shape}_ratio": totals["new"] / totals["old"]})
    if args.chain:
        for shape in ("28x28x1", "64x64x3"):
            marginal = bc.chain_step_ms_by_formulation(shape, {
                "old": functools.partial(bc.swapped, layers, "_kernel_grad", _previous),
                "new": contextlib.nullcontext}, max(3, args.rounds // 2))
            t_short, t_long = bc.CHAIN_T[shape]
            print(f"{shape}  real train step, marginal ms per chain step (T = {t_short} vs {t_long}):"
                  f" old {marginal['old']:.3f} ms, new {marginal['new']:.3f} ms,"
                  f" new / old {marginal['new'] / marginal['old']:.3f}")
            out.update({f"chain_step_ms_old_{shape}": marginal["old"], f"chain_step_ms_new_{shape}": marginal["new"],
                        f"chain_step_ratio_{shape}": marginal["new"] / marginal["old"]})
    out["device"] = str(jax.devices()[0].device_kind)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
