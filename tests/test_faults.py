"""Faults under a real Gunicorn: a broken directory, and resources under sustained load."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from ._gunicorn import Gunicorn, gunicorn, parse_samples, total

pytestmark = pytest.mark.gunicorn
APP = "tests.apps.testapp:app"
# The workers' watchdog checks the directory every 2 s.
RECOVERY_TIMEOUT = 15.0


def _ok_total(server: Gunicorn) -> float:
    resp = server.get("/metrics")
    assert 200 == resp.status, resp.text
    return total(parse_samples(resp.text), "victor_requests_total", endpoint="/ok")


def _wait_total(server: Gunicorn, expected: float) -> float:
    deadline = time.monotonic() + RECOVERY_TIMEOUT
    seen = _ok_total(server)
    while seen != expected and time.monotonic() < deadline:
        time.sleep(0.25)
        seen = _ok_total(server)
    return seen


def _send(server: Gunicorn, count: int) -> None:
    statuses = [server.get("/ok").status for _ in range(count)]
    assert [200] * count == statuses


@pytest.mark.parametrize("fault", ["replaced", "deleted"])
def test_directory_replaced_or_deleted_loses_nothing(tmp_path: Path, fault: str):
    """The directory deleted (and maybe re-created) under a running server: totals come back."""
    with gunicorn(tmp_path, workers=2, app=APP, ready_path="/metrics") as server:
        directory = server.directory
        _send(server, 40)
        assert 40.0 == _wait_total(server, 40.0)
        shutil.rmtree(directory)
        if fault == "replaced":
            directory.mkdir(mode=0o700)
        _send(server, 20)
        assert 60.0 == _wait_total(server, 60.0), server.logs()
        assert "removed or replaced" in server.logs()
        assert server.proc.poll() is None


def test_unusable_directory_keeps_serving_and_the_arbiter_alive(tmp_path: Path):
    """The directory path turned into a file: requests still succeed, errors are logged and
    counted, a killed worker is replaced, and totals return once the path is usable."""
    with gunicorn(tmp_path, workers=2, app=APP, ready_path="/metrics") as server:
        directory = server.directory
        _send(server, 10)
        assert 10.0 == _wait_total(server, 10.0)
        shutil.rmtree(directory)
        directory.write_text("not a directory")
        _send(server, 30)
        time.sleep(3)  # let the watchdogs fail at least once
        os.kill(server.workers()[0], signal.SIGKILL)
        server.wait_workers(2)
        _send(server, 10)
        assert "cannot write metric files" in server.logs()
        assert server.proc.poll() is None, "the arbiter died"
        directory.unlink()
        # The surviving worker's 10+30+10-ish requests come back; the killed worker's
        # in-memory counts died with it, so only a lower bound is exact.
        deadline = time.monotonic() + RECOVERY_TIMEOUT
        seen = 0.0
        while time.monotonic() < deadline:
            resp = server.get("/metrics")
            samples = parse_samples(resp.text)
            seen = total(samples, "victor_requests_total", endpoint="/ok")
            if total(samples, "victor_metrics_write_errors_total") >= 1 and seen > 0:
                break
            time.sleep(0.25)
        assert total(samples, "victor_metrics_write_errors_total") >= 1, resp.text
        assert 0 < seen <= 50


def test_sustained_load_keeps_memory_and_descriptors_bounded(tmp_path: Path):
    """A minute of load and scraping: RSS and open files of master and workers stay flat."""
    env = {"VICTOR_MAX_REQUESTS": "0"}
    with gunicorn(tmp_path, workers=2, app=APP, ready_path="/metrics", env=env) as server:
        halt = threading.Event()

        def load() -> None:
            while not halt.is_set():
                server.get("/ok")
                server.get("/stream/3")

        def scrape() -> None:
            while not halt.is_set():
                server.get("/metrics")
                time.sleep(0.05)

        threads = [threading.Thread(target=load) for _ in range(3)]
        threads.append(threading.Thread(target=scrape))
        for t in threads:
            t.start()
        try:
            time.sleep(10)  # warm-up: caches, allocator arenas
            early = _resources(server)
            time.sleep(50)
            late = _resources(server)
        finally:
            halt.set()
            for t in threads:
                t.join(30)
        for pid, (rss, fds) in late.items():
            if pid not in early:
                continue
            rss0, fds0 = early[pid]
            assert rss <= rss0 * 1.10 + 4 * 2**20, f"pid {pid} RSS grew {rss0} -> {rss}"
            assert fds <= fds0 + 2, f"pid {pid} descriptors grew {fds0} -> {fds}"
        print("resources early/late (rss MiB, fds):",
              {p: (round(v[0] / 2**20, 1), v[1]) for p, v in early.items()},
              {p: (round(v[0] / 2**20, 1), v[1]) for p, v in late.items()})


def _resources(server: Gunicorn) -> dict[int, tuple[int, int]]:
    master = psutil.Process(server.proc.pid)
    out = {}
    for proc in [master, *master.children()]:
        out[proc.pid] = (proc.memory_info().rss, proc.num_fds())
    return out


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"VICTOR_WORKERS": "lots"}, "VICTOR_WORKERS='lots' is not valid"),
        ({"VICTOR_METRICS_PORT": "99999"}, "VICTOR_METRICS_PORT='99999' is not valid"),
        ({"PROMETHEUS_MULTIPROC_DIR": "UNSAFE"}, "is writable by other users"),
    ],
)
def test_bad_configuration_refuses_to_start_with_one_clear_line(tmp_path: Path, env, message):
    """Gunicorn exits 1 with the settings error, not a traceback, on a bad value or directory."""
    import subprocess
    import sys

    from ._gunicorn import ROOT, free_port

    unsafe = tmp_path / "shared"
    unsafe.mkdir()
    unsafe.chmod(0o777)
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith("VICTOR_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    environment["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "metrics")
    environment.update({k: (str(unsafe) if v == "UNSAFE" else v) for k, v in env.items()})
    proc = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"),
         "-b", f"127.0.0.1:{free_port()}", "-w", "1", APP],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=30,
    )
    assert 1 == proc.returncode
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
