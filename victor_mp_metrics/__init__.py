"""Multiprocess Prometheus metrics for Victor AI services under Gunicorn."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from ._state import configure, get_settings, is_configured, reset
from .exceptions import (
    ConfigurationError,
    DirectoryError,
    LabelError,
    MetricDefinitionError,
    VictorMetricsError,
)
from .settings import Settings, load_settings

try:
    __version__ = version("victor-mp-metrics")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "ConfigurationError",
    "DirectoryError",
    "LabelError",
    "MetricDefinitionError",
    "Settings",
    "VictorMetricsError",
    "__version__",
    "configure",
    "get_settings",
    "is_configured",
    "load_settings",
    "reset",
]
