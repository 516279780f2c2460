"""The package's process state, confessed in one place (structlog's ``_config``).

One :class:`Runtime` object holds everything a process of ours has: the settings, the
store of this process's files, the local registry, the self-metric counters, lazily
created singletons (catalog, custom registry, directory readers, ...), and the master's
compactor and metrics server. :func:`reset` puts it back to the state after import; one
after-fork handler (bottom of this module) gives a forked child its own state.

``configure()`` reads the settings (from the environment unless given) and, in
multiprocess mode, installs our file-backed value class into prometheus_client, so every
metric created afterwards - ours or the user's own prometheus_client metrics - writes
per-process files, whatever the order in which modules were imported.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter

from . import _compat, _mpdir
from ._process import ProcessMetrics
from ._selfmetrics import COUNTERS
from .exceptions import DirectoryError, UnsafeDirectoryError
from .settings import Settings, load_settings

log = logging.getLogger("victor_mp_metrics")
_T = TypeVar("_T")


class Stoppable(Protocol):
    """A thread or server of the master: stopped by :func:`reset`, abandoned by a child."""

    def stop(self) -> None: ...
    def abandon(self) -> None: ...


class Runtime:
    """Everything this process holds; see the module docstring."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.settings: Settings | None = None
        self.store: _mpdir.ProcessStore | None = None
        self.registry: CollectorRegistry | None = None
        self.counters: dict[str, Any] = {}
        # Cleared by reset(), never replaced: the C request (_wsgi_request) holds it.
        self.singletons: dict[str, Any] = {}
        self.readers: dict[str, _mpdir.DirectoryReader] = {}
        self.compactor: Stoppable | None = None
        self.server: Stoppable | None = None
        self.master_pid: int | None = None
        self.master_lock_fd: int | None = None
        self.aborting = False  # Gunicorn is killing this worker for its timeout
        self.info_keys: dict[tuple[str, tuple[tuple[str, str], ...]], set[str]] = {}
        self.gc_at_fork: list[dict[str, Any]] = []  # the parent's gc counts, not ours


RUNTIME = Runtime()


def configure(settings: Settings | None = None, **overrides: Any) -> Settings:
    """Adopt ``settings`` (default: read from the environment) and activate them.

    In multiprocess mode the directory is created or validated and prometheus_client's
    value class is replaced by ours. Calling it again replaces the settings; metrics that
    already exist keep the storage they were created with.
    """
    rt = RUNTIME
    with rt.lock:
        new = settings if settings is not None else load_settings(**overrides)
        if settings is not None and overrides:
            new = load_settings({}, **{**settings.__dict__, **overrides})
        if new.multiprocess:
            assert new.multiproc_dir is not None
            _prepare_directory(new.multiproc_dir)
            _install_store(rt, new.multiproc_dir)
        else:
            _compat.set_value_class(None)
            _compat.restore_patches()
            if not new.enabled:
                _close_store(rt)
        rt.settings = new
        return new


def _prepare_directory(path: str) -> None:
    """Create or validate the directory: refuse an unsafe one, tolerate an unusable one.

    An unusable directory (cannot be created or written) must not stop the service: the
    store keeps values in memory, logs, and retries.
    """
    try:
        _mpdir.ensure_directory(path)
    except UnsafeDirectoryError:
        raise
    except DirectoryError as err:
        log.error("victor_mp_metrics: %s", err)


def _install_store(rt: Runtime, directory: str) -> None:
    store = rt.store
    if store is None or store.directory != directory:
        _close_store(rt)
        store = rt.store = _mpdir.ProcessStore(directory)
        store.value_class = _mpdir.make_value_class(store)  # type: ignore[attr-defined]
        store.on_write_errors = _count_write_errors
        _mpdir.bind_lock(store)
        _compat.set_value_class(store.value_class)  # type: ignore[attr-defined]
        _compat.install_multiprocess_patches(_SINK)
        store.samplers.append(_process_sampler(local_registry()))
    _compat.set_value_class(store.value_class)  # type: ignore[attr-defined]


def _process_sampler(registry: CollectorRegistry) -> Callable[[], None]:
    """The watchdog's process-metrics sampler: the metrics are made on its first round, so
    a process that records nothing writes nothing."""
    made: list[ProcessMetrics] = []

    def sample() -> None:
        if made:
            made[0].sample()
        else:
            made.append(ProcessMetrics(registry, lambda: RUNTIME.gc_at_fork))

    return sample


