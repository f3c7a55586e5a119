"""The online FD monitor: classifier-space Frechet distance of prior samples during training
(the paper's Figure 5B on the ``fd_fmnist`` scale instead of FID)."""

from __future__ import annotations

from typing import Any

import jax

from lpc_jax.data import sources
from lpc_jax.evaluation import classifier, features, sample_metrics
from lpc_jax.model import networks
from lpc_jax.model.state import Model

Params = Any


class FDMonitor:
    """Classifier-space Frechet distance of prior samples vs. cached real test features.

    Built once (loads the shipped classifier and the first ``num_samples`` test
    images, and caches their Gaussian fit); each call decodes ``num_samples``
    latents z ~ prior (:func:`lpc_jax.networks.sample_prior`), embeds them and
    returns ``{metric_name: fd}``.

    Example (in a training loop)::

        monitor = FDMonitor.from_config(config, num_samples=2000)
        key = jax.random.key(123)  # the same key each time: fixed z, smoother curve
        row.update(monitor(state.params, model, config, key))   # {"fd_fmnist": 41.2}

    Attributes:
      metric_name: ``"fd_fmnist"`` (Fashion-MNIST) or ``"fd_mnist"``.
      num_samples: generated (and real) images per call.
    """

    def __init__(self, dataset: str, num_samples: int = 2000, data_source: str = "auto",
                 data_dir: str | None = None, batch_size: int = 500):
        """Loads the classifier and real test features.

        Raises:
          NoFeatureExtractorError: ``dataset`` has no shipped classifier (e.g. cifar10,
            or mnist before its classifier is trained).
          sources.DatasetNotFoundError: the test split is not available offline.
          ValueError: ``num_samples`` < 2.
        """
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2; got {num_samples}")
        suffix, self._clf_params, self.description = features.load_classifier(dataset)
        self.dataset = dataset
        self.metric_name = f"fd_{suffix}"
        self.batch_size = batch_size
        real = sources.load(dataset, "test", data_source, data_dir, num_samples).images
        self.num_samples = int(num_samples)
        self.num_real = int(real.shape[0])
        self._real_stats = sample_metrics.gaussian_stats(classifier.features(self._clf_params, real, batch_size))

    @classmethod
    def from_config(cls, config, num_samples: int = 2000, batch_size: int = 500) -> "FDMonitor":
        """Monitor for ``config.dataset`` read from ``config.data_source`` / ``config.data_dir``."""
        return cls(config.dataset, num_samples, config.data_source, config.data_dir, batch_size)

    def __call__(self, params: Params, model: Model, config, rng_key: jax.Array) -> dict[str, float]:
        """``{metric_name: fd}`` for ``num_samples`` samples decoded with ``params``.

        Args:
          params: ``state.params`` (``{'decoder', 'encoder'}``; only the decoder is used).
          model: the run's Model.
          config: the run's Config (latent_dim, prior_scale).
          rng_key: PRNG key of the latents.

        Returns:
          ``{"fd_fmnist": float}`` (or ``fd_mnist``), squared classifier-feature units.
        """
        fake = networks.sample_prior(model.decoder, params["decoder"], rng_key, self.num_samples,
                                   latent_dim=config.latent_dim, prior_scale=config.prior_scale,
                                   likelihood=model.likelihood, batch_size=self.batch_size)
        fake_stats = sample_metrics.gaussian_stats(classifier.features(self._clf_params, fake, self.batch_size))
        return {self.metric_name: sample_metrics.frechet_distance(*fake_stats, *self._real_stats)}
