"""Exceptions raised by victor_mp_metrics; each class says when it is raised."""

from __future__ import annotations


class VictorMetricsError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigurationError(VictorMetricsError, ValueError):
    """A setting (environment variable or argument) has a value we cannot use."""


class MetricDefinitionError(VictorMetricsError, ValueError):
    """A metric is defined badly, or again with a definition that conflicts with the first."""


class LabelError(VictorMetricsError, ValueError):
    """Label values given to a metric do not match its label names."""


class DirectoryError(VictorMetricsError, OSError):
    """The multiprocess directory is missing, unusable or unsafe."""


class PushError(VictorMetricsError, OSError):
    """A Pushgateway could not be reached, answered with a status other than 2xx (nothing
    was pushed), or did not answer in time (the push may have landed)."""


class UnsafeDirectoryError(DirectoryError):
    """The multiprocess directory could be written by other users; it is refused."""
