"""The write path: a prometheus_client value class backed by this process's own files.

Compared with prometheus_client's ``MultiProcessValue`` it

* names its files after a unique writer ident and holds a lock on ``{ident}.owner`` for
  its whole life, so readers and the compactor can tell a live writer from a dead one
  without trusting pids;
* notices fork() through ``os.register_at_fork`` instead of calling ``getpid()`` on every
  write, and writes at a position it looked up once: cheaper per operation;
* reserves disk blocks with ``posix_fallocate`` before it maps them, so a full disk is an
  error at file creation, never a SIGBUS in the middle of a request;
* survives a missing, unwritable or replaced directory: values go on counting in memory,
  one log line and ``victor_metrics_write_errors_total`` say so, and a watchdog thread
  moves the values back into files once the directory is usable again.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import threading
from typing import Any

from prometheus_client import values as _pc_values
from prometheus_client.mmap_dict import mmap_key

from . import _files
from .directory import ensure_directory
from .exceptions import DirectoryError

log = logging.getLogger("victor_mp_metrics")

_pack = struct.Struct("<dd").pack
WATCHDOG_INTERVAL = 2.0


class _WriterFile:
    """One of this process's data files, mapped for writing."""

    __slots__ = ("capacity", "fd", "m", "path", "positions", "used")

    def __init__(self, path: str) -> None:
        tmp = f"{path}{_files.TMP_SUFFIX}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _files.OPEN_FLAGS, 0o600)
        try:
            os.posix_fallocate(fd, 0, _files.INITIAL_SIZE)
            os.pwrite(fd, struct.pack("<i", 8), 0)
            os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            _files._unlink_quietly(tmp)
            raise
        self.path = path
        self.fd = fd
        self.capacity = _files.INITIAL_SIZE
        self.m = mmap.mmap(fd, self.capacity)
        self.used = 8
        self.positions: dict[str, int] = {}

    def position(self, key: str) -> int:
        pos = self.positions.get(key)
        if pos is None:
            entry = _files.encode_entry(key, 0.0, 0.0)
            needed = self.used + len(entry)
            if needed > self.capacity:
                capacity = self.capacity
                while capacity < needed:
                    capacity *= 2
                os.posix_fallocate(self.fd, 0, capacity)
                self.m = mmap.mmap(self.fd, capacity)
                self.capacity = capacity
            self.m[self.used : needed] = entry
            self.used = needed
            self.m[0:4] = struct.pack("<i", needed)
            pos = self.positions[key] = needed - 16
        return pos

    def close(self) -> None:
        try:
            self.m.close()
        finally:
            os.close(self.fd)


class ProcessStore:
    """This process's ident, owner lock and open files; values attach to it."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.lock = threading.Lock()
        self.ident: str | None = None
        self.owner_fd: int | None = None
        self.dir_id: tuple[int, int] | None = None
        self.files: dict[str, _WriterFile] = {}
        self.values: list[Any] = []
        self.write_errors = 0
        self.reported_errors = 0
        self.failing = False
        self.watchdog: threading.Thread | None = None
        self.stopped = threading.Event()

    # -- attaching values (caller holds self.lock) --

    def _open_owner(self) -> None:
        ident = _files.new_ident()
        self.owner_fd = _files.create_owner_file(self.directory, ident)
        info = os.stat(self.directory)
        self.dir_id = (info.st_dev, info.st_ino)
        self.ident = ident
        self._start_watchdog()

    def _file_for(self, prefix: str) -> _WriterFile:
        f = self.files.get(prefix)
        if f is None:
            if self.ident is None:
                self._open_owner()
            path = os.path.join(self.directory, f"{prefix}_{self.ident}.db")
            f = self.files[prefix] = _WriterFile(path)
        return f

    def attach(self, value: Any) -> None:
        """Give ``value`` a slot in a file and write its current value there."""
        try:
            f = self._file_for(value._prefix)
            pos = f.position(value._key)
            f.m[pos : pos + 16] = _pack(value._value, value._timestamp)
        except OSError as err:
            value._file = None
            self._failed(err)
        else:
            value._file = f
            value._pos = pos

    def _failed(self, err: OSError) -> None:
        self.write_errors += 1
        if not self.failing:
            self.failing = True
            log.error(
                "victor_mp_metrics: cannot write metric files in %s (%s); values are kept in "
                "memory and written once the directory is usable. Check that "
                "PROMETHEUS_MULTIPROC_DIR exists, is writable and has free space "
                "(`victor-metrics doctor`).", self.directory, err,
            )
        self._start_watchdog()

    # -- recovery --

    def _directory_changed(self) -> bool:
        try:
            info = os.stat(self.directory)
        except OSError:
            return True
        return self.dir_id is not None and (info.st_dev, info.st_ino) != self.dir_id

    def check(self) -> None:
        """Re-home all values if the directory was replaced or writes were failing."""
        with self.lock:
            replaced = self.ident is not None and self._directory_changed()
            if not (replaced or self.failing):
                return
            if replaced:
                self.write_errors += 1
                log.error(
                    "victor_mp_metrics: %s was removed or replaced while this process was "
                    "writing to it; moving this process's values to the new directory.",
                    self.directory,
                )
            self._drop_files()
            self.failing = False
            try:
                ensure_directory(self.directory)
            except (OSError, DirectoryError) as err:
                self._failed(err if isinstance(err, OSError) else OSError(str(err)))
                return
            for value in self.values:
                self.attach(value)
            if not self.failing:
                log.warning("victor_mp_metrics: writing metric files in %s again", self.directory)

    def _drop_files(self) -> None:
        for value in self.values:
            value._file = None
        for f in self.files.values():
            f.close()
        self.files.clear()
        if self.owner_fd is not None:
            os.close(self.owner_fd)
        self.owner_fd = None
        self.ident = None
        self.dir_id = None

    def _start_watchdog(self) -> None:
        if self.watchdog is not None and self.watchdog.is_alive():
            return
        self.watchdog = threading.Thread(
            target=self._watch, name="victor-metrics-watchdog", daemon=True
        )
        self.watchdog.start()

    def _watch(self) -> None:
        while not self.stopped.wait(WATCHDOG_INTERVAL):
            try:
                self.check()
                report_write_errors(self)
            except Exception:  # pragma: no cover - never let the thread die silently
                log.exception("victor_mp_metrics: watchdog check failed")

    def after_fork(self) -> None:
        """In a forked child: forget the parent's files (without unlocking them), reattach."""
        self.lock = threading.Lock()
        for f in self.files.values():
            f.m.close()
            os.close(f.fd)
        self.files.clear()
        if self.owner_fd is not None:
            os.close(self.owner_fd)  # closing our copy keeps the parent's lock
        self.owner_fd = None
        self.ident = None
        self.watchdog = None
        self.stopped = threading.Event()
        self.failing = False
        self.write_errors = 0
        self.reported_errors = 0
        for value in self.values:
            value._value = 0.0
            value._timestamp = 0.0
            self.attach(value)
        _rebind_lock(self)

    def close(self) -> None:
        self.stopped.set()
        with self.lock:
            self._drop_files()
            self.values.clear()


