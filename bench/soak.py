"""Soak test of a real Gunicorn master: scrapes stay monotonic and totals exact under churn.

Starts ``python -m gunicorn -c gunicorn.conf.py app:app`` (4 sync workers, worker recycling
after ``--max-requests`` 20 requests, no jitter) on a free loopback port, with a fresh
private ``PROMETHEUS_MULTIPROC_DIR`` (mode 0700). Client threads send requests, mostly
``POST /chat`` (plain, with a tool, a simulated 429, an invalid body answered 400) and some
``GET /healthz``, one connection per request (``Connection: close``), while scraper
threads ``GET /metrics`` every 100 ms and a sampler lists the metrics directory every
100 ms.

* **R1**: ``--requests`` (20,000) requests from ``--clients`` (8) threads; with
  max_requests 20 the workers are recycled about a thousand times.
* **R2**: the same load for ``--duration`` (60) seconds while a random worker (a child of
  the master, via psutil) is sent SIGKILL every second.

After the load the run waits for the workers to settle (all back, directory unchanged for
1 s), scrapes twice more and checks:

* no counter sample ever decreases (or vanishes) between consecutive scrapes of one
  scraper: every ``_total`` sample of a counter family and every ``_count``/``_sum``/
  ``_bucket`` of a histogram or summary family, the final scrape included;
* no scrape fails (non-200 or connection error). In R2 a scrape whose connection was cut
  because the soak itself SIGKILLed a worker while the scrape was in flight is reported
  apart and not held against the library;
* acknowledged <= ``victor_requests_total`` <= sent, in total and per endpoint, where
  *acknowledged* = a 2xx/4xx status received and *sent* = every request that reached a
  connection (refused connections excluded); in R1 the total must equal acknowledged;
* the directory stays bounded: its peak entry count is below
  (workers + 1 master) x 14 files per writer x 3 + 25 (see ``directory_bound``).

    python bench/soak.py                     # R1 then R2, full size (~5-10 min)
    python bench/soak.py --run R2 --duration 10 --json
"""

from __future__ import annotations

import os
import sys

# Python puts this script's directory first on sys.path, where bench/http.py would shadow
# the standard library's http package (imported by prometheus_client, urllib, werkzeug):
# move the directory last, so `_common` is still found. Then put the repository root first,
# so this checkout's victor_mp_metrics is the one served.
if os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
    sys.path.append(sys.path.pop(0))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

import argparse
import http.client
import json
import random
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from _common import ROOT, Verdicts, free_port, library, load_average, ms, table
from prometheus_client.parser import text_string_to_metric_families

HOST = "127.0.0.1"
REQUEST_TIMEOUT = 10.0  # seconds, every HTTP call
READY_TIMEOUT = 30.0
SETTLE_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
SCRAPE_INTERVAL = 0.1
SAMPLE_INTERVAL = 0.1
KILL_INTERVAL = 1.0
# Files of one writer: 13 data-file kinds (counter, histogram, summary and gauge_{mode} for
# the 10 gauge modes of prometheus_client) plus its owner file.
FILES_PER_WRITER = 14
# Entries that do not belong to a writer: the archive of two generations during a
# compaction (2 x 7 mergeable kinds: counter, histogram, summary, gauge min/max/sum/
# mostrecent), up to 8 temp files (7 archive files + the manifest), and manifest.json,
# compact.lock, quarantine/.
FIXED_ENTRIES = 2 * 7 + 8 + 3
MONOTONIC_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_count", "_sum", "_bucket"),
    "summary": ("_count", "_sum"),
}
ENDPOINTS = ("/chat", "/healthz")
SYSTEM_SAMPLE = b"\nvictor_system_cpu_percent "
_IDENT_RE = re.compile(r"^(?:[a-z_]+_)?(?P<ident>[0-9]+-[0-9a-f]+)\.(?:db|owner)$")


def directory_bound(workers: int) -> int:
    """Entries the metrics directory may hold at most, whatever the number of restarts.

    Each of the ``workers`` slots and the master is one live writer; a slot may also have
    up to two dead predecessors whose files wait for the compactor (x 3); the rest are the
    archive and bookkeeping files (``FIXED_ENTRIES``). Without compaction the directory
    would grow by several files per restart: thousands here.
    """
    return (workers + 1) * FILES_PER_WRITER * 3 + FIXED_ENTRIES


