"""The run's logs on disk: atomic file writes and the JSON-lines metrics log.

Every file a run writes beside its checkpoints is complete or absent: whole
files go through a temporary and ``os.replace`` (:func:`write_atomic`,
:func:`atomic_path` for files a library writes, such as PNGs); appends to a
JSON-lines log are cut back to the last complete line when they fail
(:func:`append_lines`). A write that fails (a full disk above all) raises
:class:`LogWriteError`, one message naming the file and how to resume.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os


class LogWriteError(OSError):
    """A log, plot or summary could not be written; the files written before are complete.

    Attributes:
      path: the file not written.
      disk_full: whether the filesystem was full (ENOSPC/EDQUOT).
    """

    def __init__(self, message: str, *, path: str, disk_full: bool):
        super().__init__(message)
        self.path, self.disk_full = path, disk_full


def _is_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def disk_errors(path: str):
    """Turns an ``OSError`` raised inside into :class:`LogWriteError` naming ``path``."""
    try:
        yield
    except LogWriteError:
        raise
    except OSError as e:
        full = _is_full(e)
        reason = "no space left on device" if full else f"{type(e).__name__}: {e}"
        fix = "free space there (or move the run directory to a larger disk)" if full else "fix the cause"
        raise LogWriteError(
            f"could not write {path}: {reason}. Every file written before is complete and nothing was deleted; "
            f"{fix}, then rerun the same command with the same --workdir: it resumes from the last "
            f"checkpoint.", path=path, disk_full=full) from e


def append_lines(path: str, lines: list[str]) -> None:
    """Appends ``lines`` to ``path``; on failure cuts the file back to its old size and raises LogWriteError."""
    with disk_errors(path):
        size = os.path.getsize(path) if os.path.exists(path) else 0
        try:
            with open(path, "a") as f:
                f.writelines(lines)
        except OSError:
            with contextlib.suppress(OSError):
                os.truncate(path, size)
            raise


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary path beside ``path`` (same extension); renamed to ``path`` on success.

    For files another library writes (``fig.savefig(tmp)``): ``path`` is the old
    file or the new one, never a torn one. On failure the temporary is removed and
    :class:`LogWriteError` raised.
    """
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"
    with disk_errors(path):
        try:
            yield tmp
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise


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
    """Writes ``path`` so that a kill or a full disk leaves the old or the new file, never a torn one.

    Raises:
      LogWriteError: the write failed (nothing of it is left behind).
    """
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_json(path: str, obj, **kwargs) -> None:
    """``json.dumps(obj, **kwargs)`` written with :func:`write_atomic`."""
    write_atomic(path, json.dumps(obj, **kwargs))


def json_number(v):
    """JSON-safe value: NaN/Inf -> None, numpy scalars -> float; None, bool, int, str as they are."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    v = float(v)
    return v if math.isfinite(v) else None
