"""Real Gunicorn under worker churn and SIGKILL: exact, monotonic totals, bounded files."""

from __future__ import annotations

import http.client
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ._gunicorn import Gunicorn, free_port, gunicorn, parse_samples, request, total

pytestmark = pytest.mark.gunicorn
APP = "tests.apps.testapp:app"


class Scraper(threading.Thread):
    """Scrapes /metrics every 50-100 ms, recording statuses and a counter's values."""

    def __init__(self, server: Gunicorn, name: str, **labels: str) -> None:
        super().__init__(daemon=True)
        self.server, self.metric, self.labels = server, name, labels
        self.statuses: list[int] = []
        self.values: list[float] = []
        self.dropped = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                resp = self.server.get("/metrics", timeout=10)
            except (OSError, http.client.HTTPException):
                self.dropped += 1  # the worker answering was SIGKILLed mid-scrape
                continue
            self.statuses.append(resp.status)
            if resp.status == 200:
                self.values.append(total(parse_samples(resp.text), self.metric, **self.labels))
            time.sleep(random.uniform(0.05, 0.1))

    def stop(self) -> None:
        self.halt.set()
        self.join(30)


def requests_total(server: Gunicorn, endpoint: str) -> float:
    return total(parse_samples(server.get("/metrics").text), "victor_requests_total",
                 endpoint=endpoint)


def settle(server: Gunicorn, endpoint: str, expected: float, timeout: float = 15) -> float:
    """Wait until compaction and restarts settle and the total reaches ``expected``."""
    deadline = time.monotonic() + timeout
    seen = requests_total(server, endpoint)
    while seen != expected and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = requests_total(server, endpoint)
    return seen


def test_churn_with_max_requests_keeps_exact_monotonic_totals(tmp_path: Path):
    """4 workers recycled every 20 requests: totals exact, never decreasing, files bounded."""
    env = {"VICTOR_MAX_REQUESTS": "20", "VICTOR_MAX_REQUESTS_JITTER": "0"}
    sent = 2400
    with gunicorn(tmp_path, workers=4, env=env, app=APP, ready_path="/metrics") as server:
        scraper = Scraper(server, "victor_requests_total", endpoint="/ok")
        scraper.start()
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: server.get("/ok").status, range(sent)))
        scraper.stop()
        assert [200] * sent == statuses
        assert float(sent) == settle(server, "/ok", float(sent))
        assert scraper.statuses and set(scraper.statuses) == {200}
        assert len(scraper.values) > 10
        assert all(a <= b for a, b in zip(scraper.values, scraper.values[1:], strict=False))
        data_files = [n for n in os.listdir(server.directory) if n.endswith(".db")]
        # 4 live workers and the master, each with at most the 7 kinds the app, the process
        # metrics and the server metrics use, plus one archive set of those kinds.
        assert len(data_files) <= 5 * 7 + 7, sorted(data_files)
        print(f"churn: {sent} requests, {len(scraper.values)} scrapes, "
              f"{len(data_files)} data files at the end")


def test_sigkill_mid_request_restores_active_connections(tmp_path: Path):
    """A worker SIGKILLed mid-request: scrapes answer, its in-flight count vanishes."""
    # All workers will be busy, so scrape the master's own metrics server.
    port = free_port()
    env = {"VICTOR_METRICS_PORT": str(port), "VICTOR_METRICS_ADDR": "127.0.0.1"}
    with gunicorn(tmp_path, workers=4, app=APP, ready_path="/metrics", env=env) as server:
        server.extra_ports["metrics"] = port
        server.wait_workers(4)
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(server.get, "/sleep/4000", timeout=20) for _ in range(4)]
            deadline = time.monotonic() + 10
            while _active(server) != 4.0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert 4.0 == _active(server)
            before = _master_total(server, "/sleep/<int:ms>")
            victim = server.workers()[0]
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 3
            while _active(server) != 3.0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert 3.0 == _active(server), "the killed worker's request still counted"
            results = []
            for future in futures:
                try:
                    results.append(future.result().status)
                except (OSError, http.client.HTTPException):
                    results.append(None)
        assert 3 == results.count(200)
        assert 0.0 == _active(server)
        assert before + 3 == _master_total(server, "/sleep/<int:ms>")


def _master_total(server: Gunicorn, endpoint: str) -> float:
    resp = request(f"http://127.0.0.1:{server.extra_ports['metrics']}/metrics")
    return total(parse_samples(resp.text), "victor_requests_total", endpoint=endpoint)


def _active(server: Gunicorn) -> float:
    resp = request(f"http://127.0.0.1:{server.extra_ports['metrics']}/metrics")
    assert 200 == resp.status
    return total(parse_samples(resp.text), "victor_active_connections")


def test_random_sigkill_every_second_under_load(tmp_path: Path):
    """SIGKILL a random worker each second under load: scrapes all 200, totals bounded."""
    with gunicorn(tmp_path, workers=3, app=APP, ready_path="/metrics") as server:
        scraper = Scraper(server, "victor_requests_total", endpoint="/ok")
        scraper.start()
        acknowledged = sent = 0
        lock = threading.Lock()
        halt = threading.Event()

        def client() -> None:
            nonlocal acknowledged, sent
            while not halt.is_set():
                with lock:
                    sent += 1
                try:
                    ok = server.get("/ok", timeout=5).status == 200
                except (OSError, http.client.HTTPException):  # the worker died mid-answer
                    ok = False
                if ok:
                    with lock:
                        acknowledged += 1

        clients = [threading.Thread(target=client, daemon=True) for _ in range(4)]
        for t in clients:
            t.start()
        for _ in range(6):
            time.sleep(1)
            pids = server.workers()
            if pids:
                os.kill(random.choice(pids), signal.SIGKILL)
        halt.set()
        for t in clients:
            t.join(10)
        scraper.stop()
        server.wait_workers(3)
        time.sleep(0.5)
        final = requests_total(server, "/ok")
        assert set(scraper.statuses) == {200}
        assert scraper.dropped <= 6, "only a scrape on a worker killed under it may drop"
        assert all(a <= b for a, b in zip(scraper.values, scraper.values[1:], strict=False))
        assert acknowledged <= final <= sent, (acknowledged, final, sent)
        print(f"sigkill: sent {sent}, acknowledged {acknowledged}, counted {final}, "
              f"scrapes {len(scraper.statuses)} answered 200, {scraper.dropped} dropped")
