"""Tests of victor_mp_metrics.registry: the guide's custom metrics registry."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import generate_latest

from victor_mp_metrics import _runtime
from victor_mp_metrics._exposition import gather
from victor_mp_metrics._metrics import NoopMetric
from victor_mp_metrics.catalog import get_catalog
from victor_mp_metrics.exceptions import LabelError, MetricDefinitionError
from victor_mp_metrics.registry import (
    BoundMetric,
    PrometheusRegistry,
    get_prometheus_registry,
)


@pytest.fixture
def registry() -> PrometheusRegistry:
    """The process-wide registry, fresh for each test."""
    return get_prometheus_registry()


def _value(name: str, **labels: str) -> float | None:
    return _runtime.local_registry().get_sample_value(name, labels)


def _conflict(
    registry: PrometheusRegistry, first: dict, second: dict, kind: str = "counter"
) -> str:
    getattr(registry, kind)(**first)
    with pytest.raises(MetricDefinitionError) as err:
        getattr(registry, kind)(**second)
    return str(err.value)


def test_guide_example(registry: PrometheusRegistry) -> None:
    """The guide's three custom metrics work and expose the guide's sample lines."""
    counter = registry.counter(
        name="custom_operations_total",
        help="Total custom operations",
        labels={"service": "my_service"},
    )
    counter.inc()
    registry.gauge(name="queue_size", help="Current queue size").set(10)
    registry.histogram(
        name="operation_latency_ms", help="Operation latency", buckets=[10, 50, 100, 500, 1000]
    ).observe(75)
    text = generate_latest(_runtime.local_registry()).decode().splitlines()
    assert 'custom_operations_total{service="my_service"} 1.0' in text
    assert "queue_size 10.0" in text
    assert 'operation_latency_ms_bucket{le="100.0"} 1.0' in text
    assert 'operation_latency_ms_bucket{le="50.0"} 0.0' in text


def test_one_registry_per_process() -> None:
    """get_prometheus_registry() returns one object until reset()."""
    first = get_prometheus_registry()
    assert first is get_prometheus_registry()
    _runtime.reset()
    assert first is not get_prometheus_registry()


def test_same_definition_returns_same_object(registry: PrometheusRegistry) -> None:
    """Asking again for an identical definition returns the very same object."""
    c = registry.counter("c_total", "help", labels={"s": "x"})
    assert c is registry.counter("c_total", "help", labels={"s": "x"})
    g = registry.gauge("g", "help", label_names=("k",))
    assert g is registry.gauge("g", "help", label_names=("k",), multiprocess_mode="livesum")
    h = registry.histogram("h", "help", buckets=(1, 2))
    assert h is registry.histogram("h", "help", buckets=(1.0, 2.0, float("inf")))


def test_counter_name_with_or_without_total_is_one_metric(registry: PrometheusRegistry) -> None:
    """A counter named x and one named x_total are the same metric, exposed as x_total."""
    counter = registry.counter("jobs", "help")
    assert counter is registry.counter("jobs_total", "help")
    counter.inc()
    assert 1.0 == _value("jobs_total")


def test_help_may_differ_and_first_is_kept(registry: PrometheusRegistry) -> None:
    """A different help text is not a conflict; the first definition's text is kept."""
    first = registry.counter("helped_total", "first help")
    assert first is registry.counter("helped_total", "other help")
    assert "first help" == first._documentation


def test_conflicting_type(registry: PrometheusRegistry) -> None:
    """Another type under the same name is refused, naming both types."""
    registry.counter("thing", "help")
    with pytest.raises(MetricDefinitionError) as err:
        registry.gauge("thing", "help")
    assert (
        "gauge 'thing' conflicts with its earlier definition: it has type 'counter', not "
        "'gauge'; multiprocess_mode None, not 'livesum'. Use the same definition everywhere, "
        "or pick another name"
    ) == str(err.value)


