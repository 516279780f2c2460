"""Tests of victor_mp_metrics.instrument: the helpers application code calls."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from victor_mp_metrics import _metrics, _runtime, instrument
from victor_mp_metrics._exposition import gather
from victor_mp_metrics.catalog import get_catalog
from victor_mp_metrics.collector import MetricsCollector
from victor_mp_metrics.instrument import (
    record_cache_hit,
    record_cache_miss,
    record_request,
    set_cache_size,
    track_coordinator,
    track_llm_call,
    track_request_in_flight,
    track_tool,
)
from victor_mp_metrics.registry import get_prometheus_registry


def _value(name: str, **labels: str) -> float | None:
    return _runtime.local_registry().get_sample_value(name, labels)


class RateLimited(Exception):
    """An exception that says its error type."""

    error_type = "rate_limit"


LLM = {"provider": "anthropic", "model": "claude"}


def test_llm_call_success() -> None:
    """A successful call counts one request, one duration and its tokens, and no error."""
    with track_llm_call("anthropic", "claude") as call:
        call.record_tokens(prompt=120, completion=30)
    assert 1.0 == _value("victor_llm_requests_total", **LLM)
    assert 1.0 == _value("victor_llm_duration_ms_count", **LLM)
    assert 120.0 == _value("victor_llm_tokens_total", **LLM, type="prompt")
    assert 30.0 == _value("victor_llm_tokens_total", **LLM, type="completion")
    assert None is _value("victor_llm_errors_total", **LLM, error_type="rate_limit")


def test_llm_call_fail_without_exception() -> None:
    """fail(error_type) records the error while the body returns normally."""
    with track_llm_call("anthropic", "claude") as call:
        call.fail("timeout")
    assert 1.0 == _value("victor_llm_errors_total", **LLM, error_type="timeout")
    assert 1.0 == _value("victor_llm_requests_total", **LLM)


def test_llm_call_exception_error_type() -> None:
    """An exception's error_type attribute, else its class name, is recorded; it re-raises."""
    with pytest.raises(RateLimited), track_llm_call("anthropic", "claude"):
        raise RateLimited()
    with pytest.raises(TimeoutError), track_llm_call("anthropic", "claude"):
        raise TimeoutError()
    assert 1.0 == _value("victor_llm_errors_total", **LLM, error_type="rate_limit")
    assert 1.0 == _value("victor_llm_errors_total", **LLM, error_type="TimeoutError")
    assert 2.0 == _value("victor_llm_duration_ms_count", **LLM)


def test_llm_duration_is_in_milliseconds() -> None:
    """The observed duration is the body's wall time in milliseconds."""
    with track_llm_call("anthropic", "claude"):
        time.sleep(0.02)
    assert 20.0 <= _value("victor_llm_duration_ms_sum", **LLM) < 200.0  # type: ignore[operator]


def test_tool_status_and_errors() -> None:
    """Tools count success and error separately; errors carry their type."""
    with track_tool("read_file"):
        pass
    with pytest.raises(FileNotFoundError), track_tool("read_file"):
        raise FileNotFoundError()
    with track_tool("read_file") as run:
        run.fail("denied")
    assert 1.0 == _value("victor_tool_executions_total", tool_name="read_file", status="success")
    assert 2.0 == _value("victor_tool_executions_total", tool_name="read_file", status="error")
    assert 1.0 == _value(
        "victor_tool_errors_total", tool_name="read_file", error_type="FileNotFoundError"
    )
    assert 1.0 == _value("victor_tool_errors_total", tool_name="read_file", error_type="denied")
    assert 3.0 == _value("victor_tool_duration_ms_count", tool_name="read_file")


def test_cache_helpers() -> None:
    """Hits and misses are counted; the size is set."""
    record_cache_hit("tool_selection")
    record_cache_hit("tool_selection", 8)
    record_cache_miss("tool_selection")
    set_cache_size("tool_selection", 1048576)
    assert 9.0 == _value("victor_cache_hits_total", cache_name="tool_selection")
    assert 1.0 == _value("victor_cache_misses_total", cache_name="tool_selection")
    assert 1048576.0 == _value("victor_cache_size_bytes", cache_name="tool_selection")


def test_coordinator_run() -> None:
    """A run counts, times in seconds, sets the process's RSS and a CPU percent in 0..100."""
    with track_coordinator("ToolCoordinator"):
        sum(range(10000))
    with pytest.raises(ValueError), track_coordinator("ToolCoordinator"):
        raise ValueError()
    name = {"coordinator_name": "ToolCoordinator"}
    assert 2.0 == _value("victor_coordinator_executions_total", **name)
    assert 2.0 == _value("victor_coordinator_duration_seconds_count", **name)
    assert 1.0 == _value("victor_coordinator_errors_total", **name)
    rss = psutil.Process().memory_info().rss
    assert abs(rss - _value("victor_coordinator_memory_bytes", **name)) < 2**22  # type: ignore[operator]
    cpu = _value("victor_coordinator_cpu_percent", **name)
    assert cpu is not None and 0.0 <= cpu <= 100.0


