"""Issue 12: exact totals in every way people run Gunicorn, on real masters."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ._gunicorn import ROOT, free_port, gunicorn, parse_samples, request, total

pytestmark = pytest.mark.gunicorn
ARGS = ["--no-control-socket"]
FAST = {"VICTOR_APP_LLM_LATENCY_MS": "0"}


def _healthz_total(server) -> float:
    return total(parse_samples(server.get("/metrics").text), "victor_requests_total",
                 endpoint="/healthz")


@pytest.mark.xdist_group("default-directory")
def test_two_masters_without_a_directory_never_mix_their_totals(tmp_path: Path):
    """Two masters with no PROMETHEUS_MULTIPROC_DIR: 40 and 15 requests read 40 and 15."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with gunicorn(tmp_path / "a", workers=2, directory=False, args=ARGS) as a, \
            gunicorn(tmp_path / "b", workers=2, directory=False, args=ARGS) as b:
        base_a, base_b = _healthz_total(a), _healthz_total(b)  # readiness probes
        for _ in range(40):
            assert 200 == a.get("/healthz").status
        for _ in range(15):
            assert 200 == b.get("/healthz").status
        assert 40 == _healthz_total(a) - base_a
        assert 15 == _healthz_total(b) - base_b
        assert base_a + 40 == _healthz_total(a)  # nothing of b's ever appears in a


def test_a_second_master_on_the_same_directory_is_refused(tmp_path: Path):
    """Two unrelated masters given one directory: the second stops with one clear line."""
    directory = tmp_path / "shared"
    (tmp_path / "a").mkdir()
    with gunicorn(tmp_path / "a", workers=1, directory=directory, args=ARGS):
        env = {k: v for k, v in os.environ.items() if not k.startswith("VICTOR_")}
        env.update(PROMETHEUS_MULTIPROC_DIR=str(directory), PYTHONPATH=str(ROOT))
        proc = subprocess.run(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-b",
             f"127.0.0.1:{free_port()}", "-w", "1", *ARGS, "app:app"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert 0 != proc.returncode
    assert "another Gunicorn master" in proc.stderr and "Traceback" not in proc.stderr


def test_preload_keeps_import_time_metrics_on_a_missing_directory(tmp_path: Path):
    """--preload, plain Counter/Histogram/Gauge(max) made at import, a directory that does
    not exist yet: 30 requests read exactly 30 / 30 / the value set."""
    directory = tmp_path / "not" / "yet"
    with gunicorn(tmp_path, workers=3, directory=directory, args=[*ARGS, "--preload"],
                  app="tests.apps.preload_app:app", ready_path="/metrics") as server:
        for _ in range(30):
            assert 200 == server.get("/work").status
        samples = parse_samples(server.get("/metrics").text)
    assert 30 == total(samples, "preload_jobs_total")
    assert 30 == total(samples, "preload_latency_seconds_count")
    assert 42 == total(samples, "preload_peak")


def test_a_worker_timeout_is_recorded_on_its_route_as_timeout(tmp_path: Path):
    """A request cut by Gunicorn's timeout counts on /chat with error_type="timeout";
    no exception class name such as SystemExit becomes a label."""
    env = {"VICTOR_APP_LLM_LATENCY_MS": "10000"}
    with gunicorn(tmp_path, workers=1, env=env, args=[*ARGS, "--timeout", "2"]) as server:
        try:
            server.post_json("/chat", b'{"message": "hello"}', timeout=20)
        except OSError:
            pass  # the worker was killed mid-request: the connection may just close
        deadline = time.monotonic() + 15
        while True:
            text = server.get("/metrics").text
            samples = parse_samples(text)
            if total(samples, "victor_requests_total", endpoint="/chat") or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert 1 == total(samples, "victor_requests_total", endpoint="/chat")
    assert 1 == total(samples, "victor_request_errors_total", endpoint="/chat",
                      error_type="timeout")
    assert "SystemExit" not in text


@pytest.mark.xdist_group("default-directory")
def test_cli_dump_finds_the_running_masters_directory(tmp_path: Path):
    """After the quick start (no PROMETHEUS_MULTIPROC_DIR), `victor-metrics dump` with no
    arguments prints the service's totals."""
    with gunicorn(tmp_path, workers=2, directory=False, args=ARGS) as server:
        for _ in range(5):
            server.get("/healthz")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("VICTOR_") and k != "PROMETHEUS_MULTIPROC_DIR"}
        proc = subprocess.run([sys.executable, "-m", "victor_mp_metrics", "dump"], env=env,
                              capture_output=True, text=True, timeout=30)
        expected = _healthz_total(server)
    assert 0 == proc.returncode, proc.stderr
    assert expected == total(parse_samples(proc.stdout), "victor_requests_total",
                             endpoint="/healthz")


