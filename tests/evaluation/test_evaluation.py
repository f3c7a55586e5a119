"""Tests of lpc_jax.evaluation and the experiments.evaluate command line.

One tiny LPC run on the real Fashion-MNIST IDX files (64 training images,
batch 16, T = 2, 4 SGD steps, checkpoints at steps 2 and 4) is trained once per
module; every test evaluates it with small sample counts.
"""

import functools
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from lpc_jax.data import sources
from lpc_jax.evaluation import (
    bounds,
    classifier,
    evaluators,
    features,
    inception,
    monitor,
)
from lpc_jax.model import objectives
from lpc_jax.model.state import create_train_state
from lpc_jax.runtime import checkpoints
from lpc_jax.training import restore, train
from lpc_jax.training.config import Config
from lpc_jax.training.evaluate import evaluate
from tests import tiny_model as tiny

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = Config(dataset="fashion_mnist", data_source="idx", max_train_examples=64, batch_size=16,
                num_steps=2, num_train_steps=4, eval_examples=64, log_every=2, checkpoint_every=2)


@pytest.fixture(scope="module")
def test_images():
    try:
        return sources.load("fashion_mnist", "test", "idx").images
    except sources.DatasetNotFoundError as e:
        pytest.skip(f"Fashion-MNIST IDX files not installed: {e}")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, test_images):
    workdir = str(tmp_path_factory.mktemp("run"))
    train.train_and_evaluate(CONFIG, workdir)
    return workdir


@pytest.fixture(scope="module")
def loaded(run_dir):
    return restore.load_run(run_dir)


@pytest.fixture(scope="module")
def result(loaded, run_dir, test_images):
    config, model, state = loaded
    options = evaluators.EvalOptions(iwae_samples=64, iwae_examples=16, iwae_batch_size=16, elbo_examples=64,
                                     kid_subsets=10, kid_subset_size=100, sample_batch_size=100)
    return evaluate(config, model, state, num_samples=200, rng_key=jax.random.key(1), options=options,
                               samples_png=os.path.join(run_dir, "eval_samples.png"), test_images=test_images)


# --------------------------------------------------------------------------- #
# load_run
# --------------------------------------------------------------------------- #


def test_load_run_restores_the_newest_or_a_given_step(run_dir, loaded):
    config, model, state = loaded
    assert config == CONFIG and int(state.step) == 4
    assert set(state.params) == {"decoder", "encoder"}
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state.params))
    assert restore.checkpoint_steps(run_dir) == [2, 4]
    _, _, state2 = restore.load_run(run_dir, step=2)
    assert int(state2.step) == 2
    with pytest.raises(checkpoints.CheckpointError, match=r"step 3.*available: \[2, 4\]"):
        restore.load_run(run_dir, step=3)


