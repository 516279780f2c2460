"""Write-path cost per operation: our API vs the same operation on stock prometheus_client.

Each implementation runs in its own subprocess, in multiprocess mode, against its own
fresh directory on tmpfs:

* ``stock``: PROMETHEUS_MULTIPROC_DIR set before prometheus_client is imported; plain
  ``Counter``/``Gauge``/``Histogram`` objects created once, as an app would;
* ``ours``: ``victor_mp_metrics._runtime.configure()``, then the catalog, the custom
  registry, ``MetricsCollector`` and the ``instrument`` helpers;
* ``disabled`` (for information): ours with ``VICTOR_METRICS_ENABLED=false``;
* ``stock1p`` (issue 16): stock prometheus_client in a single process, no
  PROMETHEUS_MULTIPROC_DIR, no files at all: ours must stay within 1.2x of it on
  ``Counter.inc()``, ``Counter.labels(a, b).inc()`` and ``Histogram.observe(v)``.

Every row is one operation in both columns: the stock column does what an app using
stock prometheus_client must do to record the same samples with the same values
(including the timing calls and, for the coordinator, reading the process's RSS with
psutil). ``timeit``, best of 5 repeats; the subprocesses run in turn, ``--rounds`` times,
and the best of all rounds is kept.

    python bench/write_path.py             # 100k iterations per simple op (compound: 10k)
    python bench/write_path.py --quick     # 20k / 2k
    python bench/write_path.py --profile   # pyinstrument profile of the rows that fail
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
import json
import shutil
import subprocess
import tempfile
import time
import timeit
from collections.abc import Callable

from _common import CLOCKS, ROOT, Verdicts, library, load_average, ratio, table

TARGET = 1.1
IMPLS = ("stock", "ours", "disabled", "stock1p")
# Issue 16: ours (multiprocess, files) vs stock prometheus_client in a single process (no
# PROMETHEUS_MULTIPROC_DIR, no files at all), on these rows.
SINGLE_TARGET = 1.2
SINGLE_ROWS = ("Counter.inc()", "Counter.labels(a, b).inc()", "Histogram.observe(v)")

# (name, compound): compound rows run number // 10 iterations.
ROWS: tuple[tuple[str, bool], ...] = (
    ("Counter.inc()", False),
    ("Counter.labels(a, b).inc()", False),
    ("Histogram.observe(v)", False),
    ("Histogram.labels(a, b).observe(v)", False),
    ("Gauge.set(v) (livesum)", False),
    ("Gauge.inc(); Gauge.dec() (livesum)", False),
    ("record_cache_hit(name)", False),
    ("record_request(endpoint, method, 200, ms)", False),
    ("registry counter, held: .inc()", False),
    ("registry.counter(...) each call: .inc()", False),
    ("registry counter with label_names: .labels(x).inc()", False),
    ("collector.tool_calls.increment()", False),
    ("MetricsCollector().tool_calls.increment()", False),
    ("collector.model_requests.increment(labels={provider})", False),
    ("collector.model_latency.observe(v)", False),
    ("with track_tool(name): pass", False),
    ("with track_llm_call(p, m): record_tokens(...)", False),
    ("with track_coordinator(name): pass (incl. psutil RSS)", True),
    ("/chat request: all its metric work", True),
)

MS_BUCKETS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
LLM_MS_BUCKETS = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 20000, 30000, 60000, 120000,
                  300000)  # fmt: skip
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


# --- stock prometheus_client ---------------------------------------------------------------


def stock_ops() -> dict[str, Callable[[], object]]:
    """The rows done with stock prometheus_client (PROMETHEUS_MULTIPROC_DIR already set)."""
    import psutil
    from prometheus_client import Counter, Gauge, Histogram

    perf, thread_time = time.perf_counter, time.thread_time
    process = psutil.Process()

    plain = Counter("bench_plain_total", "h")
    requests = Counter("victor_requests_total", "h", ["endpoint", "method"])
    latency = Histogram("bench_latency_ms", "h", buckets=MS_BUCKETS)
    req_ms = Histogram(
        "victor_request_duration_ms", "h", ["endpoint", "method"], buckets=MS_BUCKETS
    )
    queue = Gauge("bench_queue", "h", multiprocess_mode="livesum")
    active = Gauge("victor_active_connections", "h", multiprocess_mode="livesum")
    hits = Counter("victor_cache_hits_total", "h", ["cache_name"])
    custom = Counter("custom_operations_total", "h", ["service"])
    custom_child = custom.labels("my_service")
    per_call = Counter("custom_calls_total", "h", ["service", "operation"])
    tools = Counter("victor_tool_executions_total", "h", ["tool_name", "status"])
    tool_ms = Histogram("victor_tool_duration_ms", "h", ["tool_name"], buckets=MS_BUCKETS)
    llm = Counter("victor_llm_requests_total", "h", ["provider", "model"])
    llm_ms = Histogram("victor_llm_duration_ms", "h", ["provider", "model"], buckets=LLM_MS_BUCKETS)
    tokens = Counter("victor_llm_tokens_total", "h", ["provider", "model", "type"])
    coord = Counter("victor_coordinator_executions_total", "h", ["coordinator_name"])
    coord_s = Histogram(
        "victor_coordinator_duration_seconds", "h", ["coordinator_name"], buckets=SECONDS_BUCKETS
    )
    coord_mem = Gauge(
        "victor_coordinator_memory_bytes", "h", ["coordinator_name"], multiprocess_mode="livemax"
    )
    coord_cpu = Gauge(
        "victor_coordinator_cpu_percent",
        "h",
        ["coordinator_name"],
        multiprocess_mode="livemostrecent",
    )

    def gauge_pair() -> None:
        queue.inc()
        queue.dec()

    def record_request() -> None:
        requests.labels("/chat", "POST").inc()
        req_ms.labels("/chat", "POST").observe(12.5)

    def tool(name: str = "word_count") -> None:
        started = perf()
        elapsed = perf() - started
        tools.labels(name, "success").inc()
        tool_ms.labels(name).observe(elapsed * 1000.0)

    def llm_call() -> None:
        started = perf()
        tokens.labels("anthropic", "claude-sonnet-4-5", "prompt").inc(12)
        tokens.labels("anthropic", "claude-sonnet-4-5", "completion").inc(30)
        elapsed = perf() - started
        llm.labels("anthropic", "claude-sonnet-4-5").inc()
        llm_ms.labels("anthropic", "claude-sonnet-4-5").observe(elapsed * 1000.0)

    def coordinator(body: Callable[[], None] | None = None) -> None:
        cpu_start = thread_time()
        started = perf()
        if body is not None:
            body()
        elapsed = perf() - started
        cpu = thread_time() - cpu_start
        coord.labels("ToolCoordinator").inc()
        coord_s.labels("ToolCoordinator").observe(elapsed)
        coord_mem.labels("ToolCoordinator").set(float(process.memory_info().rss))
        if elapsed > 0:
            coord_cpu.labels("ToolCoordinator").set(min(100.0, cpu / elapsed * 100.0))

    def coordinator_body() -> None:
        hits.labels("tool_selection").inc(1)
        tool("read_file")
        tool("word_count")

    def chat() -> None:
        started = perf()
        active.inc()
        coordinator(coordinator_body)
        llm_call()
        active.dec()
        elapsed_ms = (perf() - started) * 1000.0
        requests.labels("/chat", "POST").inc()
        req_ms.labels("/chat", "POST").observe(elapsed_ms)

    return {
        "Counter.inc()": plain.inc,
        "Counter.labels(a, b).inc()": lambda: requests.labels("/chat", "POST").inc(),
        "Histogram.observe(v)": lambda: latency.observe(42.0),
        "Histogram.labels(a, b).observe(v)": lambda: req_ms.labels("/chat", "POST").observe(42.0),
        "Gauge.set(v) (livesum)": lambda: queue.set(10),
        "Gauge.inc(); Gauge.dec() (livesum)": gauge_pair,
        "record_cache_hit(name)": lambda: hits.labels("tool_selection").inc(1),
        "record_request(endpoint, method, 200, ms)": record_request,
        "registry counter, held: .inc()": custom_child.inc,
        "registry.counter(...) each call: .inc()": lambda: custom.labels("my_service").inc(),
        "registry counter with label_names: .labels(x).inc()": lambda: per_call.labels(
            "my_service", "search"
        ).inc(),
        "collector.tool_calls.increment()": lambda: tools.labels("unknown", "success").inc(1),
        "MetricsCollector().tool_calls.increment()": lambda: tools.labels("unknown", "success").inc(
            1
        ),
        "collector.model_requests.increment(labels={provider})": lambda: llm.labels(
            "anthropic", "unknown"
        ).inc(1),
        "collector.model_latency.observe(v)": lambda: llm_ms.labels("unknown", "unknown").observe(
            45.2
        ),
        "with track_tool(name): pass": tool,
        "with track_llm_call(p, m): record_tokens(...)": llm_call,
        "with track_coordinator(name): pass (incl. psutil RSS)": coordinator,
        "/chat request: all its metric work": chat,
    }


# --- ours ----------------------------------------------------------------------------------


def ours_ops() -> dict[str, Callable[[], object]]:
    """The rows done through our API (PROMETHEUS_MULTIPROC_DIR set; maybe disabled)."""
    from victor_mp_metrics import _runtime
    from victor_mp_metrics.catalog import MS_BUCKETS as CATALOG_MS_BUCKETS
    from victor_mp_metrics.catalog import get_catalog
    from victor_mp_metrics.collector import MetricsCollector
    from victor_mp_metrics.instrument import (
        RequestTracker,
        record_cache_hit,
        record_request,
        track_coordinator,
        track_llm_call,
        track_tool,
    )
    from victor_mp_metrics.registry import get_prometheus_registry

    assert CATALOG_MS_BUCKETS == MS_BUCKETS, "keep the stock side's buckets equal to ours"
    _runtime.configure()
    catalog = get_catalog()
    registry = get_prometheus_registry()
    plain = registry.counter("bench_plain_total", "h")
    latency = registry.histogram("bench_latency_ms", "h", buckets=MS_BUCKETS)
    queue = registry.gauge("bench_queue", "h", multiprocess_mode="livesum")
    custom = registry.counter(
        name="custom_operations_total", help="h", labels={"service": "my_service"}
    )
    per_call = registry.counter(
        "custom_calls_total", "h", labels={"service": "my_service"}, label_names=("operation",)
    )
    collector = MetricsCollector()
    requests = catalog.requests_total
    req_ms = catalog.request_duration_ms

    def gauge_pair() -> None:
        queue.inc()
        queue.dec()

    def custom_each_call() -> None:
        get_prometheus_registry().counter(
            name="custom_operations_total", help="h", labels={"service": "my_service"}
        ).inc()

    def tool() -> None:
        with track_tool("word_count"):
            pass

    def llm_call() -> None:
        with track_llm_call("anthropic", "claude-sonnet-4-5") as call:
            call.record_tokens(prompt=12, completion=30)

    def coordinator() -> None:
        with track_coordinator("ToolCoordinator"):
            pass

    def chat() -> None:
        # What the reference app does for POST /chat with two tools and a cached selection:
        # the request tracker (Flask, WSGI, ASGI) around app/coordinator.py and app/llm.py.
        request = RequestTracker("POST")  # in flight from here
        with track_coordinator("ToolCoordinator"):
            record_cache_hit("tool_selection")
            with track_tool("read_file"):
                pass
            with track_tool("word_count"):
                pass
        with track_llm_call("anthropic", "claude-sonnet-4-5") as call:
            call.record_tokens(prompt=12, completion=30)
        request.answered("/chat", 200)  # the app hands its status to the server: counted
        request.end()  # the response is closed: in-flight gauge down, latency observed

    return {
        "Counter.inc()": plain.inc,
        "Counter.labels(a, b).inc()": lambda: requests.labels("/chat", "POST").inc(),
        "Histogram.observe(v)": lambda: latency.observe(42.0),
        "Histogram.labels(a, b).observe(v)": lambda: req_ms.labels("/chat", "POST").observe(42.0),
        "Gauge.set(v) (livesum)": lambda: queue.set(10),
        "Gauge.inc(); Gauge.dec() (livesum)": gauge_pair,
        "record_cache_hit(name)": lambda: record_cache_hit("tool_selection"),
        "record_request(endpoint, method, 200, ms)": lambda: record_request(
            "/chat", "POST", 200, 12.5
        ),
        "registry counter, held: .inc()": custom.inc,
        "registry.counter(...) each call: .inc()": custom_each_call,
        "registry counter with label_names: .labels(x).inc()": lambda: per_call.labels(
            "search"
        ).inc(),
        "collector.tool_calls.increment()": collector.tool_calls.increment,
        "MetricsCollector().tool_calls.increment()": lambda: (
            MetricsCollector().tool_calls.increment()
        ),
        "collector.model_requests.increment(labels={provider})": lambda: (
            collector.model_requests.increment(labels={"provider": "anthropic"})
        ),
        "collector.model_latency.observe(v)": lambda: collector.model_latency.observe(45.2),
        "with track_tool(name): pass": tool,
        "with track_llm_call(p, m): record_tokens(...)": llm_call,
        "with track_coordinator(name): pass (incl. psutil RSS)": coordinator,
        "/chat request: all its metric work": chat,
    }


def check_ours_wrote(directory: str) -> None:
    """Fail loudly if our values did not go to files (the comparison would be unfair)."""
    from victor_mp_metrics import _runtime

    store = _runtime.RUNTIME.store
    if store is None or store.failing or not store.files:
        raise SystemExit(f"victor_mp_metrics is not writing files in {directory}")


# --- running -------------------------------------------------------------------------------


def measure(impl: str, number: int, clock: str, only: list[str] | None) -> dict[str, float]:
    """In the subprocess: ns per operation of every row (best of 5)."""
    if not impl.startswith("stock"):
        library()
    if impl == "stock1p" and "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        raise SystemExit("stock1p must run without PROMETHEUS_MULTIPROC_DIR")
    ops = stock_ops() if impl.startswith("stock") else ours_ops()
    if impl == "ours":
        check_ours_wrote(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    timer = CLOCKS[clock]
    out = {}
    for name, compound in ROWS:
        if only and name not in only:
            continue
        fn = ops[name]
        n = max(1, number // 10) if compound else number
        fn()  # create label children and file slots before timing
        best = min(timeit.Timer(fn, timer=timer).repeat(repeat=5, number=n))
        out[name] = best / n * 1e9
    return out


def run_impl(impl: str, number: int, clock: str, tmp: str | None) -> dict[str, float]:
    directory = tempfile.mkdtemp(prefix=f"victor-bench-write-{impl}-", dir=tmp)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VICTOR_")}
    env["PROMETHEUS_MULTIPROC_DIR"] = directory
    if impl == "disabled":
        env["VICTOR_METRICS_ENABLED"] = "false"
    if impl == "stock1p":
        del env["PROMETHEUS_MULTIPROC_DIR"]
        env.pop("prometheus_multiproc_dir", None)
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--impl", impl, "--number", str(number),
             "--clock", clock],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"{impl} subprocess failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def profile_rows(names: list[str], number: int) -> None:
    """Profile our side of ``names`` in a subprocess, one pyinstrument report per row."""
    directory = tempfile.mkdtemp(prefix="victor-bench-write-profile-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VICTOR_")}
    env["PROMETHEUS_MULTIPROC_DIR"] = directory
    try:
        subprocess.run(
            [sys.executable, __file__, "--profile-child", json.dumps(names),
             "--number", str(number)],
            env=env, cwd=ROOT, timeout=600, check=False,
        )  # fmt: skip
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def profile_child(names: list[str], number: int) -> None:
    from pyinstrument import Profiler

    ops = ours_ops()
    for name in names:
        fn = ops[name]
        fn()
        profiler = Profiler(interval=0.0001)
        profiler.start()
        for _ in range(number):
            fn()
        profiler.stop()
        print(f"\n=== pyinstrument, ours: {name} x {number}")
        print(profiler.output_text(unicode=False, color=False, show_all=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20k iterations (compound: 2k)")
    parser.add_argument(
        "--number",
        type=int,
        default=None,
        help="iterations per repeat of a simple op (default 100000; compound rows a tenth)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the subprocesses this many times in turn; keep the best",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="cpu: process CPU time (default: robust when other processes "
        "share the cores); wall: elapsed time",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile our side of every row that misses the target",
    )
    parser.add_argument("--tmp", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    parser.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--profile-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    number = args.number or (20_000 if args.quick else 100_000)
    if args.impl:
        print(json.dumps(measure(args.impl, number, args.clock, None)))
        return 0
    if args.profile_child:
        profile_child(json.loads(args.profile_child), max(1, number // 10))
        return 0

    print(
        f"clock: {args.clock}; {number} iterations per repeat (compound rows {number // 10}), "
        f"best of 5; {library()}; {load_average()}",
        flush=True,
    )
    started = time.perf_counter()
    best: dict[str, dict[str, float]] = {impl: {} for impl in IMPLS}
    for _ in range(args.rounds):
        for impl in IMPLS:
            for name, ns in run_impl(impl, number, args.clock, args.tmp).items():
                best[impl][name] = min(ns, best[impl].get(name, ns))
    print(f"measured in {time.perf_counter() - started:.0f} s; {load_average()}\n")

    verdicts = Verdicts()
    rows = []
    for name, _compound in ROWS:
        stock, ours, off = best["stock"][name], best["ours"][name], best["disabled"][name]
        single = best["stock1p"][name]
        r = ours / stock
        ok = r <= TARGET
        verdicts.check(name, ok, f"ours/stock {r:.2f} (target <= {TARGET})")
        rows.append(
            [
                name,
                f"{stock:,.0f}",
                f"{ours:,.0f}",
                ratio(r),
                "PASS" if ok else "FAIL",
                f"{off:,.0f}",
                f"{single:,.0f}",
                ratio(ours / single),
                ("PASS" if ours / single <= SINGLE_TARGET else "FAIL")
                if name in SINGLE_ROWS else "-",
            ]
        )
    print(f"ns per operation ({args.clock} time), best of 5; stock = multiprocess mode, "
          "stock 1p = single process (no files)")  # fmt: skip
    print(table(["operation", "stock ns", "ours ns", "ours/stock", "<= 1.1", "disabled ns",
                 "stock 1p ns", "ours/1p", "<= 1.2 (#16)"], rows))  # fmt: skip
    print()
    failed = list(verdicts.failed)
    print(
        f"{len(ROWS) - len(failed)} of {len(ROWS)} rows within {TARGET}x of stock"
        + (f"; FAIL: {', '.join(failed)}" if failed else "")
    )
    goals = Verdicts()  # issue 16: against stock in a single process
    single_failed = []
    for name in SINGLE_ROWS:
        r = best["ours"][name] / best["stock1p"][name]
        if not goals.check(
            f"[#16] write cost {name} vs stock single-process: <= {SINGLE_TARGET}x",
            r <= SINGLE_TARGET,
            f"{ratio(r)} ({best['ours'][name]:,.0f} ns vs {best['stock1p'][name]:,.0f} ns)",
        ):
            single_failed.append(name)
    print(goals.report())
    if (failed or single_failed) and args.profile:
        profile_rows(sorted(set(failed) | set(single_failed)), number)
    return 1 if failed or single_failed else 0


if __name__ == "__main__":
    sys.exit(main())
