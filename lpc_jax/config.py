"""Run configuration: one frozen dataclass, validated before any work starts."""

from __future__ import annotations

import dataclasses
import json
import math
import os

from lpc_jax import data, likelihoods, objectives

ALGORITHMS = ("lpc", "vae")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs. Field names match the launchers' flags.

    Defaults are the paper's (Table 3): Adam, lr 1e-3, batch 64, T = 300,
    decay 0.99, Jeffreys warm start, latent 40, discretised Gaussian.
    """

    dataset: str = "fashion_mnist"
    data_source: str = "auto"  # auto | idx | tfds
    data_dir: str | None = None
    max_train_examples: int = 0  # 0 = the whole split
    algorithm: str = "lpc"  # lpc | vae
    warm_start: str = "jeffreys"  # none | forward_kl | reverse_kl | jeffreys
    step_size: float = 0.1  # gamma
    decay: float = 0.99  # beta
    eps: float = 1e-8
    preconditioner: bool = True
    num_steps: int = 300  # T
    prior_init_batches: int = 50
    batch_size: int = 64
    learning_rate: float = 1e-3
    num_epochs: float = 15.0
    num_train_steps: int = 0  # > 0 overrides num_epochs
    latent_dim: int = 40
    likelihood: str = "discretized_gaussian"
    obs_scale: float = 0.0  # 0 = learned per channel
    init_obs_scale: float = 0.1
    prior_scale: float = 1.0
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    eval_examples: int = 10000  # test images for the final ELBO; 0 = all
    fd_every: int = 0  # log an FD estimate (Figure 5B) every N steps; 0 = never
    fd_samples: int = 2000

    def validate(self) -> "Config":
        """Raises ValueError naming the offending flag; returns self."""

        def bad(flag, value, need):
            raise ValueError(f"--{flag}={value!r} is invalid: {need}")

        if self.dataset not in data.DATASETS:
            bad("dataset", self.dataset, f"choose one of {sorted(data.DATASETS)}")
        if self.data_source not in ("auto", "idx", "tfds"):
            bad("data_source", self.data_source, "choose auto, idx or tfds")
        if self.algorithm not in ALGORITHMS:
            bad("algorithm", self.algorithm, f"choose one of {ALGORITHMS}")
        if self.warm_start not in objectives.WARM_STARTS:
            bad("warm_start", self.warm_start, f"choose one of {objectives.WARM_STARTS}")
        if self.likelihood not in likelihoods.LIKELIHOODS:
            bad("likelihood", self.likelihood, f"choose one of {likelihoods.LIKELIHOODS}")
        if not (self.step_size > 0 and math.isfinite(self.step_size)):
            bad("step_size", self.step_size, "the Langevin step size must be a finite number > 0")
        if not 0.0 <= self.decay < 1.0:
            bad("decay", self.decay, "the preconditioner decay must lie in [0, 1)")
        if not self.eps > 0:
            bad("eps", self.eps, "must be > 0")
        if self.num_steps < 1:
            bad("num_steps", self.num_steps, "the chain needs at least 1 Langevin step")
        if self.batch_size < 1:
            bad("batch_size", self.batch_size, "must be >= 1")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            bad("learning_rate", self.learning_rate, "must be a finite number > 0")
        if self.num_train_steps < 0:
            bad("num_train_steps", self.num_train_steps, "must be >= 0 (0 means use --num_epochs)")
        if self.num_train_steps == 0 and not (self.num_epochs > 0 and math.isfinite(self.num_epochs)):
            bad("num_epochs", self.num_epochs, "must be a finite number > 0 when --num_train_steps is 0")
        if self.latent_dim < 1:
            bad("latent_dim", self.latent_dim, "must be >= 1")
        if self.obs_scale < 0:
            bad("obs_scale", self.obs_scale, "must be > 0, or 0 to learn the scale per channel")
        if not self.init_obs_scale > 0:
            bad("init_obs_scale", self.init_obs_scale, "must be > 0")
        if not self.prior_scale > 0:
            bad("prior_scale", self.prior_scale, "must be > 0")
        if self.prior_init_batches < 0:
            bad("prior_init_batches", self.prior_init_batches, "must be >= 0")
        if self.fd_every < 0:
            bad("fd_every", self.fd_every, "must be >= 0 (0 turns the FD monitor off)")
        if self.fd_samples < 2:
            bad("fd_samples", self.fd_samples, "needs at least 2 samples for a covariance")
        for flag in ("log_every", "checkpoint_every"):
            if getattr(self, flag) < 1:
                bad(flag, getattr(self, flag), "must be >= 1")
        for flag in ("max_train_examples", "eval_examples"):
            if getattr(self, flag) < 0:
                bad(flag, getattr(self, flag), "must be >= 0 (0 means all)")
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in fields})


# Settings a resumed run must share with the run that wrote the checkpoint.
_MODEL_FIELDS = ("dataset", "algorithm", "latent_dim", "likelihood", "obs_scale")


def check_resumable(saved: Config, new: Config, path: str) -> None:
    """Raises ValueError if ``new`` cannot resume a checkpoint written under ``saved``."""
    diff = [f for f in _MODEL_FIELDS if getattr(saved, f) != getattr(new, f)]
    if diff:
        pairs = ", ".join(f"--{f}: saved {getattr(saved, f)!r}, now {getattr(new, f)!r}" for f in diff)
        raise ValueError(
            f"{path} holds a run with a different model ({pairs}). Use another --workdir, "
            f"or the saved settings to resume it."
        )


def load(workdir: str) -> Config:
    """Reads ``workdir/config.json``; FileNotFoundError if there is none."""
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        return Config.from_json(f.read())
