"""Compaction: merge dead writers' files into archive files, safely under concurrent scrapes.

Stock prometheus_client must keep every dead worker's files (deleting them would make
counters go backwards), so the directory and the scrape time grow with every restart.
We merge them instead, with a protocol that keeps totals exact, monotonic and crash-safe.

**Who is dead.** A writer is alive while its ``{ident}.owner`` file is flock-ed; the kernel
releases the lock when the process dies, however it dies, and idents are never reused
(``{pid}-{random}``), so pid reuse cannot revive a dead writer (see ``_files``).

**Protocol.** Compactions are serialised by an flock on ``compact.lock``. The archive is a
set of immutable files of one *generation* ``g``, named ``{kind}_archive-{g}.db``, and
``manifest.json`` names the current generation and the writer idents it has absorbed.
One compaction of the dead writers ``D``:

1. *recover*: finish or roll back whatever an interrupted compaction left (below);
2. read the archive of generation ``g`` and the files of ``D``; merge per kind: counters,
   histograms, summaries and ``sum`` gauges add up, ``max``/``min`` gauges keep the
   extreme, ``mostrecent`` keeps the newest timestamp; ``live*`` and ``all`` gauges are
   dropped (they describe a process that no longer exists);
3. write the merged archive of generation ``g+1`` (temp file, fsync, rename);
4. **commit**: replace the manifest with ``{generation: g+1, absorbed: D}``;
5. delete the files of ``D`` (data, then owner files) and the archive of ``g``;
6. replace the manifest with ``{generation: g+1, absorbed: []}``.

Readers (``aggregate.DirectoryCollector``) read the manifest, use only archive files of
its generation, skip writer files it lists as absorbed, and read the manifest again at
the end, starting over if it changed. Before the commit a reader sees archive ``g`` plus
``D``; after it, archive ``g+1`` without ``D``: the same totals either way, never both,
never neither. A reader whose files vanish under it sees the manifest change and retries.

**Crash safety.** The commit is one atomic rename. Recovery, run before every compaction
and at start-up: temp files are removed; archive files of a generation other than the
manifest's are removed (newer ones were never committed; older ones were superseded);
if the manifest still lists absorbed writers, their files are removed and the list is
cleared. Killed before step 4, the compaction never happened; killed after it, it is
completed. ``FAULT_POINTS`` names each step, and tests kill the process at each one.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import _files
from ._metrics import OVERFLOW
from .aggregate import quarantine
from .manifest import Manifest, read_manifest, write_manifest

log = logging.getLogger("victor_mp_metrics")

FAULT_POINTS = (
    "before_archive",
    "archive_partial",
    "archive_written",
    "committed",
    "writers_removed",
    "old_archive_removed",
    "done",
)

# Held for the whole of a compaction in this process, and across fork() (see the bottom
# of this module), so a child never inherits the compaction lock's file descriptor.
_mutex = threading.Lock()


@dataclass
class CompactionResult:
    """What one compaction did."""

    absorbed: list[str] = field(default_factory=list)
    files_removed: int = 0
    files_written: int = 0
    generation: int = 0
    duration: float = 0.0
    recovered: bool = False
    corrupt: list[str] = field(default_factory=list)
    series_folded: int = 0




class _DirectoryLock:
    """An exclusive flock on ``compact.lock``, released explicitly (never by close alone)."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, _files.COMPACT_LOCK)
        self.fd = -1

    def __enter__(self) -> _DirectoryLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _files.OPEN_FLAGS, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def compact(
    directory: str,
    *,
    exclude: frozenset[str] = frozenset(),
    fault: Callable[[str], None] | None = None,
    max_series: int | None = None,
) -> CompactionResult:
    """Recover, then merge every dead writer's files into a new archive generation.

    ``exclude`` lists idents never to absorb (the caller's own). ``fault`` is called with
    each name in :data:`FAULT_POINTS` as the step completes; tests use it to crash there.
    ``max_series`` (default ``VICTOR_METRICS_MAX_SERIES``) caps label sets per metric in the
    archive, as the writers' cardinality guard does per process: the union over many dead
    writers must not grow without bound either. Extra label sets fold into ``__overflow__``.
    """
    if max_series is None:
        max_series = _configured_max_series()
    started = time.perf_counter()
    hit = fault or (lambda point: None)
    with _mutex, _DirectoryLock(directory):
        result = CompactionResult()
        result.recovered = recover(directory)
        manifest = read_manifest(directory)
        result.generation = manifest.generation
        names = os.listdir(directory)
        dead = _dead_writers(directory, names, exclude)
        hit("before_archive")
        if dead:
            _absorb(directory, names, manifest, dead, result, hit, max_series)
    result.duration = time.perf_counter() - started
    return result


