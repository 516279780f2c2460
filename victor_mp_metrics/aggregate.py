"""The aggregator behind ``/metrics``: one consistent, cached read of the whole directory.

It yields the same samples as prometheus_client's ``MultiProcessCollector`` on the same
directory, with three differences that make it correct under compaction and faster:

* **Consistent snapshot.** It reads ``manifest.json``, lists and opens the files of that
  archive generation, skips writer files the manifest has absorbed, then reads the
  manifest again; if a compaction committed in between it starts over. So a counter is
  never counted twice nor missed, and never goes down between scrapes.
* **Liveness.** ``live*`` gauges of writers whose owner lock is free (dead) are skipped at
  once, before any hook or compaction has run.
* **Caches.** Parsed keys are cached by their bytes; each writer file's layout (keys and
  offsets) is cached and only the appended tail is parsed; the current archive
  generation is parsed once and its partial sums reused until the next compaction.
* **Corruption tolerance.** A file that cannot be parsed is skipped, logged once and
  counted; if its writer is dead it is moved to ``quarantine/`` so it is not read again.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from . import _files
from .manifest import Manifest, read_manifest

log = logging.getLogger("victor_mp_metrics")

_MAX_ATTEMPTS = 5
_MIN_MODES = ("min", "livemin")
_MAX_MODES = ("max", "livemax")
_SUM_MODES = ("sum", "livesum")
_RECENT_MODES = ("mostrecent", "livemostrecent")


class _Retry(Exception):
    """The directory changed under a read; start the snapshot again."""


@dataclass
class ScrapeStats:
    """Self-metrics of one collector, exported as ``victor_metrics_*``."""

    scrapes: int = 0
    last_duration: float = 0.0
    last_files: int = 0
    last_bytes: int = 0
    retries: int = 0
    corrupt_files: int = 0


@dataclass(frozen=True, slots=True)
class _Key:
    metric: str
    sample: str
    labels: tuple[tuple[str, str], ...]
    help: str
    le: float | None  # histogram bucket bound
    without_le: tuple[tuple[str, str], ...]


class _Accumulator:
    """Per metric family: the merge rules of prometheus_client's MultiProcessCollector."""

    __slots__ = ("buckets", "help", "mode", "samples", "timestamps", "typ")

    def __init__(self, typ: str, help_text: str, mode: str) -> None:
        self.typ = typ
        self.help = help_text
        self.mode = mode
        self.samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.timestamps: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.buckets: dict[tuple[tuple[str, str], ...], dict[float, float]] = {}

    def copy(self) -> _Accumulator:
        new = _Accumulator(self.typ, self.help, self.mode)
        new.samples = dict(self.samples)
        new.timestamps = dict(self.timestamps)
        new.buckets = {labels: dict(b) for labels, b in self.buckets.items()}
        return new

    def add(self, key: _Key, value: float, timestamp: float, pid: str) -> None:
        typ = self.typ
        if typ == "histogram":
            if key.le is not None:
                bucket = self.buckets.get(key.without_le)
                if bucket is None:
                    bucket = self.buckets[key.without_le] = defaultdict(float)
                bucket[key.le] += value
            else:
                sk = (key.sample, key.labels)
                self.samples[sk] = self.samples.get(sk, 0.0) + value
        elif typ == "gauge":
            mode = self.mode
            if mode in _SUM_MODES:
                sk = (key.sample, key.labels)
                self.samples[sk] = self.samples.get(sk, 0.0) + value
            elif mode in _MAX_MODES:
                sk = (key.sample, key.labels)
                current = self.samples.get(sk)
                if current is None or value > current:
                    self.samples[sk] = value
            elif mode in _MIN_MODES:
                sk = (key.sample, key.labels)
                current = self.samples.get(sk)
                if current is None or value < current:
                    self.samples[sk] = value
            elif mode in _RECENT_MODES:
                sk = (key.sample, key.labels)
                if self.timestamps.get(sk, 0.0) < timestamp:
                    self.samples[sk] = value
                    self.timestamps[sk] = timestamp
            else:  # all, liveall: one series per process
                self.samples[(key.sample, (*key.labels, ("pid", pid)))] = value
        else:
            sk = (key.sample, key.labels)
            self.samples[sk] = self.samples.get(sk, 0.0) + value

    def metric(self, name: str) -> Metric:
        metric = Metric(name, self.help, self.typ)
        samples = metric.samples
        for (sample, labels), value in self.samples.items():
            samples.append(Sample(sample, dict(labels), value))
        if self.typ == "histogram":
            for labels, bucket in self.buckets.items():
                acc = 0.0
                for bound in sorted(bucket):
                    acc += bucket[bound]
                    le = dict(labels)
                    le["le"] = floatToGoString(bound)
                    samples.append(Sample(name + "_bucket", le, acc))
                samples.append(Sample(name + "_count", dict(labels), acc))
        return metric


