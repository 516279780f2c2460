"""Starting a real Prometheus on a loopback port with the shipped configuration, and querying it.

The configuration is generated in a test's temporary directory from the files in
``examples/observability``: the scrape targets become the test's Gunicorn masters, every
interval (scrape, evaluation, rule group; the scrape timeout, which may not exceed the
scrape interval) becomes one second so that a test sees rates and recorded series within
seconds, and the rule files are copied with only their group
``interval`` changed. Their expressions stay byte-identical to the shipped ones (checked),
so what runs here is what users deploy.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ._gunicorn import ROOT, free_port, request, wait_ready

ASSETS = ROOT / "examples" / "observability"
SINGLE_TARGET_CONFIG = ASSETS / "prometheus.yml"
SCALE_OUT_CONFIG = ASSETS / "prometheus-scale-out.yml"
FILE_SD_TARGETS = ASSETS / "file_sd_targets.json"
INTERVAL = "1s"

_GROUP_INTERVAL = re.compile(r"^(?P<indent>[ \t]*)interval:[ \t]*\S+[ \t]*$", re.MULTILINE)


@dataclass(frozen=True)
class Sample:
    """One element of an instant vector: its labels, value and timestamp (Unix seconds)."""

    labels: Mapping[str, str]
    value: float
    timestamp: float


class QueryError(AssertionError):
    """Prometheus rejected a query or could not be reached; the message has its answer."""


def rule_exprs(path: Path) -> list[tuple[str, str]]:
    """(alert or record name, expr) of every rule in a rule file, in file order."""
    return [
        (rule.get("alert") or rule["record"], rule["expr"])
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def rewrite_rule_file(source: Path, directory: Path, interval: str = INTERVAL) -> Path:
    """Copy ``source`` into ``directory`` with every group's ``interval`` set to ``interval``.

    Only the ``interval:`` lines change: the text is edited rather than re-dumped, and the
    copy's rules are checked to be exactly the shipped ones.
    """
    text = source.read_text()
    rewritten = _GROUP_INTERVAL.sub(rf"\g<indent>interval: {interval}", text)
    target = directory / source.name
    target.write_text(rewritten)
    groups = yaml.safe_load(rewritten)["groups"]
    assert [interval] * len(groups) == [g.get("interval", interval) for g in groups], target
    assert rule_exprs(source) == rule_exprs(target), f"{target} changed a rule of {source}"
    return target


def _fast_config(source: Path, directory: Path) -> dict[str, Any]:
    """The shipped config with one-second intervals and rule files copied next to it."""
    config = yaml.safe_load(source.read_text())
    config["global"].update(
        scrape_interval=INTERVAL, scrape_timeout=INTERVAL, evaluation_interval=INTERVAL
    )
    config["rule_files"] = [
        rewrite_rule_file(source.parent / name, directory).name for name in config["rule_files"]
    ]
    for job in config["scrape_configs"]:
        job["scrape_interval"] = INTERVAL
        job.pop("scrape_timeout", None)
    return config


def single_target_config(directory: Path, target: str) -> Path:
    """``prometheus.yml`` with its one static target replaced by ``target`` (host:port)."""
    config = _fast_config(SINGLE_TARGET_CONFIG, directory)
    (job,) = config["scrape_configs"]
    (static,) = job["static_configs"]
    assert 1 == len(static["targets"]), static
    static["targets"] = [target]
    path = directory / SINGLE_TARGET_CONFIG.name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write_file_sd_targets(path: Path, groups: Sequence[Sequence[str]]) -> Path:
    """Write ``file_sd_targets.json``'s groups, with their labels, holding ``groups`` targets.

    Written atomically (temp file, then rename), as a deploy tool should: Prometheus watches
    the file and must never read half of it.
    """
    shipped = json.loads(FILE_SD_TARGETS.read_text())
    assert len(groups) == len(shipped), f"{FILE_SD_TARGETS} has {len(shipped)} groups"
    content = [
        {"targets": list(targets), "labels": group["labels"]}
        for targets, group in zip(groups, shipped, strict=True)
    ]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(content, indent=2))
    os.replace(tmp, path)
    return path


def file_sd_config(directory: Path, targets_file: Path) -> Path:
    """``prometheus-scale-out.yml`` reading its targets from ``targets_file``."""
    config = _fast_config(SCALE_OUT_CONFIG, directory)
    (job,) = config["scrape_configs"]
    (discovery,) = job["file_sd_configs"]
    discovery["files"] = [str(targets_file)]
    path = directory / SCALE_OUT_CONFIG.name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class Prometheus:
    """A running Prometheus server and its HTTP API."""

    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]

    def api(self, path: str, **params: Any) -> Any:
        """``data`` of one API call (GET /api/v1/...); a failed call raises QueryError."""
        query = urllib.parse.urlencode(params, doseq=True)
        response = request(f"{self.url}/api/v1/{path}?{query}")
        try:
            body = json.loads(response.body)
        except ValueError:
            body = {}
        if response.status != 200 or body.get("status") != "success":
            raise QueryError(f"GET /api/v1/{path} {params}: {response.status} {response.text}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[Sample]:
        """The instant vector of ``expr`` now (or at Unix time ``at``)."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        if data["resultType"] == "scalar":
            timestamp, value = data["result"]
            return [Sample({}, float(value), float(timestamp))]
        assert "vector" == data["resultType"], f"{expr}: {data['resultType']}"
        return [
            Sample(item["metric"], float(item["value"][1]), float(item["value"][0]))
            for item in data["result"]
        ]

    def value(self, expr: str, at: float | None = None) -> float:
        """The single value of ``expr``; fails unless the result has exactly one element."""
        samples = self.query(expr, at)
        assert 1 == len(samples), f"{expr} returned {samples}"
        return samples[0].value

    def targets(self) -> list[dict[str, Any]]:
        """Active scrape targets, as /api/v1/targets lists them."""
        return list(self.api("targets", state="active")["activeTargets"])

    def wait_for(
        self,
        expr: str,
        predicate: Callable[[list[Sample]], bool],
        timeout: float = 20.0,
    ) -> list[Sample]:
        """Query ``expr`` until ``predicate`` accepts the result; fails after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            samples = self.query(expr)
            if predicate(samples):
                return samples
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{expr} still returned {samples} after {timeout} s\n{self.logs()}"
                )
            time.sleep(0.2)

    def wait_for_scrape(self, after: float, targets: int = 1, timeout: float = 20.0) -> None:
        """Wait until each of ``targets`` targets was scraped successfully after ``after``.

        ``up`` is written in the same commit as the scraped samples, so once a query sees
        an ``up`` sample of 1 stamped later than ``after`` (Unix time), queries see the
        samples of that scrape too. A failed scrape writes ``up`` 0 and no samples. (The
        first scrape comes some 5 s after start: Prometheus throttles target updates.)
        """
        try:
            # timestamp() of a selector gives the samples' times; of `up == 1` it would
            # give the evaluation time, so the filter is applied with `and`.
            self.wait_for(
                "timestamp(up) and up == 1",
                lambda samples: len(samples) == targets and all(s.value > after for s in samples),
                timeout,
            )
        except AssertionError as err:
            errors = {t["scrapeUrl"]: (t["health"], t["lastError"]) for t in self.targets()}
            raise AssertionError(f"{err}\ntargets: {errors}") from None

    def wait_for_rule_evaluation(self, record: str, after: float, timeout: float = 20.0) -> None:
        """Wait until recorded series ``record`` has a sample evaluated after ``after``."""
        self.wait_for(
            f"timestamp({record})",
            lambda samples: bool(samples) and all(s.value > after for s in samples),
            timeout,
        )


def finite(samples: Sequence[Sample]) -> list[Sample]:
    """The samples whose value is a number (not NaN or infinite)."""
    return [s for s in samples if math.isfinite(s.value)]


@contextmanager
def prometheus(
    binary: str, directory: Path, config: Path, flags: Sequence[str] = ()
) -> Iterator[Prometheus]:
    """Run ``binary`` with ``config`` (and extra ``flags``) on a free loopback port until it
    is ready; always stopped. Its data and log live in ``directory``.
    """
    port = free_port()
    log = directory / f"prometheus-{port}.log"
    cmd = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={directory / f'prometheus-data-{port}'}",
        f"--web.listen-address=127.0.0.1:{port}",
        *flags,
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=directory, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Prometheus(proc, port, log)
    try:
        wait_ready(proc, "prometheus",
                   lambda: request(f"{server.url}/-/ready", timeout=2).status == 200,
                   server.logs)
        yield server
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop Prometheus: SIGTERM (a clean shutdown), then SIGKILL after ``timeout`` s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait(5)
