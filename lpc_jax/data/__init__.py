"""Images in, batches out.

``sources`` (the datasets on disk: Debian's Fashion-MNIST IDX files, TFDS-prepared
splits read lazily; image shapes; uint8 -> float) and ``pipeline`` (the grain
input pipeline: epoch order, per-process rows, per-step batches decoded ahead).

Import rule: this group imports no other part of lpc_jax.
"""
