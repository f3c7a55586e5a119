"""Run configuration: one frozen dataclass, validated before any work starts.

Each field carries its help text and the rule :meth:`Config.validate` applies
(``metadata["help"]``, ``["choices"]``, ``["check"]``/``["need"]``); the
launchers generate one flag per field from them (``experiments/flags.py``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Sequence

from lpc_jax.data import sources
from lpc_jax.model import chain, convolutions, likelihoods, objectives
from lpc_jax.sampling import preconditioner, samplers

ALGORITHMS = ("lpc", "vae")
DATA_SOURCES = sources.SOURCES  # ("auto", "idx", "tfds", "files")


class ConfigError(ValueError):
    """A config value its field's rule rejects: ``"<field>=<value> is invalid: <need>"``.

    The message leads with the bare field name; a launcher shows it as ``--<field>``.
    """

    def __init__(self, field: str, value: Any, need: str):
        super().__init__(f"{field}={value!r} is invalid: {need}")
        self.field = field
        self.value = value


def _field(default: Any, help: str, *, choices: Sequence[str] | None = None,
           check: Callable[[Any], bool] | None = None, need: str = "") -> Any:
    """A Config field: its default, its flag's help text, and the rule ``validate`` applies.

    Args:
      default: the value when neither a launcher nor a flag sets one.
      help: one line for ``--help``.
      choices: the allowed values (the flag becomes an enum).
      check: ``value -> bool``; False (or a TypeError) rejects the value.
      need: what ``check`` asks for, quoted in the ConfigError.
    """
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": None if choices is None else tuple(choices), "check": check, "need": need})


def _finite_positive(v) -> bool:
    return math.isfinite(v) and v > 0


def _finite_nonnegative(v) -> bool:
    return math.isfinite(v) and v >= 0


def _at_least(n: int) -> Callable[[Any], bool]:
    return lambda v: v >= n


def _unit_interval(v) -> bool:
    return 0.0 <= v < 1.0


def _passes(check: Callable[[Any], bool], value: Any) -> bool:
    """``check(value)``, with a value of the wrong type (TypeError) failing it."""
    try:
        return bool(check(value))
    except TypeError:
        return False


_POSITIVE = "must be a finite number > 0"


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs. Field names are the launchers' flag names.

    Defaults are the paper's (Table 3): Adam, lr 1e-3, batch 64, T = 300,
    decay 0.99, Jeffreys warm start, latent 40, discretised Gaussian.
    """

    # Data.
    dataset: str = _field("fashion_mnist", "Dataset to train on.", choices=sorted(sources.DATASETS))
    data_source: str = _field(
        "auto", "auto: Fashion-MNIST from Debian's IDX files; CIFAR-10, SVHN and CelebA from the first root "
        "holding TFDS-prepared data or their files; tfds: prepared TFDS data only; files: the torchvision/Kaggle "
        "files only (cifar-10-batches-py, *_32x32.mat, img_align_celeba[.zip] + list_eval_partition); idx: "
        "IDX files.", choices=DATA_SOURCES)
    data_dir: str | None = _field(
        None, "IDX directory (idx), TFDS data_dir (tfds), the first root searched for the files (auto, files; "
        "then $LPC_JAX_DATA_DIR, $TFDS_DATA_DIR, ~/tensorflow_datasets, ./data, ~/data), or the image "
        "folder (--dataset=folder).")
    # Data from files (lpc_jax/data: discover, celeba, folder, cache).
    image_size: int = _field(0, "--dataset=folder: side S of the S x S images (32 or 64; 0 = 64). "
                             "Other datasets have their own size.", check=lambda v: v in (0, 32, 64),
                             need="must be 32 or 64 (Table 2's networks), or 0 for the default 64")
    data_cache: str = _field(
        "", "Decode CelebA/folder images once into a memory-mapped uint8 .npy in this folder ('auto': "
        "<data root>/lpc_jax_cache), reused while its source is unchanged; '' = decode every batch.",
        check=lambda v: isinstance(v, str), need="must be a folder, 'auto' or ''")
    max_train_examples: int = _field(0, "Use only the first N training images (0 = all).", check=_at_least(0),
                                     need="must be >= 0 (0 means all)")
    data_threads: int = _field(4, "Threads reading and decoding training batches ahead of the step "
                               "(0 = each batch is made when the step asks for it).", check=_at_least(0),
                               need="must be >= 0 (0 means no read-ahead threads)")
    # Objective and chain (paper section 3, eq. 1).
    algorithm: str = _field("lpc", "lpc (Langevin predictive coding) or vae.", choices=ALGORITHMS)
    warm_start: str = _field("jeffreys", "Encoder objective for the chain's warm start.",
                             choices=objectives.WARM_STARTS)
    step_size: float = _field(0.1, "Langevin step size gamma (> 0).", check=_finite_positive,
                              need="the Langevin step size must be a finite number > 0")
    decay: float = _field(0.99, "Preconditioner EMA decay beta, in [0, 1).", check=_unit_interval,
                          need="the preconditioner decay must lie in [0, 1)")
    eps: float = _field(1e-8, "Preconditioner epsilon added to sqrt(m_hat).", check=_finite_positive,
                        need=_POSITIVE)
    preconditioner: bool = _field(True, "Adam-style diagonal preconditioning of the drift.")
    num_steps: int = _field(300, "Langevin steps T per SGD step (>= 1).", check=_at_least(1),
                            need="the chain needs at least 1 Langevin step")
    sampler: str = _field(
        "ula", "Chain sampler: ula (the paper's), mala (Metropolis-adjusted: one more decoder forward "
        "pass and z-gradient per step) or underdamped (kinetic Langevin, OBABO; step_size is its time "
        "step h, ULA-equivalent h^2/2).",
        choices=samplers.SAMPLERS)
    friction: float = _field(1.0, "Friction of the underdamped sampler, per unit time (> 0).",
                             check=_finite_positive, need=_POSITIVE)
    chain_dtype: str = _field(
        "float32", "Decoder precision inside the chain: bfloat16 runs its VJP in bf16; the chain state, "
        "likelihood, accumulators and updates stay float32.", choices=("float32", "bfloat16"))
    theta_grad_every: int = _field(
        1, "Accumulate the decoder gradient (eq. 8) on every k-th chain step only (random phase, "
        "weight k/T: unbiased); the other steps take only grad_z. 1 = every step.", check=_at_least(1),
        need="must be >= 1 (1 takes the decoder gradient on every chain step, eq. 8)")
    prior_init_batches: int = _field(50, "Chains start from the prior for this many batches.",
                                     check=_at_least(0), need="must be >= 0")
    # The chain's diagonal metric (issue 22; docs/results.md, "The preconditioner against ground truth").
    chain_metric: str = _field(
        "auto", "The chain's diagonal metric G: auto (adam_paper with --preconditioner, none without), "
        "adam_paper (Algorithm 1's Adam-style metric as printed), adam (its EMA started at the prior's "
        "moment 1: a bounded first step), encoder (the encoder's variance sigma_q^2(x), fixed per chain: "
        "MALA exact, ULA only its discretisation bias; its step size is relative to the posterior's "
        "scale, h ~ 1, and at h = 1 its chains blew up in the first SGD steps on Fashion-MNIST, "
        "docs/results.md), none (G = 1).", choices=chain.METRICS)
    # Optimisation.
    batch_size: int = _field(64, "Images per SGD step.", check=_at_least(1), need="must be >= 1")
    learning_rate: float = _field(1e-3, "Adam learning rate for theta and phi.", check=_finite_positive,
                                  need=_POSITIVE)
    num_epochs: float = _field(15.0, "Training epochs (ignored if num_train_steps > 0).",
                               check=_finite_nonnegative, need="must be a finite number >= 0")
    num_train_steps: int = _field(0, "Total SGD steps; 0 = use num_epochs.", check=_at_least(0),
                                  need="must be >= 0 (0 means use num_epochs)")
    lr_warmdown: float = _field(
        0.0, "Fraction of the final SGD steps over which Adam's learning rate decays linearly to 0 "
        "(needs num_train_steps > 0); 0 = constant.", check=lambda v: 0.0 <= v <= 1.0,
        need="must lie in [0, 1] (0 keeps the learning rate constant)")
    # Model.
    latent_dim: int = _field(40, "Latent dimension.", check=_at_least(1), need="must be >= 1")
    likelihood: str = _field("discretized_gaussian", "Observation model (likelihood of an image given z).",
                             choices=likelihoods.LIKELIHOODS)
    obs_scale: float = _field(0.0, "Fixed likelihood scale sigma; 0 learns it per channel.",
                              check=_finite_nonnegative,
                              need="must be a finite number > 0, or 0 to learn the scale per channel")
    init_obs_scale: float = _field(0.1, "Initial value of the learned scale.", check=_finite_positive,
                                   need=_POSITIVE)
    prior_scale: float = _field(1.0, "Standard deviation s of the N(0, s^2 I) prior.", check=_finite_positive,
                                need=_POSITIVE)
    # Bookkeeping.
    # Convolution implementation (issue 24): the networks' parameters are the same for all three.
    conv_impl: str = _field(
        "auto", "Convolutions of the encoder and decoder: tuned (custom VJPs fast on XLA:CPU), xla (XLA's "
        "own, for GPU/TPU) or auto (tuned on CPU, xla elsewhere: by the platform the step is compiled for).",
        choices=convolutions.CONV_IMPLS)

    seed: int = _field(0, "Random seed (parameters, data order, chains).")
    log_every: int = _field(50, "Log metrics every N steps.", check=_at_least(1), need="must be >= 1")
    checkpoint_every: int = _field(500, "Checkpoint (and refresh samples.png) every N steps.",
                                   check=_at_least(1), need="must be >= 1")
    keep_checkpoints: int = _field(3, "Keep the newest N checkpoints (orbax max_to_keep); older ones are "
                                   "deleted once a newer one is saved.", check=_at_least(1),
                                   need="must be >= 1 (a rerun resumes from the newest checkpoint)")
    eval_examples: int = _field(10000, "Test images for the final ELBO (0 = all).", check=_at_least(0),
                                need="must be >= 0 (0 means all)")
    fd_every: int = _field(
        0, "Log an FD estimate (Figure 5B) on generated samples every N steps "
        "(offline feature extractors: fashion_mnist); 0 = never.",
        check=_at_least(0), need="must be >= 0 (0 turns the FD monitor off)")
    fd_samples: int = _field(2000, "Samples for the in-training FD estimate.", check=_at_least(2),
                             need="needs at least 2 samples for a covariance")
    eval_samples: int = _field(
        0, "Prior samples for the final sample-quality metrics in summary.json (fd_fmnist, KID, "
        "density, coverage against as many test images; offline feature extractors: fashion_mnist); "
        "0 = skip.", check=lambda v: v == 0 or v >= 2, need="must be 0 (skip) or >= 2")
    # Scaling out (lpc_jax/runtime/distributed.py): one process uses all its local devices; more
    # processes join through jax.distributed.
    coordinator_address: str = _field(
        "", "Multi-process runs: host:port of process 0 (the same on every process); 'auto' lets "
        "jax.distributed detect the cluster (SLURM, Cloud TPU, Open MPI); '' = one process.",
        check=lambda v: isinstance(v, str), need="must be host:port, 'auto' or ''")
    num_processes: int = _field(1, "Processes in a multi-process run (with --coordinator_address=host:port).",
                                check=_at_least(1), need="must be >= 1")
    process_id: int = _field(0, "This process's id in [0, num_processes).", check=_at_least(0),
                             need="must be >= 0 and below num_processes")
    coordinator_timeout: int = _field(300, "Seconds a process waits for the coordinator and the other processes.",
                                      check=_at_least(1), need="must be >= 1 second")

    def validate(self) -> Config:
        """Checks every field against its rule; returns self.

        Raises:
          ConfigError: (a ValueError) naming the first offending field, e.g.
            ``step_size=-1.0 is invalid: the Langevin step size must be a finite number > 0``.
        """
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices, check = f.metadata["choices"], f.metadata["check"]
            if choices is not None and value not in choices:
                raise ConfigError(f.name, value, f"choose one of {list(choices)}")
            if check is not None and not _passes(check, value):
                raise ConfigError(f.name, value, f.metadata["need"])
        if self.chain_metric in preconditioner.FORMS and not self.preconditioner:
            raise ConfigError("chain_metric", self.chain_metric, "an Adam-style metric contradicts "
                              "--nopreconditioner: drop one of the two")
        if self.num_train_steps == 0 and self.num_epochs == 0:
            raise ConfigError("num_epochs", self.num_epochs, "must be > 0 when num_train_steps is 0")
        if self.process_id >= self.num_processes:
            raise ConfigError("process_id", self.process_id,
                              f"must lie in [0, {self.num_processes}) for num_processes={self.num_processes}")
        if self.num_processes > 1 and not self.coordinator_address:
            raise ConfigError("coordinator_address", self.coordinator_address,
                              f"num_processes={self.num_processes} needs process 0's host:port (or 'auto')")
        if self.image_size and self.dataset != "folder":
            raise ConfigError("image_size", self.image_size,
                              f"applies to --dataset=folder only ({self.dataset} has its own size); leave it 0")
        if self.lr_warmdown > 0 and self.num_train_steps == 0:
            raise ConfigError("lr_warmdown", self.lr_warmdown,
                              "needs a fixed --num_train_steps (> 0) to place the decay at the end of the run")
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


def load_config(workdir: str) -> Config:
    """Reads ``workdir/config.json``.

    Raises:
      FileNotFoundError: there is none.
      ValueError: it is truncated or not a config (nothing is changed).
    """
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        text = f.read()
    try:
        return Config.from_json(text)
    except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is truncated or not a run config ({type(e).__name__}: {e}). Nothing was "
                         f"changed; restore the file, or use another --workdir.") from e
