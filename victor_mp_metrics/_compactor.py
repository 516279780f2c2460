"""The master's compactor thread, and one compaction turned into log lines and self-metrics.

The thread compacts when a worker exits (``request()``) and every ``interval`` seconds.
A compaction absorbs at most ``_mpdir.MAX_WRITERS`` dead writers; when more are left it
goes on at once, so a backlog drains in short steps, each leaving the lock free for
readers in between. ``stop()`` returns within its timeout whatever the thread is doing.
"""

from __future__ import annotations

import logging
import os
import threading

from . import _mpdir, _runtime

log = logging.getLogger("victor_mp_metrics")


class Compactor:
    """A master thread that compacts when a worker exits and every ``interval`` seconds."""

    def __init__(self, directory: str, interval: float) -> None:
        self.directory = directory
        self.interval = interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="victor-compactor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def request(self) -> None:
        """Ask for a compaction soon (returns at once)."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread; wait at most ``timeout`` seconds for a compaction to end."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)

    def abandon(self) -> None:
        """In a forked child: the thread did not survive the fork; nothing to close."""

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval or None)
            self._wake.clear()
            _take_master_lock(self.directory)
            while not self._stop.is_set():
                result = run_compaction(self.directory)
                if result is None or not result.remaining:
                    break


def _take_master_lock(directory: str) -> None:
    """After a USR2 upgrade the new master shares the old one's directory; once the old
    master is gone, the new one holds ``master.lock`` itself."""
    rt = _runtime.RUNTIME
    if rt.master_lock_fd is None and rt.master_pid == os.getpid():
        fd, _holder = _mpdir.claim(directory)
        if fd >= 0:
            rt.master_lock_fd = fd


def run_compaction(directory: str) -> _mpdir.CompactionResult | None:
    """Compact ``directory`` now, recording self-metrics; errors are logged, not raised."""
    settings = _runtime.get_settings()
    try:
        result = _mpdir.compact(
            directory, exclude=_runtime.own_idents(), max_series=settings.max_series
        )
    except Exception:
        log.exception("victor_mp_metrics: compaction of %s failed; will retry", directory)
        _runtime.self_counter("hook_errors").inc()
        return None
    if result.busy:
        log.warning("victor_mp_metrics: %s is held by another compaction; will retry",
                    _mpdir.COMPACT_LOCK)
    if result.absorbed:
        _runtime.self_counter("compactions").inc()
        _runtime.self_counter("writers_compacted").inc(len(result.absorbed))
        seconds = _mpdir.on_grid(result.duration, _mpdir.PER_SECOND)  # exact sums
        _runtime.self_counter("compaction_seconds").inc(seconds)
        log.info(
            "victor_mp_metrics: compacted %d dead writer(s) into archive generation %d "
            "in %.1f ms", len(result.absorbed), result.generation, result.duration * 1000,
        )
    if result.corrupt:
        _runtime.self_counter("corrupt_files").inc(len(result.corrupt))
    if result.series_folded:
        log.warning(
            "victor_mp_metrics: archive reached VICTOR_METRICS_MAX_SERIES label sets for some "
            "metric; %d sample(s) folded into __overflow__ series", result.series_folded,
        )
    return result
