"""Real processes write to one directory; the aggregate of gather() is exact.

Workers are forked with multiprocessing's "fork" context after the metrics directory is
configured, as Gunicorn forks its workers, so each writes files of its own.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest

from victor_mp_metrics._exposition import gather
from victor_mp_metrics.catalog import get_catalog
from victor_mp_metrics.instrument import (
    record_cache_hit,
    record_cache_miss,
    record_request,
    track_llm_call,
    track_request_in_flight,
)
from victor_mp_metrics.registry import get_prometheus_registry

pytestmark = pytest.mark.filterwarnings("ignore:.*use of fork\\(\\):DeprecationWarning")

CTX = multiprocessing.get_context("fork")
WORKERS = 4
REQUESTS = 25
CHAT = (("endpoint", "/chat"), ("method", "POST"))


def _values() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in gather() for s in f.samples}


def _record(worker: int) -> None:
    """What every worker records, in amounts whose totals are known exactly."""
    for _ in range(REQUESTS):
        record_request("/chat", "POST", 200, 7.0)
    record_request("/chat", "POST", 503, 700.0)
    with track_llm_call("anthropic", "claude") as call:
        call.record_tokens(prompt=100, completion=10 * worker)
    record_cache_hit("tools", 3)
    record_cache_miss("tools")
    registry = get_prometheus_registry()
    registry.counter("custom_operations_total", "help", labels={"service": "svc"}).inc(worker)
    registry.histogram("custom_op_ms", "help", buckets=(10, 100)).observe(50)


def _start(target: object, *args: object) -> multiprocessing.process.BaseProcess:
    process = CTX.Process(target=target, args=args)  # type: ignore[attr-defined]
    process.start()
    return process


def test_counters_and_histograms_add_up(metrics_dir: Path) -> None:
    """Counters, histogram buckets, _count and _sum, and custom metrics sum over all workers."""
    workers = [_start(_record, n) for n in range(1, WORKERS + 1)]
    for w in workers:
        w.join(30)
    assert [0] * WORKERS == [w.exitcode for w in workers]
    values = _values()
    n = WORKERS * REQUESTS
    assert n + WORKERS == values[("victor_requests_total", CHAT)]
    errors = (("endpoint", "/chat"), ("error_type", "unavailable"), ("method", "POST"))
    assert WORKERS == values[("victor_request_errors_total", errors)]
    bucket = "victor_request_duration_ms_bucket"
    assert 0.0 == values[(bucket, (("endpoint", "/chat"), ("le", "5.0"), ("method", "POST")))]
    assert n == values[(bucket, (("endpoint", "/chat"), ("le", "10.0"), ("method", "POST")))]
    assert n == values[(bucket, (("endpoint", "/chat"), ("le", "500.0"), ("method", "POST")))]
    assert (
        n + WORKERS
        == values[(bucket, (("endpoint", "/chat"), ("le", "1000.0"), ("method", "POST")))]
    )
    assert (
        n + WORKERS == values[(bucket, (("endpoint", "/chat"), ("le", "+Inf"), ("method", "POST")))]
    )
    assert n + WORKERS == values[("victor_request_duration_ms_count", CHAT)]
    assert n * 7.0 + WORKERS * 700.0 == values[("victor_request_duration_ms_sum", CHAT)]
    llm = (("model", "claude"), ("provider", "anthropic"))
    assert WORKERS == values[("victor_llm_requests_total", llm)]
    assert 100.0 * WORKERS == values[("victor_llm_tokens_total", (*llm, ("type", "prompt")))]
    assert 100.0 == values[("victor_llm_tokens_total", (*llm, ("type", "completion")))]
    assert 0.75 == values[("victor_cache_hit_rate", (("cache_name", "tools"),))]
    assert 10.0 == values[("custom_operations_total", (("service", "svc"),))]
    assert WORKERS == values[("custom_op_ms_bucket", (("le", "100.0"),))]
    assert 0.0 == values[("custom_op_ms_bucket", (("le", "10.0"),))]
    assert 50.0 * WORKERS == values[("custom_op_ms_sum", ())]


def _gauges(
    cache: float, memory: float, cpu: float, connections: int, queue: float,
    ready: Event, stop: Event | None,
) -> None:  # fmt: skip
    """Set this worker's gauges and counters, signal ready, then live until told to stop."""
    catalog = get_catalog()
    catalog.cache_size_bytes.labels("c").set(cache)
    catalog.coordinator_memory_bytes.labels("X").set(memory)
    catalog.coordinator_cpu_percent.labels("X").set(cpu)
    get_prometheus_registry().gauge("queue_size", "help").set(queue)
    catalog.cache_hits_total.labels("c").inc()
    with track_request_in_flight():
        catalog.active_connections.inc(connections - 1)
        ready.set()
        if stop is not None:
            stop.wait(30)
    os._exit(0)


def _live(values: dict) -> tuple[float | None, ...]:
    return (
        values.get(("victor_cache_size_bytes", (("cache_name", "c"),))),
        values.get(("victor_coordinator_memory_bytes", (("coordinator_name", "X"),))),
        values.get(("victor_coordinator_cpu_percent", (("coordinator_name", "X"),))),
        values.get(("victor_active_connections", ())),
        values.get(("queue_size", ())),
    )


def test_live_gauges_count_live_processes_only(metrics_dir: Path) -> None:
    """livesum, livemax and livemostrecent gauges drop a process once it exits or is killed."""
    events = [(CTX.Event(), CTX.Event()) for _ in range(2)]
    a = _start(_gauges, 100.0, 3000.0, 40.0, 1, 1.0, *events[0])
    assert events[0][0].wait(10)
    b = _start(_gauges, 50.0, 5000.0, 60.0, 2, 2.0, *events[1])
    assert events[1][0].wait(10)
    # Exits at once, after setting the largest and the most recent values.
    dead_ready = CTX.Event()
    dead = _start(_gauges, 1000.0, 9000.0, 90.0, 5, 7.0, dead_ready, None)
    dead.join(30)
    assert 0 == dead.exitcode

    values = _values()
    assert (150.0, 5000.0, 60.0, 3.0, 3.0) == _live(values)
    assert 3.0 == values[("victor_cache_hits_total", (("cache_name", "c"),))]

    os.kill(b.pid, signal.SIGKILL)  # type: ignore[arg-type]
    b.join(30)
    values = _values()
    assert (100.0, 3000.0, 40.0, 1.0, 1.0) == _live(values)
    assert 3.0 == values[("victor_cache_hits_total", (("cache_name", "c"),))]

    events[0][1].set()
    a.join(30)
    assert 0 == a.exitcode
    values = _values()
    assert (None, None, None, None, None) == _live(values)
    assert 3.0 == values[("victor_cache_hits_total", (("cache_name", "c"),))]
