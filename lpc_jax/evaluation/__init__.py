"""Judging a trained model.

``sample_metrics`` (FD, KID, density and coverage on feature sets), ``bounds``
(the test ELBO and the IWAE bound), feature extractors (``classifier``,
``inception`` with ``torch_checkpoint``; ``features`` ties them to metric names),
``evaluators`` (evaluators by name), ``monitor`` (the online FD monitor) and ``chains``
(chain diagnostics of a trained model).

Import rule: imports the groups below it (``model``, ``sampling``, ``data``,
``runtime``, ``plotting``), never ``lpc_jax.training``.
"""
