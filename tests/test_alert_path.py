"""The whole alert path of the agent scale-out, every hop a real program on loopback.

Gunicorn (reference app, 2 sync workers, private PROMETHEUS_MULTIPROC_DIR; two hosts) ->
Prometheus in agent mode (``prometheus-agent.yml``) -> ``remote_write`` -> central
Prometheus with ``--web.enable-remote-write-receiver`` (``prometheus-central.yml``, the
shipped ``alerting_rules.yml`` and ``recording_rules.yml``) -> Alertmanager
(``alertmanager.yml``) -> a webhook receiver in this test, which must get HighErrorRate.

The three configurations are the shipped files, loaded with yaml, with only what a test
must change: targets and URLs become this test's loopback ports, the scrape and evaluation
intervals and Alertmanager's group_wait/group_interval become one second, and the agent
sends its queue at least every second. The rule files are copies in which only each
group's ``interval`` (1s) and each alert's ``for`` (1s instead of 2m-10m) differ from the
shipped ones: the copies are checked to equal the shipped files with just those keys
replaced, so the expressions, labels and annotations that fire are the shipped ones.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from ._gunicorn import Gunicorn, free_port, gunicorn, request, wait_ready
from ._prometheus import ASSETS, INTERVAL, Prometheus, rewrite_rule_file, stop
from ._tools import require_tool

pytestmark = [pytest.mark.prometheus, pytest.mark.gunicorn]

AGENT_CONFIG = ASSETS / "prometheus-agent.yml"
CENTRAL_CONFIG = ASSETS / "prometheus-central.yml"
ALERTMANAGER_CONFIG = ASSETS / "alertmanager.yml"
RULE_FILES = ("alerting_rules.yml", "recording_rules.yml")
FOR = "1s"  # every alert's `for` in the test's copy of the rules
JOB = "victor"
HOSTS = 2
APP_ENV = {"VICTOR_APP_LLM_LATENCY_MS": "1"}
# Per round and host: one chat that answers and one of each simulated LLM error (429,
# 504, 502), so 75% of /chat requests fail, far above HighErrorRate's 5%.
ROUND: tuple[dict[str, Any], ...] = (
    {"message": "hello there", "tools": ["word_count"]},
    {"message": "fail", "simulate_error": "rate_limit"},
    {"message": "fail", "simulate_error": "timeout"},
    {"message": "fail", "simulate_error": "server_error"},
)
STATUS = {None: 200, "rate_limit": 429, "timeout": 504, "server_error": 502}
ALERT_TIMEOUT = 60.0  # seconds from the agent's start until the webhook must have the alert

_FOR_LINE = re.compile(r"^(?P<indent>[ \t]*)for:[ \t]*\S+[ \t]*$", re.MULTILINE)


# -- configuration: the shipped files with test ports and one-second timings --


def fast_rule_file(name: str, directory: Path) -> Path:
    """A copy of a shipped rule file with group intervals and alert ``for`` set to 1s.

    The text is edited line by line; the copy must equal the shipped file with exactly
    those two keys replaced (same rules, expressions, labels and annotations).
    """
    source = ASSETS / name
    target = rewrite_rule_file(source, directory)  # intervals only; checks the exprs
    target.write_text(_FOR_LINE.sub(rf"\g<indent>for: {FOR}", target.read_text()))
    expected = yaml.safe_load(source.read_text())
    for group in expected["groups"]:
        group["interval"] = INTERVAL
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = FOR
    assert expected == yaml.safe_load(target.read_text()), f"{target} differs from {source}"
    return target


def _write(config: Mapping[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    return path


def agent_config(directory: Path, targets: list[str], write_url: str) -> Path:
    """``prometheus-agent.yml`` scraping ``targets`` every second, writing to ``write_url``."""
    config = yaml.safe_load(AGENT_CONFIG.read_text())
    assert "rule_files" not in config and "alerting" not in config, AGENT_CONFIG
    config["global"].update(scrape_interval=INTERVAL, scrape_timeout=INTERVAL)
    (job,) = config["scrape_configs"]
    assert (JOB, "/metrics") == (job["job_name"], job["metrics_path"])
    (static,) = job["static_configs"]
    static["targets"] = targets
    job.pop("scrape_interval", None)
    job.pop("scrape_timeout", None)
    (remote,) = config["remote_write"]
    assert remote["url"].endswith("/api/v1/write"), remote["url"]
    remote["url"] = write_url
    remote.setdefault("queue_config", {})["batch_send_deadline"] = INTERVAL
    return _write(config, directory / AGENT_CONFIG.name)


def central_config(directory: Path, alertmanager: str) -> Path:
    """``prometheus-central.yml`` with 1s evaluation, fast rule copies and ``alertmanager``."""
    config = yaml.safe_load(CENTRAL_CONFIG.read_text())
    assert list(RULE_FILES) == config["rule_files"], CENTRAL_CONFIG
    assert "scrape_configs" not in config, "the central server gets its samples by remote_write"
    config["global"]["evaluation_interval"] = INTERVAL
    config["rule_files"] = [fast_rule_file(name, directory).name for name in RULE_FILES]
    (manager,) = config["alerting"]["alertmanagers"]
    (static,) = manager["static_configs"]
    assert 1 == len(static["targets"]), static
    static["targets"] = [alertmanager]
    return _write(config, directory / CENTRAL_CONFIG.name)


def alertmanager_config(directory: Path, webhook_url: str) -> Path:
    """``alertmanager.yml`` with 1s group_wait/group_interval, notifying ``webhook_url``."""
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    route = config["route"]
    route.update(group_wait=INTERVAL, group_interval=INTERVAL)
    (receiver,) = [r for r in config["receivers"] if r["name"] == route["receiver"]]
    (webhook,) = receiver["webhook_configs"]
    webhook["url"] = webhook_url
    return _write(config, directory / ALERTMANAGER_CONFIG.name)


def check_config(promtool: str, config: Path, *flags: str) -> str:
    """Run ``promtool check config``; fails with its output unless it exits 0."""
    result = subprocess.run(
        [promtool, "check", "config", *flags, str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    output = result.stdout + result.stderr
    assert 0 == result.returncode, f"promtool check config {' '.join(flags)} {config}:\n{output}"
    return output


# -- the webhook receiver --


class Webhook:
    """Alertmanager webhook receiver: an HTTP server on 127.0.0.1 that keeps each payload."""

    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        webhook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                payload = json.loads(self.rfile.read(length))
                with webhook._changed:
                    webhook.payloads.append({"path": self.path, **payload})
                    webhook._changed.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/alerts"

    def alerts(self, name: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(payload, alert) for every alert named ``name`` received so far."""
        with self._changed:
            return [
                (payload, alert)
                for payload in self.payloads
                for alert in payload.get("alerts", [])
                if alert.get("labels", {}).get("alertname") == name
            ]

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds after a delivery, at most ``timeout`` s."""
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    def __enter__(self) -> Webhook:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


# -- processes --


@contextmanager
def process(
    cmd: list[str], directory: Path, name: str, port: int
) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` (which listens on ``port``) until ``/-/ready`` answers 200; always stopped."""
    log = directory / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=directory, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_ready(
            proc, name,
            lambda: request(f"http://127.0.0.1:{port}/-/ready", timeout=2).status == 200,
            lambda: log.read_text(errors="replace")[-5000:],
        )
        yield proc
    finally:
        stop(proc)


