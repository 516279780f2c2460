"""Gunicorn's own health under real masters: workers, exit reasons, signals, backlog.

The master keeps the ``gunicorn_*`` rows of the catalog. Each test drives a master into
a situation (max_requests, SIGKILL, a timeout, HUP, TTIN/TTOU, TERM, every worker busy)
and checks the metrics against an independent witness: Gunicorn's own log lines, the
process table, or the requests it sent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from ._gunicorn import ROOT, free_port, gunicorn, parse_samples, request, total, wait_ready
from ._prometheus import ASSETS, finite, prometheus, rule_exprs, single_target_config
from ._tools import require_tool

pytestmark = pytest.mark.gunicorn

APP = "tests.apps.testapp:app"
REASONS = ("max_requests", "timeout", "killed", "crashed", "reload", "shutdown")
MAX_REQUESTS = {"VICTOR_MAX_REQUESTS": "10", "VICTOR_MAX_REQUESTS_JITTER": "0"}
# Additive sample names: their totals must be the same from any process.
ADDITIVE_PREFIXES = ("victor_requests_total", "victor_request_duration_ms_count",
                     "gunicorn_worker_exits_total", "gunicorn_master_signals_total")


def master_port_env(**extra: str) -> tuple[int, dict[str, str]]:
    port = free_port()
    return port, {"VICTOR_METRICS_PORT": str(port), **extra}


def scrape(url: str) -> dict[str, float]:
    response = request(url, timeout=10)
    assert 200 == response.status, response.text
    return parse_samples(response.text)


def exits(samples: dict[str, float]) -> dict[str, float]:
    return {r: total(samples, "gunicorn_worker_exits_total", reason=r) for r in REASONS}


def until(url: str, done: Callable[[dict[str, float]], bool], timeout: float = 20.0):
    """Scrape ``url`` until ``done(samples)``; return the last samples (checked by the caller)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def test_max_requests_and_a_sigkill_are_counted_with_their_reasons(tmp_path: Path) -> None:
    """max_requests=10, a worker SIGKILLed, 25 requests: the exits match Gunicorn's log."""
    port, env = master_port_env(**MAX_REQUESTS)
    master = f"http://127.0.0.1:{port}/metrics"
    with gunicorn(tmp_path, workers=2, env=env, app=APP, ready_path="/metrics") as server:
        victim = server.wait_workers(2)[0]
        os.kill(victim, signal.SIGKILL)
        until(master, lambda s: total(s, "gunicorn_worker_exits_total", reason="killed") == 1)
        server.wait_workers(2)
        # Pairs of concurrent requests keep both workers busy, so each serves about half.
        with ThreadPoolExecutor(2) as pool:
            statuses = list(pool.map(lambda _: server.get("/sleep/20").status, range(25)))
        assert [200] * 25 == statuses
        s = until(master, lambda s: (
            total(s, "gunicorn_worker_exits_total", reason="max_requests")
            == server.logs().count("Autorestarting worker")
            and total(s, "gunicorn_workers") == 2
            and total(s, "gunicorn_worker_memory_bytes", stat="max") > 0
        ))  # fmt: skip
        log = server.logs()
        pids = server.wait_workers(2)

    counted = exits(s)
    assert counted["max_requests"] >= 2
    assert log.count("Autorestarting worker after current request.") == counted["max_requests"]
    assert 1 == log.count("was sent SIGKILL! Perhaps out of memory?")
    assert {**counted, "max_requests": 0, "killed": 0} == dict.fromkeys(REASONS, 0)
    assert (1, 2, 2) == (counted["killed"], total(s, "gunicorn_workers"),
                         total(s, "gunicorn_workers_desired"))
    assert victim not in pids
    assert sum(counted.values()) == total(s, "gunicorn_worker_age_seconds_count")
    assert total(s, "gunicorn_worker_age_seconds_bucket", le="60.0") == sum(counted.values())
    biggest = total(s, "gunicorn_worker_memory_bytes", stat="max")
    assert 10e6 < biggest <= total(s, "gunicorn_worker_memory_bytes", stat="sum") <= 2 * biggest


