"""How the values of several files combine: the one merge rule of reader and compactor.

As prometheus_client's ``MultiProcessCollector.merge``: counters, histograms, summaries
and ``sum``/``livesum`` gauges add up; ``max``/``min`` gauges keep the extreme;
``mostrecent`` gauges keep the value with the newest timestamp (ties: the first seen;
never set: absent);
``all``/``liveall`` gauges are one series per process (the reader adds a ``pid`` label,
so they never meet here). When a writer dies, its ``live*`` and ``all`` gauges describe
a process that no longer exists: they are dropped, never archived (:func:`archived`).
"""

from __future__ import annotations

import math
from typing import Final, TypeVar

SUM: Final = 0
MAX: Final = 1
MIN: Final = 2
RECENT: Final = 3

_K = TypeVar("_K")


def rule_of(mode: str) -> int:
    """The rule for a file kind's gauge ``mode`` ("" for counters, histograms, summaries)."""
    mode = mode.removeprefix("live")
    if mode == "max":
        return MAX
    if mode == "min":
        return MIN
    if mode in ("mostrecent", "info", "stateset"):
        return RECENT
    return SUM


def archived(mode: str) -> bool:
    """Whether a dead writer's values of this gauge ``mode`` are kept in the archive."""
    return not (mode.startswith("live") or mode == "all")


def merge(
    into: dict[_K, tuple[float, float]], key: _K, value: float, timestamp: float, rule: int
) -> None:
    """Combine (``value``, ``timestamp``) into ``into[key]`` by ``rule``."""
    current = into.get(key)
    if current is None:
        if rule != RECENT or timestamp > 0.0:  # a never-set mostrecent gauge has no value
            into[key] = (value, timestamp)
    elif rule == SUM:  # the stamp of a sum is its earliest creation (``_created``)
        stamp = timestamp if 0.0 < timestamp < current[1] or current[1] <= 0.0 else current[1]
        into[key] = (current[0] + value, stamp)
    elif rule == MAX:
        if value > current[0]:
            into[key] = (value, timestamp)
    elif rule == MIN:
        if value < current[0]:
            into[key] = (value, timestamp)
    elif timestamp > current[1]:  # RECENT
        into[key] = (value, timestamp)


PER_MS: Final = 1024.0  # on_grid's steps per unit: about 1 us for ms and for seconds
PER_SECOND: Final = 2.0**20


def on_grid(value: float, per_unit: float = PER_MS) -> float:
    """``value`` floored to a multiple of ``1/per_unit`` (a power of two). Float addition
    is not associative, and compaction regroups a sum's terms (dead writers' values move
    into the archive), so a total of arbitrary floats can read 1 ulp lower after it: a
    counter decrease, which Prometheus takes for a reset. Sums of values on one binary
    grid are exact in any grouping (below 2**53 grid steps), so the library's own
    non-integral counters (CPU seconds, durations) are written on one. Non-finite values
    are returned as they are."""
    if value - value != 0.0:  # inf or NaN
        return value
    return math.floor(value * per_unit) / per_unit