def recover(directory: str) -> bool:
    """Bring the directory to a committed state; True if there was anything to repair.

    Caller must hold the compaction lock (``compact`` does).
    """
    manifest = read_manifest(directory)
    repaired = False
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        info = _files.parse_name(name)
        superseded = info is not None and info.is_archive and info.generation != manifest.generation
        leftover = name.endswith(_files.TMP_SUFFIX) and (
            _is_compactor_temp(name) or _files.stale_temp(path)
        )
        if superseded or leftover:
            _files._unlink_quietly(path)
            repaired = True
    if manifest.absorbed:
        _remove_writers(directory, os.listdir(directory), manifest.absorbed)
        write_manifest(directory, Manifest(manifest.generation, epoch=manifest.epoch))
        repaired = True
    return repaired


def _is_compactor_temp(name: str) -> bool:
    return name.startswith(_files.MANIFEST) or f"_{_files.ARCHIVE}-" in name


def _dead_writers(directory: str, names: list[str], exclude: frozenset[str]) -> set[str]:
    # Owner files count too: a writer may die before it creates any data file.
    liveness = _files.writer_liveness(directory, names, skip=exclude)
    return {ident for ident, alive in liveness.items() if not alive}


def _absorb(
    directory: str,
    names: list[str],
    manifest: Manifest,
    dead: set[str],
    result: CompactionResult,
    hit: Callable[[str], None],
    max_series: int,
) -> None:
    merged: dict[str, dict[str, tuple[float, float]]] = {}
    old_archive: list[str] = []
    # The archive first, so series it already holds keep their place under the cap.
    for name in sorted(names, key=lambda n: f"_archive-{manifest.generation}." not in n):
        info = _files.parse_name(name)
        if info is None:
            continue
        if info.is_archive:
            if info.generation != manifest.generation:
                continue
            old_archive.append(name)
        elif info.ident not in dead:
            continue
        if info.is_live_gauge or info.mode == "all":
            continue
        path = os.path.join(directory, name)
        try:
            data = _files.read_file(path)
            entries = list(_files.iter_entries(data, len(data)))
        except (_files.CorruptFile, ValueError) as err:
            log.error("victor_mp_metrics: corrupt file %s not merged (%s); quarantined", path, err)
            result.corrupt.append(name)
            quarantine(directory, name)
            continue
        into = merged.setdefault(info.kind, {})
        _merge(into, info.mode, entries)

    generation = manifest.generation + 1
    for kind, values in merged.items():
        result.series_folded += _cap_series(values, kind, max_series)
    for kind, values in sorted(merged.items()):
        if not values:
            continue
        path = os.path.join(directory, _files.archive_name(kind, generation))
        _files.write_file_atomically(
            path, [(key, value, ts) for key, (value, ts) in sorted(values.items())]
        )
        result.files_written += 1
        if result.files_written == 1:
            hit("archive_partial")
    _files.fsync_dir(directory)
    hit("archive_written")

    write_manifest(directory, Manifest(generation, frozenset(dead), manifest.epoch))
    result.generation = generation
    result.absorbed = sorted(dead)
    hit("committed")

    result.files_removed += _remove_writers(directory, os.listdir(directory), frozenset(dead))
    hit("writers_removed")
    for name in old_archive:
        _files._unlink_quietly(os.path.join(directory, name))
        result.files_removed += 1
    hit("old_archive_removed")

    write_manifest(directory, Manifest(generation, epoch=manifest.epoch))
    hit("done")