def test_conflicting_label_names(registry: PrometheusRegistry) -> None:
    """Other per-call label names are refused, showing both."""
    message = _conflict(
        registry, {"name": "l_total", "help": "h", "label_names": ("a",)},
        {"name": "l_total", "help": "h", "label_names": ("b",)},
    )  # fmt: skip
    assert (
        "counter 'l_total' conflicts with its earlier definition: it has label_names "
        "('a',), not ('b',)." in message
    )


def test_conflicting_constant_labels(registry: PrometheusRegistry) -> None:
    """Other constant labels (names or values) are refused, showing both."""
    message = _conflict(
        registry, {"name": "k_total", "help": "h", "labels": {"service": "a"}},
        {"name": "k_total", "help": "h", "labels": {"service": "b"}},
    )  # fmt: skip
    assert "it has labels (constant) {'service': 'a'}, not {'service': 'b'}." in message


def test_conflicting_buckets(registry: PrometheusRegistry) -> None:
    """Other histogram buckets are refused, showing both."""
    message = _conflict(
        registry, {"name": "b_ms", "help": "h", "buckets": (1, 2)},
        {"name": "b_ms", "help": "h", "buckets": (1, 3)}, kind="histogram",
    )  # fmt: skip
    assert "it has buckets (1.0, 2.0, inf), not (1.0, 3.0, inf)." in message


def test_conflicting_gauge_mode(registry: PrometheusRegistry) -> None:
    """Another gauge multiprocess mode is refused, showing both."""
    message = _conflict(
        registry, {"name": "m", "help": "h"},
        {"name": "m", "help": "h", "multiprocess_mode": "livemax"}, kind="gauge",
    )  # fmt: skip
    assert "it has multiprocess_mode 'livesum', not 'livemax'." in message


def test_clash_with_samples_of_another_metric(registry: PrometheusRegistry) -> None:
    """A name that another metric's samples take (histogram _count) is refused."""
    registry.histogram("lat", "help")
    with pytest.raises(MetricDefinitionError) as err:
        registry.counter("lat_count", "help")
    assert (
        "counter 'lat_count' would expose 'lat_count', which belongs to 'lat' defined "
        "earlier; pick another name"
    ) == str(err.value)


def test_catalog_name_identical_returns_catalog_metric(registry: PrometheusRegistry) -> None:
    """The catalog's own definition returns the catalog's metric."""
    metric = registry.counter("victor_cache_hits_total", "any help", label_names=("cache_name",))
    assert get_catalog().cache_hits_total is metric


def test_catalog_name_with_other_definition_is_refused(registry: PrometheusRegistry) -> None:
    """A catalog name with another definition, type or suffix clash is refused."""
    with pytest.raises(MetricDefinitionError) as err:
        registry.counter("victor_requests_total", "help", label_names=("path",))
    assert (
        "counter 'victor_requests_total' conflicts with its earlier definition: it has "
        "label_names ('endpoint', 'method'), not ('path',). Use the same definition "
        "everywhere, or pick another name"
    ) == str(err.value)
    with pytest.raises(MetricDefinitionError) as err:
        registry.gauge("victor_request_duration_ms_count", "help")
    assert (
        "gauge 'victor_request_duration_ms_count' clashes with the catalog's histogram "
        "'victor_request_duration_ms'; pick another name"
    ) == str(err.value)


@pytest.mark.parametrize(
    "name", ["victor_cache_hit_rate", "victor_system_cpu_percent", "victor_system_uptime_seconds"]
)
def test_collection_time_names_are_refused(registry: PrometheusRegistry, name: str) -> None:
    """Names of derived and system metrics cannot be defined."""
    with pytest.raises(MetricDefinitionError, match="which is computed at collection time"):
        registry.gauge(name, "help")


def test_self_metric_name_is_refused(registry: PrometheusRegistry) -> None:
    """The overflow self-metric's name cannot be defined."""
    with pytest.raises(MetricDefinitionError, match="this package's own self-metric"):
        registry.counter("victor_metrics_series_overflow", "help", label_names=("metric",))


