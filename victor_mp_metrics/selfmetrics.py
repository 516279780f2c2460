"""Self-metrics (``victor_metrics_*``): how the metrics system itself is doing.

Counters that must add up across processes (compactions, corrupt files, write errors)
are ordinary file-backed counters, so they survive the process that counted them. The
figures of one scrape (its duration, files and bytes read) are gauges of the process
answering it, computed at collection time.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import Counter
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from . import _state

_lock = threading.Lock()
_counters: dict[str, Any] = {}

_DEFINITIONS: dict[str, tuple[str, str] | tuple[str, str, tuple[str, ...]]] = {
    "series_overflow": (
        "victor_metrics_series_overflow",
        "labels() calls folded into the __overflow__ series by the cardinality guard.",
        ("metric",),
    ),
    "compactions": ("victor_metrics_compactions", "Compactions that absorbed dead writers."),
    "compaction_seconds": (
        "victor_metrics_compaction_seconds",
        "Time spent compacting, in seconds.",
    ),
    "writers_compacted": (
        "victor_metrics_writers_compacted",
        "Dead writer processes whose files were merged into the archive.",
    ),
    "corrupt_files": (
        "victor_metrics_corrupt_files",
        "Unreadable metric files skipped (and quarantined when their writer is dead).",
    ),
    "write_errors": (
        "victor_metrics_write_errors",
        "Failures to create or write metric files (values were kept in memory).",
    ),
    "hook_errors": (
        "victor_metrics_hook_errors",
        "Errors caught in Gunicorn hooks (logged; the arbiter kept running).",
    ),
}


def counter(name: str) -> Any:
    """The self-metric counter ``name`` (a key of the definitions), created on first use."""
    found = _counters.get(name)
    if found is not None:
        return found
    with _lock:
        found = _counters.get(name)
        if found is None:
            metric_name, doc, *labels = _DEFINITIONS[name]
            _state.get_settings()
            found = _counters[name] = Counter(
                metric_name, doc, labels[0] if labels else (), registry=_state.local_registry()
            )
        return found


def create_all() -> None:
    """Create every self-metric counter now, so each series starts at 0 (rate() sees the first)."""
    for name, definition in _DEFINITIONS.items():
        if len(definition) == 2:  # labelled counters have no series until first use
            counter(name)


def scrape_families(duration: float, files: int, nbytes: int) -> list[Metric]:
    """Gauges describing the scrape just answered by this process."""
    return [
        GaugeMetricFamily(
            "victor_metrics_scrape_duration_seconds",
            "Time this process took to aggregate the metrics directory for the last scrape.",
            value=duration,
        ),
        GaugeMetricFamily(
            "victor_metrics_files_read", "Metric files read by the last scrape.", value=files
        ),
        GaugeMetricFamily(
            "victor_metrics_bytes_read", "Bytes of metric files read by the last scrape.",
            value=nbytes,
        ),
    ]


@_state.on_reset
def _reset() -> None:
    _counters.clear()
