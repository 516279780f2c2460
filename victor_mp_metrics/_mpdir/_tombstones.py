"""Removed label sets: ``tombstones.json``, so ``remove()`` and ``clear()`` work across
processes.

Every value's entry carries a stamp in its timestamp field: the time it was created (or
reset), or for ``mostrecent`` gauges the time it was last set. A tombstone says "label
set L of metric M (every label set when L is null) was removed at time T"; readers and
the compactor then ignore every entry of (M, L) stamped before T, in live files, dead
ones and the archive alike, and writers reset their own such values to zero with a new
stamp (within a watchdog round), so a label set used again starts from 0::

    {"tombstones": [["metric", {"label": "value"}, 1764700000.5], ["metric", null, ...]]}

The file is replaced atomically under its own flock (``tombstones.lock``); it keeps the
newest :data:`MAX_TOMBSTONES` entries.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass, field

from ._format import Key, Labels
from ._fs import OPEN_FLAGS, Unreadable, read_small, write_file

TOMBSTONES = "tombstones.json"
TOMBSTONES_LOCK = "tombstones.lock"
MAX_TOMBSTONES = 10_000


@dataclass(frozen=True)
class Tombstones:
    """metric name -> [(label set or None for all, removed at)]."""

    by_metric: dict[str, list[tuple[Labels | None, float]]] = field(default_factory=dict)
    version: tuple[int, int, int] = (0, 0, 0)  # st_dev, st_ino, st_mtime_ns of the file

    def removed(self, key: Key, stamp: float) -> bool:
        """Whether the entry ``key`` stamped ``stamp`` was removed after it was written."""
        found = self.by_metric.get(key.metric)
        if not found:
            return False
        return any(stamp < when and (labels is None or labels == key.without_le)
                   for labels, when in found)


EMPTY = Tombstones()


def read_tombstones(directory: str, cached: Tombstones = EMPTY) -> Tombstones:
    """The tombstones of ``directory`` (``cached`` again if the file did not change)."""
    try:
        info = os.lstat(os.path.join(directory, TOMBSTONES))
    except OSError:
        return EMPTY
    version = (info.st_dev, info.st_ino, info.st_mtime_ns)
    if version == cached.version:
        return cached
    try:
        raw = read_small(directory, TOMBSTONES, limit=64 << 20)
        entries = json.loads(raw or b'{"tombstones": []}')["tombstones"]
        by_metric: dict[str, list[tuple[Labels | None, float]]] = {}
        for metric, labels, when in entries:
            parsed = None if labels is None else tuple(sorted(
                (str(k), str(v)) for k, v in labels.items() if k != "le"))
            by_metric.setdefault(str(metric), []).append((parsed, float(when)))
    except (Unreadable, ValueError, KeyError, TypeError, AttributeError):
        return EMPTY  # an unreadable tombstone file removes nothing
    return Tombstones(by_metric, version)


def add_tombstone(directory: str, metric: str, labels: dict[str, str] | None) -> float:
    """Record that ``labels`` of ``metric`` (all of them if None) are removed now."""
    when = time.time()
    fd = os.open(os.path.join(directory, TOMBSTONES_LOCK),
                 os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | OPEN_FLAGS, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            raw = read_small(directory, TOMBSTONES, limit=64 << 20)
            entries = json.loads(raw)["tombstones"] if raw else []
        except (Unreadable, ValueError, KeyError, TypeError):
            entries = []
        entries.append([metric, labels, when])
        body = json.dumps({"tombstones": entries[-MAX_TOMBSTONES:]}).encode()
        write_file(os.path.join(directory, TOMBSTONES), body, durable=False)
    finally:
        os.close(fd)
    return when
