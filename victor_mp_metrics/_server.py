"""The standalone metrics server: ``start_metrics_server(port, addr)``."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from . import _runtime
from ._exposition import render


class _Handler(BaseHTTPRequestHandler):
    server_version = "victor-metrics"

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path not in ("/metrics", "/"):
            body = b"Not found: use /metrics\n"
            self._send("404 Not Found", [("Content-Type", "text/plain")], body)
            return
        try:
            status, headers, body = render(dict(self.headers.items()), parse_qs(url.query))
        except Exception as err:  # a scrape must never kill the server
            self.log_error("metrics scrape failed: %r", err)
            status, headers, body = (
                "500 Internal Server Error", [("Content-Type", "text/plain")],
                f"metrics scrape failed: {err}\n".encode(),
            )
        self._send(status, headers, body)

    do_HEAD = do_GET

    def _send(self, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
        code, _, reason = status.partition(" ")
        self.send_response(int(code), reason)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return  # scrapes every few seconds would flood the log


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


@dataclass
class MetricsServer:
    """A running standalone metrics server; :meth:`stop` shuts it down."""

    httpd: ThreadingHTTPServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def addr(self) -> str:
        return str(self.httpd.server_address[0])

    def abandon(self) -> None:
        """In a forked child: close the inherited listening socket (the parent serves)."""
        self.httpd.socket.close()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def start_metrics_server(port: int | None = None, addr: str | None = None) -> MetricsServer:
    """Serve the aggregated ``/metrics`` on ``addr:port`` in a daemon thread.

    Defaults come from ``VICTOR_METRICS_PORT`` and ``VICTOR_METRICS_ADDR``. Port 0 picks a
    free port (see ``.port``). Each scrape builds a fresh registry over the whole directory.
    """
    settings = _runtime.get_settings()
    if port is None:
        port = settings.port if settings.port is not None else 9090
    httpd = _Server((addr if addr is not None else settings.addr, port), _Handler)
    thread = threading.Thread(
        target=httpd.serve_forever, name="victor-metrics-server", daemon=True
    )
    thread.start()
    return MetricsServer(httpd, thread)
