"""lpc-jax: Langevin Predictive Coding (Zahid, Guo & Fountas, ICML 2024) in JAX and Flax.

The public API, in the style of optax and blackjax: ``import lpc_jax as lpc``.

Samplers (modules with ``init`` and ``build_kernel``; blackjax's interface)::

    lpc.langevin      # ULA, the paper's sampler; hparams, stack_hparams, sample_chain
    lpc.mala          # Metropolis-adjusted Langevin
    lpc.underdamped   # kinetic (OBABO) Langevin
    lpc.samplers      # samplers.build(name, log_prob_fn, ...) picks one
    lpc.preconditioner, lpc.warmup, lpc.diagnostics   # the adaptive metric, a fixed one, R-hat/ESS

The model and its train steps: ``Decoder``, ``Encoder``, ``make_log_joint``,
``sample_prior``, ``Model``, ``TrainState``, ``create_train_state``,
``lpc_train_step``, ``vae_train_step``; ``inference`` (reconstruct, inpaint,
denoise). Runs: ``Config``, ``build_model``, ``make_train_step``, ``train_and_evaluate``,
``run_sweep``, ``load_run``, ``evaluate``. Evaluation: ``EVALUATORS``, ``EvalOptions``, ``make_evaluators``,
``test_elbo``, ``iwae_bound``, ``ais`` / ``ais_log_likelihood`` (annealed
importance sampling, reverse AIS for BDMC), ``FDMonitor``. Data: ``load_dataset``,
``open_images``, ``image_shape``, ``to_float``, ``device_to_float``, ``DatasetNotFoundError``.
Runs on disk: ``Checkpointer``, ``CheckpointError``, ``DivergenceError``, ``LogWriteError``,
``MetricWriter``, ``JsonlWriter``, ``TensorBoardWriter``.

Names load lazily, on first use, so ``import lpc_jax`` itself imports no JAX.

The package's groups, each a folder, lowest first (a group imports only groups
below it; ``tests/test_architecture.py`` checks it): ``sampling``, ``data``,
``runtime`` and ``plotting`` import nothing of lpc_jax; ``model`` imports
``sampling``; ``evaluation`` the groups below it; ``training`` everything.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute); attribute None: the module itself
_EXPORTS: dict[str, tuple[str, str | None]] = {
    # sampling
    "langevin": ("lpc_jax.sampling.langevin", None),
    "mala": ("lpc_jax.sampling.mala", None),
    "underdamped": ("lpc_jax.sampling.underdamped", None),
    "samplers": ("lpc_jax.sampling.samplers", None),
    "preconditioner": ("lpc_jax.sampling.preconditioner", None),
    "warmup": ("lpc_jax.sampling.warmup", None),
    "diagnostics": ("lpc_jax.sampling.diagnostics", None),
    "LangevinHParams": ("lpc_jax.sampling.langevin", "LangevinHParams"),
    "sample_chain": ("lpc_jax.sampling.langevin", "sample_chain"),
    "stack_hparams": ("lpc_jax.sampling.langevin", "stack_hparams"),
    # model
    "objectives": ("lpc_jax.model.objectives", None),
    "likelihoods": ("lpc_jax.model.likelihoods", None),
    "Decoder": ("lpc_jax.model.networks", "Decoder"),
    "Encoder": ("lpc_jax.model.networks", "Encoder"),
    "make_log_joint": ("lpc_jax.model.networks", "make_log_joint"),
    "sample_prior": ("lpc_jax.model.networks", "sample_prior"),
    "Model": ("lpc_jax.model.state", "Model"),
    "TrainState": ("lpc_jax.model.state", "TrainState"),
    "create_train_state": ("lpc_jax.model.state", "create_train_state"),
    "lpc_train_step": ("lpc_jax.model.steps", "lpc_train_step"),
    "vae_train_step": ("lpc_jax.model.steps", "vae_train_step"),
    "inference": ("lpc_jax.model.inference", None),
    # data
    "load_dataset": ("lpc_jax.data.sources", "load"),
    "image_shape": ("lpc_jax.data.sources", "image_shape"),
    "to_float": ("lpc_jax.data.sources", "to_float"),
    "open_images": ("lpc_jax.data.sources", "open_images"),
    "DatasetNotFoundError": ("lpc_jax.data.images", "DatasetNotFoundError"),
    "device_to_float": ("lpc_jax.data.pipeline", "device_to_float"),
    # evaluation
    "EVALUATORS": ("lpc_jax.evaluation.evaluators", "EVALUATORS"),
    "EvalOptions": ("lpc_jax.evaluation.evaluators", "EvalOptions"),
    "make_evaluators": ("lpc_jax.evaluation.evaluators", "make_evaluators"),
    "run_evaluators": ("lpc_jax.evaluation.evaluators", "run_evaluators"),
    "test_elbo": ("lpc_jax.evaluation.bounds", "test_elbo"),
    "iwae_bound": ("lpc_jax.evaluation.bounds", "iwae_bound"),
    "ais": ("lpc_jax.evaluation.ais", None),
    "ais_log_likelihood": ("lpc_jax.evaluation.ais", "ais_log_likelihood"),
    "FDMonitor": ("lpc_jax.evaluation.monitor", "FDMonitor"),
    # training
    "Config": ("lpc_jax.training.config", "Config"),
    "ConfigError": ("lpc_jax.training.config", "ConfigError"),
    "build_model": ("lpc_jax.training.build", "build_model"),
    "make_train_step": ("lpc_jax.training.build", "make_train_step"),
    "train_and_evaluate": ("lpc_jax.training.train", "train_and_evaluate"),
    "run_sweep": ("lpc_jax.training.sweep", "run_sweep"),
    "load_run": ("lpc_jax.training.restore", "load_run"),
    "evaluate": ("lpc_jax.training.evaluate", "evaluate"),
    "DivergenceError": ("lpc_jax.training.run_kinds", "DivergenceError"),
    # runtime: checkpoints that restore on any devices, logs and TensorBoard writers
    "Checkpointer": ("lpc_jax.runtime.checkpoints", "Checkpointer"),
    "CheckpointError": ("lpc_jax.runtime.checkpoints", "CheckpointError"),
    "LogWriteError": ("lpc_jax.runtime.logs", "LogWriteError"),
    "MetricWriter": ("lpc_jax.runtime.writers", "MetricWriter"),
    "JsonlWriter": ("lpc_jax.runtime.writers", "JsonlWriter"),
    "TensorBoardWriter": ("lpc_jax.runtime.writers", "TensorBoardWriter"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    try:
        module_name, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'lpc_jax' has no attribute {name!r}; the public names are "
                             f"listed in lpc_jax.__all__") from None
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
