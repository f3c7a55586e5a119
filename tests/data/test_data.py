"""Tests of lpc_jax.data: offline IDX files, the TFDS path (mocked), batching."""

import gzip
import importlib.util
import os
import re
import sys

import numpy as np
import pytest

from lpc_jax.data import pipeline, sources

tfds = pytest.importorskip("tensorflow_datasets")

IDX_FIX = r"apt-get (update && apt-get )?install (--reinstall )?dataset-fashion-mnist"


def _mock(num_examples):
    # USE_CODE builds random examples from each builder's features spec; it needs
    # neither TensorFlow nor any prepared data.
    return tfds.testing.mock_data(num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE)


# --------------------------------------------------------------------------- #
# IDX files
# --------------------------------------------------------------------------- #


def _idx_bytes(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def _write_gz(path, payload: bytes):
    with gzip.open(path, "wb") as f:
        f.write(payload)


def _write_split(directory, split, images, labels):
    image_file, label_file = sources._IDX_FILES[split]
    _write_gz(os.path.join(directory, image_file), _idx_bytes(images))
    _write_gz(os.path.join(directory, label_file), _idx_bytes(labels))


@pytest.fixture
def synthetic_idx(tmp_path):
    rng = np.random.default_rng(0)
    sets = {}
    for split, n in (("train", 7), ("test", 3)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, (n,), dtype=np.uint8)
        _write_split(tmp_path, split, images, labels)
        sets[split] = (images, labels)
    return tmp_path, sets


@pytest.mark.skipif(not os.path.isdir(sources.DEFAULT_IDX_DIR),
                    reason=f"{sources.DEFAULT_IDX_DIR} missing: `apt-get install dataset-fashion-mnist` "
                           "(Debian package) provides the real Fashion-MNIST IDX files")
def test_real_fashion_mnist_idx():
    for split, n in (("train", 60000), ("test", 10000)):
        ds = sources.load("fashion_mnist", split, source="idx")
        assert ds.images.shape == (n, 28, 28, 1) and ds.images.dtype == np.uint8
        assert ds.labels.shape == (n,) and ds.labels.dtype == np.int64
        assert ds.labels.min() == 0 and ds.labels.max() == 9
        # Every class is present and the images are not blank.
        assert set(np.unique(ds.labels)) == set(range(10))
        assert ds.images.max() == 255 and ds.images.min() == 0
    # "auto" reads Fashion-MNIST from the IDX files, and max_examples truncates.
    small = sources.load("fashion_mnist", "test", max_examples=5)
    np.testing.assert_array_equal(small.images, ds.images[:5])


def test_synthetic_idx_reads_back_exactly(synthetic_idx):
    directory, sets = synthetic_idx
    for split, (images, labels) in sets.items():
        ds = sources.load("fashion_mnist", split, source="idx", data_dir=str(directory))
        np.testing.assert_array_equal(ds.images, images[..., None])
        np.testing.assert_array_equal(ds.labels, labels.astype(np.int64))
        assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int64
    ds = sources.load("fashion_mnist", "train", source="idx", data_dir=str(directory), max_examples=4)
    np.testing.assert_array_equal(ds.images, sets["train"][0][:4, ..., None])


def _assert_names_fix(excinfo):
    msg = str(excinfo.value)
    assert re.search(IDX_FIX, msg), msg
    assert "--data_dir" in msg, msg


def test_truncated_idx_file_raises(synthetic_idx):
    directory, sets = synthetic_idx
    path = os.path.join(directory, sources._IDX_FILES["train"][0])
    _write_gz(path, _idx_bytes(sets["train"][0])[:-100])
    with pytest.raises(sources.DatasetNotFoundError, match="truncated") as excinfo:
        sources.load_idx("train", str(directory))
    _assert_names_fix(excinfo)


def test_truncated_gzip_stream_raises(synthetic_idx):
    directory, _ = synthetic_idx
    path = os.path.join(directory, sources._IDX_FILES["test"][0])
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 2])  # a download cut off half way
    with pytest.raises(sources.DatasetNotFoundError) as excinfo:
        sources.load_idx("test", str(directory))
    _assert_names_fix(excinfo)


@pytest.mark.parametrize("payload,gz", [
    (b"<html>404 Not Found</html>" * 10, True),  # gzip, but not IDX
    (b"definitely not gzip", False),              # not even gzip
    (bytes([0, 0, 0x0D, 3]) + bytes(12), True),   # IDX of floats, not unsigned bytes
])
def test_non_idx_file_raises(synthetic_idx, payload, gz):
    directory, _ = synthetic_idx
    path = os.path.join(directory, sources._IDX_FILES["train"][1])
    if gz:
        _write_gz(path, payload)
    else:
        with open(path, "wb") as f:
            f.write(payload)
    with pytest.raises(sources.DatasetNotFoundError) as excinfo:
        sources.load_idx("train", str(directory))
    _assert_names_fix(excinfo)


