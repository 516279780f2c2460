"""The Victor AI app under a real Gunicorn master: exact totals across worker processes."""

from __future__ import annotations

import json
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

from victor_mp_metrics._exposition import DISABLED_BODY
from victor_mp_metrics.catalog import CATALOG
from victor_mp_metrics.gunicorn_hooks import default_base

from ._gunicorn import Gunicorn, Response, free_port, gunicorn, parse_samples, request, total

pytestmark = pytest.mark.gunicorn

T = TypeVar("T")

# Gunicorn 27 opens a control socket at ~/.gunicorn/gunicorn.ctl by default, one path for
# every master: tests running side by side would take it from each other.
ARGS = ["--no-control-socket"]
FAST = {"VICTOR_APP_LLM_LATENCY_MS": "0"}
HEALTHZ = {"endpoint": "/healthz", "method": "GET"}
CHAT = {"endpoint": "/chat", "method": "POST"}
SONNET = {"provider": "anthropic", "model": "claude-sonnet-4-5"}
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
# Tests that count /healthz wait for readiness on /metrics, which is not recorded: a probe
# of /healthz that timed out while workers booted could still be served and counted.
READY = "/metrics"

# Sample names whose values add up over processes: catalog counters and histograms.
ADDITIVE = {spec.name for spec in CATALOG if spec.kind == "counter"} | {
    f"{spec.name}_{suffix}"
    for spec in CATALOG
    if spec.kind == "histogram"
    for suffix in ("bucket", "count", "sum")
}


def concurrently(func: Callable[[T], Response], items: Iterable[T], threads: int = 16) -> list:
    """``func`` over ``items`` from a pool of client threads; results in order."""
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(func, items))


def chat(server: Gunicorn, body: dict[str, Any]) -> Response:
    return server.post_json("/chat", json.dumps(body).encode())


def scrape(url: str) -> dict[str, float]:
    response = request(url)
    assert 200 == response.status, response.text
    return parse_samples(response.text)


def settled(url: str, expected: float, name: str, **labels: str) -> dict[str, float]:
    """Scrapes until ``name`` totals ``expected`` (at most 10 s); returns the last scrape.

    A client has its response before the worker closes it, which is when the request is
    recorded: the last few requests may land a moment after their responses. Waits too
    until no request is in flight, so every duration has been observed.
    """
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(url)
        done = (total(samples, name, **labels) == expected
                and total(samples, "victor_active_connections") == 0)  # all timed
        if done or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def additive(samples: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in samples.items() if k.split("{", 1)[0] in ADDITIVE}


def test_requests_over_four_workers_add_up_exactly_in_every_scrape(tmp_path: Path) -> None:
    """400 requests answered by several of 4 workers: every one of 8 scrapes says exactly 400."""
    n = 400
    with gunicorn(tmp_path, workers=4, args=ARGS, ready_path=READY) as server:
        workers = set(server.wait_workers(4))
        responses = concurrently(lambda _: server.get("/healthz"), range(n))
        assert [200] * n == [r.status for r in responses]
        answered = {json.loads(r.body)["worker_pid"] for r in responses}
        assert answered <= workers
        assert len(answered) >= 2, f"only {answered} answered"

        metrics = server.url + "/metrics"
        settled(metrics, n, "victor_requests_total", **HEALTHZ)
        scrapes = [scrape(metrics) for _ in range(8)]
        assert [n] * 8 == [total(s, "victor_requests_total", **HEALTHZ) for s in scrapes]
        assert [n] * 8 == [total(s, "victor_request_duration_ms_count", **HEALTHZ) for s in scrapes]
        assert [n] * 8 == [
            total(s, "victor_request_duration_ms_bucket", **HEALTHZ, le="+Inf") for s in scrapes
        ]
        assert [0] * 8 == [total(s, "victor_request_errors_total") for s in scrapes]