def test_coordinator_cpu_is_thread_time_over_wall_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU percent = the thread's CPU time / the run's wall time x 100."""
    wall = iter([10.0, 10.5])
    cpu = iter([1.0, 1.25])
    monkeypatch.setattr(instrument, "_perf", lambda: next(wall))
    monkeypatch.setattr(instrument.time, "thread_time", lambda: next(cpu))
    with track_coordinator("Busy"):
        pass
    assert 50.0 == _value("victor_coordinator_cpu_percent", coordinator_name="Busy")
    assert 0.5 == _value("victor_coordinator_duration_seconds_sum", coordinator_name="Busy")


def test_request_in_flight() -> None:
    """The in-flight gauge is 1 inside, and back to 0 after normal and exceptional exits."""
    with track_request_in_flight():
        assert 1.0 == _value("victor_active_connections")
    with pytest.raises(RuntimeError), track_request_in_flight():
        raise RuntimeError()
    assert 0.0 == _value("victor_active_connections")


@pytest.mark.parametrize(
    ("status", "error_type", "recorded"),
    [(200, None, None), (404, None, "not_found"), (429, None, "rate_limit"),
     (503, None, "unavailable"),
     (200, "validation", "validation")],
)  # fmt: skip
def test_record_request(status: int, error_type: str | None, recorded: str | None) -> None:
    """Requests are counted and timed; errors for an explicit type, 429 and 5xx."""
    record_request("/chat", "POST", status, 80.0, error_type=error_type)
    assert 1.0 == _value("victor_requests_total", endpoint="/chat", method="POST")
    assert 1.0 == _value(
        "victor_request_duration_ms_bucket", endpoint="/chat", method="POST", le="100.0"
    )
    errors = {
        s.labels["error_type"]: s.value
        for f in _runtime.local_registry().collect()
        for s in f.samples
        if s.name == "victor_request_errors_total"
    }
    assert ({} if recorded is None else {recorded: 1.0}) == errors


def test_helpers_reuse_cached_children(monkeypatch: pytest.MonkeyPatch) -> None:
    """After the first call, helpers find label children without validating again."""
    record_cache_hit("c")
    record_request("/a", "GET", 200, 1.0)

    def fail(*args: object) -> str:
        raise AssertionError("validated again")

    monkeypatch.setattr(_metrics, "label_value", fail)
    record_cache_hit("c")
    record_request("/a", "GET", 200, 1.0)
    assert 2.0 == _value("victor_cache_hits_total", cache_name="c")


def test_bad_label_value_from_helper() -> None:
    """A helper given a bad label value raises the metric's LabelError."""
    with pytest.raises(Exception, match="label 'cache_name' must be a str"):
        record_cache_hit(None)  # type: ignore[arg-type]


def test_multiprocess_helpers_reach_the_aggregate(metrics_dir: Path) -> None:
    """In multiprocess mode helper records are read back by gather()."""
    record_cache_hit("t")
    record_cache_miss("t")
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in gather() for s in f.samples
    }
    assert 0.5 == values[("victor_cache_hit_rate", (("cache_name", "t"),))]


def test_disabled_every_api_is_callable(metrics_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Disabled: every helper, the catalog, registry and collector work and write no file."""
    monkeypatch.setenv("VICTOR_METRICS_ENABLED", "false")
    _runtime.reset()
    with track_llm_call("p", "m") as call:
        call.record_tokens(prompt=1, completion=2)
        call.fail("x")
    with pytest.raises(KeyError), track_tool("t"):
        raise KeyError()
    with track_coordinator("c"), track_request_in_flight():
        pass
    record_cache_hit("c")
    record_cache_miss("c")
    set_cache_size("c", 1)
    record_request("/", "GET", 500, 1.0)
    get_catalog().requests_total.labels("/", "GET").inc()
    get_prometheus_registry().counter("z_total", "h", labels={"a": "b"}).inc()
    MetricsCollector().tool_calls.increment()
    assert 0.0 == MetricsCollector().get_summary()["tool_calls"]
    assert [] == gather()
    assert [] == list(metrics_dir.iterdir())
    assert instrument.error_type_of(KeyError()) == "KeyError"


def test_record_request_and_flask_share_one_error_type_rule() -> None:
    """For 400, 404, 408, 429, 500, 503, 504 record_request and the Flask extension record
    the same error_type (one rule: instrument.error_type_for_status)."""
    from flask import Flask

    from victor_mp_metrics import _runtime, gather
    from victor_mp_metrics.flask_ext import VictorMetrics

    statuses = (400, 404, 408, 429, 500, 503, 504)

    def error_types() -> dict[str, str]:
        return {s.labels["endpoint"]: s.labels["error_type"]
                for family in gather() for s in family.samples
                if s.name == "victor_request_errors_total"}

    for status in statuses:
        record_request(f"/s{status}", "GET", status, 1.0)
    direct = error_types()
    _runtime.reset()
    app = Flask(__name__)
    VictorMetrics(app)
    for status in statuses:
        app.add_url_rule(f"/s{status}", f"s{status}", lambda code=status: ("", code))
    client = app.test_client()
    for status in statuses:
        client.get(f"/s{status}", buffered=True)
    assert {"/s400": "bad_request", "/s404": "not_found", "/s408": "timeout",
            "/s429": "rate_limit", "/s500": "server_error", "/s503": "unavailable",
            "/s504": "timeout"} == direct
    assert direct == error_types()
