"""Checking metric definitions and label values, with errors that say what to do."""

from __future__ import annotations

import re
from collections.abc import Iterable

from .exceptions import LabelError, MetricDefinitionError

MAX_LABEL_VALUE_LENGTH = 1024

_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_RESERVED: dict[str, dict[str, str]] = {
    "histogram": {"le": "Prometheus adds it to every bucket"},
    "summary": {"quantile": "Prometheus adds it to every quantile"},
    "gauge": {},
    "counter": {},
}


def _suggest(name: str, pattern: str) -> str:
    fixed = re.sub(pattern, "_", name) or "_"
    return "_" + fixed if fixed[0].isdigit() else fixed


def validate_definition(kind: str, name: object, labelnames: Iterable[object]) -> tuple[str, ...]:
    """Check a metric's name and label names; return the label names as a tuple.

    Raises :class:`MetricDefinitionError` saying what to rename.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        hint = (
            f" (for example {_suggest(name, r'[^a-zA-Z0-9_:]')!r})" if isinstance(name, str) else ""
        )
        raise MetricDefinitionError(
            f"metric name {name!r} is invalid: use only letters, digits, '_' and ':', "
            f"not starting with a digit{hint}"
        )
    names = tuple(labelnames)
    reserved = _RESERVED.get(kind, {})
    seen: set[str] = set()
    for label in names:
        if not isinstance(label, str) or not _LABEL_RE.match(label):
            hint = (
                f" (for example {_suggest(label, r'[^a-zA-Z0-9_]')!r})"
                if isinstance(label, str)
                else ""
            )
            raise MetricDefinitionError(
                f"{kind} {name!r}: label name {label!r} is invalid: use only letters, digits "
                f"and '_', not starting with a digit{hint}"
            )
        if label.startswith("__"):
            raise MetricDefinitionError(
                f"{kind} {name!r}: label name {label!r} is reserved (names starting with '__' "
                f"belong to Prometheus); rename it, for example to {label.lstrip('_')!r}"
            )
        if label in reserved:
            raise MetricDefinitionError(
                f"{kind} {name!r}: label name {label!r} is reserved on a {kind} "
                f"({reserved[label]}); rename it, for example to '{label}_label'"
            )
        if label in seen:
            raise MetricDefinitionError(
                f"{kind} {name!r}: label name {label!r} is given twice in {names!r}"
            )
        seen.add(label)
    return names  # type: ignore[return-value]


def label_value(metric: str, label: str, value: object) -> str:
    """``value`` as a label value of ``metric``: str, or int/bool converted with str()."""
    if isinstance(value, str):
        text = str.__str__(value)
    elif isinstance(value, int):
        text = str(value)
    else:
        raise LabelError(
            f"{metric}: label {label!r} must be a str (int and bool are converted), got "
            f"{value!r} of type {type(value).__name__}; pass a string such as 'unknown'"
        )
    if len(text) > MAX_LABEL_VALUE_LENGTH:
        raise LabelError(
            f"{metric}: label {label!r} value is {len(text)} characters long, more than the "
            f"limit of {MAX_LABEL_VALUE_LENGTH} ({text[:40]!r}...); use a bounded value such as "
            "a route template or a category, not raw input"
        )
    return text


def check_buckets(name: str, buckets: Iterable[float]) -> tuple[float, ...]:
    """Histogram bucket bounds as floats, or :class:`MetricDefinitionError` saying why not."""
    try:
        bounds = tuple(float(b) for b in buckets)
    except (TypeError, ValueError):
        raise MetricDefinitionError(
            f"histogram {name!r}: buckets must be numbers, got {buckets!r}"
        ) from None
    if not bounds or any(b != b for b in bounds):
        raise MetricDefinitionError(
            f"histogram {name!r}: buckets must be a non-empty list of numbers, got {bounds!r}"
        )
    if list(bounds) != sorted(set(bounds)):
        raise MetricDefinitionError(
            f"histogram {name!r}: buckets must be strictly increasing, got {bounds!r}; "
            f"use {tuple(sorted(set(bounds)))!r}"
        )
    return bounds
