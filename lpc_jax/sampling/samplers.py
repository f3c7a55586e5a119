"""The latent samplers by name: ``ula`` (:mod:`lpc_jax.sampling.langevin`), ``mala``, ``underdamped``.

:func:`build` gives every sampler one calling convention, that of
``langevin.build_kernel``, with ``LangevinHParams`` (step size, decay, eps)
as its traced hyperparameters; the underdamped sampler's friction is bound
here. The LPC train step and the chain diagnostics pick a sampler through it::

    sampler = samplers.build("mala", log_prob_fn, precondition=True)
    state = sampler.init(z0)
    state, info = sampler.kernel(rng_key, state, hparams, *args)
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax

from lpc_jax.sampling import langevin, mala, underdamped

SAMPLERS = ("ula", "mala", "underdamped")


class Sampler(NamedTuple):
    init: Callable[[jax.Array], NamedTuple]  # z (B, D) -> chain state
    kernel: Callable  # kernel(rng_key, state, LangevinHParams, [params,] *args) -> (state, info[, grad])


def build(name: str, log_prob_fn: Callable[..., jax.Array], *, precondition: bool | str = True,
          metric: jax.Array | None = None, friction: float | jax.Array = 1.0, with_param_grad: bool = False,
          axis_name: str | None = None) -> Sampler:
    """The sampler ``name`` for ``log_prob_fn``, taking ``LangevinHParams``.

    Args:
      name: one of ``SAMPLERS``.
      log_prob_fn: as in :func:`lpc_jax.sampling.langevin.build_kernel`.
      precondition: static; Adam-style diagonal metric (True = ``adam_paper``, or a form of
        :mod:`lpc_jax.sampling.preconditioner`), or G = 1 (False).
      metric: optional fixed diagonal metric G, broadcastable to (B, D) (e.g. the encoder's
        variance, or :func:`lpc_jax.sampling.warmup.estimate_metric`'s); wins over ``precondition``.
      friction: the underdamped sampler's friction, per unit time (ignored by the others).
      with_param_grad: static; the kernel also returns the params gradient (same VJP as the drift).
      axis_name: static; the batch's mesh axis when the kernel runs under ``shard_map``: its
        random draws are then the unsharded chain's rows (:func:`lpc_jax.sampling.langevin.draw_rows`).

    Raises:
      ValueError: ``name`` is not one of ``SAMPLERS``.
    """
    common = dict(precondition=precondition, metric=metric, with_param_grad=with_param_grad, axis_name=axis_name)
    if name == "ula":
        return Sampler(langevin.init, langevin.build_kernel(log_prob_fn, **common))
    if name == "mala":
        return Sampler(mala.init, mala.build_kernel(log_prob_fn, **common))
    if name == "underdamped":
        kernel = underdamped.build_kernel(log_prob_fn, **common)
        return Sampler(underdamped.init, lambda rng_key, state, hparams, *args: kernel(
            rng_key, state, underdamped.from_langevin(hparams, friction), *args))
    raise ValueError(f"sampler={name!r} is invalid: choose one of {list(SAMPLERS)}")
