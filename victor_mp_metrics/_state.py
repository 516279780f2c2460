"""The package's global state, confessed in one place.

``configure()`` reads the settings (from the environment unless given) and, in
multiprocess mode, installs our file-backed value class into prometheus_client so every
metric created afterwards - ours or the user's own ``prometheus_client`` metrics - writes
per-process files, whatever the order in which modules were imported. ``reset()`` undoes
it all (tests use it through an autouse fixture).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client import values as _pc_values

from .settings import Settings, load_settings

_lock = threading.RLock()
_settings: Settings | None = None
_registry: CollectorRegistry | None = None
_original_value_class = _pc_values.ValueClass
_reset_callbacks: list[Callable[[], None]] = []


def configure(settings: Settings | None = None, **overrides: Any) -> Settings:
    """Adopt ``settings`` (default: read from the environment) and activate them.

    In multiprocess mode the directory is created or validated and prometheus_client's
    value class is replaced by ours. Calling it again replaces the settings; metrics that
    already exist keep the storage they were created with.
    """
    global _settings
    with _lock:
        new = settings if settings is not None else load_settings(**overrides)
        if settings is not None and overrides:
            new = load_settings({}, **{**settings.__dict__, **overrides})
        if new.multiprocess:
            from ._values import install_value_class

            _prepare_directory(new.multiproc_dir)  # type: ignore[arg-type]
            install_value_class(new.multiproc_dir)  # type: ignore[arg-type]
        else:
            _pc_values.ValueClass = _original_value_class
            if not new.enabled:
                from ._values import uninstall_value_class

                uninstall_value_class()
        _settings = new
        return new


def _prepare_directory(path: str) -> None:
    """Create or validate the directory: refuse an unsafe one, tolerate an unusable one.

    An unusable directory (cannot be created or written) must not stop the service: the
    value class keeps values in memory, logs, and retries (see ``_values``).
    """
    from .directory import ensure_directory
    from .exceptions import DirectoryError, UnsafeDirectoryError

    try:
        ensure_directory(path)
    except UnsafeDirectoryError:
        raise
    except DirectoryError as err:
        logging.getLogger("victor_mp_metrics").error("victor_mp_metrics: %s", err)


def get_settings() -> Settings:
    """The active settings, configured from the environment on first use."""
    settings = _settings
    if settings is None:
        return configure()
    return settings


def is_configured() -> bool:
    """True once :func:`configure` has run (explicitly or on first use)."""
    return _settings is not None


def local_registry() -> CollectorRegistry:
    """This process's registry of our metrics (used for exposition in single-process mode)."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = CollectorRegistry(auto_describe=True)
        return _registry


def on_reset(callback: Callable[[], None]) -> Callable[[], None]:
    """Register ``callback`` to drop a module's cached state in :func:`reset`."""
    _reset_callbacks.append(callback)
    return callback


def reset() -> None:
    """Forget settings, metrics and open files: back to the state after import."""
    global _settings, _registry
    with _lock:
        for callback in _reset_callbacks:
            callback()
        from ._values import uninstall_value_class

        uninstall_value_class()
        _pc_values.ValueClass = _original_value_class
        _settings = None
        _registry = None
