"""Metrics derived at collection time from the aggregated families of the whole deployment.

``victor_cache_hit_rate{cache_name}`` is hits / (hits + misses) of the deployment-wide
totals. It is never written by processes: a sum or average of per-worker rates would be
wrong (two workers at 1.0 and 0.0 are not at 1.0 or 0.5 unless they saw equal traffic).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from prometheus_client import Metric
from prometheus_client.core import GaugeMetricFamily

from .catalog import CATALOG_BY_NAME

HIT_RATE = "victor_cache_hit_rate"
_HITS = "victor_cache_hits_total"
_MISSES = "victor_cache_misses_total"


def _totals(families: Iterable[Metric], sample_name: str) -> dict[str, float]:
    """Sum of ``sample_name`` per cache_name, whether the family is named with _total or not."""
    family_names = (sample_name, sample_name.removesuffix("_total"))
    totals: dict[str, float] = defaultdict(float)
    for family in families:
        if family.name not in family_names:
            continue
        for sample in family.samples:
            if sample.name == sample_name:
                totals[sample.labels.get("cache_name", "")] += sample.value
    return totals


def cache_hit_rate(families: Iterable[Metric]) -> GaugeMetricFamily:
    """The ``victor_cache_hit_rate`` family computed from aggregated hits and misses."""
    families = list(families)
    hits = _totals(families, _HITS)
    misses = _totals(families, _MISSES)
    family = GaugeMetricFamily(HIT_RATE, CATALOG_BY_NAME[HIT_RATE].help, labels=("cache_name",))
    for name in sorted(hits.keys() | misses.keys()):
        total = hits.get(name, 0.0) + misses.get(name, 0.0)
        if total > 0:
            family.add_metric((name,), hits.get(name, 0.0) / total)
    return family


def with_derived(families: list[Metric]) -> list[Metric]:
    """``families`` plus the derived families (a new list; a stale derived family is replaced)."""
    rate = cache_hit_rate(families)
    kept = [f for f in families if f.name != HIT_RATE]
    if rate.samples:
        kept.append(rate)
    return kept
