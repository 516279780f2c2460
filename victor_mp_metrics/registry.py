"""The custom metrics registry of the guide: ``get_prometheus_registry().counter(...)``.

Metrics defined here are guarded metrics like the catalog's (cardinality guard, label
checks, per-process files in multiprocess mode) and are exposed with them.

Constant labels (``labels={"service": "my_service"}``) are label names whose values are
bound once: without per-call ``label_names`` you get the bound child and call ``.inc()``
on it; with them you get a :class:`BoundMetric` whose ``.labels(...)`` takes only the
per-call values.

A definition is its type, name, constant labels, label names, buckets (histograms) and
multiprocess mode (gauges). Asking again for the same definition returns the same object;
any other definition under the same name raises :class:`MetricDefinitionError` naming what
differs. The help text is not part of it: the first definition's text is kept. A name of
the catalog is accepted only with the catalog's definition, and then returns the catalog's
metric.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast, overload

from prometheus_client import Histogram as _PcHistogram

from . import _runtime
from ._metrics import (
    Counter,
    Gauge,
    GaugeMode,
    Histogram,
    MetricKind,
    NoopMetric,
    new_metric,
)
from ._selfmetrics import OVERFLOW_METRIC
from ._validation import check_buckets, label_value, validate_definition
from .catalog import CATALOG, MetricSpec, get_catalog
from .exceptions import LabelError, MetricDefinitionError

DEFAULT_BUCKETS: tuple[float, ...] = tuple(_PcHistogram.DEFAULT_BUCKETS)
DEFAULT_GAUGE_MODE: GaugeMode = "livesum"


@dataclass(frozen=True)
class _Definition:
    kind: str
    name: str
    const_labels: tuple[tuple[str, str], ...] = ()
    label_names: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None
    multiprocess_mode: str | None = None

    def differences(self, other: _Definition) -> list[str]:
        shown = {
            "type": (self.kind, other.kind),
            "labels (constant)": (dict(self.const_labels), dict(other.const_labels)),
            "label_names": (self.label_names, other.label_names),
            "buckets": (self.buckets, other.buckets),
            "multiprocess_mode": (self.multiprocess_mode, other.multiprocess_mode),
        }
        return [
            f"{field} {old!r}, not {new!r}" for field, (old, new) in shown.items() if old != new
        ]


def _family(kind: str, name: str) -> str:
    return name.removesuffix("_total") if kind == "counter" else name


def _exposed(kind: str, name: str) -> set[str]:
    """Every sample name the metric exposes (or that prometheus_client reserves for it)."""
    base = _family(kind, name)
    if kind == "counter":
        return {base, base + "_total", base + "_created"}
    if kind == "histogram":
        return {base} | {base + s for s in ("_bucket", "_count", "_sum", "_created")}
    return {base}


def _with_inf(buckets: Iterable[float]) -> tuple[float, ...]:
    bounds = tuple(float(b) for b in buckets)
    return bounds if bounds and bounds[-1] == math.inf else (*bounds, math.inf)


def _spec_definition(spec: MetricSpec) -> _Definition:
    return _Definition(
        kind=spec.kind,
        name=spec.name,
        label_names=spec.labels,
        buckets=_with_inf(spec.buckets) if spec.buckets is not None else None,
        multiprocess_mode=spec.mode,
    )


class BoundMetric:
    """A metric with constant labels and per-call labels; ``.labels()`` takes the per-call ones."""

    __slots__ = ("_const", "_const_map", "_label_names", "_metric", "_name")

    def __init__(
        self, metric: Any, name: str, const: Mapping[str, str], label_names: tuple[str, ...]
    ) -> None:
        self._metric = metric
        self._name = name
        self._const = tuple(const.values())
        self._const_map = dict(const)
        self._label_names = label_names

    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> Any:
        """The child for these per-call label values; the constant labels are filled in."""
        if not labelkwargs:
            try:
                child = self._metric._children.get(self._const + labelvalues)
            except TypeError:  # unhashable: the metric's labels() says which label
                child = None
            if child is not None:
                return child
            if len(labelvalues) != len(self._label_names):
                raise LabelError(
                    f"{self._name!r} expects the per-call labels ({', '.join(self._label_names)}) "
                    f"(constant labels {self._const_map} are filled in); got "
                    f"{len(labelvalues)} value(s): {labelvalues!r}"
                )
            return self._metric.labels(*self._const, *labelvalues)
        constant = sorted(set(labelkwargs) & set(self._const_map))
        if constant:
            raise LabelError(
                f"{self._name!r}: label(s) {constant} are constant ({self._const_map}); "
                f"pass only the per-call labels ({', '.join(self._label_names)})"
            )
        return self._metric.labels(*labelvalues, **self._const_map, **labelkwargs)

    @property
    def metric(self) -> Any:
        """The underlying metric, whose label names are the constant then per-call ones."""
        return self._metric


class PrometheusRegistry:
    """Defines custom metrics once per process; see the module docstring for the rules."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._defined: dict[str, tuple[_Definition, Any]] = {}
        self._calls: dict[tuple[Any, ...], Any] = {}
        self._owners: dict[str, str] = {}

    @overload
    def counter(
        self,
        name: str,
        help: str,
        *,
        labels: Mapping[str, str] | None = ...,
        label_names: tuple[()] = ...,
    ) -> Counter | NoopMetric: ...
    @overload
    def counter(
        self,
        name: str,
        help: str,
        *,
        labels: Mapping[str, str] | None = ...,
        label_names: Sequence[str],
    ) -> Counter | BoundMetric | NoopMetric: ...
    def counter(
        self,
        name: str,
        help: str,
        *,
        labels: Mapping[str, str] | None = None,
        label_names: Sequence[str] = (),
    ) -> Counter | BoundMetric | NoopMetric:
        """A counter; a name ending in ``_total`` is exposed as given, else with ``_total``."""
        return cast("Counter | BoundMetric | NoopMetric",
                    self._get("counter", name, help, labels, label_names))

    @overload
    def gauge(
        self,
        name: str,
        help: str,
        *,
        labels: Mapping[str, str] | None = ...,
        label_names: tuple[()] = ...,
        multiprocess_mode: GaugeMode = ...,
    ) -> Gauge | NoopMetric: ...
    @overload
    def gauge(
        self,
        name: str,
        help: str,
        *,
        labels: Mapping[str, str] | None = ...,
        label_names: Sequence[str],
        multiprocess_mode: GaugeMode = ...,
    ) -> Gauge | BoundMetric | NoopMetric: ...
    def gauge(
        self,
        name: str,
        help: str,
        *,
        labels: Mapping[str, str] | None = None,
        label_names: Sequence[str] = (),
        multiprocess_mode: GaugeMode = DEFAULT_GAUGE_MODE,
    ) -> Gauge | BoundMetric | NoopMetric:
        """A gauge. ``multiprocess_mode`` says how processes' values combine; the default
        ``livesum`` suits values each process holds a share of (queue sizes, in-flight
        work): the sum over live processes. Use ``livemax``/``livemin`` for the extreme
        among live processes, ``livemostrecent`` for the last value set anywhere, and the
        modes without ``live`` to keep exited processes' values."""
        return cast("Gauge | BoundMetric | NoopMetric",
                    self._get("gauge", name, help, labels, label_names, mode=multiprocess_mode))

    @overload
    def histogram(
        self,
        name: str,
        help: str,
        *,
        labels: Mapping[str, str] | None = ...,
        label_names: tuple[()] = ...,
        buckets: Sequence[float] = ...,
    ) -> Histogram | NoopMetric: ...
    @overload
    def histogram(
        self,
        name: str,
        help: str,
        *,
        labels: Mapping[str, str] | None = ...,
        label_names: Sequence[str],
        buckets: Sequence[float] = ...,
    ) -> Histogram | BoundMetric | NoopMetric: ...
    def histogram(
        self,
        name: str,
        help: str,
        *,
        labels: Mapping[str, str] | None = None,
        label_names: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> Histogram | BoundMetric | NoopMetric:
        """A histogram with these upper bounds (``+Inf`` is added)."""
        return cast("Histogram | BoundMetric | NoopMetric",
                    self._get("histogram", name, help, labels, label_names, buckets=buckets))

    def _get(
        self,
        kind: str,
        name: str,
        help: str,
        const: Mapping[str, str] | None,
        label_names: Sequence[str],
        *,
        buckets: Sequence[float] | None = None,
        mode: str | None = None,
    ) -> Any:
        try:
            # Fast path for the same call made again (a metric looked up on every use).
            call = (kind, name, tuple((const or {}).items()), tuple(label_names),
                    None if buckets is None else tuple(buckets), mode)
            found = self._calls.get(call)
        except TypeError:  # unhashable arguments: the slow path explains what is wrong
            call, found = None, None
        if found is not None:
            return found
        result = self._define(kind, name, help, const, label_names, buckets, mode)
        if call is not None and all(type(v) is str for _, v in call[2]):
            self._calls[call] = result
        return result

    def _define(self, kind: str, name: str, help: str, const: Mapping[str, str] | None,
                label_names: Sequence[str], buckets: Sequence[float] | None,
                mode: str | None) -> Any:
        """The slow path of :meth:`_get`: validate, compare with earlier definitions, create."""
        const = dict(const or {})
        if isinstance(label_names, str):
            raise MetricDefinitionError(
                f"{kind} {name!r}: label_names must be a sequence of names, got the string "
                f"{label_names!r}; write label_names=({label_names!r},)"
            )
        names = validate_definition(kind, name, (*const, *label_names))
        per_call = names[len(const) :]
        overlap = sorted(set(const) & set(per_call))
        if overlap:
            raise MetricDefinitionError(
                f"{kind} {name!r}: label(s) {overlap} are both constant (labels=) and per-call "
                "(label_names=); keep each in one place"
            )
        bound = {k: label_value(name, k, v) for k, v in const.items()}
        definition = _Definition(
            kind=kind,
            name=name + "_total" if kind == "counter" and not name.endswith("_total") else name,
            const_labels=tuple(bound.items()),
            label_names=tuple(per_call),
            buckets=_with_inf(check_buckets(name, buckets)) if buckets is not None else None,
            multiprocess_mode=mode,
        )
        family = _family(kind, name)
        with self._lock:
            known = self._defined.get(family)
            if known is not None:
                self._check_same(known[0], definition)
                return known[1]
            spec = _catalog_clash(definition)
            if spec is not None:
                self._check_same(_spec_definition(spec), definition)
                return getattr(get_catalog(), spec.attr)
            for sample in sorted(_exposed(kind, name)):
                owner = self._owners.get(sample)
                if owner is not None:
                    raise MetricDefinitionError(
                        f"{kind} {name!r} would expose {sample!r}, which belongs to "
                        f"{owner!r} defined earlier; pick another name"
                    )
            kwargs: dict[str, Any] = {}
            if definition.buckets is not None:
                kwargs["buckets"] = definition.buckets
            if mode is not None:
                kwargs["multiprocess_mode"] = mode
            metric = new_metric(cast(MetricKind, kind), name, help, names, **kwargs)
            if isinstance(metric, NoopMetric):
                result: Any = metric
            elif per_call:
                result = BoundMetric(metric, definition.name, bound, tuple(per_call))
            elif bound:
                result = metric.labels(*bound.values())
            else:
                result = metric
            self._defined[family] = (definition, result)
            for sample in _exposed(kind, name):
                self._owners[sample] = definition.name
            return result

    @staticmethod
    def _check_same(old: _Definition, new: _Definition) -> None:
        diffs = old.differences(new)
        if diffs:
            raise MetricDefinitionError(
                f"{new.kind} {new.name!r} conflicts with its earlier definition: it has "
                f"{'; '.join(diffs)}. Use the same definition everywhere, or pick another name"
            )


def _catalog_clash(definition: _Definition) -> MetricSpec | None:
    """The catalog row whose name ``definition`` takes, or an error if it clashes otherwise."""
    wanted = _exposed(definition.kind, definition.name)
    if OVERFLOW_METRIC in wanted or _family("counter", OVERFLOW_METRIC) in wanted:
        raise MetricDefinitionError(
            f"{definition.name!r} is this package's own self-metric; pick another name"
        )
    for spec in CATALOG:
        if not wanted & _exposed(spec.kind, spec.name):
            continue
        if spec.source != "process":
            raise MetricDefinitionError(
                f"{definition.name!r} is the catalog's {spec.name!r}, which is computed at "
                f"collection time ({spec.aggregation}); pick another name"
            )
        if _family(spec.kind, spec.name) != _family(definition.kind, definition.name):
            raise MetricDefinitionError(
                f"{definition.kind} {definition.name!r} clashes with the catalog's {spec.kind} "
                f"{spec.name!r}; pick another name"
            )
        return spec
    return None


def get_prometheus_registry() -> PrometheusRegistry:
    """This process's custom metrics registry (one per process, created on first call)."""
    return _runtime.singleton("prometheus_registry", PrometheusRegistry)
