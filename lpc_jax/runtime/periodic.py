"""Periodic actions of the training loop, in the style of clu's ``periodic_actions``.

The loop calls every action after each SGD step; an action decides whether it
fires (every ``every_steps`` steps, and at the last step) and runs its callback.
:class:`ReportProgress` measures steps/s over the window since its last report
and the time left.

    log = PeriodicAction(write_row, every_steps=50, num_total=1000)
    for step in range(1, 1001):
        ...                      # one SGD step
        log(step)                # write_row(step) at steps 50, 100, ..., 1000
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Sequence


class PeriodicAction:
    """Runs ``callback(step)`` every ``every_steps`` steps and at step ``num_total``.

    Args:
      callback: called with the step (SGD steps done) when the action fires.
      every_steps: a period in steps, or several (the action fires at a multiple
        of any); 0 entries are ignored, and with none left the action never fires.
      num_total: the run's last step; the action always fires there.
    """

    def __init__(self, callback: Callable[[int], Any], *, every_steps: int | Sequence[int], num_total: int):
        periods = (every_steps,) if isinstance(every_steps, int) else tuple(every_steps)
        self._periods = tuple(int(n) for n in periods if n > 0)
        self._callback = callback
        self.num_total = int(num_total)

    def should_trigger(self, step: int) -> bool:
        return bool(self._periods) and (step == self.num_total or any(step % n == 0 for n in self._periods))

    def __call__(self, step: int) -> bool:
        """Runs the callback if the action fires at ``step``; returns whether it fired."""
        if not self.should_trigger(step):
            return False
        self._callback(step)
        return True


class Progress(NamedTuple):
    steps_per_s: float  # over the window since the previous report
    wall_s: float  # seconds since the meter started
    eta_s: float  # seconds left at ``steps_per_s``


class ReportProgress:
    """Steps/s since the previous call and the time left to ``num_total`` (clu's ``ReportProgress``)."""

    def __init__(self, *, start_step: int, num_total: int):
        self.num_total = int(num_total)
        self._t_start = self._t_window = time.time()
        self._window_start = int(start_step)

    @property
    def wall_s(self) -> float:
        return time.time() - self._t_start

    def __call__(self, step: int) -> Progress:
        """Measures the window ending at ``step`` and starts the next one there."""
        now = time.time()
        rate = (step - self._window_start) / max(now - self._t_window, 1e-9)
        self._t_window, self._window_start = now, step
        return Progress(rate, now - self._t_start, (self.num_total - step) / max(rate, 1e-9))


def format_time(seconds: float) -> str:
    """``1h02m03s`` or ``2m03s``."""
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
