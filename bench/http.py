"""Request overhead under Gunicorn: the same small Flask app with and without metrics.

Four Gunicorn masters (2 sync workers each, 127.0.0.1, free ports) serve ``bench/apps.py``:

* ``plain``: ``bench.apps:plain``, no metrics; our ``gunicorn.conf.py`` with
  ``VICTOR_METRICS_ENABLED=false`` (its hooks then do nothing), so the server setup is
  the same as for ``ours``;
* ``ours``: ``bench.apps:ours`` (``VictorMetrics``), our ``gunicorn.conf.py``, metrics on;
* ``disabled``: ``bench.apps:ours`` with ``VICTOR_METRICS_ENABLED=false``;
* ``pfe``: ``bench.apps:pfe`` (prometheus_flask_exporter ``GunicornPrometheusMetrics``,
  multiprocess) with ``bench/gunicorn_pfe.conf.py`` (same server settings, its own hooks).

Every master gets its own empty PROMETHEUS_MULTIPROC_DIR and ``VICTOR_MAX_REQUESTS=0``
(no worker recycling in the middle of a run; the pfe config sets the same). ``wrk -t2
-c16 --latency`` loads ``GET /ping`` (a JSON response): per variant a warm-up run, then
the measured run. Variants take turns, ``--rounds`` times (order reversed every other
round); per variant the run with the most requests/s is kept. wrk and the workers share
the machine's cores, the same way for every variant; the workers' CPU time per request is
recorded too, since it hardly depends on other load on the machine.

After the runs the request counters of ``ours`` and ``pfe`` are scraped and compared with
the number of requests wrk completed, to show both really recorded every request. Then
each variant's WSGI app is timed in-process (no Gunicorn, no sockets), which isolates the
cost of the instrumentation itself; with plain's worker CPU per request it predicts the
throughput ratio of a CPU-bound server.

    python bench/http.py               # 10 s runs, 2 rounds
    python bench/http.py --quick       # 3 s runs, 3 rounds
"""

from __future__ import annotations

import os
import sys

# Python puts this script's directory first on sys.path, where bench/http.py would shadow
# the standard library's http package (imported by prometheus_client, urllib, werkzeug):
# move the directory last, so `_common` is still found. Then put the repository root first,
# so this checkout's victor_mp_metrics is measured, whichever checkout `pip install -e`
# last pointed site-packages at.
if os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
    sys.path.append(sys.path.pop(0))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

import argparse
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from _common import ROOT, Verdicts, free_port, library, load_average, ratio, table

BENCH = Path(__file__).resolve().parent
WRK = shutil.which("wrk") or "/usr/bin/wrk"
PATH = "/ping"


@dataclass
class Variant:
    name: str
    app: str
    config: Path
    env: dict[str, str]
    port: int = 0
    metrics_port: int = 0
    proc: subprocess.Popen | None = None
    directory: str = ""
    log: Path | None = None
    runs: list[WrkResult] = field(default_factory=list)
    sent: int = 0


@dataclass
class WrkResult:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: str
    cpu_us: float = 0.0  # CPU time of the Gunicorn workers per completed request


_OFF = {"VICTOR_METRICS_ENABLED": "false"}
VARIANTS = (
    Variant("plain", "bench.apps:plain", ROOT / "gunicorn.conf.py", _OFF),
    Variant("ours", "bench.apps:ours", ROOT / "gunicorn.conf.py", {}),
    Variant("disabled", "bench.apps:ours", ROOT / "gunicorn.conf.py", _OFF),
    Variant("pfe", "bench.apps:pfe", BENCH / "gunicorn_pfe.conf.py", {}),
)  # fmt: skip


# --- gunicorn ------------------------------------------------------------------------------


