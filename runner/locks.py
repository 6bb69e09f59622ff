"""Exclusive locks through ``fcntl.flock`` on a small file: the kernel releases one when its process dies, however.

Three uses: a run directory is held for the life of the process that trains in it (``hold``), launches decide what
they continue one at a time (``locked`` on the search root), and processes creating one SQLite MLflow store do so
one at a time. The file descriptors are not inherited by the processes this one starts (PEP 446).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_held: dict[Path, int] = {}  # path -> open file descriptor, for the life of this process


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (made, with its folder, if missing) for the ``with`` block, waiting for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def hold(path: Path) -> str | None:
    """Take an exclusive lock on ``path`` for the rest of this process's life, without waiting, and write this
    process's id into it; return None, or, when another process holds it, what that one wrote (its id)."""
    path = path.resolve()
    if path in _held:
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        return holder
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[path] = fd
    return None


def release(path: Path) -> None:
    """Give up a lock taken with ``hold`` (tests and sessions that end before their process does)."""
    fd = _held.pop(path.resolve(), None)
    if fd is not None:
        os.close(fd)
