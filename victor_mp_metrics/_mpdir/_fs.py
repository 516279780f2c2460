"""Every system call on the directory goes through here: one rule for each of them.

* **Reading** (:func:`read_data`): a name is opened only if ``lstat`` says it is a
  regular file owned by this process's uid; it is opened ``O_NOFOLLOW | O_NONBLOCK`` (a
  FIFO or device swapped in between cannot block or follow), ``fstat`` must agree, and
  no more than the file's allocated size and :data:`MAX_FILE_BYTES` is ever read, so a
  sparse file whose header claims a gigabyte costs nothing.
* **Writing** (:func:`create_atomically`): temp file in the same directory, ``O_EXCL``,
  filled, optionally fsync-ed, then renamed into place: readers see all or nothing.
* **Trust** (:func:`ensure_directory`, :func:`directory_problems`): a directory is used
  only if no other user can write to it.
* **Quarantine** (:func:`quarantine`): unreadable files are moved into ``quarantine/``,
  which is opened without following symlinks and pruned by descriptor.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
import time
from collections.abc import Callable

from ..exceptions import DirectoryError, UnsafeDirectoryError
from ._format import CorruptFile, iter_exemplars, used_size
from ._names import QUARANTINE, TMP_SUFFIX

OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC
MAX_FILE_BYTES = 256 << 20
QUARANTINE_KEEP = 100


class Unreadable(Exception):
    """A name in the directory that is not a regular data file we may read.

    ``reason`` says why (a FIFO, a symlink, a directory, owned by another uid, ...);
    ``corrupt`` is True when the file is ours and regular but its contents are bad.
    """

    def __init__(self, reason: str, *, corrupt: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.corrupt = corrupt


def _kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(info: os.stat_result) -> None:
    """Raise :class:`Unreadable` unless ``info`` is a regular file owned by our uid."""
    if not stat.S_ISREG(info.st_mode):
        raise Unreadable(_kind_of(info.st_mode))
    if info.st_uid != os.geteuid():
        raise Unreadable(f"owned by uid {info.st_uid}, not by this process (uid {os.geteuid()})")


def open_regular(directory: str, name: str) -> tuple[int, os.stat_result]:
    """Open ``name`` for reading without blocking or following; its fd and fstat.

    Raises FileNotFoundError when it is gone, :class:`Unreadable` for anything else.
    """
    path = os.path.join(directory, name)
    check_regular(os.lstat(path))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | OPEN_FLAGS)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise Unreadable(err.strerror or str(err)) from None
    try:
        info = os.fstat(fd)
        check_regular(info)
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def read_used(fd: int, info: os.stat_result) -> bytes:
    """The used part of an open data file, read within its real size.

    :class:`Unreadable` (corrupt) when the header claims more than the file holds.
    """
    limit = min(info.st_size, MAX_FILE_BYTES)
    try:
        head = os.pread(fd, min(limit, 4096), 0)
        used = used_size(head)
        allocated = info.st_blocks * 512 if info.st_blocks else info.st_size
        if used > info.st_size:
            raise CorruptFile(f"header says {used} bytes used, file has {info.st_size}")
        if used > MAX_FILE_BYTES:
            raise CorruptFile(f"header says {used} bytes used, more than the "
                              f"{MAX_FILE_BYTES} bytes a data file may hold")
        if used > allocated + 4096:
            raise CorruptFile(f"header says {used} bytes used, but only {allocated} bytes "
                              "of the file are allocated (a sparse file)")
        data = head[:used] if used <= len(head) else head + os.pread(fd, used - len(head),
                                                                      len(head))
        if len(data) < used:
            raise CorruptFile(f"header says {used} bytes used, file has {len(data)}")
    except CorruptFile as err:
        raise Unreadable(str(err), corrupt=True) from None
    except OSError as err:
        raise Unreadable(err.strerror or str(err)) from None
    return data


def read_data(directory: str, name: str) -> tuple[bytes, os.stat_result]:
    """The used bytes of data file ``name`` and its fstat (see :func:`open_regular`)."""
    fd, info = open_regular(directory, name)
    try:
        return read_used(fd, info), info
    finally:
        os.close(fd)


def read_exemplars(directory: str, name: str) -> list[tuple[bytes, bytes, float, float]]:
    """The (key, labels JSON, value, timestamp) entries of exemplar file ``name``; none when
    it is missing or unreadable: exemplars are best effort, never a reason to fail."""
    try:
        data, _info = read_data(directory, name)
        return list(iter_exemplars(data, len(data)))
    except (FileNotFoundError, Unreadable, CorruptFile):
        return []


def read_small(directory: str, name: str, limit: int = 1 << 20) -> bytes | None:
    """A small regular file of ours (the manifest), or None when it does not exist."""
    try:
        fd, info = open_regular(directory, name)
    except FileNotFoundError:
        return None
    try:
        if info.st_size > limit:
            raise Unreadable(f"{info.st_size} bytes, more than {limit}", corrupt=True)
        return os.pread(fd, limit, 0)
    finally:
        os.close(fd)


def create_atomically(
    path: str,
    fill: Callable[[int], None],
    *,
    durable: bool = False,
    keep_open: bool = False,
    replace: bool = True,
) -> int:
    """Create ``path`` complete or not at all: temp file, ``fill(fd)``, rename.

    ``durable`` fsyncs the file before the rename (and the directory after it);
    ``keep_open`` returns the open read-write fd (else -1); ``replace=False`` keeps an
    existing ``path`` (``os.rename`` semantics are the same: use it only for new names).
    """
    tmp = f"{path}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | OPEN_FLAGS, 0o600)
    try:
        fill(fd)
        if durable:
            os.fsync(fd)
        (os.replace if replace else os.rename)(tmp, path)
    except BaseException:
        os.close(fd)
        unlink_quietly(tmp)
        raise
    if durable:
        fsync_dir(os.path.dirname(path))
    if keep_open:
        return fd
    os.close(fd)
    return -1


def write_file(path: str, data: bytes, size: int = 0, *, durable: bool = True) -> None:
    """Atomically replace ``path`` with ``data`` (padded with zeros to ``size``)."""

    def fill(fd: int) -> None:
        os.write(fd, data)
        if size > len(data):
            os.ftruncate(fd, size)

    create_atomically(path, fill, durable=durable)


def flock_within(fd: int, operation: int, wait: float) -> bool:
    """Take ``flock(fd, operation)`` (``LOCK_SH`` or ``LOCK_EX``), waiting at most ``wait``
    seconds; False when someone else held it all that time. Never blocks past ``wait``:
    a stuck holder delays the caller, never hangs it."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: str) -> bool:
    """Remove the name ``path`` (never what a symlink points to); False if it was gone or
    is a directory (which only a hostile hand puts there: it is left, never recursed)."""
    try:
        os.unlink(path)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return False
    return True


