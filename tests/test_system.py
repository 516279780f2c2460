"""Tests of victor_mp_metrics._system: CPU, memory and uptime measured at collection time."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from victor_mp_metrics import _runtime
from victor_mp_metrics import _system as system

# The "master" starts one child that keeps a CPU busy, then sleeps.
_MASTER = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'while True: pass'])\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(60)\n"
)


def _values() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in system.collect_system_metrics()
        for s in f.samples
    }


@pytest.fixture
def master(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[psutil.Process, psutil.Process]]:
    """A fake Gunicorn master with a spinning child, named as the runtime's master pid."""
    proc = subprocess.Popen([sys.executable, "-c", _MASTER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        child = psutil.Process(int(proc.stdout.readline()))
        monkeypatch.setattr(_runtime.RUNTIME, "master_pid", proc.pid)
        yield psutil.Process(proc.pid), child
    finally:
        for p in psutil.Process(proc.pid).children(recursive=True):
            p.kill()
        proc.kill()
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]


def test_families_and_labels() -> None:
    """Three gauges: cpu percent, memory by type rss/vms, uptime."""
    families = system.collect_system_metrics()
    assert ["victor_system_cpu_percent", "victor_system_memory_bytes",
            "victor_system_uptime_seconds"] == [f.name for f in families]  # fmt: skip
    assert {"gauge"} == {f.type for f in families}
    assert [{"type": "rss"}, {"type": "vms"}] == [s.labels for s in families[1].samples]


def test_current_process_without_master() -> None:
    """Without a master pid the current process is measured."""
    values = _values()
    me = psutil.Process()
    rss = values[("victor_system_memory_bytes", (("type", "rss"),))]
    assert abs(me.memory_info().rss - rss) < 2**24
    uptime = values[("victor_system_uptime_seconds", ())]
    assert abs(time.time() - me.create_time() - uptime) < 1.0


def test_dead_master_pid_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A master pid that is not running falls back to the current process."""
    monkeypatch.setattr(_runtime.RUNTIME, "master_pid", 999999999)
    assert os.getpid() == system.root_process().pid


def _measured_with_share(
    child: psutil.Process,
) -> tuple[dict[tuple[str, tuple[tuple[str, str], ...]], float], float]:
    """Collect, and the spinner's own CPU share (percent) over the same time, from its CPU times."""
    cpu_before, wall_before = sum(child.cpu_times()[:2]), time.monotonic()
    values = _values()
    cpu_after, wall_after = sum(child.cpu_times()[:2]), time.monotonic()
    return values, (cpu_after - cpu_before) / (wall_after - wall_before) * 100.0


def test_master_tree_cpu_on_first_scrape(master: tuple[psutil.Process, psutil.Process]) -> None:
    """The first collection already shows a spinning child's load (~100 on an idle machine)."""
    root, child = master
    values, share = _measured_with_share(child)
    cpu = values[("victor_system_cpu_percent", ())]
    assert cpu > 15.0 and abs(cpu - share) < 25.0, (cpu, share)
    rss = root.memory_info().rss + child.memory_info().rss
    assert abs(rss - values[("victor_system_memory_bytes", (("type", "rss"),))]) < 2**22
    uptime = values[("victor_system_uptime_seconds", ())]
    assert abs(time.time() - root.create_time() - uptime) < 1.0


def test_known_processes_are_not_sampled_again(
    master: tuple[psutil.Process, psutil.Process], monkeypatch: pytest.MonkeyPatch
) -> None:
    """New processes are measured over one shared short sleep; known ones need no sleep."""
    _, child = master
    sleeps: list[float] = []
    real_sleep = time.sleep
    monkeypatch.setattr(system.time, "sleep", lambda s: (sleeps.append(s), real_sleep(s)))
    system.collect_system_metrics()
    assert [system.FIRST_SAMPLE_INTERVAL] == sleeps
    cpu_before, wall_before = sum(child.cpu_times()[:2]), time.monotonic()
    real_sleep(0.3)
    values = _values()
    share = (sum(child.cpu_times()[:2]) - cpu_before) / (time.monotonic() - wall_before) * 100.0
    assert [system.FIRST_SAMPLE_INTERVAL] == sleeps
    cpu = values[("victor_system_cpu_percent", ())]
    assert cpu > 15.0 and abs(cpu - share) < 25.0, (cpu, share)
