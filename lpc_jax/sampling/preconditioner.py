"""Adam-style diagonal preconditioner for Langevin dynamics (paper section 1.3).

The metric is built from an exponential moving average of the squared drift:

    m_t     = decay * m_{t-1} + (1 - decay) * g_t**2        (elementwise, m_0 = 0)
    G_t     = 1 / (sqrt(m_hat_t) + eps)

in one of two forms (``FORMS``), which differ only in how ``m_hat_t`` is read off
the zero-started EMA:

* ``adam_paper``, Algorithm 1 lines 7-8 as printed: Adam's bias correction,
  ``m_hat_t = m_t / (1 - decay**t)``. Its first metric is ``G_1 = 1 / (|g_1| + eps)``,
  unbounded where the first drift is near 0 (eps = 1e-8 is in drift units): a chain
  started near a mode takes a first step with noise variance ``2 h / |g_1|``
  (``docs/results.md``, "The preconditioner against ground truth").
* ``adam`` (this project's default for the form): the EMA started at a prior moment
  ``m_0 = PRIOR_MOMENT`` = 1 instead of 0, ``m_hat_t = m_t + decay**t * PRIOR_MOMENT``
  (1 is E[g**2] per coordinate under the standard-normal prior, whose drift is -z).
  The two forms agree once ``decay**t`` is small; before that, ``adam`` shrinks the
  early estimate towards the prior's instead of dividing a one-sample estimate up, so
  ``G_t <= decay**(-t/2)``: ``G_1 <= 1 / sqrt(decay)``, about 1.005 at decay 0.99.

``G_t`` multiplies both the drift and the noise variance of the Langevin update
(see :mod:`lpc_jax.sampling.langevin`). With ``decay = 0`` the EMA keeps only the current
drift and both forms give ``G = 1 / (|g| + eps)``; the paper's "beta = 0 (no
preconditioning)" means the preconditioner switched off (``G = 1``), a separate, static
choice (``precondition=False``).

Either adaptive form follows each chain's recent drift: a position-dependent metric
without its divergence term, adapted along the chain, so even MALA is not exactly
invariant under it. A metric fixed for the chain (``metric=``, e.g. from
:func:`lpc_jax.sampling.warmup.estimate_metric` or the encoder's variance) keeps MALA
exact and ULA at its discretisation bias.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

ADAM = "adam"
ADAM_PAPER = "adam_paper"
FORMS = (ADAM, ADAM_PAPER)
PRIOR_MOMENT = 1.0  # m_0 of the ``adam`` form, squared drift units: E[g**2] under N(0, I)


def resolve(precondition: bool | str) -> str | None:
    """The adaptive form that a sampler's ``precondition`` argument names, or None (G = 1).

    ``True`` is ``adam_paper`` (the published algorithm, what ``precondition=True`` has
    always meant here), ``False`` is None, a string is one of ``FORMS``.

    Raises:
      ValueError: ``precondition`` is another string.
    """
    if precondition is True:
        return ADAM_PAPER
    if precondition is False or precondition is None:
        return None
    if precondition not in FORMS:
        raise ValueError(f"precondition={precondition!r} is invalid: use True, False or one of {list(FORMS)}")
    return precondition


def init(z: Array) -> Array:
    """Zero second-moment estimate, same shape and dtype as the latents (B, D)."""
    return jnp.zeros_like(z)


def ema(m: Array, squared_drift: Array, decay: Array) -> Array:
    """``decay * m + (1 - decay) * squared_drift``, each (B, D), the EMA started at 0."""
    return decay * m + (1.0 - decay) * squared_drift


def metric_of(m: Array, count: Array, decay: Array, eps: Array, form: str = ADAM_PAPER) -> Array:
    """G_t (B, D) from the zero-started EMA ``m`` = m_t after ``count + 1`` = t updates.

    Args:
      m: (B, D) EMA of the squared drift, including the step's own drift.
      count: () int32, t - 1.
      decay: () EMA decay beta in [0, 1).
      eps: () positive constant added to sqrt(m_hat), in drift units.
      form: one of ``FORMS`` (static).

    Returns:
      (B, D) G_t, in units of 1 / drift.
    """
    t = (count + 1).astype(m.dtype)
    if form == ADAM_PAPER:
        m_hat = m / (1.0 - decay**t)
    elif form == ADAM:
        m_hat = m + decay**t * PRIOR_MOMENT
    else:
        raise ValueError(f"form={form!r} is invalid: choose one of {list(FORMS)}")
    return 1.0 / (jnp.sqrt(m_hat) + eps)


def update(m: Array, drift: Array, count: Array, decay: Array, eps: Array,
           form: str = ADAM_PAPER) -> tuple[Array, Array]:
    """One EMA step and the resulting diagonal metric.

    Args:
      m: (B, D) second-moment estimate m_{t-1} (zero-started).
      drift: (B, D) drift g_t = grad_z log p(x, z_{t-1}).
      count: () int32, t - 1 (the number of updates already made).
      decay: () EMA decay beta in [0, 1).
      eps: () positive constant added to sqrt(m_hat), in drift units.
      form: one of ``FORMS`` (static); ``adam_paper`` is Algorithm 1 as printed.

    Returns:
      ``(m_t, G_t)``, each (B, D); G_t has units of 1 / drift.
    """
    # (1 - decay) * drift * drift in this order: the float32 rounding of the runs trained before.
    m = decay * m + (1.0 - decay) * drift * drift
    return m, metric_of(m, count, decay, eps, form)
