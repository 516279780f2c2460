"""Compaction: merge dead writers' files into archive files, safely under concurrent reads.

Stock prometheus_client must keep every dead worker's files (deleting them would make
counters go backwards), so the directory and the scrape time grow with every restart.
We merge them instead, with a protocol that keeps totals exact, monotonic and crash-safe.

**Protocol.** Compactions are serialised by an flock on ``compact.lock`` (waited for at
most ``lock_wait`` seconds: a stuck holder delays compaction, never the caller). The
archive is a set of immutable files of one *generation* ``g``, ``{kind}_archive-{g}.db``;
``manifest.json`` names the current generation and the writer idents it has absorbed.
One compaction:

1. *recover*: finish or roll back whatever an interrupted compaction left (below);
2. list the directory and judge every writer in it; the dead ones (at most
   ``max_writers`` of them, so one compaction is short; the rest wait for the next) are
   ``D``; then list again. A writer judged dead creates no file after that judgement, so
   the second listing holds every file of ``D``: nothing a writer creates later is taken;
3. read the archive of ``g`` and the files of ``D``; merge them by the one rule of
   ``_merge`` (``live*`` and ``all`` gauges are dropped); cap label sets per metric;
   a file that cannot be read is moved to ``quarantine/`` and reported, never blocking;
4. write the merged archive of generation ``g+1`` (temp file, fsync, rename);
5. **commit**: replace the manifest with ``{generation: g+1, absorbed: D}``;
6. delete exactly the files merged in step 3 and the owner files of ``D``, then the
   archive of ``g``;
7. replace the manifest with ``{generation: g+1, absorbed: []}``.

Readers use only archive files of the manifest's generation and skip writer files of
absorbed idents, and read the manifest again at the end, starting over if it changed.
Before the commit a reader sees archive ``g`` plus ``D``; after it, archive ``g+1``
without ``D``: the same totals either way, never both, never neither.

**Crash safety.** The commit is one atomic rename. Recovery, run before every compaction
and at start-up: compactor temp files are removed (writers' temp files once stale);
archive files of a generation other than the manifest's are removed (newer ones were
never committed; older ones were superseded); if the manifest still lists absorbed
writers, their files are removed and the list is cleared. Killed before step 5, the
compaction never happened; killed after it, it is completed. ``FAULT_POINTS`` names each
step, and tests kill the process at each one.

**fork().** Nothing here is held across ``fork()``: a Gunicorn master forks replacement
workers while its compactor thread works. A child closes its copy of the lock's
descriptor (:func:`after_fork_in_child`); the flock stays with the parent's.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ._format import (
    CorruptFile,
    Key,
    encode_exemplar_file,
    encode_file,
    encode_key,
    iter_entries,
    parse_key,
)
from ._fs import (
    OPEN_FLAGS,
    Unreadable,
    flock_within,
    is_stale_temp,
    quarantine,
    read_data,
    read_exemplars,
    unlink_quietly,
    write_file,
)
from ._liveness import writer_liveness
from ._manifest import Manifest, read_manifest, write_manifest
from ._merge import archived, merge, rule_of
from ._names import (
    COMPACT_LOCK,
    EXEMPLARS_SUFFIX,
    OWNER_SUFFIX,
    TMP_SUFFIX,
    archive_exemplars_generation,
    archive_exemplars_name,
    archive_name,
    is_compactor_temp,
    parse_name,
    writer_ident,
)
from ._tombstones import read_tombstones

log = logging.getLogger("victor_mp_metrics")

OVERFLOW = "__overflow__"
DEFAULT_MAX_SERIES = 1000
MAX_WRITERS = 256
LOCK_WAIT = 5.0

FAULT_POINTS = (
    "before_archive",
    "archive_partial",
    "archive_written",
    "committed",
    "writers_removed",
    "old_archive_removed",
    "done",
)


@dataclass
class CompactionResult:
    """What one compaction did (the caller counts and logs it)."""

    absorbed: list[str] = field(default_factory=list)
    files_removed: int = 0
    files_written: int = 0
    generation: int = 0
    duration: float = 0.0
    recovered: bool = False
    corrupt: list[str] = field(default_factory=list)
    series_folded: int = 0
    remaining: int = 0  # dead writers left for the next compaction
    busy: bool = False  # another compaction held the lock past the wait


class _State:
    """In-process serialisation, and the lock descriptor a forked child must close."""

    mutex = threading.Lock()
    lock_fd = -1


class _DirectoryLock:
    """An exclusive flock on ``compact.lock``, waited for at most ``wait`` seconds."""

    def __init__(self, directory: str, wait: float) -> None:
        self.path = os.path.join(directory, COMPACT_LOCK)
        self.wait = wait
        self.fd = -1

    def __enter__(self) -> bool:
        """True when the lock is held; False when someone else held it past the wait."""
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | OPEN_FLAGS, 0o600)
        if not flock_within(self.fd, fcntl.LOCK_EX, self.wait):
            return False
        _State.lock_fd = self.fd
        return True

    def __exit__(self, *exc: object) -> None:
        _State.lock_fd = -1
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)


def compact(
    directory: str,
    *,
    exclude: frozenset[str] = frozenset(),
    fault: Callable[[str], None] | None = None,
    max_series: int = DEFAULT_MAX_SERIES,
    max_writers: int = MAX_WRITERS,
    lock_wait: float = LOCK_WAIT,
) -> CompactionResult:
    """Recover, then merge dead writers' files into a new archive generation.

    ``exclude`` lists idents never to absorb (the caller's own). ``fault`` is called with
    each name in :data:`FAULT_POINTS` as the step completes; tests use it to crash there.
    ``max_series`` caps label sets per metric in the archive, as the writers' cardinality
    guard does per process: extra label sets fold into ``__overflow__``.
    """
    started = time.perf_counter()
    hit = fault or (lambda point: None)
    result = CompactionResult()
    with _State.mutex, _DirectoryLock(directory, lock_wait) as held:
        if not held:
            result.busy = True
            return result
        result.recovered = recover(directory)
        manifest = read_manifest(directory)
        result.generation = manifest.generation
        dead = _dead_writers(directory, os.listdir(directory), exclude)
        result.remaining = max(0, len(dead) - max_writers)
        dead = set(sorted(dead)[:max_writers])
        names = os.listdir(directory)  # every file of D is here: D creates no more
        hit("before_archive")
        if dead:
            _absorb(directory, names, manifest, dead, result, hit, max_series)
    result.duration = time.perf_counter() - started
    return result


def recover(directory: str) -> bool:
    """Bring the directory to a committed state; True if there was anything to repair.

    Caller holds the compaction lock (``compact`` and ``wipe_dead`` do).
    """
    manifest = read_manifest(directory)
    repaired = False
    for name in os.listdir(directory):
        info = parse_name(name)
        generation = info.generation if info is not None else archive_exemplars_generation(name)
        superseded = generation is not None and generation != manifest.generation
        leftover = name.endswith(TMP_SUFFIX) and (
            is_compactor_temp(name) or is_stale_temp(directory, name)
        )
        if superseded or leftover:
            unlink_quietly(os.path.join(directory, name))
            repaired = True
    if manifest.absorbed:
        names = [n for n in os.listdir(directory) if writer_ident(n) in manifest.absorbed]
        _remove(directory, names)
        write_manifest(directory, Manifest(manifest.generation, epoch=manifest.epoch))
        repaired = True
    return repaired


def _dead_writers(directory: str, names: list[str], exclude: frozenset[str]) -> set[str]:
    # Owner files count too: a writer may die before it creates any data file.
    liveness = writer_liveness(directory, names, skip=exclude)
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
    parsed: dict[str, Key] = {}
    removed = read_tombstones(directory).removed  # removed label sets are not archived
    old_archive: list[str] = []
    taken: list[str] = []  # removed after the commit: exactly what was merged
    # The archive first, so series it already holds keep their place under the cap.
    for name in sorted(names, key=lambda n: f"_archive-{manifest.generation}." not in n):
        info = parse_name(name)
        if info is None:
            continue
        if info.is_archive:
            if info.generation != manifest.generation:
                continue
            old_archive.append(name)
        elif info.ident not in dead:
            continue
        else:
            taken.append(name)
        if not archived(info.mode):
            continue
        try:
            data, _stat = read_data(directory, name)
            entries = []
            for raw, value, timestamp, _pos in iter_entries(data, len(data)):
                key = raw.decode("utf-8")
                if key not in parsed:
                    parsed[key] = parse_key(raw)
                entries.append((key, value, timestamp))
        except FileNotFoundError:
            continue
        except (Unreadable, CorruptFile) as err:
            reason = err.reason if isinstance(err, Unreadable) else str(err)
            log.error("victor_mp_metrics: %s not merged (%s); moved to quarantine/",
                      os.path.join(directory, name), reason)
            result.corrupt.append(name)
            if name in taken:
                taken.remove(name)
            if quarantine(directory, name):
                result.files_removed += 1
            continue
        into = merged.setdefault(info.kind, {})
        rule = rule_of(info.mode)
        for key, value, timestamp in entries:
            if not removed(parsed[key], timestamp):
                merge(into, key, value, timestamp, rule)

    generation = manifest.generation + 1
    for kind, values in merged.items():
        result.series_folded += _cap_series(values, parsed, rule_of(kind.partition("_")[2]),
                                            max_series)
    for kind, values in sorted(merged.items()):
        if not values:
            continue
        body, size = encode_file([(key, value, ts) for key, (value, ts) in sorted(values.items())])
        write_file(os.path.join(directory, archive_name(kind, generation)), body, size)
        result.files_written += 1
        if result.files_written == 1:
            hit("archive_partial")
    _archive_exemplars(directory, names, manifest.generation, generation, dead)
    hit("archive_written")

    write_manifest(directory, Manifest(generation, frozenset(dead), manifest.epoch))
    result.generation = generation
    result.absorbed = sorted(dead)
    hit("committed")

    owners = [n for n in names if n.endswith((OWNER_SUFFIX, EXEMPLARS_SUFFIX))
              and writer_ident(n) in dead]
    result.files_removed += _remove(directory, taken + owners)
    hit("writers_removed")
    for name in [*old_archive, archive_exemplars_name(manifest.generation)]:
        result.files_removed += unlink_quietly(os.path.join(directory, name))
    hit("old_archive_removed")

    write_manifest(directory, Manifest(generation, epoch=manifest.epoch))
    hit("done")


def _archive_exemplars(
    directory: str, names: list[str], old: int, new: int, dead: set[str]
) -> None:
    """Keep the newest exemplar of each key of the old archive and ``dead``'s files in the
    new generation's exemplar file (best effort: exemplars never stop a compaction)."""
    newest: dict[bytes, tuple[bytes, float, float]] = {}
    sources = [archive_exemplars_name(old)] + [
        n for n in names if n.endswith(EXEMPLARS_SUFFIX) and writer_ident(n) in dead]
    for name in sources:
        for key, labels, value, timestamp in read_exemplars(directory, name):
            if labels and (key not in newest or newest[key][2] < timestamp):
                newest[key] = (labels, value, timestamp)
    if newest:
        body, size = encode_exemplar_file([(k, *v) for k, v in sorted(newest.items())])
        write_file(os.path.join(directory, archive_exemplars_name(new)), body, size)


def _cap_series(
    values: dict[str, tuple[float, float]], parsed: dict[str, Key], rule: int, max_series: int
) -> int:
    """Fold label sets past ``max_series`` per metric into ``__overflow__``; samples moved."""
    seen: dict[str, set[tuple[tuple[str, str], ...]]] = {}
    folded: dict[str, tuple[float, float]] = {}
    count = 0
    for key in list(values):
        k = parsed[key]
        kept = seen.setdefault(k.metric, set())
        label_values = {v for _, v in k.without_le}
        if k.without_le in kept or len(kept) < max_series or label_values <= {OVERFLOW}:
            kept.add(k.without_le)
            continue
        count += 1
        value, timestamp = values.pop(key)
        overflow = {name: (v if name == "le" else OVERFLOW) for name, v in k.labels}
        target = encode_key(k.metric, k.sample, overflow, k.help)
        if target not in folded and target in values:
            folded[target] = values[target]
        merge(folded, target, value, timestamp, rule)
    values.update(folded)
    return count


def _remove(directory: str, names: list[str]) -> int:
    """Unlink ``names``, owner files last: an owner file outlives its data files."""
    removed = 0
    for name in sorted(names, key=lambda n: n.endswith(OWNER_SUFFIX)):
        removed += unlink_quietly(os.path.join(directory, name))
    return removed


def wipe_dead(
    directory: str, *, exclude: frozenset[str] = frozenset(), lock_wait: float = LOCK_WAIT
) -> int:
    """Start-up clean slate: if no other writer lives, remove every file of earlier runs.

    Files of live writers (another process sharing the directory) are never touched;
    while any live, the archive is kept too (their totals include it) and -1 is returned
    (the caller compacts instead). Returns how many files were removed.
    """
    with _State.mutex, _DirectoryLock(directory, lock_wait) as held:
        if not held:
            return -1
        recover(directory)
        names = os.listdir(directory)
        if any(writer_liveness(directory, names, skip=exclude).values()):
            return -1
        removed = 0
        for name in names:
            info = parse_name(name)
            ident = writer_ident(name)
            archive = info is not None and info.is_archive
            if archive or (ident is not None and ident not in exclude):
                unlink_quietly(os.path.join(directory, name))
                removed += 1
        previous = read_manifest(directory)
        write_manifest(directory, Manifest(previous.generation + 1, epoch=previous.epoch))
        return removed


def after_fork_in_child() -> None:
    """In a forked child: a fresh mutex, and our copy of the lock's descriptor closed."""
    _State.mutex = threading.Lock()
    if _State.lock_fd >= 0:
        try:
            os.close(_State.lock_fd)  # without LOCK_UN: the parent's lock stays
        except OSError:
            pass
        _State.lock_fd = -1
