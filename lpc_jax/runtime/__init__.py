"""What a run needs from the machine it runs on.

``checkpoints`` (orbax, retention, clear disk-full errors), ``workdir_lock`` (one
run per directory), ``distributed`` (``jax.distributed`` start-up, the device mesh,
data- and member-parallel placements), ``periodic`` (every-N-steps actions, the
steps/s and ETA meter) and ``logs`` (atomic writes, the JSON-lines metrics log).

Import rule: this group imports no other part of lpc_jax.
"""
