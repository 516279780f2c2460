"""The reader behind ``/metrics``: one consistent, cached read of the whole directory.

It yields the samples prometheus_client's ``MultiProcessCollector`` yields on the same
directory, and is correct under compaction, faults and hostile entries:

* **Consistent snapshot.** It reads ``manifest.json``, lists the directory, reads the
  archive of the manifest's generation and every writer file the manifest has not
  absorbed, then reads the manifest again; if a compaction committed in between it
  starts over. After :data:`_MAX_ATTEMPTS` such retries it reads once more holding
  ``compact.lock`` shared, which no compaction can commit under: a busy compactor can
  delay a scrape, never fail it. Each increment is counted once: in a writer file or in
  the archive, never both, never neither.
* **Liveness.** ``live*`` gauges of writers whose owner lock is free (dead) are skipped
  at once, before any hook or compaction has run.
* **Hostile entries.** Anything but a regular data file of ours (FIFO, symlink,
  directory, socket, another uid's file, an impossible header, a malformed key) is
  skipped without blocking (see ``_fs``), reported once per process, and moved to
  ``quarantine/`` when its writer is dead. It never fails the scrape.
* **Removed label sets.** Entries that a ``remove()``/``clear()`` tombstone postdates are
  skipped (see ``_tombstones``).
* **Info and Enum** (modes ``info``, ``stateset``): the most recent value set by any
  process wins, live or dead: a build or state is a fact about the deployment, and the
  newest report of it is the truest one.
* **Exemplars** (OpenMetrics): each writer's ``{ident}.exemplars`` and the archive's
  hold the latest exemplar of each value; the newest over all processes is shown on the
  counter's ``_total`` or the histogram bucket it belongs to.
* **Caches.** Parsed keys are cached by their bytes; each writer file's layout (keys and
  offsets) is cached and only the appended tail is parsed; the archive of the current
  generation is merged once and reused until the next compaction.

The reader only reports (:class:`ReadReport`); the caller counts self-metrics.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Exemplar

from ._families import Family, Layout, Snapshot, Source
from ._format import (
    TWO_DOUBLES,
    CorruptFile,
    Key,
    iter_entries,
    parse_key,
)
from ._fs import (
    OPEN_FLAGS,
    Unreadable,
    flock_within,
    open_regular,
    quarantine,
    read_data,
    read_exemplars,
    read_used,
)
from ._liveness import writer_alive
from ._manifest import Manifest, read_manifest
from ._names import (
    COMPACT_LOCK,
    EXEMPLARS_SUFFIX,
    MANIFEST,
    DataFile,
    archive_exemplars_name,
    parse_name,
)
from ._render import TextPlanner
from ._tombstones import EMPTY, Tombstones, read_tombstones

log = logging.getLogger("victor_mp_metrics")

_MAX_ATTEMPTS = 5
_LOCKED_READ_WAIT = 10.0

class _Retry(Exception):
    """The directory changed under a read; start the snapshot again."""


@dataclass
class ReadReport:
    """What one read of the directory did, for the caller to count and show."""

    files: int = 0
    nbytes: int = 0
    retries: int = 0
    duration: float = 0.0
    corrupt: int = 0  # newly found unreadable entries to count (exactly once overall)
    quarantined: int = 0


@dataclass
class TextRead:
    """What :meth:`DirectoryReader.read_text` found: the text (None: the fast path did
    not apply and ``families`` are all the families), the wanted families, the report."""

    text: str | None
    families: list[Metric]
    report: ReadReport


class DirectoryReader:
    """Aggregates a multiprocess directory; one per process and directory (caches)."""

    def __init__(self, directory: str, *, read_only: bool = False) -> None:
        """Read ``directory``. ``read_only`` never moves an unreadable file (for tools that
        only look); such files are still skipped and reported."""
        self.directory = directory
        self.read_only = read_only
        self.last = ReadReport()
        self._lock = threading.Lock()
        self._keys: dict[bytes, Key] = {}
        self._layouts: dict[str, Layout] = {}
        self._archive: tuple[tuple[object, ...], dict[str, Family]] | None = None
        self._warned: set[tuple[str, tuple[int, int]]] = set()
        self._tombstones: Tombstones = EMPTY
        self._text = TextPlanner(self._family)

    def after_fork(self) -> bool:
        """In a forked child: keep the caches (a worker's first scrape is then as cheap as
        a warm one) with a new lock; False when the parent was reading at the fork, so the
        caches may be half updated and the child must make a new reader."""
        if self._lock.locked():
            return False
        self._lock = threading.Lock()
        return True

    def collect(self) -> Iterable[Metric]:
        """The aggregated families (prometheus_client collector protocol)."""
        return self.read()[0]

    def read(self, created: bool = False) -> tuple[list[Metric], ReadReport]:
        """Every family of the directory, and what the read did; ``created`` adds the
        ``_created`` samples OpenMetrics shows."""
        with self._lock:
            report = ReadReport()
            started = time.perf_counter()
            families = self._families(self._consistent(report, None))
            report.duration = time.perf_counter() - started
            self.last = report
            return [fam.metric(name, created) for name, fam in sorted(families.items())], report

    def read_text(self, wanted: frozenset[str], excluded: frozenset[str]) -> TextRead:
        """The directory in the Prometheus text format (0.0.4), as ``generate_latest`` of
        :meth:`read`'s families would print it, without the families named in
        ``excluded``; plus the families named in ``wanted`` as Metrics (their text is
        included). Falls back to :meth:`read`'s families when a removed label set touches
        a live file (``TextRead.text`` is None then)."""
        with self._lock:
            report = ReadReport()
            started = time.perf_counter()
            snapshot = self._consistent(report, [])
            found = self._text.render(snapshot, wanted, excluded, self._tombstones)
            if found is None:
                metrics = [fam.metric(name)
                           for name, fam in sorted(self._families(snapshot).items())]
                result = TextRead(None, metrics, report)
            else:
                result = TextRead(found[0], found[1], report)
            report.duration = time.perf_counter() - started
            self.last = report
            return result

    def _consistent(self, report: ReadReport, sources: list[Source] | None) -> Snapshot:
        """A consistent snapshot; ``sources`` (a list to fill) keeps the writer files
        unmerged (the fast path), None merges them (and their exemplars) at once."""
        self._tombstones = read_tombstones(self.directory, self._tombstones)
        for _ in range(_MAX_ATTEMPTS):
            try:
                return self._snapshot(report, sources)
            except _Retry:
                report.retries += 1
                if sources is not None:
                    sources.clear()
        return self._locked_snapshot(report, sources)

    def _families(self, snapshot: Snapshot) -> dict[str, Family]:
        """The merged families of a snapshot (merging the writer files it kept)."""
        if not snapshot.sources:
            return snapshot.archive
        families = {name: fam.copy() for name, fam in snapshot.archive.items()}
        for info, data, layout in snapshot.sources:
            self._merge_entries(info, data, layout, families)
        return families

    def _locked_snapshot(self, report: ReadReport, sources: list[Source] | None) -> Snapshot:
        """A snapshot under a shared ``compact.lock``: no compaction commits meanwhile."""
        create = 0 if self.read_only else os.O_CREAT
        try:
            fd = os.open(os.path.join(self.directory, COMPACT_LOCK),
                         os.O_RDONLY | os.O_NONBLOCK | OPEN_FLAGS | create, 0o600)
        except OSError as err:
            raise RuntimeError(
                f"{self.directory} changed under {_MAX_ATTEMPTS} consecutive reads and its "
                f"{COMPACT_LOCK} cannot be opened ({err.strerror}); is something other than "
                "victor_mp_metrics rewriting it?"
            ) from None
        try:
            if not flock_within(fd, fcntl.LOCK_SH, _LOCKED_READ_WAIT):
                raise RuntimeError(
                    f"a compaction of {self.directory} held {COMPACT_LOCK} for more than "
                    f"{_LOCKED_READ_WAIT:.0f} s"
                )
            try:
                return self._snapshot(report, sources)
            except _Retry:
                raise RuntimeError(
                    f"{self.directory} changed while {COMPACT_LOCK} was held; is something "
                    "other than victor_mp_metrics rewriting it?"
                ) from None
        finally:
            os.close(fd)

    # -- one snapshot --

    def _snapshot(self, report: ReadReport, sources: list[Source] | None) -> Snapshot:
        manifest = self._manifest(report)
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return Snapshot((), {}, [])
        version, archive = self._archive_families(manifest, names, report)
        families = archive if sources is not None else {
            name: fam.copy() for name, fam in archive.items()}
        alive: dict[str, bool] = {}
        files = nbytes = 0
        seen: set[str] = set()
        for name in names:
            info = parse_name(name)
            if info is None or info.is_archive or info.ident in manifest.absorbed:
                continue
            if info.is_live_gauge:
                live = alive.get(info.ident)
                if live is None:
                    path = os.path.join(self.directory, name)
                    live = alive[info.ident] = writer_alive(self.directory, info.ident, path)
                if not live:
                    continue
            seen.add(name)
            loaded = self._load_writer_file(info, report)
            if loaded is None:
                continue
            files += 1
            nbytes += len(loaded[0])
            if sources is None:
                self._merge_entries(info, *loaded, families)
            else:
                sources.append((info, *loaded))
        for stale in self._layouts.keys() - seen:
            del self._layouts[stale]
        if sources is None:  # exemplars are shown in OpenMetrics only, never in text
            idents = {info.ident for info in map(parse_name, seen) if info is not None}
            for exemplars in [archive_exemplars_name(manifest.generation),
                              *(ident + EXEMPLARS_SUFFIX for ident in sorted(idents))]:
                self._read_exemplars(exemplars, families)
        if self._manifest(report) != manifest:
            raise _Retry
        report.files = files
        report.nbytes = nbytes
        return Snapshot(version, families, sources or [])

    def _read_exemplars(self, name: str, families: dict[str, Family]) -> None:
        """Attach the exemplars of file ``name`` (newest wins) to the families' samples."""
        for raw, labels, value, timestamp in read_exemplars(self.directory, name):
            if not labels:
                continue
            try:
                key = self._key(raw)
                decoded = json.loads(labels)
            except (Unreadable, ValueError):
                continue
            family = families.get(key.metric)
            if family is None or not isinstance(decoded, dict):
                continue
            sk = (key.sample, key.labels)
            current = family.exemplars.get(sk)
            if current is None or float(current.timestamp or 0.0) < timestamp:
                family.exemplars[sk] = Exemplar(
                    {str(k): str(v) for k, v in decoded.items()}, value, timestamp)

    def _manifest(self, report: ReadReport) -> Manifest:
        try:
            return read_manifest(self.directory)
        except CorruptFile as err:
            self._report(MANIFEST, (0, 0), str(err), report)
            return Manifest()

    def _archive_families(
        self, manifest: Manifest, names: list[str], report: ReadReport
    ) -> tuple[tuple[object, ...], dict[str, Family]]:
        """The merged families of the current archive (cached: never modify them)."""
        cached = self._archive
        version = (manifest.epoch, manifest.generation, self._tombstones.version)
        if cached is None or cached[0] != version:
            families: dict[str, Family] = {}
            for name in names:
                info = parse_name(name)
                if info is None or info.generation != manifest.generation:
                    continue
                try:
                    data, _stat = read_data(self.directory, name)
                    entries = [(self._key(raw), v, t)
                               for raw, v, t, _pos in _entries(data)]
                except FileNotFoundError:
                    raise _Retry from None
                except Unreadable as err:
                    self._report(name, (0, 0), err.reason, report)
                    continue
                removed = self._tombstones.removed
                for key, value, timestamp in entries:
                    if not removed(key, timestamp):
                        self._family(families, key, info).add(key, value, timestamp,
                                                              info.ident)
            cached = self._archive = (version, families)
        return cached

    def _load_writer_file(
        self, info: DataFile, report: ReadReport
    ) -> tuple[bytes, Layout] | None:
        """A writer file's used bytes and its layout, extended to them; None if it is
        gone or unreadable (reported)."""
        try:
            fd, stat = open_regular(self.directory, info.name)
        except FileNotFoundError:
            return None  # compacted away after we listed it: the manifest check catches it
        except Unreadable as err:
            self._unreadable(info, (0, 0), err, report)
            return None
        inode = (stat.st_dev, stat.st_ino)
        try:
            data = read_used(fd, stat)
        except Unreadable as err:
            self._unreadable(info, inode, err, report)
            return None
        finally:
            os.close(fd)
        layout = self._layouts.get(info.name)
        if layout is None or layout.inode != inode or layout.used > len(data):
            layout = self._layouts[info.name] = Layout(inode)
        if len(data) > layout.used:
            try:
                tail = [(self._key(raw), pos) for raw, _v, _t, pos in _entries(data)
                        if pos >= layout.used]
            except Unreadable as err:
                del self._layouts[info.name]
                self._unreadable(info, inode, err, report)
                return None
            layout.entries.extend(tail)
            layout.used = len(data)
        if not data:
            return None
        return data, layout

    def _merge_entries(
        self, info: DataFile, data: bytes, layout: Layout, families: dict[str, Family]
    ) -> None:
        unpack = TWO_DOUBLES.unpack_from
        removed = self._tombstones.removed if self._tombstones.by_metric else None
        for key, pos in layout.entries:
            value, timestamp = unpack(data, pos)
            if removed is None or not removed(key, timestamp):
                self._family(families, key, info).add(key, value, timestamp, info.ident)

    # -- helpers --

    def _key(self, raw: bytes) -> Key:
        key = self._keys.get(raw)
        if key is None:
            try:
                key = self._keys[raw] = parse_key(raw)
            except CorruptFile as err:
                raise Unreadable(str(err), corrupt=True) from None
        return key

    @staticmethod
    def _family(families: dict[str, Family], key: Key, info: DataFile) -> Family:
        fam = families.get(key.metric)
        if fam is None:
            fam = families[key.metric] = Family(info.typ, key.help, info.mode)
        return fam

    def _unreadable(
        self, info: DataFile, inode: tuple[int, int], err: Unreadable, report: ReadReport
    ) -> None:
        first = self._report(info.name, inode, err.reason, report, count=False)
        if self.read_only:
            return
        if not writer_alive(self.directory, info.ident) and quarantine(self.directory, info.name):
            # Whoever moves the file counts it: exactly once across all processes.
            report.quarantined += 1
            report.corrupt += 1
        elif first:
            report.corrupt += 1  # a file that stays: once per process that reads it

    def _report(
        self, name: str, inode: tuple[int, int], reason: str, report: ReadReport,
        count: bool = True,
    ) -> bool:
        """Log an unreadable entry once per process; True the first time."""
        if (name, inode) in self._warned:
            return False
        self._warned.add((name, inode))
        log.error(
            "victor_mp_metrics: skipping corrupt or unreadable metrics file %s (%s); the rest "
            "of the scrape is unaffected. Run `victor-metrics doctor` for details.",
            os.path.join(self.directory, name), reason,
        )
        if count and not self.read_only:
            report.corrupt += 1
        return True


def _entries(data: bytes) -> list[tuple[bytes, float, float, int]]:
    try:
        return list(iter_entries(data, len(data)))
    except CorruptFile as err:
        raise Unreadable(str(err), corrupt=True) from None

