"""Langevin samplers over the latents, and their diagnostics.

Kernels with one interface (``init``, ``build_kernel``; blackjax's shape):
``langevin`` (ULA, with the shared chain loop ``sample_chain`` and the sharded
noise ``draw_rows``), ``mala`` (Metropolis-adjusted), ``underdamped`` (kinetic,
OBABO); ``preconditioner`` (the Adam-style diagonal metric); ``samplers`` (the
registry: ``samplers.build(name, ...)``); ``diagnostics`` (log p and drift
curves, PCA trajectories, split R-hat and ESS).

Import rule: this group imports no other part of lpc_jax.
"""