def test_load_run_errors_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        restore.load_run(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        restore.load_run(str(tmp_path))
    (tmp_path / "config.json").write_text(CONFIG.to_json())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        restore.load_run(str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()  # evaluating never creates run files


# --------------------------------------------------------------------------- #
# Test ELBO
# --------------------------------------------------------------------------- #


def test_test_elbo_is_the_mean_of_reparameterized_elbos_with_the_documented_keys():
    model = tiny.tiny_model(optax.adam(1e-3))
    params = create_train_state(jax.random.key(0), model, tiny.SHAPE, tiny.LATENT).params
    images = np.random.default_rng(0).integers(0, 256, (23, *tiny.SHAPE)).astype(np.uint8)
    key = jax.random.key(5)
    out = bounds.test_elbo(params, model, images, key, batch_size=10)
    # Documented schedule: batch i = images[10 i : 10 i + 10] zero-padded to 10 rows, key fold_in(key, i).
    direct = []
    for i in range(3):
        x = sources.to_float(images[10 * i : 10 * i + 10])
        valid = x.shape[0]
        x = np.concatenate([x, np.zeros((10 - valid, *tiny.SHAPE), np.float32)])
        mean, variance = model.encoder.apply({"params": params["encoder"]}, x)
        elbo = objectives.reparameterized_elbo(jax.random.fold_in(key, i), mean, variance,
                                               lambda z: model.log_joint(params["decoder"], x, z))
        direct.append(np.asarray(elbo)[:valid])
    expected = float(np.mean(np.concatenate(direct), dtype=np.float64))
    assert set(out) == {"test_elbo_nats", "test_elbo_bits_per_dim", "test_examples"}
    assert out["test_examples"] == 23
    assert out["test_elbo_nats"] == pytest.approx(expected, rel=1e-6)
    assert out["test_elbo_bits_per_dim"] == pytest.approx(float(bounds.bits_per_dim(expected, 36)), rel=1e-6)
    # Padding does not leak into the mean: the first 20 images alone, two full batches.
    first20 = bounds.test_elbo(params, model, images[:20], key, batch_size=10)
    assert first20["test_elbo_nats"] == pytest.approx(float(np.mean(np.concatenate(direct)[:20], dtype=np.float64)),
                                                      rel=1e-6)
    with pytest.raises(ValueError, match="at least one image"):
        bounds.test_elbo(params, model, images[:0], key)


# --------------------------------------------------------------------------- #
# evaluate
# --------------------------------------------------------------------------- #


def test_evaluate_reports_every_metric(result, run_dir):
    for key in ("fd_fmnist", "kid_fmnist", "kid_fmnist_std", "density_fmnist", "coverage_fmnist",
                "iwae_log_likelihood_nats", "iwae_log_likelihood_stderr_nats", "iwae_bits_per_dim",
                "elbo_on_iwae_examples_nats", "iwae_minus_elbo_nats", "test_elbo_nats",
                "test_elbo_bits_per_dim", "wall_s"):
        assert isinstance(result[key], float) and math.isfinite(result[key]), key
    assert result["num_samples"] == result["num_real"] == 200
    assert result["iwae_samples"] == 64 and result["iwae_examples"] == 16
    per_image = result["iwae_per_image_nats"]  # the mean above is the mean of these
    assert len(per_image) == 16 and math.isclose(sum(per_image) / 16, result["iwae_log_likelihood_nats"],
                                                 rel_tol=1e-9)
    assert result["test_elbo_examples"] == 64 and result["step"] == 4
    assert result["fd_fmnist"] > 0 and 0 <= result["coverage_fmnist"] <= 1 and result["density_fmnist"] >= 0
    assert result["iwae_bits_per_dim"] > 0 and result["test_elbo_bits_per_dim"] > 0
    assert set(result["feature_extractors"]) == {"fmnist"}
    assert "classifier" in result["feature_extractors"]["fmnist"]
    assert "fid" not in result and any("Inception" in n for n in result["notes"])
    assert {"load_test_data", "sampling", "classifier", "likelihood"} <= set(result["timings_s"])
    json.dumps(result, allow_nan=False)  # serialisable as is
    with open(os.path.join(run_dir, "eval_samples.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_iwae_bound_is_above_the_elbo(result):
    # Same 16 images; K = 64 importance samples vs the single-sample ELBO. For a
    # barely trained model the gap is tens of nats, far above the noise.
    assert result["iwae_minus_elbo_nats"] > 0
    assert result["iwae_log_likelihood_nats"] > result["elbo_on_iwae_examples_nats"]


def test_default_iwae_chunk_divides_k():
    # A divisor of K means the scan has no separately compiled remainder chunk.
    assert bounds._largest_divisor_at_most(5000, 40) == 40
    assert bounds._largest_divisor_at_most(64, 40) == 32
    assert bounds._largest_divisor_at_most(7, 40) == 7
    assert bounds._largest_divisor_at_most(97, 40) == 1


def test_inception_metrics_are_named_and_computed(loaded, test_images, monkeypatch):
    # The real network needs pytorch-fid's weights and minutes of CPU; swap in a
    # cheap deterministic embedding to check the plumbing and naming.
    config, model, state = loaded

    def fake_features(variables, images, batch_size=50, size=299):
        x = np.asarray(images, np.float32).reshape(len(images), -1)
        return np.tanh(x[:, ::7] / 64.0)  # (N, 112)

    monkeypatch.setattr(inception, "inception_features", fake_features)
    options = evaluators.EvalOptions(inception_variables={}, iwae_samples=0, elbo_examples=16, kid_subsets=2)
    out = evaluate(config, model, state, num_samples=50, rng_key=jax.random.key(2), options=options,
                              test_images=test_images)
    for key in ("fid", "kid_inception", "kid_inception_std", "density_inception", "coverage_inception"):
        assert math.isfinite(out[key]), key
    assert set(out["feature_extractors"]) == {"fmnist", "inception"}
    assert "iwae_log_likelihood_nats" not in out


def test_missing_inception_weights_is_a_clear_error(loaded, test_images, tmp_path):
    config, model, state = loaded
    with pytest.raises(FileNotFoundError, match="Inception weights not found"):
        evaluate(config, model, state, num_samples=10, rng_key=jax.random.key(0),
                            options=evaluators.EvalOptions(inception_weights=str(tmp_path / "missing.pth")),
                            test_images=test_images)


def test_feature_metrics_of_two_halves_of_the_test_set(test_images):
    params = classifier.load_pretrained("fashion_mnist").params
    a = classifier.features(params, test_images[:1000])
    b = classifier.features(params, test_images[1000:2000])
    out = features.feature_metrics(a, b, suffix="fmnist", fd_name="fd_fmnist", kid_subsets=5,
                                     kid_subset_size=500)
    assert out["fd_fmnist"] < 20 and abs(out["kid_fmnist"]) < 0.5
    assert 0.8 < out["density_fmnist"] < 1.2 and 0.9 < out["coverage_fmnist"] <= 1.0


# --------------------------------------------------------------------------- #
# Evaluators by name
# --------------------------------------------------------------------------- #

CLASSIFIER_KEYS = {"fd_fmnist", "kid_fmnist", "kid_fmnist_std", "density_fmnist", "coverage_fmnist"}
LIKELIHOOD_KEYS = {"iwae_log_likelihood_nats", "iwae_log_likelihood_stderr_nats", "iwae_bits_per_dim",
                   "iwae_samples", "iwae_examples", "elbo_on_iwae_examples_nats", "iwae_minus_elbo_nats", "iwae_per_image_nats",
                   "test_elbo_nats", "test_elbo_bits_per_dim", "test_elbo_examples"}


def test_evaluators_are_selected_by_name_and_return_their_keys(loaded, test_images):
    config, model, state = loaded
    options = evaluators.EvalOptions(iwae_samples=8, iwae_examples=4, iwae_batch_size=4, elbo_examples=12,
                                     kid_subsets=2, kid_subset_size=50)
    assert evaluators.default_evaluators(options) == ("classifier", "likelihood")
    assert evaluators.default_evaluators(options._replace(inception_weights="auto"))[1] == "inception"
    bound = evaluators.make_evaluators(["likelihood", "classifier"], config.dataset, options, test_images)
    real = test_images[:60]
    fake = sources.to_float(test_images[60:120])
    key = jax.random.key(7)
    lik = bound["likelihood"](state.params, model, real, fake, key)
    assert set(lik) == LIKELIHOOD_KEYS and lik["iwae_examples"] == 4 and lik["test_elbo_examples"] == 12
    clf = bound["classifier"](state.params, model, real, fake, key)
    assert set(clf) == CLASSIFIER_KEYS | {"feature_extractors"} and set(clf["feature_extractors"]) == {"fmnist"}
    # The likelihood evaluator's test ELBO is test_elbo on the same images with the ELBO half of its key.
    direct = bounds.test_elbo(state.params, model, test_images[:12], jax.random.split(key)[1])
    assert lik["test_elbo_nats"] == direct["test_elbo_nats"]
    # evaluate() runs only the named evaluators, each timed under its name.
    out = evaluate(config, model, state, num_samples=20, rng_key=jax.random.key(0), options=options,
                              evaluators=["likelihood"], test_images=test_images)
    assert LIKELIHOOD_KEYS <= set(out) and not CLASSIFIER_KEYS & set(out)
    assert "likelihood" in out["timings_s"] and "classifier" not in out["timings_s"]
    with pytest.raises(ValueError, match="unknown evaluator.*'fid'.*choose from.*classifier"):
        evaluators.make_evaluators(["fid"], config.dataset, options, test_images)


def test_an_evaluator_without_feature_extractor_is_skipped_with_a_note():
    bound = {"classifier": functools.partial(evaluators.classifier_metrics, dataset="cifar10"),
                  "constant": lambda params, model, real, fake, key: {"answer": 42.0, "notes": ["n"]}}
    images = np.zeros((4, 32, 32, 3), np.uint8)
    out = evaluators.run_evaluators(bound, None, None, images, images.astype(np.float32), jax.random.key(0))
    assert out["answer"] == 42.0 and set(out["timings_s"]) == {"constant"}
    assert out["notes"][0].startswith("classifier metrics skipped: dataset 'cifar10'") and out["notes"][1] == "n"


def test_importing_the_train_loop_does_not_import_the_inception_network():
    code = ("import sys, lpc_jax.training.train, lpc_jax.evaluation.evaluators; "
            "print(sorted(m for m in sys.modules if m in ('lpc_jax.evaluation.inception', 'lpc_jax.evaluation.torch_checkpoint')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


# --------------------------------------------------------------------------- #
# FDMonitor
# --------------------------------------------------------------------------- #


def test_fd_monitor_returns_a_finite_fd_fmnist(loaded, result):
    config, model, state = loaded
    fd = monitor.FDMonitor.from_config(config, num_samples=200, batch_size=100)
    assert fd.metric_name == "fd_fmnist" and fd.num_real == 200
    sample_key = jax.random.split(jax.random.key(1))[0]  # evaluate()'s sampling key
    out = fd(state.params, model, config, sample_key)
    assert set(out) == {"fd_fmnist"} and isinstance(out["fd_fmnist"], float)
    assert math.isfinite(out["fd_fmnist"]) and out["fd_fmnist"] > 0
    # Same key and samples as evaluate(): the same value.
    assert out["fd_fmnist"] == pytest.approx(result["fd_fmnist"], rel=1e-4)
    assert fd(state.params, model, config, sample_key) == out


def test_fd_monitor_rejects_datasets_without_a_feature_extractor():
    with pytest.raises(features.NoFeatureExtractorError, match="cifar10.*no offline feature extractor"):
        monitor.FDMonitor("cifar10")
    if not os.path.exists(classifier.asset_paths("mnist")[0]):
        with pytest.raises(features.NoFeatureExtractorError, match="fd_mnist"):
            monitor.FDMonitor("mnist")


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "experiments.evaluate", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_cli_missing_workdir_fails_clearly(tmp_path):
    missing = str(tmp_path / "no_such_run")
    proc = _cli(f"--workdir={missing}")
    assert proc.returncode != 0
    assert "error:" in proc.stderr and missing in proc.stderr and "does not exist" in proc.stderr
    assert not os.path.exists(missing)


@pytest.mark.slow
def test_cli_writes_eval_json_and_png(run_dir):
    proc = _cli(f"--workdir={run_dir}", "--num_samples=100", "--iwae_samples=8", "--iwae_examples=8",
                "--elbo_examples=32", "--kid_subsets=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(os.path.join(run_dir, "eval.json")) as f:
        out = json.load(f)
    assert out["num_samples"] == 100 and math.isfinite(out["fd_fmnist"]) and out["step"] == 4
    assert os.path.isfile(os.path.join(run_dir, "eval_samples.png"))
    assert "wrote" in proc.stdout


@pytest.mark.slow
def test_cli_ais_prints_its_cost_and_progress_and_reports_nats_and_bits(run_dir):
    proc = _cli(f"--workdir={run_dir}", "--num_samples=100", "--iwae_samples=8", "--iwae_examples=4",
                "--elbo_examples=16", "--kid_subsets=2", "--ais_steps=5", "--ais_chains=2", "--ais_examples=4",
                "--ais_batch_size=2", "--output=eval_ais.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "AIS: 4 images x 2 chains x K=5" in proc.stdout and "estimated" in proc.stdout
    assert "AIS 2/4 images" in proc.stdout and "ETA" in proc.stdout
    with open(os.path.join(run_dir, "eval_ais.json")) as f:
        out = json.load(f)
    assert math.isfinite(out["ais_log_likelihood_nats"]) and out["ais_examples"] == 4
    assert out["ais_bits_per_dim"] == pytest.approx(-out["ais_log_likelihood_nats"] / (784 * math.log(2)))


@pytest.mark.slow
def test_infer_cli_writes_its_four_pngs(run_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.infer", f"--workdir={run_dir}", "--num_images=2",
                           "--num_samples=2", "--num_steps=3", f"--outdir={tmp_path}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("reconstruction", "inpainting", "denoising", "log_p"):
        assert os.path.getsize(tmp_path / f"infer_{name}.png") > 0
