"""The flag set every dataset launcher shares; each launcher only changes defaults."""

from __future__ import annotations

import dataclasses

from absl import flags

from lpc_jax import data, likelihoods, objectives
from lpc_jax.config import ALGORITHMS, Config

_D = Config()

flags.DEFINE_enum("dataset", _D.dataset, sorted(data.DATASETS), "Dataset to train on.")
flags.DEFINE_enum("data_source", _D.data_source, ["auto", "idx", "tfds"],
                  "auto: Fashion-MNIST from Debian's IDX files, the rest from prepared TFDS data.")
flags.DEFINE_string("data_dir", None, "IDX directory (idx) or TFDS data_dir (tfds). "
                    "Default: /usr/share/datasets/fashion-mnist, or TFDS's own.")
flags.DEFINE_integer("max_train_examples", _D.max_train_examples, "Use only the first N training images (0 = all).")
flags.DEFINE_enum("algorithm", _D.algorithm, list(ALGORITHMS), "lpc (Langevin predictive coding) or vae.")
flags.DEFINE_string("warm_start", _D.warm_start,
                    f"Encoder objective for the chain's warm start: one of {objectives.WARM_STARTS}.")
flags.DEFINE_float("step_size", _D.step_size, "Langevin step size gamma (> 0).")
flags.DEFINE_float("decay", _D.decay, "Preconditioner EMA decay beta, in [0, 1).")
flags.DEFINE_float("eps", _D.eps, "Preconditioner epsilon added to sqrt(m_hat).")
flags.DEFINE_bool("preconditioner", _D.preconditioner, "Adam-style diagonal preconditioning of the drift.")
flags.DEFINE_integer("num_steps", _D.num_steps, "Langevin steps T per SGD step (>= 1).")
flags.DEFINE_integer("prior_init_batches", _D.prior_init_batches, "Chains start from the prior for this many batches.")
flags.DEFINE_integer("batch_size", _D.batch_size, "Images per SGD step.")
flags.DEFINE_float("learning_rate", _D.learning_rate, "Adam learning rate for theta and phi.")
flags.DEFINE_float("num_epochs", _D.num_epochs, "Training epochs (ignored if --num_train_steps > 0).")
flags.DEFINE_integer("num_train_steps", _D.num_train_steps, "Total SGD steps; 0 = use --num_epochs.")
flags.DEFINE_integer("latent_dim", _D.latent_dim, "Latent dimension.")
flags.DEFINE_string("likelihood", _D.likelihood, f"Observation model: one of {likelihoods.LIKELIHOODS}.")
flags.DEFINE_float("obs_scale", _D.obs_scale, "Fixed likelihood scale sigma; 0 learns it per channel.")
flags.DEFINE_float("init_obs_scale", _D.init_obs_scale, "Initial value of the learned scale.")
flags.DEFINE_float("prior_scale", _D.prior_scale, "Standard deviation of the N(0, s^2 I) prior.")
flags.DEFINE_integer("seed", _D.seed, "Random seed (parameters, data order, chains).")
flags.DEFINE_integer("log_every", _D.log_every, "Log metrics every N steps.")
flags.DEFINE_integer("checkpoint_every", _D.checkpoint_every, "Checkpoint (and refresh samples.png) every N steps.")
flags.DEFINE_integer("eval_examples", _D.eval_examples, "Test images for the final ELBO (0 = all).")
flags.DEFINE_integer("fd_every", _D.fd_every, "Log an FD estimate on generated samples every N steps "
                     "(offline feature extractors: fashion_mnist); 0 = never.")
flags.DEFINE_integer("fd_samples", _D.fd_samples, "Samples for the in-training FD estimate.")
flags.DEFINE_string("workdir", None, "Output directory; rerun with the same one to resume. "
                    "Default: runs/<dataset>_<algorithm>.")

FLAGS = flags.FLAGS


def config_from_flags() -> Config:
    """Builds and validates a Config from the parsed flags (ValueError names the flag)."""
    values = {f.name: FLAGS[f.name].value for f in dataclasses.fields(Config) if f.name in FLAGS}
    return Config(**values).validate()


def workdir_from_flags(config: Config) -> str:
    return FLAGS.workdir or f"runs/{config.dataset}_{config.algorithm}"