def start(variant: Variant, workdir: Path) -> None:
    variant.port = free_port()
    variant.directory = tempfile.mkdtemp(prefix=f"metrics-{variant.name}-", dir=workdir)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("VICTOR_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env.update(variant.env)
    env["PROMETHEUS_MULTIPROC_DIR"] = variant.directory
    env["VICTOR_MAX_REQUESTS"] = "0"
    env["PYTHONPATH"] = str(ROOT)
    if variant.name == "pfe":
        variant.metrics_port = free_port()
        env["BENCH_PFE_METRICS_PORT"] = str(variant.metrics_port)
    cmd = [
        sys.executable, "-m", "gunicorn", "-c", str(variant.config),
        "-w", "2", "-b", f"127.0.0.1:{variant.port}", "--no-control-socket",
        variant.app,
    ]  # fmt: skip
    variant.log = workdir / f"gunicorn-{variant.name}.log"
    with open(variant.log, "wb") as out:
        variant.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_ready(variant: Variant, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    assert variant.proc is not None
    while True:
        if variant.proc.poll() is not None:
            raise SystemExit(f"gunicorn {variant.name} exited:\n{logs(variant)}")
        try:
            with urllib.request.urlopen(url(variant), timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"gunicorn {variant.name} did not answer in {timeout} s:\n"
                             f"{logs(variant)}")  # fmt: skip
        time.sleep(0.1)


def stop(variant: Variant) -> None:
    """SIGTERM the master, wait at most 10 s, then SIGKILL its whole process group."""
    proc = variant.proc
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(5)
    variant.proc = None


def logs(variant: Variant) -> str:
    return variant.log.read_text(errors="replace")[-3000:] if variant.log else ""


def url(variant: Variant, path: str = PATH) -> str:
    return f"http://127.0.0.1:{variant.port}{path}"


# --- wrk -----------------------------------------------------------------------------------

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _duration_ms(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s)", text)
    if match is None:
        raise ValueError(f"cannot parse wrk duration {text!r}")
    return float(match[1]) * _UNITS[match[2]]


def parse_wrk(output: str) -> WrkResult:
    requests = re.search(r"^\s*(\d+) requests in", output, re.M)
    rps = re.search(r"^Requests/sec:\s+([0-9.]+)", output, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    if not (requests and rps and p50 and p99):
        raise ValueError(f"unexpected wrk output:\n{output}")
    errors = [line.strip() for line in output.splitlines()
              if "Socket errors" in line or "Non-2xx" in line]  # fmt: skip
    return WrkResult(int(requests[1]), float(rps[1]), _duration_ms(p50[1]),
                     _duration_ms(p99[1]), "; ".join(errors))  # fmt: skip


def workers_cpu(variant: Variant) -> float:
    """User + system CPU seconds used so far by the master's worker processes."""
    assert variant.proc is not None
    total = 0.0
    for child in psutil.Process(variant.proc.pid).children():
        try:
            times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def wrk(variant: Variant, seconds: float, threads: int, connections: int) -> WrkResult:
    cmd = [WRK, f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency",
           url(variant)]  # fmt: skip
    cpu_before = workers_cpu(variant)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=False)
    cpu = workers_cpu(variant) - cpu_before
    if proc.returncode != 0:
        raise SystemExit(f"wrk failed on {variant.name}:\n{proc.stdout}{proc.stderr}")
    result = parse_wrk(proc.stdout)
    result.cpu_us = cpu / max(1, result.requests) * 1e6
    variant.sent += result.requests
    return result


# --- what the servers recorded -------------------------------------------------------------


def recorded(variant: Variant) -> float | None:
    """Requests to /ping the variant's metrics counted (None: it has no metrics)."""
    if variant.name == "ours":
        text = fetch(url(variant, "/metrics"))
        pattern = r'^victor_requests_total\{[^}]*endpoint="/ping"[^}]*\} (\S+)$'
    elif variant.name == "pfe":
        text = fetch(f"http://127.0.0.1:{variant.metrics_port}/metrics")
        pattern = r'^flask_http_request_total\{[^}]*status="200"[^}]*\} (\S+)$'
    else:
        return None
    return sum(float(v) for v in re.findall(pattern, text, re.M))


def fetch(address: str) -> str:
    with urllib.request.urlopen(address, timeout=30) as resp:
        return resp.read().decode()  # type: ignore[no-any-return]


# --- in-process WSGI cost ------------------------------------------------------------------


def wsgi_child(name: str, number: int) -> None:
    """In a subprocess with the variant's environment: CPU us per request through the WSGI
    app alone (no Gunicorn, no sockets), the way a sync worker calls it."""
    import timeit

    from werkzeug.test import EnvironBuilder

    from bench import apps

    library()

    app = getattr(apps, {"disabled": "ours"}.get(name, name))
    base = EnvironBuilder(path=PATH, base_url="http://127.0.0.1:8000").get_environ()

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: object = None):
        return lambda data: None

    def one() -> None:
        body = app(dict(base), start_response)
        for _chunk in body:
            pass
        close = getattr(body, "close", None)
        if close is not None:
            close()

    for _ in range(200):
        one()
    best = min(timeit.Timer(one, timer=time.process_time).repeat(repeat=5, number=number))
    print(best / number * 1e6)


def wsgi_costs(
    variants: list[Variant], number: int, rounds: int, workdir: Path
) -> dict[str, float]:
    """Best of ``rounds`` subprocess runs per variant, the variants taking turns."""
    costs: dict[str, float] = {}
    for round_ in range(rounds):
        for variant in variants if round_ % 2 == 0 else variants[::-1]:
            env = {
                k: v
                for k, v in os.environ.items()
                if not k.startswith("VICTOR_") and k != "PROMETHEUS_MULTIPROC_DIR"
            }
            env.update(variant.env)
            env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(dir=workdir)
            env["PYTHONPATH"] = str(ROOT)
            cmd = [sys.executable, __file__, "--wsgi-child", variant.name,
                   "--wsgi-number", str(number)]  # fmt: skip
            proc = subprocess.run(
                cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
            )
            if proc.returncode != 0:
                raise SystemExit(f"WSGI measurement of {variant.name} failed:\n{proc.stderr}")
            us = float(proc.stdout.split()[-1])
            costs[variant.name] = min(us, costs.get(variant.name, us))
    return costs


# --- main ----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="3 s runs, 3 rounds, fewer in-process requests"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds per measured run (default 10; --quick 3)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds of the warm-up run before each measured run (default 1)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="measured runs per variant, taking turns (default 2; --quick 3)",
    )
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[v.name for v in VARIANTS],
        help="run only these variants (targets need all four)",
    )
    parser.add_argument(
        "--wsgi-number",
        type=int,
        default=None,
        help="requests per repeat of the in-process WSGI measurement, best of 5 repeats and 3 "
        "runs (default 1500; --quick 1000; 0 skips it)",
    )
    parser.add_argument(
        "--wsgi-only",
        action="store_true",
        help="only the in-process WSGI measurement (no Gunicorn, no wrk): the issue 16 "
        "goal (ours adds <= 5 us per request) and the in-process table",
    )
    parser.add_argument("--wsgi-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    wsgi_number = (
        args.wsgi_number if args.wsgi_number is not None else (1000 if args.quick else 1500)
    )
    if args.wsgi_child:
        wsgi_child(args.wsgi_child, wsgi_number)
        return 0
    if args.wsgi_only:
        return wsgi_only(args.only, wsgi_number or 1500)
    duration = args.duration or (3.0 if args.quick else 10.0)
    warmup = args.warmup or 1.0
    args.rounds = args.rounds or (3 if args.quick else 2)
    variants = [v for v in VARIANTS if not args.only or v.name in args.only]

    print(
        f"wrk -t{args.threads} -c{args.connections} -d{duration:g}s --latency {PATH}; "
        f"{args.rounds} round(s); warm-up {warmup:g} s; {library()}; {load_average()}",
        flush=True,
    )
    workdir = Path(tempfile.mkdtemp(prefix="victor-bench-http-"))
    try:
        for variant in variants:
            start(variant, workdir)
        for variant in variants:
            wait_ready(variant)
        for round_ in range(args.rounds):
            order = variants if round_ % 2 == 0 else variants[::-1]
            for variant in order:
                wrk(variant, warmup, args.threads, args.connections)
                result = wrk(variant, duration, args.threads, args.connections)
                variant.runs.append(result)
                print(
                    f"  round {round_ + 1} {variant.name:8s} {result.rps:8.0f} req/s  "
                    f"p50 {result.p50_ms:.2f} ms  p99 {result.p99_ms:.2f} ms  "
                    f"worker CPU {result.cpu_us:.0f} us/request"
                    + (f"  ({result.errors})" if result.errors else ""),
                    flush=True,
                )
        counts = {v.name: recorded(v) for v in variants}
        for variant in variants:
            stop(variant)
        print(load_average(), flush=True)
        wsgi = wsgi_costs(variants, wsgi_number, 3, workdir) if wsgi_number else {}
    finally:
        for variant in variants:
            stop(variant)
        shutil.rmtree(workdir, ignore_errors=True)
    return report(variants, counts, wsgi)