class _Layout:
    """Parsed keys and value offsets of one writer file, extended as the file grows."""

    __slots__ = ("entries", "inode", "used")

    def __init__(self, inode: int) -> None:
        self.inode = inode
        self.used = 8
        self.entries: list[tuple[_Key, int]] = []


class DirectoryCollector:
    """A prometheus_client collector that aggregates a multiprocess directory."""

    def __init__(self, directory: str, *, read_only: bool = False) -> None:
        """Aggregate ``directory``. ``read_only`` never moves a corrupt file nor counts it
        in ``victor_metrics_corrupt_files_total`` (for tools that only look)."""
        self.directory = directory
        self.read_only = read_only
        self.stats = ScrapeStats()
        self._lock = threading.Lock()
        self._keys: dict[bytes, _Key] = {}
        self._layouts: dict[str, _Layout] = {}
        self._archive: tuple[tuple[str, int], dict[str, _Accumulator]] | None = None
        self._warned: set[tuple[str, int]] = set()

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            started = time.perf_counter()
            for _ in range(_MAX_ATTEMPTS):
                try:
                    families = self._snapshot()
                    break
                except _Retry:
                    self.stats.retries += 1
            else:
                raise RuntimeError(
                    f"{self.directory} changed under {_MAX_ATTEMPTS} consecutive reads; "
                    "is something other than victor_mp_metrics rewriting it?"
                )
            self.stats.scrapes += 1
            self.stats.last_duration = time.perf_counter() - started
            return [acc.metric(name) for name, acc in families.items()]

    # -- one snapshot --

    def _snapshot(self) -> dict[str, _Accumulator]:
        manifest = self._manifest()
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return {}
        families = self._archive_families(manifest, names)
        alive: dict[str, bool] = {}
        files = nbytes = 0
        seen: set[str] = set()
        for name in names:
            info = _files.parse_name(name)
            if info is None or info.is_archive or info.ident in manifest.absorbed:
                continue
            if info.is_live_gauge:
                live = alive.get(info.ident)
                if live is None:
                    path = os.path.join(self.directory, name)
                    live = alive[info.ident] = _files.writer_alive(
                        self.directory, info.ident, path
                    )
                if not live:
                    continue
            seen.add(name)
            n = self._read_writer_file(info, families)
            if n:
                files += 1
                nbytes += n
        for stale in self._layouts.keys() - seen:
            del self._layouts[stale]
        if self._manifest() != manifest:
            raise _Retry
        self.stats.last_files = files
        self.stats.last_bytes = nbytes
        return families

    def _manifest(self) -> Manifest:
        try:
            return read_manifest(self.directory)
        except _files.CorruptFile as err:
            self._report_corrupt(_files.MANIFEST, 0, err)
            return Manifest()

    def _archive_families(self, manifest: Manifest, names: list[str]) -> dict[str, _Accumulator]:
        cached = self._archive
        version = (manifest.epoch, manifest.generation)
        if cached is None or cached[0] != version:
            families: dict[str, _Accumulator] = {}
            for name in names:
                info = _files.parse_name(name)
                if info is None or info.generation != manifest.generation:
                    continue
                path = os.path.join(self.directory, name)
                try:
                    data = _files.read_file(path)
                    entries = list(_files.iter_entries(data, len(data)))
                except FileNotFoundError:
                    raise _Retry from None
                except _files.CorruptFile as err:
                    self._report_corrupt(name, 0, err)
                    continue
                for raw, value, timestamp, _pos in entries:
                    key = self._key(raw)
                    self._family(families, key, info).add(key, value, timestamp, info.ident)
            cached = self._archive = (version, families)
        return {name: acc.copy() for name, acc in cached[1].items()}

    def _read_writer_file(self, info: _files.DataFile, families: dict[str, _Accumulator]) -> int:
        path = os.path.join(self.directory, info.name)
        try:
            fd = os.open(path, os.O_RDONLY | _files.OPEN_FLAGS)
        except FileNotFoundError:
            # Compacted away after we listed it: only a problem if the manifest moved.
            return 0
        except OSError as err:
            self._report_corrupt(info.name, 0, err)
            return 0
        try:
            inode = os.fstat(fd).st_ino
            data = _files.read_used(fd)
        except _files.CorruptFile as err:
            self._corrupt(info, inode, err)
            return 0
        finally:
            os.close(fd)
        layout = self._layouts.get(info.name)
        if layout is None or layout.inode != inode or layout.used > len(data):
            layout = self._layouts[info.name] = _Layout(inode)
        if len(data) > layout.used:
            try:
                tail = [
                    (self._key(raw), pos)
                    for raw, _v, _t, pos in _files.iter_entries(data, len(data))
                    if pos >= layout.used
                ]
            except (_files.CorruptFile, ValueError) as err:
                del self._layouts[info.name]
                self._corrupt(info, inode, err)
                return 0
            layout.entries.extend(tail)
            layout.used = len(data)
        unpack = _files._two_doubles.unpack_from
        for key, pos in layout.entries:
            value, timestamp = unpack(data, pos)
            self._family(families, key, info).add(key, value, timestamp, info.ident)
        return len(data)

    # -- helpers --

    def _key(self, raw: bytes) -> _Key:
        key = self._keys.get(raw)
        if key is None:
            metric, sample, labels, help_text = json.loads(raw)
            items = tuple(sorted(labels.items()))
            le = labels.get("le")
            key = _Key(
                metric, sample, items, help_text,
                float(le) if le is not None else None,
                tuple(item for item in items if item[0] != "le") if le is not None else items,
            )
            self._keys[raw] = key
        return key

    @staticmethod
    def _family(
        families: dict[str, _Accumulator], key: _Key, info: _files.DataFile
    ) -> _Accumulator:
        acc = families.get(key.metric)
        if acc is None:
            acc = families[key.metric] = _Accumulator(info.typ, key.help, info.mode)
        return acc

    def _corrupt(self, info: _files.DataFile, inode: int, err: Exception) -> None:
        first = self._report_corrupt(info.name, inode, err, count=False)
        if self.read_only:
            return
        if not _files.writer_alive(self.directory, info.ident):
            # Whoever moves the file counts it: exactly once across all processes.
            if quarantine(self.directory, info.name) is not None:
                self._count()
        elif first:
            self._count()  # a live writer's file: once per process that reads it

    def _report_corrupt(self, name: str, inode: int, err: Any, count: bool = True) -> bool:
        """Log a corrupt file once per process; True the first time."""
        if (name, inode) in self._warned:
            return False
        self._warned.add((name, inode))
        self.stats.corrupt_files += 1
        log.error(
            "victor_mp_metrics: skipping corrupt metrics file %s (%s); the rest of the scrape "
            "is unaffected. Run `victor-metrics doctor` for details.",
            os.path.join(self.directory, name), err,
        )
        if count and not self.read_only:
            self._count()
        return True

    @staticmethod
    def _count() -> None:
        from . import selfmetrics

        selfmetrics.counter("corrupt_files").inc()


def quarantine(directory: str, name: str) -> str | None:
    """Move a corrupt file to ``quarantine/`` (keeping at most 100 there); its new path."""
    qdir = os.path.join(directory, _files.QUARANTINE)
    try:
        os.makedirs(qdir, mode=0o700, exist_ok=True)
        target = os.path.join(qdir, f"{name}.{int(time.time() * 1000)}")
        os.rename(os.path.join(directory, name), target)
        kept = sorted(os.listdir(qdir))
        for old in kept[:-100]:
            os.unlink(os.path.join(qdir, old))
        return target
    except FileNotFoundError:
        return None  # another process moved it first
    except OSError as err:
        log.warning("victor_mp_metrics: could not quarantine %s: %s", name, err)
        return None
