"""The supported prometheus_client range: declared once in pyproject.toml, checked at import."""

from __future__ import annotations

import importlib.metadata
import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from victor_mp_metrics import _compat
from victor_mp_metrics.exceptions import VictorMetricsError

from ._gunicorn import ROOT

DEPENDENCIES = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
# The specifier pyproject.toml declares, e.g. ">=0.20,<0.27".
DECLARED = next(d.removeprefix("prometheus-client") for d in DEPENDENCIES
                if d.startswith("prometheus-client"))


def _clauses(spec: str) -> set[str]:
    return {c.strip() for c in spec.split(",") if c.strip()}


def test_the_range_is_pyprojects():
    """The range checked is the one pyproject.toml declares, and the fallback for a source
    tree without metadata says the same."""
    declared = _clauses(DECLARED)
    assert declared == _clauses(_compat.supported_range())
    assert declared == _clauses(_compat.FALLBACK_REQUIREMENT.removeprefix("prometheus-client"))


def test_the_range_comes_from_the_installed_metadata(monkeypatch: pytest.MonkeyPatch):
    requires = ['prometheus-client (<0.31,>=0.28)', 'pyyaml>=6; extra == "test"']
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: requires)
    assert ">=0.28,<0.31" == _compat.supported_range()


def test_without_metadata_the_fallback_range_is_used(monkeypatch: pytest.MonkeyPatch):
    def missing(name: str) -> list[str]:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "requires", missing)
    assert _compat.FALLBACK_REQUIREMENT == "prometheus-client" + _compat.supported_range()


def test_the_installed_prometheus_client_is_supported():
    _compat.check_version()


@pytest.mark.parametrize("version", ["0.20.0", "0.20", "0.21.1", "0.23.1", "0.24.1", "0.26.0",
                                     "0.26.9", "0.26.0rc1", "0.26.0+local"])
def test_versions_in_the_range_pass(version: str):
    _compat.check_version(version, ">=0.20,<0.27")


@pytest.mark.parametrize("version", ["0.19.1", "0.17.0", "0.27.0", "0.27.0rc1", "0.30.1", "1.0",
                                     "not-a-version"])
def test_versions_outside_the_range_are_refused_with_the_fix(
    version: str, monkeypatch: pytest.MonkeyPatch
):
    """What the installed metadata reports decides; the error names the installed version,
    the range and the pip command that fixes it."""
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: version if name == "prometheus-client" else real(name))
    with pytest.raises(ImportError) as raised:
        _compat.check_version()
    assert isinstance(raised.value, _compat.UnsupportedVersionError)
    assert isinstance(raised.value, VictorMetricsError)
    spec = _compat.supported_range()
    message = str(raised.value)
    assert f"prometheus-client {version} is installed" in message
    assert f"supports prometheus-client {spec}" in message
    assert f"pip install 'prometheus-client{spec}'" in message


@pytest.mark.parametrize(("version", "spec", "ok"), [
    ("0.26.3", "==0.26.*", True), ("0.27.0", "==0.26.*", False),
    ("0.22.0", "!=0.22.0", False), ("0.22.1", "!=0.22.0", True),
    ("0.21.4", "~=0.21.1", True), ("0.22.0", "~=0.21.1", False),
    ("0.20.0", ">0.20", False), ("0.20.1", ">0.20", True), ("0.26.0", "<=0.26", True),
])
def test_specifier_clauses(version: str, spec: str, ok: bool):
    if ok:
        _compat.check_version(version, spec)
    else:
        with pytest.raises(_compat.UnsupportedVersionError):
            _compat.check_version(version, spec)


def test_prometheus_client_without_metadata_is_not_refused(monkeypatch: pytest.MonkeyPatch):
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert _compat.installed_version() is None
    _compat.check_version()


def _import_in_subprocess(tmp_path: Path, prepend: Path | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (prepend, ROOT) if p is not None)
    return subprocess.run(
        [sys.executable, "-c", "import victor_mp_metrics"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_importing_with_the_installed_prometheus_client_succeeds(tmp_path: Path):
    proc = _import_in_subprocess(tmp_path, None)
    assert 0 == proc.returncode, proc.stderr
    assert "" == proc.stderr


def test_importing_with_an_unsupported_prometheus_client_fails_clearly(tmp_path: Path):
    """A prometheus_client whose metadata says 0.99.0 (a dist-info found first on the path):
    ``import victor_mp_metrics`` raises the ImportError, naming the version and the fix."""
    fake = tmp_path / "site"
    info = fake / "prometheus_client-0.99.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: prometheus_client\nVersion: 0.99.0\n")
    proc = _import_in_subprocess(tmp_path, fake)
    assert 0 != proc.returncode
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("victor_mp_metrics._compat.UnsupportedVersionError: "), proc.stderr
    spec = _compat.supported_range()
    assert "prometheus-client 0.99.0 is installed" in last
    assert f"pip install 'prometheus-client{spec}'" in last


@given(amounts=st.lists(st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 5.0, 10.0, 60000.0, 1e308])), max_size=20))
def test_direct_writes_equal_prometheus_clients_own(amounts: list[float]) -> None:
    """The request path's direct writes (_compat.incrementer, observe, bucket) leave the same
    values as prometheus_client's inc() and observe() (bounds, NaN and infinities too)."""
    registry = CollectorRegistry()
    buckets = (5.0, 10.0, 25.0, 60000.0)
    stock = Histogram("stock_ms", "h", ["a"], buckets=buckets, registry=registry).labels("x")
    ours = Histogram("ours_ms", "h", ["a"], buckets=buckets, registry=registry).labels("x")
    stock_c = Counter("stock_c", "c", registry=registry)
    ours_c = Counter("ours_c", "c", registry=registry)
    parts = _compat.histogram_parts(ours)
    assert parts is not None
    add = _compat.incrementer(ours_c, 1.0)
    for amount in amounts:
        stock.observe(amount)
        _compat.observe(parts, amount)
        stock_c.inc(1.0)
        add()

    def values(name: str) -> list[tuple[str, dict[str, str], float]]:
        return [(s.name.removeprefix(name), s.labels, s.value)
                for m in registry.collect() if m.name == name for s in m.samples
                if not s.name.endswith("_created")]

    def same(a: float, b: float) -> bool:
        return a == b or (math.isnan(a) and math.isnan(b))

    pairs = list(zip(values("stock_ms"), values("ours_ms"), strict=True))
    assert all(s[:2] == o[:2] and same(s[2], o[2]) for s, o in pairs)
    assert [v[2] for v in values("stock_c")] == [v[2] for v in values("ours_c")]


def test_direct_writes_fall_back_for_what_they_cannot_write() -> None:
    """A labelled parent or a mostrecent gauge gets its own checked methods."""
    registry = CollectorRegistry()
    parent = Counter("p", "c", ["a"], registry=registry)
    recent = Gauge("g", "g", multiprocess_mode="mostrecent", registry=registry)
    assert _compat.incrementer(parent, 1.0).func == parent.inc
    assert _compat.incrementer(recent, 1.0).func == recent.inc
    assert _compat.histogram_parts(parent) is None