def test_worker_timeout_is_counted_as_timeout(tmp_path: Path) -> None:
    """A request longer than VICTOR_TIMEOUT: the master aborts the worker, reason timeout."""
    port, env = master_port_env(VICTOR_TIMEOUT="2")
    master = f"http://127.0.0.1:{port}/metrics"
    with gunicorn(tmp_path, workers=1, env=env, app=APP, ready_path="/metrics") as server:
        started = time.monotonic()
        try:  # the worker dies under the request: a 500 at best
            status = server.get("/sleep/8000", timeout=15).status
        except OSError:
            status = 0
        cut_short = time.monotonic() - started
        s = until(master, lambda s: (
            total(s, "gunicorn_worker_exits_total", reason="timeout") == 1
            and total(s, "gunicorn_workers") == 1
        ))  # fmt: skip
        log = server.logs()

    assert status in (0, 500)
    assert cut_short < 7.0
    assert 1 == log.count("WORKER TIMEOUT")
    assert {**dict.fromkeys(REASONS, 0), "timeout": 1} == exits(s)
    assert 1 == total(s, "victor_request_errors_total", endpoint="/sleep/<int:ms>",
                      error_type="timeout")


def test_a_worker_exiting_non_zero_is_counted_as_crashed(tmp_path: Path) -> None:
    """A worker ended by os._exit(2) mid-request: reason crashed, and a new worker serves."""
    port, env = master_port_env()
    master = f"http://127.0.0.1:{port}/metrics"
    app = "tests.apps.crash_app:app"
    with gunicorn(tmp_path, workers=1, env=env, app=app, ready_path="/metrics") as server:
        (first,) = server.wait_workers(1)
        with pytest.raises(OSError):  # the worker is gone before it answers
            server.get("/exit/2")
        s = until(master, lambda s: exits(s)["crashed"] == 1 and total(s, "gunicorn_workers") == 1)
        (second,) = server.wait_workers(1)
        answered = server.get("/ok")
        log = server.logs()

    assert (200, str(second)) == (answered.status, answered.text)
    assert first != second
    assert f"Worker (pid:{first}) exited with code 2" in log
    assert {**dict.fromkeys(REASONS, 0), "crashed": 1} == exits(s)


_LINGERING_CONFIG = """
import os, pathlib, time
exec(compile(open({conf!r}).read(), {conf!r}, "exec"))
_victor_post_fork = post_fork


def post_fork(server, worker):
    _victor_post_fork(server, worker)
    marker = pathlib.Path(os.environ["LINGER_MARKER"])
    if marker.exists():  # the test asks the next worker to linger before its handlers
        pathlib.Path(str(marker) + ".booting").write_text(str(os.getpid()))
        time.sleep(2.5)  # the master gets its SIGTERM and passes it on meanwhile
"""


def test_a_worker_booting_when_the_master_is_told_to_stop_does_not_hold_it_up(
        tmp_path: Path) -> None:
    """SIGTERM reaches a worker still booting, before it has its own signal handlers
    (Gunicorn's own race): the worker leaves as soon as it has them, and the master exits
    in seconds, not at --graceful-timeout."""
    config = tmp_path / "lingering.conf.py"
    config.write_text(_LINGERING_CONFIG.format(conf=str(ROOT / "gunicorn.conf.py")))
    marker = tmp_path / "linger"
    env = {"LINGER_MARKER": str(marker)}
    with gunicorn(tmp_path, workers=1, env=env, config=config,
                  args=["--graceful-timeout", "20"]) as server:
        (first,) = server.wait_workers(1)
        marker.write_text("")
        os.kill(first, signal.SIGKILL)
        booting = Path(str(marker) + ".booting")
        deadline = time.monotonic() + 10
        while not booting.exists():
            assert time.monotonic() < deadline, server.logs()
            time.sleep(0.01)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
        took = time.monotonic() - started
        log = server.logs()
    assert took < 10.0, log  # the 2.5 s linger and a loaded machine; not 20 s
    assert "the master is shutting down; worker" in log


