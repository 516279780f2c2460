"""Who is alive: owner files and their locks.

A writer is alive exactly while its ``{ident}.owner`` file is flock-ed: the kernel drops
the lock when the process dies, however it dies. The owner file is created (locked)
before the writer's first data file and removed after its last, so a data file without
an owner file was not left by a crash of ours: its owner file was deleted by someone
else. Such a writer, and a stock prometheus_client writer (ident = bare pid), is judged
by its pid and the process's start time, so a reused pid does not revive it.
"""

from __future__ import annotations

import fcntl
import json
import os
import time

import psutil

from ._fs import OPEN_FLAGS, create_atomically
from ._names import OWNER_SUFFIX, is_our_ident, parse_name, writer_ident


def create_owner_file(directory: str, ident: str) -> int:
    """Create ``{ident}.owner`` already locked; return its fd (kept for the writer's life)."""

    def fill(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, json.dumps({"pid": os.getpid(), "started": time.time()}).encode())

    return create_atomically(os.path.join(directory, ident + OWNER_SUFFIX), fill, keep_open=True)


def owner_file_intact(directory: str, ident: str, fd: int) -> bool:
    """Whether ``{ident}.owner`` is still the file behind ``fd`` (not deleted or replaced)."""
    try:
        named = os.lstat(os.path.join(directory, ident + OWNER_SUFFIX))
        held = os.fstat(fd)
    except OSError:
        return False
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def is_locked(path: str) -> bool | None:
    """True if someone holds a lock on ``path``, False if not, None if it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | OPEN_FLAGS)
    except FileNotFoundError:
        return None
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


def _pid_alive(pid: int, data_path: str | None) -> bool:
    try:
        started = psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, ValueError):
        return False
    if data_path is None:
        return True
    try:
        modified = os.lstat(data_path).st_mtime
    except FileNotFoundError:
        return False
    return started <= modified + 1.0


def writer_alive(directory: str, ident: str, data_path: str | None = None) -> bool:
    """Whether the process that writes files under ``ident`` still runs (see module doc)."""
    if is_our_ident(ident):
        locked = is_locked(os.path.join(directory, ident + OWNER_SUFFIX))
        if locked is not None:
            return locked
        return _pid_alive(int(ident.partition("-")[0]), data_path)
    try:
        return _pid_alive(int(ident), data_path)
    except ValueError:
        return False


def writer_liveness(
    directory: str, names: list[str], skip: frozenset[str] = frozenset()
) -> dict[str, bool]:
    """Every writer with a data or owner file among ``names`` (but ``skip``): alive or not."""
    data_paths: dict[str, str | None] = {}
    for name in names:
        ident = writer_ident(name)
        if ident is None or ident in skip:
            continue
        if parse_name(name) is not None and data_paths.get(ident) is None:
            data_paths[ident] = os.path.join(directory, name)
        else:
            data_paths.setdefault(ident, None)
    return {i: writer_alive(directory, i, path) for i, path in data_paths.items()}
