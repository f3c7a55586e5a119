"""The run's logs on disk: atomic file writes and the JSON-lines metrics log."""

from __future__ import annotations

import json
import math
import os


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


def write_atomic(path: str, text: str) -> None:
    """Writes ``path`` so that a kill at any moment leaves the old or the new file, never a torn one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def json_number(v):
    """JSON-safe value: NaN/Inf -> None, numpy scalars -> float; None, bool, int, str as they are."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    v = float(v)
    return v if math.isfinite(v) else None
