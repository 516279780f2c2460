"""The metric classes behind every metric we create: guarded, validated, or no-op.

:class:`Counter`, :class:`Gauge`, :class:`Histogram` and :class:`Summary` subclass
prometheus_client's classes, so storage (per-process files in multiprocess mode) and
exposition are stock. What they add happens in ``labels()`` only:

* a plain dict of children keyed by the label-values tuple, looked up before anything
  else, so ``labels("a", "b")`` of an existing child is one dict lookup;
* clear errors for bad label values (:class:`LabelError`) and bad definitions
  (:class:`MetricDefinitionError`);
* a cardinality guard: past ``max_series`` label sets a metric folds new label sets into
  one child whose label values are all ``"__overflow__"``, and counts each folded call in
  ``victor_metrics_series_overflow_total{metric}``.

``inc()``, ``set()`` and ``observe()`` are prometheus_client's own. :class:`NoopMetric`
stands in for every metric when metrics are disabled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from types import MappingProxyType
from typing import Any, Literal, TypeVar, overload

import prometheus_client
from prometheus_client import CollectorRegistry

from . import _compat, _runtime
from ._mpdir import OVERFLOW
from ._validation import check_buckets, label_value, validate_definition
from .exceptions import LabelError, MetricDefinitionError

log = logging.getLogger("victor_mp_metrics")


GaugeMode = Literal[
    "all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum",
    "mostrecent", "livemostrecent",
]  # fmt: skip
MetricKind = Literal["counter", "gauge", "histogram", "summary"]

_F = TypeVar("_F", bound=Callable[..., Any])
_S = TypeVar("_S", bound="_Guarded")


class _Guarded:
    """The ``labels()`` of our metric classes; mixed in before the prometheus_client class."""

    _kind: str
    # Children share this empty mapping, so their labels() takes the slow path and says why.
    _children: Any = MappingProxyType({})

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        *,
        registry: CollectorRegistry | None = None,
        max_series: int | None = None,
        guard: bool = True,
        _labelvalues: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Validate the definition (parents only), then let prometheus_client build it.

        ``max_series`` defaults to the settings' value; ``guard=False`` disables the guard.
        Children are built by ``labels()`` with ``_labelvalues`` and skip all of this.
        """
        if _labelvalues is None:
            labelnames = validate_definition(self._kind, name, labelnames)
            if not isinstance(documentation, str):
                raise MetricDefinitionError(
                    f"{self._kind} {name!r}: help must be a str, got {documentation!r}"
                )
        super().__init__(  # type: ignore[call-arg]
            name,
            documentation,
            labelnames,
            registry=registry,
            _labelvalues=_labelvalues,
            **kwargs,
        )
        if _labelvalues is None:
            self._children = {}
            if guard and max_series is None:
                max_series = _runtime.get_settings().max_series
            self._max_series = max_series if guard else None
            self._overflow_child: Any = None
            self._warned = False

    def labels(self: _S, *labelvalues: Any, **labelkwargs: Any) -> _S:
        """The child for these label values (positional, or by name), created on first use."""
        try:
            child = self._children.get(labelvalues)
        except TypeError:  # an unhashable value: _slow_labels says which label
            child = None
        if child is not None and not labelkwargs:
            return child  # type: ignore[no-any-return]
        return self._slow_labels(labelvalues, labelkwargs)  # type: ignore[no-any-return]

    def _describe(self) -> str:
        names = ", ".join(_compat.label_names(self))
        return f"{_compat.metric_type(self)} {self._full_name()!r} expects labels ({names})"

    def _full_name(self) -> str:
        name = _compat.metric_name(self)
        return name + "_total" if _compat.metric_type(self) == "counter" else name

    def _slow_labels(self, labelvalues: tuple[Any, ...], labelkwargs: dict[str, Any]) -> Any:
        names = _compat.label_names(self)
        if not names or _compat.is_child(self):
            what = "has no label names" if not names else "is already a labelled child"
            raise LabelError(
                f"{_compat.metric_type(self)} {self._full_name()!r} {what}; call "
                f".inc()/.set()/.observe() on it directly instead of "
                f".labels({_shown(labelvalues, labelkwargs)})"
            )
        if labelkwargs:
            if labelvalues:
                raise LabelError(
                    f"{self._describe()}: pass label values either by position or by name, "
                    f"not both; got .labels({_shown(labelvalues, labelkwargs)})"
                )
            unknown = sorted(set(labelkwargs) - set(names))
            missing = [n for n in names if n not in labelkwargs]
            if unknown or missing:
                parts = []
                if unknown:
                    parts.append(f"unknown label name(s) {unknown}")
                if missing:
                    parts.append(f"missing {missing}")
                raise LabelError(
                    f"{self._describe()}; got {', '.join(parts)} in "
                    f".labels({_shown((), labelkwargs)})"
                )
            labelvalues = tuple(labelkwargs[n] for n in names)
        elif len(labelvalues) != len(names):
            raise LabelError(
                f"{self._describe()}; got {len(labelvalues)} value(s): "
                f".labels({_shown(labelvalues, {})})"
            )
        metric = self._full_name()
        key = tuple(label_value(metric, n, v) for n, v in zip(names, labelvalues, strict=True))
        child = self._children.get(key)
        if child is not None:
            return child
        with _compat.metric_lock(self):
            child = self._children.get(key)
            if child is not None:
                return child
            series = len(self._children) - (self._overflow_child is not None)
            if self._max_series is not None and series >= self._max_series:
                overflow = True
            else:
                overflow = False
                child = self._make_child(key)
        if overflow:
            return self._overflowed(metric)
        return child

    def _make_child(self, key: tuple[str, ...]) -> Any:
        # Caller holds the metric lock.
        child = self._children[key] = _compat.add_child(self, key)
        return child

    def _overflowed(self, metric: str) -> Any:
        _runtime.self_counter("series_overflow").labels(metric).inc()
        with _compat.metric_lock(self):
            child = self._overflow_child
            if child is None:
                key = (OVERFLOW,) * len(_compat.label_names(self))
                child = self._children.get(key)
                if child is None:
                    child = self._make_child(key)
                self._overflow_child = child
            warn = not self._warned
            self._warned = True
        if warn:
            log.warning(
                "victor_mp_metrics: %s reached %d label sets in this process; further new "
                "label sets are recorded under %s=%r. Remove unbounded label values (ids, raw "
                "paths) or raise VICTOR_METRICS_MAX_SERIES.",
                metric,
                self._max_series,
                "/".join(_compat.label_names(self)),
                OVERFLOW,
            )
        return child

    def remove(self, *labelvalues: Any) -> None:
        """Remove one child (prometheus_client semantics) and forget it."""
        super().remove(*labelvalues)  # type: ignore[misc]
        self._resync()

    def clear(self) -> None:
        """Remove every child (prometheus_client semantics) and forget them."""
        super().clear()  # type: ignore[misc]
        self._resync()

    def _resync(self) -> None:
        with _compat.metric_lock(self):
            self._children = _compat.registered_children(self)
            overflow = self._overflow_child
            if overflow is not None and overflow not in self._children.values():
                self._overflow_child = None


