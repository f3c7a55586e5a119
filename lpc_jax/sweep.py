"""Langevin hyperparameter sweeps: K (step_size, decay) settings trained in one program.

Every member of a sweep has its own ``TrainState`` (theta, phi, Adam state) and
its own PRNG keys; all members see the same data batch at every SGD step. The
member axis is mapped over the plain LPC step (:func:`lpc_jax.train_step.lpc_train_step`),
so there is one compiled program for every value of (step_size, decay) — they
are traced arrays (``LangevinHParams``).

    states = init_sweep(init_keys, model, (28, 28, 1), 40)           # leading axis K
    step = jax.jit(make_sweep_step(config, model), donate_argnums=0)
    states, metrics = step(states, x, rng_keys, stack_hparams(step_sizes, decays))  # metrics (K,)
    run_sweep(config, [0.01, 0.1, 0.5], ["off", 0.25, 0.99], "runs/sweep")          # the whole loop

Identity with separate runs
---------------------------
Member ``k`` with seed ``s`` derives its keys exactly as ``train.train_and_evaluate``
does for ``--seed=s``: ``init_key, step_key, sample_key, eval_key =
split(key(s), 4)``, state ``jax.jit(create_train_state)(init_key, ...)`` (as
train.py builds it) and step rng ``fold_in(step_key, step)``. The batches are
``data.batches(images, batch_size, config.seed, epoch)``, as in train.py. So a
member whose seed is ``config.seed`` (the default for every member) trains the
same parameters, to float32 rounding, as ``train_and_evaluate(config with its
step_size/decay)``: the per-member math is the same function, only mapped.
Members with other seeds (``seeds=``) still equal a loop of the jitted single
step with their keys, but see ``config.seed``'s batch order. What differs from
a separate run: a member whose step produces NaN/Inf is recorded as diverged
(``diverged_at_step``) and its results are reported as null; a separate run
would stop with ``DivergenceError``. A sweep neither checkpoints nor resumes.

Preconditioning on/off is static (a different program). ``decays`` may contain
``"off"``: those members run without the preconditioner (G = 1; the decay is
then meaningless) in a second compiled program fed the same batches. With
``config.preconditioner=False`` every member is ``"off"``.

vmap or lax.map
---------------
``mode="vmap"`` batches the members: every convolution of the decoder and
encoder becomes a grouped convolution over the member axis
(``feature_group_count``/``batch_group_count``, 60 of them in the K = 8
Fashion-MNIST program), which XLA:CPU runs far slower than K separate
convolutions. ``mode="map"`` (the default) runs the members one after another
inside the same program (``lax.map``): each member runs exactly the single-run
computation (results bitwise equal to separate runs in the tests), one dispatch
per SGD step for all members, cost K single steps. ``python -m benchmarks.chain
--quick`` on the project's 2-core CPU (K = 8, T = 10; ``sweep_speedup_K8`` =
time of 8 sequential single steps / one sweep step): vmap 0.30-0.38, map
0.96 (about 1 within noise). On one CPU a batch of 64 already keeps both
cores busy, so there is nothing for batching members to win; vmap may pay off
on an accelerator.

Library code only: no flags; the command line is ``python -m experiments.sweep``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lpc_jax import data, langevin
from lpc_jax import train as train_lib
from lpc_jax import train_step as ts
from lpc_jax.config import Config

Array = jax.Array

SWEEP_MODES = ("vmap", "map")
DEFAULT_MODE = "map"
OFF = "off"  # a ``decays`` entry: no preconditioner

# Metrics a sweep can rank members by -> True if higher is better. "fd" means the
# dataset's classifier-space Frechet distance (fd_fmnist for Fashion-MNIST).
METRICS = {
    "elbo": True, "log_p_end": True, "log_p_chain": True, "log_p_start": True,
    "forward_kl": False, "loss": False,
    "test_elbo_nats": True, "test_elbo_bits_per_dim": False,
    "fd": False,
}
_TRAIN_METRICS = ("elbo", "log_p_end", "log_p_chain", "log_p_start", "forward_kl", "loss",
                  "drift_norm_start", "drift_norm_end")


# --------------------------------------------------------------------------- #
# Pure pieces
# --------------------------------------------------------------------------- #


def seed_keys(seed: int) -> tuple[Array, Array, Array, Array]:
    """``(init_key, step_key, sample_key, eval_key)`` of a run with ``seed``, as train.py."""
    init_key, step_key, sample_key, eval_key = jax.random.split(jax.random.key(seed), 4)
    return init_key, step_key, sample_key, eval_key


def stack_trees(trees: Sequence[Any]) -> Any:
    """Stacks K pytrees of the same structure along a new leading member axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def member(tree: Any, k: int) -> Any:
    """Member ``k`` of a stacked pytree."""
    return jax.tree.map(lambda a: a[k], tree)


