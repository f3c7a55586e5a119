"""``python -m benchmarks.device --quick`` runs and prints one JSON line with every figure."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # compiles about 17 programs: over a minute even on a quiet 2-core CPU
def test_quick_prints_one_json_line_with_every_figure():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.device", "--quick"], cwd=REPO, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert set(out["chain_step_ms"]) == {f"28x28x1/{impl}/{dtype}" for impl in ("tuned", "xla")
                                         for dtype in ("float32", "bfloat16")}
    row = out["table4"]["28x28x1"]
    assert row["vae_s"] > 0 and row["ratio_reverse_kl"] > 0 and row["ratio_jeffreys"] > 0
    assert out["table4"]["paper"]["ratio_jeffreys"] == 36
    assert out["main_job"]["steps_per_s"] > 0 and out["main_job"]["precision_highest_over_default"] > 0
    sweep = out["sweep_K2"]
    assert sweep["auto_picks"] == "map" and all(sweep[f"speedup_{m}"] > 0 for m in ("auto", "vmap", "map"))
    assert out["device"].endswith("(cpu)")
