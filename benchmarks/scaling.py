"""The paper's Table 4 analogue and data-parallel scaling over forced CPU devices.

    python -m benchmarks.chain --table4          # seconds per SGD step at T = 300 (VAE, LPC)
    python -m benchmarks.chain --devices=1,2,4   # the main job's step on 1, 2, 4 CPU devices

(``benchmarks.chain``'s flags; its docstring describes the keys printed.)
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import numpy as np

from benchmarks import harness
from lpc_jax.data import pipeline, sources
from lpc_jax.runtime import distributed
from lpc_jax.sampling import langevin
from lpc_jax.training import build
from lpc_jax.training.config import Config

PAPER_TABLE4 = {"vae": 0.022, "lpc_reverse_kl": 0.533, "lpc_jeffreys": 0.798}


def table4(out: dict, reps: int) -> None:
    """Seconds per SGD step at T = 300, batch 64: VAE, LPC reverse_kl, LPC jeffreys."""
    for shape in ("64x64x3", "28x28x1"):
        config, model, state, x, source = harness.setup(harness.SHAPES[shape], num_steps=harness.T_LONG)
        key, hp = jax.random.key(2), langevin.hparams(config.step_size, config.decay, config.eps)
        steps = {"vae": dataclasses.replace(config, algorithm="vae"),
                 "lpc_reverse_kl": dataclasses.replace(config, warm_start="reverse_kl"),
                 "lpc_jeffreys": config}
        print(f"Table 4 analogue, {shape} ({source}), T={harness.T_LONG}, batch 64, median of {reps} steps")
        for name, cfg in steps.items():
            fn, c = harness.compile_ahead(build.make_train_step(cfg, model), state, x, key, hp)
            if name == "vae":
                jax.block_until_ready(fn(state, x, key, hp))
            seconds = harness.median_ms(lambda: fn(state, x, key, hp), reps if name != "vae" else 5 * reps) / 1e3
            out[f"table4_{shape}_{name}_s"] = seconds
            harness.row(f"{shape} {name}: compile", c, "s")
            harness.row(f"{shape} {name}: seconds per SGD step", seconds, "s")
        for name in ("lpc_reverse_kl", "lpc_jeffreys"):
            ratio = out[f"table4_{shape}_{name}_s"] / out[f"table4_{shape}_vae_s"]
            paper = PAPER_TABLE4[name] / PAPER_TABLE4["vae"]
            out[f"table4_{shape}_ratio_{name}"] = ratio
            harness.row(f"{shape} {name} / vae (paper, one GPU: x{paper:.0f})", ratio)
    out["table4_paper_s"] = PAPER_TABLE4


def scaling_worker(steps: int, reps: int) -> dict:
    """In a process with N (forced) devices: steps/s of ``train.make_group``'s step, the main job's settings."""
    from experiments.fashion_mnist import DEFAULTS
    from lpc_jax.training import loop, train

    config = Config(**{**DEFAULTS, "batch_size": 64})
    model = build.build_model(config)
    keys = loop.run_keys(0)
    group = train.make_group(config, model, keys)
    state = group.placement.put_state(loop.init_state(keys.init, model, (28, 28, 1), config.latent_dim))
    try:
        images = sources.load("fashion_mnist", "train", "idx", None, 64 * 20).images
    except Exception:  # noqa: BLE001  (no dataset: random 8-bit images)
        images = np.random.default_rng(0).integers(0, 256, (64 * 20, 28, 28, 1), dtype=np.uint8)
    batches = [x for _, x in pipeline.step_batches(images, 64, 0, 0, 20)]

    def run(state, start, n):
        for i in range(start, start + n):
            state, metrics = group.step_fn(state, group.placement.put_batch(batches[i % 20]), group.rng(i),
                                           group.hparams)
            jax.device_get(metrics)
        return state

    t0 = time.perf_counter()
    state = jax.block_until_ready(run(state, 0, 1))
    compile_s = time.perf_counter() - t0
    after_one = [np.asarray(a, np.float64).ravel().tolist() for a in jax.tree.leaves(distributed.local_copy(state.params))]
    per_s = []
    for r in range(reps):
        t0 = time.perf_counter()
        state = jax.block_until_ready(run(state, 1 + r * steps, steps))
        per_s.append(steps / (time.perf_counter() - t0))
    params = distributed.local_copy(state.params)
    return {"devices": jax.device_count(), "steps_per_s": statistics.median(per_s), "compile_s": compile_s,
            "steps": 1 + reps * steps, "batch_devices": len(group.placement.batch.device_set),
            "params_step1": after_one,
            "params": [np.asarray(a, np.float64).ravel().tolist() for a in jax.tree.leaves(params)]}


def scaling(out: dict, device_counts: list[int], steps: int, reps: int) -> None:
    """``scaling_worker`` in one subprocess per device count (XLA_FLAGS before jax starts)."""
    ref = None
    for n in device_counts:
        env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
        result = harness.run_worker("scaling", f"scaling_worker({steps}, {reps})", env, f"{n} devices")
        params = {k: np.concatenate([np.asarray(p) for p in result.pop(k)]) for k in ("params_step1", "params")}
        ref = ref or params
        for k, name in (("params_step1", "param_rel_diff_step1_vs_1"), ("params", "param_rel_diff_vs_1")):
            result[name] = float(np.linalg.norm(params[k] - ref[k]) / np.linalg.norm(ref[k]))
        out[f"scaling_{n}"] = result
        harness.row(f"{n} forced CPU device(s): data-parallel steps/s (T=3, batch 64)", result["steps_per_s"])
        harness.row(f"{n} forced CPU device(s): compile", result["compile_s"], "s")
        harness.row(f"{n} forced CPU device(s): |params - params(1 device)| / |params|, step 1",
             result["param_rel_diff_step1_vs_1"])
        harness.row(f"{n} forced CPU device(s): the same after {result['steps']} steps", result["param_rel_diff_vs_1"])
    out["scaling_note"] = (f"CPU devices share this machine's {distributed.cpu_devices_for(0)} core(s): "
                           "speed-up up to one device per core, beyond it correctness and overhead only")