# train.py builds its state with exactly this jitted call; a sweep must match it.
_create_train_state = jax.jit(ts.create_train_state, static_argnums=(1, 2, 3))


def init_sweep(rng_keys: Array, model: ts.Model, image_shape, latent_dim: int) -> ts.TrainState:
    """Stacked ``TrainState`` (leading axis K) from K init keys, shape (K,).

    Each member is ``jax.jit(create_train_state)(rng_keys[k], ...)``, exactly as
    ``train.train_and_evaluate`` builds its state, then stacked.
    """
    image_shape = tuple(int(d) for d in image_shape)
    return stack_trees([_create_train_state(k, model, image_shape, int(latent_dim)) for k in rng_keys])


def stack_hparams(step_sizes: Sequence[float], decays: Sequence[float],
                  eps: float = 1e-8) -> langevin.LangevinHParams:
    """``LangevinHParams`` with (K,) float32 fields; each member validated by ``langevin.hparams``."""
    if len(step_sizes) != len(decays):
        raise ValueError(f"need one decay per step size; got {len(step_sizes)} and {len(decays)}")
    hps = [langevin.hparams(s, d, eps) for s, d in zip(step_sizes, decays)]
    return langevin.LangevinHParams(*(jnp.stack(f) for f in zip(*hps)))


def make_sweep_step(config: Config, model: ts.Model, *, precondition: bool | None = None,
                    mode: str = DEFAULT_MODE) -> Callable:
    """``step(states, x, rng_keys, hparams) -> (states, metrics)`` over K members.

    Args:
      config: run settings (T, warm start, ...); ``config.algorithm`` must be lpc.
      model: networks and optimiser (static), shared by all members.
      precondition: overrides ``config.preconditioner`` (static).
      mode: ``"vmap"`` (batched members) or ``"map"`` (``lax.map``, one member at a time).

    The returned function (not jitted: wrap it in ``jax.jit``, e.g. with
    ``donate_argnums=0``) takes stacked states (leading axis K), ``x`` (B, H, W, C)
    shared by all members, ``rng_keys`` (K,) and stacked ``LangevinHParams`` (K,),
    and returns stacked states and a dict of (K,) float32 metrics. Member ``k``
    computes ``lpc_train_step(states[k], x, rng_keys[k], hparams[k])``.
    """
    if config.algorithm != "lpc":
        raise ValueError(f"--algorithm={config.algorithm!r}: a Langevin sweep needs --algorithm=lpc")
    if mode not in SWEEP_MODES:
        raise ValueError(f"unknown sweep mode {mode!r}; choose one of {SWEEP_MODES}")
    if precondition is not None:
        config = dataclasses.replace(config, preconditioner=bool(precondition))
    single = ts.make_train_step(config, model)
    if mode == "vmap":
        return jax.vmap(single, in_axes=(0, None, 0, 0))

    def step(states, x, rng_keys, hparams):
        return jax.lax.map(lambda a: single(a[0], x, a[1], a[2]), (states, rng_keys, hparams))

    return step


@functools.lru_cache(maxsize=16)
def jit_sweep_step(config: Config, model: ts.Model, precondition: bool | None = None,
                   mode: str = DEFAULT_MODE) -> Callable:
    """``jax.jit(make_sweep_step(...), donate_argnums=0)``, cached per argument set.

    One jitted function per (config, model, precondition, mode) in the process,
    so repeated sweeps (and tests) reuse its compiled programs.
    """
    return jax.jit(make_sweep_step(config, model, precondition=precondition, mode=mode), donate_argnums=0)


@jax.jit
def _fold_in_all(keys: Array, step) -> Array:
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)


@jax.jit
def _members_finite(tree) -> Array:
    """(K,) bool: every leaf of member k is finite."""
    return jnp.stack([jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)
                      for leaf in jax.tree.leaves(tree)]).all(axis=0)


@functools.lru_cache(maxsize=16)
def _elbo_fn(model: ts.Model) -> Callable:
    return jax.jit(jax.vmap(lambda p, x, k: ts.elbo_estimate(p, x, k, model=model), in_axes=(0, None, 0)))