# --- HTTP ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    status: int | None  # None: no status line received
    error: str | None  # exception class of a failure, None when the status was read
    sent: bool  # the connection was established (the request may have reached the app)
    body: bytes = b""
    seconds: float = 0.0


def http_call(
    port: int, method: str, path: str, body: bytes | None = None, timeout: float = REQUEST_TIMEOUT
) -> Outcome:
    """One request on a new connection, closed afterwards; never raises."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    headers = {"Connection": "close"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    status: int | None = None
    sent = False
    data = b""
    error: str | None = None
    try:
        conn.connect()
        sent = True
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        status = resp.status
        data = resp.read()
    except (OSError, http.client.HTTPException) as err:
        error = type(err).__name__
    finally:
        conn.close()
    return Outcome(status, error, sent, data, time.perf_counter() - started)


# --- load ------------------------------------------------------------------------------------


def pick_request(rng: random.Random) -> tuple[str, str, bytes | None]:
    """(method, path, body) of the mix: 85% POST /chat of four kinds, 15% GET /healthz."""
    roll = rng.random()
    if roll < 0.15:
        return "GET", "/healthz", None
    if roll < 0.70:
        payload: dict[str, Any] = {"message": f"soak message {rng.randrange(1000)}"}
    elif roll < 0.80:
        payload = {"message": "count these words please", "tools": ["word_count"]}
    elif roll < 0.90:
        payload = {"message": "too fast", "simulate_error": "rate_limit"}  # 429
    else:
        payload = {"message": ""}  # 400
    return "POST", "/chat", json.dumps(payload).encode()


@dataclass
class EndpointStats:
    sent: int = 0
    acknowledged: int = 0  # a 2xx or 4xx status received
    statuses: Counter[str] = field(default_factory=Counter)  # status or error class


class LoadStats:
    """What the clients saw, per endpoint; thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.endpoints = {path: EndpointStats() for path in ENDPOINTS}

    def record(self, path: str, outcome: Outcome) -> None:
        with self.lock:
            stats = self.endpoints[path]
            if outcome.sent:
                stats.sent += 1
            if outcome.status is not None:
                stats.statuses[str(outcome.status)] += 1
                if outcome.status < 300 or 400 <= outcome.status < 500:
                    stats.acknowledged += 1
            else:
                stats.statuses[outcome.error or "error"] += 1

    @property
    def sent(self) -> int:
        return sum(s.sent for s in self.endpoints.values())

    @property
    def acknowledged(self) -> int:
        return sum(s.acknowledged for s in self.endpoints.values())

    def statuses(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for stats in self.endpoints.values():
            total.update(stats.statuses)
        return total


class Budget:
    """Hands out request numbers until ``limit`` (None: until stopped) or the deadline."""

    def __init__(self, limit: int | None, stop_at: float, deadline: float) -> None:
        self.limit = limit
        self.stop_at = stop_at
        self.deadline = deadline
        self.taken = 0
        self.deadline_hit = False
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            now = time.monotonic()
            if now >= self.deadline:
                self.deadline_hit = True
                return False
            if now >= self.stop_at or (self.limit is not None and self.taken >= self.limit):
                return False
            self.taken += 1
            return True


def client(port: int, budget: Budget, stats: LoadStats, seed: int) -> None:
    rng = random.Random(seed)
    while budget.take():
        method, path, body = pick_request(rng)
        stats.record(path, http_call(port, method, path, body))


# --- scrapes ---------------------------------------------------------------------------------

SampleKey = tuple[str, tuple[tuple[str, str], ...]]


def monotonic_samples(text: str) -> dict[SampleKey, float]:
    """The samples of counter, histogram and summary families that must never decrease."""
    out: dict[SampleKey, float] = {}
    for family in text_string_to_metric_families(text):
        suffixes = MONOTONIC_SUFFIXES.get(family.type)
        if suffixes is None:
            continue
        for sample in family.samples:
            if sample.name.endswith(suffixes):
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def request_totals(text: str) -> dict[str, float]:
    """``victor_requests_total`` summed per endpoint label, plus ``"*"``: over all series."""
    totals: dict[str, float] = {"*": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "victor_requests_total":
                endpoint = sample.labels.get("endpoint", "")
                totals[endpoint] = totals.get(endpoint, 0.0) + sample.value
                totals["*"] += sample.value
    return totals


def label_text(key: SampleKey) -> str:
    name, labels = key
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"


class ScrapeStats:
    """Scrape outcomes, latencies and counter decreases; thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.statuses: Counter[str] = Counter()
        self.errors: list[tuple[float, float, str]] = []  # (start, end, what) of failures
        self.latencies: list[float] = []
        self.decreases = 0
        self.vanished = 0
        self.comparisons = 0
        self.examples: list[str] = []
        self.largest_drop = 0.0
        self.without_system = 0  # 200 scrapes lacking victor_system_cpu_percent

    def compare(
        self, before: dict[SampleKey, float], after: dict[SampleKey, float], where: str
    ) -> None:
        with self.lock:
            self.comparisons += 1
            for key, old in before.items():
                new = after.get(key)
                if new is None:
                    self.vanished += 1
                    what = f"{where}: {label_text(key)} vanished (was {old!r})"
                elif new < old:
                    self.decreases += 1
                    self.largest_drop = max(self.largest_drop, old - new)
                    what = f"{where}: {label_text(key)} {old!r} -> {new!r}"
                else:
                    continue
                if len(self.examples) < 8:
                    self.examples.append(what)


def scraper(
    index: int, port: int, stats: ScrapeStats, stop: threading.Event, last: list[Any]
) -> None:
    """GET /metrics every 100 ms; compare each scrape with this scraper's previous one."""
    previous: dict[SampleKey, float] | None = None
    next_at = time.monotonic()
    while not stop.is_set():
        started = time.monotonic()
        outcome = http_call(port, "GET", "/metrics")
        ended = time.monotonic()
        samples: dict[SampleKey, float] | None = None
        what = outcome.error or str(outcome.status)
        if outcome.status == 200 and outcome.error is None:
            try:
                samples = monotonic_samples(outcome.body.decode())
            except Exception as err:  # a malformed exposition is a failed scrape
                what = f"unparsable ({type(err).__name__})"
        with stats.lock:
            stats.count += 1
            stats.statuses[what if samples is None else "200"] += 1
            if samples is None:
                stats.errors.append((started, ended, what))
            else:
                stats.latencies.append(outcome.seconds)
                if SYSTEM_SAMPLE not in outcome.body:
                    stats.without_system += 1
        if samples is not None:
            if previous is not None:
                stats.compare(previous, samples, f"scraper {index}")
            previous = samples
        next_at = max(next_at + SCRAPE_INTERVAL, time.monotonic())
        stop.wait(next_at - time.monotonic())
    last[index] = previous


# --- the metrics directory -------------------------------------------------------------------


class DirectorySampler:
    """Counts the metrics directory's entries every 100 ms, and the workers seen."""

    def __init__(self, path: Path, master: int) -> None:
        self.path = path
        self.master = master
        self.peak = 0
        self.samples = 0
        self.per_writer_peak = 0
        self.worker_pids: set[int] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dir-sampler", daemon=True)

    def entries(self) -> list[str]:
        try:
            return os.listdir(self.path)
        except OSError:
            return []

    def sample(self) -> int:
        names = self.entries()
        per_writer: Counter[str] = Counter()
        for name in names:
            match = _IDENT_RE.match(name)
            if match:
                per_writer[match["ident"]] += 1
        self.peak = max(self.peak, len(names))
        self.per_writer_peak = max([self.per_writer_peak, *per_writer.values()])
        self.samples += 1
        self.worker_pids.update(worker_pids(self.master))
        return len(names)

    def _run(self) -> None:
        while not self.stop.wait(SAMPLE_INTERVAL):
            self.sample()

    def start(self) -> None:
        self.thread.start()

    def join(self) -> None:
        self.stop.set()
        self.thread.join(5)


def worker_pids(master: int) -> list[int]:
    try:
        return [child.pid for child in psutil.Process(master).children()]
    except psutil.Error:
        return []


# --- gunicorn --------------------------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    directory: Path
    log: Path
    scrape_port: int = 0  # where scrapers go: the app's port, or the master's metrics port

    def logs(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def start_server(workdir: Path, workers: int, max_requests: int, scrape: str = "app") -> Server:
    port = free_port()
    metrics_port = free_port() if scrape == "master" else 0
    directory = workdir / "metrics"
    directory.mkdir(mode=0o700)
    os.chmod(directory, 0o700)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("VICTOR_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    env["PYTHONPATH"] = str(ROOT)
    if metrics_port:
        env["VICTOR_METRICS_PORT"] = str(metrics_port)
        env["VICTOR_METRICS_ADDR"] = HOST
    cmd = [
        sys.executable,
        "-m",
        "gunicorn",
        "-c",
        "gunicorn.conf.py",
        "app:app",
        "-b",
        f"{HOST}:{port}",
        "-w",
        str(workers),
        "-k",
        "sync",
        "--max-requests",
        str(max_requests),
        "--max-requests-jitter",
        "0",
        "--no-control-socket",
    ]
    log = workdir / "gunicorn.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Server(proc, port, directory, log, metrics_port)


def wait_ready(server: Server, stats: LoadStats) -> None:
    """Poll GET /healthz (recorded like client requests) until 200; bounded."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited {server.proc.returncode}:\n{server.logs()}")
        outcome = http_call(server.port, "GET", "/healthz", timeout=2.0)
        stats.record("/healthz", outcome)
        if outcome.status == 200:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"gunicorn not ready in {READY_TIMEOUT:.0f} s:\n{server.logs()}")
        time.sleep(0.1)


def stop_server(server: Server) -> None:
    """SIGTERM the master, wait, then SIGKILL its whole process group."""
    proc = server.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def settle(server: Server, sampler: DirectorySampler, workers: int) -> float:
    """Wait until ``workers`` workers run and the directory is unchanged for 1 s; bounded."""
    started = time.monotonic()
    stable_since = started
    before = sorted(sampler.entries())
    while time.monotonic() - started < SETTLE_TIMEOUT:
        time.sleep(0.1)
        now = sorted(sampler.entries())
        if now != before or len(worker_pids(server.proc.pid)) != workers:
            before = now
            stable_since = time.monotonic()
        elif time.monotonic() - stable_since >= 1.0:
            break
    return time.monotonic() - started


def killer(
    master: int, stop: threading.Event, kills: list[tuple[float, int]], rng: random.Random
) -> None:
    """SIGKILL a random worker every second until stopped."""
    while not stop.wait(KILL_INTERVAL):
        pids = worker_pids(master)
        if not pids:
            continue
        pid = rng.choice(pids)
        kills.append((time.monotonic(), pid))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            kills.pop()


# --- one run ---------------------------------------------------------------------------------


@dataclass
class Options:
    name: str
    workers: int
    max_requests: int
    clients: int
    scrapers: int
    requests: int | None  # R1
    duration: float | None  # R2
    deadline: float
    seed: int
    keep: bool = False
    scrape: str = "app"  # "master": scrape VICTOR_METRICS_PORT, as Prometheus would


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(opts: Options) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"victor-soak-{opts.name}-"))
    server = start_server(workdir, opts.workers, opts.max_requests, opts.scrape)
    try:
        result = load_and_check(opts, server)
    finally:
        stop_server(server)
        if not opts.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    result["log"] = str(server.log) if opts.keep else None
    return result


def load_and_check(opts: Options, server: Server) -> dict[str, Any]:
    load = LoadStats()
    scrapes = ScrapeStats()
    wait_ready(server, load)
    master = server.proc.pid
    sampler = DirectorySampler(server.directory, master)
    sampler.sample()
    sampler.start()

    started = time.monotonic()
    deadline = started + opts.deadline
    stop_at = started + opts.duration if opts.duration is not None else deadline
    budget = Budget(opts.requests, stop_at, deadline)
    stop_scrapes = threading.Event()
    last: list[Any] = [None] * opts.scrapers
    threads = [
        threading.Thread(
            target=scraper,
            args=(i, server.scrape_port or server.port, scrapes, stop_scrapes, last),
            name=f"scraper-{i}",
            daemon=True,
        )
        for i in range(opts.scrapers)
    ]
    clients = [
        threading.Thread(
            target=client,
            args=(server.port, budget, load, opts.seed * 1000 + i),
            name=f"client-{i}",
            daemon=True,
        )
        for i in range(opts.clients)
    ]
    kills: list[tuple[float, int]] = []
    stop_kills = threading.Event()
    kill_thread = None
    if opts.duration is not None:
        kill_thread = threading.Thread(
            target=killer,
            args=(master, stop_kills, kills, random.Random(opts.seed)),
            name="killer",
            daemon=True,
        )
    for thread in [*threads, *clients, *([kill_thread] if kill_thread else [])]:
        thread.start()
    for thread in clients:
        # A client ends at most one request (2 x REQUEST_TIMEOUT) after the deadline.
        thread.join(max(0.0, deadline - time.monotonic()) + 3 * REQUEST_TIMEOUT)
    load_seconds = time.monotonic() - started
    stop_kills.set()
    if kill_thread is not None:
        kill_thread.join(5)
    stop_scrapes.set()
    for thread in threads:
        thread.join(3 * REQUEST_TIMEOUT)
    hung = [t.name for t in [*clients, *threads] if t.is_alive()]

    settle_seconds = settle(server, sampler, opts.workers)
    finals = []
    for i in range(2):
        if i:
            time.sleep(0.5)
        outcome = http_call(server.port, "GET", "/metrics")
        if outcome.status == 200 and outcome.error is None:
            finals.append(outcome.body.decode())
        else:
            with scrapes.lock:
                scrapes.statuses[outcome.error or str(outcome.status)] += 1
                scrapes.errors.append((0.0, 0.0, f"final: {outcome.error or outcome.status}"))
    sampler.join()
    final_entries = sampler.sample()
    totals: dict[str, float] = {}
    if finals:
        final_samples = monotonic_samples(finals[-1])
        for index, previous in enumerate(last):
            if previous is not None:
                scrapes.compare(previous, final_samples, f"scraper {index} vs final")
        totals = request_totals(finals[-1])
    stable = len(finals) == 2 and request_totals(finals[0]) == totals

    cut = [e for e in scrapes.errors if any(e[0] <= t <= e[1] for t, _ in kills)]
    return summarise(
        opts,
        server,
        load,
        scrapes,
        sampler,
        totals,
        {
            "load_seconds": load_seconds,
            "settle_seconds": settle_seconds,
            "deadline_hit": budget.deadline_hit,
            "hung_threads": hung,
            "kills": len(kills),
            "final_entries": final_entries,
            "scrape_errors_cut_by_kill": len(cut),
            "final_stable": stable,
        },
    )


def summarise(
    opts: Options,
    server: Server,
    load: LoadStats,
    scrapes: ScrapeStats,
    sampler: DirectorySampler,
    totals: dict[str, float],
    extra: dict[str, Any],
) -> dict[str, Any]:
    log = server.log.read_text(errors="replace")
    per_endpoint = {
        path: {
            "recorded": totals.get(path, 0.0),
            "acknowledged": load.endpoints[path].acknowledged,
            "sent": load.endpoints[path].sent,
        }
        for path in ENDPOINTS
    }
    return {
        "run": opts.name,
        "workers": opts.workers,
        "max_requests": opts.max_requests,
        "clients": opts.clients,
        "scrapers": opts.scrapers,
        "requests_target": opts.requests,
        "duration_target": opts.duration,
        "sent": load.sent,
        "acknowledged": load.acknowledged,
        "statuses": dict(sorted(load.statuses().items())),
        "per_endpoint": per_endpoint,
        "final_total": totals.get("*", 0.0) if totals else None,
        "final_other_endpoints": {
            k: v for k, v in totals.items() if k != "*" and k not in ENDPOINTS
        },
        "scrapes": scrapes.count,
        "scrape_statuses": dict(sorted(scrapes.statuses.items())),
        "scrape_errors": len(scrapes.errors),
        "scrape_p50_ms": percentile(scrapes.latencies, 0.50) * 1000,
        "scrape_p99_ms": percentile(scrapes.latencies, 0.99) * 1000,
        "comparisons": scrapes.comparisons,
        "decreases": scrapes.decreases,
        "vanished": scrapes.vanished,
        "largest_drop": scrapes.largest_drop,
        "scrapes_without_system_metrics": scrapes.without_system,
        "decrease_examples": scrapes.examples,
        "dir_peak": sampler.peak,
        "dir_samples": sampler.samples,
        "dir_bound": directory_bound(opts.workers),
        "files_per_writer_peak": sampler.per_writer_peak,
        "worker_pids_seen": len(sampler.worker_pids),
        "log_exceptions": exceptions_in(log),
        "log_library_messages": library_messages(log),
        **extra,
    }


def exceptions_in(log: str) -> dict[str, int]:
    """{final exception line: count} of the tracebacks in a log (a chain counts once)."""
    found: Counter[str] = Counter()
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("Traceback"):
            continue
        for j in range(i + 1, len(lines)):
            if lines[j] and not lines[j].startswith(" "):
                following = next((x for x in lines[j + 1 :] if x), "")
                if not following.startswith(("The above exception", "During handling")):
                    found[re.sub(r"\d+", "N", lines[j])[:160]] += 1
                break
    return dict(found.most_common())


def library_messages(log: str) -> dict[str, int]:
    """{message with digits as N: count} of the lines victor_mp_metrics logged."""
    found: Counter[str] = Counter()
    for line in log.splitlines():
        at = line.find("victor_mp_metrics: ")
        if at >= 0 and not line.startswith(" "):
            found[re.sub(r"\d+", "N", line[at:])[:160]] += 1
    return dict(found.most_common())


# --- verdicts --------------------------------------------------------------------------------


def check(result: dict[str, Any]) -> tuple[Verdicts, dict[str, bool]]:
    """The PASS/FAIL lines of one run, and {goal: passed}."""
    verdicts = Verdicts()
    goals: dict[str, bool] = {}

    def goal(title: str, ok: bool, detail: str) -> None:
        goals[title] = ok
        verdicts.check(title, ok, detail)

    name = result["run"]
    goal(
        f"{name} counters never decrease",
        result["decreases"] + result["vanished"] == 0,
        f"{result['decreases']} decreases, {result['vanished']} vanished series in "
        f"{result['comparisons']} comparisons of consecutive scrapes",
    )
    held = result["scrape_errors"] - (result["scrape_errors_cut_by_kill"] if name == "R2" else 0)
    detail = f"{result['scrape_errors']} failed of {result['scrapes']} scrapes"
    if name == "R2":
        detail += (
            f" ({result['scrape_errors_cut_by_kill']} cut by our SIGKILL of the worker "
            f"serving them, not counted)"
        )
    goal(f"{name} no scrape errors", held == 0, detail)
    total = result["final_total"]
    ack, sent = result["acknowledged"], result["sent"]
    bounds_ok = total is not None and ack <= total <= sent and not result["final_other_endpoints"]
    for figures in result["per_endpoint"].values():
        if not figures["acknowledged"] <= figures["recorded"] <= figures["sent"]:
            bounds_ok = False
    goal(
        f"{name} acknowledged <= recorded <= sent",
        bounds_ok,
        f"{ack:,} <= {_num(total)} <= {sent:,}; "
        + "; ".join(
            f"{path}: {f['acknowledged']:,} <= {_num(f['recorded'])} <= {f['sent']:,}"
            for path, f in result["per_endpoint"].items()
        )
        + (
            f"; other endpoints {result['final_other_endpoints']}"
            if result["final_other_endpoints"]
            else ""
        ),
    )
    if name == "R1":
        goal(
            f"{name} recorded == acknowledged",
            total == ack,
            f"{_num(total)} recorded, {ack:,} acknowledged",
        )
    goal(
        f"{name} metrics directory bounded",
        result["dir_peak"] < result["dir_bound"],
        f"peak {result['dir_peak']} entries < bound {result['dir_bound']} "
        f"= ({result['workers']} workers + 1 master) x {FILES_PER_WRITER} files per writer x 3 "
        f"+ {FIXED_ENTRIES} fixed; final {result['final_entries']}",
    )
    done = not result["deadline_hit"] and not result["hung_threads"] and result["final_stable"]
    goal(
        f"{name} finished in time and settled",
        done,
        f"load {result['load_seconds']:.1f} s, settle {result['settle_seconds']:.1f} s"
        + (", deadline hit" if result["deadline_hit"] else "")
        + (f", hung: {result['hung_threads']}" if result["hung_threads"] else "")
        + ("" if result["final_stable"] else ", final scrapes differ or failed"),
    )
    return verdicts, goals


def _num(value: float | None) -> str:
    if value is None:
        return "none"
    return f"{value:,.0f}" if value == int(value) else f"{value:,.3f}"


def report(result: dict[str, Any]) -> None:
    name = result["run"]
    size = (
        f"{result['requests_target']:,} requests"
        if name == "R1"
        else f"{result['duration_target']:g} s, {result['kills']} SIGKILLs"
    )
    print(
        f"\n== {name}: {result['workers']} sync workers, max_requests "
        f"{result['max_requests']}, {size}, {result['clients']} clients, "
        f"{result['scrapers']} scrapers every {SCRAPE_INTERVAL * 1000:.0f} ms"
    )
    print(
        f"load {result['load_seconds']:.1f} s ({result['sent'] / result['load_seconds']:.0f}"
        f" req/s); {result['worker_pids_seen']} worker pids seen; settle "
        f"{result['settle_seconds']:.1f} s"
    )
    print("client statuses: " + ", ".join(f"{k} x{v:,}" for k, v in result["statuses"].items()))
    print(
        f"scrapes: {result['scrapes']:,}; "
        + ", ".join(f"{k} x{v:,}" for k, v in result["scrape_statuses"].items())
        + f"; latency p50 {ms(result['scrape_p50_ms'] / 1000)} ms, "
        f"p99 {ms(result['scrape_p99_ms'] / 1000)} ms; "
        f"{result['scrapes_without_system_metrics']:,} successful scrapes lacked "
        "victor_system_cpu_percent (not a goal)"
    )
    print(
        f"counter decreases: {result['decreases']} (largest drop {result['largest_drop']:g}),"
        f" vanished series: {result['vanished']}, in {result['comparisons']:,} comparisons"
    )
    for example in result["decrease_examples"]:
        print(f"  {example}")
    rows = [
        ["all", f"{result['sent']:,}", f"{result['acknowledged']:,}", _num(result["final_total"])]
    ]
    rows += [
        [path, f"{f['sent']:,}", f"{f['acknowledged']:,}", _num(f["recorded"])]
        for path, f in result["per_endpoint"].items()
    ]
    print(table(["victor_requests_total", "sent", "acknowledged", "recorded (final)"], rows))
    print(
        f"metrics directory: peak {result['dir_peak']} entries, final "
        f"{result['final_entries']} ({result['dir_samples']} samples; at most "
        f"{result['files_per_writer_peak']} files for one writer)"
    )
    exceptions, messages = result["log_exceptions"], result["log_library_messages"]
    print(
        f"gunicorn log: {sum(exceptions.values())} tracebacks, "
        f"{sum(messages.values())} lines logged by victor_mp_metrics"
    )
    for line, count in [*exceptions.items(), *messages.items()]:
        print(f"  {count} x {line}")
    if result.get("log"):
        print(f"gunicorn log kept: {result['log']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", choices=("R1", "R2", "both"), default="both")
    parser.add_argument("--requests", type=int, default=20_000, help="R1 requests (20000)")
    parser.add_argument("--clients", type=int, default=8, help="client threads (8)")
    parser.add_argument("--scrapers", type=int, default=3, help="scraper threads (3)")
    parser.add_argument("--duration", type=float, default=60.0, help="R2 seconds (60)")
    parser.add_argument("--workers", type=int, default=4, help="Gunicorn workers (4)")
    parser.add_argument("--max-requests", type=int, default=20, help="worker recycling (20)")
    parser.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds the load may last at most (R1: 60 + requests / 20; R2: duration + 60)",
    )
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--scrape", choices=("app", "master"), default="app",
                        help="scrape the app's /metrics (a worker answers) or the master's "
                        "VICTOR_METRICS_PORT (app)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary last")
    parser.add_argument("--keep", action="store_true", help="keep the Gunicorn log (path shown)")
    args = parser.parse_args()

    print(f"{library()}; {load_average()}", flush=True)
    results: list[dict[str, Any]] = []
    failed: list[str] = []
    for name in ("R1", "R2") if args.run == "both" else (args.run,):
        r1 = name == "R1"
        default_deadline = 60 + args.requests / 20 if r1 else args.duration + 60
        opts = Options(
            name=name,
            workers=args.workers,
            max_requests=args.max_requests,
            clients=args.clients,
            scrapers=args.scrapers,
            requests=args.requests if r1 else None,
            duration=None if r1 else args.duration,
            deadline=args.deadline or default_deadline,
            seed=args.seed,
            keep=args.keep,
            scrape=args.scrape,
        )
        try:
            result = run(opts)
        except RuntimeError as err:
            print(f"\n== {name}: could not run: {err}", flush=True)
            failed.append(f"{name} ran")
            results.append({"run": name, "error": str(err), "goals": {f"{name} ran": False}})
            continue
        report(result)
        verdicts, result["goals"] = check(result)
        print(verdicts.report(), flush=True)
        failed += verdicts.failed
        results.append(result)
    print(f"\n{load_average()}")
    print("soak: " + ("FAIL (" + "; ".join(failed) + ")" if failed else "PASS"), flush=True)
    if args.json:
        print(
            json.dumps(
                {"passed": not failed, "failed": failed, "runs": results},
                sort_keys=True,
                default=str,
            )
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
