"""Multiprocess Prometheus metrics for Victor AI services under Gunicorn."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from ._compat import check_version  # noqa: F401 - first: refuses unsupported prometheus_client
from ._exposition import gather, render
from ._metrics import Counter, Gauge, GaugeMode, Histogram, NoopMetric, Summary
from ._mpdir import on_grid
from ._runtime import configure, get_settings, is_configured, reset
from ._server import MetricsServer, start_metrics_server
from .catalog import CATALOG, Catalog, MetricSpec, catalog_table_markdown, get_catalog
from .collector import MetricsCollector
from .exceptions import (
    ConfigurationError,
    DirectoryError,
    LabelError,
    MetricDefinitionError,
    PushError,
    UnsafeDirectoryError,
    VictorMetricsError,
)
from .instrument import (
    record_cache_hit,
    record_cache_miss,
    record_request,
    set_cache_size,
    track_coordinator,
    track_llm_call,
    track_request_in_flight,
    track_tool,
)
from .push import push_directory
from .registry import BoundMetric, PrometheusRegistry, get_prometheus_registry
from .settings import DeploymentSettings, Settings, load_deployment_settings, load_settings

try:
    __version__ = version("victor-mp-metrics")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "BoundMetric",
    "CATALOG",
    "Catalog",
    "ConfigurationError",
    "Counter",
    "DeploymentSettings",
    "DirectoryError",
    "Gauge",
    "GaugeMode",
    "Histogram",
    "LabelError",
    "MetricDefinitionError",
    "MetricSpec",
    "MetricsCollector",
    "MetricsServer",
    "NoopMetric",
    "PrometheusRegistry",
    "PushError",
    "Settings",
    "Summary",
    "UnsafeDirectoryError",
    "VictorMetricsError",
    "__version__",
    "catalog_table_markdown",
    "configure",
    "gather",
    "get_catalog",
    "get_prometheus_registry",
    "get_settings",
    "is_configured",
    "load_deployment_settings",
    "load_settings",
    "on_grid",
    "push_directory",
    "record_cache_hit",
    "record_cache_miss",
    "record_request",
    "render",
    "reset",
    "set_cache_size",
    "start_metrics_server",
    "track_coordinator",
    "track_llm_call",
    "track_request_in_flight",
    "track_tool",
]
