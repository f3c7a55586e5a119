"""The file readers (CIFAR-10 batches, SVHN .mat, CelebA folder/zip, image folders), discovery and the cache,
on tiny fixtures made from real Fashion-MNIST images (tests/data/file_fixtures.py)."""

import os
import pickle

import numpy as np
import pytest

from lpc_jax.data import celeba, discover, folder, sources
from lpc_jax.data.images import celeba_crop, square_resize
from tests.data import file_fixtures as fx

pytestmark = pytest.mark.skipif(not os.path.isdir(sources.DEFAULT_IDX_DIR),
                                reason="needs Debian's dataset-fashion-mnist (the fixtures' real pixels)")

PARTITION = [0] * 8 + [1] * 3 + [2] * 4  # 15 images: 8 train, 3 validation, 4 test


@pytest.fixture(autouse=True)
def _no_other_roots(tmp_path, monkeypatch):
    """Only the data_dir a test passes is searched: no env vars, HOME and cwd empty."""
    for var in (discover.ENV_VAR, "TFDS_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cifar"))
    images, labels = fx.fashion_mnist(26)
    return root, fx.write_cifar10(root, images, labels, per_batch=4, num_test=6)


def test_cifar10_batches_give_the_images_they_were_made_from(cifar_dir):
    root, want = cifar_dir
    for split in ("train", "test"):
        ds = sources.load("cifar10", split, "files", data_dir=root)
        assert ds.images.dtype == np.uint8 and ds.images.shape == want[split].shape
        np.testing.assert_array_equal(ds.images, want[split])
        np.testing.assert_array_equal(ds.labels, want[f"{split}_labels"])
    auto = sources.open_images("cifar10", "train", "auto", data_dir=root, max_examples=7)
    assert isinstance(auto, np.ndarray)
    np.testing.assert_array_equal(auto, want["train"][:7])
    # The root may also be cifar-10-batches-py itself.
    np.testing.assert_array_equal(sources.load("cifar10", "test", "files", data_dir=want["folder"]).images,
                                  want["test"])


def _copy_cifar(src_folder, dst_root):
    dst = os.path.join(dst_root, "cifar-10-batches-py")
    os.makedirs(dst)
    for name in os.listdir(src_folder):
        with open(os.path.join(src_folder, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            g.write(f.read())
    return dst


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_cifar10_bad_files_are_clear_errors(cifar_dir, tmp_path):
    _, want = cifar_dir
    dst = _copy_cifar(want["folder"], str(tmp_path))
    path = os.path.join(dst, "data_batch_3")
    raw = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 2])
    with pytest.raises(sources.DatasetNotFoundError, match="data_batch_3 is truncated or not a CIFAR-10"):
        sources.load("cifar10", "train", "files", data_dir=str(tmp_path))
    with open(path, "wb") as f:
        pickle.dump({b"data": _Exploit()}, f)
    with pytest.raises(sources.DatasetNotFoundError, match="refusing to load posix.system"):
        sources.load("cifar10", "train", "files", data_dir=str(tmp_path))
    with open(path, "wb") as f:  # a batch of another size than the others
        pickle.dump({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1, 2]}, f, protocol=2)
    with pytest.raises(sources.DatasetNotFoundError, match=r"different sizes \[3, 4\]"):
        sources.load("cifar10", "train", "files", data_dir=str(tmp_path))
    # The published 10,000 rows claim to be the real batch: the md5 must match.
    with open(path, "wb") as f:
        pickle.dump({b"data": np.zeros((10000, 3072), np.uint8), b"labels": [0] * 10000}, f, protocol=2)
    with pytest.raises(sources.DatasetNotFoundError, match="not the published md5 54ebc095"):
        sources.load("cifar10", "train", "files", data_dir=str(tmp_path))
    os.remove(path)
    with pytest.raises(sources.DatasetNotFoundError, match="data_batch_3 not found.*cifar-10-python.tar.gz"):
        sources.load("cifar10", "train", "files", data_dir=str(tmp_path))