_store: ProcessStore | None = None


def report_write_errors(store: ProcessStore) -> None:
    """Add write errors counted since the last report to the self-metric counter."""
    from . import selfmetrics

    new = store.write_errors - store.reported_errors
    if new > 0:
        store.reported_errors = store.write_errors
        selfmetrics.counter("write_errors").inc(new)


def current_store() -> ProcessStore | None:
    """The store of the installed value class, if multiprocess mode is active."""
    return _store


def _rebind_lock(store: ProcessStore) -> None:
    # The value class closes over the lock for speed; after fork it gets the new one.
    global _lock_cell
    _lock_cell[0] = store.lock


_lock_cell: list[threading.Lock] = [threading.Lock()]


def make_value_class(store: ProcessStore) -> type:
    """A prometheus_client value class writing to ``store``'s files."""
    cell = _lock_cell

    class FileValue:
        """A float in this process's mmap file, behind the process-wide lock."""

        _multiprocess = True
        __slots__ = ("_file", "_key", "_pos", "_prefix", "_timestamp", "_value")

        def __init__(self, typ: str, metric_name: str, name: str, labelnames: Any,
                     labelvalues: Any, help_text: str, multiprocess_mode: str = "",
                     **kwargs: Any) -> None:
            self._prefix = f"gauge_{multiprocess_mode}" if typ == "gauge" else typ
            self._key = mmap_key(metric_name, name, labelnames, labelvalues, help_text)
            self._value = 0.0
            self._timestamp = 0.0
            self._file: _WriterFile | None = None
            self._pos = 0
            with store.lock:
                store.values.append(self)
                store.attach(self)

        def inc(self, amount: float) -> None:
            with cell[0]:
                self._value += amount
                f = self._file
                if f is not None:
                    f.m[self._pos : self._pos + 16] = _pack(self._value, 0.0)

        def set(self, value: float, timestamp: float | None = None) -> None:
            with cell[0]:
                self._value = value
                self._timestamp = timestamp or 0.0
                f = self._file
                if f is not None:
                    f.m[self._pos : self._pos + 16] = _pack(value, self._timestamp)

        def set_exemplar(self, exemplar: Any) -> None:
            return None

        def get(self) -> float:
            with cell[0]:
                return self._value

        def get_exemplar(self) -> None:
            return None

    return FileValue


def install_value_class(directory: str) -> ProcessStore:
    """Make prometheus_client create file-backed values in ``directory`` from now on."""
    global _store
    if _store is not None and _store.directory == directory:
        _pc_values.ValueClass = _store.value_class  # type: ignore[attr-defined]
        return _store
    uninstall_value_class()
    store = ProcessStore(directory)
    cls = make_value_class(store)
    store.value_class = cls  # type: ignore[attr-defined]
    _lock_cell[0] = store.lock
    _store = store
    _pc_values.ValueClass = cls
    return store


def uninstall_value_class() -> None:
    """Close this process's files; existing values keep counting in memory only."""
    global _store
    store, _store = _store, None
    if store is not None:
        for value in store.values:
            value._file = None
        store.close()


def _after_fork_in_child() -> None:
    if _store is not None:
        _store.after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
