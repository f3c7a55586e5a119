"""The generative model and its train steps (paper sections 2-3, Table 2).

``layers`` (convolutions with hand-written VJPs), ``likelihoods``, ``networks``
(encoder, decoder, ``make_log_joint``, prior sampling), ``objectives`` (warm-start
weights, the ELBO, the forward KL from chain moments), ``state`` (``TrainState``,
``Model``), ``chain`` (the chain engine of Algorithm 1) and ``steps``
(``lpc_train_step``, ``vae_train_step``).

Import rule: imports ``lpc_jax.sampling`` only. It never sees ``Config``: the
launchers' settings reach it as arguments, bound in ``lpc_jax.training.build``.
"""
