"""Compaction: exact totals, crash safety at every step, monotonic under concurrency."""

from __future__ import annotations

import itertools
import math
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from victor_mp_metrics import _mpdir
from victor_mp_metrics._mpdir import (
    FAULT_POINTS,
    compact,
    on_grid,
    read_manifest,
    recover,
    wipe_dead,
)

from ._dirs import data_files, live_owner, ours, stock, write_data_file

WRITER = textwrap.dedent(
    """
    import os, sys
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
    from victor_mp_metrics import _runtime
    _runtime.configure()
    import prometheus_client as pc
    n = int(sys.argv[2])
    c = pc.Counter("req", "requests", ["route"], registry=None)
    h = pc.Histogram("lat", "latency", buckets=(1, 5, 10), registry=None)
    g = pc.Gauge("peak", "peak", multiprocess_mode="max", registry=None)
    s = pc.Gauge("queued", "queued", multiprocess_mode="sum", registry=None)
    live = pc.Gauge("conn", "connections", multiprocess_mode="livesum", registry=None)
    for i in range(n):
        c.labels(str(i % 3)).inc()
        h.observe(i % 12)
    g.set(n)
    s.inc(n)
    live.set(1)
    """
)


def run_writers(directory: Path, counts: list[int]) -> None:
    """Run one real writer process per count; each exits (dies) when done."""
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(directory), str(n)])
        for n in counts
    ]
    for proc in procs:
        assert 0 == proc.wait(30)


def totals(values: dict) -> dict:
    """The samples compaction must preserve (live gauges of dead writers excluded)."""
    return {k: v for k, v in values.items() if not k[0].startswith("conn")}


def test_compaction_merges_dead_writers_into_one_archive(tmp_path: Path):
    """Dead writers' files become one archive generation; totals are unchanged."""
    run_writers(tmp_path, [5, 10, 20])
    before = totals(ours(tmp_path))
    assert 15 == len(data_files(tmp_path))
    result = compact(str(tmp_path))
    assert 3 == len(result.absorbed)
    assert [
        "counter_archive-1.db", "gauge_max_archive-1.db", "gauge_sum_archive-1.db",
        "histogram_archive-1.db",
    ] == data_files(tmp_path)
    assert before == totals(ours(tmp_path)) == totals(stock(tmp_path))
    assert 35.0 == sum(v for k, v in before.items() if k[0] == "req_total")
    assert 20.0 == before[("peak", ())]


def test_live_writers_are_never_compacted(tmp_path: Path):
    """Files whose owner lock is held stay in place."""
    run_writers(tmp_path, [3])
    ident = "1-0000abcd"
    fd = live_owner(tmp_path, ident)
    try:
        (tmp_path / f"counter_{ident}.db").write_bytes(
            (tmp_path / data_files(tmp_path)[0]).read_bytes()
        )
        result = compact(str(tmp_path))
        assert ident not in result.absorbed
        assert (tmp_path / f"counter_{ident}.db").exists()
        assert (tmp_path / f"{ident}.owner").exists()
    finally:
        os.close(fd)


def test_directory_stays_bounded_over_many_restarts(tmp_path: Path):
    """However many writers die, the directory holds one archive set plus live files."""
    for _ in range(6):
        run_writers(tmp_path, [2, 3, 4])
        compact(str(tmp_path))
    names = sorted(os.listdir(tmp_path))
    assert 4 == len(data_files(tmp_path))
    assert {"compact.lock", "manifest.json"} <= set(names)
    assert 6 == len(names)
    assert 6 * 9.0 == sum(v for k, v in ours(tmp_path).items() if k[0] == "req_total")


CRASHER = textwrap.dedent(
    """
    import os, sys
    from victor_mp_metrics._mpdir import compact
    point = sys.argv[2]
    def fault(name):
        if name == point:
            os._exit(17)
    compact(sys.argv[1], fault=fault)
    os._exit(0)
    """
)


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_crash_at_every_step_loses_and_doubles_nothing(tmp_path: Path, point: str):
    """Killed at any step, the directory reads the same totals, and recovery completes it."""
    seed = tmp_path / "seed"
    seed.mkdir()
    run_writers(seed, [4, 7])
    compact(str(seed))  # an archive generation exists already
    run_writers(seed, [5, 11])
    expected = totals(ours(seed))
    directory = tmp_path / "crash"
    shutil.copytree(seed, directory)

    proc = subprocess.run([sys.executable, "-c", CRASHER, str(directory), point], check=False)
    assert 17 == proc.returncode

    assert expected == totals(ours(directory)), "a reader during the crash state"
    compact(str(directory))
    assert expected == totals(ours(directory))
    assert expected == totals(stock(directory)), "stock reader at rest after recovery"
    manifest = read_manifest(str(directory))
    assert frozenset() == manifest.absorbed
    leftovers = [n for n in os.listdir(directory) if n.endswith((".tmp", ".owner"))]
    assert [] == leftovers
    assert all(f.startswith(tuple(("counter", "histogram", "gauge"))) and "archive" in f
               for f in data_files(directory))


def test_recover_removes_uncommitted_generation(tmp_path: Path):
    """Archive files newer than the manifest were never committed and are removed."""
    run_writers(tmp_path, [3])
    compact(str(tmp_path))
    stray = tmp_path / "counter_archive-9.db"
    shutil.copy(tmp_path / "counter_archive-1.db", stray)
    before = ours(tmp_path)
    assert recover(str(tmp_path))
    assert not stray.exists()
    assert before == ours(tmp_path)


