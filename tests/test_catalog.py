"""Tests of victor_mp_metrics.catalog: the guide's table and the per-process Catalog."""

from __future__ import annotations

import threading
from dataclasses import fields
from pathlib import Path

import pytest

from victor_mp_metrics import _runtime
from victor_mp_metrics._metrics import NoopMetric
from victor_mp_metrics.catalog import (
    CATALOG,
    Catalog,
    catalog_table_markdown,
    get_catalog,
    written_specs,
)

GUIDE = [
    ("victor_requests_total", "counter", ("endpoint", "method")),
    ("victor_request_duration_ms", "histogram", ("endpoint", "method")),
    ("victor_request_errors_total", "counter", ("endpoint", "method", "error_type")),
    ("victor_llm_requests_total", "counter", ("provider", "model")),
    ("victor_llm_duration_ms", "histogram", ("provider", "model")),
    ("victor_llm_tokens_total", "counter", ("provider", "model", "type")),
    ("victor_llm_errors_total", "counter", ("provider", "model", "error_type")),
    ("victor_tool_executions_total", "counter", ("tool_name", "status")),
    ("victor_tool_duration_ms", "histogram", ("tool_name",)),
    ("victor_tool_errors_total", "counter", ("tool_name", "error_type")),
    ("victor_cache_hits_total", "counter", ("cache_name",)),
    ("victor_cache_misses_total", "counter", ("cache_name",)),
    ("victor_cache_hit_rate", "gauge", ("cache_name",)),
    ("victor_cache_size_bytes", "gauge", ("cache_name",)),
    ("victor_coordinator_executions_total", "counter", ("coordinator_name",)),
    ("victor_coordinator_duration_seconds", "histogram", ("coordinator_name",)),
    ("victor_coordinator_errors_total", "counter", ("coordinator_name",)),
    ("victor_coordinator_memory_bytes", "gauge", ("coordinator_name",)),
    ("victor_coordinator_cpu_percent", "gauge", ("coordinator_name",)),
    ("victor_system_cpu_percent", "gauge", ()),
    ("victor_system_memory_bytes", "gauge", ("type",)),
    ("victor_system_uptime_seconds", "gauge", ()),
    ("victor_active_connections", "gauge", ()),
]
# Kept by the Gunicorn master (issue 15), after the guide's rows.
SERVER = [
    ("gunicorn_workers", "gauge", ()),
    ("gunicorn_workers_desired", "gauge", ()),
    ("gunicorn_worker_exits_total", "counter", ("reason",)),
    ("gunicorn_worker_age_seconds", "histogram", ()),
    ("gunicorn_worker_memory_bytes", "gauge", ("stat",)),
    ("gunicorn_master_signals_total", "counter", ("signal",)),
    ("gunicorn_reloads_total", "counter", ()),
    ("gunicorn_backlog", "gauge", ()),
]


def test_table_matches_the_guide() -> None:
    """The catalog has exactly the guide's metric names, types and label names, in order,
    then the Gunicorn master's."""
    assert GUIDE + SERVER == [(s.name, s.kind, s.labels) for s in CATALOG]


def test_sources_and_gauge_modes() -> None:
    """Hit rate is derived, system gauges are measured, written gauges carry their mode."""
    sources = {s.name: (s.source, s.mode) for s in CATALOG if s.kind == "gauge"}
    assert {
        "victor_cache_hit_rate": ("derived", None),
        "victor_cache_size_bytes": ("process", "livesum"),
        "victor_coordinator_memory_bytes": ("process", "livemax"),
        "victor_coordinator_cpu_percent": ("process", "livemostrecent"),
        "victor_system_cpu_percent": ("system", None),
        "victor_system_memory_bytes": ("system", None),
        "victor_system_uptime_seconds": ("system", None),
        "victor_active_connections": ("process", "livesum"),
        "gunicorn_workers": ("server", "livesum"),
        "gunicorn_workers_desired": ("server", "livesum"),
        "gunicorn_worker_memory_bytes": ("server", "livemax"),
        "gunicorn_backlog": ("server", "livemax"),
    } == sources


def test_buckets_fit_units() -> None:
    """Histogram buckets contain the bounds the guide's examples show, in the metric's unit."""
    buckets = {s.name: s.buckets for s in CATALOG if s.kind == "histogram"}
    assert 100 in buckets["victor_request_duration_ms"]
    assert 1000 in buckets["victor_llm_duration_ms"]
    assert 50 in buckets["victor_tool_duration_ms"]
    assert 1 in buckets["victor_coordinator_duration_seconds"]
    assert 60 == max(buckets["victor_coordinator_duration_seconds"])  # type: ignore[arg-type]


def test_catalog_fields_are_the_written_rows() -> None:
    """Catalog has one attribute per written row, named after the metric without victor_."""
    assert [s.attr for s in written_specs()] == [f.name for f in fields(Catalog)]


def test_exposed_names_are_the_guides() -> None:
    """Every written metric exposes samples under exactly the guide's name."""
    catalog = get_catalog()
    for spec in written_specs():
        metric = getattr(catalog, spec.attr)
        child = metric.labels(*("x" for _ in spec.labels)) if spec.labels else metric
        if spec.kind == "histogram":
            child.observe(1)
        elif spec.kind == "counter" or spec.mode == "livesum":
            child.inc()
        else:
            child.set(1)
    exposed = {s.name for f in _runtime.local_registry().collect() for s in f.samples}
    for spec in written_specs():
        sample = spec.name + "_bucket" if spec.kind == "histogram" else spec.name
        assert sample in exposed, sample


def test_get_catalog_is_one_object_per_process() -> None:
    """Concurrent first calls all get the same Catalog; reset() drops it."""
    found: list[Catalog] = []
    threads = [threading.Thread(target=lambda: found.append(get_catalog())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 1 == len({id(c) for c in found})
    _runtime.reset()
    assert found[0] is not get_catalog()


def test_disabled_catalog_is_noop(metrics_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With metrics disabled every attribute is a no-op and no file is written."""
    monkeypatch.setenv("VICTOR_METRICS_ENABLED", "false")
    _runtime.reset()
    catalog = get_catalog()
    assert all(isinstance(getattr(catalog, f.name), NoopMetric) for f in fields(Catalog))
    catalog.requests_total.labels("/", "GET").inc()
    assert [] == sorted(p.name for p in metrics_dir.iterdir())


def test_multiprocess_catalog_writes_files(metrics_dir: Path) -> None:
    """In multiprocess mode the catalog's metrics write this process's files."""
    get_catalog().requests_total.labels("/", "GET").inc()
    assert any(p.name.startswith("counter_") for p in metrics_dir.iterdir())


def test_table_markdown() -> None:
    """The generated table has a header and one row per catalog entry."""
    lines = catalog_table_markdown().splitlines()
    assert "| Metric | Type | Labels | Across processes | Description |" == lines[0]
    assert len(CATALOG) + 2 == len(lines)
    assert (
        "| `victor_cache_size_bytes` | Gauge | cache_name | livesum: each process sets the size "
        "of its own cache; the sum over live processes | Cache size in bytes |"
    ) == lines[2 + 13]
