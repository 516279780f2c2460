"""Tests of victor_mp_metrics._metrics: cached labels, label checks, definitions, guard, no-op."""

from __future__ import annotations

import logging

import pytest

from victor_mp_metrics import _metrics, _runtime
from victor_mp_metrics._metrics import NOOP, Counter, Gauge, Histogram, NoopMetric, Summary
from victor_mp_metrics.exceptions import LabelError, MetricDefinitionError


def _value(name: str, **labels: str) -> float | None:
    return _runtime.local_registry().get_sample_value(name, labels)


@pytest.fixture
def requests() -> Counter:
    """A guarded counter with two labels, registered in the local registry."""
    return _metrics.new_metric("counter", "t_requests_total", "help", ("endpoint", "method"))


def test_labels_returns_the_cached_child(requests: Counter) -> None:
    """labels() with the same values returns the same child, by position or by name."""
    child = requests.labels("/chat", "POST")
    assert child is requests.labels("/chat", "POST")
    assert child is requests.labels(endpoint="/chat", method="POST")
    assert child is requests.labels(method="POST", endpoint="/chat")


def test_cached_child_skips_validation(requests: Counter, monkeypatch: pytest.MonkeyPatch) -> None:
    """An existing child is found by one dict lookup, before any label check runs."""
    child = requests.labels("/chat", "POST")

    def fail(*args: object) -> str:
        raise AssertionError("validated again")

    monkeypatch.setattr(_metrics, "label_value", fail)
    assert child is requests.labels("/chat", "POST")


def test_int_and_bool_values_are_converted(requests: Counter) -> None:
    """int and bool label values become their str(); they name the same child as the str."""
    requests.labels(200, True).inc()
    requests.labels("200", "True").inc()
    assert 2.0 == _value("t_requests_total", endpoint="200", method="True")
    assert requests.labels(200, True) is requests.labels("200", "True")


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (None, "None of type NoneType"),
        (b"x", "b'x' of type bytes"),
        (1.5, "1.5 of type float"),
        (object, "<class 'object'> of type type"),
        (["a"], "['a'] of type list"),
    ],
)
def test_bad_label_value_types_are_refused(requests: Counter, value: object, shown: str) -> None:
    """None, bytes, floats and other objects raise LabelError naming the metric and label."""
    with pytest.raises(LabelError) as err:
        requests.labels("/chat", value)
    assert (
        f"t_requests_total: label 'method' must be a str (int and bool are converted), got "
        f"{shown}; pass a string such as 'unknown'"
    ) == str(err.value)


def test_label_value_length_limit(requests: Counter) -> None:
    """1024 characters are accepted; 1025 raise LabelError with the length and the limit."""
    requests.labels("a" * 1024, "GET")
    with pytest.raises(LabelError) as err:
        requests.labels("a" * 1025, "GET")
    assert str(err.value).startswith(
        "t_requests_total: label 'endpoint' value is 1025 characters long, more than the "
        "limit of 1024"
    )


def test_wrong_label_count(requests: Counter) -> None:
    """A wrong number of values names the metric, the expected labels and what was given."""
    with pytest.raises(LabelError) as err:
        requests.labels("/chat")
    assert (
        "counter 't_requests_total' expects labels (endpoint, method); got 1 value(s): "
        ".labels('/chat')"
    ) == str(err.value)


def test_unknown_and_missing_label_names(requests: Counter) -> None:
    """Unknown and missing label names are both listed."""
    with pytest.raises(LabelError) as err:
        requests.labels(endpoint="/chat", verb="POST")
    assert (
        "counter 't_requests_total' expects labels (endpoint, method); got unknown label "
        "name(s) ['verb'], missing ['method'] in .labels(endpoint='/chat', verb='POST')"
    ) == str(err.value)


def test_positional_and_keyword_values_together(requests: Counter) -> None:
    """Mixing positional and keyword label values is refused."""
    with pytest.raises(LabelError) as err:
        requests.labels("/chat", method="POST")
    assert (
        "counter 't_requests_total' expects labels (endpoint, method): pass label values "
        "either by position or by name, not both; got .labels('/chat', method='POST')"
    ) == str(err.value)


def test_labels_on_unlabelled_metric_and_child(requests: Counter) -> None:
    """labels() on a metric without label names, or on a child, says to call it directly."""
    plain = _metrics.new_metric("counter", "t_plain_total", "help")
    with pytest.raises(LabelError) as err:
        plain.labels("x")
    assert (
        "counter 't_plain_total' has no label names; call .inc()/.set()/.observe() on it "
        "directly instead of .labels('x')"
    ) == str(err.value)
    with pytest.raises(LabelError, match="is already a labelled child"):
        requests.labels("/chat", "POST").labels("x", "y")