def test_svhn_mat_files_give_the_images_they_were_made_from(tmp_path):
    images, labels = fx.fashion_mnist(20, offset=100)
    want = fx.write_svhn(str(tmp_path), images, labels, num_train=12)
    assert (labels == 0).any()  # the label 10 -> digit 0 mapping is exercised
    for split in ("train", "test"):
        ds = sources.load("svhn", split, "auto", data_dir=str(tmp_path))
        np.testing.assert_array_equal(ds.images, want[split])
        np.testing.assert_array_equal(ds.labels, want[f"{split}_labels"])


def test_svhn_bad_files_are_clear_errors(tmp_path):
    import scipy.io

    images, labels = fx.fashion_mnist(6)
    fx.write_svhn(str(tmp_path), images, labels, num_train=4)
    path = str(tmp_path / "train_32x32.mat")
    raw = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(raw[:300])
    with pytest.raises(sources.DatasetNotFoundError, match="train_32x32.mat is truncated or not a MATLAB file"):
        sources.load("svhn", "train", "files", data_dir=str(tmp_path))
    scipy.io.savemat(path, {"X": np.zeros((28, 28, 1, 4), np.uint8), "y": np.ones((4, 1))})
    with pytest.raises(sources.DatasetNotFoundError, match=r"not an SVHN 32x32 file.*\(28, 28, 1, 4\)"):
        sources.load("svhn", "train", "files", data_dir=str(tmp_path))


@pytest.fixture(scope="module")
def celeba_sets(tmp_path_factory):
    images, _ = fx.fashion_mnist(len(PARTITION), offset=200)
    out = {}
    for layout in ("torchvision", "zip", "kaggle"):
        root = str(tmp_path_factory.mktemp(f"celeba_{layout}"))
        out[layout] = (root, fx.write_celeba(root, images, PARTITION, layout=layout))
    return out


@pytest.mark.parametrize("layout", ["torchvision", "zip", "kaggle"])
def test_celeba_reads_each_layout_lazily_with_the_tfds_preprocessing(celeba_sets, layout):
    root, made = celeba_sets[layout]
    for split, part in (("train", 0), ("test", 2)):
        rows = [i for i, p in enumerate(PARTITION) if p == part]
        lazy = sources.open_images("celeba", split, "auto", data_dir=root)
        assert isinstance(lazy, celeba.CelebAFiles) and lazy.shape == (len(rows), 64, 64, 3)
        got = np.asarray(lazy)
        np.testing.assert_array_equal(got, np.stack([celeba_crop(made["pixels"][i]) for i in rows]))
        # and close to the image before JPEG: a mean error of a few grey levels
        before = np.stack([celeba_crop(made["source"][i]) for i in rows]).astype(np.float64)
        assert np.abs(got - before).mean() < 3.0
        np.testing.assert_array_equal(lazy[[2, 0]], got[[2, 0]])
    ds = sources.load("celeba", "train", "files", data_dir=root, max_examples=5)
    assert ds.images.shape == (5, 64, 64, 3) and (ds.labels == -1).all()


def test_celeba_files_and_tfds_give_the_same_pixels_for_the_same_jpeg(celeba_sets):
    tfds = pytest.importorskip("tensorflow_datasets")
    root, made = celeba_sets["zip"]
    feature = tfds.features.Image(encoding_format="jpeg")  # the celeb_a builder stores the JPEG bytes as they are
    train = [i for i, p in enumerate(PARTITION) if p == 0]
    fake_source = [{"image": feature.decode_example_np(made["blobs"][i])} for i in train]
    from_tfds = sources.TfdsImages("celeba", fake_source, len(train))
    from_files = sources.open_images("celeba", "train", "files", data_dir=root)
    assert np.asarray(from_files).tobytes() == np.asarray(from_tfds).tobytes()


