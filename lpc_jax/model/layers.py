"""Convolution layers with Table 2's (features, kernel, stride, padding) arguments.

PyTorch padding semantics: ``Conv`` pads ``padding`` on each side;
``ConvTranspose`` produces ``(in - 1) * stride - 2 * padding + kernel`` outputs and
computes what ``flax.linen.ConvTranspose`` computes with explicit padding
``kernel - 1 - padding`` on each side (flax's convention: the kernel is not
flipped). Both are the same functions as the plain flax layers, kept below as
``ConvReference`` / ``ConvTransposeReference`` (tests, benchmarks); parameters are
``kernel`` (k, k, in, out) and ``bias`` (out,), float32, default precision, held
directly by the layer (the reference layers nest them one level deeper, in flax's
``Conv_0`` / ``ConvTranspose_0``).

Why the layers carry a hand-written VJP
---------------------------------------
Each Langevin chain step is one VJP of the decoder inside a rolled ``lax.scan``,
i.e. an XLA while loop. XLA:CPU runs a convolution fast only if it reaches the
backend as ``dim_labels=b01f_01io->b01f`` (NHWC x HWIO -> NHWC) with no window
reversal: those go to the Eigen / YNNPACK kernels. Any other convolution is
emitted as a naive loop nest (in the compiled HLO: a ``convolution`` carrying
``outer_dimension_partitions``), 10-50x slower. The convolutions autodiff writes
for a backward pass are of that other kind: the input gradient convolves with a
reversed, in/out-swapped kernel (``b01f_01oi->b01f``), the kernel gradient
contracts over the batch with the cotangent as an rhs-dilated, reversed "kernel"
(``f01b_i01o->01fb``, ``rhs_dilate=2x2 rhs_reversal=1x1``). In the entry
computation XLA:CPU rewrites some of them into fast calls (transpose/reverse
copies of the operands, YNNPACK fusions); inside a while body it does not, so the
plain layers' VJP cost 3x more per step in the rolled scan than standalone.
Second trap: XLA's simplifier swaps a convolution's operands when the kernel is
spatially larger than the input (a 4x4 kernel over a 3x3 map, the cotangent used
as the kernel of a kernel gradient), which adds a window reversal and lands on
the slow path everywhere.

The custom VJPs below are built only from canonical, undilated, unreversed forward
convolutions (plus pads, static slices, reshapes, transposes, matmuls, all fast
in loops), with the large operand always the convolution's lhs:

* a transposed conv (the forward pass, and a conv's input gradient) in sub-pixel
  form: output phase (r_h, r_w) of a stride-s transposed conv is a stride-1 conv
  of the input with the sub-kernel ``w[i0_h::s, i0_w::s]``; one conv per phase
  (no wasted multiply-adds), or, when ``s * s * out <= 16`` (e.g. the 1-channel
  output layer), one conv with ``s * s * out`` channels over the union window;
  a depth-to-space reshape interleaves the phases;
* a transposed conv's input gradient is the plain strided conv of the cotangent
  with the flipped, in/out-swapped kernel (PyTorch's Conv2d / ConvTranspose2d
  duality); over few channels (an RGB cotangent) a strided conv is slow on XLA:CPU,
  so it is run as a stride-1 conv of the space-to-depth'ed input;
* a kernel gradient is one matmul contracting (batch x output pixels): the larger
  operand (input for Conv, cotangent for ConvTranspose) space-to-depth'ed by the
  stride, so every tap is an undilated shift, against the zero-padded shifts of the
  other operand side by side; on small maps, where that padding would cost more
  than the copies it saves, one matmul per kernel tap;
* a transposed conv on a 1x1 input and a conv with a 1x1 output are matmuls
  (plain autodiff).

Under ``jax.vmap`` with per-member weights (a hyperparameter sweep) JAX would
batch these convolutions into grouped convolutions (``feature_group_count``),
which XLA:CPU runs at about half the speed of separate ones; on CPU the building
blocks therefore carry ``custom_vmap`` rules: shared weights fold the vmapped axis
into the batch, per-member weights loop (``lax.map``) over the members. Other
platforms keep JAX's default rule (``lax.platform_dependent``: the platform the
program is lowered for decides). Which platforms use these layers at all:
:mod:`lpc_jax.model.convolutions`.

Timings (plain flax layers against these, standalone and inside a rolled scan)
are in ``benchmarks/RESULTS.md``; ``python -m benchmarks.layers`` measures them.

Outputs and gradients equal the plain flax layers' to float32 rounding, also
under jit, vmap and a rolled scan (tests/model/test_layers.py, which also checks the
compiled scan body for non-canonical convolutions).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

_DN = ("NHWC", "HWIO", "NHWC")
_SUBPIXEL_MAX_CHANNELS = 16  # one combined conv when s * s * out <= this, else one conv per phase
_PHASE_MAX_PAD_RATIO = 1.3  # kernel gradient in phase form unless its padding adds more than this


# --------------------------------------------------------------------------- helpers


def _conv(x: Array, w: Array, stride: int = 1, padding=((0, 0), (0, 0))) -> Array:
    """The canonical XLA:CPU-friendly convolution: NHWC x HWIO -> NHWC, no dilation."""
    return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=_DN)


def _conv_padded(x: Array, w: Array, h: tuple[int, int], wd: tuple[int, int]) -> Array:
    """Stride-1 ``_conv`` with (lo, hi) zero padding per spatial axis; negative values crop."""
    crop = _pad_hw(x, (min(h[0], 0), min(h[1], 0)), (min(wd[0], 0), min(wd[1], 0)))
    return _conv(crop, w, 1, ((max(h[0], 0), max(h[1], 0)), (max(wd[0], 0), max(wd[1], 0))))


def _strided_conv(x: Array, w: Array, s: int, p: int) -> Array:
    """``_conv(x, w, s, ((p, p), (p, p)))``; for a thin input (``s * s * C_in <=
    _SUBPIXEL_MAX_CHANNELS``, e.g. an RGB image's cotangent) a stride-1 conv of ``x``
    space-to-depth'ed by ``s``, with the kernel split into its ``ceil(k / s)^2`` phase
    blocks (zero taps where ``k`` is not a multiple of ``s``): the same multiply-adds,
    which XLA:CPU runs several times faster than a strided conv over few channels."""
    _, h, wd, ci = x.shape
    k, co = w.shape[0], w.shape[3]
    if s == 1 or s * s * ci > _SUBPIXEL_MAX_CHANNELS:
        return _conv(x, w, s, ((p, p), (p, p)))
    kk = -(-k // s)
    ho, wo = (h + 2 * p - k) // s + 1, (wd + 2 * p - k) // s + 1
    x = _space_to_depth(x, s, p, ho - 1 + kk, wo - 1 + kk)  # the rows and columns the outputs read
    w = jnp.pad(w, ((0, kk * s - k), (0, kk * s - k), (0, 0), (0, 0)))
    w = w.reshape(kk, s, kk, s, ci, co).transpose(0, 2, 1, 3, 4, 5).reshape(kk, kk, s * s * ci, co)
    return _conv(x, w)


def _space_to_depth(x: Array, s: int, lo: int, hp: int, wp: int) -> Array:
    """(N, H, W, C) -> (N, hp, wp, s s C), channels ordered (r_h, r_w, C): entry
    [n, i, j, (r_h, r_w, c)] is ``x[n, s i + r_h - lo, s j + r_w - lo, c]``, zero outside
    ``x`` (padded by ``lo`` before, padded or cropped to s hp x s wp after)."""
    n, h, w, c = x.shape
    x = _pad_hw(x, (lo, s * hp - h - lo), (lo, s * wp - w - lo))
    return x.reshape(n, hp, s, wp, s, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, hp, wp, s * s * c)


def _pad_hw(x: Array, h: tuple[int, int], w: tuple[int, int]) -> Array:
    """Zero-pads (negative: crops) the two spatial axes of an NHWC array."""
    return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (h[0], h[1], 0), (w[0], w[1], 0), (0, 0, 0)))


def _flip_swap(w: Array) -> Array:
    """(k, k, a, b) -> spatially flipped (k, k, b, a)."""
    return jnp.flip(w, (0, 1)).swapaxes(2, 3)


def _phases(n: int, k: int, s: int, p: int, extra: int = 0):
    """Sub-pixel decomposition of one spatial axis of a stride-s transposed conv.

    ``extra`` is PyTorch's ``output_padding`` (rows added at the end).
    Returns ``(out, a, taps)``: the output length, the number ``a = ceil(out / s)`` of
    positions per phase, and for each phase r a pair ``(d, idx)`` such that
    ``y[s * j + r] = sum_t x[j + d + t] * w[idx[t]]`` (flax's unflipped kernel).
    """
    q = k - 1 - p
    out = (n - 1) * s + k - 2 * p + extra
    taps = []
    for r in range(s):
        i0 = (q - r) % s
        taps.append(((r - q + i0) // s, tuple(range(i0, k, s))))
    return out, -(-out // s), taps


def _conv_transpose(x: Array, w: Array, s: int, p: int, extra: tuple[int, int] = (0, 0)) -> Array:
    """Transposed conv, flax's unflipped-kernel convention, PyTorch padding and
    ``output_padding=extra``, built from canonical convs only."""
    b, h, wd, _ = x.shape
    k, co = w.shape[0], w.shape[3]
    ho, ah, ph = _phases(h, k, s, p, extra[0])
    wo, aw, pw = _phases(wd, k, s, p, extra[1])

    def window(a, n, d, taps):  # (lo, hi) padding of x for outputs j in [0, a) reading x[j + d + t]
        return -d, a - 1 + d + len(taps) - 1 - (n - 1)

    if s == 1:
        return _conv_padded(x, w, window(ah, h, *ph[0]), window(aw, wd, *pw[0]))

    if s * s * co <= _SUBPIXEL_MAX_CHANNELS:
        # One conv over the union window with s*s*co output channels (zero taps where a
        # phase does not reach), then depth-to-space.
        def table(taps):
            lo = min(d for d, _ in taps)
            t = np.full((max(d + len(i) for d, i in taps) - lo, s), k, dtype=np.int32)  # k: zero
            for r, (d, idx) in enumerate(taps):
                t[d - lo: d - lo + len(idx), r] = idx
            return lo, t

        (dh, th), (dw, tw) = table(ph), table(pw)
        wz = jnp.pad(w, ((0, 1), (0, 1), (0, 0), (0, 0)))
        wc = wz[th][:, :, tw]  # (Kh, s, Kw, s, ci, co)
        wc = wc.transpose(0, 2, 4, 1, 3, 5).reshape(th.shape[0], tw.shape[0], w.shape[2], s * s * co)
        y = _conv_padded(x, wc, window(ah, h, dh, th), window(aw, wd, dw, tw)).reshape(b, ah, aw, s, s, co)
    else:
        rows = []
        for d_h, i_h in ph:
            cols = []
            for d_w, i_w in pw:
                if not i_h or not i_w:  # stride > kernel: this phase receives nothing
                    cols.append(jnp.zeros((b, ah, aw, co), x.dtype))
                    continue
                sub_kernel = w[i_h[0]::s, i_w[0]::s]
                cols.append(_conv_padded(x, sub_kernel, window(ah, h, d_h, i_h), window(aw, wd, d_w, i_w)))
            rows.append(jnp.stack(cols, axis=3))  # (b, ah, aw, s_w, co)
        y = jnp.stack(rows, axis=3)  # (b, ah, aw, s_h, s_w, co)
    y = y.transpose(0, 1, 3, 2, 4, 5).reshape(b, ah * s, aw * s, co)
    return y[:, :ho, :wo]


def _kernel_grad_per_tap(a: Array, g: Array, s: int, k: int) -> Array:
    """``_kernel_grad`` as one matmul per tap (i, j): the strided slice of ``a`` as
    (N U V, C_a) against ``g`` as (N U V, C_g), contracting the long axis."""
    n, ha, wa, ca = a.shape
    _, u, v, cg = g.shape
    a = _pad_hw(a, (0, max(0, s * (u - 1) + k - ha)), (0, max(0, s * (v - 1) + k - wa)))
    g2 = g.reshape(n * u * v, cg)
    taps = [lax.slice(a, (0, i, j, 0), (n, i + s * (u - 1) + 1, j + s * (v - 1) + 1, ca), (1, s, s, 1))
            for i in range(k) for j in range(k)]
    dots = [lax.dot_general(t.reshape(n * u * v, ca), g2, (((0,), (0,)), ((), ()))) for t in taps]
    return jnp.stack(dots).reshape(k, k, ca, cg)


def _kernel_grad(a: Array, g: Array, s: int, k: int) -> Array:
    """``D[i, j] = sum_{n, u, v} a[n, s*u + i, s*v + j, :]^T g[n, u, v, :]`` for i, j < k.

    Phase form (one matmul): write the tap as (i, j) = (s*d_h + r_h, s*d_w + r_w) with
    d < kk = ceil(k / s), r < s. Then ``D[i, j] = sum_{n, p, q} a_r[n, p, q]^T
    g[n, p - d_h, q - d_w]`` with ``a_r = a[:, r_h::s, r_w::s]`` and ``g`` zero outside
    its (U, V) window, so ``a`` space-to-depth'ed to (N P Q, s s C_a) against the kk^2
    zero-padded shifts of ``g`` side by side, (N P Q, kk kk C_g), is the whole
    gradient, (P, Q) = (U + kk - 1, V + kk - 1). Equally, ``D[i, j] = sum_{n, u, v}
    a_r[n, u + d_h, v + d_w]^T g[n, u, v]``: the kk^2 shifts (slices) of the
    space-to-depth'ed ``a`` side by side, (N U V, kk kk s s C_a), against ``g`` as it
    is, (N U V, C_g); that form is taken when ``a`` has fewer channels after
    space-to-depth than ``g`` (e.g. an RGB output layer's cotangent). Copying less is
    not enough: with 32 channels on both sides, XLA:CPU's matmul ran slower with ``g``
    unshifted although the shifts of ``a`` were the smaller copy. Either form copies
    ``a`` once, where one matmul per tap copies a strided slice of ``a`` per tap (k^2
    copies, most of that path's time on XLA:CPU), but multiplies the (P Q) / (U V)
    padding: on small maps, where that exceeds ``_PHASE_MAX_PAD_RATIO``,
    ``_kernel_grad_per_tap``.
    Returns (k, k, C_a, C_g).
    """
    n, _, _, ca = a.shape
    _, u, v, cg = g.shape
    kk = -(-k // s)
    hp, wp = u - 1 + kk, v - 1 + kk
    if hp * wp > _PHASE_MAX_PAD_RATIO * u * v:
        return _kernel_grad_per_tap(a, g, s, k)
    a = _space_to_depth(a, s, 0, hp, wp)  # cropped: rows no tap reaches
    taps = [(d_h, d_w) for d_h in range(kk) for d_w in range(kk)]
    if s * s * ca < cg:  # shift a: (d_h, d_w, r_h, r_w, C_a) x C_g
        shifts = [lax.slice(a, (0, d_h, d_w, 0), (n, d_h + u, d_w + v, s * s * ca)) for d_h, d_w in taps]
        a_shifted = jnp.concatenate(shifts, axis=-1).reshape(n * u * v, kk * kk * s * s * ca)
        d = lax.dot_general(a_shifted, g.reshape(n * u * v, cg), (((0,), (0,)), ((), ())))
        d = d.reshape(kk, kk, s, s, ca, cg).transpose(0, 2, 1, 3, 4, 5)
    else:  # shift g: (r_h, r_w, C_a) x (d_h, d_w, C_g)
        shifts = [_pad_hw(g, (d_h, hp - u - d_h), (d_w, wp - v - d_w)) for d_h, d_w in taps]
        gs = jnp.concatenate(shifts, axis=-1).reshape(n * hp * wp, kk * kk * cg)
        d = lax.dot_general(a.reshape(n * hp * wp, s * s * ca), gs, (((0,), (0,)), ((), ())))
        d = d.reshape(s, s, ca, kk, kk, cg).transpose(3, 0, 4, 1, 2, 5)
    return d.reshape(kk * s, kk * s, ca, cg)[:k, :k]


# --------------------------------------------------------------------------- vmap rules


def _fold_or_loop(fn, fold_ok: bool):
    """``fn(x, w)`` with a vmap rule that avoids grouped convolutions on XLA:CPU.

    Batched ``x`` with shared ``w`` (and ``fold_ok``): the vmapped axis is folded into
    the batch, one bigger conv. Otherwise (per-member weights, as in a hyperparameter
    sweep; the kernel gradient): on CPU a ``lax.map`` over the members, each step a
    canonical conv; JAX's default rule would emit one grouped conv
    (``feature_group_count``), which XLA:CPU runs at about half the speed of the
    separate convs. Other platforms keep the default rule; the choice is
    ``lax.platform_dependent``, i.e. made for the platform the program is lowered for.
    """
    f = jax.custom_batching.custom_vmap(fn)

    @f.def_vmap
    def rule(axis_size, in_batched, x, w):
        xb, wb = in_batched
        if fold_ok and xb and not wb:
            y = f(x.reshape((-1,) + x.shape[2:]), w)
            return y.reshape((axis_size, -1) + y.shape[1:]), True
        in_axes = (0 if xb else None, 0 if wb else None)

        def looped(x, w):
            if not xb:
                return lax.map(lambda w: f(x, w), w)
            if not wb:
                return lax.map(lambda x: f(x, w), x)
            return lax.map(lambda xw: f(*xw), (x, w))

        # The platform the program is lowered for (not the host's default backend).
        return lax.platform_dependent(x, w, cpu=looped, default=jax.vmap(fn, in_axes=in_axes)), True

    return f


@functools.lru_cache(maxsize=None)
def _batched_ops(kind: str, *static):
    """The three building blocks, with their vmap rules, per static configuration."""
    if kind == "conv":
        s, p = static
        return _fold_or_loop(lambda x, w: _strided_conv(x, w, s, p), True)
    if kind == "conv_transpose":
        s, p, extra = static
        return _fold_or_loop(lambda x, w: _conv_transpose(x, w, s, p, extra), True)
    if kind == "kernel_grad":
        s, k = static
        return _fold_or_loop(lambda a, g: _kernel_grad(a, g, s, k), False)
    raise ValueError(kind)


# --------------------------------------------------------------------------- custom-VJP cores


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: Array, w: Array, stride: int, padding: int) -> Array:
    """PyTorch ``Conv2d`` (no bias): NHWC x (k, k, in, out), ``padding`` zeros each side."""
    return _batched_ops("conv", stride, padding)(x, w)


def _conv2d_fwd(x, w, stride, padding):
    return conv2d(x, w, stride, padding), (x, w)


def _conv2d_bwd(stride, padding, res, g):
    x, w = res
    s, p, k = stride, padding, w.shape[0]
    _, h, wd, _ = x.shape
    # PyTorch's output_padding: input rows past the last full stride step.
    extra = (h + 2 * p - k) % s, (wd + 2 * p - k) % s
    dx = _batched_ops("conv_transpose", s, p, extra)(g, _flip_swap(w))
    dw = _batched_ops("kernel_grad", s, k)(_pad_hw(x, (p, 0), (p, 0)), g)
    return dx, dw


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_transpose2d(x: Array, w: Array, stride: int, padding: int) -> Array:
    """flax ``ConvTranspose`` (no bias, kernel not flipped) with PyTorch ``padding``."""
    return _batched_ops("conv_transpose", stride, padding, (0, 0))(x, w)


def _conv_transpose2d_fwd(x, w, stride, padding):
    return conv_transpose2d(x, w, stride, padding), (x, w)


def _conv_transpose2d_bwd(stride, padding, res, g):
    x, w = res
    s, p, k = stride, padding, w.shape[0]
    dx = _batched_ops("conv", s, p)(g, _flip_swap(w))
    dw = _flip_swap(_batched_ops("kernel_grad", s, k)(_pad_hw(g, (p, 0), (p, 0)), x))
    return dx, dw


conv_transpose2d.defvjp(_conv_transpose2d_fwd, _conv_transpose2d_bwd)


def conv(x: Array, w: Array, stride: int, padding: int) -> Array:
    """``conv2d``, or a matmul when the output is 1x1."""
    k, p = w.shape[0], padding
    _, h, wd, ci = x.shape
    if (h + 2 * p - k) // stride == 0 and (wd + 2 * p - k) // stride == 0:
        xw = _pad_hw(x, (p, k - h - p), (p, k - wd - p))  # the single k x k window
        y = xw.reshape(x.shape[0], k * k * ci) @ w.reshape(k * k * ci, w.shape[3])
        return y[:, None, None, :]
    return conv2d(x, w, stride, padding)


def conv_transpose(x: Array, w: Array, stride: int, padding: int) -> Array:
    """``conv_transpose2d``, or a matmul when the input is 1x1."""
    k, p = w.shape[0], padding
    if x.shape[1] == 1 and x.shape[2] == 1:
        # y[o_h, o_w] = x @ w[k - 1 - p - o_h, k - 1 - p - o_w]
        wsel = jnp.flip(w, (0, 1))[p: k - p, p: k - p]
        return jnp.einsum("bc,hwco->bhwo", x[:, 0, 0, :], wsel)
    return conv_transpose2d(x, w, stride, padding)


def _add_bias(y: Array, b: Array) -> Array:
    return y + b.reshape((1,) * (y.ndim - 1) + b.shape)


# --------------------------------------------------------------------------- modules


class _Layer(nn.Module):
    """Table 2's ``(features, kernel, stride, padding)`` layer over the function ``_op``.

    Its parameters are ``kernel`` (k, k, in, features) and ``bias`` (features,); a
    subclass changes how the kernel is applied by overriding :meth:`apply_kernel`.
    """

    features: int
    kernel: int = 4
    stride: int = 2
    padding: int = 1

    def apply_kernel(self, x: Array, w: Array) -> Array:
        return type(self)._op(x, w, self.stride, self.padding)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = self.kernel
        w = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.features))
        b = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return _add_bias(self.apply_kernel(x, w), b)


class Conv(_Layer):
    """``Conv2d(in, features, kernel, stride, padding)`` on NHWC inputs."""

    _op = staticmethod(conv)


class ConvTranspose(_Layer):
    """Transposed conv: ``out = (in - 1) * stride - 2 * padding + kernel``, NHWC."""

    _op = staticmethod(conv_transpose)


class ConvReference(nn.Module):
    """The plain flax layer (autodiff backward pass), for tests and benchmarks."""

    features: int
    kernel: int = 4
    stride: int = 2
    padding: int = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        p = self.padding
        return nn.Conv(self.features, (self.kernel, self.kernel), (self.stride, self.stride),
                       padding=((p, p), (p, p)))(x)


class ConvTransposeReference(nn.Module):
    """The plain flax layer (autodiff backward pass), for tests and benchmarks."""

    features: int
    kernel: int = 4
    stride: int = 2
    padding: int = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        q = self.kernel - 1 - self.padding
        return nn.ConvTranspose(self.features, (self.kernel, self.kernel), (self.stride, self.stride),
                                padding=((q, q), (q, q)))(x)