def _shown(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    shown = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    text = ", ".join(shown)
    return text if len(text) <= 200 else text[:200] + "..."


class Counter(_Guarded, prometheus_client.Counter):
    """A prometheus_client Counter with guarded, cached ``labels()``.

    A name ending in ``_total`` is exposed as given (prometheus_client names the family
    without the suffix and its sample with it).
    """

    _kind = "counter"


class Gauge(_Guarded, prometheus_client.Gauge):
    """A prometheus_client Gauge with guarded, cached ``labels()``; the mode is required."""

    _kind = "gauge"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        *,
        multiprocess_mode: GaugeMode,
        **kwargs: Any,
    ) -> None:
        labelnames = tuple(labelnames)
        if multiprocess_mode not in _compat.GAUGE_MODES:
            raise MetricDefinitionError(
                f"gauge {name!r}: multiprocess_mode {multiprocess_mode!r} is not one of "
                f"{sorted(_compat.GAUGE_MODES)}"
            )
        if multiprocess_mode in ("all", "liveall") and "pid" in tuple(labelnames):
            raise MetricDefinitionError(
                f"gauge {name!r}: label name 'pid' is reserved in multiprocess_mode "
                f"{multiprocess_mode!r} (aggregation adds it to each process's series); "
                "rename it, for example to 'pid_label', or use another mode"
            )
        super().__init__(
            name, documentation, labelnames, multiprocess_mode=multiprocess_mode, **kwargs
        )


