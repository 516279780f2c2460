"""``MetricsCollector``: the guide's simple recording API, mapped onto catalog metrics.

    collector = MetricsCollector()
    collector.tool_calls.increment()
    collector.model_requests.increment(labels={"provider": "anthropic"})
    collector.model_latency.observe(45.2)
    summary = collector.get_summary()

Each attribute records into one catalog metric, with defaults for the labels not given:

==================  ==============================  ==========================================
attribute           catalog metric                  labels (default)
==================  ==============================  ==========================================
``tool_calls``      victor_tool_executions_total    tool_name ("unknown"), status ("success")
``tool_errors``     victor_tool_errors_total        tool_name ("unknown"), error_type ("unknown")
``model_requests``  victor_llm_requests_total       provider ("unknown"), model ("unknown")
``model_errors``    victor_llm_errors_total         provider, model, error_type ("unknown")
``model_latency``   victor_llm_duration_ms          provider ("unknown"), model ("unknown")
==================  ==============================  ==========================================

:meth:`MetricsCollector.get_summary` reads the catalog metrics of the whole deployment
(every worker, live and dead, in multiprocess mode), not only what this object recorded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import Metric

from . import _runtime
from ._exposition import gather
from .catalog import get_catalog
from .exceptions import LabelError


class _Recorder:
    """One catalog metric with default label values."""

    __slots__ = ("_attr", "_default_values", "_defaults", "_name_set", "_names")

    def __init__(self, attr: str, defaults: Mapping[str, str]) -> None:
        self._attr = attr
        self._defaults = dict(defaults)
        self._names = tuple(defaults)
        self._name_set = frozenset(defaults)
        self._default_values = tuple(defaults.values())

    def _child(self, labels: Mapping[str, Any] | None) -> Any:
        metric = getattr(get_catalog(), self._attr)
        if not labels:
            return metric.labels(*self._default_values)
        if not labels.keys() <= self._name_set:
            unknown = sorted(set(labels) - self._name_set)
            raise LabelError(
                f"victor_{self._attr}: unknown label(s) {unknown}; valid labels are "
                f"{', '.join(self._names)} (defaults {self._defaults})"
            )
        return metric.labels(*[labels.get(n, d) for n, d in self._defaults.items()])


class CounterRecorder(_Recorder):
    """Counts into a catalog counter."""

    __slots__ = ()

    def increment(self, amount: float = 1, labels: Mapping[str, Any] | None = None) -> None:
        """Add ``amount`` (default 1); ``labels`` override the default label values."""
        self._child(labels).inc(amount)


class HistogramRecorder(_Recorder):
    """Observes into a catalog histogram."""

    __slots__ = ()

    def observe(self, value: float, labels: Mapping[str, Any] | None = None) -> None:
        """Record one observation (milliseconds); ``labels`` override the defaults."""
        self._child(labels).observe(value)


class MetricsCollector:
    """Records tool and model metrics and summarises them; cheap to create, stateless."""

    # The recorders hold no state of their own, so every collector shares them.
    tool_calls = CounterRecorder(
        "tool_executions_total", {"tool_name": "unknown", "status": "success"}
    )
    tool_errors = CounterRecorder(
        "tool_errors_total", {"tool_name": "unknown", "error_type": "unknown"}
    )
    model_requests = CounterRecorder(
        "llm_requests_total", {"provider": "unknown", "model": "unknown"}
    )
    model_errors = CounterRecorder(
        "llm_errors_total", {"provider": "unknown", "model": "unknown", "error_type": "unknown"}
    )
    model_latency = HistogramRecorder(
        "llm_duration_ms", {"provider": "unknown", "model": "unknown"}
    )

    def get_summary(self) -> dict[str, float]:
        """Deployment-wide totals and rates.

        Keys: ``tool_calls``, ``tool_errors``, ``tool_error_rate``, ``model_requests``,
        ``model_errors``, ``model_error_rate`` (0 when nothing was counted),
        ``model_latency_count``, ``model_latency_sum_ms``, ``model_latency_avg_ms``,
        ``model_latency_p50_ms``, ``model_latency_p95_ms`` (estimated from the buckets by
        linear interpolation like PromQL's ``histogram_quantile``; 0 without observations).
        """
        settings = _runtime.get_settings()
        families: list[Metric] = []
        if settings.enabled:
            get_catalog()
            if settings.multiprocess:
                families = gather(settings)
            else:
                families = list(_runtime.local_registry().collect())
        return summarize(families)


def _total(families: Iterable[Metric], sample_name: str) -> float:
    return sum((s.value for f in families for s in f.samples if s.name == sample_name), 0.0)


def _buckets(families: Iterable[Metric], sample_name: str) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) pairs summed over every label set."""
    merged: dict[float, float] = {}
    for family in families:
        for s in family.samples:
            if s.name == sample_name:
                bound = float(s.labels["le"])
                merged[bound] = merged.get(bound, 0.0) + s.value
    return sorted(merged.items())


def quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """The ``q`` quantile estimated from cumulative buckets, as ``histogram_quantile`` does."""
    if not buckets or buckets[-1][1] == 0:
        return 0.0
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def summarize(families: Iterable[Metric]) -> dict[str, float]:
    """The :meth:`MetricsCollector.get_summary` figures computed from gathered families."""
    families = list(families)
    tool_calls = _total(families, "victor_tool_executions_total")
    tool_errors = _total(families, "victor_tool_errors_total")
    model_requests = _total(families, "victor_llm_requests_total")
    model_errors = _total(families, "victor_llm_errors_total")
    count = _total(families, "victor_llm_duration_ms_count")
    total_ms = _total(families, "victor_llm_duration_ms_sum")
    buckets = _buckets(families, "victor_llm_duration_ms_bucket")
    return {
        "tool_calls": tool_calls,
        "tool_errors": tool_errors,
        "tool_error_rate": tool_errors / tool_calls if tool_calls else 0.0,
        "model_requests": model_requests,
        "model_errors": model_errors,
        "model_error_rate": model_errors / model_requests if model_requests else 0.0,
        "model_latency_count": count,
        "model_latency_sum_ms": total_ms,
        "model_latency_avg_ms": total_ms / count if count else 0.0,
        "model_latency_p50_ms": quantile(0.5, buckets),
        "model_latency_p95_ms": quantile(0.95, buckets),
    }
