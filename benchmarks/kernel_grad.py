"""Convolution kernel gradients: previous vs current formulations, per decoder layer.

    python -m benchmarks.kernel_grad              # every decoder layer, 9 interleaved rounds
    python -m benchmarks.kernel_grad --rounds 15

A Langevin step with the decoder gradient (paper eq. 8) computes, per transposed-conv
layer, ``D[i, j] = sum_{n,u,v} a[n, s u + i, s v + j]^T g[n, u, v]`` (``a`` the padded
output cotangent, ``g`` the layer input; ``lpc_jax.model.layers._kernel_grad``). "old" is
``_previous`` below, the formulation the layers used before, copied verbatim: one
matmul per kernel tap over a strided slice of ``a`` (from 16 channels of ``a``),
otherwise one convolution with the batch as the contracted feature axis. "new" is
``layers._kernel_grad``: one matmul of ``a`` space-to-depth'ed against the shifts of
``g``, or of the shifts of space-to-depth'ed ``a`` against ``g`` where that copies
less (per-tap matmuls where the phase form's padding would add more than 1.3x).
"g_shift" is ``_g_shift`` below, the phase form as it first was: always shifting
``g``, per-tap matmuls from 1.5x padding.

Per layer: the kernel gradient of each decoder layer of the 28x28x1 and 64x64x3 models
(batch 64, shapes as in the chain), ``--steps`` calls inside a rolled ``lax.scan`` (the
chain's loop), ms per call; each formulation is a function passed in (``FORMULATIONS``).
The chain-step figures of the last change (``--chain``, which traced the train step with
the old formulations patched into ``layers``) are in ``benchmarks/RESULTS.md``; that option
is gone with the patching. Programs are compiled ahead of time and timed in interleaved rounds (the machine may be shared); each figure is the
median over rounds.

Printed: rows, the ratios new / old and new / g_shift, then as the LAST line one JSON
object: ``{layer}_{old,g_shift,new}_ms``, ``{layer}_ratio`` (new / old),
``{layer}_ratio_vs_g_shift``, the per-shape sums ``decoder_{shape}_{old,g_shift,new}_ms``
and ``decoder_{shape}_ratio``, ``decoder_{shape}_ratio_vs_g_shift``, with ``--chain``
``chain_step_ms_{old,before,new}_{shape}``, ``chain_step_ratio_{shape}`` (new / old) and
``chain_step_ratio_vs_before_{shape}``, and ``device``.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks import harness
from lpc_jax.model import layers, networks

Array = jax.Array

# --- the previous formulation, verbatim (lpc_jax/model/layers.py before this change), but for its
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

# --- the phase form as first written (lpc_jax/model/layers.py at 7a9c48f), always shifting g ---


def _g_shift(a: Array, g: Array, s: int, k: int) -> Array:
    n, ha, wa, ca = a.shape
    _, u, v, cg = g.shape
    kk = -(-k // s)
    hp, wp = u - 1 + kk, v - 1 + kk
    if hp * wp > 1.5 * u * v:  # its _PHASE_MAX_PAD_RATIO
        return layers._kernel_grad_per_tap(a, g, s, k)
    a = layers._pad_hw(a, (0, s * hp - ha), (0, s * wp - wa))
    a = a.reshape(n, hp, s, wp, s, ca).transpose(0, 1, 3, 2, 4, 5).reshape(n * hp * wp, s * s * ca)
    shifts = [layers._pad_hw(g, (d_h, hp - u - d_h), (d_w, wp - v - d_w)) for d_h in range(kk) for d_w in range(kk)]
    gs = jnp.concatenate(shifts, axis=-1).reshape(n * hp * wp, kk * kk * cg)
    d = lax.dot_general(a, gs, (((0,), (0,)), ((), ())))
    d = d.reshape(s, s, ca, kk, kk, cg).transpose(3, 0, 4, 1, 2, 5).reshape(kk * s, kk * s, ca, cg)
    return d[:k, :k]


# --- end ---

FORMULATIONS = {"old": _previous, "g_shift": _g_shift, "new": layers._kernel_grad}


def decoder_kernel_grads(image_shape) -> list[tuple[str, tuple, tuple, int, int]]:
    """(name, a shape, g shape, stride, kernel) of every strided-conv kernel gradient of
    ``networks.Decoder(image_shape)``'s backward pass at batch 64 (the 1x1-input first
    layer is a matmul and has none)."""
    out, h, c = [], 1, 256
    for i, (f, k, s, p) in enumerate(networks._decoder_layers(image_shape)):
        h_out = (h - 1) * s + k - 2 * p
        if h > 1:  # a transposed conv's kernel gradient: a = cotangent padded by p, g = input
            out.append((f"{'x'.join(map(str, image_shape))}_layer{i + 1}", (64, h_out + p, h_out + p, f),
                        (64, h, h, c), s, k))
        h, c = h_out, f
    return out


def _scan_program(fn, a: Array, g: Array, s: int, k: int, steps: int):
    """``steps`` kernel gradients inside a rolled scan, each on a perturbed ``a`` and ``g``: in
    the chain both change every step, and a constant operand's copies (e.g. the shifts of
    ``g``) would be hoisted out of the loop."""
    def body(c, _):
        d = fn(a + c, g + c, s, k)
        return c + 1e-9 * d[0, 0, 0, 0], None

    return jax.jit(lambda: lax.scan(body, jnp.float32(0), None, length=steps)[0]).lower().compile()


def _report(out: dict, name: str, what: str, ms: dict) -> None:
    print(f"{name}  {what}: " + ", ".join(f"{f} {ms[f]:.3f} ms" for f in FORMULATIONS)
          + f", new / old {ms['new'] / ms['old']:.3f}, new / g_shift {ms['new'] / ms['g_shift']:.3f}")
    out.update({f"{name}_{f}_ms": ms[f] for f in FORMULATIONS})
    out[f"{name}_ratio"] = ms["new"] / ms["old"]
    out[f"{name}_ratio_vs_g_shift"] = ms["new"] / ms["g_shift"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--steps", type=int, default=10, help="kernel gradients per rolled scan")
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
            ms = {name: t / args.steps for name, t in harness.interleaved_ms(programs, args.rounds).items()}
            _report(out, layer, f"a {a_shape} g {g_shape} s {s} k {k}", ms)
            for name in totals:
                totals[name] += ms[name]
        _report(out, f"decoder_{shape}", "all kernel gradients", totals)
    out["device"] = str(jax.devices()[0].device_kind)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
