"""Tests of lpc_jax.evaluation.classifier: shipped weights, features, accuracy and fd_fmnist behaviour."""

import os
import shutil

import numpy as np
import pytest

from lpc_jax.data import sources
from lpc_jax.evaluation import classifier, sample_metrics


@pytest.fixture(scope="module")
def pretrained():
    return classifier.load_pretrained("fashion_mnist")


@pytest.fixture(scope="module")
def fmnist():
    try:
        return sources.load_idx("train"), sources.load_idx("test")
    except sources.DatasetNotFoundError as e:
        pytest.skip(f"Fashion-MNIST IDX files not installed: {e}")


@pytest.fixture(scope="module")
def train_test_features(pretrained, fmnist):
    train, test = fmnist
    n = 3000
    return (classifier.features(pretrained.params, train.images[:n]),
            classifier.features(pretrained.params, test.images[:n]))


def test_shipped_weights_load_with_metadata(pretrained):
    weights_path, _ = classifier.asset_paths("fashion_mnist")
    assert os.path.getsize(weights_path) < 1_000_000
    assert pretrained.info["feature_dim"] == classifier.FEATURE_DIM
    assert pretrained.info["test_accuracy"] > 0.88
    for key in ("seed", "num_epochs", "weights_sha256"):
        assert key in pretrained.info


def test_features_shape_and_input_formats(pretrained, fmnist):
    images = fmnist[1].images[:37]
    feats = classifier.features(pretrained.params, images, batch_size=16)  # padded last batch
    assert feats.shape == (37, classifier.FEATURE_DIM) and feats.dtype == np.float32
    assert np.all(feats >= 0)  # post-ReLU
    as_float = classifier.features(pretrained.params, sources.to_float(images)[..., 0], batch_size=64)
    np.testing.assert_allclose(as_float, feats, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="28, 28"):
        classifier.features(pretrained.params, np.zeros((2, 32, 32, 1), np.float32))


def test_accuracy_on_first_1000_test_images(pretrained, fmnist):
    test = fmnist[1]
    assert classifier.accuracy(pretrained.params, test.images[:1000], test.labels[:1000]) > 0.85


def test_fd_fmnist_of_a_set_with_itself_is_zero(pretrained, fmnist):
    images = fmnist[0].images[:2000]
    assert classifier.fd_fmnist(images, images, pretrained.params) == pytest.approx(0.0, abs=1e-6)


def test_fd_train_vs_test_small_and_monotone_in_noise(pretrained, fmnist, train_test_features):
    train_feats, test_feats = train_test_features
    fd_train_test = sample_metrics.fd_from_features(train_feats, test_feats)
    clean = sources.to_float(fmnist[1].images[:3000])
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(clean.shape).astype(np.float32)
    fds = []
    for sigma in (0.1, 0.2, 0.4, 0.8):
        noisy = np.clip(clean + sigma * noise, -1.0, 1.0)
        fds.append(sample_metrics.fd_from_features(train_feats, classifier.features(pretrained.params, noisy)))
    assert fd_train_test < 0.5 * fds[0], (fd_train_test, fds)
    assert all(a < b for a, b in zip(fds, fds[1:])), fds


def test_missing_and_corrupt_assets_raise_clear_errors(tmp_path, monkeypatch):
    weights_path, info_path = classifier.asset_paths("fashion_mnist")
    monkeypatch.setattr(classifier, "ASSETS_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="experiments.train_classifier"):
        classifier.load_pretrained("fashion_mnist")
    shutil.copy(info_path, tmp_path)
    shutil.copy(weights_path, tmp_path)
    copied = tmp_path / os.path.basename(weights_path)
    copied.write_bytes(copied.read_bytes()[:-100])  # truncated
    with pytest.raises(ValueError, match="SHA-256"):
        classifier.load_pretrained("fashion_mnist")
    with pytest.raises(ValueError, match="unknown classifier"):
        classifier.load_pretrained("cifar10")