def is_stale_temp(directory: str, name: str, min_age: float = 60.0) -> bool:
    """A temp file old enough to be a dead writer's leftover (never a symlink target)."""
    try:
        info = os.lstat(os.path.join(directory, name))
    except FileNotFoundError:
        return False
    return time.time() - info.st_mtime >= min_age


# --- trusting the directory ----------------------------------------------------------------


def directory_problems(info: os.stat_result, path: str) -> list[tuple[str, str]]:
    """Why ``path`` (its ``lstat``) may not hold our files: (problem, fix) pairs.

    Refused: not a directory (a symlink included), owned by another user, or writable by
    anyone but its owner: sticky shared directories too, since whoever can create a file
    there can plant values, FIFOs or symlinks.
    """
    if stat.S_ISLNK(info.st_mode):
        return [(f"{path} is a symbolic link", f"point PROMETHEUS_MULTIPROC_DIR at the real "
                 f"directory, or remove the link (`rm {path}`); it is created if missing.")]
    if not stat.S_ISDIR(info.st_mode):
        return [(f"{path} exists but is not a directory",
                 "point PROMETHEUS_MULTIPROC_DIR at a directory (it is created if missing).")]
    problems = []
    euid = os.geteuid()
    if info.st_uid != euid:
        problems.append((f"{path} belongs to uid {info.st_uid}, not to this process (uid {euid})",
                         "use a directory of your own, created with mode 0700."))
    mode = stat.S_IMODE(info.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        problems.append((f"{path} is writable by other users (mode {mode:04o}), so they could "
                         "plant or delete metric files", f"`chmod 700 {path}` or use a private "
                         "directory."))
    return problems


def ensure_directory(path: str) -> str:
    """Create ``path`` (mode 0700, parents 0700 whatever the umask) if missing; refuse one
    that is unsafe (:class:`UnsafeDirectoryError`) or unusable (:class:`DirectoryError`).

    Returns the absolute path.
    """
    path = os.path.abspath(path)
    try:
        _makedirs_private(path)
    except FileExistsError:
        pass
    except OSError as err:
        raise DirectoryError(
            f"cannot create PROMETHEUS_MULTIPROC_DIR={path!r}: {err.strerror}. "
            "Create it (mode 0700) or point the variable at a writable place."
        ) from err
    info = os.lstat(path)
    problems = directory_problems(info, path)
    if problems:
        text, fix = problems[0]
        cls = DirectoryError if not stat.S_ISDIR(info.st_mode) else UnsafeDirectoryError
        if stat.S_ISLNK(info.st_mode):
            cls = UnsafeDirectoryError
        raise cls(f"PROMETHEUS_MULTIPROC_DIR: {text}. Fix: {fix}")
    if not os.access(path, os.W_OK | os.X_OK):
        raise DirectoryError(
            f"PROMETHEUS_MULTIPROC_DIR={path!r} is not writable by this process. "
            "Fix its permissions or point the variable elsewhere."
        )
    return path


def _makedirs_private(path: str) -> None:
    parent = os.path.dirname(path)
    if parent and parent != path and not os.path.lexists(parent):
        _makedirs_private(parent)
    os.mkdir(path, 0o700)
    os.chmod(path, 0o700, follow_symlinks=False)  # whatever the umask


# --- quarantine ----------------------------------------------------------------------------


def quarantine(directory: str, name: str) -> bool:
    """Move ``name`` into ``quarantine/`` (keeping the newest :data:`QUARANTINE_KEEP`).

    True if this call moved it (so the caller counts it exactly once across processes);
    False if it was gone or could not be moved. ``quarantine/`` is never followed if it
    is a symlink, and files are moved and pruned relative to directory descriptors.
    """
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | OPEN_FLAGS)
    try:
        try:
            os.mkdir(QUARANTINE, 0o700, dir_fd=dfd)
        except FileExistsError:
            pass
        qfd = os.open(QUARANTINE, os.O_RDONLY | os.O_DIRECTORY | OPEN_FLAGS, dir_fd=dfd)
        try:
            info = os.fstat(qfd)
            if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o022:
                return False
            target = f"{name}.{int(time.time() * 1000)}"
            os.rename(name, target, src_dir_fd=dfd, dst_dir_fd=qfd)
            kept = sorted(os.listdir(qfd))
            for old in kept[:-QUARANTINE_KEEP]:
                try:
                    os.unlink(old, dir_fd=qfd)
                except IsADirectoryError:
                    pass
            return True
        finally:
            os.close(qfd)
    except FileNotFoundError:
        return False  # another process moved it first
    except OSError as err:
        if err.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EACCES, errno.EPERM,
                             errno.EISDIR, errno.ENOTEMPTY, errno.EXDEV, errno.ENOSPC):
            raise
        return False
    finally:
        os.close(dfd)

