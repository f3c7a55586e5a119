"""PNG figures: image grids and training curves (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tiles (N, H, W, C) images in [-1, 1] into one uint8 (rows*H', cols*W', C) array."""
    images = np.asarray(images, np.float32)
    n, h, w, c = images.shape
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    grid = np.ones((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.float32)
    for i in range(n):
        r, col = divmod(i, ncols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = (np.clip(images[i], -1, 1) + 1) / 2
    return (grid * 255).round().astype(np.uint8)


def save_image_grid(images: np.ndarray, path: str, ncols: int | None = None, title: str | None = None) -> str:
    """Writes a grid of (N, H, W, C) images in [-1, 1] to ``path`` (PNG); returns path."""
    grid = image_grid(images, ncols)
    scale = 4 if grid.shape[0] < 400 else 2
    fig = plt.figure(figsize=(grid.shape[1] * scale / 100, grid.shape[0] * scale / 100 + (0.3 if title else 0)), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1 if not title else 0.95])
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray" if grid.shape[-1] == 1 else None,
              interpolation="nearest", vmin=0, vmax=255)
    ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def read_metrics(path: str) -> list[dict]:
    """Reads a JSON-lines metrics log; skips a torn last line."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def plot_curves(rows: list[dict], path: str, keys: tuple[str, ...] | None = None, x_key: str = "step") -> str:
    """One panel per metric key against ``x_key``; writes a PNG and returns its path."""
    rows = [r for r in rows if x_key in r]
    if keys is None:
        keys = tuple(k for k in ("elbo", "log_p_chain", "log_p_start", "log_p_end", "forward_kl",
                                 "drift_norm_start", "drift_norm_end", "examples_per_s", "fd_fmnist")
                     if any(k in r for r in rows))
    ncols = min(3, max(1, len(keys)))
    nrows = int(math.ceil(len(keys) / ncols)) or 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r[x_key], r[key]) for r in rows if key in r and r[key] is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel(x_key, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
