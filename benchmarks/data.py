"""Start-up time, peak memory and per-step cost of the training input pipeline.

    python -m benchmarks.data                                 # CelebA from files: benchmarks/data_files.py
    python -m benchmarks.data --mode=tfds_mock                # CelebA-shaped TFDS mock, 162,770 examples
    python -m benchmarks.data --mode=tfds_mock --examples 20000     # quicker
    python -m benchmarks.data --mode=tfds_mock --skip_before        # only the grain pipeline at full size

The default mode (``files``) is :mod:`benchmarks.data_files`. The ``tfds_mock``
mode, described here, measures the TFDS path:

Two measurements, "before" (the pre-grain code, kept verbatim below: the whole
split read into one uint8 array, one ``source[i]`` at a time, then
``step_batches``) against "after" (``sources.open_images`` + ``pipeline.step_batches``
on grain, ``lpc_jax.data.pipeline``):

* Start-up, on ``tfds.testing.mock_data`` shaped like ``celeb_a`` (218x178x3
  images, centre-cropped and resized to 64x64x3): seconds from opening the split
  to the first batch in hand (``first_batch_s``), seconds for the next 50
  batches of 64 (``next_50_s``), and the process's peak resident memory
  (``peak_rss_mb``, from ``getrusage``) and its rise over the resident memory
  just before the split was opened (``rss_rise_mb``). Each variant runs in its
  own subprocess, so peaks do not mix. The mock builds each example in Python
  (about as costly as a JPEG decode), so worker threads overlap it only partly.
* Per-step overhead, on in-memory uint8 arrays shaped like Fashion-MNIST
  (60,000 x 28x28x1, the main job's input): the old generator against the grain
  iterator with 0 and 4 threads, in interleaved rounds (median of 5):
  microseconds per batch of 64 iterating 1,000 batches alone (``step_us_*``),
  and milliseconds per step of a loop running a small jitted step on each
  batch (``loop_ms_*``; ``loop_ms_consumer_only`` is that step without a pipeline).

Printed: one JSON object as the LAST line, keys ``examples``, ``startup_before``,
``startup_after`` (each a dict as above), ``step_us_{before,after_threads0,after_threads4}``,
``loop_ms_{before,after_threads0,after_threads4,consumer_only}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from benchmarks import data_files
from lpc_jax.data import pipeline, sources  # noqa: F401  (grain imported up front: both variants pay the same imports)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# The pre-grain code, verbatim (lpc_jax/sources.py before the grain pipeline).
def _before_load_tfds(name, split, data_dir=None, max_examples=None):
    import tensorflow_datasets as tfds

    tfds_name, shape = sources.DATASETS[name][0], sources.image_shape(name)
    source = tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
    n = len(source) if max_examples is None else min(len(source), max_examples)
    images = np.empty((n, *shape), np.uint8)
    labels = np.full((n,), -1, np.int64)
    for i in range(n):
        example = source[i]
        images[i] = sources._preprocess_tfds(name, np.asarray(example["image"]))
        if "label" in example:
            labels[i] = int(example["label"])
    return sources.Dataset(images, labels)


def _before_step_batches(images, batch_size, seed, start_step, num_steps):
    steps_per_epoch = images.shape[0] // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {batch_size} exceeds the {images.shape[0]} examples")
    for step in range(start_step, num_steps):
        epoch, index = divmod(step, steps_per_epoch)
        if step == start_step or index == 0:
            order = pipeline.epoch_order(images.shape[0], seed, epoch)
        yield step, sources.to_float(images[order[index * batch_size : (index + 1) * batch_size]])


def startup(variant: str, examples: int, batch_size: int = 64, steps: int = 51) -> dict:
    """Opens a mocked CelebA train split of ``examples`` images and takes ``steps`` batches."""
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=examples, policy=tfds.testing.MockPolicy.USE_CODE):
        rss0 = _rss_mb()
        t0 = time.perf_counter()
        if variant == "before":
            images = _before_load_tfds("celeba", "train").images
            it = _before_step_batches(images, batch_size, 0, 0, steps)
        else:
            images = sources.open_images("celeba", "train", "tfds")
            it = pipeline.step_batches(images, batch_size, 0, 0, steps, num_threads=4, host_float=True)
        next(it)
        first = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in it:
            pass
        rest = time.perf_counter() - t1
    return {"first_batch_s": round(first, 3), f"next_{steps - 1}_s": round(rest, 3),
            "peak_rss_mb": round(_peak_rss_mb(), 1), "rss_rise_mb": round(_peak_rss_mb() - rss0, 1),
            "examples": examples}


def step_overhead(steps: int = 1000, batch_size: int = 64, rounds: int = 5) -> dict:
    """Per-step cost of each pipeline on an in-memory Fashion-MNIST-shaped array.

    ``step_us_*``: microseconds per batch, iterating alone. ``loop_ms_*``:
    milliseconds per step of a loop that also runs a small jitted step on each
    batch (``tanh(x @ W).sum()``, W 784x2000; the read-ahead threads overlap it),
    over ``steps // 2`` steps; ``loop_ms_consumer_only`` is that step alone.
    """
    import jax
    import jax.numpy as jnp

    images = np.random.default_rng(0).integers(0, 256, (60000, 28, 28, 1), dtype=np.uint8)
    makers = {
        "before": lambda n: _before_step_batches(images, batch_size, 0, 0, n),
        "after_threads0": lambda n: pipeline.step_batches(images, batch_size, 0, 0, n, num_threads=0, host_float=True),
        "after_threads4": lambda n: pipeline.step_batches(images, batch_size, 0, 0, n, num_threads=4, host_float=True),
    }
    w = jnp.ones((28 * 28, 2000), jnp.float32)
    consume = jax.jit(lambda x: jnp.tanh(x.reshape(x.shape[0], -1) @ w).sum())
    x0 = sources.to_float(images[:batch_size])
    consume(x0).block_until_ready()
    times = {}
    for _ in range(rounds):
        for key, make in makers.items():
            t = time.perf_counter()
            for _ in make(steps):
                pass
            times.setdefault(f"step_us_{key}", []).append((time.perf_counter() - t) / steps * 1e6)
            t = time.perf_counter()
            for _, x in make(steps // 2):
                consume(jnp.asarray(x)).block_until_ready()
            times.setdefault(f"loop_ms_{key}", []).append((time.perf_counter() - t) / (steps // 2) * 1e3)
        t = time.perf_counter()
        for _ in range(steps // 2):
            consume(jnp.asarray(x0)).block_until_ready()
        times.setdefault("loop_ms_consumer_only", []).append((time.perf_counter() - t) / (steps // 2) * 1e3)
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=162770, help="mock CelebA train examples")
    parser.add_argument("--skip_before", action="store_true", help="skip the slow pre-grain start-up")
    parser.add_argument("--skip_startup", action="store_true", help="only the per-step overhead")
    parser.add_argument("--mode", choices=["files", "tfds_mock", "files_variant"], default="files",
                        help="files: CelebA from JPEG folder, zip and cache (data_files.py); tfds_mock: the TFDS path")
    parser.add_argument("--images", type=int, default=20000, help="files: synthetic 178x218 JPEGs to write")
    parser.add_argument("--batches", type=int, default=100, help="files: batches of 64 timed per variant")
    parser.add_argument("--skip_steps", action="store_true", help="files: skip the LPC/VAE step rates")
    parser.add_argument("--root", help=argparse.SUPPRESS)  # files_variant subprocess
    parser.add_argument("--variant", choices=["before", "after", "folder", "zip", "cache_build", "cache"],
                        help=argparse.SUPPRESS)  # subprocess
    args = parser.parse_args(argv)
    if args.mode == "files":
        return data_files.run(args.images, args.batches, args.skip_steps)
    if args.mode == "files_variant":
        out = data_files.read_variant(args.variant, args.root, args.batches)
        print(json.dumps(out))
        return out
    if args.variant:
        out = startup(args.variant, args.examples)
        print(json.dumps(out))
        return out
    result = {"examples": args.examples}
    variants = () if args.skip_startup else ("after",) if args.skip_before else ("after", "before")
    for variant in variants:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.data", "--mode", "tfds_mock", "--variant", variant,
                               "--examples", str(args.examples)], capture_output=True, text=True,
                              env={**os.environ, "JAX_PLATFORMS": "cpu"})
        if proc.returncode:
            raise RuntimeError(f"{variant} start-up run failed:\n{proc.stderr[-3000:]}")
        result[f"startup_{variant}"] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(variant, result[f"startup_{variant}"], flush=True)
    result.update(step_overhead())
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
