"""The shipped Prometheus assets against a real Prometheus scraping real Gunicorn masters.

Two deployments, each built once per module (fixtures) and then queried by several tests:

* ``victor``: one Gunicorn master with 4 workers, scraped by Prometheus with the shipped
  ``prometheus.yml`` and rule files. The traffic feeds every dashboard panel, the
  self-metrics of faults included: the metrics directory is replaced (write errors), a
  corrupt file appears, a compaction fails (hook error), workers are SIGKILLed and
  compacted, a metric passes the cardinality guard. More than 5% of the chats fail, so
  the HighErrorRate expression must return a series.
* ``fleet``: three masters with 2 workers and a metrics directory each, found by one
  Prometheus through ``file_sd_configs`` (``prometheus-scale-out.yml``). Each gets a known
  number of requests; fewer than 5% of the chats fail, so HighErrorRate must stay empty.

Intervals are one second (see ``_prometheus``). Counters born with a value are invisible
to ``rate()`` until they grow again, so each deployment first sends one request of every
kind that is later counted by a rate, and waits until Prometheus has scraped it.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import pytest

from ._gunicorn import ROOT, Gunicorn, gunicorn, parse_samples, total
from ._prometheus import (
    ASSETS,
    Prometheus,
    Sample,
    file_sd_config,
    finite,
    prometheus,
    rule_exprs,
    single_target_config,
    write_file_sd_targets,
)
from ._tools import require_tool

pytestmark = [pytest.mark.prometheus, pytest.mark.gunicorn]

README = ROOT / "README.md"
DASHBOARD = ASSETS / "grafana_dashboard.json"
ALERTING_RULES = ASSETS / "alerting_rules.yml"
RECORDING_RULES = ASSETS / "recording_rules.yml"
JOB = "victor"  # the job name of both shipped configurations
# Grafana's variables: every job and instance, and a rate window that holds many 1 s scrapes.
GRAFANA_VARIABLES = {"job": JOB, "instance": ".*", "__rate_interval": "1m"}
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")

MODELS = (("anthropic", "claude-sonnet-4-5"), ("openai", "gpt-4o"))
ERROR_TYPES = ("rate_limit", "timeout", "server_error")
CHAT_STATUS = {"rate_limit": 429, "timeout": 504, "server_error": 502}
SUCCESSFUL_CHATS: tuple[dict[str, Any], ...] = (
    {"tools": ["read_file:notes.txt", "word_count", "calculator:1+2"]},
    {"tools": ["word_count"]},
    {"tools": ["calculator:1/0"]},  # the tool fails (zero_division); the chat still answers
    {},
)
SINGLE_ENV = {
    "VICTOR_APP_LLM_LATENCY_MS": "1",
    # LLM errors over 2 models x 3 error types are 6 label sets, more than one worker may
    # keep: they fold into __overflow__ and the cardinality-guard panel gets data. Every
    # other family stays within 4 label sets per worker, so its totals stay exact.
    "VICTOR_METRICS_MAX_SERIES": "4",
    # No periodic sweep during the test: compactions run exactly when it kills workers.
    "VICTOR_METRICS_SWEEP_INTERVAL": "600",
}
FLEET_ENV = {"VICTOR_APP_LLM_LATENCY_MS": "1"}
PRIMER = len(SUCCESSFUL_CHATS) * len(MODELS)  # chats priming every tool set with each model
CORRUPT_FILES_PANEL = "Corrupt Metric Files"


# -- traffic --


@dataclass
class Traffic:
    """What the clients sent and what the answers said."""

    healthz: Counter[str] = field(default_factory=Counter)  # per target
    chats: Counter[str] = field(default_factory=Counter)  # per target
    errors: Counter[str] = field(default_factory=Counter)  # chat errors by error_type
    tokens: Counter[str] = field(default_factory=Counter)  # prompt, completion
    tools: Counter[tuple[str, str]] = field(default_factory=Counter)  # (tool, status)
    tool_errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    selections: Counter[str] = field(default_factory=Counter)  # cache hit, miss
    coordinator_errors: int = 0
    workers: set[int] = field(default_factory=set)  # pids that answered /healthz

    def record(self, target: str, body: dict[str, Any] | None, status: int, answer: Any) -> None:
        if body is None:
            assert 200 == status, answer
            self.healthz[target] += 1
            self.workers.add(answer["worker_pid"])
            return
        self.chats[target] += 1
        expected = body.get("simulate_error")
        assert CHAT_STATUS.get(expected, 200) == status, answer
        if expected is not None:
            self.errors[answer["error_type"]] += 1
            return
        self.tokens["prompt"] += answer["usage"]["prompt_tokens"]
        self.tokens["completion"] += answer["usage"]["completion_tokens"]
        for result in answer["tools"]:
            self.tools[result["tool"], result["status"]] += 1
            if result["status"] == "error":
                self.tool_errors[result["tool"], result["error_type"]] += 1
        if answer["tool_selection"] is not None:
            self.selections[answer["tool_selection"]] += 1
            if any(r["status"] == "error" for r in answer["tools"]):
                self.coordinator_errors += 1


def _chat_body(n: int, model: int, **extra: Any) -> dict[str, Any]:
    provider, name = MODELS[model % len(MODELS)]
    words = " ".join(["word"] * (1 + n % 5))
    return {"message": f"chat {n}: {words}", "provider": provider, "model": name, **extra}


def successful_chats(count: int, start: int = 0) -> list[dict[str, Any]]:
    """``count`` chats cycling through the tool sets and both models."""
    return [
        _chat_body(n, n // len(SUCCESSFUL_CHATS), **SUCCESSFUL_CHATS[n % len(SUCCESSFUL_CHATS)])
        for n in range(start, start + count)
    ]


def failing_chats(model: int = 0) -> list[dict[str, Any]]:
    """One chat per simulated LLM error type."""
    return [_chat_body(i, model, simulate_error=e) for i, e in enumerate(ERROR_TYPES)]


def send(
    traffic: Traffic, app: Gunicorn, bodies: Sequence[dict[str, Any] | None], threads: int = 8
) -> None:
    """POST each body to /chat (None: GET /healthz) from a pool of clients; record answers."""

    def one(body: dict[str, Any] | None) -> tuple[int, Any]:
        if body is None:
            response = app.get("/healthz")
        else:
            response = app.post_json("/chat", json.dumps(body).encode())
        return response.status, json.loads(response.body)

    with ThreadPoolExecutor(threads) as pool:
        answers = list(pool.map(one, bodies))
    for body, (status, answer) in zip(bodies, answers, strict=True):
        traffic.record(app_target(app), body, status, answer)


def app_target(app: Gunicorn) -> str:
    return f"127.0.0.1:{app.port}"


def scrape_until(
    app: Gunicorn, condition: Callable[[dict[str, float]], bool], what: str, timeout: float = 20
) -> dict[str, float]:
    """Scrape the app's /metrics until ``condition`` holds; fails after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        response = app.get("/metrics")
        assert 200 == response.status, response.text
        samples = parse_samples(response.text)
        if condition(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout} s\n{app.logs()}")
        time.sleep(0.1)


