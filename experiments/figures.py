"""The figures and tables of ``docs/results.md``, regenerated from finished runs.

    python -m experiments.figures --figure=fd_curves \\
        --runs=LPC=runs/fmnist_lpc,VAE=runs/fmnist_vae --out=docs/figures/fig5_fd_curves.png
    python -m experiments.figures --figure=sweep_heatmap --runs=sweep=runs/fmnist_sweep \\
        --out=docs/figures/fig4_step_size.png
    python -m experiments.figures --figure=sweep_heatmap --out=docs/figures/fig4_chain_metrics.png \\
        --runs=adam_paper=runs/fig4_paper,adam=runs/fig4_adam,encoder=runs/fig4_encoder
    python -m experiments.figures --figure=warm_starts \\
        --runs=none=runs/ws_none,forward_kl=runs/ws_fkl,reverse_kl=runs/ws_rkl,jeffreys=runs/ws_jef \\
        --out=docs/figures/fig2_warm_starts.png
    python -m experiments.figures --figure=table \\
        --runs=LPC=runs/lpc_s0,LPC=runs/lpc_s1,VAE=runs/vae_s0 --out=docs/table1.md
    python -m experiments.figures --figure=ais_table --eval_file=eval_ais.json \\
        --runs=LPC=runs/lpc_s0,LPC=runs/lpc_s1,VAE=runs/vae_s0 --out=docs/ais_table.md

``--runs`` is a comma-separated list of ``label=workdir``; a label given several
times (seeds) is reported as mean ± sd. Nothing is trained or sampled here:
the curves come from each run's ``metrics.jsonl``, the heatmap from
``sweep_results.json``, the table from ``eval.json`` (``python -m experiments.evaluate``),
the AIS table from ``--eval_file`` (evaluated with ``--ais_steps``) and ``summary.json``.
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np
from absl import app, flags

from experiments import launch
from lpc_jax import plotting
from lpc_jax.runtime import logs

FIGURES = ("fd_curves", "warm_starts", "sweep_heatmap", "table", "ais_table")

flags.DEFINE_enum("figure", None, list(FIGURES), "What to draw: fd_curves (Fig. 5B), warm_starts "
                  "(Fig. 2), sweep_heatmap (Fig. 4; several sweeps: a row per sweep and decay), table "
                  "(Table 1, markdown) or ais_table (AIS against IWAE, paired image by image; markdown).")
flags.DEFINE_string("runs", None, "Comma-separated label=workdir pairs; repeat a label for seeds.")
flags.DEFINE_string("out", None, "Output file (PNG, or .md for --figure=table and ais_table).")
flags.DEFINE_string("plot_metric", "fd_fmnist", "Metric of the curves, bars and heatmap.")
flags.DEFINE_string("eval_file", "eval.json", "The table's per-run metrics file (experiments.evaluate's --output).")

FLAGS = flags.FLAGS

TABLE_KEYS = ("step", "fd_fmnist", "kid_fmnist", "density_fmnist", "coverage_fmnist",
              "iwae_log_likelihood_nats", "iwae_bits_per_dim", "test_elbo_nats", "test_elbo_bits_per_dim",
              "train_wall_s")
# ais_table: the end-of-training evaluation (summary.json: all test images, 10,000 samples), then eval_file's bounds
SUMMARY_KEYS = ("fd_fmnist", "density_fmnist", "coverage_fmnist", "test_elbo_nats")
AIS_KEYS = ("iwae_log_likelihood_nats", "ais_log_likelihood_nats", "ais_minus_iwae_nats", "ais_ess", "ais_acceptance")


def parse_runs(text: str | None) -> list[tuple[str, str]]:
    """``"a=dir1,b=dir2"`` -> ``[("a", "dir1"), ("b", "dir2")]``; ValueError names the flag."""
    if not text:
        raise ValueError("runs is empty: give label=workdir pairs, e.g. --runs=LPC=runs/lpc,VAE=runs/vae")
    pairs = []
    for item in text.split(","):
        label, sep, workdir = item.rpartition("=")
        if not sep or not label or not workdir:
            raise ValueError(f"runs: {item!r} is not label=workdir")
        if not os.path.isdir(workdir):
            raise FileNotFoundError(f"runs: {workdir!r} (label {label!r}) is not a directory")
        pairs.append((label, workdir))
    return pairs


def _read_json(workdir: str, name: str) -> dict:
    path = os.path.join(workdir, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: finish the run (or run experiments.evaluate) first")
    with open(path) as f:
        return json.load(f)


def heatmap_members(runs: list[tuple[str, str]]) -> tuple[list[dict], str]:
    """The members of one or more sweeps (``sweep_results.json``) for one Fig. 4 heatmap.

    One sweep keeps its rows by decay. Several (e.g. one per ``--chain_metric``) get a
    ``row`` per label and decay, e.g. ``"adam, decay 0.99"``, or just the label where
    its sweep has one decay; members without preconditioning (decay ``"off"``) get the
    row ``"no preconditioning"`` whichever sweep they come from. Returns the members and
    a title; ValueError if the sweeps trained for different SGD steps or chain lengths
    (their cells would not compare).
    """
    summaries = [(label, _read_json(workdir, "sweep_results.json")) for label, workdir in runs]
    shapes = {(s["steps"], s["num_steps_T"]) for _, s in summaries}
    if len(shapes) > 1:
        raise ValueError(f"runs: the sweeps differ in (SGD steps, T): {sorted(shapes)}; "
                         "draw sweeps of the same length together")
    steps, num_steps = shapes.pop()
    title = f"{steps} SGD steps, T={num_steps}"
    if len(summaries) == 1:
        return summaries[0][1]["members"], f"{summaries[0][0]}: {title}"
    members = []
    for label, summary in summaries:
        one_decay = len({str(m["decay"]) for m in summary["members"]}) == 1
        for m in summary["members"]:
            name = plotting.decay_label(m["decay"])  # "no preconditioning" or "decay 0.99"
            row = name if str(m["decay"]) == "off" else label if one_decay else f"{label}, {name}"
            members.append({**m, "row": row})
    return members, title


def _final(rows: list[dict], metric: str, workdir: str) -> float:
    values = [r[metric] for r in rows if metric in r]
    if not values:
        raise ValueError(f"{workdir}/metrics.jsonl has no {metric!r}: train with fd_every > 0")
    return float(values[-1])


def _train_wall_s(workdir: str, summary: dict) -> float | None:
    """Training seconds summed over a run's resumed segments (``metrics.jsonl``), else the summary's."""
    rows = [r for r in plotting.cumulative_wall_s(logs.read_metrics(os.path.join(workdir, "metrics.jsonl")))
            if "wall_s" in r]
    return rows[-1]["wall_s"] if rows else summary.get("train_wall_s_this_run")


def _cell(values: list) -> str:
    """A table cell: mean ± sd of the values that are not None (the mean alone for one), or "—"."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    m, s = mean_sd(values)
    return f"{m:.4g} ± {s:.2g}" if len(values) > 1 else f"{m:.4g}"


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def table_markdown(runs: list[tuple[str, str]], eval_file: str = "eval.json") -> str:
    """Table 1 layout: one row per label, mean ± sd over its workdirs (seeds), from ``eval_file``."""
    groups = collections.defaultdict(list)
    for label, workdir in runs:
        result = _read_json(workdir, eval_file)
        summary = _read_json(workdir, "summary.json")
        result["train_wall_s"] = _train_wall_s(workdir, summary)
        groups[label].append(result)
    keys = [k for k in TABLE_KEYS if any(k in r for rs in groups.values() for r in rs)]
    lines = ["| run | seeds | " + " | ".join(keys) + " |", "|" + " --- |" * (len(keys) + 2)]
    for label, results in groups.items():
        cells = [_cell([r.get(k) for r in results]) for k in keys]
        lines.append(f"| {label} | {len(results)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ais_table_markdown(runs: list[tuple[str, str]], eval_file: str = "eval.json") -> str:
    """AIS next to IWAE and the sample metrics (mean ± sd over a label's seeds), then each
    label's AIS against the first label's, image by image (markdown).

    ``ais_minus_iwae_nats`` is each run's mean over its images of AIS - IWAE (the encoder
    gap, nats); the paired rows average a label's seeds per image first and give the mean
    ± standard error over images and the share of images where the label is higher.

    Raises:
      FileNotFoundError: a run without ``summary.json`` or ``eval_file``.
      ValueError: ``eval_file`` without per-image AIS and IWAE values (evaluate with
        ``--ais_steps`` and ``--iwae_samples`` > 0), or runs on different numbers of images.
    """
    groups = collections.defaultdict(list)
    for label, workdir in runs:
        result, summary = _read_json(workdir, eval_file), _read_json(workdir, "summary.json")
        if "ais_per_image_nats" not in result or "iwae_per_image_nats" not in result:
            raise ValueError(f"{workdir}/{eval_file} has no per-image AIS and IWAE values: run "
                             "experiments.evaluate with --ais_steps > 0 and --iwae_samples > 0")
        ais_images, iwae_images = np.asarray(result["ais_per_image_nats"]), np.asarray(result["iwae_per_image_nats"])
        n = min(len(ais_images), len(iwae_images))  # both start at the first test image
        row = {k: summary.get(k) for k in SUMMARY_KEYS} | {k: result.get(k) for k in AIS_KEYS}
        row["ais_minus_iwae_nats"] = float(np.mean(ais_images[:n] - iwae_images[:n]))
        groups[label].append((row, ais_images))
    if len({len(a) for members in groups.values() for _, a in members}) != 1:
        raise ValueError(f"the runs' {eval_file} hold AIS values of different numbers of images: "
                         "evaluate every run with the same --ais_examples")
    keys = SUMMARY_KEYS + AIS_KEYS
    lines = ["| run | seeds | " + " | ".join(keys) + " |", "|" + " --- |" * (len(keys) + 2)]
    for label, members in groups.items():
        cells = [_cell([r[k] for r, _ in members]) for k in keys]
        lines.append(f"| {label} | {len(members)} | " + " | ".join(cells) + " |")
    labels = list(groups)
    per_image = {label: np.mean([a for _, a in groups[label]], axis=0) for label in labels}
    n = per_image[labels[0]].size
    lines += ["", f"| AIS(run) - AIS({labels[0]}), {n} images | mean ± se (nats) | images where higher |",
              "| --- | --- | --- |"]
    for label in labels[1:]:
        d = per_image[label] - per_image[labels[0]]
        se = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
        lines.append(f"| {label} | {d.mean():.1f} ± {se:.1f} | {np.mean(d > 0):.0%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if FLAGS.figure is None or FLAGS.out is None:
        raise app.UsageError("--figure and --out are required")
    try:
        runs = parse_runs(FLAGS.runs)
        metric = FLAGS.plot_metric
        if FLAGS.figure in ("table", "ais_table"):
            build = table_markdown if FLAGS.figure == "table" else ais_table_markdown
            text = build(runs, FLAGS.eval_file)
            with open(FLAGS.out, "w") as f:
                f.write(text)
            print(text)
        elif FLAGS.figure == "sweep_heatmap":
            members, title = heatmap_members(runs)
            plotting.plot_sweep_heatmap(members, metric, FLAGS.out, title=f"{title}: {metric}")
        else:
            rows = collections.defaultdict(list)
            for label, workdir in runs:
                rows[label].append((workdir, logs.read_metrics(os.path.join(workdir, "metrics.jsonl"))))
            if FLAGS.figure == "fd_curves":  # the first workdir of each label
                plotting.plot_metric_curves({label: rs[0][1] for label, rs in rows.items()}, FLAGS.out, metric)
            else:
                bars = {label: mean_sd([_final(r, metric, w) for w, r in rs]) for label, rs in rows.items()}
                plotting.plot_bars(bars, FLAGS.out, ylabel=f"final {metric}", title="warm start of the chain")
    except launch.RUN_ERRORS as e:
        launch.exit_with_error(e)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(launch.absl_main(main))