def _test_elbo(params, model: ts.Model, images: np.ndarray, eval_keys: Array,
               batch_size: int = 500) -> np.ndarray:
    """Per-member mean test ELBO (K,), the same estimate as ``train.evaluate_elbo``."""
    fn = _elbo_fn(model)
    totals = np.zeros(eval_keys.shape[0], np.float64)
    count = 0
    for i in range(0, images.shape[0], batch_size):
        x = data.to_float(images[i: i + batch_size])
        totals += np.asarray(jnp.sum(fn(params, x, _fold_in_all(eval_keys, i)), axis=1), np.float64)
        count += x.shape[0]
    return totals / count


# --------------------------------------------------------------------------- #
# The sweep loop
# --------------------------------------------------------------------------- #


def _decay_label(decay) -> str:
    return OFF if decay == OFF else f"{decay:g}"


def _clean(v):
    """JSON-safe float: NaN/Inf -> None."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def resolve_members(config: Config, step_sizes: Sequence[float], decays: Sequence | None,
                    seeds: Sequence[int] | None = None) -> list[dict]:
    """The sweep grid, decay-major: ``[{step_size, decay, precondition, seed}, ...]``.

    Raises ValueError (naming the flag) on an empty list, a duplicate, a step
    size that is not a finite number > 0, or a decay outside [0, 1) other than "off".
    """
    step_sizes = list(step_sizes)
    if decays is None:
        decays = [config.decay] if config.preconditioner else [OFF]
    decays = [OFF if isinstance(d, str) and d.strip().lower() == OFF else d for d in decays]
    seeds = [config.seed] if seeds is None else [int(s) for s in seeds]
    for flag, values in (("step_sizes", step_sizes), ("decays", decays), ("seeds", seeds)):
        if not values:
            raise ValueError(f"--{flag} is empty: give at least one value")
        if len(set(values)) != len(values):
            raise ValueError(f"--{flag}={','.join(map(str, values))} has a duplicate value")
    for s in step_sizes:
        if isinstance(s, str) or not (math.isfinite(float(s)) and float(s) > 0):
            raise ValueError(f"--step_sizes: {s!r} is invalid: each Langevin step size must be a finite number > 0")
    for d in decays:
        if d == OFF:
            continue
        if isinstance(d, str) or not 0.0 <= float(d) < 1.0:
            raise ValueError(f"--decays: {d!r} is invalid: each decay must lie in [0, 1), or be 'off' "
                             "for no preconditioner")
        if not config.preconditioner:
            raise ValueError(f"--decays: {d!r} needs the preconditioner, but --nopreconditioner is set; "
                             "use --decays=off, or drop --nopreconditioner")
    return [{"step_size": float(s), "decay": d if d == OFF else float(d), "precondition": d != OFF,
             "seed": seed} for d in decays for s in step_sizes for seed in seeds]


def run_sweep(config: Config, step_sizes: Sequence[float], decays: Sequence | None, workdir: str, *,
              metric: str = "elbo", seeds: Sequence[int] | None = None, mode: str = DEFAULT_MODE,
              model: ts.Model | None = None, train_images: np.ndarray | None = None,
              test_images: np.ndarray | None = None, fd_samples: int = 0,
              on_log: Callable[[int, list[dict]], None] | None = None, return_params: bool = False):
    """Trains every (step_size, decay[, seed]) member on the same batches; writes the results.

    Args:
      config: shared settings (``step_size``/``decay`` are ignored: the grid replaces them).
      step_sizes: Langevin step sizes, each > 0.
      decays: preconditioner decays in [0, 1), or ``"off"`` entries; None = ``[config.decay]``.
      workdir: output directory (created): ``sweep_results.json``, ``sweep_results.md``,
        ``sweep_<metric>.png``, ``sweep_metrics.jsonl`` (every ``log_every`` steps), ``sweep_config.json``.
      metric: key of :data:`METRICS` to rank and plot.
      seeds: member seeds (default ``[config.seed]``); the grid is decays x step_sizes x seeds.
      mode: ``"vmap"`` or ``"map"`` (see the module docstring).
      model: override ``train_step.build_model(config)`` (tests).
      train_images, test_images: uint8 (N, H, W, C) overrides of the dataset (tests).
      fd_samples: > 0 adds the classifier-space Frechet distance (``fd_fmnist``) of
        that many prior samples per member at the end (``lpc_jax.evaluation.FDMonitor``,
        latents from the member's ``sample_key`` as in train.py); ``config.fd_samples``
        is used when ``metric == "fd"`` or ``config.fd_every > 0`` and 0 was given.
        With ``config.fd_every > 0`` it is also logged every ``fd_every`` steps.
      on_log: optional callback ``(step, rows)`` at each logged step.

      return_params: also return every member's final params.

    Returns:
      The dict written to ``sweep_results.json``; with ``return_params``,
      ``(that dict, [params of member 0, 1, ...])``.
    """
    config.validate()
    if metric not in METRICS:
        raise ValueError(f"--metric={metric!r} is invalid: choose one of {sorted(METRICS)}")
    members = resolve_members(config, step_sizes, decays, seeds)
    if model is None:
        model = ts.build_model(config)
    if (metric == "fd" or config.fd_every > 0) and fd_samples <= 0:
        fd_samples = config.fd_samples
    monitor = None
    if fd_samples > 0:  # build it first: a dataset without a classifier fails before training
        from lpc_jax import evaluation

        monitor = evaluation.FDMonitor.from_config(config, num_samples=fd_samples)
    fd_name = monitor.metric_name if monitor else None
    if train_images is None:
        train_images = data.load(config.dataset, "train", config.data_source, config.data_dir,
                                 config.max_train_examples or None).images
    if test_images is None:
        test_images = data.load(config.dataset, "test", config.data_source, config.data_dir,
                                config.eval_examples or None).images
    image_shape = tuple(train_images.shape[1:])
    num_total = train_lib.total_train_steps(config, train_images.shape[0])

    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "sweep_config.json"), "w") as f:
        json.dump({"config": json.loads(config.to_json()), "members": members, "metric": metric,
                   "mode": mode}, f, indent=2)

    keys = [seed_keys(m["seed"]) for m in members]
    groups = []  # one compiled program per preconditioner setting
    for precondition in (True, False):
        idx = [i for i, m in enumerate(members) if m["precondition"] == precondition]
        if not idx:
            continue
        groups.append({
            "idx": idx,
            "state": init_sweep([keys[i][0] for i in idx], model, image_shape, config.latent_dim),
            "step_keys": jnp.stack([keys[i][1] for i in idx]),
            "hparams": stack_hparams([members[i]["step_size"] for i in idx],
                                     [0.0 if members[i]["decay"] == OFF else members[i]["decay"] for i in idx],
                                     config.eps),
            "fn": jit_sweep_step(config, model, precondition, mode),
        })

    K = len(members)
    diverged = [None] * K
    last = [dict() for _ in range(K)]
    metrics_path = os.path.join(workdir, "sweep_metrics.jsonl")
    if os.path.exists(metrics_path):
        os.remove(metrics_path)
    logging.info("sweep of %d members (%d programs, mode %s) on %s: %d steps, T=%d, batch %d",
                 K, len(groups), mode, config.dataset, num_total, config.num_steps, config.batch_size)
    t_start = t_window = time.time()
    step, window_start = 0, 0
    for index, x in data.step_batches(train_images, config.batch_size, config.seed, 0, num_total):
        if all(d is not None for d in diverged):
            break
        x = jnp.asarray(x)
        for g in groups:
            g["state"], metrics = g["fn"](g["state"], x, _fold_in_all(g["step_keys"], step), g["hparams"])
            metrics = jax.device_get(metrics)
            finite = np.asarray(_members_finite(g["state"].params))
            for j, i in enumerate(g["idx"]):
                if diverged[i] is not None:
                    continue
                row = {k: float(v[j]) for k, v in metrics.items()}
                if not finite[j] or not all(math.isfinite(v) for v in row.values()):
                    diverged[i] = step + 1
                    logging.warning("member %d (step_size %g, decay %s) diverged at step %d",
                                    i, members[i]["step_size"], _decay_label(members[i]["decay"]), step + 1)
                else:
                    last[i] = row
        step = index + 1
        fd_now = monitor is not None and config.fd_every > 0 and (
            step % config.fd_every == 0 or step == num_total)
        if fd_now:
            for g in groups:
                for j, i in enumerate(g["idx"]):
                    if diverged[i] is None:
                        last[i][fd_name] = monitor(member(g["state"].params, j), model, config,
                                                   keys[i][2])[fd_name]
        if fd_now or step % config.log_every == 0 or step == num_total:
            now = time.time()
            rate = (step - window_start) / max(now - t_window, 1e-9)
            rows = [{"step": step, "member": i, "step_size": m["step_size"], "decay": m["decay"],
                     "seed": m["seed"], **({k: _clean(v) for k, v in last[i].items()}
                                           if diverged[i] is None else {"diverged_at_step": diverged[i]})}
                    for i, m in enumerate(members)]
            with open(metrics_path, "a") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
            alive = [last[i]["elbo"] for i in range(K) if diverged[i] is None and "elbo" in last[i]]
            logging.info("step %d/%d | %.2f steps/s (%d members) | best elbo %.1f | %d diverged",
                         step, num_total, rate, K, max(alive) if alive else float("nan"),
                         sum(d is not None for d in diverged))
            t_window, window_start = now, step
            if on_log:
                on_log(step, rows)
    train_s = time.time() - t_start

    results = [{"member": i, **m, "diverged_at_step": diverged[i],
                **{k: (_clean(last[i].get(k)) if diverged[i] is None else None) for k in _TRAIN_METRICS}}
               for i, m in enumerate(members)]
    for g in groups:
        params = g["state"].params
        if test_images is not None and len(test_images):
            elbo = _test_elbo(params, model, test_images, jnp.stack([keys[i][3] for i in g["idx"]]))
            dims = int(np.prod(test_images.shape[1:]))
            for j, i in enumerate(g["idx"]):
                ok = diverged[i] is None
                results[i]["test_elbo_nats"] = _clean(elbo[j]) if ok else None
                results[i]["test_elbo_bits_per_dim"] = (_clean(-elbo[j] / (dims * math.log(2.0)))
                                                        if ok else None)
        if monitor is not None:
            for j, i in enumerate(g["idx"]):
                if diverged[i] is not None:
                    fd = None
                elif fd_name in last[i]:  # fd_every > 0 logged it at the final step
                    fd = last[i][fd_name]
                else:
                    fd = monitor(member(params, j), model, config, keys[i][2])[fd_name]
                results[i][fd_name] = _clean(fd)
                results[i]["fd"] = results[i][fd_name]

    metric_key = fd_name if metric == "fd" else metric
    scored = [r for r in results if r.get(metric_key) is not None]
    best = (max if METRICS[metric] else min)(scored, key=lambda r: r[metric_key]) if scored else None
    summary = {"metric": metric_key, "higher_is_better": METRICS[metric], "steps": step,
               "num_steps_T": config.num_steps, "mode": mode, "train_wall_s": train_s,
               "best_member": best["member"] if best else None, "members": results,
               "config": json.loads(config.to_json())}
    summary["plot_png"] = plot_sweep(results, metric_key, os.path.join(workdir, f"sweep_{metric_key}.png"),
                                     title=f"{config.dataset}: {metric_key} after {step} steps, T={config.num_steps}")
    with open(os.path.join(workdir, "sweep_results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(workdir, "sweep_results.md"), "w") as f:
        f.write(results_markdown(summary))
    logging.info("sweep done in %.0f s; best %s: member %s", train_s, metric_key, summary["best_member"])
    if return_params:
        params = [None] * K
        for g in groups:
            for j, i in enumerate(g["idx"]):
                params[i] = member(g["state"].params, j)
        return summary, params
    return summary


# --------------------------------------------------------------------------- #
# Reporting
# --------------------------------------------------------------------------- #


def results_markdown(summary: dict) -> str:
    """One table row per member; the best member by the chosen metric is starred."""
    results = summary["members"]
    cols = ["step_size", "decay", "seed", "elbo", "log_p_end", "log_p_chain", "forward_kl",
            "test_elbo_nats", "test_elbo_bits_per_dim"]
    cols += [k for k in results[0] if k.startswith("fd_")] if results else []
    cols.append("diverged_at_step")
    fmt = lambda v: "—" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
    lines = [f"# Sweep: {summary['metric']} ({'higher' if summary['higher_is_better'] else 'lower'} is better), "
             f"{summary['steps']} SGD steps, T = {summary['num_steps_T']}", "",
             "Training metrics are the last step's (one batch, nats per example); test_* are on the test split.",
             "", "| member | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 1)]
    for r in results:
        mark = " *" if r["member"] == summary["best_member"] else ""
        lines.append(f"| {r['member']}{mark} | " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(results: list[dict], metric: str, path: str, title: str | None = None) -> str:
    """``metric`` against step size (log x), one line per decay (and seed); writes a PNG."""
    from lpc_jax import plotting  # noqa: F401  (selects the Agg backend)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    lines: dict[str, list] = {}
    multi_seed = len({r["seed"] for r in results}) > 1
    for r in results:
        label = f"decay {r['decay']}" + (f", seed {r['seed']}" if multi_seed else "")
        lines.setdefault(label, []).append((r["step_size"], r.get(metric)))
    for label, pts in lines.items():
        pts = sorted(pts)
        xs = [p[0] for p in pts]
        ys = [np.nan if p[1] is None else p[1] for p in pts]
        ax.plot(xs, ys, marker="o", label=label)
        for x_, y_ in zip(xs, ys):
            if not np.isfinite(y_):
                ax.axvline(x_, color="red", alpha=0.15, lw=4)  # diverged
    ax.set_xscale("log")
    ax.set_xlabel("Langevin step size")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
