"""Gunicorn server hooks. Import them into a ``gunicorn.conf.py``::

    from victor_mp_metrics.gunicorn_hooks import (  # noqa: F401
        child_exit, on_exit, on_starting, post_fork, when_ready, use_default_directory,
    )
    use_default_directory()

* ``use_default_directory()`` (call it at the top of the config file, before the app is
  imported, which ``--preload`` does before any hook runs): if ``PROMETHEUS_MULTIPROC_DIR``
  is unset, point it at a private directory (mode 0700) on tmpfs when available.
* ``on_starting``: validate settings and the directory; wipe files of earlier runs (never
  those of another live master sharing the directory: then dead files are compacted).
* ``when_ready``: start the compactor thread (worker exits and periodic sweeps) and, if
  ``VICTOR_METRICS_PORT`` is set, the master's aggregated ``/metrics`` server.
* ``post_fork``: in the worker, let go of the master's server socket.
* ``child_exit``: runs in the master for every reaped worker, SIGKILL included: wakes the
  compactor, which merges the dead worker's files. Its live gauges already vanished from
  scrapes the moment it died (its owner lock was released).
* ``on_exit``: stop the compactor and compact what is left.

Runtime hooks never raise into the arbiter: an error is logged and counted in
``victor_metrics_hook_errors_total``. ``on_starting`` refuses to start (exit status 1,
one clear line) on a bad setting or an unsafe directory.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from . import _state, _values, compaction, selfmetrics
from .directory import ensure_directory
from .exceptions import VictorMetricsError
from .server import MetricsServer, start_metrics_server
from .settings import Settings, load_settings

log = logging.getLogger("victor_mp_metrics")
F = TypeVar("F", bound=Callable[..., None])

MASTER_PID_ENV = "VICTOR_METRICS_MASTER_PID"
_server: MetricsServer | None = None
_compactor: Compactor | None = None


def default_directory() -> str:
    """The built-in multiprocess directory: per user, on tmpfs (/dev/shm) when possible."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK | os.X_OK) else tempfile.gettempdir()
    return os.path.join(base, f"victor-metrics-{os.geteuid()}")


def settings_or_exit() -> Settings:
    """The settings for a ``gunicorn.conf.py``: a bad value exits with one clear line."""
    try:
        return load_settings()
    except VictorMetricsError as err:
        raise SystemExit(f"victor_mp_metrics: refusing to start: {err}") from None


def use_default_directory() -> str:
    """Set ``PROMETHEUS_MULTIPROC_DIR`` to :func:`default_directory` unless set; return it."""
    current = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if current:
        return current
    path = default_directory()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


def _never_raise(hook: F) -> F:
    @functools.wraps(hook)
    def guarded(*args: Any) -> None:
        try:
            hook(*args)
        except Exception:
            log.exception("victor_mp_metrics: the %s hook failed; Gunicorn goes on", hook.__name__)
            try:
                selfmetrics.counter("hook_errors").inc()
            except Exception:  # pragma: no cover - counting must not fail the hook either
                pass

    return guarded  # type: ignore[return-value]


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

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval or None)
            self._wake.clear()
            if self._stop.is_set():
                break
            run_compaction(self.directory)


def run_compaction(directory: str) -> compaction.CompactionResult | None:
    """Compact ``directory`` now, recording self-metrics; errors are logged, not raised."""
    try:
        result = compaction.compact(directory, exclude=_own_ident())
    except Exception:
        log.exception("victor_mp_metrics: compaction of %s failed; will retry", directory)
        selfmetrics.counter("hook_errors").inc()
        return None
    if result.absorbed:
        selfmetrics.counter("compactions").inc()
        selfmetrics.counter("writers_compacted").inc(len(result.absorbed))
        selfmetrics.counter("compaction_seconds").inc(result.duration)
        log.info(
            "victor_mp_metrics: compacted %d dead writer(s) into archive generation %d "
            "in %.1f ms", len(result.absorbed), result.generation, result.duration * 1000,
        )
    if result.corrupt:
        selfmetrics.counter("corrupt_files").inc(len(result.corrupt))
    if result.series_folded:
        log.warning(
            "victor_mp_metrics: archive reached VICTOR_METRICS_MAX_SERIES label sets for some "
            "metric; %d sample(s) folded into __overflow__ series", result.series_folded,
        )
    return result


def _own_ident() -> frozenset[str]:
    store = _values.current_store()
    return frozenset({store.ident}) if store is not None and store.ident else frozenset()


def on_starting(server: Any) -> None:
    """Validate settings and the directory, wipe earlier runs' files, configure the master."""
    try:
        settings = load_settings()
        if settings.enabled and settings.multiproc_dir is None:
            use_default_directory()
            settings = load_settings()
        if settings.multiprocess:
            ensure_directory(settings.multiproc_dir)  # type: ignore[arg-type]
        os.environ[MASTER_PID_ENV] = str(os.getpid())
        _state.configure(settings)
    except VictorMetricsError as err:
        raise SystemExit(f"victor_mp_metrics: refusing to start: {err}") from None
    if settings.multiprocess:
        _start_clean(settings.multiproc_dir)  # type: ignore[arg-type]


@_never_raise
def _start_clean(directory: str) -> None:
    removed = compaction.wipe_dead(directory, exclude=_own_ident())
    if removed < 0:
        log.info(
            "victor_mp_metrics: another live process shares %s; compacting dead files "
            "instead of wiping", directory,
        )
        run_compaction(directory)
    elif removed:
        log.info("victor_mp_metrics: removed %d file(s) of an earlier run from %s",
                 removed, directory)


@_never_raise
def when_ready(server: Any) -> None:
    """Start the compactor and, if ``VICTOR_METRICS_PORT`` is set, the metrics server."""
    global _server, _compactor
    settings = _state.get_settings()
    if settings.enabled:
        selfmetrics.create_all()
    if settings.multiprocess and _compactor is None:
        _compactor = Compactor(settings.multiproc_dir, settings.sweep_interval)  # type: ignore[arg-type]
        _compactor.start()
    if settings.port is not None and _server is None:
        _server = start_metrics_server(settings.port, settings.addr)
        log.info("victor_mp_metrics: master serves /metrics on %s:%d", settings.addr, _server.port)


@_never_raise
def post_fork(server: Any, worker: Any) -> None:
    """In the new worker: close the master's metrics server socket, forget the compactor."""
    global _server, _compactor
    if _server is not None:
        _server.httpd.socket.close()
        _server = None
    _compactor = None


@_never_raise
def child_exit(server: Any, worker: Any) -> None:
    """In the master, for every reaped worker: have its files compacted."""
    if _compactor is not None:
        _compactor.request()


@_never_raise
def on_exit(server: Any) -> None:
    """Stop the compactor and the metrics server; compact the last workers' files."""
    global _server, _compactor
    if _compactor is not None:
        _compactor.stop()
        _compactor = None
    if _server is not None:
        _server.stop()
        _server = None
    settings = _state.get_settings()
    if settings.multiprocess:
        run_compaction(settings.multiproc_dir)  # type: ignore[arg-type]
