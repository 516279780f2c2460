"""Every use of prometheus_client's private API, in one place.

Each use names the prometheus_client versions it was checked against. The package
declares the range it supports in ``pyproject.toml``; a version outside it is refused at
import time by :func:`check_version` rather than counting nothing in silence.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client import exposition as _exposition
from prometheus_client import values as _values

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
