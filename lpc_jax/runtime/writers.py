"""Metric writers: one call logs a step to ``metrics.jsonl`` and to TensorBoard.

The interface is clu's ``MetricWriter`` (``write_scalars``, ``write_images``,
``flush``, ``close``) in a few lines, with two writers behind it:

* :class:`JsonlWriter`: one JSON object per call appended to a JSON-lines file
  (``{"step": s, **label, **scalars}``); several writers (a sweep's members) may
  share the file. A write that fails (a full disk above all) is cut back to the
  last complete line and raises :class:`lpc_jax.runtime.logs.LogWriteError`.
* :class:`TensorBoardWriter`: TensorBoard event files, written synchronously with
  tensorboardX's record writer and summary protos (no TensorFlow), one
  directory per run: ``tensorboard --logdir <workdir>/tensorboard``.

    writer = MultiWriter([JsonlWriter(path), TensorBoardWriter(logdir)])
    writer.write_scalars(step, {"elbo": -250.1, "loss": 251.3})
    writer.write_images(step, {"prior_samples": grid})   # (H, W, C) floats in [0, 1]

TensorBoard takes numbers only: ``None`` (NaN/Inf in the JSON log), strings and
booleans are left out of its scalars.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping, Sequence

import numpy as np

from lpc_jax.runtime import logs


class MetricWriter:
    """The writer interface (clu's ``metric_writers.MetricWriter``)."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """``images``: name -> (H, W, C) array with values in [0, 1]; C = 1 or 3."""

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.flush()


class JsonlWriter(MetricWriter):
    """Appends ``{"step": step, **label, **scalars}`` lines to ``path`` (images are not logged).

    ``skip``: scalar names left out of the file (e.g. a rate only TensorBoard shows).

    Raises (from ``write_scalars``):
      logs.LogWriteError: the append failed (e.g. no space left); the file is cut
        back to its last complete line.
    """

    def __init__(self, path: str, label: Mapping[str, Any] | None = None, *, skip: Sequence[str] = ()):
        self.path, self.label, self.skip = path, dict(label or {}), frozenset(skip)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        row = {"step": step, **self.label, **{k: v for k, v in scalars.items() if k not in self.skip}}
        logs.append_lines(self.path, [json.dumps(row) + "\n"])


class TensorBoardWriter(MetricWriter):
    """TensorBoard event file in ``logdir`` (created), written without TensorFlow (tensorboardX).

    Each call writes and flushes its records, so a killed run leaves complete
    records; a failed write raises :class:`lpc_jax.runtime.logs.LogWriteError`.
    """

    def __init__(self, logdir: str):
        # tensorboardX imports protobuf: only where used
        from tensorboardX.event_file_writer import EventsWriter

        self.logdir = logdir
        with logs.disk_errors(logdir):
            os.makedirs(logdir, exist_ok=True)
            self._writer = EventsWriter(os.path.join(logdir, "events"))

    def _write(self, step: int, summaries: list) -> None:
        from tensorboardX.proto import event_pb2

        with logs.disk_errors(self.logdir):
            for summary in summaries:
                self._writer.write_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
            self._writer.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        from tensorboardX import summary

        numbers = {k: float(v) for k, v in scalars.items()
                   if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and np.isfinite(v)}
        self._write(step, [summary.scalar(k, v) for k, v in numbers.items()])

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        from tensorboardX import summary

        self._write(step, [summary.image(k, np.clip(np.asarray(v, np.float32), 0, 1), dataformats="HWC")
                           for k, v in images.items()])

    def close(self) -> None:
        with logs.disk_errors(self.logdir):
            self._writer.close()


class MultiWriter(MetricWriter):
    """Forwards every call to each of ``writers`` in order."""

    def __init__(self, writers: Sequence[MetricWriter]):
        self.writers = tuple(writers)

    def write_scalars(self, step, scalars):
        for w in self.writers:
            w.write_scalars(step, scalars)

    def write_images(self, step, images):
        for w in self.writers:
            w.write_images(step, images)

    def flush(self):
        for w in self.writers:
            w.flush()

    def close(self):
        for w in self.writers:
            w.close()


class NullWriter(MetricWriter):
    """Writes nothing (processes other than 0)."""

    def write_scalars(self, step, scalars):
        pass


def member_writers(workdir: str, jsonl_path: str, labels: Sequence[Mapping[str, Any]], *, per_member: bool,
                   primary: bool = True) -> list[MetricWriter]:
    """A training run's writers, one per member: its rows of ``jsonl_path`` and its TensorBoard run.

    TensorBoard runs live in ``workdir/tensorboard`` (``per_member``: a sweep, in
    ``tensorboard/member_<i>``). ``steps_per_s`` goes to TensorBoard only (the
    JSON-lines log keeps its columns; ``examples_per_s`` is the same rate).
    Processes other than the ``primary`` one get :class:`NullWriter` s.
    """
    if not primary:
        return [NullWriter() for _ in labels]
    logdir = os.path.join(workdir, "tensorboard")
    return [MultiWriter([JsonlWriter(jsonl_path, label, skip=("steps_per_s",)),
                         TensorBoardWriter(os.path.join(logdir, f"member_{i}") if per_member else logdir)])
            for i, label in enumerate(labels)]


def read_events(logdir: str) -> list:
    """Every ``tensorboard.Event`` record of the event files in ``logdir`` (TFRecord framing), oldest first.

    For tests and scripts without TensorBoard installed; CRCs are not checked.
    """
    from tensorboardX.proto import event_pb2

    events = []
    for name in sorted(n for n in os.listdir(logdir) if ".tfevents." in n):
        with open(os.path.join(logdir, name), "rb") as f:
            data = f.read()
        at = 0
        while at + 12 <= len(data):
            length = int.from_bytes(data[at:at + 8], "little")
            if at + 12 + length + 4 > len(data):
                break  # a torn last record
            events.append(event_pb2.Event.FromString(data[at + 12:at + 12 + length]))
            at += 12 + length + 4
    return events


def scalars_of(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of the scalar summaries in ``logdir``'s event files."""
    out: dict[str, list[tuple[int, float]]] = {}
    for event in read_events(logdir):
        for value in event.summary.value:
            if value.HasField("simple_value"):
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out
