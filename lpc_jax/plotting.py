"""PNG figures: image grids, training curves and sweep plots.

Figures are ``matplotlib.figure.Figure`` objects drawn without pyplot, so importing
this module (or anything that uses it) leaves pyplot's state and a notebook's
backend alone. Every figure is written by :func:`save_figure`.
"""

from __future__ import annotations

import math
import os

import numpy as np
from matplotlib.figure import Figure


def save_figure(fig, path: str, dpi: float | str = "figure") -> str:
    """Writes ``fig`` to ``path`` (PNG; parent directories created), closes it, returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], dpi: float | None = None, **kwargs):
    """``(fig, axes)`` as ``pyplot.subplots`` gives them, on a Figure that pyplot does not track."""
    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(nrows, ncols, **kwargs)


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
    fig = Figure(figsize=(grid.shape[1] * scale / 100, grid.shape[0] * scale / 100 + (0.3 if title else 0)), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1 if not title else 0.95])
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray" if grid.shape[-1] == 1 else None,
              interpolation="nearest", vmin=0, vmax=255)
    ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def cumulative_wall_s(rows: list[dict]) -> list[dict]:
    """Rows with ``wall_s`` made cumulative over resumed segments of one run.

    Each invocation of a run restarts its clock, and a resumed run's log keeps the
    rows up to its checkpoint, so ``wall_s`` drops where a segment begins. Every
    segment is shifted by the last ``wall_s`` of the segments before it (seconds;
    the time between that row and the kill is not counted). Rows without
    ``wall_s`` are returned unchanged; the input is not modified.
    """
    out, offset, last = [], 0.0, None
    for row in rows:
        if "wall_s" in row:
            if last is not None and row["wall_s"] < last:
                offset += last
            last = row["wall_s"]
            row = {**row, "wall_s": row["wall_s"] + offset}
        out.append(row)
    return out


def plot_curves(rows: list[dict], path: str, keys: tuple[str, ...] | None = None, x_key: str = "step") -> str:
    """One panel per metric key against ``x_key``; writes a PNG and returns its path."""
    rows = [r for r in rows if x_key in r]
    if keys is None:
        keys = tuple(k for k in ("elbo", "log_p_chain", "log_p_start", "log_p_end", "forward_kl",
                                 "drift_norm_start", "drift_norm_end", "examples_per_s", "fd_fmnist")
                     if any(k in r for r in rows))
    ncols = min(3, max(1, len(keys)))
    nrows = int(math.ceil(len(keys) / ncols)) or 1
    fig, axes = _subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
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
    return save_figure(fig, path, dpi=100)


def save_samples_png(generated: np.ndarray, real: np.ndarray, path: str, title: str | None = None,
                     num: int = 64, ncols: int = 8) -> str:
    """One PNG: ``num`` generated images (left) beside ``num`` real test images (right).

    Images are (N, H, W, C), float32 in [-1, 1] or uint8.
    """

    def as_float(x):
        x = np.asarray(x)[:num]
        return x.astype(np.float32) * (2.0 / 255.0) - 1.0 if x.dtype == np.uint8 else x

    grids = [image_grid(as_float(x), ncols) for x in (generated, real)]
    gray = grids[0].shape[-1] == 1
    h, w = grids[0].shape[:2]
    fig, axes = _subplots(1, 2, figsize=(2 * w * 3 / 100 + 0.3, h * 3 / 100 + 0.6), dpi=100)
    for ax, grid, name in zip(axes, grids, ("generated (z ~ prior)", "real (test set)")):
        ax.imshow(grid[..., 0] if gray else grid, cmap="gray" if gray else None,
                  interpolation="nearest", vmin=0, vmax=255)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_sweep(results: list[dict], metric: str, path: str, title: str | None = None) -> str:
    """``metric`` against step size (log x), one line per decay (and seed); writes a PNG.

    ``results`` are a sweep's member rows (``step_size``, ``decay``, ``seed`` and
    ``metric``); a member whose metric is missing or not finite (diverged) is
    marked by a red band at its step size.
    """
    fig, ax = _subplots(figsize=(5.5, 3.8))
    lines: dict[str, list] = {}
    multi_seed = len({r["seed"] for r in results}) > 1
    for r in results:
        label = f"decay {r['decay']}" + (f", seed {r['seed']}" if multi_seed else "")
        lines.setdefault(label, []).append((r["step_size"], r.get(metric)))
    for label, pts in lines.items():
        pts = sorted(pts, key=lambda p: p[0])
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
    return save_figure(fig, path, dpi=120)


# --------------------------------------------------------------------------- #
# Figures of docs/results.md (the paper's Figs. 2, 4 and 5 on Fashion-MNIST)
# --------------------------------------------------------------------------- #


def plot_metric_curves(runs: dict[str, list[dict]], path: str, metric: str = "fd_fmnist",
                       title: str | None = None) -> str:
    """The paper's Fig. 5B: ``metric`` against SGD steps (left) and training seconds (right).

    Args:
      runs: label -> rows of a run's ``metrics.jsonl`` (rows without ``metric`` are skipped).
      path: PNG to write.
      metric: row key on the y axis (log scale), e.g. ``fd_fmnist``.
      title: optional figure title.

    Raises:
      ValueError: no run has a row with ``metric``.
    """
    curves = {label: [r for r in cumulative_wall_s(rows) if metric in r] for label, rows in runs.items()}
    if not any(curves.values()):
        raise ValueError(f"no run logged {metric!r}; train with fd_every > 0")
    fig, axes = _subplots(1, 2, figsize=(9.5, 3.6), sharey=True)
    for label, rows in curves.items():
        for ax, x_key in zip(axes, ("step", "wall_s")):
            ax.plot([r[x_key] for r in rows], [r[metric] for r in rows], marker="o", ms=3, label=label)
    axes[0].set_xlabel("SGD steps")
    axes[1].set_xlabel("training wall-clock (s)")
    axes[0].set_ylabel(metric)
    for ax in axes:
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def decay_label(decay) -> str:
    """A Fig. 4 row's name for a sweep member's ``decay`` (a float or ``"off"``)."""
    return "no preconditioning" if str(decay) == "off" else f"decay {decay}"


def plot_sweep_heatmap(members: list[dict], metric: str, path: str, title: str | None = None) -> str:
    """The paper's Fig. 4: final ``metric`` over step size (columns) x preconditioning (rows).

    Args:
      members: the ``members`` list of a sweep's ``sweep_results.json``; each has
        ``step_size``, ``decay`` (a float or ``"off"``), ``diverged_at_step`` and ``metric``.
        Members of several sweeps (e.g. one per chain metric) are drawn in one figure when
        each carries a ``row`` label: one row per label, in the order first seen.
      path: PNG to write.
      metric: member key shown in the cells (lower is drawn darker-is-better for FD).
      title: optional title.

    Diverged members (or a missing value) are drawn as a hatched cell marked "diverged".
    """
    step_sizes = sorted({m["step_size"] for m in members})
    if all("row" in m for m in members):
        keys = [m["row"] for m in members]
        rows = labels = list(dict.fromkeys(keys))
    else:
        keys = [str(m["decay"]) for m in members]
        rows = sorted(set(keys), key=lambda d: (d != "off", float(d) if d != "off" else 0))
        labels = [decay_label(d) for d in rows]
    grid = np.full((len(rows), len(step_sizes)), np.nan)
    for m, key in zip(members, keys):
        value = m.get(metric)
        if m.get("diverged_at_step") is None and value is not None:
            grid[rows.index(key), step_sizes.index(m["step_size"])] = value
    width = 1.1 * len(step_sizes) + 1.6 + 0.07 * max(len(label) for label in labels)
    fig, ax = _subplots(figsize=(width, 0.7 * len(rows) + 1.6))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis_r", aspect="auto")
    finite = grid[np.isfinite(grid)]
    light = grid < ((finite.min() + finite.max()) / 2 if finite.size else -np.inf)
    for i, j in np.ndindex(grid.shape):  # viridis_r is light at low values: dark text there
        text = "diverged" if np.isnan(grid[i, j]) else f"{grid[i, j]:.0f}"
        ax.text(j, i, text, ha="center", va="center", fontsize=8,
                color="crimson" if np.isnan(grid[i, j]) else "black" if light[i, j] else "white")
    ax.set_xticks(range(len(step_sizes)), [f"{s:g}" for s in step_sizes])
    ax.set_yticks(range(len(rows)), labels)
    ax.set_xlabel("Langevin step size")
    fig.colorbar(image, ax=ax, label=metric)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def plot_bars(values: dict[str, tuple[float, float]], path: str, ylabel: str, title: str | None = None) -> str:
    """Bar chart of ``label -> (mean, sd)`` (the paper's Fig. 2 layout); sd drawn as error bars."""
    labels = list(values)
    fig, ax = _subplots(figsize=(1.3 * len(labels) + 1.5, 3.2))
    ax.bar(labels, [values[k][0] for k in labels], yerr=[values[k][1] for k in labels], capsize=4,
           color="tab:blue", alpha=0.8)
    for i, k in enumerate(labels):
        ax.text(i, values[k][0], f"{values[k][0]:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


# --------------------------------------------------------------------------- #
# Chain diagnostics (the paper's Figs. 1, 3, 6, 7 and 8)
# --------------------------------------------------------------------------- #


def _finite_limits(curves: list[tuple[np.ndarray, np.ndarray]], log: bool) -> tuple[float, float] | None:
    """y-limits spanning mean +- sd of the curves that stay finite (a diverged one would swamp the axis)."""
    lo, hi = [], []
    for mean, sd in curves:
        band = np.stack([mean - sd, mean + sd, mean])
        if np.isfinite(band).all():
            lo.append(float(mean.min() if log else band.min()))
            hi.append(float(band.max()))
    if not lo:
        return None
    lo_, hi_ = min(lo), max(hi)
    if log:
        return lo_ / 1.5, hi_ * 1.5
    pad = 0.05 * (hi_ - lo_ or 1.0)
    return lo_ - pad, hi_ + pad


def plot_chain_curves(curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], path: str,
                      title: str | None = None, dashed: tuple[str, ...] = (), log_panels: tuple[str, ...] = ()) -> str:
    """The paper's Figs. 3/7/8: per-step mean +- sd of chain statistics, one panel each.

    Args:
      curves: label (e.g. ``"preconditioned, step 0.1"``) -> panel name (e.g.
        ``"log p(x, z_t) - log p(x, z_0) (nats)"``) -> ``(mean (T,), sd (T,))``.
        Every label must have the same panels. A curve that turns non-finite
        (a diverged chain) is drawn up to there, marked by a dotted vertical
        line, and left out of the y-limits.
      path: PNG to write.
      title: optional figure title.
      dashed: labels drawn with dashed lines (e.g. the runs without preconditioning).
      log_panels: panels drawn on a log y-axis (e.g. the drift norm).
    """
    panels = list(next(iter(curves.values())))
    fig, axes = _subplots(1, len(panels), figsize=(4.8 * len(panels), 3.8), squeeze=False)
    for i, (label, stats) in enumerate(curves.items()):
        color = f"C{i % 10}"
        for ax, panel in zip(axes[0], panels):
            mean, sd = (np.asarray(a, np.float64) for a in stats[panel])
            t = np.arange(len(mean))
            bad = np.flatnonzero(~np.isfinite(mean))
            ax.plot(t, mean, "--" if label in dashed else "-", color=color, lw=1.2,
                    label=label if not bad.size else f"{label} (diverged at t={bad[0]})")
            if bad.size:  # diverged: a dotted line where the batch mean stops being finite, no band
                ax.axvline(bad[0], color=color, ls=":", lw=1)
            else:
                ax.fill_between(t, mean - sd, mean + sd, color=color, alpha=0.12, lw=0)
    for ax, panel in zip(axes[0], panels):
        log = panel in log_panels
        if log:
            ax.set_yscale("log")
        limits = _finite_limits([tuple(np.asarray(a, np.float64) for a in c[panel]) for c in curves.values()], log)
        if limits:
            ax.set_ylim(*limits)
        ax.set_xlabel("Langevin step t")
        ax.set_ylabel(panel)
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def plot_pca_trajectories(paths: dict[str, list[np.ndarray]], path: str, titles: list[str] | None = None,
                          suptitle: str | None = None) -> str:
    """The paper's Figs. 1/6: latent trajectories on their 2 principal components.

    Args:
      paths: row label (e.g. ``"preconditioned, step 0.03"``) -> one (T + 1, 2)
        projected path z_0..z_T per image (column); z_0 is the chain's start.
      path: PNG to write.
      titles: optional per-panel titles, one per row label, or one per image.
      suptitle: optional figure title.
    """
    rows, ncols = list(paths), max(len(p) for p in paths.values())
    fig, axes = _subplots(len(rows), ncols, figsize=(3.3 * ncols, 3.1 * len(rows)), squeeze=False)
    for i, label in enumerate(rows):
        for j, xy in enumerate(paths[label]):
            ax, xy = axes[i][j], np.asarray(xy)
            ax.plot(xy[:, 0], xy[:, 1], "-", color=f"C{i}", lw=0.7, alpha=0.8)
            ax.plot(xy[0, 0], xy[0, 1], "*", color="k", ms=11, label="start (encoder)")
            ax.plot(xy[-1, 0], xy[-1, 1], "s", color=f"C{i}", ms=6, mec="k", label="end")
            ax.set_title(f"{label}" + (f"\n{titles[j]}" if titles else ""), fontsize=7)
            ax.tick_params(labelsize=6)
            ax.grid(alpha=0.3)
        axes[i][0].set_ylabel("PC 2")
    for ax in axes[-1]:
        ax.set_xlabel("PC 1")
    axes[0][0].legend(fontsize=6)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def plot_rhat_histogram(rhats: dict[str, np.ndarray], path: str, threshold: float = 1.01,
                        title: str | None = None) -> str:
    """Histogram of split R-hat per latent dimension for each setting, with the ``threshold`` line.

    Non-finite values (diverged chains) are counted in the legend, not drawn; the
    x axis turns logarithmic when R-hat reaches 2.
    """
    fig, ax = _subplots(figsize=(5.5, 3.4))
    values = {k: np.asarray(v, np.float64).ravel() for k, v in rhats.items()}
    finite = np.concatenate([v[np.isfinite(v)] for v in values.values()] + [np.array([1.0, threshold * 1.02])])
    lo, hi = min(0.99, float(finite.min())), float(finite.max())
    log = hi > 2.0  # unmixed chains: R-hat spans orders of magnitude
    bins = np.geomspace(lo, hi, 40) if log else np.linspace(lo, hi, 40)
    for i, (label, v) in enumerate(values.items()):
        undefined = int((~np.isfinite(v)).sum())
        ax.hist(v[np.isfinite(v)], bins=bins, color=f"C{i}", alpha=0.5,
                label=f"{label}: {np.mean(v < threshold):.0%} < {threshold}"
                      + (f", {undefined} undefined" if undefined else ""))
    if log:
        ax.set_xscale("log")
    ax.axvline(threshold, color="k", ls=":", lw=1)
    ax.set_xlabel("split R-hat (per image x latent dimension)")
    ax.set_ylabel("count")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)