def test_reload_scale_and_shutdown_reasons_and_signals(tmp_path: Path) -> None:
    """HUP replaces 2 workers (reload), TTIN/TTOU scale, TERM stops 2 (shutdown); all kept."""
    port, env = master_port_env()
    master = f"http://127.0.0.1:{port}/metrics"
    with gunicorn(tmp_path, workers=2, env=env, app=APP, ready_path="/metrics") as server:
        pid = server.proc.pid
        old = set(server.wait_workers(2))
        os.kill(pid, signal.SIGHUP)
        reloaded = until(master, lambda s: exits(s)["reload"] == 2
                         and total(s, "gunicorn_reloads_total") == 1)
        assert set() == old & set(server.wait_workers(2))
        os.kill(pid, signal.SIGTTIN)
        grown = until(master, lambda s: total(s, "gunicorn_workers") == 3
                      and total(s, "gunicorn_workers_desired") == 3)
        os.kill(pid, signal.SIGTTOU)
        shrunk = until(master, lambda s: exits(s)["shutdown"] == 1
                       and total(s, "gunicorn_workers") == 2
                       and total(s, "gunicorn_workers_desired") == 2)
        server.proc.send_signal(signal.SIGTERM)
        assert 0 == server.proc.wait(30)
        directory = server.directory

    assert (1, 1, 2) == (total(reloaded, "gunicorn_reloads_total"),
                         total(reloaded, "gunicorn_master_signals_total", signal="hup"),
                         exits(reloaded)["reload"])
    assert (3, 3) == (total(grown, "gunicorn_workers"), total(grown, "gunicorn_workers_desired"))
    assert {**dict.fromkeys(REASONS, 0), "reload": 2, "shutdown": 1} == exits(shrunk)
    assert 2 == total(shrunk, "gunicorn_workers_desired")
    after = _read_directory(directory)
    assert {**dict.fromkeys(REASONS, 0), "reload": 2, "shutdown": 3} == exits(after)
    handled = {name: total(after, "gunicorn_master_signals_total", signal=name)
               for name in ("hup", "int", "quit", "term", "ttin", "ttou", "usr1", "usr2", "winch")}
    assert {"hup": 1, "term": 1, "ttin": 1, "ttou": 1} == {k: v for k, v in handled.items() if v}
    assert 0 == total(after, "gunicorn_workers"), "a dead master's live gauges must vanish"


def _read_directory(directory: Path | None) -> dict[str, float]:
    """The totals left in a stopped master's directory, read as any process would."""
    assert directory is not None
    from victor_mp_metrics import _runtime, gather

    _runtime.configure(multiproc_dir=str(directory))
    try:
        return {
            sample.name + _labels(sample.labels): sample.value
            for family in gather()
            for sample in family.samples
        }
    finally:
        _runtime.reset()


def _labels(labels: dict[str, str]) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return "{" + inner + "}" if inner else ""


def test_master_port_answers_while_every_worker_is_busy_and_sees_the_backlog(
    tmp_path: Path,
) -> None:
    """One sync worker busy for 4 s, 8 connections queued: the master's /metrics answers at
    once, shows them in gunicorn_backlog, and then reports the same totals as the app."""
    port, env = master_port_env()
    master = f"http://127.0.0.1:{port}/metrics"
    with gunicorn(tmp_path, workers=1, env=env, app=APP, ready_path="/metrics") as server:
        server.wait_workers(1)
        answers: list[int] = []
        slow = threading.Thread(target=lambda: answers.append(server.get("/sleep/4000").status))
        started = time.monotonic()
        slow.start()
        time.sleep(0.3)  # the worker has taken the slow request
        with ThreadPoolExecutor(8) as pool:
            waiting = [pool.submit(lambda: server.get("/ok", timeout=30).status) for _ in range(8)]
            timings: list[float] = []
            backlog = 0.0
            while backlog < 8 and time.monotonic() - started < 3.5:
                t0 = time.monotonic()
                backlog = total(scrape(master), "gunicorn_backlog")
                timings.append(time.monotonic() - t0)
                time.sleep(0.2)
            busy = time.monotonic() - started < 4.0
            statuses = [f.result() for f in waiting]
        slow.join()
        app_view = until(server.url + "/metrics",
                         lambda s: total(s, "victor_requests_total", endpoint="/ok") == 8)
        master_view = until(master, lambda s: total(s, "gunicorn_backlog") == 0)
        after = total(master_view, "gunicorn_backlog")

    assert busy, "the slow request ended before the checks"
    assert [200] * 9 == [*answers, *statuses]
    assert max(timings) < 1.0, timings
    assert backlog >= 5, f"backlog {backlog} with 8 connections waiting"
    assert 0 == after
    assert 1 == total(master_view, "victor_requests_total", endpoint="/sleep/<int:ms>")
    assert 8 == total(master_view, "victor_requests_total", endpoint="/ok")
    assert _additive(app_view) == _additive(master_view)


def _additive(samples: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in samples.items() if k.startswith(ADDITIVE_PREFIXES)}


