"""Images in, batches out.

``sources`` (which source serves a dataset: Debian's Fashion-MNIST IDX files,
TFDS-prepared splits read lazily, or the files users have; image shapes; uint8 ->
float), the file readers ``cifar10``, ``svhn``, ``celeba`` and ``folder`` with
``discover`` (where they are looked for), ``images`` (the lazy image array,
decoding, CelebA's crop), ``cache`` (the memory-mapped decode cache) and
``pipeline`` (the grain input pipeline: epoch order, per-process rows, per-step
uint8 batches decoded ahead; the on-device conversion).

Import rule: this group imports no other part of lpc_jax.
"""