def test_celeba_bad_partition_or_missing_images_are_clear_errors(celeba_sets, tmp_path):
    root, made = celeba_sets["torchvision"]
    base = tmp_path / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    for name in made["names"][:-1]:  # the last (a test image) is missing
        os.link(os.path.join(root, "celeba", "img_align_celeba", name), base / "img_align_celeba" / name)
    partition = base / "list_eval_partition.txt"
    partition.write_text("".join(f"{n} {p}\n" for n, p in zip(made["names"], PARTITION)))
    sources.open_images("celeba", "train", "files", data_dir=str(tmp_path))  # train is complete
    with pytest.raises(sources.DatasetNotFoundError, match=r"1 of the 4 test images listed .* are not in"):
        sources.open_images("celeba", "test", "files", data_dir=str(tmp_path))
    partition.write_text("000001.jpg 0\n000002.jpg train\n")
    with pytest.raises(sources.DatasetNotFoundError, match="line 2 is '000002.jpg train'"):
        sources.open_images("celeba", "train", "files", data_dir=str(tmp_path))
    full = [0] * 162771 + [1] * 19866 + [2] * 19962  # 202,599 names, split sizes off by one
    partition.write_text("".join(f"{i + 1:06d}.jpg {p}\n" for i, p in enumerate(full)))
    with pytest.raises(sources.DatasetNotFoundError, match="lists the 202,599 CelebA images but splits them"):
        sources.open_images("celeba", "train", "files", data_dir=str(tmp_path))


def test_celeba_truncated_zip_or_jpeg_is_a_clear_error(celeba_sets, tmp_path):
    root, made = celeba_sets["zip"]
    base = tmp_path / "celeba"
    base.mkdir()
    (base / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(made["names"], PARTITION)))
    raw = open(os.path.join(root, "celeba", "img_align_celeba.zip"), "rb").read()
    (base / "img_align_celeba.zip").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(sources.DatasetNotFoundError, match="img_align_celeba.zip is truncated or not a zip"):
        sources.open_images("celeba", "train", "files", data_dir=str(tmp_path))
    os.remove(base / "img_align_celeba.zip")
    (base / "img_align_celeba").mkdir()
    for name, blob in zip(made["names"], made["blobs"]):
        (base / "img_align_celeba" / name).write_bytes(blob[:200])
    with pytest.raises(sources.DatasetNotFoundError, match="cannot decode image .*000001.jpg"):
        sources.open_images("celeba", "train", "files", data_dir=str(tmp_path))


@pytest.mark.parametrize("name,tfds_name", [("celeba", "celeb_a"), ("cifar10", "cifar10"), ("svhn", "svhn_cropped")])
def test_not_found_lists_every_layout_and_every_path_searched(tmp_path, monkeypatch, name, tfds_name):
    env_root = tmp_path / "from_env"
    monkeypatch.setenv(discover.ENV_VAR, str(env_root))
    with pytest.raises(sources.DatasetNotFoundError) as excinfo:
        sources.open_images(name, "train", "auto", data_dir=str(tmp_path / "mine"))
    msg = str(excinfo.value)
    for layout in discover.LAYOUTS[name]:
        assert f"ROOT/{layout}" in msg, msg
    assert f"tfds build {tfds_name} --file_format=array_record" in msg, msg
    home = os.environ["HOME"]
    for path in (tmp_path / "mine", env_root, f"{home}/tensorflow_datasets", f"{home}/data"):
        assert f"  {path}   (does not exist)" in msg, msg
    with pytest.raises(sources.DatasetNotFoundError) as excinfo:
        sources.open_images(name, "train", "files", data_dir=str(tmp_path / "mine"))
    assert "tfds build" not in str(excinfo.value)  # --data_source=files accepts only the files


def test_search_order_data_dir_then_env_then_home(cifar_dir, tmp_path, monkeypatch):
    root, want = cifar_dir
    monkeypatch.setenv(discover.ENV_VAR, root)
    np.testing.assert_array_equal(sources.load("cifar10", "test", "auto").images, want["test"])
    assert discover.search_roots(str(tmp_path))[:2] == [str(tmp_path), root]
    home_data = os.path.join(os.environ["HOME"], "data")
    assert discover.search_roots(None)[-1] == home_data
    # A TFDS-prepared copy in an earlier root wins under auto, not under files.
    (tmp_path / "cifar10" / "3.0.2").mkdir(parents=True)
    (tmp_path / "cifar10" / "3.0.2" / "dataset_info.json").write_text("{}")
    assert discover.locate("cifar10", "cifar10", str(tmp_path)).kind == "tfds"
    assert discover.locate("cifar10", "cifar10", str(tmp_path), allow_tfds=False).root == root


