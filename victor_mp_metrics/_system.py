"""System metrics, measured with psutil when /metrics is collected.

Under Gunicorn the measured processes are the master (its pid is in the runtime, set by
the on_starting hook and inherited by forked workers) and all its live descendants;
otherwise the current process alone.

CPU percent is psutil's per-process figure summed over the processes (100 = one core
busy): for a process seen before it covers the time since the previous collection, so
the psutil.Process objects are kept between calls, keyed by (pid, create_time) so a
reused pid is a new process. Processes seen for the first time are measured together
over :data:`FIRST_SAMPLE_INTERVAL`, so the first scrape already reflects real load.
Memory is RSS and VMS summed over the processes (pages shared after fork count once per
process, as ``ps`` shows them).
"""

from __future__ import annotations

import threading
import time

import psutil
from prometheus_client import Metric
from prometheus_client.core import GaugeMetricFamily

from . import _runtime
from .catalog import CATALOG_BY_NAME

FIRST_SAMPLE_INTERVAL = 0.1

_GONE = (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied)


def root_process() -> psutil.Process:
    """The Gunicorn master (the runtime's ``master_pid``) if it runs, else this process."""
    pid = _runtime.RUNTIME.master_pid
    if pid is not None:
        try:
            return psutil.Process(pid)
        except _GONE:
            pass
    return psutil.Process()


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except _GONE:
        return [root]


class CpuSampler:
    """The processes seen by the previous collection, so CPU percent covers the time since."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: dict[tuple[int, float], psutil.Process] = {}

    def cpu_percent(self, tree: list[psutil.Process]) -> float:
        """Sum of CPU percent over ``tree``; a process gone meanwhile adds nothing."""
        with self.lock:
            current: dict[tuple[int, float], psutil.Process] = {}
            new = False
            for proc in tree:
                try:
                    key = (proc.pid, proc.create_time())
                except _GONE:
                    continue
                known = self.seen.get(key)
                if known is None:
                    try:
                        proc.cpu_percent(None)
                    except _GONE:
                        continue
                    new = True
                    known = proc
                current[key] = known
            if new:
                time.sleep(FIRST_SAMPLE_INTERVAL)
            total = 0.0
            for key, proc in list(current.items()):
                try:
                    total += proc.cpu_percent(None)
                except _GONE:
                    del current[key]  # exited during the sample: not kept for next time
            self.seen = current
            return total


def collect_system_metrics() -> list[Metric]:
    """``victor_system_cpu_percent``, ``victor_system_memory_bytes{type}`` and
    ``victor_system_uptime_seconds``, measured now."""
    root = root_process()
    tree = _tree(root)
    cpu = _runtime.singleton("system_sampler", CpuSampler).cpu_percent(tree)
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

