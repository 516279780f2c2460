"""Settings: one declarative table in two sections, read from the environment.

* **library** settings (``VICTOR_METRICS_*``, ``PROMETHEUS_MULTIPROC_DIR``) are read by
  the library into :class:`Settings` (:func:`load_settings`) in every process using it;
* **deployment** settings (``VICTOR_BIND``, ``VICTOR_WORKERS``, ...) are read only by
  ``gunicorn.conf.py`` into :class:`DeploymentSettings` (:func:`load_deployment_settings`).

A bad value of one section never breaks the other. Nothing is read at import time. The
README's configuration table is generated from :data:`SETTINGS` by
:func:`settings_table_markdown`, and a test keeps the two in step.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, TypeVar

from .exceptions import ConfigurationError

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"one of {', '.join(_TRUE + _FALSE)}")


def _int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        accepted = f"a whole number from {low} to {high}" if high else f"a whole number >= {low}"
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(accepted) from None
        if value < low or (high is not None and value > high):
            raise ValueError(accepted)
        return value

    parse.__doc__ = f"integer {low}..{high}" if high else f"integer >= {low}"
    return parse


def _non_negative_float(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError("a number of seconds >= 0 (for example 30 or 0.5)") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError("a number of seconds >= 0 (for example 30 or 0.5)")
    return value


def _positive_float(raw: str) -> float:
    value = _non_negative_float(raw)
    if value == 0:
        raise ValueError("a number of seconds > 0 (for example 30 or 0.5)")
    return value


def _path(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("a directory path (leave the variable unset for the default)")
    if "\x00" in value:
        raise ValueError("a directory path without NUL bytes")
    return os.path.abspath(value)


def _host(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("an IP address or host name such as 127.0.0.1 or 0.0.0.0")
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not all(part.isalnum() or "-" in part for part in value.split(".")):
            raise ValueError("an IP address or host name such as 127.0.0.1 or 0.0.0.0") from None
    return value


def _bind(raw: str) -> str:
    value = raw.strip()
    if value.startswith("unix:"):
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError("HOST:PORT such as 127.0.0.1:8000, or unix:/path/to/socket")
    _int_range(1, 65535)(port)
    return value


_WORKER_CLASSES = ("sync", "gthread", "gevent", "eventlet", "uvicorn_worker.UvicornWorker")


def _worker_class(raw: str) -> str:
    value = raw.strip()
    if value not in _WORKER_CLASSES:
        raise ValueError(", ".join(_WORKER_CLASSES[:-1]) + " or " + _WORKER_CLASSES[-1])
    return value


def _secret(raw: str) -> str:
    if not raw or raw != raw.strip():
        raise ValueError("a non-empty value without surrounding white space")
    return raw


def _readable_file(raw: str) -> str:
    path = os.path.abspath(raw.strip())
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ValueError("the path of an existing file this process can read")
    return path


def _basic_auth(raw: str) -> str:
    user, sep, password = raw.partition(":")
    if not sep or not user or not password:
        raise ValueError("USER:PASSWORD with both parts non-empty")
    return raw


@dataclass(frozen=True)
class Setting:
    """One row of the settings table."""

    name: str
    env: str
    parse: Callable[[str], Any]
    default: Any
    accepted: str
    doc: str
    secret: bool = False
    section: Literal["library", "deployment"] = "library"


SETTINGS: tuple[Setting, ...] = (
    Setting("enabled", "VICTOR_METRICS_ENABLED", _parse_bool, True,
            "true/false/1/0/yes/no/on/off",
            "Record metrics. When false every API is a cheap no-op and no files are written."),
    Setting("port", "VICTOR_METRICS_PORT", _int_range(1, 65535), None, "1-65535",
            "If set, the Gunicorn master serves the aggregated /metrics on this port."),
    Setting("addr", "VICTOR_METRICS_ADDR", _host, "127.0.0.1", "IP address or host name",
            "Bind address of the standalone metrics server. Loopback by default, so nothing "
            "is exposed unasked; set 0.0.0.0 for a Prometheus on another host, with "
            "VICTOR_METRICS_WEB_CONFIG (TLS, basic auth) when the network is not trusted."),
    Setting("multiproc_dir", "PROMETHEUS_MULTIPROC_DIR", _path, None, "directory path",
            "Shared directory of the per-process metric files. Unset: single-process mode, "
            "except under gunicorn.conf.py, which picks a private default."),
    Setting("auth_token", "VICTOR_METRICS_AUTH_TOKEN", _secret, None, "non-empty string",
            "If set, /metrics requires `Authorization: Bearer <token>`. Prefer "
            "VICTOR_METRICS_AUTH_TOKEN_FILE: the environment leaks to child processes.",
            secret=True),
    Setting("auth_token_file", "VICTOR_METRICS_AUTH_TOKEN_FILE", _readable_file, None,
            "path to a file", "Read the bearer token from this file (its first line); "
            "wins over VICTOR_METRICS_AUTH_TOKEN."),
    Setting("web_config", "VICTOR_METRICS_WEB_CONFIG", _readable_file, None, "path to a file",
            "Prometheus exporter-toolkit web config (`tls_server_config`, "
            "`basic_auth_users` with bcrypt hashes, `http_server_config.headers`) for the "
            "master's port and `victor-metrics serve`; re-read on SIGHUP."),
    Setting("basic_auth", "VICTOR_METRICS_BASIC_AUTH", _basic_auth, None, "USER:PASSWORD",
            "If set, /metrics requires HTTP basic auth with these credentials.", secret=True),
    Setting("max_series", "VICTOR_METRICS_MAX_SERIES", _int_range(1, 1_000_000), 1000,
            "1-1000000",
            "Cardinality guard: label sets per metric beyond this fold into one overflow series."),
    Setting("sweep_interval", "VICTOR_METRICS_SWEEP_INTERVAL", _non_negative_float, 60.0,
            "seconds >= 0",
            "How often the Gunicorn master sweeps for orphaned files of dead processes "
            "(0 disables the periodic sweep; start-up and worker exits still compact)."),
    Setting("bind", "VICTOR_BIND", _bind, "127.0.0.1:8000", "HOST:PORT or unix:PATH",
            "Address the app listens on (`-b` overrides).", section="deployment"),
    Setting("workers", "VICTOR_WORKERS", _int_range(1, 1024), 4, "1-1024",
            "Number of worker processes (`-w` overrides).", section="deployment"),
    Setting("worker_class", "VICTOR_WORKER_CLASS", _worker_class, "sync",
            "sync, gthread, gevent, eventlet or uvicorn_worker.UvicornWorker",
            "Gunicorn worker class. gevent, eventlet and uvicorn_worker.UvicornWorker (for "
            "ASGI apps) need the extras `[gevent]`, `[eventlet]` (it pins Gunicorn < 26: "
            "26.0 removed that worker) and `[asgi]`.", section="deployment"),
    Setting("threads", "VICTOR_THREADS", _int_range(1, 256), 1, "1-256",
            "Threads per worker (gthread).", section="deployment"),
    Setting("timeout", "VICTOR_TIMEOUT", _int_range(1, 3600), 30, "1-3600",
            "Seconds before a silent worker is killed and restarted.", section="deployment"),
    Setting("max_requests", "VICTOR_MAX_REQUESTS", _int_range(0), 10000, "integer >= 0",
            "Recycle a worker after this many requests (0 disables).", section="deployment"),
    Setting("max_requests_jitter", "VICTOR_MAX_REQUESTS_JITTER", _int_range(0), 1000,
            "integer >= 0", "Random jitter added to max_requests.", section="deployment"),
)


@dataclass(frozen=True)
class Settings:
    """The library section, parsed. Build with :func:`load_settings`; fields follow the
    library rows of :data:`SETTINGS`."""

    enabled: bool = True
    port: int | None = None
    addr: str = "127.0.0.1"
    multiproc_dir: str | None = None
    auth_token: str | None = field(default=None, repr=False)
    auth_token_file: str | None = None
    web_config: str | None = None
    basic_auth: str | None = field(default=None, repr=False)
    max_series: int = 1000
    sweep_interval: float = 60.0

    @property
    def multiprocess(self) -> bool:
        """True when metrics are recorded to files in a shared directory."""
        return self.enabled and self.multiproc_dir is not None


@dataclass(frozen=True)
class DeploymentSettings:
    """The deployment section, read only by ``gunicorn.conf.py``."""

    bind: str = "127.0.0.1:8000"
    workers: int = 4
    worker_class: str = "sync"
    threads: int = 1
    timeout: int = 30
    max_requests: int = 10000
    max_requests_jitter: int = 1000


_T = TypeVar("_T", Settings, DeploymentSettings)


def _load(
    cls: type[_T], section: str, environ: Mapping[str, str] | None, overrides: dict[str, Any]
) -> _T:
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.section != section:
            continue
        raw = env.get(setting.env)
        if raw is None or raw == "":
            values[setting.name] = setting.default
            continue
        try:
            values[setting.name] = setting.parse(raw)
        except ValueError as err:
            shown = "<hidden>" if setting.secret else repr(raw)
            raise ConfigurationError(
                f"{setting.env}={shown} is not valid: expected {err}. "
                f"Fix or unset {setting.env} ({setting.doc})"
            ) from None
    known = {f.name for f in fields(cls)}
    unknown = set(overrides) - known
    if unknown:
        raise ConfigurationError(
            f"unknown setting(s) {sorted(unknown)}; known settings: {sorted(known)}"
        )
    values.update(overrides)
    return cls(**values)


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Read the library's settings from ``environ`` (default ``os.environ``); ``overrides``
    win. Deployment variables are not read. A token file's token becomes ``auth_token``.

    Raises :class:`ConfigurationError` naming the variable, the value and what is accepted.
    An empty variable counts as unset.
    """
    settings = _load(Settings, "library", environ, overrides)
    if settings.auth_token_file is not None:
        try:
            with open(settings.auth_token_file, encoding="utf-8") as f:
                token = f.readline().strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigurationError(
                f"VICTOR_METRICS_AUTH_TOKEN_FILE={settings.auth_token_file!r} cannot be read "
                f"({err}). Fix the file or unset the variable."
            ) from None
        if not token:
            raise ConfigurationError(
                f"VICTOR_METRICS_AUTH_TOKEN_FILE={settings.auth_token_file!r} is empty: put "
                "the token on its first line."
            )
        settings = replace(settings, auth_token=token)
    return settings


def load_deployment_settings(environ: Mapping[str, str] | None = None) -> DeploymentSettings:
    """Read the deployment section (for ``gunicorn.conf.py``); errors as :func:`load_settings`."""
    return _load(DeploymentSettings, "deployment", environ, {})


def settings_table_markdown() -> str:
    """The README's configuration tables, generated from :data:`SETTINGS`, one a section."""
    rows: list[str] = []
    for section, title in (("library", "Library (read by every process using the package)"),
                           ("deployment", "Deployment (read only by `gunicorn.conf.py`)")):
        if rows:
            rows.append("")
        rows += [f"**{title}**", "", "| Variable | Accepted values | Default | Meaning |",
                 "|---|---|---|---|"]
        rows += [_row(s) for s in SETTINGS if s.section == section]
    return "\n".join(rows) + "\n"


def _row(s: Setting) -> str:
    default = "unset" if s.default is None else f"`{s.default}`"
    if isinstance(s.default, bool):
        default = f"`{str(s.default).lower()}`"
    return f"| `{s.env}` | {s.accepted} | {default} | {s.doc} |"
