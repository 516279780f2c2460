"""Every use of prometheus_client's private API, in one place.

Each use names the prometheus_client versions it was checked against. The package
declares the range it supports in ``pyproject.toml``; a version outside it is refused at
import time by :func:`check_version` rather than counting nothing in silence.
"""

from __future__ import annotations

import importlib.metadata
import re
from bisect import bisect_left
from collections.abc import Callable, Mapping
from functools import partial
from types import BuiltinFunctionType
from typing import Any, Protocol

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client import exposition as _exposition
from prometheus_client import values as _values

from .exceptions import VictorMetricsError

# --- the supported prometheus_client range, checked before any private API is touched ------
# The range is declared once, in pyproject.toml's ``dependencies``, and read back from the
# installed distribution's metadata. FALLBACK_REQUIREMENT serves only a source tree that was
# never installed; tests/test_support_range.py keeps it equal to pyproject.toml.
DISTRIBUTION = "victor-mp-metrics"
PROMETHEUS_CLIENT = "prometheus-client"
FALLBACK_REQUIREMENT = "prometheus-client>=0.20,<0.27"

_REQUIREMENT = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*"
    r"\(?(?P<spec>[^;()]*)\)?\s*(?:;(?P<marker>.*))?$"
)
_CLAUSE = re.compile(r"^\s*(?P<op>~=|===|==|!=|<=|>=|<|>)\s*(?P<version>\S+?)\s*$")
_RELEASE = re.compile(r"^v?(\d+(?:\.\d+)*)")


