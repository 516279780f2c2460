"""Self-metrics (``victor_metrics_*``): how the metrics system itself is doing.

Counters that must add up across processes (compactions, corrupt files, write errors)
are ordinary file-backed counters, so they survive the process that counted them; the
runtime creates them (:data:`COUNTERS`). The figures of one scrape (its duration, files
and bytes read) are gauges of the process answering it, computed at collection time.
"""

from __future__ import annotations

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

# name -> (metric name, help, label names)
COUNTERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "series_overflow": (
        "victor_metrics_series_overflow",
        "labels() calls folded into the __overflow__ series by the cardinality guard.",
        ("metric",),
    ),
    "compactions": ("victor_metrics_compactions", "Compactions that absorbed dead writers.", ()),
    "compaction_seconds": (
        "victor_metrics_compaction_seconds", "Time spent compacting, in seconds.", (),
    ),
    "writers_compacted": (
        "victor_metrics_writers_compacted",
        "Dead writer processes whose files were merged into the archive.", (),
    ),
    "corrupt_files": (
        "victor_metrics_corrupt_files",
        "Unreadable entries of the metrics directory skipped (and quarantined when their "
        "writer is dead): corrupt files, FIFOs, symlinks, directories, others' files.", (),
    ),
    "write_errors": (
        "victor_metrics_write_errors",
        "Failures to create or write metric files (values were kept in memory).", (),
    ),
    "hook_errors": (
        "victor_metrics_hook_errors",
        "Errors caught in Gunicorn hooks (logged; the arbiter kept running).", (),
    ),
}
OVERFLOW_METRIC = "victor_metrics_series_overflow_total"


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