def test_folder_dataset_splits_by_name_hash_and_centre_crops(tmp_path):
    images, _ = fx.fashion_mnist(40, offset=300)
    names = fx.write_folder(str(tmp_path), images)
    (tmp_path / "notes.txt").write_text("not an image")
    train = sources.open_images("folder", "train", "files", data_dir=str(tmp_path))
    test = sources.load("folder", "test", "auto", data_dir=str(tmp_path), image_size=32)
    assert train.names + sorted(n for n in names if folder.is_test(n)) != names  # both splits hold images
    assert sorted(train.names + [n for n in names if folder.is_test(n)]) == names
    assert [n for n in names if folder.is_test(n)] and not set(train.names) & {n for n in names if folder.is_test(n)}
    from PIL import Image

    def expect(name, size):
        return square_resize(np.asarray(Image.open(tmp_path / name).convert("RGB")), size)

    np.testing.assert_array_equal(np.asarray(train), np.stack([expect(n, 64) for n in train.names]))
    assert test.images.shape == (len(names) - len(train.names), 32, 32, 3)
    np.testing.assert_array_equal(test.images[0], expect([n for n in names if folder.is_test(n)][0], 32))
    # the 40x48 source's centre 40x40 square, so the crop is exact: rows 4..44
    src = np.asarray(Image.open(tmp_path / train.names[0]).convert("RGB"))
    np.testing.assert_array_equal(square_resize(src, 40), src[4:44])
    with pytest.raises(sources.DatasetNotFoundError, match="needs --data_dir=DIR"):
        sources.open_images("folder", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(sources.DatasetNotFoundError, match="holds no .jpg"):
        sources.open_images("folder", "train", data_dir=str(tmp_path / "empty"))
    with pytest.raises(sources.DatasetNotFoundError, match="is not a folder"):
        sources.open_images("folder", "train", data_dir=str(tmp_path / "nothing_here"))
    with pytest.raises(ValueError, match=r"image_size=48 is invalid"):
        sources.image_shape("folder", 48)


def test_cache_is_built_once_and_rebuilt_when_the_source_changes(celeba_sets, tmp_path, monkeypatch):
    root, made = celeba_sets["zip"]
    lazy = sources.open_images("celeba", "train", "files", data_dir=root)
    cache_dir = tmp_path / "cache"
    first = sources.open_images("celeba", "train", "files", data_dir=root, cache=str(cache_dir))
    assert isinstance(first, np.memmap) and not first.flags.writeable
    np.testing.assert_array_equal(first, np.asarray(lazy))
    stem = cache_dir / "celeba-train-8x64x64x3"
    assert (stem.with_suffix(".npy")).exists() and (stem.with_suffix(".json")).exists()

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")

    with monkeypatch.context() as m:  # building decodes with read_rows: a reuse must not call it
        m.setattr(celeba.CelebAFiles, "read_rows", no_decoding)
        again = sources.open_images("celeba", "train", "files", data_dir=root, cache=str(cache_dir))
    np.testing.assert_array_equal(again, first)
    mtime = os.path.getmtime(stem.with_suffix(".npy"))
    sources.open_images("celeba", "train", "files", data_dir=root, cache=str(cache_dir))
    assert os.path.getmtime(stem.with_suffix(".npy")) == mtime  # reused, not rewritten
    # Another source (a different partition: other files) has another fingerprint: rebuilt.
    other = tmp_path / "other"
    fx.write_celeba(str(other), fx.fashion_mnist(len(PARTITION), offset=500)[0], PARTITION, layout="zip")
    os.makedirs(cache_dir, exist_ok=True)
    rebuilt = sources.open_images("celeba", "train", "files", data_dir=str(other), cache=str(cache_dir))
    np.testing.assert_array_equal(rebuilt, np.asarray(sources.open_images("celeba", "train", "files",
                                                                          data_dir=str(other))))
    assert not np.array_equal(rebuilt, first)


def test_config_checks_the_file_fields():
    from lpc_jax.training.config import Config, ConfigError

    Config(dataset="folder", image_size=32, data_source="files", data_cache="auto").validate()
    with pytest.raises(ConfigError, match=r"^image_size=48 is invalid: must be 32 or 64"):
        Config(dataset="folder", image_size=48).validate()
    with pytest.raises(ConfigError, match=r"^image_size=32 is invalid: applies to --dataset=folder only"):
        Config(dataset="celeba", image_size=32).validate()
    with pytest.raises(ConfigError, match=r"^data_source='web' is invalid"):
        Config(data_source="web").validate()