@pytest.mark.parametrize(
    ("kind", "name", "labels", "message"),
    [
        ("counter", "bad-name", (), "metric name 'bad-name' is invalid: use only letters, "
         "digits, '_' and ':', not starting with a digit (for example 'bad_name')"),
        ("counter", "1abc", (), "metric name '1abc' is invalid: use only letters, digits, '_' "
         "and ':', not starting with a digit (for example '_1abc')"),
        ("counter", "ok", ("my-label",), "counter 'ok': label name 'my-label' is invalid: use "
         "only letters, digits and '_', not starting with a digit (for example 'my_label')"),
        ("gauge", "ok", ("__secret",), "gauge 'ok': label name '__secret' is reserved (names "
         "starting with '__' belong to Prometheus); rename it, for example to 'secret'"),
        ("histogram", "ok", ("le",), "histogram 'ok': label name 'le' is reserved on a "
         "histogram (Prometheus adds it to every bucket); rename it, for example to 'le_label'"),
        ("summary", "ok", ("quantile",), "summary 'ok': label name 'quantile' is reserved on a "
         "summary (Prometheus adds it to every quantile); rename it, for example to "
         "'quantile_label'"),
        ("counter", "ok", ("a", "a"), "counter 'ok': label name 'a' is given twice in "
         "('a', 'a')"),
    ],
)  # fmt: skip
def test_bad_definitions(kind: str, name: str, labels: tuple[str, ...], message: str) -> None:
    """Invalid or reserved names raise MetricDefinitionError saying what to rename."""
    kwargs = {"multiprocess_mode": "livesum"} if kind == "gauge" else {}
    with pytest.raises(MetricDefinitionError) as err:
        _metrics.new_metric(kind, name, "help", labels, **kwargs)  # type: ignore[arg-type]
    assert message == str(err.value)


def test_bad_buckets_and_gauge_mode() -> None:
    """Unsorted buckets and an unknown gauge mode are definition errors with the fix."""
    with pytest.raises(MetricDefinitionError) as err:
        _metrics.new_metric("histogram", "t_h", "help", buckets=(5, 1))
    assert (
        "histogram 't_h': buckets must be strictly increasing, got (5.0, 1.0); use (1.0, 5.0)"
    ) == str(err.value)
    with pytest.raises(MetricDefinitionError, match=r"multiprocess_mode 'often' is not one of"):
        Gauge("t_g", "help", multiprocess_mode="often")  # type: ignore[arg-type]


def test_duplicate_registration_is_a_definition_error() -> None:
    """A second metric with a name already registered raises MetricDefinitionError."""
    _metrics.new_metric("counter", "t_dup_total", "help")
    with pytest.raises(MetricDefinitionError, match=r"counter 't_dup_total' cannot be registered"):
        _metrics.new_metric("counter", "t_dup_total", "help")


def test_guard_folds_new_label_sets_into_overflow(caplog: pytest.LogCaptureFixture) -> None:
    """Past max_series, new label sets share one __overflow__ child, counted, logged once."""
    _runtime.configure(max_series=2)
    metric = _metrics.new_metric("counter", "t_guarded_total", "help", ("user",))
    first, second = metric.labels("a"), metric.labels("b")
    with caplog.at_level(logging.WARNING, logger="victor_mp_metrics"):
        third, fourth = metric.labels("c"), metric.labels("d")
    assert third is fourth
    assert ("__overflow__",) == third._labelvalues
    assert first is metric.labels("a") and second is metric.labels("b")
    third.inc()
    assert 1.0 == _value("t_guarded_total", user="__overflow__")
    assert 2.0 == _value("victor_metrics_series_overflow_total", metric="t_guarded_total")
    assert 1 == sum(
        "t_guarded_total reached 2 label sets" in r.getMessage() for r in caplog.records
    )


def test_overflow_counter_is_not_guarded() -> None:
    """The overflow self-metric has no guard, so counting an overflow never recurses."""
    _runtime.configure(max_series=1)
    for name in ("a", "b", "c"):
        _metrics.new_metric("counter", f"t_{name}_total", "help", ("x",)).labels("1")
        _metrics.new_metric("counter", f"t_{name}_total_again", "help", ("x",))
    overflow = _runtime.self_counter("series_overflow")
    assert not isinstance(overflow, _metrics._Guarded)
    for name in ("a", "b", "c"):
        overflow.labels(name).inc()
    assert 1.0 == _value("victor_metrics_series_overflow_total", metric="c")


def test_clear_forgets_cached_children(requests: Counter) -> None:
    """clear() and remove() also drop the children from the labels() cache."""
    child = requests.labels("/a", "GET")
    requests.clear()
    assert child is not requests.labels("/a", "GET")
    requests.remove("/a", "GET")
    assert {} == requests._children


def test_histogram_and_summary_children_record() -> None:
    """Histogram and Summary children observe through prometheus_client's own code."""
    histogram = _metrics.new_metric("histogram", "t_lat_ms", "help", ("op",), buckets=(10, 100))
    summary = _metrics.new_metric("summary", "t_size", "help", ("op",))
    histogram.labels("read").observe(50)
    summary.labels("read").observe(3)
    assert 1.0 == _value("t_lat_ms_bucket", op="read", le="100.0")
    assert 0.0 == _value("t_lat_ms_bucket", op="read", le="10.0")
    assert 3.0 == _value("t_size_sum", op="read")
    assert isinstance(histogram, Histogram) and isinstance(summary, Summary)


def test_disabled_gives_noop_but_still_checks_definitions() -> None:
    """When disabled new_metric returns the no-op metric, yet a bad name is still refused."""
    _runtime.configure(enabled=False)
    assert NOOP is _metrics.new_metric("counter", "t_off_total", "help", ("x",))
    with pytest.raises(MetricDefinitionError):
        _metrics.new_metric("counter", "bad name", "help")


def test_noop_metric_does_nothing() -> None:
    """Every NoopMetric method is callable; time() works as decorator and context manager."""
    noop = NoopMetric()
    assert noop is noop.labels("a", b="c")
    noop.inc()
    noop.dec(2)
    noop.set(3)
    noop.observe(4)
    noop.set_to_current_time()
    noop.set_function(lambda: 1.0)
    noop.reset()
    noop.remove("a")
    noop.clear()
    with noop.time(), noop.track_inprogress(), noop.count_exceptions():
        pass

    @noop.time()
    def double(x: int) -> int:
        return 2 * x

    assert 4 == double(2)
