"""Runs: from a ``Config`` to checkpoints, logs and a summary.

``config`` (the one source of settings and flags), ``build`` (a Config bound to the
model and its train step), ``loop`` (the one training loop), ``train`` (a single
run), ``sweep`` (many step sizes and decays in one program), ``restore``
(``load_run``) and ``evaluate`` (a restored run's evaluation).

Import rule: may import every other group; nothing in lpc_jax imports it but the
package's face, ``lpc_jax/__init__.py``.
"""