def test_wrong_rank_and_mismatched_counts_raise(synthetic_idx):
    directory, sets = synthetic_idx
    label_path = os.path.join(directory, sources._IDX_FILES["test"][1])
    _write_gz(label_path, _idx_bytes(np.zeros((3, 2), np.uint8)))  # labels with 2 dims
    with pytest.raises(sources.DatasetNotFoundError, match="expected 1 dims"):
        sources.load_idx("test", str(directory))
    _write_gz(label_path, _idx_bytes(np.zeros((4,), np.uint8)))  # 3 images, 4 labels
    with pytest.raises(sources.DatasetNotFoundError, match="different sets"):
        sources.load_idx("test", str(directory))


def test_missing_directory_raises(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(sources.DatasetNotFoundError) as excinfo:
        sources.load("fashion_mnist", "train", source="idx", data_dir=str(missing))
    _assert_names_fix(excinfo)
    assert str(missing) in str(excinfo.value)
    assert isinstance(excinfo.value, FileNotFoundError)


def test_bad_arguments_raise_value_error(synthetic_idx):
    directory, _ = synthetic_idx
    with pytest.raises(ValueError, match="split"):
        sources.load_idx("validation", str(directory))
    with pytest.raises(ValueError, match="unknown dataset"):
        sources.load("imagenet", "train")
    with pytest.raises(ValueError, match="idx"):
        sources.load("cifar10", "train", source="idx")
    with pytest.raises(ValueError, match="data source"):
        sources.load("fashion_mnist", "train", source="web", data_dir=str(directory))


# --------------------------------------------------------------------------- #
# TFDS (mocked: no TensorFlow, no prepared data)
# --------------------------------------------------------------------------- #

# All four datasets mock quickly with MockPolicy.USE_CODE and no TensorFlow;
# CelebA's mock images have the real 218x178 size, so the crop+resize runs.
@pytest.mark.parametrize("name", ["fashion_mnist", "mnist", "cifar10", "svhn", "celeba"])
def test_tfds_mock_shapes(name):
    with _mock(6):
        train = sources.load(name, "train", source="tfds")
        test = sources.load(name, "test", source="tfds", max_examples=4)
    shape = sources.image_shape(name)
    assert train.images.shape == (6, *shape) and train.images.dtype == np.uint8
    assert test.images.shape == (4, *shape) and test.images.dtype == np.uint8
    assert train.labels.shape == (6,) and train.labels.dtype == np.int64
    if name == "celeba":
        assert shape == (64, 64, 3)
        np.testing.assert_array_equal(train.labels, -1)  # CelebA has no class label
    else:
        assert train.labels.min() >= 0 and train.labels.max() <= 9
    assert train.images.std() > 0  # random mock pixels, not an all-zero buffer


def test_celeba_crop_and_resize():
    # A 218x178 image whose centre 140x140 crop is white on a black border.
    image = np.zeros((218, 178, 3), np.uint8)
    top, left = (218 - 140) // 2, (178 - 140) // 2
    image[top : top + 140, left : left + 140] = 255
    out = sources._preprocess_tfds("celeba", image)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, 255)
    # Other datasets pass through untouched.
    same = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    assert sources._preprocess_tfds("cifar10", same) is same


def test_tfds_path_works_without_tensorflow():
    # tfds/etils probe for TensorFlow with importlib.util.find_spec and switch code
    # paths on it, so "without TensorFlow" can only be checked where it is absent.
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed here; this checks the TensorFlow-free path")
    with _mock(4):
        ds = sources.load("fashion_mnist", "train", source="tfds")
    assert ds.images.shape == (4, 28, 28, 1) and ds.images.dtype == np.uint8
    assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("name,tfds_name", [("cifar10", "cifar10"), ("celeba", "celeb_a")])
def test_unprepared_tfds_dataset_raises(tmp_path, name, tfds_name):
    with pytest.raises(sources.DatasetNotFoundError) as excinfo:
        sources.load(name, "train", source="tfds", data_dir=str(tmp_path))
    msg = str(excinfo.value)
    assert f"tfds build {tfds_name}" in msg, msg
    assert "--file_format=array_record" in msg, msg  # what tfds.data_source can read
    assert "--data_dir" in msg and "connected machine" in msg, msg
    assert str(tmp_path) in msg, msg
    assert not any(files for _, _, files in os.walk(tmp_path)), "loading must not write any data"


# --------------------------------------------------------------------------- #
# batches
# --------------------------------------------------------------------------- #


def _indexed_images(n):
    """uint8 images whose first pixel is their index (n <= 256)."""
    images = np.zeros((n, 4, 4, 1), np.uint8)
    images[:, 0, 0, 0] = np.arange(n)
    images[:, 1:, :, :] = 255
    return images


