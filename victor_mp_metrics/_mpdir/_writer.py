"""The write path: this process's own files, and the value class that writes to them.

Compared with prometheus_client's ``MultiProcessValue``, a :class:`ProcessStore`

* names its files after a unique writer ident and holds a lock on ``{ident}.owner`` for
  its whole life, so readers and the compactor tell a live writer from a dead one without
  trusting pids; if the owner file is deleted, the watchdog creates it again;
* reserves disk blocks with ``posix_fallocate`` before it maps them, so a full disk is an
  error when a value gets its slot, never a SIGBUS in the middle of a request;
* never writes one value to two files that a reader counts. A value that cannot get a
  slot (full disk, no file descriptors) keeps counting in memory, *pending*; the
  watchdog gives it its slot once space returns, with its whole value, in the same
  files under the same ident. Values that have a slot keep it. Only when the directory
  itself is removed or replaced do all values move to new files (the old ones are gone
  with the old directory, out of every reader's sight).

Each value's timestamp field holds a stamp: when it was created (or reset), or for
``mostrecent`` gauges when it was last set; the reader derives ``_created`` from it and
``remove()``/``clear()`` tombstones compare against it (see ``_tombstones``).

The watchdog thread (one per process, every :data:`WATCHDOG_INTERVAL` seconds) also runs
the samplers the runtime registers (``Gauge.set_function``, process metrics) and applies
new tombstones to this process's own values.

``FileValue.add_each`` and ``FileValue.observe_and_add`` (several values under one
acquisition of the lock: the request path's writes) are the C functions of ``_speedups``
when the optional extension was built, the Python functions ``*_in_python`` otherwise;
both make the same float additions in the same order (a property test holds them equal).

The store reports (``write_errors``, :meth:`ProcessStore.take_write_errors`); the runtime
counts them in ``victor_metrics_write_errors_total``.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

from ..exceptions import DirectoryError
from ._format import (
    EXEMPLAR_LABELS,
    EXEMPLAR_SLOT,
    INITIAL_SIZE,
    INT,
    CorruptFile,
    encode_entry,
    encode_exemplar_slot,
    encode_key,
    parse_key,
)
from ._fs import create_atomically, ensure_directory
from ._liveness import create_owner_file, owner_file_intact
from ._names import EXEMPLARS_SUFFIX, data_name, new_ident
from ._tombstones import EMPTY, Tombstones, read_tombstones

try:
    from . import _speedups  # type: ignore[attr-defined]
except ImportError:  # built without a C compiler: the Python add_each below
    _speedups = None

log = logging.getLogger("victor_mp_metrics")

_pack = struct.Struct("<dd").pack
WATCHDOG_INTERVAL = 1.0


class _WriterFile:
    """One of this process's data files, mapped for writing; ``slot`` bytes follow each key
    (16: value and timestamp; exemplar files have bigger slots).

    ``doubles`` is the map cast to float64s: a value is stored with one item assignment
    (``doubles[pos // 8] = v``, native little-endian as the format wants on the x86-64 and
    aarch64 machines we run on), far cheaper than ``struct.pack`` plus a slice copy. An
    exported view pins its map, so growing releases the old view before closing the old
    map; both happen under the store lock, which every write holds.
    """

    __slots__ = ("capacity", "doubles", "fd", "m", "path", "positions", "slot", "used")

    def __init__(self, path: str, slot: int = 16) -> None:
        self.slot = slot

        def fill(fd: int) -> None:
            os.posix_fallocate(fd, 0, INITIAL_SIZE)
            os.pwrite(fd, INT.pack(8), 0)

        self.fd = create_atomically(path, fill, keep_open=True, replace=False)
        self.path = path
        self.capacity = INITIAL_SIZE
        self.m = mmap.mmap(self.fd, self.capacity)
        self.doubles = memoryview(self.m).cast("d")
        self.used = 8
        self.positions: dict[str, int] = {}

    def position(self, key: str) -> int:
        """The offset of ``key``'s value, appending an entry (and growing) if new."""
        pos = self.positions.get(key)
        if pos is None:
            entry = encode_entry(key, 0.0, 0.0)
            if self.slot != 16:
                entry = entry[:-16] + encode_exemplar_slot(b"", 0.0, 0.0)
            needed = self.used + len(entry)
            if needed > self.capacity:
                capacity = self.capacity
                while capacity < needed:
                    capacity *= 2
                os.posix_fallocate(self.fd, 0, capacity)  # ENOSPC here: nothing written
                grown = mmap.mmap(self.fd, capacity)
                self.doubles.release()
                self.m.close()
                self.m, self.doubles = grown, memoryview(grown).cast("d")
                self.capacity = capacity
            self.m[self.used : needed] = entry
            self.used = needed
            self.m[0:4] = INT.pack(needed)  # the header last: readers never see half an entry
            pos = self.positions[key] = needed - self.slot
        return pos

    def close(self) -> None:
        try:
            self.doubles.release()
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
        self.pending: list[Any] = []
        self.write_errors = 0
        self._reported_errors = 0
        self.failing = False
        self.on_write_errors: Callable[[int], None] | None = None
        self.samplers: list[Callable[[], None]] = []
        self.removed: list[Any] = []  # values reset by a tombstone, detached until they change
        self.exemplars: _WriterFile | None = None
        self.tombstones: Tombstones = EMPTY
        self.watchdog: threading.Thread | None = None
        self.stopped = threading.Event()

    # -- attaching values (caller holds self.lock) --

    def _open_owner(self) -> None:
        ident = new_ident()
        info = os.stat(self.directory)
        self.owner_fd = create_owner_file(self.directory, ident)
        self.dir_id = (info.st_dev, info.st_ino)
        self.ident = ident
        self._start_watchdog()

    def _file_for(self, prefix: str) -> _WriterFile:
        f = self.files.get(prefix)
        if f is None:
            if self.ident is None:
                self._open_owner()
            assert self.ident is not None
            path = os.path.join(self.directory, data_name(prefix, self.ident))
            f = self.files[prefix] = _WriterFile(path)
        return f

    def attach(self, value: Any) -> None:
        """Give ``value`` a slot in a file and write its current value there, or leave it
        pending (in memory only) if the slot cannot be had now."""
        try:
            f = self._file_for(value._prefix)
            pos = f.position(value._key)
            f.m[pos : pos + 16] = _pack(value._value, value._timestamp)
        except OSError as err:
            value._file = None
            self.pending.append(value)
            self._failed(err)
        else:
            value._file = f
            value._index = pos >> 3  # of the value among the map's float64s

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
        """The watchdog's round: follow a replaced directory, keep the owner file, give
        pending values their slots."""
        with self.lock:
            if self.ident is not None and self._directory_changed():
                self.write_errors += 1
                log.error(
                    "victor_mp_metrics: %s was removed or replaced while this process was "
                    "writing to it; moving this process's values to the new directory.",
                    self.directory,
                )
                self._drop_files()
                self.pending = list(self.values)
                self.failing = True
            elif self.ident is not None and self.owner_fd is not None:
                self._keep_owner_file()
            if not self.pending:
                return
            try:
                ensure_directory(self.directory)
            except (OSError, DirectoryError) as err:
                self._failed(err if isinstance(err, OSError) else OSError(str(err)))
                return
            waiting, self.pending = self.pending, []
            self.failing = False
            for value in waiting:
                self.attach(value)
            if not self.failing:
                log.warning("victor_mp_metrics: writing metric files in %s again", self.directory)

    def _keep_owner_file(self) -> None:
        assert self.ident is not None and self.owner_fd is not None
        if owner_file_intact(self.directory, self.ident, self.owner_fd):
            return
        try:
            fd = create_owner_file(self.directory, self.ident)
        except OSError as err:
            self._failed(err)
            return
        os.close(self.owner_fd)
        self.owner_fd = fd
        log.error(
            "victor_mp_metrics: the owner file of this process (%s.owner) was removed from %s; "
            "created it again. Do not delete files from PROMETHEUS_MULTIPROC_DIR by hand: "
            "`victor-metrics compact` removes what is safe to remove.", self.ident,
            self.directory,
        )

    def set_entry(self, prefix: str, key: str, value: float, stamp: float) -> None:
        """Write one entry outside any value object (Info and Enum states)."""
        with self.lock:
            try:
                f = self._file_for(prefix)
                pos = f.position(key)
                f.m[pos : pos + 16] = _pack(value, stamp)
            except OSError as err:
                self._failed(err)

    def set_exemplar(self, key: str, labels: dict[str, str], value: float,
                     timestamp: float) -> None:
        """Keep ``labels`` as the latest exemplar of value ``key`` (caller holds the value
        lock). Labels too long for a slot are dropped: OpenMetrics allows 128 characters."""
        encoded = json.dumps(labels, sort_keys=True, separators=(",", ":")).encode()
        if len(encoded) > EXEMPLAR_LABELS:
            return
        try:
            f = self.exemplars
            if f is None:
                if self.ident is None:
                    return  # no files at all (yet): nothing to attach an exemplar to
                f = self.exemplars = _WriterFile(
                    os.path.join(self.directory, self.ident + EXEMPLARS_SUFFIX), EXEMPLAR_SLOT)
            pos = f.position(key)
            f.m[pos : pos + EXEMPLAR_SLOT] = encode_exemplar_slot(encoded, value, timestamp)
        except OSError as err:
            self._failed(err)

    def apply_tombstones(self) -> None:
        """Reset this process's values that a newer tombstone removed: zero and a new stamp,
        detached from their slots (whose old stamp readers ignore) until they change; a
        value that changed since is written back, whole, with its new stamp."""
        with self.lock:
            waiting, self.removed = self.removed, []
            for value in waiting:
                if value._value != 0.0 or (value._recent and value._timestamp > 0.0):
                    self.attach(value)
                else:
                    self.removed.append(value)
        tombstones = read_tombstones(self.directory, self.tombstones)
        if tombstones is self.tombstones:
            return
        self.tombstones = tombstones
        with self.lock:
            now = time.time()
            for value in self.values:
                try:
                    key = parse_key(value._key.encode())
                except CorruptFile:  # pragma: no cover - our own keys always parse
                    continue
                if value._file is not None and tombstones.removed(key, value._timestamp):
                    value._value = 0.0
                    value._timestamp = 0.0 if value._recent else now
                    value._file = None
                    self.removed.append(value)

    def take_write_errors(self) -> int:
        """Write errors since the last call (for the caller to count)."""
        new = self.write_errors - self._reported_errors
        self._reported_errors = self.write_errors
        return new

    def _drop_files(self) -> None:
        for value in self.values:
            value._file = None
        for f in self.files.values():
            f.close()
        self.files.clear()
        if self.exemplars is not None:
            self.exemplars.close()
            self.exemplars = None
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
            for sample in list(self.samplers):
                try:
                    sample()
                except Exception:
                    log.exception("victor_mp_metrics: a sampled metric function failed")
            try:
                self.apply_tombstones()
                self.check()
                new = self.take_write_errors()
                if new and self.on_write_errors is not None:
                    self.on_write_errors(new)
            except Exception:  # pragma: no cover - never let the thread die silently
                log.exception("victor_mp_metrics: watchdog check failed")

    def after_fork(self) -> None:
        """In a forked child: forget the parent's files (without unlocking them), reattach
        every value from zero under a new ident."""
        self.lock = threading.Lock()
        for f in [*self.files.values(), *([self.exemplars] if self.exemplars else [])]:
            f.close()
        self.files.clear()
        self.exemplars = None
        if self.owner_fd is not None:
            os.close(self.owner_fd)  # closing our copy keeps the parent's lock
        self.owner_fd = None
        self.ident = None
        self.dir_id = None
        self.watchdog = None
        self.stopped = threading.Event()
        self.failing = False
        self.write_errors = self._reported_errors = 0
        self.pending = []
        self.removed = []
        now = time.time()
        for value in self.values:
            value._value = 0.0
            value._timestamp = 0.0 if value._recent else now
            self.attach(value)

    def close(self) -> None:
        """Stop the watchdog and close every file; values keep counting in memory only."""
        self.stopped.set()
        with self.lock:
            self._drop_files()
            self.values.clear()
            self.pending.clear()


def make_value_class(store: ProcessStore) -> type:
    """A prometheus_client value class writing to ``store``'s files.

    The lock is looked up through a one-element cell so that after fork() the child's
    new store lock is used by every value.
    """
    cell = _lock_cell

    class FileValue:
        """A float in this process's mmap file, behind the process-wide lock."""

        _multiprocess = True
        __slots__ = ("_file", "_index", "_key", "_prefix", "_recent", "_timestamp", "_value")

        def __init__(self, typ: str, metric_name: str, name: str, labelnames: Any,
                     labelvalues: Any, help_text: str, multiprocess_mode: str = "",
                     **kwargs: Any) -> None:
            self._prefix = f"gauge_{multiprocess_mode}" if typ == "gauge" else typ
            self._key = _encode_key(metric_name, name, labelnames, labelvalues, help_text)
            self._value = 0.0
            self._recent = multiprocess_mode in ("mostrecent", "livemostrecent")
            self._timestamp = 0.0 if self._recent else time.time()  # the stamp
            self._file: _WriterFile | None = None
            self._index = 0
            with store.lock:
                store.values.append(self)
                store.attach(self)

        def inc(self, amount: float) -> None:
            with cell[0]:
                self._value += amount
                f = self._file
                if f is not None:  # the stamp beside it was written when the slot was had
                    f.doubles[self._index] = self._value

        add_each = staticmethod(add_each_in_python if _speedups is None
                                else _speedups.add_each)
        observe_and_add = staticmethod(observe_and_add_in_python if _speedups is None
                                       else _speedups.observe_and_add)

        def set(self, value: float, timestamp: float | None = None) -> None:
            with cell[0]:
                self._value = value
                if timestamp is not None:
                    self._timestamp = timestamp
                f = self._file
                if f is not None:
                    doubles = f.doubles
                    doubles[self._index + 1] = self._timestamp
                    doubles[self._index] = value

        def set_exemplar(self, exemplar: Any) -> None:
            with cell[0]:
                store.set_exemplar(self._key, exemplar.labels, exemplar.value,
                                   float(exemplar.timestamp or time.time()))

        def get(self) -> float:
            with cell[0]:
                return self._value

        def get_exemplar(self) -> None:
            return None

    return FileValue


def add_each_in_python(values: tuple[Any, ...], amounts: tuple[float, ...]) -> None:
    """``values[i].inc(amounts[i])`` for each i, under one acquisition of the lock (a
    request's start, count or end: its duration's sum and bucket and the in-flight
    gauge); what ``_speedups.add_each`` does in C."""
    with _lock_cell[0]:
        for value, amount in zip(values, amounts, strict=True):
            value._value += amount
            f = value._file
            if f is not None:
                f.doubles[value._index] = value._value


def observe_and_add_in_python(values: tuple[Any, ...], bounds: tuple[float, ...],
                              extra: float, amount: float) -> None:
    """One histogram observation and one more addition under one acquisition of the lock:
    ``values`` are (sum, bucket 0, ..., bucket n-1, other); ``amount`` goes to the sum and
    (+1) to the bucket of the first bound >= it, ``extra`` to the other (a request's end:
    its duration and the in-flight gauge's -1); what ``_speedups.observe_and_add`` does."""
    bucket = values[1 + bisect_left(bounds, amount)]
    add_each_in_python((values[0], bucket, values[-1]), (amount, 1.0, extra))


def _encode_key(metric_name: str, name: str, labelnames: Any, labelvalues: Any,
                help_text: str) -> str:
    return encode_key(metric_name, name, dict(zip(labelnames, labelvalues, strict=False)),
                      help_text)


_lock_cell: list[threading.Lock] = [threading.Lock()]
if _speedups is not None:
    _speedups.bind(_lock_cell)


def bind_lock(store: ProcessStore) -> None:
    """Make every value class use ``store``'s lock (after install and after fork)."""
    _lock_cell[0] = store.lock
