"""Creating and validating the multiprocess directory."""

from __future__ import annotations

import os
import stat

from .exceptions import DirectoryError, UnsafeDirectoryError


def ensure_directory(path: str) -> str:
    """Create ``path`` (mode 0700) if missing; refuse one that is unsafe or unusable.

    Refused: a path that is not a directory, a directory owned by another user, one that
    other users may write to (unless the sticky bit is set), or one we cannot write to.
    Returns the absolute path.
    """
    path = os.path.abspath(path)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except FileExistsError:
        raise DirectoryError(
            f"PROMETHEUS_MULTIPROC_DIR={path!r} exists but is not a directory. "
            "Point it at a directory (it is created if missing)."
        ) from None
    except OSError as err:
        raise DirectoryError(
            f"cannot create PROMETHEUS_MULTIPROC_DIR={path!r}: {err.strerror}. "
            "Create it (mode 0700) or point the variable at a writable place."
        ) from err
    info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise DirectoryError(f"PROMETHEUS_MULTIPROC_DIR={path!r} is not a directory.")
    euid = os.geteuid()
    if info.st_uid not in (euid, 0) or (info.st_uid == 0 and euid != 0 and _others_write(info)):
        raise UnsafeDirectoryError(
            f"PROMETHEUS_MULTIPROC_DIR={path!r} belongs to uid {info.st_uid}, not to this "
            f"process (uid {euid}). Use a directory of your own, created with mode 0700."
        )
    if _others_write(info) and not info.st_mode & stat.S_ISVTX:
        raise UnsafeDirectoryError(
            f"PROMETHEUS_MULTIPROC_DIR={path!r} is writable by other users "
            f"(mode {stat.S_IMODE(info.st_mode):04o}), so they could plant or delete metric "
            f"files. Run `chmod 700 {path}` or use a private directory."
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise DirectoryError(
            f"PROMETHEUS_MULTIPROC_DIR={path!r} is not writable by this process. "
            "Fix its permissions or point the variable elsewhere."
        )
    return path


def _others_write(info: os.stat_result) -> bool:
    return bool(info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))
