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
* ``when_ready``: start the compactor thread (worker exits and periodic sweeps), keep the
  server metrics (``gunicorn_*``: workers, exits and their reasons, signals, reloads,
  backlog, workers' memory; see :mod:`._gunicorn_metrics`) and, if
  ``VICTOR_METRICS_PORT`` is set, start the master's aggregated ``/metrics`` server.
* ``post_fork``: nothing any more (the after-fork handler lets go of the master's server
  socket); kept so existing configs that import it still work.
* ``child_exit``: runs in the master for every reaped worker, SIGKILL included: wakes the
  compactor, which merges the dead worker's files, and counts the exit with its reason
  and the worker's lifetime. Its live gauges already vanished from scrapes the moment it
  died (its owner lock was released).
* ``on_exit``: stop the compactor and compact what is left.

Runtime hooks never raise into the arbiter: an error is logged and counted in
``victor_metrics_hook_errors_total``. ``on_starting`` refuses to start (exit status 1,
one clear line) on a bad setting or an unsafe directory.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import queue
import signal
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

from gunicorn import __version__ as gunicorn_version
from gunicorn.workers import SUPPORTED_WORKERS

from . import _gunicorn_metrics, _mpdir, _runtime
from ._compactor import Compactor, run_compaction
from ._server import MetricsServer, start_metrics_server
from .exceptions import VictorMetricsError
from .settings import DeploymentSettings, load_deployment_settings, load_settings

log = logging.getLogger("victor_mp_metrics")
F = TypeVar("F", bound=Callable[..., None])


def default_base() -> str:
    """Where the built-in directories live: per user, on tmpfs (/dev/shm) when possible."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK | os.X_OK) else tempfile.gettempdir()
    return os.path.join(base, f"victor-metrics-{os.geteuid()}")


def default_directory() -> str:
    """The built-in multiprocess directory of this master: private to it, under
    :func:`default_base`, so two masters of one user never mix their totals."""
    return os.path.join(default_base(), f"{_mpdir.MASTER_PREFIX}{os.getpid()}")


def settings_or_exit() -> DeploymentSettings:
    """The deployment settings for a ``gunicorn.conf.py``; a bad value of either section,
    or a worker class this machine cannot run, exits with one clear line (Gunicorn must
    not start half-configured)."""
    try:
        load_settings()
        deployment = load_deployment_settings()
    except VictorMetricsError as err:
        raise SystemExit(f"victor_mp_metrics: refusing to start: {err}") from None
    problem = worker_class_problem(deployment.worker_class)
    if problem is not None:
        raise SystemExit(f"victor_mp_metrics: refusing to start: {problem}")
    return deployment


# Worker classes that need more than Gunicorn: (module to import, extra that brings it).
_WORKER_NEEDS = {
    "gevent": ("gevent", "gevent"),
    "eventlet": ("eventlet", "eventlet"),
    "uvicorn_worker.UvicornWorker": ("uvicorn_worker", "asgi"),
}


def worker_class_problem(worker_class: str) -> str | None:
    """Why Gunicorn could not run ``worker_class`` here (what to install), or None."""
    if "." not in worker_class and worker_class not in SUPPORTED_WORKERS:
        removed = ""
        if worker_class == "eventlet":
            removed = " (Gunicorn 26.0 removed the eventlet worker)"
        return (
            f"VICTOR_WORKER_CLASS={worker_class}: Gunicorn {gunicorn_version} has no such "
            f"worker{removed}. Use gevent or gthread, or install a Gunicorn that has it "
            f"(pip install 'victor-mp-metrics[{worker_class}]')."
        )
    needs = _WORKER_NEEDS.get(worker_class)
    if needs is not None and importlib.util.find_spec(needs[0]) is None:
        return (
            f"VICTOR_WORKER_CLASS={worker_class} needs the {needs[0]!r} package: "
            f"pip install 'victor-mp-metrics[{needs[1]}]'."
        )
    return None


def use_default_directory() -> str:
    """Set ``PROMETHEUS_MULTIPROC_DIR`` to :func:`default_directory` unless set, and
    configure the library now; return the directory.

    Call it at the top of ``gunicorn.conf.py``: it runs in the master before the app is
    imported (``--preload`` imports it before any hook), so metrics created at import time,
    stock prometheus_client ones included, already write per-process files. Directories
    of dead masters under :func:`default_base` are removed; a base that exists and is not
    ours (another user's, a symlink) is refused.
    """
    current = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    try:
        if not current:
            base = _mpdir.ensure_directory(default_base())
            _mpdir.remove_dead_masters(base)
            current = os.environ["PROMETHEUS_MULTIPROC_DIR"] = default_directory()
        if load_settings().enabled:
            _runtime.configure()
    except VictorMetricsError as err:
        raise SystemExit(f"victor_mp_metrics: refusing to start: {err}") from None
    return current


class _Fatal(SystemExit):
    """A hook's refusal to go on: passes through :func:`_never_raise` and stops Gunicorn."""


def _never_raise(hook: F) -> F:
    @functools.wraps(hook)
    def guarded(*args: Any) -> None:
        try:
            hook(*args)
        except _Fatal:
            raise
        except Exception:
            log.exception("victor_mp_metrics: the %s hook failed; Gunicorn goes on", hook.__name__)
            try:
                _runtime.self_counter("hook_errors").inc()
            except Exception:  # pragma: no cover - counting must not fail the hook either
                pass

    return guarded  # type: ignore[return-value]


def on_starting(server: Any) -> None:
    """Validate settings and the directory, wipe earlier runs' files, configure the master."""
    try:
        settings = load_settings()
        if settings.enabled and settings.multiproc_dir is None:
            use_default_directory()
            settings = load_settings()
        if settings.multiprocess:
            assert settings.multiproc_dir is not None
            _mpdir.ensure_directory(settings.multiproc_dir)
        _runtime.configure(settings)
        _runtime.RUNTIME.master_pid = os.getpid()
    except VictorMetricsError as err:
        raise SystemExit(f"victor_mp_metrics: refusing to start: {err}") from None
    _log_through(server)
    if settings.multiprocess:
        assert settings.multiproc_dir is not None
        _claim_directory(settings.multiproc_dir)
        _start_clean(settings.multiproc_dir)


def _claim_directory(directory: str) -> None:
    """One master per directory: refuse a second, unrelated, live master (a USR2 child of
    the holder shares it and takes the lock when its parent exits)."""
    fd, holder = _mpdir.claim(directory)
    if fd >= 0:
        _runtime.RUNTIME.master_lock_fd = fd
        return
    if holder == os.getppid():
        log.info("victor_mp_metrics: sharing %s with the old master (pid %d) during an "
                 "upgrade; totals carry over", directory, holder)
        return
    raise SystemExit(
        f"victor_mp_metrics: refusing to start: another Gunicorn master (pid {holder}) uses "
        f"PROMETHEUS_MULTIPROC_DIR={directory}, and two masters in one directory would sum "
        "each other's workers. Give each master its own directory, or unset the variable "
        "for a private default."
    )


class _ToGunicorn(logging.Handler):
    """Hands library records to Gunicorn's error logger: its file, format and level."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        if self.target.isEnabledFor(record.levelno):
            self.target.handle(record)


def _log_through(server: Any) -> None:
    error_log = getattr(getattr(server, "log", None), "error_log", None)
    if not isinstance(error_log, logging.Logger):
        return
    lib = logging.getLogger("victor_mp_metrics")
    for handler in [h for h in lib.handlers if isinstance(h, _ToGunicorn)]:
        lib.removeHandler(handler)
    lib.addHandler(_ToGunicorn(error_log))
    lib.setLevel(error_log.getEffectiveLevel())
    lib.propagate = False


@_never_raise
def _start_clean(directory: str) -> None:
    removed = _mpdir.wipe_dead(directory, exclude=_runtime.own_idents())
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
    rt = _runtime.RUNTIME
    settings = _runtime.get_settings()
    if settings.enabled:
        _runtime.create_self_counters()
        _watch_server(server)
    if settings.multiprocess and rt.compactor is None:
        assert settings.multiproc_dir is not None
        compactor = Compactor(settings.multiproc_dir, settings.sweep_interval)
        compactor.start()
        rt.compactor = compactor
    if settings.port is not None and rt.server is None:
        try:
            metrics_server = start_metrics_server(settings.port, settings.addr)
        except OSError as err:
            # Fail fast: a master whose Prometheus target can never be up must not start.
            raise _Fatal(
                f"victor_mp_metrics: refusing to start: cannot serve /metrics on "
                f"{settings.addr}:{settings.port} ({err.strerror or err}). Free the port or "
                "change VICTOR_METRICS_PORT / VICTOR_METRICS_ADDR."
            ) from None
        except ValueError as err:
            raise _Fatal(f"victor_mp_metrics: refusing to start: {err}") from None
        rt.server = metrics_server
        log.info("victor_mp_metrics: master serves /metrics on %s:%d", settings.addr,
                 metrics_server.port)


@_never_raise
def _watch_server(server: Any) -> None:
    # Guarded on its own: a failure here must not keep the metrics port from starting.
    _gunicorn_metrics.watch(server)


@_never_raise
def post_fork(server: Any, worker: Any) -> None:
    """In the new worker: make it leave at once if the master is shutting down.

    A Gunicorn race: a worker forked while the master has a SIGTERM queued, or sent one
    before it installs its own handlers, has the signal swallowed by the master's handler
    it inherited (into its copy of the master's queue) and serves on until the master
    kills it at ``graceful_timeout`` (30 s of a stuck shutdown). Once its handlers are in
    place, the worker looks in that queue and stops if a shutdown signal is there.
    (The runtime's after-fork handler did the rest: the master's metrics socket closed,
    its compactor forgotten.)"""
    init_signals = worker.init_signals

    def init_signals_then_check() -> None:
        init_signals()
        if _shutdown_queued(server):
            log.info("victor_mp_metrics: the master is shutting down; worker %d leaves",
                     os.getpid())
            worker.alive = False

    worker.init_signals = init_signals_then_check


_SHUTDOWN = frozenset((signal.SIGTERM, signal.SIGINT, signal.SIGQUIT))


def _shutdown_queued(server: Any) -> bool:
    """Whether this (forked) process's copy of the arbiter's signal queue holds a shutdown:
    a list up to Gunicorn 25, a ``queue.SimpleQueue`` since."""
    queued = getattr(server, "SIG_QUEUE", None)
    if isinstance(queued, list):
        return not _SHUTDOWN.isdisjoint(queued)
    found = False
    get = getattr(queued, "get_nowait", None)
    while get is not None:
        try:
            sig = get()
        except queue.Empty:  # drained: the worker never reads this copy
            break
        found = found or sig in _SHUTDOWN
    return found


@_never_raise
def on_reload(server: Any) -> None:
    """SIGHUP in the master: re-read the metrics port's web config (certificate rotation)."""
    running = _runtime.RUNTIME.server
    if isinstance(running, MetricsServer):
        running.reload()


@_never_raise
def worker_abort(worker: Any) -> None:
    """In a worker Gunicorn is killing for its timeout: the request cut short is recorded
    with ``error_type="timeout"`` on its route (not as the ``SystemExit`` that follows)."""
    _runtime.RUNTIME.aborting = True


@_never_raise
def child_exit(server: Any, worker: Any) -> None:
    """In the master, for every reaped worker: have its files compacted, count its exit."""
    compactor = _runtime.RUNTIME.compactor
    if isinstance(compactor, Compactor):
        compactor.request()
    if _runtime.get_settings().enabled:
        _gunicorn_metrics.worker_exited(server, worker)


@_never_raise
def on_exit(server: Any) -> None:
    """Stop the compactor and the metrics server; compact the last workers' files."""
    _runtime.stop_threads()
    settings = _runtime.get_settings()
    if settings.multiprocess:
        assert settings.multiproc_dir is not None
        run_compaction(settings.multiproc_dir)

