"""Shared fixtures: a fresh metrics directory and fresh package state for every test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from victor_mp_metrics import _runtime

_OUR_ENV = ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test starts unconfigured, in single-process mode, with no VICTOR_* variables."""
    for name in list(os.environ):
        if name.startswith("VICTOR_") or name in _OUR_ENV:
            monkeypatch.delenv(name, raising=False)
    _runtime.reset()
    yield
    _runtime.reset()


@pytest.fixture
def metrics_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private multiprocess directory, set in PROMETHEUS_MULTIPROC_DIR and configured."""
    path = tmp_path / "metrics"
    path.mkdir(mode=0o700)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(path))
    _runtime.configure()
    return path


@pytest.fixture(params=["C", "Python"])
def wsgi_request_implementation(request: pytest.FixtureRequest,
                                monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with each implementation of a WSGI request: the C extension's
    (``_wsgi_request.Request``, the default when built) and the Python ``wsgi._Request``."""
    from victor_mp_metrics import wsgi

    if request.param == "Python":
        monkeypatch.setattr(wsgi, "_FastRequest", None)
    elif wsgi._FastRequest is None:
        if os.environ.get("CI"):
            pytest.fail("the C extension victor_mp_metrics._wsgi_request was not built; "
                        ".ci/run installs gcc so that `pip install -e .` builds it")
        pytest.skip("built without the C extensions (no C compiler at install)")
    return str(request.param)
