"""Tests of victor_mp_metrics.collector: the guide's MetricsCollector and its summary."""

from __future__ import annotations

import math
import multiprocessing
from pathlib import Path

import pytest

from victor_mp_metrics import _runtime
from victor_mp_metrics.collector import MetricsCollector, quantile
from victor_mp_metrics.exceptions import LabelError

pytestmark = pytest.mark.filterwarnings("ignore:.*use of fork\\(\\):DeprecationWarning")

ZERO = {
    "tool_calls": 0.0,
    "tool_errors": 0.0,
    "tool_error_rate": 0.0,
    "model_requests": 0.0,
    "model_errors": 0.0,
    "model_error_rate": 0.0,
    "model_latency_count": 0.0,
    "model_latency_sum_ms": 0.0,
    "model_latency_avg_ms": 0.0,
    "model_latency_p50_ms": 0.0,
    "model_latency_p95_ms": 0.0,
}


def _value(name: str, **labels: str) -> float | None:
    return _runtime.local_registry().get_sample_value(name, labels)


def test_guide_snippet() -> None:
    """The guide's calls record into the catalog and the summary reports them exactly."""
    collector = MetricsCollector()
    collector.tool_calls.increment()
    collector.model_requests.increment(labels={"provider": "anthropic"})
    collector.model_latency.observe(45.2)
    summary = collector.get_summary()
    # 45.2 ms lies in the first LLM bucket (0, 50]: p50 = 25, p95 = 47.5 by interpolation.
    assert {
        **ZERO,
        "tool_calls": 1.0,
        "model_requests": 1.0,
        "model_latency_count": 1.0,
        "model_latency_sum_ms": 45.2,
        "model_latency_avg_ms": 45.2,
        "model_latency_p50_ms": 25.0,
        "model_latency_p95_ms": 47.5,
    } == summary


def test_default_labels() -> None:
    """Labels not given take their defaults: unknown, and status success for tool calls."""
    collector = MetricsCollector()
    collector.tool_calls.increment()
    collector.model_requests.increment(labels={"provider": "anthropic"})
    collector.model_errors.increment(labels={"error_type": "timeout"})
    assert 1.0 == _value("victor_tool_executions_total", tool_name="unknown", status="success")
    assert 1.0 == _value("victor_llm_requests_total", provider="anthropic", model="unknown")
    assert 1.0 == _value(
        "victor_llm_errors_total", provider="unknown", model="unknown", error_type="timeout"
    )


def test_error_rates() -> None:
    """Error rates are errors / calls over all label values."""
    collector = MetricsCollector()
    collector.tool_calls.increment(3, labels={"tool_name": "read_file"})
    collector.tool_calls.increment(labels={"tool_name": "grep", "status": "error"})
    collector.tool_errors.increment(labels={"tool_name": "grep"})
    collector.model_requests.increment(8)
    collector.model_errors.increment(2)
    summary = collector.get_summary()
    assert (4.0, 1.0, 0.25) == (
        summary["tool_calls"],
        summary["tool_errors"],
        summary["tool_error_rate"],
    )
    assert (8.0, 2.0, 0.25) == (
        summary["model_requests"],
        summary["model_errors"],
        summary["model_error_rate"],
    )


def test_unknown_label_is_refused() -> None:
    """A label the metric does not have raises LabelError listing the valid ones."""
    with pytest.raises(LabelError) as err:
        MetricsCollector().model_requests.increment(labels={"region": "eu"})
    assert (
        "victor_llm_requests_total: unknown label(s) ['region']; valid labels are provider, "
        "model (defaults {'provider': 'unknown', 'model': 'unknown'})"
    ) == str(err.value)


def test_empty_summary_is_all_zero() -> None:
    """Before anything is recorded every figure is 0.0."""
    assert ZERO == MetricsCollector().get_summary()


def test_quantile_estimation() -> None:
    """quantile() interpolates inside a bucket and stops at the last finite bound for +Inf."""
    buckets = [(10.0, 2.0), (100.0, 6.0), (math.inf, 8.0)]
    assert 10.0 == quantile(0.25, buckets)
    assert 55.0 == quantile(0.5, buckets)
    assert 100.0 == quantile(0.95, buckets)
    assert 0.0 == quantile(0.5, [])


def _record_in_child() -> None:
    collector = MetricsCollector()
    collector.tool_calls.increment(2)
    collector.model_requests.increment()
    collector.model_latency.observe(40.0)


def test_multiprocess_summary_is_deployment_wide(metrics_dir: Path) -> None:
    """In multiprocess mode the summary adds up every process, including exited ones."""
    ctx = multiprocessing.get_context("fork")
    children = [ctx.Process(target=_record_in_child) for _ in range(3)]
    for child in children:
        child.start()
    for child in children:
        child.join()
    assert [0, 0, 0] == [c.exitcode for c in children]
    MetricsCollector().tool_calls.increment()
    summary = MetricsCollector().get_summary()
    assert (7.0, 3.0, 3.0, 120.0) == (
        summary["tool_calls"],
        summary["model_requests"],
        summary["model_latency_count"],
        summary["model_latency_sum_ms"],
    )


def test_disabled_collector(metrics_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Disabled: recording is a no-op, the summary is all zero, no file is written."""
    monkeypatch.setenv("VICTOR_METRICS_ENABLED", "false")
    _runtime.reset()
    collector = MetricsCollector()
    collector.tool_calls.increment()
    collector.tool_errors.increment()
    collector.model_requests.increment(labels={"provider": "x"})
    collector.model_errors.increment()
    collector.model_latency.observe(3.0)
    assert ZERO == collector.get_summary()
    assert [] == list(metrics_dir.iterdir())