class Histogram(_Guarded, prometheus_client.Histogram):
    """A prometheus_client Histogram with guarded, cached ``labels()``."""

    _kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        *,
        buckets: Sequence[float] = prometheus_client.Histogram.DEFAULT_BUCKETS,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("_labelvalues") is None:
            buckets = check_buckets(name, buckets)
        super().__init__(name, documentation, labelnames, buckets=buckets, **kwargs)


class Summary(_Guarded, prometheus_client.Summary):
    """A prometheus_client Summary (count and sum) with guarded, cached ``labels()``."""

    _kind = "summary"


class _NoopContext:
    """Context manager and decorator that does nothing."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> Literal[False]:
        return False

    def __call__(self, func: _F) -> _F:
        return func


_NOOP_CONTEXT = _NoopContext()


class NoopMetric:
    """Stands in for any metric while metrics are disabled: every call does nothing."""

    __slots__ = ()

    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> NoopMetric:
        return self

    def inc(self, amount: float = 1, exemplar: Any = None) -> None: ...
    def dec(self, amount: float = 1) -> None: ...
    def set(self, value: float) -> None: ...
    def observe(self, amount: float, exemplar: Any = None) -> None: ...
    def set_to_current_time(self) -> None: ...
    def set_function(self, f: Callable[[], float]) -> None: ...
    def reset(self) -> None: ...
    def remove(self, *labelvalues: Any) -> None: ...
    def clear(self) -> None: ...

    def time(self) -> _NoopContext:
        return _NOOP_CONTEXT

    def track_inprogress(self) -> _NoopContext:
        return _NOOP_CONTEXT

    def count_exceptions(self, exception: Any = Exception) -> _NoopContext:
        return _NOOP_CONTEXT


NOOP = NoopMetric()

AnyMetric = Counter | Gauge | Histogram | Summary | NoopMetric


@overload
def new_metric(kind: Literal["counter"], name: str, documentation: str,
               labelnames: Iterable[str] = (), **kwargs: Any) -> Counter | NoopMetric: ...
@overload
def new_metric(kind: Literal["gauge"], name: str, documentation: str,
               labelnames: Iterable[str] = (), **kwargs: Any) -> Gauge | NoopMetric: ...
@overload
def new_metric(kind: Literal["histogram"], name: str, documentation: str,
               labelnames: Iterable[str] = (), **kwargs: Any) -> Histogram | NoopMetric: ...
@overload
def new_metric(kind: Literal["summary"], name: str, documentation: str,
               labelnames: Iterable[str] = (), **kwargs: Any) -> Summary | NoopMetric: ...
@overload
def new_metric(kind: MetricKind, name: str, documentation: str,
               labelnames: Iterable[str] = (), **kwargs: Any) -> AnyMetric: ...
def new_metric(
    kind: MetricKind,
    name: str,
    documentation: str,
    labelnames: Iterable[str] = (),
    **kwargs: Any,
) -> AnyMetric:
    """Create a registered metric of ``kind`` per the active settings (no-op when disabled).

    The definition is validated even when disabled, so mistakes show up in development.
    Registered in ``_runtime.local_registry()``; a duplicate name there raises
    :class:`MetricDefinitionError`.
    """
    settings = _runtime.get_settings()
    labelnames = validate_definition(kind, name, labelnames)
    if kind == "histogram" and "buckets" in kwargs:
        kwargs["buckets"] = check_buckets(name, kwargs["buckets"])
    if not settings.enabled:
        return NOOP
    cls = _CLASSES[kind]
    try:
        return cls(  # type: ignore[no-any-return]
            name,
            documentation,
            labelnames,
            registry=_runtime.local_registry(),
            max_series=settings.max_series,
            **kwargs,
        )
    except MetricDefinitionError:
        raise
    except ValueError as err:
        raise MetricDefinitionError(
            f"{kind} {name!r} cannot be registered: {err}. Pick a name no other metric uses "
            "(a histogram also takes NAME_bucket, NAME_count and NAME_sum; a counter NAME_total)"
        ) from err


_CLASSES: dict[str, type] = {
    "counter": Counter,
    "gauge": Gauge,
    "histogram": Histogram,
    "summary": Summary,
}