def test_wipe_removes_earlier_run_but_not_live_writers(tmp_path: Path):
    """Start-up wipes dead files, but refuses while another live writer shares the dir."""
    run_writers(tmp_path, [3])
    ident = "1-0000beef"
    fd = live_owner(tmp_path, ident)
    try:
        assert -1 == wipe_dead(str(tmp_path))
        assert data_files(tmp_path)
    finally:
        os.close(fd)
    assert wipe_dead(str(tmp_path)) > 0
    assert [] == data_files(tmp_path)
    assert [] == [n for n in os.listdir(tmp_path) if n.endswith(".owner")]


READER = textwrap.dedent(
    """
    import sys, time
    from victor_mp_metrics._mpdir import DirectoryReader
    collector = DirectoryReader(sys.argv[1])
    stop = sys.argv[2]
    import os
    while not os.path.exists(stop):
        total = 0.0
        for family in collector.collect():
            for s in family.samples:
                if s.name in ("req_total", "lat_count"):
                    total += s.value
        print(total, flush=True)
        time.sleep(0.002)
    """
)


def test_concurrent_scrapes_never_see_totals_go_down(tmp_path: Path):
    """Scrapes in another process during repeated compactions see monotonic, exact totals."""
    directory = tmp_path / "d"
    directory.mkdir()
    stop = tmp_path / "stop"
    with subprocess.Popen(
        [sys.executable, "-c", READER, str(directory), str(stop)],
        stdout=subprocess.PIPE, text=True,
    ) as reader:
        try:
            sent = 0
            for round_ in range(12):
                counts = [3 + round_, 5]
                run_writers(directory, counts)
                sent += sum(counts)
                compact(str(directory))
        finally:
            stop.touch()
            out, _ = reader.communicate(timeout=30)
    seen = [float(line) for line in out.split()]
    assert len(seen) > 20
    assert all(a <= b for a, b in itertools.pairwise(seen)), "a total went down"
    final = sum(v for k, v in ours(directory).items() if k[0] in ("req_total", "lat_count"))
    assert 2.0 * sent == final
    assert seen[-1] <= final
    assert all(_mpdir.parse_name(n) is None or "archive" in n for n in os.listdir(directory))


def test_archive_caps_label_sets_per_metric_and_keeps_totals(tmp_path: Path):
    """Many dead writers with distinct label sets: the archive keeps at most max_series
    series per metric, folds the rest into __overflow__, and the total is unchanged."""
    from ._dirs import write_data_file

    for w in range(12):
        write_data_file(tmp_path, "counter", f"{2**22 + w}", [
            ("req", "req_total", {"user": f"u{w}-{i}"}, 1.0, 0.0) for i in range(3)
        ])
        write_data_file(tmp_path, "histogram", f"{2**22 + w}", [
            ("lat", "lat_bucket", {"user": f"u{w}", "le": "1.0"}, 2.0, 0.0),
            ("lat", "lat_bucket", {"user": f"u{w}", "le": "+Inf"}, 1.0, 0.0),
            ("lat", "lat_sum", {"user": f"u{w}"}, 0.5, 0.0),
        ])
    before = ours(tmp_path)
    result = compact(str(tmp_path), max_series=5)
    after = ours(tmp_path)
    req = {k: v for k, v in after.items() if k[0] == "req_total"}
    assert 6 == len(req)  # 5 kept + __overflow__
    assert 36.0 == sum(req.values()) == sum(v for k, v in before.items() if k[0] == "req_total")
    assert (12 * 3 - 5) + (12 - 5) * 3 == result.series_folded  # samples moved
    lat_count = {k: v for k, v in after.items() if k[0] == "lat_count"}
    assert 6 == len(lat_count) and 36.0 == sum(lat_count.values())
    assert 7.0 * 3 == after[("lat_count", (("user", "__overflow__"),))]
    # A second round of writers does not grow the archive either.
    run_writers(tmp_path, [2])
    compact(str(tmp_path), max_series=5)
    assert 6 == len([k for k in ours(tmp_path) if k[0] == "req_total"])


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.floats(min_value=0.0, max_value=1e6), min_size=2, max_size=8),
       dead=st.sets(st.integers(0, 7)))
def test_a_sum_on_the_grid_reads_the_same_bits_after_compaction(tmp_path_factory, values,
                                                                dead):
    """Writers' counter values on on_grid's binary grid (as the library writes CPU seconds
    and durations): compaction moving dead writers' values into the archive regroups the
    sum, and the total reads the same bits before and after (no 1-ulp decrease, which
    Prometheus would take for a counter reset)."""
    directory = tmp_path_factory.mktemp("grid")
    fds = {}
    for w, value in enumerate(values):
        ident = f"{50000 + w}-{w:08x}"
        fds[w] = live_owner(directory, ident)
        write_data_file(directory, "counter", ident,
                        [("cpu", "cpu_total", {}, on_grid(value), 1.0)])
    before = ours(directory)[("cpu_total", ())]
    for w in dead & set(fds):
        os.close(fds.pop(w))
    compact(str(directory))
    after = ours(directory)[("cpu_total", ())]
    assert struct.pack("<d", before) == struct.pack("<d", after)
    assert math.fsum(on_grid(v) for v in values) == after
    for fd in fds.values():
        os.close(fd)


def test_off_the_grid_a_regrouped_sum_can_read_lower() -> None:
    """Why the grid: float addition is not associative, so moving a term into the archive
    can lower a total by one ulp (values from a soak run's process CPU seconds)."""
    terms = [0.1, 0.2, 0.3]
    in_order = (terms[0] + terms[1]) + terms[2]  # 0.6000000000000001
    archived = terms[0] + (terms[1] + terms[2])  # 0.6
    assert archived < in_order
    grid = [on_grid(t) for t in terms]
    assert (grid[0] + grid[1]) + grid[2] == grid[0] + (grid[1] + grid[2])
