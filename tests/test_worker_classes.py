"""Every worker class under a real Gunicorn master: exact totals and a right in-flight gauge.

``sync`` is covered by the rest of the suite. Here: ``gthread``, ``gevent``, ``eventlet``
and ``uvicorn_worker.UvicornWorker`` (an ASGI app behind :mod:`victor_mp_metrics.asgi`),
each chosen through ``VICTOR_WORKER_CLASS`` as a deployment would. ``eventlet`` runs only
where Gunicorn still has that worker (< 26.0); a newer Gunicorn must refuse it with one
clear line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from gunicorn import __version__ as GUNICORN_VERSION
from gunicorn.workers import SUPPORTED_WORKERS

from ._gunicorn import ROOT, Gunicorn, gunicorn, parse_samples, total
from ._tools import require_module

pytestmark = pytest.mark.gunicorn

N = 300
FLASK_APP = "tests.apps.testapp:app"
ASGI_APP = "tests.apps.asgi_app:app"
FASTAPI_EXAMPLE = "examples.asgi.app:app"
UVICORN = "uvicorn_worker.UvicornWorker"
# What each worker class needs beyond Gunicorn: (module, the extra that brings it).
NEEDS = {"gevent": ("gevent", "gevent"), "eventlet": ("eventlet", "eventlet"),
         UVICORN: ("uvicorn_worker", "asgi")}  # fmt: skip


def require_worker(worker_class: str) -> None:
    """Skip when the worker class's package is missing, or fail when CI is set: CI installs
    the test extra, which brings every one of them. Skip where Gunicorn has no such worker
    (eventlet since Gunicorn 26.0; the eventlet extra pins an older Gunicorn)."""
    if "." not in worker_class and worker_class not in SUPPORTED_WORKERS:
        pytest.skip(f"Gunicorn {GUNICORN_VERSION} has no {worker_class} worker")
    module, extra = NEEDS.get(worker_class, ("gunicorn", ""))
    require_module(module, f"{worker_class} needs it: pip install 'victor-mp-metrics[{extra}]'")


def scrape(server: Gunicorn) -> dict[str, float]:
    response = server.get("/metrics", timeout=10)
    assert 200 == response.status, response.text
    return parse_samples(response.text)


def settled(server: Gunicorn, expected: float, endpoint: str) -> dict[str, float]:
    """Scrape until ``expected`` requests of ``endpoint`` are done (10 s at most): counted,
    and timed, which happens when the worker closes the response, after the client has it."""
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(server)
        done = (total(samples, "victor_requests_total", endpoint=endpoint),
                total(samples, "victor_request_duration_ms_count", endpoint=endpoint),
                total(samples, "victor_active_connections"))
        if done == (expected, expected, 0) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def concurrently(func, count: int, threads: int = 24) -> list:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(func, range(count)))


@pytest.mark.parametrize(
    ("worker_class", "env"),
    [("gthread", {"VICTOR_THREADS": "4"}), ("gevent", {}), ("eventlet", {})],
)
def test_flask_app_counts_300_requests_exactly(
    tmp_path: Path, worker_class: str, env: dict[str, str]
) -> None:
    """2 workers, 24 client threads, 300 requests: every total exactly 300, none in flight."""
    require_worker(worker_class)
    env = {"VICTOR_WORKER_CLASS": worker_class, **env}
    with gunicorn(tmp_path, workers=2, env=env, app=FLASK_APP, ready_path="/metrics") as server:
        statuses = concurrently(lambda _: server.get("/ok").status, N)
        s = settled(server, N, "/ok")
        log = server.logs()

    assert [200] * N == statuses
    assert f"Using worker: {worker_class}" in log
    assert (N, N, 0) == (total(s, "victor_requests_total", endpoint="/ok"),
                         total(s, "victor_request_duration_ms_count", endpoint="/ok"),
                         total(s, "victor_active_connections"))
    assert 0 == total(s, "victor_request_errors_total")
    assert 2 == total(s, "gunicorn_workers")


def test_fastapi_example_under_uvicorn_workers_counts_300_chats(tmp_path: Path) -> None:
    """The FastAPI example on 2 UvicornWorkers: 300 chats counted exactly, LLM calls too."""
    require_worker(UVICORN)
    env = {"VICTOR_WORKER_CLASS": UVICORN, "VICTOR_APP_LLM_LATENCY_MS": "1"}
    with gunicorn(tmp_path, workers=2, env=env, app=FASTAPI_EXAMPLE,
                  ready_path="/metrics") as server:
        responses = concurrently(lambda i: server.post_json("/chat", b'{"message": "a b c"}'), N)
        pids = {json.loads(r.body)["worker_pid"] for r in responses if r.status == 200}
        s = settled(server, N, "/chat")
        log = server.logs()

    assert [200] * N == [r.status for r in responses]
    assert f"Using worker: {UVICORN}" in log
    assert len(pids) == 2, pids
    assert (N, N, 0) == (total(s, "victor_requests_total", endpoint="/chat", method="POST"),
                         total(s, "victor_request_duration_ms_count", endpoint="/chat"),
                         total(s, "victor_active_connections"))
    assert N == total(s, "victor_llm_requests_total", provider="anthropic")
    assert 3 * N == total(s, "victor_llm_tokens_total", type="prompt")


@pytest.mark.parametrize(
    ("worker_class", "app", "env"),
    [
        ("gthread", FLASK_APP, {"VICTOR_THREADS": "8"}),
        ("gevent", FLASK_APP, {}),
        ("eventlet", FLASK_APP, {}),
        (UVICORN, ASGI_APP, {}),
    ],
)
def test_in_flight_gauge_counts_the_requests_being_served(
    tmp_path: Path, worker_class: str, app: str, env: dict[str, str]
) -> None:
    """One worker serving 6 slow requests at once: the gauge says 6 meanwhile, 0 after."""
    require_worker(worker_class)
    env = {"VICTOR_WORKER_CLASS": worker_class, **env}
    with gunicorn(tmp_path, workers=1, env=env, app=app, ready_path="/metrics") as server:
        with ThreadPoolExecutor(6) as pool:
            started = time.monotonic()
            slow = [pool.submit(server.get, "/sleep/2500", timeout=20) for _ in range(6)]
            seen: list[float] = []
            while time.monotonic() - started < 2.0 and (not seen or seen[-1] != 6):
                seen.append(total(scrape(server), "victor_active_connections"))
                time.sleep(0.05)
            statuses = [f.result().status for f in slow]
        after = settled(server, 6, "/sleep/{ms:int}" if app == ASGI_APP else "/sleep/<int:ms>")

    assert [200] * 6 == statuses
    assert 6 == seen[-1], seen
    assert max(seen) <= 6
    assert 0 == total(after, "victor_active_connections")
    assert 6 == total(after, "victor_request_duration_ms_count")


def test_a_worker_class_gunicorn_lacks_is_refused_with_one_line(tmp_path: Path) -> None:
    """VICTOR_WORKER_CLASS=eventlet on a Gunicorn without it: exit 1, one line saying why."""
    if "eventlet" in SUPPORTED_WORKERS:
        pytest.skip(f"Gunicorn {GUNICORN_VERSION} still has the eventlet worker")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VICTOR_")}
    env.update(VICTOR_WORKER_CLASS="eventlet", PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "m"))
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"),
         "-b", "127.0.0.1:0", "tests.apps.testapp:app"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert 0 != result.returncode
    assert (
        f"victor_mp_metrics: refusing to start: VICTOR_WORKER_CLASS=eventlet: Gunicorn "
        f"{GUNICORN_VERSION} has no such worker (Gunicorn 26.0 removed the eventlet worker)"
    ) in result.stderr, result.stderr