def settle(app: Gunicorn, traffic: Traffic) -> None:
    """Wait until the app counts every request sent (a request is recorded after its answer)."""
    target = app_target(app)
    expected = {"/chat": traffic.chats[target], "/healthz": traffic.healthz[target]}
    scrape_until(
        app,
        lambda s: all(
            n == total(s, "victor_requests_total", endpoint=endpoint)
            for endpoint, n in expected.items()
        ),
        f"the app counting {expected}",
    )


def kill_worker(app: Gunicorn, sig: signal.Signals, served: set[int]) -> None:
    """Send ``sig`` to a live worker among ``served``; wait until the master replaced it."""
    before = app.workers()
    candidates = sorted(served.intersection(before))
    assert candidates, f"none of the workers {before} answered a request"
    victim = candidates[0]
    os.kill(victim, sig)
    deadline = time.monotonic() + 20
    while True:
        now = app.workers()
        if victim not in now and len(now) == len(before):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"worker {victim} not replaced: {now}\n{app.logs()}")
        time.sleep(0.05)


def self_metric(name: str, minimum: float = 1) -> Callable[[dict[str, float]], bool]:
    return lambda samples: total(samples, name) >= minimum


# -- the deployments --


@dataclass
class Deployment:
    """Gunicorn masters, the Prometheus scraping them, and the traffic they served."""

    prometheus: Prometheus
    apps: list[Gunicorn]
    traffic: Traffic
    primed: float  # Unix time just before the priming requests
    primer_chats: int  # chats already counted in the first sample of the /chat series
    settled: float  # Unix time after the scrape of the final counts: later rules see them


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    """Path of prometheus; skipped (or failed under CI) when it is not installed."""
    return require_tool("prometheus", "Debian/Ubuntu: apt-get install prometheus")


