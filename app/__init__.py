"""Victor AI, the reference service: a Flask API whose real code paths feed every metric.

Run it with ``gunicorn -c gunicorn.conf.py app:app``, or build one with
:func:`create_app` (tests do). ``app.app`` is created on first access, not at import, so
importing :func:`create_app` reads no environment and records nothing.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flask import Flask

from victor_mp_metrics.flask_ext import VictorMetrics

from .coordinator import ToolCoordinator, ToolSelectionCache
from .llm import SimulatedLLM
from .routes import EXTENSION_KEY, VictorAI, bp

__all__ = ["app", "create_app"]

DEFAULT_SANDBOX = str(Path(__file__).resolve().parent / "sandbox")
MAX_BODY_BYTES = 1024 * 1024
MAX_BODY_ENV = "VICTOR_MAX_BODY_BYTES"


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """A new Victor AI app. ``config`` entries win over the environment.

    Keys read from ``config``, else from the environment variable of the same name:

    - ``VICTOR_APP_LLM_LATENCY_MS`` (``5``): simulated latency of each LLM call, ms >= 0.
    - ``VICTOR_APP_SANDBOX`` (the bundled ``app/sandbox``): the directory the
      ``read_file`` tool may read.
    - ``VICTOR_APP_TOOL_CACHE_ENTRIES`` (``256``): capacity of the tool-selection cache.

    The request body limit is ``config["MAX_CONTENT_LENGTH"]``, else the environment
    variable ``VICTOR_MAX_BODY_BYTES``, else 1 MiB: a whole number of bytes >= 1. A larger
    body answers 413 (JSON) before it is read past the limit, chunked bodies included
    (Werkzeug enforces it on the ``wsgi.input_terminated`` stream Gunicorn provides).

    Metrics settings (``VICTOR_METRICS_*``) are read by victor_mp_metrics itself. Raises
    :class:`ValueError` on a bad value.
    """
    app = Flask(__name__)
    app.config.from_mapping(config or {})
    # Flask's defaults already hold MAX_CONTENT_LENGTH=None, so setdefault() would not set it.
    _setting(app, "MAX_CONTENT_LENGTH", _body_bytes, str(MAX_BODY_BYTES), env=MAX_BODY_ENV)
    latency_ms = _setting(app, "VICTOR_APP_LLM_LATENCY_MS", _milliseconds, "5")
    sandbox = _setting(app, "VICTOR_APP_SANDBOX", _directory, DEFAULT_SANDBOX)
    entries = _setting(app, "VICTOR_APP_TOOL_CACHE_ENTRIES", _positive_int, "256")

    VictorMetrics(app)
    app.extensions[EXTENSION_KEY] = VictorAI(
        llm=SimulatedLLM(latency_ms),
        coordinator=ToolCoordinator(ToolSelectionCache(entries), sandbox),
    )
    app.register_blueprint(bp)
    return app


def _setting(
    app: Flask, key: str, parse: Callable[[str], Any], default: str, env: str | None = None
) -> Any:
    """Parse ``key`` from the config, else the environment variable ``env`` (``key`` when
    None; empty = unset), else ``default``; store the parsed value in the config."""
    env = key if env is None else env
    if app.config.get(key) is not None:
        raw, source = str(app.config[key]), f"config[{key!r}]"
    elif os.environ.get(env):
        raw, source = os.environ[env], f"the environment variable {env}"
    else:
        raw, source = default, f"the default of {key}"
    try:
        value = parse(raw)
    except ValueError as err:
        raise ValueError(f"{source} = {raw!r} is not valid: expected {err}.") from None
    app.config[key] = value
    return value


def _milliseconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 60_000:
        raise ValueError("a number of milliseconds from 0 to 60000, such as 5 or 0.5")
    return value


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError("a whole number >= 1, such as 256")
    return value


def _body_bytes(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"a whole number of bytes >= 1, such as {MAX_BODY_BYTES} (1 MiB)")
    return value


def _directory(raw: str) -> str:
    path = os.path.realpath(raw)
    if not os.path.isdir(path):
        raise ValueError(
            "an existing directory holding the files read_file may read "
            "(unset it for the bundled app/sandbox)"
        )
    return path


_app_lock = threading.Lock()


def __getattr__(name: str) -> Flask:
    # `gunicorn app:app` and `flask --app app` look the attribute up on the module (PEP 562).
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _app_lock:
        created = globals().get("app")
        if created is None:
            created = globals()["app"] = create_app()
        return created