def test_constant_and_per_call_labels(registry: PrometheusRegistry) -> None:
    """With per-call labels, labels() takes only them; constants are filled in."""
    bound = registry.counter(
        "ops_total", "help", labels={"service": "svc"}, label_names=("op", "result")
    )
    assert isinstance(bound, BoundMetric)
    bound.labels("read", "ok").inc()
    bound.labels(op="read", result="ok").inc()
    bound.labels(result="fail", op="write").inc(3)
    assert bound.labels("read", "ok") is bound.labels("read", "ok")
    assert 2.0 == _value("ops_total", service="svc", op="read", result="ok")
    assert 3.0 == _value("ops_total", service="svc", op="write", result="fail")


def test_bound_metric_label_errors(registry: PrometheusRegistry) -> None:
    """A wrong count of per-call values, or a constant given again, says what is expected."""
    bound = registry.counter("ops_total", "help", labels={"service": "svc"}, label_names=("op",))
    with pytest.raises(LabelError) as err:
        bound.labels("a", "b")
    assert (
        "'ops_total' expects the per-call labels (op) (constant labels {'service': 'svc'} are "
        "filled in); got 2 value(s): ('a', 'b')"
    ) == str(err.value)
    with pytest.raises(LabelError) as err:
        bound.labels(op="a", service="other")
    assert (
        "'ops_total': label(s) ['service'] are constant ({'service': 'svc'}); pass only the "
        "per-call labels (op)"
    ) == str(err.value)


def test_bad_label_definitions(registry: PrometheusRegistry) -> None:
    """Overlapping constant/per-call labels, a string label_names and bad values are refused."""
    with pytest.raises(MetricDefinitionError) as err:
        registry.counter("x_total", "h", labels={"a": "1"}, label_names=("a",))
    assert "counter 'x_total': label name 'a' is given twice in ('a', 'a')" == str(err.value)
    with pytest.raises(MetricDefinitionError) as err:
        registry.counter("x_total", "h", label_names="abc")
    assert (
        "counter 'x_total': label_names must be a sequence of names, got the string 'abc'; "
        "write label_names=('abc',)"
    ) == str(err.value)
    with pytest.raises(LabelError, match="label 'a' must be a str"):
        registry.counter("x_total", "h", labels={"a": None})  # type: ignore[dict-item]
    with pytest.raises(MetricDefinitionError, match="metric name 'x-y' is invalid"):
        registry.gauge("x-y", "h")


def test_default_gauge_mode_is_livesum(registry: PrometheusRegistry) -> None:
    """A gauge defined without a mode aggregates with livesum."""
    assert "livesum" == registry.gauge("depth", "help")._multiprocess_mode


def test_disabled_registry_is_noop_but_checks(
    metrics_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disabled: every kind returns a no-op, conflicts still raise, no file is written."""
    monkeypatch.setenv("VICTOR_METRICS_ENABLED", "false")
    _runtime.reset()
    registry = get_prometheus_registry()
    made = [
        registry.counter("a_total", "h", labels={"s": "x"}, label_names=("k",)),
        registry.gauge("b", "h"),
        registry.histogram("c", "h", buckets=(1, 2)),
    ]
    assert all(isinstance(m, NoopMetric) for m in made)
    made[0].labels("v").inc()
    made[1].set(3)
    made[2].observe(1)
    with pytest.raises(MetricDefinitionError):
        registry.counter("b", "h")
    assert [] == list(metrics_dir.iterdir())


def test_multiprocess_custom_metric_is_gathered(metrics_dir: Path) -> None:
    """In multiprocess mode a custom metric with constant labels reaches the aggregate."""
    get_prometheus_registry().counter("jobs_total", "h", labels={"service": "s"}).inc(2)
    found = {(s.name, tuple(s.labels.items())): s.value for f in gather() for s in f.samples}
    assert 2.0 == found[("jobs_total", (("service", "s"),))]