def wsgi_only(only: list[str] | None, number: int) -> int:
    """``--wsgi-only``: the in-process cost of each variant and the issue 16 goal."""
    variants = [v for v in VARIANTS if (not only or v.name in only)]
    print(f"in-process WSGI cost only; {number} requests x 5 repeats x 3 runs; {library()}; "
          f"{load_average()}", flush=True)  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="victor-bench-http-"))
    try:
        wsgi = wsgi_costs(variants, number, 3, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(load_average())
    print(wsgi_table(wsgi, {}))
    verdicts = Verdicts()
    overhead_goal(verdicts, wsgi)
    print(verdicts.report())
    return 1 if verdicts.failed else 0


INPROCESS_GOAL_US = 5.0


def overhead_goal(verdicts: Verdicts, wsgi: dict[str, float]) -> None:
    """Issue 16: the in-process WSGI cost ours adds per request (multiprocess mode)."""
    if "ours" in wsgi and "plain" in wsgi:
        added = wsgi["ours"] - wsgi["plain"]
        verdicts.check(
            f"[#16] Flask request instrumentation, in-process WSGI cost added per request "
            f"(multiprocess mode): <= {INPROCESS_GOAL_US:.0f} us",
            added <= INPROCESS_GOAL_US,
            f"+{added:.1f} us ({wsgi['ours']:.1f} vs {wsgi['plain']:.1f} us per request)",
        )


def wsgi_table(wsgi: dict[str, float], predicted: dict[str, float]) -> str:
    plain_us = wsgi.get("plain")
    return "\n".join([
        "In-process WSGI cost (no Gunicorn, no sockets): CPU us per GET /ping, best of "
        "3 runs x 5 repeats; overhead = this - plain; predicted = plain's worker CPU "
        "per request / (the same + overhead)",
        table(["variant", "us/request", "overhead us", "plain / this",
               "predicted req/s vs plain"], [
            [name, f"{us:.1f}", f"{us - plain_us:+.1f}" if plain_us else "-",
             ratio(plain_us / us) if plain_us else "-",
             ratio(predicted[name]) if name in predicted else "-"]
            for name, us in wsgi.items()
        ]),
        "",
    ])  # fmt: skip


def report(variants: list[Variant], counts: dict[str, float | None], wsgi: dict[str, float]) -> int:
    best = {v.name: max(v.runs, key=lambda r: r.rps) for v in variants}
    # CPU per request hardly depends on what else runs on the machine: the lowest of the
    # runs is the cost of the request itself.
    cpu = {v.name: min(r.cpu_us for r in v.runs) for v in variants}
    plain, pfe = best.get("plain"), best.get("pfe")
    rows = []
    for v in variants:
        r = best[v.name]
        count = counts[v.name]
        rows.append([
            v.name, f"{r.rps:,.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}",
            ratio(r.rps / plain.rps) if plain else "-",
            ratio(r.rps / pfe.rps) if pfe else "-",
            " / ".join(f"{x.rps:,.0f}" for x in v.runs),
            f"{cpu[v.name]:.0f}",
            ratio(cpu["plain"] / cpu[v.name]) if plain else "-",
            ratio(cpu["pfe"] / cpu[v.name]) if pfe else "-",
            "-" if count is None else f"{count:,.0f} / {v.sent:,}",
            r.errors or "none",
        ])  # fmt: skip
    print()
    print(
        "req/s, p50/p99 (ms): the run with the most req/s. Worker CPU: user+sys CPU of the "
        "Gunicorn workers per completed request, lowest run; 'vs' = throughput it allows "
        "relative to plain / pfe (their CPU / this CPU)"
    )
    print(table(["variant", "req/s", "p50 ms", "p99 ms", "req/s vs plain", "req/s vs pfe",
                 "all runs req/s", "worker CPU us/req", "CPU vs plain", "CPU vs pfe",
                 "recorded / completed", "errors"], rows))  # fmt: skip
    print()
    # Throughput a CPU-bound server would keep: plain's worker CPU per request over the same
    # plus the in-process overhead of the variant's instrumentation.
    predicted: dict[str, float] = {}
    if wsgi and "plain" in wsgi and "plain" in cpu:
        predicted = {
            name: cpu["plain"] / (cpu["plain"] + us - wsgi["plain"]) for name, us in wsgi.items()
        }
    if wsgi:
        print(wsgi_table(wsgi, predicted))
    verdicts = Verdicts()
    targets = [("ours", "plain", 0.90), ("ours", "pfe", 1.0), ("disabled", "plain", 0.98)]
    names = {"plain": "uninstrumented", "pfe": "prometheus_flask_exporter"}
    for variant, base, target in targets:
        if variant not in best or base not in best:
            continue
        got = best[variant].rps / best[base].rps
        verdicts.check(f"{variant} >= {target:.2f}x {names[base]} req/s", got >= target,
                       ratio(got))  # fmt: skip
    for variant, base, target in targets:
        if variant not in cpu or base not in cpu:
            continue
        got = cpu[base] / cpu[variant]
        verdicts.check(
            f"{variant} >= {target:.2f}x {names[base]}, by worker CPU per request",
            got >= target,
            f"{ratio(got)} ({cpu[variant]:.0f} vs {cpu[base]:.0f} us/request)",
        )
    for variant, base, target in targets:
        if variant not in predicted or base not in predicted:
            continue
        got = predicted[variant] / predicted[base]
        verdicts.check(
            f"{variant} >= {target:.2f}x {names[base]}, predicted from the in-process overhead",
            got >= target,
            ratio(got),
        )
    overhead_goal(verdicts, wsgi)
    errors = [v.name for v in variants if any(r.errors for r in v.runs)]
    verdicts.check("no socket errors or non-2xx responses", not errors,
                   ", ".join(errors) or "none")  # fmt: skip
    print(verdicts.report())
    return 1 if verdicts.failed else 0


if __name__ == "__main__":
    sys.exit(main())
