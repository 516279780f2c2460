"""The standalone metrics server: ``start_metrics_server(port, addr)``.

Served by ``_httpserver``: one selector thread and a two-thread handler pool, at most 64
connections, header and idle timeouts, so idle or half-sent connections cost the master
neither threads nor its life. With ``VICTOR_METRICS_WEB_CONFIG`` (exporter-toolkit
format) it speaks TLS, checks client certificates and bcrypt basic auth; :meth:`reload`
re-reads that file (the Gunicorn master does on SIGHUP, ``victor-metrics serve`` too).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from . import _httpserver, _runtime
from ._exposition import render
from ._webconfig import WebConfig, load_web_config

log = logging.getLogger("victor_mp_metrics")
DEFAULT_PORT = 9090


def _handle(
    method: str, path: str, query: dict[str, list[str]], headers: dict[str, str]
) -> tuple[str, list[tuple[str, str]], bytes]:
    if path not in ("/metrics", "/"):
        return "404 Not Found", [("Content-Type", "text/plain")], b"Not found: use /metrics\n"
    try:
        return render(headers, query)
    except Exception as err:  # a scrape must never kill the server
        log.exception("victor_mp_metrics: metrics scrape failed")
        return ("500 Internal Server Error", [("Content-Type", "text/plain")],
                f"metrics scrape failed: {err}\n".encode())


@dataclass
class MetricsServer:
    """A running standalone metrics server; :meth:`stop` shuts it down."""

    handle: _httpserver.ServerHandle
    web_config: str | None = None

    @property
    def port(self) -> int:
        return self.handle.port

    @property
    def addr(self) -> str:
        return self.handle.addr

    @property
    def handle_tls(self) -> bool:
        """Whether connections are served over TLS."""
        return self.handle.tls_enabled

    def reload(self) -> None:
        """Re-read the web config and use its certificates for new connections."""
        if self.web_config is None:
            return
        context = load_web_config(self.web_config).ssl_context()
        if context is not None:
            self.handle.reload_ssl(context)
            log.info("victor_mp_metrics: reloaded TLS settings from %s", self.web_config)

    def abandon(self) -> None:
        """In a forked child: close the inherited sockets (the parent serves)."""
        self.handle.close_after_fork()

    def stop(self) -> None:
        """Stop serving and close every socket."""
        self.handle.stop()


def start_metrics_server(
    port: int | None = None, addr: str | None = None, web_config: str | None = None
) -> MetricsServer:
    """Serve the aggregated ``/metrics`` on ``addr:port`` in a daemon thread.

    Defaults come from ``VICTOR_METRICS_PORT``, ``VICTOR_METRICS_ADDR`` and
    ``VICTOR_METRICS_WEB_CONFIG``. Port 0 picks a free port (see ``.port``). Raises
    ``OSError`` when it cannot listen and ``WebConfigError`` (a ValueError) for a bad web
    config.
    """
    settings = _runtime.get_settings()
    if port is None:
        port = settings.port if settings.port is not None else DEFAULT_PORT
    web_config = web_config if web_config is not None else settings.web_config
    options = load_web_config(web_config).server_options() if web_config else {}
    handle = _httpserver.serve(
        _handle, addr if addr is not None else settings.addr, port, **options
    )
    return MetricsServer(handle, web_config)


__all__ = ["MetricsServer", "WebConfig", "start_metrics_server"]
