"""The training input pipeline on grain: one ``MapDataset`` of per-step batches.

Element ``s`` of :func:`step_dataset` is the batch SGD step ``s`` trains on:
rows ``order[i * B : (i + 1) * B]`` of ``order = epoch_order(N, seed, e)``
with ``(e, i) = divmod(s, N // B)`` (full batches only), as uint8: the batch
crosses to the device at a quarter of float32's bytes and the jitted step converts
it there (:func:`device_to_float`, bitwise :func:`lpc_jax.data.sources.to_float`;
``host_float=True`` converts on the host instead). These are exactly the batches of
:func:`batches`, so a run's batch sequence is a pure function of
``(seed, step)``: the checkpointed step number *is* the iterator's position,
and grain's own iterator state is ``{"next_index": step}``.

The source is anything with ``shape`` ``(N, H, W, C)`` that gathers uint8 rows
by an index array: an in-memory ``np.ndarray`` (Debian's Fashion-MNIST IDX
files) or a lazy :class:`lpc_jax.data.sources.TfdsImages` over ``tfds.data_source``
that reads and decodes only the rows asked for. :func:`step_iterator` reads
ahead in ``num_threads`` worker threads into a buffer of ``prefetch`` batches,
so memory is bounded by that buffer, not by the dataset, and training starts
as soon as the first batch is decoded.

Process ``shard_index`` of ``shard_count`` reads and decodes only its rows
:func:`shard_rows` of every global batch.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

import grain
import jax
import jax.numpy as jnp
import numpy as np

from lpc_jax.data import sources

DEFAULT_THREADS = 4


@functools.lru_cache(maxsize=4)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """:func:`epoch_order`, cached: every step of an epoch reuses it."""
    order = epoch_order(num_examples, seed, epoch)
    order.flags.writeable = False
    return order


def step_rows(num_examples: int, batch_size: int, seed: int, step: int, *,
              shard_index: int = 0, shard_count: int = 1) -> np.ndarray:
    """The example indices of step ``step``'s batch this process reads, (B / shard_count,) int64.

    Raises:
      ValueError: ``batch_size`` exceeds ``num_examples``, or a bad shard
        (:func:`shard_rows`).
    """
    rows = shard_rows(batch_size, shard_index, shard_count)
    steps_per_epoch = num_examples // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} examples")
    epoch, index = divmod(step, steps_per_epoch)
    return _epoch_order(num_examples, seed, epoch)[index * batch_size : (index + 1) * batch_size][rows]


def device_to_float(images: jax.Array) -> jax.Array:
    """uint8 in [0, 255] -> float32 in [-1, 1] inside a jitted program: :func:`sources.to_float`, bitwise.

    A lookup in the 256 values ``sources.to_float`` gives (a gather), so no backend's
    fused multiply-add or reassociation can change a bit. Non-uint8 input (an already
    converted float batch) is returned as it is.
    """
    if images.dtype != jnp.uint8:
        return images
    table = jnp.asarray(sources.to_float(np.arange(256, dtype=np.uint8)))
    return jnp.take(table, images.astype(jnp.int32), axis=0)


def step_dataset(images: Any, batch_size: int, seed: int, num_steps: int, *,
                 shard_index: int = 0, shard_count: int = 1, host_float: bool = False) -> grain.MapDataset:
    """A ``grain.MapDataset`` of length ``num_steps`` whose element ``s`` is step ``s``'s batch.

    Args:
      images: (N, H, W, C) uint8 ``np.ndarray``, or a lazy source with ``shape``
        and index-array ``__getitem__`` such as :class:`lpc_jax.data.sources.TfdsImages`.
      batch_size: global batch size ``B`` (over all processes).
      seed: data-order seed (:func:`epoch_order`).
      num_steps: number of SGD steps (the dataset's length; epochs repeat).
      shard_index, shard_count: this process's share, rows
        :func:`shard_rows` of every global batch.
      host_float: convert each batch to float32 in [-1, 1] on the host
        (:func:`sources.to_float`) instead of leaving it uint8 for the device.

    Returns:
      ``MapDataset`` of uint8 ``(B / shard_count, H, W, C)`` arrays (float32 in
      [-1, 1] with ``host_float``).

    Raises:
      ValueError: ``batch_size`` exceeds ``N``, a bad shard, or ``num_steps < 0``.
    """
    num_examples = int(images.shape[0])
    step_rows(num_examples, batch_size, seed, 0, shard_index=shard_index, shard_count=shard_count)  # validates
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    rows = functools.partial(step_rows, num_examples, batch_size, seed,
                             shard_index=shard_index, shard_count=shard_count)
    convert = sources.to_float if host_float else np.asarray
    return grain.MapDataset.range(num_steps).map(lambda step: convert(images[rows(step)]))


def step_iterator(images: Any, batch_size: int, seed: int, start_step: int, num_steps: int, *,
                  shard_index: int = 0, shard_count: int = 1, num_threads: int = DEFAULT_THREADS,
                  prefetch: int | None = None, host_float: bool = False) -> grain.DatasetIterator:
    """A grain iterator over steps ``start_step .. num_steps - 1`` of :func:`step_dataset`.

    Its state, ``get_state() == {"next_index": s}``, is the next step ``s`` it
    yields; an iterator built at ``start_step = s`` (or given that state with
    ``set_state``) yields exactly the continuation of one built at step 0.

    Args:
      images, batch_size, seed, shard_index, shard_count, host_float: as :func:`step_dataset`.
      start_step: first step yielded, ``0 <= start_step <= num_steps``.
      num_steps: one past the last step.
      num_threads: worker threads reading and decoding batches ahead (0 =
        each batch is made in the caller's thread when asked for).
      prefetch: batches buffered ahead; default ``2 * num_threads``.

    Returns:
      ``grain.DatasetIterator`` of uint8 (or ``host_float``: float32) ``(B / shard_count, H, W, C)`` batches;
      call ``close()`` to stop its threads early.

    Raises:
      ValueError: as :func:`step_dataset`, a negative ``num_threads`` or
        ``prefetch``, or ``start_step`` outside ``[0, num_steps]``.
    """
    if num_threads < 0 or (prefetch is not None and prefetch < 0):
        raise ValueError(f"num_threads ({num_threads}) and prefetch ({prefetch}) must be >= 0")
    if not 0 <= start_step <= max(num_steps, 0):
        raise ValueError(f"start_step {start_step} is outside [0, num_steps={num_steps}]")
    dataset = step_dataset(images, batch_size, seed, num_steps, shard_index=shard_index, shard_count=shard_count,
                           host_float=host_float)
    prefetch = 2 * num_threads if prefetch is None else prefetch
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    iterator = iter(dataset.to_iter_dataset(options))
    iterator.set_state({"next_index": start_step})
    return iterator


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffle of epoch ``epoch``: a permutation of ``range(num_examples)``, (N,) int64.

    It depends only on ``(seed, epoch)``, so a resumed run sees the same batches as
    an uninterrupted one. Batch ``i`` of the epoch is ``order[i * B : (i + 1) * B]``
    (full batches only), in :func:`batches`, :func:`step_batches` and any loop that
    also needs the labels.
    """
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def shard_rows(batch_size: int, shard_index: int = 0, shard_count: int = 1) -> slice:
    """The rows of a global batch that process ``shard_index`` of ``shard_count`` reads.

    Process ``i`` of ``n`` gets the contiguous slice ``[i * B / n, (i + 1) * B / n)``
    of every global batch of ``B = batch_size`` rows, so the ``n`` shards in process
    order concatenate to the global batch.

    Raises:
      ValueError: ``shard_count < 1``, ``shard_index`` outside ``[0, shard_count)``,
        or ``batch_size`` not divisible by ``shard_count``.
    """
    if shard_count < 1:
        raise ValueError(f"shard_count must be >= 1, got {shard_count}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is out of range for shard_count {shard_count}; "
                         f"it must be in [0, {shard_count})")
    if batch_size % shard_count:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {shard_count} processes; "
                         f"choose a batch_size that is a multiple of {shard_count}")
    local = batch_size // shard_count
    return slice(shard_index * local, (shard_index + 1) * local)


def step_batches(images: np.ndarray, batch_size: int, seed: int, start_step: int,
                 num_steps: int, *, shard_index: int = 0, shard_count: int = 1,
                 num_threads: int | None = None, host_float: bool = False) -> Iterator[tuple[int, np.ndarray]]:
    """Yields ``(step, batch)`` for SGD steps ``start_step .. num_steps - 1``.

    Step ``s`` gets batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``
    in :func:`epoch_order`, so a run resumed at ``start_step`` sees exactly the
    batches an uninterrupted run would. Only the batches yielded are read and
    converted, ahead of time in grain worker threads (:func:`step_iterator`).

    Args:
      images: (N, H, W, C) uint8 array, or a lazy :class:`lpc_jax.data.sources.TfdsImages`.
      batch_size: global batch size ``B`` (over all processes).
      seed, start_step, num_steps: as above.
      shard_index, shard_count: this process's place among ``shard_count``
        processes; it gets rows :func:`shard_rows` of each global batch, so each
        batch is ``(B / shard_count, H, W, C)`` uint8, converted by the jitted
        step (:func:`device_to_float`).
      num_threads: worker threads reading ahead (0 = none); default
        ``DEFAULT_THREADS``.
      host_float: yield float32 in [-1, 1] converted on the host instead.

    Raises:
      ValueError: ``batch_size`` exceeds ``N``, or a bad shard (see :func:`shard_rows`);
        at the first ``next``.
    """
    iterator = step_iterator(images, batch_size, seed, start_step, max(num_steps, start_step),
                                      shard_index=shard_index, shard_count=shard_count,
                                      num_threads=DEFAULT_THREADS if num_threads is None else num_threads,
                                      host_float=host_float)
    try:
        yield from zip(range(start_step, num_steps), iterator)
    finally:
        iterator.close()


def batches(images: np.ndarray, batch_size: int, seed: int, epoch: int) -> Iterator[np.ndarray]:
    """Yields the shuffled full batches of one epoch (:func:`epoch_order`) as float32 in [-1, 1].

    The last partial batch is dropped.
    """
    order = epoch_order(images.shape[0], seed, epoch)
    for i in range(images.shape[0] // batch_size):
        yield sources.to_float(images[order[i * batch_size : (i + 1) * batch_size]])