class _Sink:
    """Where prometheus_client's Info, Enum, set_function, remove() and clear() report in
    multiprocess mode (``_compat.install_multiprocess_patches``): into this process's
    files, through the store."""

    def record_info(self, name: str, labels: dict[str, str], help_text: str,
                    info: dict[str, str]) -> None:
        store, now = RUNTIME.store, time.time()
        if store is None:
            return
        key = _mpdir.encode_key(name, name + "_info",
                                {**labels, "__info__": json.dumps(info, sort_keys=True)},
                                help_text)
        written = RUNTIME.info_keys.setdefault((name, tuple(sorted(labels.items()))), set())
        for old in written - {key}:
            store.set_entry("gauge_info", old, 0.0, now)  # superseded in this process
        written.add(key)
        store.set_entry("gauge_info", key, 1.0, now)

    def record_state(self, name: str, labels: dict[str, str], help_text: str,
                     states: list[str], index: int) -> None:
        store, now = RUNTIME.store, time.time()
        if store is None:
            return
        for i, state in enumerate(states):  # all states at one stamp: one consistent set
            key = _mpdir.encode_key(name, name, {**labels, name: state}, help_text)
            store.set_entry("gauge_stateset", key, 1.0 if i == index else 0.0, now)

    def sample_function(self, value: Any, f: Callable[[], float]) -> None:
        store = RUNTIME.store
        if store is None:
            return

        def sample() -> None:
            value.set(float(f()))

        sample()
        store.samplers.append(sample)

    def removed(self, name: str, labels: dict[str, str] | None) -> None:
        store = RUNTIME.store
        if store is None:
            return
        _mpdir.add_tombstone(store.directory, name, labels)
        store.apply_tombstones()


_SINK = _Sink()


def _close_store(rt: Runtime) -> None:
    store, rt.store = rt.store, None
    if store is not None:
        store.close()


def _count_write_errors(count: int) -> None:
    self_counter("write_errors").inc(count)


def get_settings() -> Settings:
    """The active settings, configured from the environment on first use."""
    settings = RUNTIME.settings
    if settings is None:
        return configure()
    return settings


def is_configured() -> bool:
    """True once :func:`configure` has run (explicitly or on first use)."""
    return RUNTIME.settings is not None


def local_registry() -> CollectorRegistry:
    """This process's registry of our metrics (exposed as is in single-process mode)."""
    rt = RUNTIME
    with rt.lock:
        if rt.registry is None:
            rt.registry = CollectorRegistry(auto_describe=True)
        return rt.registry


def singleton(name: str, factory: Callable[[], _T]) -> _T:
    """The process's one ``name`` object, made by ``factory`` on first use (thread-safe)."""
    found = RUNTIME.singletons.get(name)
    if found is None:
        with RUNTIME.lock:
            found = RUNTIME.singletons.get(name)
            if found is None:
                get_settings()
                found = RUNTIME.singletons[name] = factory()
    return found


def reader(directory: str) -> _mpdir.DirectoryReader:
    """This process's cached reader of ``directory`` (its caches live across scrapes)."""
    rt = RUNTIME
    found = rt.readers.get(directory)
    if found is None:
        with rt.lock:
            found = rt.readers.setdefault(directory, _mpdir.DirectoryReader(directory))
    return found


def self_counter(name: str) -> Any:
    """The self-metric counter ``name`` (a key of ``_selfmetrics.COUNTERS``)."""
    found = RUNTIME.counters.get(name)
    if found is not None:
        return found
    with RUNTIME.lock:
        found = RUNTIME.counters.get(name)
        if found is None:
            metric_name, doc, labels = COUNTERS[name]
            get_settings()
            found = RUNTIME.counters[name] = Counter(
                metric_name, doc, labels, registry=local_registry()
            )
        return found


def create_self_counters() -> None:
    """Create every unlabelled self-metric now, so each starts at 0 (rate() sees the first)."""
    for name, (_metric, _doc, labels) in COUNTERS.items():
        if not labels:
            self_counter(name)


def own_idents() -> frozenset[str]:
    """The writer ident of this process (never absorbed by its own compactions)."""
    store = RUNTIME.store
    return frozenset({store.ident}) if store is not None and store.ident else frozenset()


def stop_threads() -> None:
    """Stop the master's compactor and metrics server, if running, and forget them."""
    rt = RUNTIME
    for attr in ("compactor", "server"):
        running = getattr(rt, attr)
        setattr(rt, attr, None)
        if running is not None:
            running.stop()


def reset() -> None:
    """Forget settings, metrics, threads and open files: back to the state after import."""
    rt = RUNTIME
    with rt.lock:
        stop_threads()
        _close_store(rt)
        _compat.set_value_class(None)
        _compat.restore_patches()
        rt.info_keys.clear()
        rt.settings = None
        rt.registry = None
        rt.counters.clear()
        rt.singletons.clear()
        rt.readers.clear()
        rt.master_pid = None
        rt.aborting = False
        if rt.master_lock_fd is not None:
            os.close(rt.master_lock_fd)
            rt.master_lock_fd = None


def _after_fork_in_child() -> None:
    # The only after-fork handler of the package. Locks another thread of the parent may
    # have held are made anew; threads did not survive the fork, so their handles go.
    rt = RUNTIME
    rt.gc_at_fork = gc.get_stats()
    rt.lock = threading.RLock()
    rt.readers = {d: r for d, r in rt.readers.items() if r.after_fork()}
    if rt.master_lock_fd is not None:
        os.close(rt.master_lock_fd)  # our copy only: the master keeps its lock
        rt.master_lock_fd = None
    for running in (rt.compactor, rt.server):
        if running is not None:
            running.abandon()
    rt.compactor = None
    rt.server = None
    rt.singletons.pop("system_sampler", None)
    _mpdir.after_fork_in_child()
    if rt.store is not None:
        rt.store.after_fork()
        _mpdir.bind_lock(rt.store)


os.register_at_fork(after_in_child=_after_fork_in_child)
