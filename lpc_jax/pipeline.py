"""The training input pipeline on grain: one ``MapDataset`` of per-step batches.

Element ``s`` of :func:`step_dataset` is the batch SGD step ``s`` trains on:
rows ``order[i * B : (i + 1) * B]`` of ``order = data.epoch_order(N, seed, e)``
with ``(e, i) = divmod(s, N // B)`` (full batches only), converted by
:func:`lpc_jax.data.to_float`. These are exactly the batches of
:func:`lpc_jax.data.batches`, so a run's batch sequence is a pure function of
``(seed, step)``: the checkpointed step number *is* the iterator's position,
and grain's own iterator state is ``{"next_index": step}``.

The source is anything with ``shape`` ``(N, H, W, C)`` that gathers uint8 rows
by an index array: an in-memory ``np.ndarray`` (Debian's Fashion-MNIST IDX
files) or a lazy :class:`lpc_jax.data.TfdsImages` over ``tfds.data_source``
that reads and decodes only the rows asked for. :func:`step_iterator` reads
ahead in ``num_threads`` worker threads into a buffer of ``prefetch`` batches,
so memory is bounded by that buffer, not by the dataset, and training starts
as soon as the first batch is decoded.

Process ``shard_index`` of ``shard_count`` reads and decodes only its rows
:func:`lpc_jax.data.shard_rows` of every global batch.
"""

from __future__ import annotations

import functools
from typing import Any

import grain
import numpy as np

from lpc_jax import data

DEFAULT_THREADS = 4


@functools.lru_cache(maxsize=4)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """:func:`lpc_jax.data.epoch_order`, cached: every step of an epoch reuses it."""
    order = data.epoch_order(num_examples, seed, epoch)
    order.flags.writeable = False
    return order


def step_rows(num_examples: int, batch_size: int, seed: int, step: int, *,
              shard_index: int = 0, shard_count: int = 1) -> np.ndarray:
    """The example indices of step ``step``'s batch this process reads, (B / shard_count,) int64.

    Raises:
      ValueError: ``batch_size`` exceeds ``num_examples``, or a bad shard
        (:func:`lpc_jax.data.shard_rows`).
    """
    rows = data.shard_rows(batch_size, shard_index, shard_count)
    steps_per_epoch = num_examples // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} examples")
    epoch, index = divmod(step, steps_per_epoch)
    return _epoch_order(num_examples, seed, epoch)[index * batch_size : (index + 1) * batch_size][rows]


def step_dataset(images: Any, batch_size: int, seed: int, num_steps: int, *,
                 shard_index: int = 0, shard_count: int = 1) -> grain.MapDataset:
    """A ``grain.MapDataset`` of length ``num_steps`` whose element ``s`` is step ``s``'s batch.

    Args:
      images: (N, H, W, C) uint8 ``np.ndarray``, or a lazy source with ``shape``
        and index-array ``__getitem__`` such as :class:`lpc_jax.data.TfdsImages`.
      batch_size: global batch size ``B`` (over all processes).
      seed: data-order seed (:func:`lpc_jax.data.epoch_order`).
      num_steps: number of SGD steps (the dataset's length; epochs repeat).
      shard_index, shard_count: this process's share, rows
        :func:`lpc_jax.data.shard_rows` of every global batch.

    Returns:
      ``MapDataset`` of float32 ``(B / shard_count, H, W, C)`` arrays in [-1, 1].

    Raises:
      ValueError: ``batch_size`` exceeds ``N``, a bad shard, or ``num_steps < 0``.
    """
    num_examples = int(images.shape[0])
    step_rows(num_examples, batch_size, seed, 0, shard_index=shard_index, shard_count=shard_count)  # validates
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    rows = functools.partial(step_rows, num_examples, batch_size, seed,
                             shard_index=shard_index, shard_count=shard_count)
    return grain.MapDataset.range(num_steps).map(lambda step: data.to_float(images[rows(step)]))


def step_iterator(images: Any, batch_size: int, seed: int, start_step: int, num_steps: int, *,
                  shard_index: int = 0, shard_count: int = 1, num_threads: int = DEFAULT_THREADS,
                  prefetch: int | None = None) -> grain.DatasetIterator:
    """A grain iterator over steps ``start_step .. num_steps - 1`` of :func:`step_dataset`.

    Its state, ``get_state() == {"next_index": s}``, is the next step ``s`` it
    yields; an iterator built at ``start_step = s`` (or given that state with
    ``set_state``) yields exactly the continuation of one built at step 0.

    Args:
      images, batch_size, seed, shard_index, shard_count: as :func:`step_dataset`.
      start_step: first step yielded, ``0 <= start_step <= num_steps``.
      num_steps: one past the last step.
      num_threads: worker threads reading and decoding batches ahead (0 =
        each batch is made in the caller's thread when asked for).
      prefetch: batches buffered ahead; default ``2 * num_threads``.

    Returns:
      ``grain.DatasetIterator`` of float32 ``(B / shard_count, H, W, C)`` batches;
      call ``close()`` to stop its threads early.

    Raises:
      ValueError: as :func:`step_dataset`, a negative ``num_threads`` or
        ``prefetch``, or ``start_step`` outside ``[0, num_steps]``.
    """
    if num_threads < 0 or (prefetch is not None and prefetch < 0):
        raise ValueError(f"num_threads ({num_threads}) and prefetch ({prefetch}) must be >= 0")
    if not 0 <= start_step <= max(num_steps, 0):
        raise ValueError(f"start_step {start_step} is outside [0, num_steps={num_steps}]")
    dataset = step_dataset(images, batch_size, seed, num_steps, shard_index=shard_index, shard_count=shard_count)
    prefetch = 2 * num_threads if prefetch is None else prefetch
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    iterator = iter(dataset.to_iter_dataset(options))
    iterator.set_state({"next_index": start_step})
    return iterator
