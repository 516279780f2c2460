"""Which Gunicorn master a directory belongs to: ``master.lock``.

A master holds an exclusive flock on ``{directory}/master.lock`` (its pid written inside)
for its whole life, so two unrelated masters never sum each other's workers: the second
is refused. The one exception is a USR2 upgrade, where the new master is a child of the
old one and shares its directory until the old one exits (then it takes the lock).

The built-in default directory is one subdirectory ``master-{pid}`` per master under a
per-user base; :func:`live_masters` lists those whose master still holds its lock, and
:func:`remove_dead_masters` deletes the rest.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat

from ._fs import OPEN_FLAGS
from ._liveness import is_locked

MASTER_LOCK = "master.lock"
MASTER_PREFIX = "master-"


def claim(directory: str) -> tuple[int, int | None]:
    """Try to take ``master.lock``: (fd, None) when taken; (-1, holder pid) when another
    live process holds it (pid 0 if it wrote none)."""
    fd = os.open(os.path.join(directory, MASTER_LOCK), os.O_RDWR | os.O_CREAT | OPEN_FLAGS,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raw = os.pread(fd, 32, 0)
        os.close(fd)
        return -1, int(raw) if raw.strip().isdigit() else 0
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd, None


def held(directory: str) -> bool:
    """Whether a live master holds ``directory``'s ``master.lock``."""
    return is_locked(os.path.join(directory, MASTER_LOCK)) is True


def _subdirs(base: str) -> list[str]:
    try:
        names = os.listdir(base)
    except OSError:
        return []
    found = []
    for name in sorted(names):
        path = os.path.join(base, name)
        if name.startswith(MASTER_PREFIX) and stat.S_ISDIR(os.lstat(path).st_mode):
            found.append(path)
    return found


def live_masters(base: str) -> list[str]:
    """The ``master-*`` directories under ``base`` whose master runs."""
    return [path for path in _subdirs(base) if held(path)]


def remove_dead_masters(base: str, keep: str = "") -> int:
    """Delete the ``master-*`` directories under ``base`` (but ``keep``) whose master is
    gone; returns how many. Never follows a symlink (``shutil.rmtree`` works by fd)."""
    removed = 0
    for path in _subdirs(base):
        if path != keep and not held(path):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed
