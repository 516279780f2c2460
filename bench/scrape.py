"""Scrape cost with the history of K dead workers: stock prometheus_client vs ours.

For each K it builds, on tmpfs, the directory a deployment has after K worker deaths
with 8 workers alive, every worker having written the reference app's catalog:

* ``stock``: what stock prometheus_client leaves - every dead worker's counter and
  histogram files (its ``live*`` gauge files removed, as ``mark_process_dead`` does);
* ``ours``: what our library leaves before compaction - the same files plus the dead
  workers' live-gauge files and owner files (half of them present but unlocked, half
  missing); the 8 live workers' owner files are locked by this process.

The files are produced by real writer subprocesses using the library (one per distinct
layout), then copied under new writer idents, each copy's values scaled a little.

Measured: stock ``MultiProcessCollector.collect()`` on ``stock``; our
``DirectoryReader.collect()`` on ``ours`` before and after ``_mpdir.compact()``,
cold (the first scrape of a new collector) and warm (the same collector again); the text
exposition (``generate_latest``) for stock and for ours after compaction. A scrape is the
full collect, samples materialised. Timed scrapes run in fresh subprocesses, in rounds
with the subprocesses in random order: one per (K, variant), except our scrapes of the
compacted directories, where one subprocess holds a collector per K and scrapes them in
turn (creation order rotated each round), so K=1000 and K=0 are compared in the same
process at the same moments. (In one long-lived process the heap left by the large stock
scrapes moved our warm times by up to 10% depending on which K's caches were allocated
where.) Cold = median of the rounds' first scrapes; warm and stock = median of the other
scrapes. Both readers' samples are checked to be equal.

    python bench/scrape.py            # K = 0, 100, 1000
    python bench/scrape.py --quick    # fewer rounds and scrapes
    python bench/scrape.py --profile  # pyinstrument profile of our warm scrape at max K
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
import gc
import json
import math
import random
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from _common import CLOCKS, ROOT, Verdicts, library, load_average, median, ms, ratio, size, table
from prometheus_client import CollectorRegistry, Metric, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from victor_mp_metrics import _mpdir
from victor_mp_metrics._mpdir import DirectoryReader

LIVE_WORKERS = 8
LAYOUTS = ("full", "short")
Entries = list[tuple[str, float, float]]


# --- the writer subprocess ---------------------------------------------------------------


def write_layout(layout: str) -> None:
    """In a subprocess with PROMETHEUS_MULTIPROC_DIR set: write one worker's catalog."""
    library()
    from victor_mp_metrics import _runtime
    from victor_mp_metrics.catalog import get_catalog
    from victor_mp_metrics.instrument import (
        record_cache_hit,
        record_cache_miss,
        record_request,
        set_cache_size,
        track_coordinator,
        track_llm_call,
        track_request_in_flight,
        track_tool,
    )

    _runtime.configure()
    full = layout == "full"
    endpoints = ["/chat", "/healthz", "/v1/sessions", "/v1/tools", "<unmatched>"]
    methods = ["GET", "POST"]
    if not full:
        endpoints, methods = ["/chat", "/healthz"], ["POST"]
    for n in range(200):
        for endpoint in endpoints:
            for method in methods:
                record_request(endpoint, method, 200, 3.0 + (n * 7) % 900)
    if full:
        record_request("/chat", "POST", 429, 12.0)
        record_request("/chat", "POST", 502, 40.0, "provider_error")
        record_request("/v1/tools", "POST", 500, 8.0)
        record_request("<unmatched>", "GET", 404, 1.0, "not_found")

    models = {
        "anthropic": ["claude-sonnet-4-5", "claude-haiku-4-5"],
        "openai": ["gpt-4o", "gpt-4o-mini"],
    }
    if not full:
        models = {"anthropic": ["claude-sonnet-4-5"]}
    for provider, names in models.items():
        for model in names:
            for n in range(20):
                with track_llm_call(provider, model) as call:
                    call.record_tokens(prompt=100 + n, completion=300 + n)
    if full:
        with track_llm_call("anthropic", "claude-sonnet-4-5") as call:
            call.fail("rate_limit")
        with track_llm_call("openai", "gpt-4o") as call:
            call.fail("timeout")

    tools = ["read_file", "word_count", "calculator"] if full else ["word_count"]
    for tool in tools:
        for _ in range(30):
            with track_tool(tool):
                pass
    if full:
        with track_tool("calculator") as run:
            run.fail("zero_division")

    caches = ["tool_selection", "llm_response"] if full else ["tool_selection"]
    for cache in caches:
        record_cache_hit(cache, 40)
        record_cache_miss(cache, 9)
        set_cache_size(cache, 18_432)

    with track_coordinator("ToolCoordinator"):
        pass
    if full:
        with track_coordinator("ToolCoordinator") as run:
            run.fail("tool_error")
    with track_request_in_flight():
        pass
    get_catalog().active_connections.inc()


def make_templates(workdir: Path) -> dict[str, dict[str, Entries]]:
    """Run one writer subprocess per layout; {layout: {file kind: entries}}."""
    procs = {}
    for layout in LAYOUTS:
        directory = workdir / f"layout-{layout}"
        directory.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("VICTOR_")}
        env["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
        procs[layout] = subprocess.Popen(
            [sys.executable, __file__, "--write-layout", layout], env=env, cwd=ROOT
        )
    templates: dict[str, dict[str, Entries]] = {}
    for layout, proc in procs.items():
        if proc.wait(60) != 0:
            raise SystemExit(f"writer subprocess for layout {layout!r} failed")
        directory = workdir / f"layout-{layout}"
        kinds: dict[str, Entries] = {}
        for name in sorted(os.listdir(directory)):
            info = _mpdir.parse_name(name)
            if info is None:
                continue
            data, _stat = _mpdir._fs.read_data(str(directory), name)
            kinds[info.kind] = [
                (raw.decode(), value, ts)
                for raw, value, ts, _pos in _mpdir._format.iter_entries(data, len(data))
            ]
        templates[layout] = kinds
    return templates


# --- building the directories ------------------------------------------------------------


def _write_worker(
    directory: Path, ident: str, kinds: dict[str, Entries], scale: float, later: float
) -> None:
    """One worker's files: counts scaled by ``scale``, gauge timestamps ``later`` s later
    (distinct timestamps keep ``mostrecent`` well defined)."""
    for kind, entries in kinds.items():
        if kind.startswith("gauge_"):
            rows = [(k, v, t + later if t else t) for k, v, t in entries]
        else:
            rows = [(k, v * scale, t) for k, v, t in entries]
        body, size = _mpdir._format.encode_file(rows)
        _mpdir.write_file(str(directory / f"{kind}_{ident}.db"), body, size)


def build(
    root: Path, dead: int, templates: dict[str, dict[str, Entries]]
) -> tuple[Path, Path, list[int]]:
    """The ``ours`` and ``stock`` directories for ``dead`` dead workers; live owner fds."""
    ours = root / f"ours-{dead}"
    stock = root / f"stock-{dead}"
    ours.mkdir()
    stock.mkdir()
    fds = []
    for i in range(LIVE_WORKERS):
        ident = f"{100_000 + i}-{secrets.token_hex(4)}"
        fds.append(_mpdir.create_owner_file(str(ours), ident))
        _write_worker(ours, ident, templates["full"], 1.0 + i / 10, i + 1.0)
    dead_idents = set()
    for j in range(dead):
        ident = f"{200_000 + j}-{secrets.token_hex(4)}"
        dead_idents.add(ident)
        layout = "short" if j % 4 == 3 else "full"
        _write_worker(ours, ident, templates[layout], 0.5 + (j % 17) / 10, -1.0 - j)
        if j % 2 == 0:  # owner file left behind, unlocked; else none at all
            os.close(_mpdir.create_owner_file(str(ours), ident))
    for name in os.listdir(ours):
        info = _mpdir.parse_name(name)
        if info is None or (info.is_live_gauge and info.ident in dead_idents):
            continue  # stock's child_exit hook calls mark_process_dead on live gauges
        os.link(ours / name, stock / name)
    return ours, stock, fds


def dir_stats(directory: Path) -> tuple[int, int, int]:
    """(data files, all files, bytes) of a directory."""
    data = total = nbytes = 0
    for entry in os.scandir(directory):
        if entry.is_file():
            total += 1
            nbytes += entry.stat().st_size
            data += entry.name.endswith(".db")
    return data, total, nbytes


# --- scrapes -------------------------------------------------------------------------------


def stock_scrape(directory: Path) -> Callable[[], object]:
    return lambda: list(MultiProcessCollector(None, str(directory)).collect())


def stock_text(directory: Path) -> Callable[[], object]:
    def run() -> bytes:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, str(directory))
        return generate_latest(registry)

    return run


def ours_text(collector: DirectoryReader) -> Callable[[], object]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)  # type: ignore[arg-type]
    return lambda: generate_latest(registry)


SampleKey = tuple[str, tuple[tuple[str, str], ...]]


def samples(families: Iterable[Metric]) -> dict[SampleKey, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def same(a: dict[SampleKey, float], b: dict[SampleKey, float]) -> bool:
    """Same sample names, labels and values (up to float summation order)."""
    return a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-9) for k in a)


def sample_count(families: Iterable[Metric]) -> int:
    return sum(len(f.samples) for f in families)


def profile(collector: DirectoryReader, reps: int) -> str:
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0001)
    profiler.start()
    for _ in range(reps):
        collector.collect()
    profiler.stop()
    return profiler.output_text(unicode=False, color=False, show_all=False)


# --- timing in fresh subprocesses -----------------------------------------------------------

KINDS = ("stock", "uncomp", "comp", "stock_text", "ours_text")
BLOCK = 5  # consecutive warm scrapes of one collector in a multi-directory subprocess


def child(kind: str, directories: list[str], calls: int, clock_name: str) -> None:
    """In a fresh subprocess: time one variant on each directory, ``calls`` times each,
    the directories taking turns; print the times (one list per directory) as JSON.

    Our collectors of all the directories share the process, so their K=0 vs K=1000
    comparison is paired: same process, nearly the same moments; the parent rotates the
    order in which they are created and scraped.
    """
    library()
    clock = CLOCKS[clock_name]
    fns: list[Callable[[], object]] = []
    for directory in directories:
        if kind == "stock":
            fns.append(stock_scrape(Path(directory)))
        elif kind == "stock_text":
            fns.append(stock_text(Path(directory)))
        else:
            collector = DirectoryReader(directory)
            fns.append(ours_text(collector) if kind == "ours_text" else collector.collect)

    def timed(fn: Callable[[], object]) -> float:
        gc.collect()
        started = clock()
        fn()
        return clock() - started

    times: list[list[float]] = [[timed(fn)] for fn in fns]  # the cold scrapes
    # Then blocks of consecutive scrapes per directory, the directories taking turns, so
    # each warm scrape follows a scrape of the same collector (as in the one-directory
    # subprocesses); the first scrape of a block refills the CPU caches and is not kept.
    remaining = calls - 1
    while remaining > 0:
        block = min(BLOCK, remaining)
        for fn, out in zip(fns, times, strict=True):
            timed(fn)
            out.extend(timed(fn) for _ in range(block))
        remaining -= block
    print(json.dumps(times))


def run_child(kind: str, directories: list[Path], calls: int, clock_name: str) -> list[list[float]]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(calls), clock_name,
         *map(str, directories)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"scrape subprocess {kind} {directories} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


