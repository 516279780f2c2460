"""The standard process and Python metrics, for the whole deployment.

prometheus_client's process and platform collectors describe the one process that
answers a scrape; in multiprocess mode that is one random worker. Here every process
writes its own figures to its files once a second (the store's watchdog samples them)
and the directory aggregates them:

==================================  =====================================================
``process_cpu_seconds_total``       counter: CPU time of every process that ever ran,
                                    dead workers' time kept (monotonic across restarts)
``process_resident_memory_bytes``   livesum: RSS summed over live processes
``process_virtual_memory_bytes``    livesum: VMS summed over live processes
``process_open_fds``                livesum: descriptors open in live processes
``process_start_time_seconds``      livemin: the oldest live process (the master)
``python_info``                     livemax: 1, labelled by this Python's version
``python_gc_*_total{generation}``   counters: collections, collected and uncollectable
                                    objects, summed over all processes, live and dead
==================================  =====================================================
"""

from __future__ import annotations

import gc
import os
import platform
from collections.abc import Callable
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge

from . import _compat, _mpdir


class ProcessMetrics:
    """This process's process and Python metrics, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry,
                 gc_at_fork: Callable[[], list[dict[str, Any]]] = list) -> None:
        """``gc_at_fork()``: the gc statistics inherited at this process's fork (its
        parent's counts, which are the parent's to report), or [] for a process not forked."""
        self._gc_at_fork = gc_at_fork
        self._cpu = Counter("process_cpu_seconds", "Total user and system CPU time spent in "
                            "seconds, over every process of the deployment, live and dead.",
                            registry=registry)
        self._rss = Gauge("process_resident_memory_bytes", "Resident memory size in bytes, "
                          "summed over live processes.", registry=registry,
                          multiprocess_mode="livesum")
        self._vms = Gauge("process_virtual_memory_bytes", "Virtual memory size in bytes, "
                          "summed over live processes.", registry=registry,
                          multiprocess_mode="livesum")
        self._fds = Gauge("process_open_fds", "Open file descriptors, summed over live "
                          "processes.", registry=registry, multiprocess_mode="livesum")
        self._start = Gauge("process_start_time_seconds", "Start time of the oldest live "
                            "process (the Gunicorn master) since the epoch, in seconds.",
                            registry=registry, multiprocess_mode="livemin")
        info = Gauge("python_info", "Python platform information.",
                     ["implementation", "major", "minor", "patchlevel", "version"],
                     registry=registry, multiprocess_mode="livemax")
        major, minor, patch = platform.python_version_tuple()
        info.labels(platform.python_implementation(), major, minor, patch,
                    platform.python_version()).set(1)
        gen = ["generation"]
        self._collections = Counter("python_gc_collections", "Garbage collections, per "
                                    "generation, over every process.", gen, registry=registry)
        self._collected = Counter("python_gc_objects_collected", "Objects collected during "
                                  "gc, over every process.", gen, registry=registry)
        self._uncollectable = Counter("python_gc_objects_uncollectable", "Uncollectable "
                                      "objects found during gc, over every process.", gen,
                                      registry=registry)
        self._proc: psutil.Process | None = None
        self._pid = 0
        self.sample()

    def sample(self) -> None:
        """Write this process's current figures (each a cumulative or current value)."""
        if self._pid != os.getpid():  # first call, or a forked child
            self._pid = os.getpid()
            self._proc = psutil.Process()
        assert self._proc is not None
        with self._proc.oneshot():
            times = self._proc.cpu_times()
            memory = self._proc.memory_info()
            # on a binary grid: the deployment's sum stays exact when compaction regroups it
            cpu = _mpdir.on_grid(times.user + times.system, _mpdir.PER_SECOND)
            _compat.set_value(self._cpu, cpu)
            self._rss.set(memory.rss)
            self._vms.set(memory.vms)
            self._fds.set(self._proc.num_fds())
            self._start.set(self._proc.create_time())
        base = self._gc_at_fork()
        for generation, current in enumerate(gc.get_stats()):
            inherited = base[generation] if generation < len(base) else {}
            stats = {k: v - inherited.get(k, 0) for k, v in current.items()}
            labels = str(generation)
            _compat.set_value(self._collections.labels(labels), stats["collections"])
            _compat.set_value(self._collected.labels(labels), stats["collected"])
            _compat.set_value(self._uncollectable.labels(labels), stats["uncollectable"])

