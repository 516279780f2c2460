"""The package as users get it: sdist and wheel built with ``python -m build``, installed
into a clean virtual environment, and the quick start run from that environment.

Once per test session (shared by pytest-xdist workers through a lock file), the source
tree is copied to a temporary directory (so the build writes no ``build/`` or
``*.egg-info`` into the checkout and no stale egg-info adds files), ``build`` is installed
into a builder venv, and ``python -m build`` makes the sdist and then the wheel from that
sdist in an isolated environment (setuptools from PyPI, as pyproject.toml's
build-system asks). The wheel is installed with pip (dependencies from PyPI) into a new
venv created without ``--system-site-packages``. Every command runs from a directory
outside the repository with PYTHONPATH unset, so nothing can import the checkout.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from ._gunicorn import ROOT, free_port, parse_samples, request, stop, total, wait_ready

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
PACKAGE = "victor_mp_metrics"
VERSION = PROJECT["version"]
DIST_NAME = re.sub(r"[-_.]+", "_", PROJECT["name"]).lower()  # victor_mp_metrics
REQUESTS = 30
STEP_TIMEOUT = 300  # seconds for one venv, pip or build command
# Not copied into the build tree: caches, build output, virtual environments.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".hypothesis", ".mypy_cache", ".pytest_cache", ".ruff_cache", "__pycache__",
    "*.egg-info", "build", "dist", ".venv", "venv", "tmp", "*.pyc",
)

QUICKSTART_APP = '''\
"""The quick start: a Flask app instrumented with VictorMetrics."""
from flask import Flask

from victor_mp_metrics.flask_ext import VictorMetrics

app = Flask(__name__)
VictorMetrics(app)


@app.get("/hello")
def hello():
    return "hello\\n"
'''

QUICKSTART_GUNICORN_CONF = '''\
"""The quick start's gunicorn.conf.py: the library's hooks, nothing else of the repo."""
from victor_mp_metrics.gunicorn_hooks import (  # noqa: F401 - Gunicorn finds them by name
    child_exit,
    on_exit,
    on_starting,
    post_fork,
    when_ready,
)

workers = 2
worker_class = "sync"
# Gunicorn 27's control socket is one path per user; parallel tests would share it.
control_socket_disable = True
'''


@dataclass(frozen=True)
class Packaged:
    """What the session built and installed."""

    sdist: Path
    wheel: Path
    venv: Path

    def bin(self, name: str) -> Path:
        return self.venv / "bin" / name


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that could point Python at the checkout."""
    dropped = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PROMETHEUS_MULTIPROC_DIR",
               "prometheus_multiproc_dir", "PYTHONSTARTUP")
    env = {k: v for k, v in os.environ.items()
           if k not in dropped and not k.startswith(("VICTOR_", "PYTEST_"))}
    env["PYTHONNOUSERSITE"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.update(extra)
    return env


def run(args: list[str | Path], cwd: Path, timeout: float = STEP_TIMEOUT,
        env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command; fails with its output unless it exits 0."""
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=dict(env or clean_env()), capture_output=True,
        text=True, timeout=timeout, check=False,
    )
    assert 0 == result.returncode, (
        f"{' '.join(map(str, args))} exited {result.returncode}\n"
        f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result


def _build_and_install(work: Path) -> Packaged:
    """Copy the source, build sdist and wheel, install the wheel into a clean venv."""
    source, dist = work / "source", work / "dist"
    for path in (source, dist, work / "build-venv", work / "venv"):
        shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE, symlinks=True)
    builder = work / "build-venv"
    run([sys.executable, "-m", "venv", builder], cwd=work)
    run([builder / "bin" / "python", "-m", "pip", "install", "-q", "build"], cwd=work)
    # No --sdist/--wheel: build makes the sdist, then the wheel from the unpacked sdist.
    run([builder / "bin" / "python", "-m", "build", "--outdir", dist, source], cwd=work)
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")
    venv = work / "venv"
    run([sys.executable, "-m", "venv", venv], cwd=work)
    run([venv / "bin" / "python", "-m", "pip", "install", "-q", wheel], cwd=work)
    return Packaged(sdist, wheel, venv)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def packaged(tmp_path_factory: pytest.TempPathFactory) -> Packaged:
    """sdist, wheel and a venv with the wheel installed; built once per test session."""
    base = tmp_path_factory.getbasetemp()
    # pytest-xdist workers each have their own basetemp under one session directory.
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    work = root / "packaging"
    done = work / "packaged.json"
    with _locked(root / "packaging.lock"):
        if done.exists():
            return Packaged(**{k: Path(v) for k, v in json.loads(done.read_text()).items()})
        work.mkdir(exist_ok=True)
        built = _build_and_install(work)
        done.write_text(json.dumps({k: str(v) for k, v in built.__dict__.items()}))
        return built


def requirement(text: str) -> tuple[str, tuple[str, ...]]:
    """(normalized name, sorted specifiers) of a requirement such as ``flask>=3.0``."""
    match = re.fullmatch(r"\s*([A-Za-z0-9._-]+)\s*(.*?)\s*", text)
    assert match is not None, text
    name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
    specifiers = tuple(sorted(re.sub(r"\s+", "", s) for s in match.group(2).split(",") if s))
    return name, specifiers


def source_modules() -> set[str]:
    """Package files of the checkout, as paths relative to the repository root."""
    found = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / PACKAGE).rglob("*")
        if path.is_file() and (path.suffix == ".py" or path.name == "py.typed")
        and "__pycache__" not in path.parts
    }
    assert f"{PACKAGE}/py.typed" in found and f"{PACKAGE}/__init__.py" in found
    return found


def test_sdist_has_every_module_py_typed_readme_and_metadata(packaged: Packaged) -> None:
    """The sdist holds every package file, py.typed, README, pyproject and PKG-INFO."""
    prefix = f"{DIST_NAME}-{VERSION}"
    assert f"{prefix}.tar.gz" == packaged.sdist.name
    with tarfile.open(packaged.sdist) as sdist:
        names = {name.removeprefix(prefix + "/") for name in sdist.getnames()}
        member = sdist.extractfile(f"{prefix}/PKG-INFO")
        assert member is not None
        pkg_info = member.read().decode()
    assert set() == source_modules() - names, "package files missing from the sdist"
    assert {"README.md", "pyproject.toml", "PKG-INFO", "setup.py",
            f"{PACKAGE}/_mpdir/_speedups.c", f"{PACKAGE}/_wsgi_request.c"} <= names
    # A license file, if the checkout has one, must ship; the declared license always does.
    licenses = {path.name for path in ROOT.glob("LICEN[CS]E*")}
    assert set() == licenses - names
    assert re.search(r"^License(-Expression)?: Apache-2\.0$", pkg_info, re.M), pkg_info[:2000]
    assert [] == [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".db"))]


def test_wheel_has_every_module_py_typed_entry_point_and_dependencies(
    packaged: Packaged,
) -> None:
    """The wheel holds every package file, the compiled request-path modules (this Python's
    wheel, built where a C compiler is), the console script and pyproject's dependencies."""
    tag = "cp{0}{1}-cp{0}{1}-".format(*sys.version_info[:2])
    assert packaged.wheel.name.startswith(f"{DIST_NAME}-{VERSION}-{tag}")
    dist_info = f"{DIST_NAME}-{VERSION}.dist-info"
    with zipfile.ZipFile(packaged.wheel) as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read(f"{dist_info}/METADATA").decode()
        entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
    assert set() == source_modules() - names, "package files missing from the wheel"
    for module in ("_mpdir/_speedups.", "_wsgi_request."):
        assert [n for n in names if n.startswith(f"{PACKAGE}/{module}") and
                n.endswith(".so")], f"the C extension {module} is missing from the wheel"
    outside = sorted({n.split("/")[0] for n in names} - {PACKAGE, dist_info})
    assert [] == outside, "the wheel installs more than the package"
    assert "victor-metrics = victor_mp_metrics.cli:main" in entry_points
    requires = [line.split(":", 1)[1] for line in metadata.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert sorted(map(requirement, PROJECT["dependencies"])) == sorted(map(requirement, requires))


def test_console_script_prints_the_version_from_the_clean_venv(
    packaged: Packaged, tmp_path: Path
) -> None:
    """victor-metrics --version runs from the venv, and the venv imports the installed copy."""
    result = run([packaged.bin("victor-metrics"), "--version"], cwd=tmp_path, timeout=60)
    assert f"victor-metrics {VERSION}" == result.stdout.strip()
    where = run(
        [packaged.bin("python"), "-c",
         "import sys, victor_mp_metrics; print(victor_mp_metrics.__file__); print(sys.prefix)"],
        cwd=tmp_path, timeout=60,
    ).stdout.split()
    assert Path(where[0]).is_relative_to(packaged.venv), where
    assert not Path(where[0]).is_relative_to(ROOT), where
    assert Path(where[1]) == packaged.venv
    run([packaged.bin("python"), "-m", "pip", "check"], cwd=tmp_path, timeout=120)


@pytest.mark.gunicorn
def test_quick_start_counts_exactly_the_requests_sent(packaged: Packaged, tmp_path: Path) -> None:
    """Gunicorn from the venv, the library's hooks and VictorMetrics count 30 of 30 requests."""
    assert not tmp_path.is_relative_to(ROOT)
    (tmp_path / "quickstart_app.py").write_text(QUICKSTART_APP)
    (tmp_path / "gunicorn_conf.py").write_text(QUICKSTART_GUNICORN_CONF)
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir(mode=0o700)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "gunicorn.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(packaged.bin("gunicorn")), "-c", "gunicorn_conf.py",
             "-b", f"127.0.0.1:{port}", "quickstart_app:app"],
            cwd=tmp_path, env=clean_env(PROMETHEUS_MULTIPROC_DIR=str(metrics_dir)),
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def logs() -> str:
        return log.read_text(errors="replace")[-5000:]

    try:
        wait_ready(proc, "gunicorn", lambda: request(f"{url}/metrics", timeout=2).status == 200,
                   logs)
        statuses = [request(f"{url}/hello", timeout=10).status for _ in range(REQUESTS)]
        assert [200] * REQUESTS == statuses
        deadline = time.monotonic() + 10
        while True:  # a duration is observed when the worker closes the response, after
            # its last byte reached the client: the last one may land a moment later
            samples = parse_samples(request(f"{url}/metrics").text)
            counted = (total(samples, "victor_requests_total", endpoint="/hello"),
                       total(samples, "victor_request_duration_ms_count", endpoint="/hello"))
            if counted == (REQUESTS, REQUESTS) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert {'victor_requests_total{endpoint="/hello",method="GET"}': float(REQUESTS)} == {
            k: v for k, v in samples.items() if k.startswith("victor_requests_total{")
        }, logs()
        assert 0 == total(samples, "victor_request_errors_total")
        assert REQUESTS == total(samples, "victor_request_duration_ms_count", endpoint="/hello")
        assert any(name.endswith(".db") for name in os.listdir(metrics_dir)), "no data files"
        assert "Traceback" not in logs(), logs()
    finally:
        stop(proc)
