"""CelebA from files: images/s from a JPEG folder, the zip and the decode cache, against the train steps' appetite.

    python -m benchmarks.data                   # 20,000 synthetic 178x218 JPEGs in a temp dir
    python -m benchmarks.data --images 40000 --batches 100

Writes ``--images`` synthetic CelebA-shaped JPEGs (:func:`write_celeba`) as ``img_align_celeba/`` plus
``img_align_celeba.zip`` and ``list_eval_partition.txt`` (all train), then, each
in its own process so peaks do not mix:

* ``folder``, ``zip``: :func:`lpc_jax.data.sources.open_images` (lazy
  :class:`lpc_jax.data.celeba.CelebAFiles`) through ``pipeline.step_batches``
  (4 grain threads): seconds from opening the split to the first batch
  (``first_batch_s``), images/s over ``--batches`` + 1 batches of 64 counted from
  opening the split, peak RSS.
* ``cache_build``: the one-time decode into the memory-mapped ``.npy``
  (``lpc_jax.data.cache``), seconds and images/s.
* ``cache``: the same pipeline over the mapped cache: first batch, images/s, peak RSS.

Then the appetite: steps/s of the jitted LPC step (T = 3 and the paper's T = 300 is
in RESULTS) and the VAE step on 64x64x3 batches of 64 here, as images/s = 64 x steps/s.
Printed: one JSON object as the last line.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_celeba(root: str, n: int, seed: int = 0, distinct: int = 256) -> str:
    """``n`` synthetic 178x218 JPEGs in ``root/celeba/`` as folder, zip and partition file; returns ``root``.

    ``distinct`` different images (smooth colour fields plus noise, quality 95, about
    CelebA's 10-20 KB) are encoded once and written in turn under ``n`` names: each
    file still costs one full decode to read.
    """
    import io

    from PIL import Image

    base = os.path.join(root, "celeba")
    folder = os.path.join(base, "img_align_celeba")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    blobs = []
    for _ in range(min(distinct, n)):
        coarse = rng.integers(0, 256, (7, 6, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((178, 218), Image.BICUBIC), np.int16)
        image = np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        blobs.append(buffer.getvalue())
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    with zipfile.ZipFile(os.path.join(base, "img_align_celeba.zip"), "w", zipfile.ZIP_STORED) as z:
        for i, name in enumerate(names):
            with open(os.path.join(folder, name), "wb") as f:
                f.write(blobs[i % len(blobs)])
            z.writestr(f"img_align_celeba/{name}", blobs[i % len(blobs)])
    with open(os.path.join(base, "list_eval_partition.txt"), "w") as f:
        f.writelines(f"{name} 0\n" for name in names)
    return root


def read_variant(variant: str, root: str, batches: int, batch_size: int = 64) -> dict:
    """One variant in this process: opens the split, times the first batch and the next ``batches``."""
    from lpc_jax.data import pipeline, sources

    t0 = time.perf_counter()
    if variant == "cache_build":
        images = sources.open_images("celeba", "train", "files", data_dir=root,
                                     cache=os.path.join(root, "cache"), num_threads=4)
        seconds = time.perf_counter() - t0
        return {"seconds": round(seconds, 2), "images_per_s": round(len(images) / seconds, 1),
                "cache_gb": round(images.nbytes / 1e9, 3), "peak_rss_mb": round(_peak_rss_mb(), 1)}
    if variant == "zip":
        os.rename(os.path.join(root, "celeba", "img_align_celeba"), os.path.join(root, "celeba", "_hidden"))
    try:
        cache = os.path.join(root, "cache") if variant == "cache" else None
        images = sources.open_images("celeba", "train", "files", data_dir=root, cache=cache)
        it = pipeline.step_batches(images, batch_size, 0, 0, batches + 1, num_threads=4)
        next(it)
        first = time.perf_counter() - t0
        for _ in it:
            pass
        rate = (batches + 1) * batch_size / (time.perf_counter() - t0)  # from opening the split, first batch included
    finally:
        if variant == "zip":
            os.rename(os.path.join(root, "celeba", "_hidden"), os.path.join(root, "celeba", "img_align_celeba"))
    return {"source": type(images).__name__, "first_batch_s": round(first, 3), "images_per_s": round(rate, 1),
            "peak_rss_mb": round(_peak_rss_mb(), 1)}


def step_rates(batch_size: int = 64, steps: int = 5) -> dict:
    """Steps/s of the jitted LPC (T = 3) and VAE steps on (64, 64, 64, 3) uint8 batches, after compiling."""
    import jax

    from lpc_jax.sampling import langevin
    from lpc_jax.training import build, loop
    from lpc_jax.training.config import Config

    out = {}
    x = np.random.default_rng(0).integers(0, 256, (batch_size, 64, 64, 3), dtype=np.uint8)
    for name, config in (("lpc_T3", Config(dataset="celeba", num_steps=3, prior_init_batches=0)),
                         ("vae", Config(dataset="celeba", algorithm="vae"))):
        model = build.build_model(config)
        step = jax.jit(build.make_train_step(config, model))
        state = loop.init_state(jax.random.key(0), model, (64, 64, 3), config.latent_dim)
        hp = langevin.hparams(0.1, 0.25, 1e-8)
        state, m = step(state, x, jax.random.key(1), hp)
        jax.block_until_ready(m)
        t = time.perf_counter()
        for i in range(steps):
            state, m = step(state, x, jax.random.key(i), hp)
        jax.block_until_ready(m)
        rate = steps / (time.perf_counter() - t)
        out[f"{name}_steps_per_s"] = round(rate, 3)
        out[f"{name}_images_per_s"] = round(rate * batch_size, 1)
    return out


def run(images: int, batches: int, skip_steps: bool = False) -> dict:
    """The whole benchmark (see the module docstring); each read variant in a subprocess."""
    result: dict = {"images": images, "batches": batches}
    with tempfile.TemporaryDirectory(prefix="lpc_jax_bench_celeba_") as root:
        t = time.perf_counter()
        write_celeba(root, images)
        result["write_s"] = round(time.perf_counter() - t, 1)
        print("wrote", images, "JPEGs in", result["write_s"], "s", flush=True)
        for variant in ("folder", "zip", "cache_build", "cache"):
            proc = subprocess.run([sys.executable, "-m", "benchmarks.data", "--mode", "files_variant", "--variant",
                                   variant, "--root", root, "--batches", str(batches)], capture_output=True,
                                  text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
            if proc.returncode:
                raise RuntimeError(f"{variant} failed:\n{proc.stderr[-3000:]}")
            result[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(variant, result[variant], flush=True)
    if not skip_steps:
        result.update(step_rates())
    print(json.dumps(result))
    return result
