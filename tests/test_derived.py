"""Tests of victor_mp_metrics._derived: the cache hit rate from aggregated totals."""

from __future__ import annotations

from prometheus_client import Metric

from victor_mp_metrics._derived import with_derived


def _counter(family_name: str, sample: str, values: dict[str, float]) -> Metric:
    family = Metric(family_name, "help", "counter")
    for cache, value in values.items():
        family.add_sample(sample, {"cache_name": cache}, value)
        family.add_sample(sample.removesuffix("_total") + "_created", {"cache_name": cache}, 1e9)
    return family


def _rates(families: list[Metric]) -> dict[str, float]:
    (family,) = [f for f in families if f.name == "victor_cache_hit_rate"]
    assert "gauge" == family.type
    return {s.labels["cache_name"]: s.value for s in family.samples}


def test_rate_from_multiprocess_reader_families() -> None:
    """Families named without _total (as the multiprocess reader names them) are understood."""
    families = [
        _counter("victor_cache_hits", "victor_cache_hits_total", {"tools": 4500, "llm": 1}),
        _counter("victor_cache_misses", "victor_cache_misses_total", {"tools": 500, "llm": 3}),
    ]
    assert {"llm": 0.25, "tools": 0.9} == _rates(with_derived(families))


def test_rate_from_families_named_with_total() -> None:
    """Families named with _total are understood too."""
    families = [
        _counter("victor_cache_hits_total", "victor_cache_hits_total", {"a": 3}),
        _counter("victor_cache_misses_total", "victor_cache_misses_total", {"a": 1}),
    ]
    assert {"a": 0.75} == _rates(with_derived(families))


def test_only_hits_only_misses_and_zero() -> None:
    """Hits alone give 1.0, misses alone 0.0, and a cache with neither is omitted."""
    families = [
        _counter("victor_cache_hits", "victor_cache_hits_total", {"hot": 2, "idle": 0}),
        _counter("victor_cache_misses", "victor_cache_misses_total", {"cold": 5, "idle": 0}),
    ]
    assert {"cold": 0.0, "hot": 1.0} == _rates(with_derived(families))


def test_rate_is_of_totals_not_of_worker_rates() -> None:
    """Two workers' series for one cache are summed before dividing (not averaged rates)."""
    hits = Metric("victor_cache_hits", "help", "counter")
    misses = Metric("victor_cache_misses", "help", "counter")
    # worker 1: 90 hits, 10 misses (0.9); worker 2: 0 hits, 100 misses (0.0)
    hits.add_sample("victor_cache_hits_total", {"cache_name": "c", "pid": "1"}, 90)
    hits.add_sample("victor_cache_hits_total", {"cache_name": "c", "pid": "2"}, 0)
    misses.add_sample("victor_cache_misses_total", {"cache_name": "c", "pid": "1"}, 10)
    misses.add_sample("victor_cache_misses_total", {"cache_name": "c", "pid": "2"}, 100)
    assert {"c": 90 / 200} == _rates(with_derived([hits, misses]))


def test_no_cache_metrics_adds_nothing_and_input_is_untouched() -> None:
    """Without cache counters nothing is added; the input list is never modified."""
    other = Metric("victor_requests", "help", "counter")
    families = [other]
    assert [other] == with_derived(families)
    assert [other] == families


def test_stale_hit_rate_family_is_replaced() -> None:
    """A victor_cache_hit_rate family already in the input is replaced, not duplicated."""
    stale = Metric("victor_cache_hit_rate", "help", "gauge")
    stale.add_sample("victor_cache_hit_rate", {"cache_name": "x", "pid": "7"}, 0.5)
    families = [stale, _counter("victor_cache_hits", "victor_cache_hits_total", {"x": 1})]
    result = with_derived(families)
    assert 1 == sum(f.name == "victor_cache_hit_rate" for f in result)
    assert {"x": 1.0} == _rates(result)