def test_chat_traffic_feeds_every_catalog_metric_with_exact_totals(tmp_path: Path) -> None:
    """Tools (hits, misses, a sandbox escape), LLM errors, bad input: every metric, exact."""
    plan: list[dict[str, Any]] = (
        [{"message": "read the notes please", "tools": ["read_file:notes.txt", "word_count"]}] * 20
        + [{"message": "escape", "tools": ["read_file:../../pyproject.toml"]}] * 5
        + [{"message": "x", "simulate_error": e} for e in ("rate_limit", "timeout", "server_error")]
        * 3
        + [{"message": ""}] * 3
    )
    with gunicorn(tmp_path, workers=2, env=FAST, args=ARGS) as server:
        responses = concurrently(lambda body: chat(server, body), plan, threads=8)
        statuses = Counter(r.status for r in responses)
        assert {200: 25, 429: 3, 504: 3, 502: 3, 400: 3} == statuses
        ok = [json.loads(r.body) for r in responses if r.status == 200]
        selections = Counter(body["tool_selection"] for body in ok)
        prompt = sum(body["usage"]["prompt_tokens"] for body in ok)
        completion = sum(body["usage"]["completion_tokens"] for body in ok)

        s = settled(server.url + "/metrics", len(plan), "victor_requests_total", **CHAT)

    present = {key.split("{", 1)[0] for key in s}
    wanted = {spec.name + ("_count" if spec.kind == "histogram" else "") for spec in CATALOG
              if spec.source != "server"}  # Gunicorn's own: tests/test_gunicorn_health.py
    assert set() == wanted - present
    assert 37 == total(s, "victor_requests_total", **CHAT)
    for error_type in ("rate_limit", "timeout", "server_error", "bad_request"):
        assert 3 == total(s, "victor_request_errors_total", **CHAT, error_type=error_type)
        if error_type != "bad_request":
            assert 3 == total(s, "victor_llm_errors_total", **SONNET, error_type=error_type)
    assert 34 == total(s, "victor_llm_requests_total", **SONNET)
    assert 34 == total(s, "victor_llm_duration_ms_count", **SONNET)
    assert 20 * 4 + 5 == prompt
    assert prompt == total(s, "victor_llm_tokens_total", type="prompt")
    assert completion == total(s, "victor_llm_tokens_total", type="completion")
    assert 20 == total(s, "victor_tool_executions_total", tool_name="read_file", status="success")
    assert 5 == total(s, "victor_tool_executions_total", tool_name="read_file", status="error")
    assert 20 == total(s, "victor_tool_executions_total", tool_name="word_count")
    assert 45 == total(s, "victor_tool_duration_ms_count")
    assert 5 == total(
        s, "victor_tool_errors_total", tool_name="read_file", error_type="path_escape"
    )
    assert 25 == total(s, "victor_coordinator_executions_total")
    assert 25 == total(s, "victor_coordinator_duration_seconds_count")
    assert 5 == total(s, "victor_coordinator_errors_total")
    hits, misses = selections["hit"], selections["miss"]
    assert (25, hits, misses) == (
        hits + misses,
        total(s, "victor_cache_hits_total", cache_name="tool_selection"),
        total(s, "victor_cache_misses_total", cache_name="tool_selection"),
    )
    assert hits / 25 == total(s, "victor_cache_hit_rate", cache_name="tool_selection")
    assert 0 < total(s, "victor_cache_size_bytes", cache_name="tool_selection")
    assert 0 == total(s, "victor_active_connections")


def test_master_metrics_port_serves_the_same_totals_as_the_app(tmp_path: Path) -> None:
    """With VICTOR_METRICS_PORT the master's own server reports the app's /metrics totals."""
    port = free_port()
    env = {**FAST, "VICTOR_METRICS_PORT": str(port), "VICTOR_METRICS_ADDR": "127.0.0.1"}
    plan = [{"message": "a b c", "tools": ["word_count", "calculator:6*7"]}] * 30 + [
        {"message": "slow down", "simulate_error": "rate_limit"}
    ] * 4
    with gunicorn(tmp_path, workers=3, env=env, args=ARGS) as server:
        concurrently(lambda body: chat(server, body), plan, threads=8)
        app_view = settled(server.url + "/metrics", 34, "victor_requests_total", **CHAT)
        master_view = scrape(f"http://127.0.0.1:{port}/metrics")
        app_again = scrape(server.url + "/metrics")

    assert additive(app_view) == additive(master_view) == additive(app_again)
    assert 34 == total(master_view, "victor_requests_total", **CHAT)
    assert 4 == total(master_view, "victor_llm_errors_total", error_type="rate_limit")
    assert 30 == total(master_view, "victor_tool_executions_total", tool_name="calculator")
    assert 0 == total(master_view, "victor_requests_total", endpoint="/metrics")


def test_default_directory_is_used_when_the_variable_is_unset(tmp_path: Path) -> None:
    """No PROMETHEUS_MULTIPROC_DIR: workers write to the master's private default directory."""
    n = 60
    with gunicorn(tmp_path, workers=2, directory=False, args=ARGS, ready_path=READY) as server:
        directory = Path(default_base()) / f"master-{server.proc.pid}"
        metrics = server.url + "/metrics"
        before = total(scrape(metrics), "victor_requests_total", **HEALTHZ)
        responses = concurrently(lambda _: server.get("/healthz"), range(n), threads=8)
        answered = {json.loads(r.body)["worker_pid"] for r in responses}
        after = settled(metrics, before + n, "victor_requests_total", **HEALTHZ)
        owners = {int(p.name.split("-", 1)[0]) for p in directory.glob("*.owner")}
        mode = stat.S_IMODE(directory.stat().st_mode)

    assert n == total(after, "victor_requests_total", **HEALTHZ) - before
    assert 0o700 == mode
    assert set() == answered - owners, f"workers without an owner file in {directory}"


