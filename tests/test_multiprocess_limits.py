"""Issue 14: what stock multiprocess mode cannot do, across real processes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import prometheus_client as pc
import pytest

from victor_mp_metrics import _mpdir, _runtime

from ._dirs import samples


def _read(directory: Path, created: bool = False) -> dict:
    families, _report = _mpdir.DirectoryReader(str(directory)).read(created=created)
    return samples(families)


def _in_child(action) -> None:
    """Run ``action`` in a forked child that stays alive until the test reads, then exits."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            action()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def test_info_and_enum_appear_once_with_the_most_recent_value(metrics_dir: Path):
    """Info and Enum set in several processes: one series each, the latest value wins."""
    build = pc.Info("build", "Build", registry=None)
    phase = pc.Enum("phase", "Phase", states=["a", "b", "c"], registry=None)
    build.info({"version": "1"})
    phase.state("a")
    time.sleep(0.01)
    _in_child(lambda: (build.info({"version": "2"}), phase.state("c")))
    got = _read(metrics_dir)
    infos = {k: v for k, v in got.items() if k[0] == "build_info"}
    assert {("build_info", (("version", "2"),)): 1.0} == infos
    states = {dict(k[1])["phase"]: v for k, v in got.items() if k[0] == "phase"}
    assert {"a": 0.0, "b": 0.0, "c": 1.0} == states
    _mpdir.compact(str(metrics_dir), exclude=_runtime.own_idents())  # the child is archived
    assert infos == {k: v for k, v in _read(metrics_dir).items() if k[0] == "build_info"}


def test_set_function_is_sampled_in_every_live_process(metrics_dir: Path):
    """Gauge.set_function in livesum mode: each live process's function is summed."""
    gauge = pc.Gauge("five", "Five", multiprocess_mode="livesum", registry=None)
    gauge.set_function(lambda: 5)
    assert 5.0 == _read(metrics_dir)[("five", ())]
    store = _runtime.RUNTIME.store
    assert store is not None and store.samplers


def test_remove_and_clear_reach_every_process_and_the_archive(metrics_dir: Path):
    """A label set removed in one process vanishes from the deployment, values of other
    and dead processes included; used again, it starts from 0."""
    counter = pc.Counter("jobs", "Jobs", ["queue"], registry=None)
    _in_child(lambda: counter.labels("a").inc(7))  # a dead writer's value
    counter.labels("a").inc(3)
    counter.labels("b").inc(1)
    assert 10.0 == _read(metrics_dir)[("jobs_total", (("queue", "a"),))]
    counter.remove("a")
    got = _read(metrics_dir)
    assert ("jobs_total", (("queue", "a"),)) not in got
    assert 1.0 == got[("jobs_total", (("queue", "b"),))]
    _mpdir.compact(str(metrics_dir), exclude=_runtime.own_idents())
    assert ("jobs_total", (("queue", "a"),)) not in _read(metrics_dir)
    time.sleep(0.01)
    counter.labels("a").inc(2)
    assert 2.0 == _read(metrics_dir)[("jobs_total", (("queue", "a"),))]
    counter.clear()
    assert not [k for k in _read(metrics_dir) if k[0] == "jobs_total"]


def test_a_removal_in_another_live_process_resets_ours(metrics_dir: Path):
    """A worker that removes a label set also removes the values other live workers hold;
    their later increments count from zero."""
    counter = pc.Counter("hits", "Hits", ["route"], registry=None)
    counter.labels("/x").inc(4)
    store = _runtime.RUNTIME.store
    assert store is not None
    _mpdir.add_tombstone(str(metrics_dir), "hits", {"route": "/x"})  # another worker's remove
    assert ("hits_total", (("route", "/x"),)) not in _read(metrics_dir)
    store.apply_tombstones()  # what our watchdog does within a second
    assert ("hits_total", (("route", "/x"),)) not in _read(metrics_dir)
    counter.labels("/x").inc(1)
    store.apply_tombstones()  # the next round writes it back, counted from zero
    assert 1.0 == _read(metrics_dir)[("hits_total", (("route", "/x"),))]


def test_created_is_the_earliest_creation_in_openmetrics(metrics_dir: Path):
    """_created of a counter and a histogram is the earliest creation over processes."""
    before = time.time()
    counter = pc.Counter("c", "C", registry=None)
    histogram = pc.Histogram("h", "H", registry=None)
    counter.inc()
    histogram.observe(1)
    _in_child(lambda: (counter.inc(), histogram.observe(2)))
    got = _read(metrics_dir, created=True)
    assert before <= got[("c_created", ())] <= time.time()
    assert before <= got[("h_created", ())] <= time.time()
    assert ("c_created", ()) not in _read(metrics_dir)  # text format: no _created


def test_pid_label_is_allowed_on_gauges(metrics_dir: Path):
    """A user's own pid label works on a livesum gauge and is kept as given."""
    from victor_mp_metrics import get_prometheus_registry

    gauge = get_prometheus_registry().gauge("worker_jobs", "Jobs per pid", label_names=["pid"])
    gauge.labels("42").set(3)
    assert 3.0 == _read(metrics_dir)[("worker_jobs", (("pid", "42"),))]


def test_process_metrics_cover_the_deployment(metrics_dir: Path):
    """process_cpu_seconds_total keeps dead processes' CPU; RSS sums live ones; python_info."""
    pc.Counter("x", "X", registry=None).inc()
    store = _runtime.RUNTIME.store
    assert store is not None

    def sample_twice() -> None:
        for sample in list(store.samplers):
            sample()
            sample()

    sample_twice()
    _in_child(lambda: (sum(range(3_000_000)), sample_twice()))
    got = _read(metrics_dir)
    assert got[("process_cpu_seconds_total", ())] > 0.05
    assert got[("process_resident_memory_bytes", ())] > 1 << 20
    assert 1.0 == sum(v for k, v in got.items() if k[0] == "python_info")
    assert got[("process_start_time_seconds", ())] <= time.time()


@pytest.mark.gunicorn
def test_stock_limits_lifted_under_gunicorn(tmp_path: Path):
    """3 workers: module-level Info, Enum and set_function(lambda: 5) in livesum (reads 15);
    a labelled gauge removed by a request is gone; process and python metrics present."""
    from ._gunicorn import gunicorn, parse_samples, request, total

    with gunicorn(tmp_path, workers=3, app="tests.apps.limits_app:app",
                  ready_path="/metrics") as server:
        for _ in range(12):
            assert 200 == server.get("/queue/q1/4").status
        deadline = time.monotonic() + 10
        while True:
            text = server.get("/metrics").text
            got = parse_samples(text)
            ready = total(got, "five") == 15 and total(got, "process_cpu_seconds_total") > 0
            if ready or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert 15 == total(got, "five")
        assert 1 == got['build_info{commit="abc123",version="1.2.3"}']
        assert 1 == got['phase{phase="serving"}'] and 0 == got['phase{phase="draining"}']
        assert total(got, "queue_depth", queue="q1") > 0
        assert 200 == request(server.url + "/queue/q1", "DELETE").status
        after = parse_samples(server.get("/metrics").text)
        assert not [k for k in after if k.startswith("queue_depth{")]
        for name in ("process_cpu_seconds_total", "process_resident_memory_bytes"):
            assert total(after, name) > 0, name
        assert 1 == total(after, "python_info")
