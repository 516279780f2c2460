"""System metrics, measured with psutil when /metrics is collected.

Under Gunicorn the measured processes are the master (its pid is in
``VICTOR_METRICS_MASTER_PID``, set by the on_starting hook and inherited by workers) and
all its live descendants; otherwise the current process alone.

CPU percent is psutil's per-process figure summed over the processes (100 = one core
busy): for a process seen before it covers the time since the previous collection, so
the psutil.Process objects are kept between calls, keyed by (pid, create_time) so a
reused pid is a new process. Processes seen for the first time are measured together
over :data:`FIRST_SAMPLE_INTERVAL`, so the first scrape already reflects real load.
Memory is RSS and VMS summed over the processes (pages shared after fork count once per
process, as ``ps`` shows them).
"""

from __future__ import annotations

import os
import threading
import time

import psutil
from prometheus_client import Metric
from prometheus_client.core import GaugeMetricFamily

from . import _state
from .catalog import CATALOG_BY_NAME

MASTER_PID_ENV = "VICTOR_METRICS_MASTER_PID"
FIRST_SAMPLE_INTERVAL = 0.1

_lock = threading.Lock()
_seen: dict[tuple[int, float], psutil.Process] = {}

_GONE = (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied)


def root_process() -> psutil.Process:
    """The Gunicorn master named by ``VICTOR_METRICS_MASTER_PID`` if it runs, else this process."""
    raw = os.environ.get(MASTER_PID_ENV, "")
    if raw.strip().isdigit():
        try:
            return psutil.Process(int(raw))
        except _GONE:
            pass
    return psutil.Process()


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except _GONE:
        return [root]


def _cpu_percent(tree: list[psutil.Process]) -> float:
    """Sum of CPU percent over ``tree``; caller holds ``_lock``."""
    current: dict[tuple[int, float], psutil.Process] = {}
    new: list[psutil.Process] = []
    for proc in tree:
        try:
            key = (proc.pid, proc.create_time())
        except _GONE:
            continue
        known = _seen.get(key)
        if known is None:
            try:
                proc.cpu_percent(None)
            except _GONE:
                continue
            new.append(proc)
            known = proc
        current[key] = known
    if new:
        time.sleep(FIRST_SAMPLE_INTERVAL)
    total = 0.0
    for key, proc in current.items():
        try:
            total += proc.cpu_percent(None)
        except _GONE:
            del _seen[key]
            continue
    _seen.clear()
    _seen.update(current)
    return total


def collect_system_metrics() -> list[Metric]:
    """``victor_system_cpu_percent``, ``victor_system_memory_bytes{type}`` and
    ``victor_system_uptime_seconds``, measured now."""
    root = root_process()
    tree = _tree(root)
    with _lock:
        cpu = _cpu_percent(tree)
    rss = vms = 0
    for proc in tree:
        try:
            info = proc.memory_info()
        except _GONE:
            continue
        rss += info.rss
        vms += info.vms
    try:
        uptime = max(0.0, time.time() - root.create_time())
    except _GONE:
        uptime = 0.0

    cpu_family = _family("victor_system_cpu_percent")
    cpu_family.add_metric((), cpu)
    memory = _family("victor_system_memory_bytes")
    memory.add_metric(("rss",), float(rss))
    memory.add_metric(("vms",), float(vms))
    uptime_family = _family("victor_system_uptime_seconds")
    uptime_family.add_metric((), uptime)
    return [cpu_family, memory, uptime_family]


def _family(name: str) -> GaugeMetricFamily:
    spec = CATALOG_BY_NAME[name]
    return GaugeMetricFamily(name, spec.help, labels=spec.labels)


@_state.on_reset
def _forget() -> None:
    with _lock:
        _seen.clear()