def test_gthread_workers_under_concurrent_requests_count_exactly(tmp_path: Path) -> None:
    """2 gthread workers x 4 threads, 24 client threads, 300 chats: every total exact."""
    n = 300
    env = {**FAST, "VICTOR_WORKER_CLASS": "gthread", "VICTOR_THREADS": "4"}
    body = {"message": "count my words", "tools": ["word_count"]}
    with gunicorn(tmp_path, workers=2, env=env, args=ARGS) as server:
        responses = concurrently(lambda _: chat(server, body), range(n), threads=24)
        assert [200] * n == [r.status for r in responses]
        selections = Counter(json.loads(r.body)["tool_selection"] for r in responses)
        s = settled(server.url + "/metrics", n, "victor_requests_total", **CHAT)
        log = server.logs()

    assert "Using worker: gthread" in log
    assert n == total(s, "victor_requests_total", **CHAT)
    assert n == total(s, "victor_request_duration_ms_count", **CHAT)
    assert n == total(s, "victor_llm_requests_total", **SONNET)
    assert 3 * n == total(s, "victor_llm_tokens_total", **SONNET, type="prompt")
    assert n == total(s, "victor_tool_executions_total", tool_name="word_count", status="success")
    assert n == total(s, "victor_coordinator_executions_total")
    assert (selections["hit"], selections["miss"]) == (
        total(s, "victor_cache_hits_total"),
        total(s, "victor_cache_misses_total"),
    )
    assert n == selections["hit"] + selections["miss"]
    assert 0 == total(s, "victor_active_connections")


def test_preload_counts_exactly(tmp_path: Path) -> None:
    """With --preload (app created in the master before fork) totals are still exact."""
    n = 200
    with gunicorn(tmp_path, workers=3, env=FAST, args=[*ARGS, "--preload"]) as server:
        workers = set(server.wait_workers(3))
        responses = concurrently(lambda _: chat(server, {"message": "one two"}), range(n))
        assert [200] * n == [r.status for r in responses]
        pids = {json.loads(server.get("/healthz").body)["worker_pid"] for _ in range(20)}
        s = settled(server.url + "/metrics", n, "victor_requests_total", **CHAT)
        log = server.logs()

    assert server.proc.pid not in pids
    assert pids <= workers
    assert n == total(s, "victor_requests_total", **CHAT)
    assert n == total(s, "victor_llm_requests_total", **SONNET)
    assert 2 * n == total(s, "victor_llm_tokens_total", **SONNET, type="prompt")
    assert "Traceback" not in log


def test_openmetrics_and_gzip_negotiation(tmp_path: Path) -> None:
    """/metrics answers OpenMetrics when asked, gzip when accepted, both together, same totals."""
    n = 25
    with gunicorn(tmp_path, workers=2, args=ARGS, ready_path=READY) as server:
        metrics = server.url + "/metrics"
        concurrently(lambda _: server.get("/healthz"), range(n), threads=8)
        settled(metrics, n, "victor_requests_total", **HEALTHZ)
        plain = request(metrics)
        om = request(metrics, headers={"Accept": OPENMETRICS})
        gz = request(metrics, headers={"Accept-Encoding": "gzip"})
        both = request(metrics, headers={"Accept": OPENMETRICS, "Accept-Encoding": "gzip"})

    assert [200] * 4 == [r.status for r in (plain, om, gz, both)]
    # prometheus_client >= 0.22 appends "; escaping=underscores" to the OpenMetrics type.
    assert [
        ("text/plain; version=0.0.4; charset=utf-8", None),
        ("application/openmetrics-text; version=1.0.0; charset=utf-8", None),
        ("text/plain; version=0.0.4; charset=utf-8", "gzip"),
        ("application/openmetrics-text; version=1.0.0; charset=utf-8", "gzip"),
    ] == [
        (r.headers["Content-Type"].removesuffix("; escaping=underscores"),
         r.headers.get("Content-Encoding"))
        for r in (plain, om, gz, both)
    ]  # fmt: skip
    assert [False, True, False, True] == [r.text.endswith("# EOF\n") for r in (plain, om, gz, both)]
    assert "# TYPE victor_requests counter" in om.text
    assert "# TYPE victor_requests_total counter" in plain.text
    assert [n] * 4 == [
        total(parse_samples(r.text), "victor_requests_total", **HEALTHZ)
        for r in (plain, om, gz, both)
    ]


def test_app_serves_with_metrics_disabled(tmp_path: Path) -> None:
    """VICTOR_METRICS_ENABLED=false: chats and errors answer, /metrics says so, no files."""
    env = {**FAST, "VICTOR_METRICS_ENABLED": "false"}
    body = {"message": "hi", "tools": ["read_file:notes.txt", "read_file:/etc/passwd"]}
    with gunicorn(tmp_path, workers=2, env=env, args=ARGS) as server:
        ok = concurrently(lambda _: chat(server, body), range(20), threads=4)
        limited = chat(server, {"message": "hi", "simulate_error": "rate_limit"})
        metrics = server.get("/metrics")

    assert [200] * 20 == [r.status for r in ok]
    assert ["success", "error"] == [t["status"] for t in json.loads(ok[0].body)["tools"]]
    assert 429 == limited.status
    assert (200, DISABLED_BODY) == (metrics.status, metrics.body)
    assert [] == sorted(p.name for p in tmp_path.glob("metrics/*.db"))