class Case:
    """One K: its directories, compaction, and the timings of its variants.

    ``ours`` is compacted; ``uncompacted`` holds hard links to ours' files from before the
    compaction (owner files included: a link shares the lock of the inode), so both
    states can be scraped side by side.
    """

    def __init__(self, root: Path, dead: int, templates: dict[str, dict[str, Entries]],
                 clock: Callable[[], float]) -> None:  # fmt: skip
        self.dead = dead
        self.root = root / f"k{dead}"
        self.root.mkdir()
        started = time.perf_counter()
        self.ours, self.stock, self.fds = build(self.root, dead, templates)
        self.uncompacted = self.root / f"uncompacted-{dead}"
        self.uncompacted.mkdir()
        for name in os.listdir(self.ours):
            os.link(self.ours / name, self.uncompacted / name)
        self.built = time.perf_counter() - started
        self.stock_stats = dir_stats(self.stock)
        self.before_stats = dir_stats(self.uncompacted)

        started = clock()
        result = _mpdir.compact(str(self.ours))
        self.compact_time = clock() - started
        self.absorbed = len(result.absorbed)
        self.after_stats = dir_stats(self.ours)

        stock = list(MultiProcessCollector(None, str(self.stock)).collect())
        uncomp = DirectoryReader(str(self.uncompacted)).collect()
        comp = DirectoryReader(str(self.ours)).collect()
        self.samples = [sample_count(f) for f in (stock, uncomp, comp)]
        reference = samples(stock)
        self.same = [same(reference, samples(uncomp)), same(reference, samples(comp))]
        self.runs: dict[str, list[list[float]]] = {kind: [] for kind in KINDS}

    def directory(self, kind: str) -> Path:
        if kind.startswith("stock"):
            return self.stock
        return self.uncompacted if kind == "uncomp" else self.ours

    def cold(self, kind: str) -> float:
        return median([run[0] for run in self.runs[kind]])

    def warm(self, kind: str) -> float:
        return median([t for run in self.runs[kind] for t in run[1:]])

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        shutil.rmtree(self.root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds, fewer scrapes")
    parser.add_argument(
        "--dead",
        type=int,
        nargs="+",
        default=[0, 100, 1000],
        help="numbers of dead workers K (default: 0 100 1000)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="fresh subprocesses per (K, variant) (default 3; --quick 2)",
    )
    parser.add_argument(
        "--scrapes",
        type=int,
        default=None,
        help="warm scrapes per subprocess (default 15; --quick 8); stock and "
        "uncompacted at K >= 100 get a fifth of it, at least 2",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="cpu: the process's CPU time (default: robust when other "
        "processes share the cores); wall: elapsed time",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print a pyinstrument profile of our warm scrape at the largest K "
        "(printed anyway when a target fails)",
    )
    parser.add_argument(
        "--tmp",
        default="/dev/shm" if os.path.isdir("/dev/shm") else None,
        help="where to build the directories (default: /dev/shm)",
    )
    parser.add_argument("--write-layout", choices=LAYOUTS, help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()  # fmt: skip
    if args.write_layout:
        write_layout(args.write_layout)
        return 0
    if args.child:
        kind, calls, clock_name, *directories = args.child
        child(kind, directories, int(calls), clock_name)
        return 0

    clock = CLOCKS[args.clock]
    rounds = args.rounds or (2 if args.quick else 3)
    scrapes = args.scrapes or (8 if args.quick else 15)
    slow_scrapes = max(2, scrapes // 5)
    print(f"{library()}; clock: {args.clock}; {load_average()}")
    root = Path(tempfile.mkdtemp(prefix="victor-bench-scrape-", dir=args.tmp))
    cases: list[Case] = []
    try:
        started = time.perf_counter()
        templates = make_templates(root)
        entries = {layout: sum(map(len, kinds.values())) for layout, kinds in templates.items()}
        print(
            f"writer layouts (entries per worker): {entries}; written in "
            f"{time.perf_counter() - started:.1f} s by real writer subprocesses"
        )
        for dead in sorted(set(args.dead)):
            case = Case(root, dead, templates, clock)
            cases.append(case)
            print(f"K={dead}: built in {case.built:.1f} s; compaction absorbed "
                  f"{case.absorbed} writers in {ms(case.compact_time)} ms; files: "
                  f"{case.before_stats[1]} before compaction, {case.after_stats[1]} after",
                  flush=True)  # fmt: skip
        started = time.perf_counter()
        # One subprocess per (K, variant), except our compacted scrapes: one subprocess for
        # all K, so the targets comparing K=1000 with K=0 compare like with like.
        jobs: list[tuple[list[Case], str]] = [
            ([case], kind) for case in cases for kind in ("stock", "uncomp", "stock_text")
        ]
        jobs += [(cases, "comp"), (cases, "ours_text")]
        rng = random.Random(0)
        for round_ in range(rounds):
            rng.shuffle(jobs)
            for group, kind in jobs:
                slow = group[0].dead >= 100 and kind in ("stock", "stock_text", "uncomp")
                calls = 1 + (slow_scrapes if slow else scrapes)
                turn = round_ % len(group)
                order = group[turn:] + group[:turn]  # who is created and scraped first
                times = run_child(kind, [c.directory(kind) for c in order], calls, args.clock)
                for case, runs in zip(order, times, strict=True):
                    case.runs[kind].append(runs)
        print(
            f"measured {rounds} rounds of {len(jobs)} subprocesses in "
            f"{time.perf_counter() - started:.0f} s; {load_average()}"
        )
        report, failed = results(cases, args.clock)
        print(report)
        last = cases[-1]
        if failed or args.profile:
            print(
                f"\npyinstrument: 200 warm DirectoryReader.collect() at K={last.dead}, "
                "after compaction (wall clock)"
            )
            collector = DirectoryReader(str(last.ours))
            collector.collect()
            print(profile(collector, 200))
        return 1 if failed else 0
    finally:
        for case in cases:
            case.close()
        shutil.rmtree(root, ignore_errors=True)


def results(cases: list[Case], clock: str) -> tuple[str, bool]:
    """The tables and verdicts; whether a target failed."""
    rows, text_rows = [], []
    by_k = {c.dead: {kind: c.warm(kind) for kind in KINDS} for c in cases}
    for c in cases:
        t = by_k[c.dead]
        rows.append(
            [
                c.dead,
                f"{c.stock_stats[0]} / {size(c.stock_stats[2])}",
                f"{c.before_stats[0]} / {size(c.before_stats[2])}",
                f"{c.after_stats[0]} / {size(c.after_stats[2])}",
                ms(t["stock"]),
                ms(c.cold("uncomp")),
                ms(t["uncomp"]),
                ms(c.compact_time),
                ms(c.cold("comp")),
                ms(t["comp"]),
                ratio(t["stock"] / t["comp"]),
            ]
        )
        text_rows.append(
            [
                c.dead,
                *c.samples,
                " / ".join("yes" if ok else "NO" for ok in c.same),
                ms(t["stock_text"]),
                ms(t["ours_text"]),
                ratio(t["stock_text"] / t["ours_text"]),
            ]
        )
    out = [
        "",
        f"Scrape = full collect(), samples materialised; {clock} time in ms, medians; cold = "
        "first scrape of a new collector, warm = the same collector again (stock has no "
        "cache: every scrape is cold)",
        table(
            [
                "K dead",
                "stock .db / size",
                "ours .db / size",
                "compacted .db / size",
                "stock",
                "ours uncomp cold",
                "ours uncomp warm",
                "compact()",
                "ours comp cold",
                "ours comp warm",
                "stock / ours comp warm",
            ],
            rows,
        ),
        "",
        f"Text exposition (generate_latest), {clock} time in ms, median; ours after "
        "compaction, warm",
        table(
            [
                "K dead",
                "samples stock",
                "samples ours uncomp",
                "samples ours comp",
                "equal to stock: uncomp / comp",
                "stock",
                "ours",
                "stock / ours",
            ],
            text_rows,
        ),
        "",
    ]
    verdicts = Verdicts()
    big = max(by_k)
    if big >= 1000:
        t = by_k[big]
        verdicts.check(
            f"K={big}: ours >= 50x faster than stock",
            t["stock"] / t["comp"] >= 50,
            f"{ratio(t['stock'] / t['comp'])} ({ms(t['stock'])} ms vs {ms(t['comp'])} ms)",
        )
    if 0 in by_k:
        zero = by_k[0]
        if big > 0:
            t = by_k[big]
            verdicts.check(
                f"K={big}: ours within 1.2x of ours at K=0",
                t["comp"] / zero["comp"] <= 1.2,
                f"{ratio(t['comp'] / zero['comp'])} ({ms(t['comp'])} ms vs {ms(zero['comp'])} ms)",
            )
        verdicts.check(
            "K=0: ours >= 1.5x faster than stock",
            zero["stock"] / zero["comp"] >= 1.5,
            f"{ratio(zero['stock'] / zero['comp'])} ({ms(zero['stock'])} ms vs "
            f"{ms(zero['comp'])} ms)",
        )
    out.append(verdicts.report())
    return "\n".join(out), bool(verdicts.failed)


if __name__ == "__main__":
    sys.exit(main())