def send_round(apps: list[Gunicorn]) -> None:
    """One ROUND of chats to every host, concurrently; each answers its expected status."""

    def one(app: Gunicorn, body: dict[str, Any]) -> None:
        response = app.post_json("/chat", json.dumps(body).encode())
        assert STATUS[body.get("simulate_error")] == response.status, response.text

    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(one, app, body) for app in apps for body in ROUND]:
            future.result()


HINT = "Debian/Ubuntu: apt-get install prometheus prometheus-alertmanager"


def tools(*names: str) -> dict[str, str]:
    """Paths of the named programs; the test skips (or fails when CI is set) without one."""
    return {name: require_tool(name, HINT) for name in names}


def test_shipped_scale_out_configs_pass_promtool_and_amtool() -> None:
    """promtool accepts the agent (agent mode) and central (with rules) configs; amtool too."""
    binaries = tools("promtool", "amtool")
    promtool = binaries["promtool"]
    check_config(promtool, AGENT_CONFIG, "--agent")
    # rule_files are resolved next to the config and checked too.
    assert "SUCCESS: 2 rule files found" in check_config(promtool, CENTRAL_CONFIG)
    # The split is real: the central config (rules, alerting) is no agent config.
    refused = subprocess.run(
        [promtool, "check", "config", "--agent", str(CENTRAL_CONFIG)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert 0 != refused.returncode, refused.stdout
    amtool = subprocess.run(
        [binaries["amtool"], "check-config", str(ALERTMANAGER_CONFIG)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert 0 == amtool.returncode, amtool.stdout + amtool.stderr


def test_high_error_rate_reaches_the_webhook_through_agent_central_and_alertmanager(
    tmp_path: Path,
) -> None:
    """Failing chats on two hosts make the central fire HighErrorRate to the webhook."""
    binaries = tools("prometheus", "promtool", "prometheus-alertmanager")
    started = time.monotonic()
    central_port, am_port, agent_port = free_port(), free_port(), free_port()
    with ExitStack() as stack:
        webhook = stack.enter_context(Webhook())
        apps = []
        for host in range(HOSTS):
            workdir = tmp_path / f"host-{host + 1}"
            workdir.mkdir()
            apps.append(
                stack.enter_context(
                    gunicorn(workdir, workers=2, env=APP_ENV, ready_path="/metrics")
                )
            )
        assert HOSTS == len({app.directory for app in apps})
        targets = [f"127.0.0.1:{app.port}" for app in apps]

        am_config = alertmanager_config(tmp_path, webhook.url)
        central = central_config(tmp_path, f"127.0.0.1:{am_port}")
        agent = agent_config(
            tmp_path, targets, f"http://127.0.0.1:{central_port}/api/v1/write"
        )
        check_config(binaries["promtool"], agent, "--agent")
        check_config(binaries["promtool"], central)

        stack.enter_context(process(
            [binaries["prometheus-alertmanager"], f"--config.file={am_config}",
             f"--storage.path={tmp_path / 'alertmanager-data'}",
             f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="],
            tmp_path, "alertmanager", am_port,
        ))
        central_proc = stack.enter_context(process(
            [binaries["prometheus"], f"--config.file={central}",
             f"--storage.tsdb.path={tmp_path / 'central-data'}",
             f"--web.listen-address=127.0.0.1:{central_port}",
             "--web.enable-remote-write-receiver"],
            tmp_path, "central", central_port,
        ))
        stack.enter_context(process(
            [binaries["prometheus"], "--enable-feature=agent", f"--config.file={agent}",
             f"--storage.agent.path={tmp_path / 'agent-data'}",
             f"--web.listen-address=127.0.0.1:{agent_port}"],
            tmp_path, "agent", agent_port,
        ))
        prom = Prometheus(central_proc, central_port, tmp_path / "central.log")

        # Keep chats failing until the alert arrives: rate() needs the error counters to
        # grow between two scrapes, and the agent's first scrape comes ~5 s after start.
        deadline = time.monotonic() + ALERT_TIMEOUT
        rounds = 0
        while not webhook.alerts("HighErrorRate"):
            assert time.monotonic() < deadline, (
                f"no HighErrorRate at the webhook after {rounds} rounds; got "
                f"{webhook.payloads}\ncentral:\n{prom.logs()}\n"
                f"agent:\n{(tmp_path / 'agent.log').read_text()[-3000:]}"
            )
            send_round(apps)
            rounds += 1
            webhook.wait(lambda: bool(webhook.alerts("HighErrorRate")), 0.5)

        # Every host's samples reached the central server through the agent.
        up = {s.labels["instance"]: s.value for s in prom.query(f'up{{job="{JOB}"}}')}
        assert dict.fromkeys(targets, 1.0) == up
        ratio = prom.value('job_endpoint:victor:request_error_ratio:5m{endpoint="/chat"}')
        assert ratio > 0.05
        firing = prom.query('ALERTS{alertname="HighErrorRate", alertstate="firing"}')
        assert [(JOB, "/chat")] == [(s.labels["job"], s.labels["endpoint"]) for s in firing]

    payload, alert = webhook.alerts("HighErrorRate")[0]
    assert ("/alerts", "victor-webhook", "4") == (
        payload["path"], payload["receiver"], payload["version"]
    )
    assert "firing" == alert["status"]
    labels = alert["labels"]
    assert {"alertname": "HighErrorRate", "job": JOB, "endpoint": "/chat",
            "severity": "warning", "prometheus": "central"} == labels
    assert "High error rate detected" == alert["annotations"]["summary"]
    assert re.fullmatch(r"Error rate is [\d.]+% for /chat", alert["annotations"]["description"])
    assert time.monotonic() - started < 90
