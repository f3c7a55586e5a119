"""One writer per run directory: an exclusive, self-releasing lock on a workdir.

    with workdir.lock("runs/fashion_mnist_lpc", "train"):
        ...  # no other run trains, sweeps or resumes in this directory meanwhile

The lock is ``fcntl.flock`` on a small file in the directory (``.run.lock``)
that names its holder (pid, host, purpose, start time, command). A second
``lock`` on a directory in use raises :class:`WorkdirLockedError` at once,
naming that holder. The kernel drops the lock when its holder exits, however it
exits (``kill -9`` included), so a lock is never stuck: a file still naming a
holder that is gone is a stale lock, and it is taken over with a warning.

* Re-entrant within a process: nested ``lock`` calls on the same file (a
  launcher's, then the training loop's) share one lock, released by the
  outermost.
* ``name`` picks the lock file, so independent jobs do not exclude each other:
  training and sweeps share ``"run"``; ``experiments.evaluate`` (which only
  reads the checkpoints and writes files of its own) takes ``"eval"``.
* Multi-process runs (``jax.distributed``): pass ``process_index`` (e.g.
  ``jax.process_index()``); each process then holds a lock file of its own
  (``.run.lock``, ``.run.lock.1``, ...), so two jobs on one shared directory
  still exclude each other process by process.
* The file is left in place (empty once released): deleting a lock file
  races with a process that has just opened it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import functools
import inspect
import json
import os
import socket
import sys
import threading
from typing import Callable, Iterator

import jax
from absl import logging


class _Held:
    """A lock file this process holds: its descriptor, holder record and nesting depth."""

    def __init__(self, fd: int, record: dict):
        self.fd, self.record, self.depth = fd, record, 1


_HELD: dict[str, _Held] = {}  # real path of the lock file -> what this process holds
_HELD_LOCK = threading.Lock()


class WorkdirLockedError(RuntimeError):
    """The run directory is locked by another live process.

    Attributes:
      directory: the directory asked for.
      holder: what the lock file says about its holder (``pid``, ``host``,
        ``purpose``, ``started``, ``command``); empty if it had not written it yet.
    """

    def __init__(self, directory: str, holder: dict, lock_file: str):
        who = (f"{holder.get('purpose', '?')} run, pid {holder.get('pid', '?')} on host "
               f"{holder.get('host', '?')}, started {holder.get('started', '?')}") if holder else "a process starting up"
        command = f"; command: {holder['command']}" if holder.get("command") else ""
        super().__init__(
            f"{directory} is in use by another {who}{command} (lock file {lock_file}). Wait for it to "
            f"finish or stop it, or use another --workdir; nothing in {directory} was changed.")
        self.directory, self.holder = directory, holder


def lock_file(directory: str, name: str = "run", process_index: int = 0) -> str:
    """The lock file's path: ``<directory>/.<name>.lock`` (``.<name>.lock.<i>`` for process i > 0)."""
    return os.path.join(directory, f".{name}.lock" + (f".{process_index}" if process_index else ""))


def holder(directory: str, name: str = "run", process_index: int = 0) -> dict:
    """What the lock file names as holder (possibly a stale one); {} if none."""
    try:
        with open(lock_file(directory, name, process_index)) as f:
            return _parse(f.read())
    except FileNotFoundError:
        return {}


def _parse(text: str) -> dict:
    try:
        info = json.loads(text)
    except ValueError:  # empty (released) or being written
        return {}
    return info if isinstance(info, dict) else {}


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


@contextlib.contextmanager
def lock(directory: str, purpose: str, *, name: str = "run", process_index: int = 0,
         create: bool = True) -> Iterator[dict]:
    """Holds the exclusive lock of ``directory`` for the ``with`` block.

    Args:
      directory: the run directory.
      purpose: what the holder does ("train", "sweep", "evaluate"), named in the
        error another process gets.
      name: which lock of the directory (see the module docstring).
      process_index: this process's index in a multi-process run.
      create: create ``directory`` if it does not exist (else FileNotFoundError).

    Yields:
      The holder record written into the lock file.

    Raises:
      WorkdirLockedError: another live process holds the lock (raised at once).
      FileNotFoundError: ``directory`` does not exist and ``create`` is False.
    """
    if create:
        os.makedirs(directory, exist_ok=True)
    elif not os.path.isdir(directory):
        raise FileNotFoundError(f"run directory {directory} does not exist; pass the --workdir of a training run")
    path = os.path.realpath(lock_file(directory, name, process_index))
    with _HELD_LOCK:
        held = _HELD.get(path)
        if held is not None:  # nested in this process: share the lock
            held.depth += 1
        else:
            held = _HELD[path] = _Held(*_acquire(path, directory, purpose))
    try:
        yield held.record
    finally:
        with _HELD_LOCK:
            held.depth -= 1
            if held.depth == 0:
                del _HELD[path]
                _release(held.fd)


def locked(purpose: str, *, arg: str = "workdir") -> Callable[[Callable], Callable]:
    """Decorator: the function runs holding ``lock(<its argument arg>, purpose)``.

    Each process of a multi-process run locks its own file (``jax.process_index()``).
    """

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            directory = signature.bind(*args, **kwargs).arguments[arg]
            with lock(directory, purpose, process_index=jax.process_index()):
                return fn(*args, **kwargs)

        return wrapper

    return decorate


def _acquire(path: str, directory: str, purpose: str) -> tuple[int, dict]:
    """Opens and flocks ``path``; returns (fd, holder record). Raises WorkdirLockedError."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = _parse(_read(fd))
        os.close(fd)
        raise WorkdirLockedError(directory, other, path) from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            os.close(fd)
            raise
        logging.warning("cannot lock %s (%s: the filesystem does not support flock); nothing stops a "
                        "second run from writing into %s meanwhile", path, e.strerror, directory)
    stale = _parse(_read(fd))
    if stale:
        logging.warning("taking over the stale lock of %s: its holder (%s run, pid %s on host %s, started %s) "
                        "is gone", directory, stale.get("purpose"), stale.get("pid"), stale.get("host"),
                        stale.get("started"))
    record = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return fd, record


def _release(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)  # released cleanly: no stale holder left to report
    finally:
        os.close(fd)  # drops the flock