def _merge(
    into: dict[str, tuple[float, float]],
    mode: str,
    entries: list[tuple[bytes, float, float, int]],
) -> None:
    for raw, value, timestamp, _pos in entries:
        key = raw.decode("utf-8")
        current = into.get(key)
        if current is None:
            into[key] = (value, timestamp)
        elif mode == "max":
            if value > current[0]:
                into[key] = (value, timestamp)
        elif mode == "min":
            if value < current[0]:
                into[key] = (value, timestamp)
        elif mode == "mostrecent":
            if timestamp > current[1]:
                into[key] = (value, timestamp)
        else:  # counters, histograms, summaries, sum gauges
            into[key] = (current[0] + value, 0.0)


def _configured_max_series() -> int:
    from .settings import Settings, load_settings

    try:
        return load_settings().max_series
    except ValueError:
        return Settings().max_series


def _cap_series(values: dict[str, tuple[float, float]], kind: str, max_series: int) -> int:
    """Fold label sets past ``max_series`` per metric into ``__overflow__``; samples moved."""
    seen: dict[str, set[str]] = {}
    folded: dict[str, tuple[float, float]] = {}
    count = 0
    for key in list(values):
        metric, sample, labels, help_text = json.loads(key)
        series = json.dumps({k: v for k, v in labels.items() if k != "le"}, sort_keys=True)
        kept = seen.setdefault(metric, set())
        if series in kept or len(kept) < max_series or set(labels.values()) <= {OVERFLOW}:
            kept.add(series)
            continue
        count += 1
        value, timestamp = values.pop(key)
        overflow = {k: (v if k == "le" else OVERFLOW) for k, v in labels.items()}
        target = json.dumps([metric, sample, overflow, help_text], sort_keys=True)
        current = folded.get(target) or values.get(target)
        if current is None:
            folded[target] = (value, timestamp)
        else:
            into = {target: current}
            _merge(into, kind.removeprefix("gauge_") if kind.startswith("gauge_") else "",
                   [(target.encode(), value, timestamp, 0)])
            folded[target] = into[target]
    values.update(folded)
    return count


def _remove_writers(directory: str, names: list[str], idents: frozenset[str]) -> int:
    removed = 0
    owners = []  # removed last: an owner file outlives its data files
    for name in names:
        if _files.writer_ident(name) not in idents:
            continue
        if name.endswith(_files.OWNER_SUFFIX):
            owners.append(name)
        else:
            _files._unlink_quietly(os.path.join(directory, name))
            removed += 1
    for name in owners:
        _files._unlink_quietly(os.path.join(directory, name))
        removed += 1
    return removed


def wipe_dead(directory: str, *, exclude: frozenset[str] = frozenset()) -> int:
    """Start-up clean slate: if no other writer lives, remove every file of earlier runs.

    Files of live writers (another Gunicorn master sharing the directory) are never
    touched; while any live, the archive is kept too (their totals include it) and dead
    writers are compacted instead. Returns how many files were removed.
    """
    with _mutex, _DirectoryLock(directory):
        recover(directory)
        names = os.listdir(directory)
        if any(_files.writer_liveness(directory, names, skip=exclude).values()):
            return -1
        removed = 0
        for name in names:
            info = _files.parse_name(name)
            ident = _files.writer_ident(name)
            archive = info is not None and info.is_archive
            if archive or (ident is not None and ident not in exclude):
                _files._unlink_quietly(os.path.join(directory, name))
                removed += 1
        previous = read_manifest(directory)
        write_manifest(directory, Manifest(previous.generation + 1, epoch=previous.epoch))
        return removed


def _before_fork() -> None:
    _mutex.acquire()


def _after_fork_in_parent() -> None:
    _mutex.release()


def _after_fork_in_child() -> None:
    global _mutex
    _mutex = threading.Lock()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)