class UnsupportedVersionError(VictorMetricsError, ImportError):
    """The installed prometheus_client is outside the range this package supports."""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _release(version: str) -> tuple[int, ...]:
    """The release segment of a version (``0.26.0rc1`` -> (0, 26, 0)), zeros trimmed."""
    match = _RELEASE.match(version.strip())
    if match is None:
        raise ValueError(f"not a version: {version!r}")
    parts = [int(p) for p in match.group(1).split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def _prefix(version: str, prefix: str) -> bool:
    wanted = _release(prefix)
    have = _release(version) + (0,) * len(wanted)
    return have[: len(wanted)] == wanted


def _allows(version: str, clause: str) -> bool:
    match = _CLAUSE.match(clause)
    if match is None:
        raise ValueError(f"cannot read the version clause {clause!r}")
    op, bound = match.group("op"), match.group("version")
    if op in ("==", "!=") and bound.endswith(".*"):
        return _prefix(version, bound[:-2]) == (op == "==")
    if op == "===":
        return version.strip() == bound
    have, edge = _release(version), _release(bound)
    if op == "~=":
        return have >= edge and _prefix(version, bound.rsplit(".", 1)[0])
    return {"==": have == edge, "!=": have != edge, "<=": have <= edge,
            ">=": have >= edge, "<": have < edge, ">": have > edge}[op]


def supported_range() -> str:
    """The prometheus-client versions this package supports, as declared in pyproject.toml
    (read from the installed metadata), e.g. ``>=0.20,<0.27``."""
    try:
        requires = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        requires = []
    for requirement in [*requires, FALLBACK_REQUIREMENT]:
        match = _REQUIREMENT.match(requirement)
        if (match is not None and _canonical(match.group("name")) == PROMETHEUS_CLIENT
                and "extra" not in (match.group("marker") or "")):
            clauses = [c.strip() for c in match.group("spec").split(",") if c.strip()]
            # Lower bounds first: ">=0.20,<0.27" rather than the metadata's "<0.27,>=0.20".
            return ",".join(sorted(clauses, key=lambda c: not c.startswith((">", "~", "="))))
    raise AssertionError("unreachable: FALLBACK_REQUIREMENT names prometheus-client")


def installed_version() -> str | None:
    """The installed prometheus-client version, or None when it has no metadata."""
    try:
        return importlib.metadata.version(PROMETHEUS_CLIENT)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_version(installed: str | None = None, supported: str | None = None) -> None:
    """Refuse (:class:`UnsupportedVersionError`, an ImportError) a prometheus_client outside
    the supported range: this module's uses of its private API are checked against that range
    only, and outside it the package could count nothing in silence.

    ``installed`` and ``supported`` default to the installed version and
    :func:`supported_range`; a prometheus_client without metadata is not refused.
    """
    installed = installed_version() if installed is None else installed
    supported = supported_range() if supported is None else supported
    if installed is None:
        return
    try:
        ok = all(_allows(installed, c) for c in supported.split(",") if c.strip())
    except ValueError:
        ok = False
    if not ok:
        raise UnsupportedVersionError(
            f"victor-mp-metrics supports prometheus-client {supported}, but prometheus-client "
            f"{installed} is installed. victor_mp_metrics uses prometheus_client internals "
            f"checked against that range only; with another version it could count nothing. "
            f"Install a supported version: pip install 'prometheus-client{supported}'"
        )


check_version()

# Checked against 0.20.0 - 0.26.x: ``values.ValueClass`` is read by every metric's
# ``_metric_init`` when the metric (or a labelled child) is created.
ORIGINAL_VALUE_CLASS: Any = _values.ValueClass

# Checked against 0.20.0 - 0.26.x: the gauge modes prometheus_client accepts.
GAUGE_MODES: frozenset[str] = frozenset(prometheus_client.Gauge._MULTIPROC_MODES)


def set_value_class(cls: Any) -> None:
    """Make metrics created from now on store their values in ``cls`` (None: stock)."""
    _values.ValueClass = ORIGINAL_VALUE_CLASS if cls is None else cls


def bake_output(
    registry: CollectorRegistry,
    accept: str | None,
    accept_encoding: str | None,
    params: Mapping[str, list[str]],
) -> tuple[str, list[tuple[str, str]], bytes]:
    """Status, headers and body of a scrape, negotiated as prometheus_client's own servers
    do (format, gzip, ``name[]`` filter). Checked against 0.20.0 - 0.26.x: the signature
    ``_bake_output(registry, accept_header, accept_encoding_header, params,
    disable_compression)`` and its (status, headers, output) result."""
    status, headers, body = _exposition._bake_output(  # type: ignore[no-untyped-call]
        registry, accept, accept_encoding, params, False
    )
    return str(status), list(headers), bytes(body)


# --- metric internals (checked against 0.20.0 - 0.26.x) -------------------------------------
# A parent metric keeps its children in ``_metrics`` (label values tuple -> child) under
# ``_lock``, and builds one by calling its class with ``_labelvalues=`` and the parent's
# ``_kwargs``; ``_labelnames``, ``_labelvalues``, ``_name``, ``_original_name``,
# ``_documentation`` and ``_type`` describe it.


def label_names(metric: Any) -> tuple[str, ...]:
    return tuple(metric._labelnames)


def is_child(metric: Any) -> bool:
    return bool(metric._labelvalues)


def metric_type(metric: Any) -> str:
    return str(metric._type)


def metric_name(metric: Any) -> str:
    return str(metric._name)


def metric_lock(metric: Any) -> Any:
    return metric._lock


def registered_children(metric: Any) -> dict[tuple[str, ...], Any]:
    """A copy of the children prometheus_client collects (caller holds the metric lock)."""
    return dict(metric._metrics)


def add_child(metric: Any, key: tuple[str, ...]) -> Any:
    """Build and register the child of ``metric`` for label values ``key`` (caller holds
    the metric lock); it is collected like a child made by ``labels()``.

    As prometheus_client's own ``labels()``: from 0.24 the parent keeps its name as given
    in ``_original_name`` and the child gets namespace, subsystem and unit again; before
    0.24, ``_name`` already holds them (checked against 0.20.0, 0.23.1, 0.24.1, 0.26.0).
    """
    original = getattr(metric, "_original_name", None)
    if original is None:
        child = metric.__class__(metric._name, metric._documentation, metric._labelnames,
                                 unit=metric._unit, _labelvalues=key, **metric._kwargs)
    else:
        child = metric.__class__(original, metric._documentation, metric._labelnames,
                                 namespace=metric._namespace, subsystem=metric._subsystem,
                                 unit=metric._unit, _labelvalues=key, **metric._kwargs)
    metric._metrics[key] = child
    return child


# --- direct writes for the request path (checked against 0.20.0 - 0.26.x) -----------------
# After its checks, ``Counter.inc``/``Gauge.inc`` of an observable child is
# ``_value.inc(amount)``; ``Histogram.observe`` is ``_sum.inc(amount)`` and
# ``_buckets[i].inc(1)`` for the first ``i`` with ``amount <= _upper_bounds[i]``.


def _observable(metric: Any) -> bool:
    return isinstance(metric, prometheus_client.metrics.MetricWrapperBase) and (
        not metric._labelnames or bool(metric._labelvalues))


def value_of(metric: Any) -> Any | None:
    """The value ``inc()`` writes through, of an observable counter or gauge child that may
    be incremented; None for anything else (a no-op metric, a ``mostrecent`` gauge)."""
    kinds = (prometheus_client.Counter, prometheus_client.Gauge)
    if _observable(metric) and isinstance(metric, kinds) and \
            not getattr(metric, "_is_most_recent", False):
        return metric._value
    return None


def incrementer(metric: Any, amount: float) -> Callable[[], None]:
    """A call adding ``amount`` to ``metric`` (a counter or gauge child): its value class's
    ``add_each`` with the arguments bound when that is a C function (no Python frame at
    all, with the optional extension), else its value's ``inc`` (:func:`value_of`), else
    the metric's own checked ``inc``."""
    value = value_of(metric)
    if value is None:
        return partial(metric.inc, amount)
    add = batch_adder([value])
    if isinstance(add, BuiltinFunctionType):
        return partial(add, (value,), (float(amount),))
    return partial(value.inc, amount)


def batch_adder(values: list[Any]) -> Callable[[tuple[Any, ...], tuple[float, ...]], None] | None:
    """``add(values, amounts)`` incrementing several values under one lock, when their
    value class has it (ours in multiprocess mode, ``add_each``); None otherwise."""
    return _shared(values, "add_each")  # type: ignore[no-any-return]


def _shared(values: Any, name: str) -> Any:
    """The attribute ``name`` of the one value class of ``values``; None when they are of
    several classes or it has none (one lock then covers them all)."""
    kinds = {type(value) for value in values}
    return getattr(kinds.pop(), name, None) if len(kinds) == 1 else None


def ending(
    parts: tuple[list[float], list[Any], Any] | None, value: Any
) -> Callable[[float], None] | None:
    """``end(amount)``: ``observe(amount)`` on :func:`histogram_parts` ``parts`` and -1 on
    ``value`` (from :func:`value_of`) under one lock, when their value class has
    ``observe_and_add`` (ours in multiprocess mode); None otherwise. ``amount`` must not
    be NaN (it has no bucket)."""
    if parts is None or value is None:
        return None
    bounds, buckets, total = parts
    values = (total, *buckets, value)
    observe = _shared(values, "observe_and_add")
    if observe is None:
        return None
    return partial(observe, values, tuple(float(b) for b in bounds), -1.0)


def histogram_parts(metric: Any) -> tuple[list[float], list[Any], Any] | None:
    """(upper bounds, bucket values, sum value) of an observable histogram child, for
    :func:`observe`; None for anything else."""
    if _observable(metric) and isinstance(metric, prometheus_client.Histogram):
        return list(metric._upper_bounds), list(metric._buckets), metric._sum
    return None


def bucket(parts: tuple[list[float], list[Any], Any], amount: float) -> Any:
    """The bucket value ``observe(amount)`` increments (``amount`` not NaN: NaN has none)."""
    return parts[1][bisect_left(parts[0], amount)]


def observe(parts: tuple[list[float], list[Any], Any], amount: float) -> None:
    """``Histogram.observe(amount)`` on :func:`histogram_parts`."""
    parts[2].inc(amount)
    if amount == amount:
        bucket(parts, amount).inc(1)


# --- multiprocess mode for what prometheus_client keeps in memory only ------------------------
# Checked against 0.20.0 - 0.26.x: Info keeps its dict in ``_value`` and Enum its state index
# in ``_value`` with the names in ``_states``; Gauge.set_function replaces
# ``_child_samples``; remove()/clear() edit ``_metrics`` under ``_lock`` (and warn in
# multiprocess mode, which we replace by tombstones).


class MultiprocessSink(Protocol):
    """What the patched methods report to (the runtime, writing through the store)."""

    def record_info(self, name: str, labels: dict[str, str], help_text: str,
                    info: dict[str, str]) -> None: ...
    def record_state(self, name: str, labels: dict[str, str], help_text: str,
                     states: list[str], index: int) -> None: ...
    def sample_function(self, value: Any, f: Callable[[], float]) -> None: ...
    def removed(self, name: str, labels: dict[str, str] | None) -> None: ...


_ORIGINALS: dict[tuple[type, str], Any] = {}


def _base_labels(metric: Any) -> dict[str, str]:
    return dict(zip(metric._labelnames, metric._labelvalues, strict=False))


def install_multiprocess_patches(sink: MultiprocessSink) -> None:
    """Make Info, Enum, ``Gauge.set_function``, ``remove()`` and ``clear()`` of every
    prometheus_client metric (ours subclass them) report to ``sink``."""
    if _ORIGINALS:
        restore_patches()

    def info(self: Any, val: dict[str, str]) -> None:
        _ORIGINALS[(prometheus_client.Info, "info")](self, val)
        sink.record_info(self._name, _base_labels(self), self._documentation, dict(val))

    def state(self: Any, state_name: str) -> None:
        _ORIGINALS[(prometheus_client.Enum, "state")](self, state_name)
        sink.record_state(self._name, _base_labels(self), self._documentation,
                          list(self._states), int(self._value))

    def set_function(self: Any, f: Callable[[], float]) -> None:
        _ORIGINALS[(prometheus_client.Gauge, "set_function")](self, f)
        sink.sample_function(self._value, f)

    def remove(self: Any, *labelvalues: Any) -> None:
        if not self._labelnames:
            raise ValueError(f"No label names were set when constructing {self}")
        if len(labelvalues) != len(self._labelnames):
            raise ValueError(f"Incorrect label count (expected {len(self._labelnames)}, "
                             f"got {labelvalues})")
        values = tuple(str(v) for v in labelvalues)
        with self._lock:
            self._metrics.pop(values, None)
        sink.removed(self._name, dict(zip(self._labelnames, values, strict=True)))

    def clear(self: Any) -> None:
        if not self._labelnames:
            return
        with self._lock:
            self._metrics = {}
        sink.removed(self._name, None)

    base = prometheus_client.metrics.MetricWrapperBase
    for cls, name, func in ((prometheus_client.Info, "info", info),
                            (prometheus_client.Enum, "state", state),
                            (prometheus_client.Gauge, "set_function", set_function),
                            (base, "remove", remove), (base, "clear", clear)):
        _ORIGINALS[(cls, name)] = cls.__dict__[name]
        setattr(cls, name, func)


def set_value(metric: Any, value: float) -> None:
    """Set a counter (or any metric child) to a cumulative figure sampled elsewhere."""
    metric._value.set(value)


def restore_patches() -> None:
    """Put prometheus_client's own methods back."""
    for (cls, name), func in _ORIGINALS.items():
        setattr(cls, name, func)
    _ORIGINALS.clear()