def test_name_filter_and_single_process_default_registry(tmp_path: Path):
    """?name[]= returns that family only; single-process /metrics shows a metric made on
    prometheus_client's default registry."""
    with gunicorn(tmp_path, workers=2, args=ARGS) as server:
        server.get("/healthz")
        text = server.get("/metrics?name[]=victor_requests_total").text
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert {"victor_requests_total"} == names
    code = (
        "import prometheus_client as pc\n"
        "from victor_mp_metrics import render\n"
        "pc.Counter('user_jobs', 'mine').inc(3)\n"
        "print(render({})[2].decode())\n"
    )
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VICTOR_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=30, cwd=ROOT, check=True).stdout
    assert 3 == total(parse_samples(out), "user_jobs_total")


def test_library_logs_go_to_gunicorns_error_log(tmp_path: Path):
    """--error-logfile X --log-level debug gets the library's lines in Gunicorn's format."""
    logfile = tmp_path / "error.log"
    with gunicorn(tmp_path, workers=1, args=[*ARGS, "--error-logfile", str(logfile),
                                             "--log-level", "debug"]) as server:
        server.get("/healthz")
        os.kill(server.workers()[0], 9)
        deadline = time.monotonic() + 10
        while "compacted" not in logfile.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
    text = logfile.read_text()
    line = next(ln for ln in text.splitlines() if "victor_mp_metrics: compacted" in ln)
    assert line.startswith("[") and "[INFO]" in line  # Gunicorn's own format


def test_a_metrics_port_in_use_stops_the_master_with_one_line(tmp_path: Path):
    """VICTOR_METRICS_PORT already taken: the master exits at once, one line, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("VICTOR_")}
        env.update(PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "m"), PYTHONPATH=str(ROOT),
                   VICTOR_METRICS_PORT=str(port), VICTOR_METRICS_ADDR="127.0.0.1")
        proc = subprocess.run(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-b",
             f"127.0.0.1:{free_port()}", "-w", "1", *ARGS, "app:app"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert 0 != proc.returncode
    assert f"cannot serve /metrics on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_workers_without_a_shared_directory_say_so(tmp_path: Path):
    """`gunicorn -w 2 app:app` without our config: /metrics carries
    victor_metrics_misconfigured and the log says what to do."""
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VICTOR_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PYTHONPATH"] = str(ROOT)
    log = tmp_path / "g.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "/dev/null", "-w", "2",
             "-b", f"127.0.0.1:{port}", *ARGS, "app:app"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                resp = request(f"http://127.0.0.1:{port}/metrics", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
    finally:
        from ._gunicorn import stop

        stop(proc)
    assert 1 == total(parse_samples(resp.text), "victor_metrics_misconfigured",
                      reason="no_shared_directory")
    assert "answers /metrics with its own share only" in log.read_text()


def _scrape_total(url: str) -> float:
    return total(parse_samples(request(url + "/metrics", timeout=10).text),
                 "victor_requests_total", endpoint="/healthz")


def test_hup_reload_and_usr2_upgrade_keep_counters_monotonic(tmp_path: Path):
    """A scraper of the socket sees totals only grow through a HUP reload and a USR2
    upgrade (old and new master serving at once), and every request is counted."""
    import shutil
    import signal

    import psutil

    from ._gunicorn import Gunicorn, stop, wait_ready

    # The console script, as in production: USR2 re-executes argv, and `python -m gunicorn`
    # re-executed puts gunicorn's own `http` package before the standard library's.
    script = shutil.which("gunicorn")
    assert script is not None
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VICTOR_")}
    env.update(PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "m"), PYTHONPATH=str(ROOT))
    log = tmp_path / "g.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([script, "-c", "gunicorn.conf.py", "-b", f"127.0.0.1:{port}",
                                 "-w", "2", *ARGS, "app:app"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = Gunicorn(proc, port, tmp_path / "m", log)
    try:
        wait_ready(proc, "gunicorn", lambda: server.get("/healthz").status == 200, server.logs)
        seen = [_scrape_total(server.url)]
        sent = seen[0]

        def traffic(rounds: int) -> None:
            nonlocal sent
            for _ in range(rounds):
                assert 200 == server.get("/healthz").status
                sent += 1
                seen.append(_scrape_total(server.url))

        traffic(10)
        os.kill(proc.pid, signal.SIGHUP)
        traffic(10)
        os.kill(proc.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 20
        new_master = None
        while new_master is None:  # the old master's child that has two workers of its own
            assert time.monotonic() < deadline, server.logs()
            found = [c for c in psutil.Process(proc.pid).children() if len(c.children()) >= 2]
            new_master = found[0] if found else None
            time.sleep(0.1)
        traffic(10)  # both masters' workers answer on the socket now
        os.kill(proc.pid, signal.SIGTERM)  # the old master goes, the new one serves on
        proc.wait(15)
        traffic(10)
        final = _scrape_total(server.url)
        new_master.terminate()
        new_master.wait(15)
    finally:
        stop(proc)
    assert seen == sorted(seen), seen
    assert sent == final, server.logs()
