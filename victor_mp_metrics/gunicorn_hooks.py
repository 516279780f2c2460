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
* ``post_fork``: nothing any more (the after-fork handler lets go of the master's server
  socket); kept so existing configs that import it still work.
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
from collections.abc import Callable
from typing import Any, TypeVar

from . import _mpdir, _runtime
from ._compactor import Compactor, run_compaction
from ._server import start_metrics_server
from .exceptions import VictorMetricsError
from .settings import DeploymentSettings, load_deployment_settings, load_settings

log = logging.getLogger("victor_mp_metrics")
F = TypeVar("F", bound=Callable[..., None])


def default_directory() -> str:
    """The built-in multiprocess directory: per user, on tmpfs (/dev/shm) when possible."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK | os.X_OK) else tempfile.gettempdir()
    return os.path.join(base, f"victor-metrics-{os.geteuid()}")


def settings_or_exit() -> DeploymentSettings:
    """The deployment settings for a ``gunicorn.conf.py``; a bad value of either section
    exits with one clear line (Gunicorn must not start half-configured)."""
    try:
        load_settings()
        return load_deployment_settings()
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
    if settings.multiprocess:
        assert settings.multiproc_dir is not None
        _start_clean(settings.multiproc_dir)


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
    if settings.multiprocess and rt.compactor is None:
        assert settings.multiproc_dir is not None
        compactor = Compactor(settings.multiproc_dir, settings.sweep_interval)
        compactor.start()
        rt.compactor = compactor
    if settings.port is not None and rt.server is None:
        metrics_server = start_metrics_server(settings.port, settings.addr)
        rt.server = metrics_server
        log.info("victor_mp_metrics: master serves /metrics on %s:%d", settings.addr,
                 metrics_server.port)


@_never_raise
def post_fork(server: Any, worker: Any) -> None:
    """In the new worker: nothing left to do (the runtime's after-fork handler closed the
    master's metrics socket and forgot its compactor); kept for existing configs."""


@_never_raise
def child_exit(server: Any, worker: Any) -> None:
    """In the master, for every reaped worker: have its files compacted."""
    compactor = _runtime.RUNTIME.compactor
    if isinstance(compactor, Compactor):
        compactor.request()


@_never_raise
def on_exit(server: Any) -> None:
    """Stop the compactor and the metrics server; compact the last workers' files."""
    rt = _runtime.RUNTIME
    for attr in ("compactor", "server"):
        running = getattr(rt, attr)
        setattr(rt, attr, None)
        if running is not None:
            running.stop()
    settings = _runtime.get_settings()
    if settings.multiprocess:
        assert settings.multiproc_dir is not None
        run_compaction(settings.multiproc_dir)

