"""The networks' convolution layers, per platform: the CPU-tuned ones or XLA's own.

Two implementations of the same functions with the same parameters:

* ``"tuned"``: :mod:`lpc_jax.model.layers` (custom VJPs built from canonical
  convolutions, matmuls and reshapes), which dodge XLA:CPU's slow autodiff
  convolutions inside the chain's while loop;
* ``"xla"``: one ``lax.conv_general_dilated`` / ``lax.conv_transpose`` each, as
  ``flax.linen.Conv`` / ``ConvTranspose`` compute them, with autodiff's backward
  convolutions: XLA:GPU turns those into cuDNN backward-input / backward-filter
  calls (also inside loops), and XLA:TPU tiles them itself;
* ``"auto"`` (the default): ``lax.platform_dependent(cpu=tuned, default=xla)``, so the
  choice follows the platform the program is *lowered* for (a program exported for
  cuda from a CPU host gets XLA's convolutions), not the host's default backend.
  Only the chosen branch is lowered.

``Conv`` / ``ConvTranspose`` hold ``kernel`` (k, k, in, out) and ``bias`` (out,) in
every implementation (and the same names as :class:`layers.Conv` before), so a
checkpoint moves between them. The ``"xla"`` layers have no custom VJP: forward-mode
autodiff works through them.
"""

from __future__ import annotations

import jax
from jax import lax

from lpc_jax.model import layers

Array = jax.Array

CONV_IMPLS = ("auto", "tuned", "xla")
_DN = ("NHWC", "HWIO", "NHWC")


def check_impl(impl: str) -> None:
    """Raises ValueError unless ``impl`` is one of ``CONV_IMPLS``."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl={impl!r} is invalid: choose one of {list(CONV_IMPLS)} "
                         "(auto: tuned on CPU, xla on GPU/TPU)")


def xla_conv(x: Array, w: Array, stride: int, padding: int) -> Array:
    """PyTorch ``Conv2d`` (no bias) as ``flax.linen.Conv`` computes it: (B, H, W, C_in)
    x (k, k, C_in, C_out) -> (B, H', W', C_out), ``padding`` zeros each side."""
    p = padding
    return lax.conv_general_dilated(x, w, (stride, stride), ((p, p), (p, p)), dimension_numbers=_DN)


def xla_conv_transpose(x: Array, w: Array, stride: int, padding: int) -> Array:
    """Transposed conv (flax's unflipped kernel, PyTorch ``padding``) as
    ``flax.linen.ConvTranspose`` computes it with padding ``k - 1 - padding`` each side:
    ``out = (in - 1) * stride - 2 * padding + k``."""
    q = w.shape[0] - 1 - padding
    return lax.conv_transpose(x, w, (stride, stride), ((q, q), (q, q)), dimension_numbers=_DN)


def conv(x: Array, w: Array, stride: int, padding: int, impl: str = "auto") -> Array:
    """``Conv2d`` (no bias) by ``impl`` (one of ``CONV_IMPLS``)."""
    return _by_impl(layers.conv, xla_conv, impl)(x, w, stride, padding)


def conv_transpose(x: Array, w: Array, stride: int, padding: int, impl: str = "auto") -> Array:
    """Transposed conv (no bias) by ``impl`` (one of ``CONV_IMPLS``)."""
    return _by_impl(layers.conv_transpose, xla_conv_transpose, impl)(x, w, stride, padding)


def _by_impl(tuned, xla, impl: str):
    check_impl(impl)
    if impl == "tuned":
        return tuned
    if impl == "xla":
        return xla

    def auto(x, w, stride, padding):
        return lax.platform_dependent(x, w, cpu=lambda x, w: tuned(x, w, stride, padding),
                                      default=lambda x, w: xla(x, w, stride, padding))

    return auto


class _Layer(layers._Layer):  # noqa: SLF001  (the tuned layers' parameters and bias, by impl)
    """Table 2's ``(features, kernel, stride, padding)`` layer over ``_op``, by ``impl``."""

    impl: str = "auto"

    def apply_kernel(self, x: Array, w: Array) -> Array:
        return type(self)._op(x, w, self.stride, self.padding, self.impl)


class Conv(_Layer):
    """``Conv2d(in, features, kernel, stride, padding)`` on NHWC inputs."""

    _op = staticmethod(conv)


class ConvTranspose(_Layer):
    """Transposed conv: ``out = (in - 1) * stride - 2 * padding + kernel``, NHWC."""

    _op = staticmethod(conv_transpose)