@pytest.mark.prometheus
def test_gunicorn_dashboard_row_and_alerts_on_a_real_prometheus(tmp_path: Path) -> None:
    """The shipped prometheus.yml scraping a master: every query of the dashboard's Gunicorn
    row returns a finite value; a SIGKILLed worker fires GunicornWorkersKilled's expression
    while the timeout and backlog alerts stay quiet."""
    binary = require_tool("prometheus", "Debian/Ubuntu: apt-get install prometheus")
    with gunicorn(tmp_path, workers=2, app=APP, ready_path="/metrics") as server:
        config = single_target_config(tmp_path, f"127.0.0.1:{server.port}")
        with prometheus(binary, tmp_path, config) as prom:
            prom.wait_for_scrape(time.time())  # the exit series are seen at 0 first
            os.kill(server.wait_workers(2)[0], signal.SIGKILL)
            prom.wait_for(
                'gunicorn_worker_exits_total{reason="killed"}',
                lambda samples: [1.0] == [s.value for s in samples],
            )
            server.wait_workers(2)
            prom.wait_for_scrape(time.time() + 1.5)
            no_data = {
                where: prom.query(expr) for where, expr in _gunicorn_row_queries()
                if not finite(prom.query(expr))
            }
            killed = prom.query(_alert_expr("GunicornWorkersKilled"))
            quiet = {name: prom.query(_alert_expr(name))
                     for name in ("GunicornWorkerTimeouts", "GunicornBacklog")}

    assert {} == no_data
    assert [1.0] == [round(s.value) for s in killed]
    assert {"GunicornWorkerTimeouts": [], "GunicornBacklog": []} == quiet


def _gunicorn_row_queries() -> list[tuple[str, str]]:
    """(panel title and refId, expr) of the dashboard's Gunicorn row, variables filled in."""
    panels = json.loads((ASSETS / "grafana_dashboard.json").read_text())["panels"]
    start = next(i for i, p in enumerate(panels) if p["type"] == "row" and p["title"] == "Gunicorn")
    row = []
    for panel in panels[start + 1:]:
        if panel["type"] == "row":
            break
        row += [(f"{panel['title']} [{t['refId']}]", t["expr"]) for t in panel["targets"]]
    assert len(row) >= 6, row
    variables = {"$job": "victor", "$instance": ".*", "$__rate_interval": "1m"}
    for name, value in variables.items():
        row = [(where, expr.replace(name, value)) for where, expr in row]
    return row


def _alert_expr(name: str) -> str:
    (expr,) = [e for alert, e in rule_exprs(ASSETS / "alerting_rules.yml") if alert == name]
    return expr


def test_usr2_upgrade_sums_both_masters_then_counts_the_old_workers_as_reload(
    tmp_path: Path,
) -> None:
    """USR2: while both masters run, gunicorn_workers counts 4; the old master's TERM ends
    its 2 workers as reload, its counters stay, its live gauges vanish (2 left)."""
    # The console script, not `python -m gunicorn`: Gunicorn re-executes its own argv, and
    # `python .../gunicorn/__main__.py` would put gunicorn/http ahead of the stdlib's http.
    script = shutil.which("gunicorn")
    assert script is not None, "the gunicorn console script is not on PATH"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VICTOR_")}
    env.update(PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"), PYTHONPATH=str(ROOT))
    metrics = f"http://127.0.0.1:{port}/metrics"
    with open(tmp_path / "gunicorn.log", "wb") as log:
        old = subprocess.Popen(
            [script, "-c", str(ROOT / "gunicorn.conf.py"), "-b", f"127.0.0.1:{port}", "-w", "2",
             APP], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        wait_ready(old, "gunicorn", lambda: request(metrics, timeout=2).status == 200,
                   lambda: (tmp_path / "gunicorn.log").read_text(errors="replace"))
        until(metrics, lambda s: total(s, "gunicorn_workers") == 2)
        old.send_signal(signal.SIGUSR2)
        both = until(metrics, lambda s: total(s, "gunicorn_workers") == 4
                     and total(s, "gunicorn_workers_desired") == 4)
        new = [p for p in psutil.Process(old.pid).children() if p.children()]
        old.send_signal(signal.SIGTERM)
        assert 0 == old.wait(30)
        after = until(metrics, lambda s: exits(s)["reload"] == 2
                      and total(s, "gunicorn_workers") == 2
                      and total(s, "gunicorn_workers_desired") == 2)
    finally:
        _stop_group(old)

    assert 1 == len(new), "USR2 did not start a new master"
    assert (4, 4) == (total(both, "gunicorn_workers"), total(both, "gunicorn_workers_desired"))
    assert {**dict.fromkeys(REASONS, 0), "reload": 2} == exits(after)
    assert (1, 1, 1) == (total(after, "gunicorn_reloads_total"),
                         total(after, "gunicorn_master_signals_total", signal="usr2"),
                         total(after, "gunicorn_master_signals_total", signal="term"))
    assert (2, 2) == (total(after, "gunicorn_workers"), total(after, "gunicorn_workers_desired"))


def _stop_group(proc: subprocess.Popen) -> None:
    """TERM the process group (the new master and every worker), then KILL what is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            os.killpg(proc.pid, 0)
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.wait(5)
