"""The package's public surface and packaging."""

from __future__ import annotations

import importlib.resources

import victor_mp_metrics


def test_public_api_is_sorted_and_importable():
    """__all__ is sorted and every name in it exists."""
    names = victor_mp_metrics.__all__
    assert sorted(names) == names
    assert [] == [n for n in names if not hasattr(victor_mp_metrics, n)]


def test_guide_api_is_public():
    """The guide's entry points are importable from the package root."""
    for name in ("MetricsCollector", "get_prometheus_registry", "start_metrics_server"):
        assert name in victor_mp_metrics.__all__


def test_ships_py_typed():
    """The package is marked as typed (PEP 561)."""
    assert importlib.resources.files("victor_mp_metrics").joinpath("py.typed").is_file()