@pytest.fixture(scope="module")
def victor(
    prometheus_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    """One master with 4 workers under the shipped prometheus.yml, after the traffic below."""
    tmp = tmp_path_factory.mktemp("victor")
    traffic = Traffic()
    with ExitStack() as stack:
        app = stack.enter_context(gunicorn(tmp, workers=4, env=SINGLE_ENV, ready_path="/metrics"))
        prom = stack.enter_context(
            prometheus(prometheus_binary, tmp, single_target_config(tmp, app_target(app)))
        )
        assert app.directory is not None
        app.wait_workers(4)

        # Write errors: the directory is replaced under the running workers. Each one
        # notices, counts it, and rewrites its values into the new directory.
        send(traffic, app, [None] * 12, threads=4)
        settle(app, traffic)
        app.directory.rename(tmp / "metrics-replaced")
        scrape_until(app, self_metric("victor_metrics_write_errors_total"), "a write error")
        settle(app, traffic)

        # A corrupt file of a dead writer: the next scrape skips and quarantines it.
        corrupt = app.directory / "counter_4194999-0badf11e.db"
        corrupt.write_bytes(b"\xff" * 64)
        scrape_until(app, lambda _: not corrupt.exists(), "the corrupt file quarantined")

        # A hook error: compact.lock is a symbolic link, which compaction refuses to open
        # (O_NOFOLLOW), so the compaction after the next worker exit fails and is counted.
        lock = app.directory / "compact.lock"
        lock.unlink(missing_ok=True)
        lock.symlink_to(tmp / "elsewhere")

        # Every series that a rate will count exists and is scraped before the counting.
        primed = time.time()
        send(traffic, app, [*successful_chats(PRIMER), *failing_chats()], threads=1)
        settle(app, traffic)
        prom.wait_for_scrape(time.time())
        primer_chats = sum(traffic.chats.values())

        send(traffic, app, [*successful_chats(60, start=PRIMER), *[None] * 20])
        settle(app, traffic)
        kill_worker(app, signal.SIGKILL, traffic.workers)
        scrape_until(app, self_metric("victor_metrics_hook_errors_total"), "a hook error")
        lock.unlink()
        prom.wait_for_scrape(time.time())  # a sample between the worker deaths

        send(traffic, app, [*successful_chats(60, start=PRIMER + 60), *[None] * 20])
        settle(app, traffic)
        kill_worker(app, signal.SIGKILL, traffic.workers)
        scrape_until(app, self_metric("victor_metrics_compactions_total"), "a compaction")
        prom.wait_for_scrape(time.time())  # and one after the compaction

        # Failing chats, one round of each model and error type at a time, until one worker
        # has seen more LLM error label sets than VICTOR_METRICS_MAX_SERIES.
        for n in range(20):
            send(traffic, app, failing_chats(0) + failing_chats(1), threads=1)
            settle(app, traffic)
            overflow = "victor_metrics_series_overflow_total{" in app.get("/metrics").text
            if n >= 4 and overflow:
                break
        assert overflow, f"no worker folded a label set:\n{app.logs()}"
        send(traffic, app, [*successful_chats(40, start=PRIMER + 120), *[None] * 10])
        settle(app, traffic)

        prom.wait_for_scrape(time.time())
        yield Deployment(prom, [app], traffic, primed, primer_chats, time.time())


HEALTHZ_PER_HOST = (7, 13, 21)
CHATS_PER_HOST = (20, 25, 15)  # successful ones; host 2 also fails one more after priming
HOST_GROUPS = (0, 0, 1)  # each host's group in the targets file: two hosts, one canary


@pytest.fixture(scope="module")
def fleet(prometheus_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """Three masters (2 workers, own directory each) found by one Prometheus via file_sd."""
    tmp = tmp_path_factory.mktemp("fleet")
    traffic = Traffic()
    with ExitStack() as stack:
        apps = []
        for host in range(len(HEALTHZ_PER_HOST)):
            workdir = tmp / f"host-{host + 1}"
            workdir.mkdir()
            apps.append(
                stack.enter_context(
                    gunicorn(workdir, workers=2, env=FLEET_ENV, ready_path="/metrics")
                )
            )
        directories = {app.directory for app in apps}
        assert len(apps) == len(directories), directories
        targets = write_file_sd_targets(
            tmp / "file_sd_targets.json",
            [
                [app_target(app) for app, g in zip(apps, HOST_GROUPS, strict=True) if g == group]
                for group in sorted(set(HOST_GROUPS))
            ],
        )
        prom = stack.enter_context(prometheus(prometheus_binary, tmp, file_sd_config(tmp, targets)))

        primed = time.time()
        for host, app in enumerate(apps):
            failing = [_chat_body(0, 0, simulate_error="server_error")] if host == 1 else []
            send(traffic, app, [None, *successful_chats(PRIMER), *failing], threads=1)
            settle(app, traffic)
        prom.wait_for_scrape(time.time(), targets=len(apps))
        primer_chats = sum(traffic.chats.values())

        for host, app in enumerate(apps):
            bodies: list[dict[str, Any] | None] = [
                *[None] * (HEALTHZ_PER_HOST[host] - 1),
                *successful_chats(CHATS_PER_HOST[host] - PRIMER, start=PRIMER),
            ]
            if host == 1:
                bodies.append(_chat_body(1, 0, simulate_error="server_error"))
            send(traffic, app, bodies)
            settle(app, traffic)

        prom.wait_for_scrape(time.time(), targets=len(apps))
        yield Deployment(prom, apps, traffic, primed, primer_chats, time.time())


# -- asset readers --


def _substitute(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in GRAFANA_VARIABLES, f"unknown Grafana variable ${name} in {expr!r}"
        return GRAFANA_VARIABLES[name]

    return _VARIABLE.sub(value, expr)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title and refId, expression with Grafana's variables replaced) of every query."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                where = f"{inner['title']} [{target['refId']}]"
                queries.append((where, _substitute(target["expr"])))
    return queries


def dashboard_variable_queries() -> dict[str, tuple[str, str]]:
    """Variable name -> (label, series selector) of each ``label_values`` variable."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = {}
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query or "")
        if match is not None:
            found[variable["name"]] = (match.group(2), _substitute(match.group(1)))
    return found


def readme_queries() -> list[str]:
    """Every ```promql block of the README's "Recommended queries" section."""
    text = README.read_text()
    start = text.index("### Recommended queries")
    end = re.compile(r"^#{1,3} ", re.MULTILINE).search(text, start + 1)
    section = text[start : end.start() if end else len(text)]
    return [block.strip() for block in re.findall(r"```promql\n(.*?)```", section, re.DOTALL)]


def alert_expr(name: str) -> str:
    (expr,) = [expr for alert, expr in rule_exprs(ALERTING_RULES) if alert == name]
    return expr


def by_label(samples: Iterable[Sample], *names: str) -> dict[Any, float]:
    """Values keyed by the given label values (a plain value for one label)."""
    out = {}
    for s in samples:
        key = tuple(s.labels.get(n, "") for n in names)
        out[key[0] if len(names) == 1 else key] = s.value
    return out


def _no_data(prom: Prometheus, queries: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """The queries whose result is empty or holds no finite value, with that result."""
    problems = {}
    for where, expr in queries:
        samples = prom.query(expr)
        if not finite(samples):
            problems[where] = (expr, samples)
    return problems


# -- one master, 4 workers --


def test_target_is_up_and_scraped_without_errors(victor: Deployment) -> None:
    """The one static target is up, scraped from the app's /metrics without error."""
    (app,) = victor.apps
    (target,) = victor.prometheus.targets()
    assert ("up", "", JOB, f"{app.url}/metrics") == (
        target["health"],
        target["lastError"],
        target["labels"]["job"],
        target["scrapeUrl"],
    )
    assert {app_target(app): 1.0} == by_label(victor.prometheus.query("up"), "instance")


def test_every_dashboard_query_returns_data(victor: Deployment) -> None:
    """Each Grafana query (job, instance: all; rate window 1m) gives a finite value."""
    queries = dashboard_queries()
    assert len(queries) >= 30
    assert {} == _no_data(victor.prometheus, queries)


def test_dashboard_variables_list_the_job_and_the_instance(victor: Deployment) -> None:
    """The $job and $instance variable queries find the scraped job and its one instance."""
    (app,) = victor.apps
    values = {
        name: victor.prometheus.api(f"label/{label}/values", **{"match[]": selector})
        for name, (label, selector) in dashboard_variable_queries().items()
    }
    assert {"job": [JOB], "instance": [app_target(app)]} == values


def test_dashboard_counts_a_corrupt_file_found_by_a_scrape(victor: Deployment) -> None:
    """The corrupt-file panel counts the corrupt file that a scrape skipped and quarantined."""
    (app,) = victor.apps
    assert 1 == len(list((app.directory / "quarantine").iterdir()))
    (query,) = [e for w, e in dashboard_queries() if w.split(" [")[0] == CORRUPT_FILES_PANEL]
    assert [1.0] == [s.value for s in victor.prometheus.query(query)]


def test_every_recommended_readme_query_returns_data(victor: Deployment) -> None:
    """Each ```promql block under the README's "Recommended queries" gives a finite value."""
    queries = readme_queries()
    assert len(queries) >= 8
    assert {} == _no_data(victor.prometheus, [(q, q) for q in queries])


def test_prometheus_totals_equal_the_traffic_exactly(victor: Deployment) -> None:
    """Raw counters in Prometheus equal what was sent and answered, through SIGKILLs."""
    prom, traffic = victor.prometheus, victor.traffic

    def totals(expr: str, *labels: str) -> dict[Any, float]:
        return by_label(prom.query(expr), *labels)

    # Only the family meant to overflow did, so every other split below is exact.
    assert {"victor_llm_errors_total"} == set(
        totals("sum by (metric) (victor_metrics_series_overflow_total)", "metric")
    )
    chats, healthz = sum(traffic.chats.values()), sum(traffic.healthz.values())
    assert {"/chat": chats, "/healthz": healthz} == totals(
        "sum by (endpoint) (victor_requests_total)", "endpoint"
    )
    assert dict(traffic.errors) == totals(
        'sum by (error_type) (victor_request_errors_total{endpoint="/chat"})', "error_type"
    )
    assert chats == prom.value("sum(victor_llm_requests_total)")
    assert sum(traffic.errors.values()) == prom.value("sum(victor_llm_errors_total)")
    assert dict(traffic.tokens) == totals("sum by (type) (victor_llm_tokens_total)", "type")
    assert dict(traffic.tools) == totals(
        "sum by (tool_name, status) (victor_tool_executions_total)", "tool_name", "status"
    )
    assert dict(traffic.tool_errors) == totals(
        "sum by (tool_name, error_type) (victor_tool_errors_total)", "tool_name", "error_type"
    )
    assert traffic.selections["hit"] > 0 < traffic.selections["miss"]
    assert (traffic.selections["hit"], traffic.selections["miss"]) == (
        prom.value("sum(victor_cache_hits_total)"),
        prom.value("sum(victor_cache_misses_total)"),
    )
    assert (sum(traffic.selections.values()), traffic.coordinator_errors) == (
        prom.value("sum(victor_coordinator_executions_total)"),
        prom.value("sum(victor_coordinator_errors_total)"),
    )


def test_self_metrics_count_the_faults_of_the_scenario(victor: Deployment) -> None:
    """The replaced directory, failed and done compactions, and folded label sets all show."""
    counted = by_label(
        victor.prometheus.query('{__name__=~"victor_metrics_.+_total"}'), "__name__", "metric"
    )
    assert counted[("victor_metrics_write_errors_total", "")] >= 1
    assert counted[("victor_metrics_hook_errors_total", "")] >= 1
    assert counted[("victor_metrics_compactions_total", "")] >= 1
    assert counted[("victor_metrics_writers_compacted_total", "")] >= 2
    assert counted[("victor_metrics_series_overflow_total", "victor_llm_errors_total")] >= 1


def test_increase_over_the_test_window_matches_the_chats_sent(victor: Deployment) -> None:
    """increase() of /chat over the test window is the chats sent, within extrapolation."""
    window = math.ceil(time.time() - victor.primed)
    increase = victor.prometheus.value(
        f'sum(increase(victor_requests_total{{endpoint="/chat"}}[{window}s]))'
    )
    # The first sample of the series already holds the priming chats, which increase()
    # cannot see; extrapolation to the window's edges adds about a second's worth at most.
    expected = sum(victor.traffic.chats.values()) - victor.primer_chats
    assert expected * 0.75 <= increase <= expected * 1.25, (increase, expected)


def test_no_counter_resets_through_worker_kills_and_compaction(victor: Deployment) -> None:
    """Prometheus sees no counter, bucket, _count or _sum go down while workers die."""
    prom = victor.prometheus
    window = math.ceil(time.time() - victor.primed)
    names = prom.api("label/__name__/values", **{"match[]": '{__name__=~"victor_.+"}'})
    monotonic = [n for n in names if n.endswith(("_total", "_bucket", "_count", "_sum"))]
    assert len(monotonic) >= 20, names
    # One query per name: resets() drops the name, and different families share label sets.
    resets = {name: prom.query(f"resets({name}[{window}s]) > 0") for name in monotonic}
    assert {} == {name: samples for name, samples in resets.items() if samples}


def test_recorded_request_rate_is_positive(victor: Deployment) -> None:
    """job:victor:request_rate:5m, evaluated after the traffic, is one series above 0."""
    prom = victor.prometheus
    prom.wait_for_rule_evaluation("job:victor:request_rate:5m", victor.settled)
    (sample,) = prom.query("job:victor:request_rate:5m")
    assert {"__name__": "job:victor:request_rate:5m", "job": JOB} == dict(sample.labels)
    assert sample.value > 0


def test_high_error_rate_alert_expression_fires_when_chats_fail(victor: Deployment) -> None:
    """The shipped HighErrorRate expr returns /chat, above 5%, when over 5% of chats fail."""
    # The whole history of this server is younger than the expression's 5m windows, so it
    # is evaluated unchanged: its rates cover exactly this test's traffic.
    failed = sum(victor.traffic.errors.values()) / sum(victor.traffic.chats.values())
    assert failed > 0.1
    samples = victor.prometheus.query(alert_expr("HighErrorRate"))
    assert [{"job": JOB, "endpoint": "/chat"}] == [dict(s.labels) for s in samples]
    assert samples[0].value > 0.05


# -- three masters through file_sd --


def test_file_sd_finds_every_instance_with_its_group_labels(fleet: Deployment) -> None:
    """Each master of the targets file is an active, healthy target with its group's labels."""
    shipped = json.loads((ASSETS / "file_sd_targets.json").read_text())
    expected = {
        app_target(app): {"job": JOB, "instance": app_target(app), **shipped[group]["labels"]}
        for app, group in zip(fleet.apps, HOST_GROUPS, strict=True)
    }
    targets = fleet.prometheus.targets()
    assert expected == {t["labels"]["instance"]: t["labels"] for t in targets}
    assert [("up", "")] * len(fleet.apps) == [(t["health"], t["lastError"]) for t in targets]
    assert dict.fromkeys(expected, 1.0) == by_label(fleet.prometheus.query("up"), "instance")


def test_healthz_totals_add_up_per_instance_and_overall(fleet: Deployment) -> None:
    """Each instance reports the requests it served, and their sum is the total sent."""
    prom, healthz = fleet.prometheus, fleet.traffic.healthz
    assert dict(zip(map(app_target, fleet.apps), HEALTHZ_PER_HOST, strict=True)) == dict(healthz)
    assert sum(HEALTHZ_PER_HOST) == prom.value('sum(victor_requests_total{endpoint="/healthz"})')
    assert dict(healthz) == by_label(
        prom.query('sum by (instance) (victor_requests_total{endpoint="/healthz"})'), "instance"
    )
    assert dict(fleet.traffic.chats) == by_label(
        prom.query('sum by (instance) (victor_requests_total{endpoint="/chat"})'), "instance"
    )


def vector(samples: Iterable[Sample]) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples as {sorted labels without __name__: value}, to compare recorded and direct."""
    return {
        tuple(sorted((k, v) for k, v in s.labels.items() if k != "__name__")): s.value
        for s in samples
    }


def same_vector(a: Mapping[Any, float], b: Mapping[Any, float]) -> bool:
    """The same label sets with the same values (NaN equals NaN; float rounding allowed)."""
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k]))
        or math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-12)
        for k in a
    )


def recorded_and_direct(
    prom: Prometheus, record: str, expr: str, attempts: int = 5
) -> tuple[float, list[Sample], list[Sample]]:
    """A recorded series and its expression evaluated at the rule's own evaluation time.

    A scrape that started before the rule ran but was committed after it adds a sample the
    rule did not see; then the next evaluation is compared (at most ``attempts`` times).
    """
    for _ in range(attempts):
        stamps = {s.value for s in prom.query(f"timestamp({record})")}
        if not stamps:
            return math.nan, [], prom.query(expr)
        assert len(stamps) == 1, f"{record}: evaluated at {stamps}"
        (at,) = stamps
        recorded, direct = prom.query(record, at), prom.query(expr, at)
        if same_vector(vector(recorded), vector(direct)):
            break
        time.sleep(1)
    return at, recorded, direct


def test_job_request_rate_rule_sums_the_rates_of_all_instances(fleet: Deployment) -> None:
    """job:victor:request_rate:5m is one series per job equal to the instances' rates summed."""
    prom, record = fleet.prometheus, "job:victor:request_rate:5m"
    prom.wait_for_rule_evaluation(record, fleet.settled)
    at, recorded, direct = recorded_and_direct(
        prom, record, "sum(rate(victor_requests_total[5m])) by (job)"
    )
    assert [{"__name__": record, "job": JOB}] == [dict(s.labels) for s in recorded]
    per_instance = by_label(
        prom.query("sum by (instance) (rate(victor_requests_total[5m]))", at), "instance"
    )
    assert set(map(app_target, fleet.apps)) == set(per_instance)
    assert all(rate > 0 for rate in per_instance.values()), per_instance
    assert same_vector(vector(recorded), vector(direct))
    (value,) = [s.value for s in recorded]
    assert math.isclose(sum(per_instance.values()), value, rel_tol=1e-9)


def test_every_recording_rule_matches_its_expression_across_instances(fleet: Deployment) -> None:
    """Every recorded series has data and equals its rule's expr evaluated at that instant."""
    prom = fleet.prometheus
    # One group: every rule is evaluated at the same instant as the request rate.
    prom.wait_for_rule_evaluation("job:victor:request_rate:5m", fleet.settled)
    mismatches = {}
    for record, expr in rule_exprs(RECORDING_RULES):
        _, recorded, direct = recorded_and_direct(prom, record, expr)
        if not recorded or not same_vector(vector(recorded), vector(direct)):
            mismatches[record] = (vector(recorded), vector(direct))
        assert all("instance" not in s.labels for s in recorded), record
    assert {} == mismatches


def test_high_error_rate_alert_expression_is_empty_below_threshold(fleet: Deployment) -> None:
    """The shipped HighErrorRate expr is empty when under 5% of chats fail, errors or not."""
    prom = fleet.prometheus
    prom.wait_for_rule_evaluation("job_endpoint:victor:request_error_ratio:5m", fleet.settled)
    ratio = prom.value('job_endpoint:victor:request_error_ratio:5m{endpoint="/chat"}')
    assert 0 < ratio < 0.05
    assert [] == prom.query(alert_expr("HighErrorRate"))