def _indices(batch):
    return np.rint((batch[:, 0, 0, 0] + 1.0) * 255.0 / 2.0).astype(np.int64)


def test_batches_shapes_dtype_range_and_partial_drop():
    images = _indexed_images(37)
    out = list(pipeline.batches(images, 8, seed=0, epoch=0))
    assert len(out) == 4  # 37 // 8; the 5 left over are dropped
    for b in out:
        assert b.shape == (8, 4, 4, 1) and b.dtype == np.float32
        assert b.min() >= -1.0 and b.max() <= 1.0
        np.testing.assert_array_equal(b[:, 1:], 1.0)  # 255 -> 1
    idx = np.concatenate([_indices(b) for b in out])
    assert len(set(idx.tolist())) == 32  # no image twice in an epoch
    assert set(idx.tolist()) <= set(range(37))
    # Exact scaling: pixel k -> 2k/255 - 1; 0 -> -1.
    np.testing.assert_allclose(sources.to_float(np.array([0, 51, 255], np.uint8)),
                               np.array([-1.0, -0.6, 1.0], np.float32), rtol=0, atol=1e-6)
    assert list(pipeline.batches(images, 64, seed=0, epoch=0)) == []


def test_batches_deterministic_per_seed_and_epoch():
    images = _indexed_images(40)

    def order(seed, epoch):
        return np.concatenate([_indices(b) for b in pipeline.batches(images, 10, seed, epoch)])

    np.testing.assert_array_equal(order(3, 1), order(3, 1))
    assert not np.array_equal(order(3, 0), order(3, 1))  # reshuffled every epoch
    assert not np.array_equal(order(3, 0), order(4, 0))  # and per seed
    np.testing.assert_array_equal(np.sort(order(3, 2)), np.arange(40))  # a permutation


def test_epoch_order_is_the_order_of_batches():
    images = _indexed_images(40)
    for seed, epoch in ((0, 0), (3, 2)):
        order = pipeline.epoch_order(40, seed, epoch)
        np.testing.assert_array_equal(np.sort(order), np.arange(40))
        got = np.concatenate([_indices(b) for b in pipeline.batches(images, 10, seed, epoch)])
        np.testing.assert_array_equal(got, order)  # batch i is order[10 i : 10 (i + 1)]
    # The order is numpy's permutation under the (seed, epoch) entropy: fixed across versions of this code.
    np.testing.assert_array_equal(pipeline.epoch_order(10, 4, 1), np.random.default_rng([4, 1]).permutation(10))


def test_step_batches_follow_the_epoch_order_from_any_start():
    images = np.arange(10 * 2 * 2 * 1, dtype=np.uint8).reshape(10, 2, 2, 1)
    epochs = [list(pipeline.batches(images, 3, seed=4, epoch=e)) for e in range(3)]
    schedule = [b for epoch in epochs for b in epoch]  # 3 batches per epoch
    for start in (0, 2, 3, 5):
        got = list(pipeline.step_batches(images, 3, seed=4, start_step=start, num_steps=8, host_float=True))
        assert [s for s, _ in got] == list(range(start, 8))
        for s, batch in got:
            np.testing.assert_array_equal(batch, schedule[s])


def test_step_batch_shards_partition_the_global_batch():
    # Two simulated processes, each reading its half: together exactly the global
    # batch in order, nothing missing, nothing duplicated.
    images = _indexed_images(40)
    whole = list(pipeline.step_batches(images, 8, seed=1, start_step=3, num_steps=12))
    shards = [list(pipeline.step_batches(images, 8, seed=1, start_step=3, num_steps=12,
                                     shard_index=i, shard_count=2)) for i in range(2)]
    for (step, batch), (s0, b0), (s1, b1) in zip(whole, *shards):
        assert step == s0 == s1
        assert b0.shape == b1.shape == (4, 4, 4, 1)
        np.testing.assert_array_equal(b0, batch[:4])
        np.testing.assert_array_equal(b1, batch[4:])
        np.testing.assert_array_equal(np.concatenate([b0, b1]), batch)
    assert len(shards[0]) == len(shards[1]) == len(whole) == 9
    assert pipeline.shard_rows(12, 2, 4) == slice(6, 9)


@pytest.mark.parametrize("index,count,match", [(0, 3, "not divisible by the 3 processes"),
                                               (2, 2, r"shard_index 2 is out of range"),
                                               (-1, 2, "out of range"),
                                               (0, 0, "shard_count must be >= 1")])
def test_bad_shard_raises(index, count, match):
    with pytest.raises(ValueError, match=match):
        next(pipeline.step_batches(_indexed_images(40), 8, 0, 0, 4, shard_index=index, shard_count=count))
