"""The docs/results.md figure and table builders: parsing, aggregation, PNGs."""

import json
import os

import matplotlib.axes
import numpy as np
import pytest

from experiments import figures
from lpc_jax import plotting


def _run(tmp_path, name, eval_json, wall=None, rows=()):
    d = tmp_path / name
    d.mkdir()
    (d / "eval.json").write_text(json.dumps(eval_json))
    (d / "summary.json").write_text(json.dumps({"train_wall_s_this_run": wall}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(d)


def test_parse_runs_keeps_order_and_labels_with_equals(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert figures.parse_runs(f"T=3 LPC={a},VAE={b}") == [("T=3 LPC", str(a)), ("VAE", str(b))]


@pytest.mark.parametrize("text, error", [("", ValueError), ("novalue", ValueError),
                                         ("x=/no/such/dir", FileNotFoundError)])
def test_parse_runs_rejects_bad_input(text, error):
    with pytest.raises(error, match="runs"):
        figures.parse_runs(text)


def test_mean_sd_is_the_sample_sd():
    assert figures.mean_sd([1.0, 3.0]) == (2.0, pytest.approx(np.sqrt(2.0)))
    assert figures.mean_sd([5.0]) == (5.0, 0.0)


def test_table_groups_repeated_labels_as_seeds(tmp_path):
    runs = [("LPC", _run(tmp_path, "l0", {"fd_fmnist": 20.0, "step": 10}, wall=100.0)),
            ("LPC", _run(tmp_path, "l1", {"fd_fmnist": 30.0, "step": 10}, wall=300.0)),
            ("VAE", _run(tmp_path, "v0", {"fd_fmnist": 40.0, "step": 10}, wall=50.0))]
    text = figures.table_markdown(runs)
    lpc = next(line for line in text.splitlines() if line.startswith("| LPC"))
    vae = next(line for line in text.splitlines() if line.startswith("| VAE"))
    assert "| 2 |" in lpc and "25 ± 7.1" in lpc and "200 ± 1.4e+02" in lpc
    assert "| 1 |" in vae and "| 40 |" in vae


def _ais_run(tmp_path, name, ais, iwae, fd):
    d = _run(tmp_path, name, {"ais_per_image_nats": ais, "iwae_per_image_nats": iwae, "ais_log_likelihood_nats":
                              float(np.mean(ais)), "iwae_log_likelihood_nats": float(np.mean(iwae))})
    with open(os.path.join(d, "summary.json"), "w") as f:
        json.dump({"fd_fmnist": fd, "test_elbo_nats": -100.0}, f)
    return d


def test_ais_table_pairs_images_and_takes_sample_metrics_from_the_summary(tmp_path):
    runs = [("LPC", _ais_run(tmp_path, "l0", [-10.0, -20.0, -30.0], [-12.0, -21.0, -33.0], fd=20.0)),
            ("LPC", _ais_run(tmp_path, "l1", [-12.0, -22.0, -32.0], [-13.0, -24.0, -35.0], fd=30.0)),
            ("VAE", _ais_run(tmp_path, "v0", [-13.0, -20.0, -32.0], [-13.0, -22.0, -35.0], fd=40.0))]
    lines = figures.ais_table_markdown(runs).splitlines()
    lpc = next(line for line in lines if line.startswith("| LPC"))
    # fd 25 ± 7.1 from summary.json; AIS -21 ± 1.4; AIS - IWAE: 2 and 2 -> 2 ± 0
    assert "| 2 | 25 ± 7.1 |" in lpc and "| -21 ± 1.4 | 2 ± 0 |" in lpc
    # per image, LPC's seeds averaged: (-11, -21, -31); VAE - LPC = (-2, +1, -1): mean -0.67,
    # se = sd(-2, 1, -1) / sqrt 3 = 1.53 / 1.73 = 0.88; VAE higher on 1 of 3 images
    assert lines[-1] == "| VAE | -0.7 ± 0.9 | 33% |"
    short = _ais_run(tmp_path, "v1", [-1.0, -2.0], [-1.0, -2.0], fd=1.0)
    with pytest.raises(ValueError, match="different numbers of images"):
        figures.ais_table_markdown(runs + [("VAE", short)])
    with pytest.raises(ValueError, match="--ais_steps > 0"):
        figures.ais_table_markdown([("x", _run(tmp_path, "plain", {"fd_fmnist": 1.0}))])


def test_cumulative_wall_s_adds_resumed_segments():
    # segment 1 logged up to 30 s; the resumed segment restarts its clock at 0
    rows = [{"step": 1, "wall_s": 10.0}, {"step": 2}, {"step": 3, "wall_s": 30.0},
            {"step": 4, "wall_s": 5.0}, {"step": 5, "wall_s": 12.0}, {"step": 6, "wall_s": 2.0}]
    out = plotting.cumulative_wall_s(rows)
    assert [r.get("wall_s") for r in out] == [10.0, None, 30.0, 35.0, 42.0, 44.0]
    assert rows[3]["wall_s"] == 5.0  # input untouched


def test_table_wall_clock_sums_resumed_segments(tmp_path):
    rows = [{"step": 1, "wall_s": 40.0}, {"step": 2, "wall_s": 3.0}, {"step": 3, "wall_s": 20.0}]
    text = figures.table_markdown([("LPC", _run(tmp_path, "r", {"fd_fmnist": 1.0, "step": 3}, wall=20.0, rows=rows))])
    assert text.splitlines()[-1].endswith("| 60 |")


def test_table_needs_eval_json(tmp_path):
    (tmp_path / "r").mkdir()
    with pytest.raises(FileNotFoundError, match="eval.json"):
        figures.table_markdown([("x", str(tmp_path / "r"))])


def test_sweep_heatmap_marks_diverged_members(tmp_path, monkeypatch):
    members = [{"step_size": s, "decay": d, "diverged_at_step": 3 if (s, d) == (1.0, "off") else None,
                "fd_fmnist": None if (s, d) == (1.0, "off") else 10 * s}
               for s in (0.01, 1.0) for d in ("off", 0.99)]
    texts = []
    real_text = matplotlib.axes.Axes.text
    monkeypatch.setattr(matplotlib.axes.Axes, "text", lambda self, x, y, s, **k: texts.append((x, y, s))
                        or real_text(self, x, y, s, **k))
    path = plotting.plot_sweep_heatmap(members, "fd_fmnist", str(tmp_path / "h.png"))
    assert os.path.getsize(path) > 0
    # rows: off, 0.99; columns: 0.01, 1.0 -> the diverged cell is row 0, column 1.
    assert (1, 0, "diverged") in texts
    assert sum(t[2] == "diverged" for t in texts) == 1


def _sweep(tmp_path, name, decays, steps=300):
    members = [{"step_size": h, "decay": d, "diverged_at_step": None, "fd_fmnist": 10 * h}
               for d in decays for h in (0.01, 1.0)]
    os.makedirs(tmp_path / name)
    with open(tmp_path / name / "sweep_results.json", "w") as f:
        json.dump({"steps": steps, "num_steps_T": 3, "members": members}, f)
    return str(tmp_path / name)


def test_heatmap_of_several_sweeps_has_a_row_per_sweep_and_decay(tmp_path, monkeypatch):
    runs = [("paper", _sweep(tmp_path, "a", ["off", 0.99])), ("encoder", _sweep(tmp_path, "b", [0.99]))]
    members, title = figures.heatmap_members(runs)
    assert title == "300 SGD steps, T=3"
    assert [m["row"] for m in members] == ["no preconditioning"] * 2 + ["paper, decay 0.99"] * 2 + ["encoder"] * 2
    labels = []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_yticks", lambda self, ticks, names: labels.extend(names))
    plotting.plot_sweep_heatmap(members, "fd_fmnist", str(tmp_path / "h.png"))
    assert labels == ["no preconditioning", "paper, decay 0.99", "encoder"]  # in the order given
    one, _ = figures.heatmap_members(runs[:1])
    assert all("row" not in m for m in one)  # one sweep keeps its rows by decay
    with pytest.raises(ValueError, match="differ in"):
        figures.heatmap_members(runs + [("short", _sweep(tmp_path, "c", [0.99], steps=100))])


def test_metric_curves_need_the_metric(tmp_path):
    with pytest.raises(ValueError, match="fd_every"):
        plotting.plot_metric_curves({"a": [{"step": 1, "wall_s": 1.0}]}, str(tmp_path / "c.png"))
    rows = [{"step": s, "wall_s": 2.0 * s, "fd_fmnist": 100.0 / s} for s in (1, 2, 3)]
    assert os.path.getsize(plotting.plot_metric_curves({"a": rows}, str(tmp_path / "c.png"))) > 0
