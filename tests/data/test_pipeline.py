"""Tests of lpc_jax.data.pipeline: the grain input pipeline's batches, resume and shards."""

import numpy as np
import pytest

from lpc_jax.data import pipeline, sources
from lpc_jax.training.config import Config, ConfigError

tfds = pytest.importorskip("tensorflow_datasets")


def _indexed_images(n):
    """(n, 4, 4, 1) uint8 images whose first pixel is their index mod 256; the rest random."""
    images = np.random.default_rng(n).integers(0, 256, (n, 4, 4, 1), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    return images


def _reference_step_batches(images, batch_size, seed, start_step, num_steps):
    """The pre-grain ``pipeline.step_batches``, verbatim: the batches every published run saw."""
    steps_per_epoch = images.shape[0] // batch_size
    for step in range(start_step, num_steps):
        epoch, index = divmod(step, steps_per_epoch)
        if step == start_step or index == 0:
            order = pipeline.epoch_order(images.shape[0], seed, epoch)
        yield step, sources.to_float(images[order[index * batch_size : (index + 1) * batch_size]])


@pytest.mark.parametrize("num_threads", [0, 3])
@pytest.mark.parametrize("seed,batch_size,start", [(0, 8, 0), (3, 5, 7), (11, 16, 2)])
def test_batches_are_bitwise_the_pre_grain_batches(num_threads, seed, batch_size, start):
    images = _indexed_images(43)  # partial last batch dropped every epoch
    num_steps = start + 20  # crosses several epochs
    want = list(_reference_step_batches(images, batch_size, seed, start, num_steps))
    got = list(pipeline.step_batches(images, batch_size, seed, start, num_steps, num_threads=num_threads,
                                     host_float=True))
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(start, num_steps))
    for (_, g), (_, w) in zip(got, want):
        assert g.dtype == np.float32 and g.shape == (batch_size, 4, 4, 1)
        assert g.tobytes() == w.tobytes()
    # The default: the same rows as uint8, which the step converts on the device to the same bits.
    raw = list(pipeline.step_batches(images, batch_size, seed, start, num_steps, num_threads=num_threads))
    for (_, r), (_, w) in zip(raw, want):
        assert r.dtype == np.uint8 and sources.to_float(r).tobytes() == w.tobytes()


def test_iterator_started_at_s_is_the_continuation_of_one_started_at_0():
    images = _indexed_images(30)
    full = [b.tobytes() for b in pipeline.step_iterator(images, 7, 2, 0, 25, num_threads=2)]
    assert len(full) == 25
    for start in (1, 4, 5, 13, 25):
        it = pipeline.step_iterator(images, 7, 2, start, 25, num_threads=2)
        assert it.get_state() == {"next_index": start}  # the step number is the state
        assert [b.tobytes() for b in it] == full[start:]
        assert it.get_state() == {"next_index": 25}


def test_grain_state_round_trips_mid_run():
    images = _indexed_images(30)
    it = pipeline.step_iterator(images, 6, 5, 0, 20, num_threads=2, prefetch=3)
    head = [next(it) for _ in range(9)]
    state = it.get_state()
    assert state == {"next_index": 9}
    tail = [b.tobytes() for b in it]
    fresh = pipeline.step_iterator(images, 6, 5, 0, 20, num_threads=1)
    fresh.set_state(state)
    assert [b.tobytes() for b in fresh] == tail
    np.testing.assert_array_equal(head[0], images[pipeline.epoch_order(30, 5, 0)[:6]])


class _CountingImages:
    """An (N, H, W, C) source that records which rows were read."""

    def __init__(self, images):
        self.images, self.shape, self.read = images, images.shape, []

    def __getitem__(self, idx):
        self.read.extend(np.asarray(idx).tolist())
        return self.images[idx]


def test_each_process_reads_only_its_rows_and_together_the_global_batch():
    images = _indexed_images(40)
    whole = list(pipeline.step_batches(images, 8, 1, 2, 11))
    sources = [_CountingImages(images) for _ in range(4)]
    shards = [list(pipeline.step_iterator(src, 8, 1, 2, 11, shard_index=i, shard_count=4, num_threads=2))
              for i, src in enumerate(sources)]
    for k, (_, batch) in enumerate(whole):
        np.testing.assert_array_equal(np.concatenate([shard[k] for shard in shards]), batch)
    for i, src in enumerate(sources):
        want = [int(r) for s in range(2, 11) for r in pipeline.step_rows(40, 8, 1, s, shard_index=i, shard_count=4)]
        assert sorted(src.read) == sorted(want)  # its own 2 rows per step, nothing else
    read = [r for src in sources for r in src.read]
    assert len(read) == 9 * 8  # every row of the 9 global batches read exactly once, by one process
    assert sorted(read) == sorted(int(r) for s in range(2, 11) for r in pipeline.step_rows(40, 8, 1, s))


def test_bad_arguments_raise_before_reading():
    images = _CountingImages(_indexed_images(10))
    with pytest.raises(ValueError, match="batch_size 11 exceeds the 10 examples"):
        pipeline.step_iterator(images, 11, 0, 0, 3)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        pipeline.step_iterator(images, 4, 0, 0, 3, shard_count=3)
    with pytest.raises(ValueError, match="start_step 4 is outside"):
        pipeline.step_iterator(images, 4, 0, 4, 3)
    with pytest.raises(ValueError, match="num_threads"):
        pipeline.step_iterator(images, 4, 0, 0, 3, num_threads=-1)
    assert images.read == []
    with pytest.raises(ConfigError, match="data_threads"):
        Config(data_threads=-1).validate()


def test_tfds_source_is_lazy_and_batches_like_the_loaded_array():
    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
        lazy = sources.open_images("celeba", "train", "tfds")
        loaded = sources.load("celeba", "train", source="tfds")
        assert isinstance(lazy, sources.TfdsImages) and lazy.shape == loaded.images.shape == (24, 64, 64, 3)
        np.testing.assert_array_equal(lazy[[3, 1]], loaded.images[[3, 1]])
        np.testing.assert_array_equal(lazy[2:5], loaded.images[2:5])
        np.testing.assert_array_equal(np.asarray(lazy), loaded.images)
        np.testing.assert_array_equal(lazy.labels([0, 1]), -1)  # CelebA has no class label
        chunked, _ = lazy._read(np.arange(23, -1, -1), num_threads=3, chunk=5)  # threaded, in order
        np.testing.assert_array_equal(chunked, loaded.images[::-1])
        with pytest.raises(ValueError, match="batch_size 25 exceeds the 24 examples"):
            next(pipeline.step_batches(lazy, 25, 0, 0, 2))
        got = list(pipeline.step_batches(lazy, 8, 0, 1, 5, num_threads=2))
        want = list(pipeline.step_batches(loaded.images, 8, 0, 1, 5, num_threads=0))
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3, 4]
    for (_, g), (_, w) in zip(got, want):
        assert g.tobytes() == w.tobytes()
    with pytest.raises(IndexError):
        lazy[[24]]


def test_unprepared_tfds_split_raises_when_opened(tmp_path):
    with pytest.raises(sources.DatasetNotFoundError, match="tfds build svhn_cropped --file_format=array_record"):
        sources.open_images("svhn", "train", "auto", data_dir=str(tmp_path))
