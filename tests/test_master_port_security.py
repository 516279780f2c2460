"""Issue 13 on real Gunicorn masters: the metrics port under idle connections, mutual TLS
with basic auth from a web config, and doctor --url never leaking credentials."""

from __future__ import annotations

import http.server
import os
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest

from victor_mp_metrics.cli import main

from ._gunicorn import free_port, gunicorn, request
from .test_webconfig import (
    PASSWORD,
    USER,
    basic,
    client_context,
    https_get,
    mtls_config,
    pki,
    refused,
    write_config,
)

__all__ = ["pki"]  # the fixture, imported for its use here
pytestmark = pytest.mark.gunicorn


def test_idle_connections_cost_the_master_neither_threads_nor_its_life(tmp_path: Path):
    """300 half-sent connections to the master's port: its scrape still answers, its threads
    stay bounded, and the idle sockets are closed within seconds."""
    port = free_port()
    env = {"VICTOR_METRICS_PORT": str(port), "VICTOR_METRICS_ADDR": "127.0.0.1"}
    with gunicorn(tmp_path, workers=2, env=env) as server:
        master = psutil.Process(server.proc.pid)
        threads_before = master.num_threads()
        idle = []
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            idle.append(sock)
        try:
            started = time.monotonic()
            assert 200 == request(f"http://127.0.0.1:{port}/metrics", timeout=10).status
            assert time.monotonic() - started < 5.0
            assert master.num_threads() < threads_before + 10  # not one per connection
            assert len(master.net_connections()) < 100
            deadline = time.monotonic() + 30.0
            closed = 0
            for sock in idle:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                try:  # an answer (a 503 for a connection over the cap) may come before EOF
                    while sock.recv(4096):
                        pass
                    closed += 1
                except ConnectionResetError:
                    closed += 1
                except TimeoutError:
                    pass  # still open: counted as not closed
            assert 300 == closed
            # header timeout 5 s; the bound leaves room for a loaded 2-core CI machine
            assert time.monotonic() - started < 30.0
            assert 200 == server.get("/healthz").status
        finally:
            for sock in idle:
                sock.close()


def test_master_port_requires_client_certificates_and_a_bcrypt_user(tmp_path: Path, pki):
    """VICTOR_METRICS_WEB_CONFIG on the master's port: plain HTTP and certificate-less
    clients are refused, a wrong password gets 401, the right client gets 200."""
    config = write_config(tmp_path, mtls_config(pki))
    os.chmod(config, 0o600)
    port = free_port()
    env = {"VICTOR_METRICS_PORT": str(port), "VICTOR_METRICS_ADDR": "127.0.0.1",
           "VICTOR_METRICS_WEB_CONFIG": str(config)}
    with gunicorn(tmp_path, workers=1, env=env) as server:
        assert refused(lambda: request(f"http://127.0.0.1:{port}/metrics", timeout=5))
        assert refused(lambda: https_get(port, client_context(pki.ca)))
        good = client_context(pki.ca, pki.client_cert, pki.client_key)
        assert 401 == https_get(port, good, basic(USER, "wrong"))[0]
        status, _headers, body = https_get(port, good, basic(USER, PASSWORD))
        assert 200 == status and b"victor_requests_total" in body
        assert 200 == server.get("/healthz").status


def test_doctor_url_never_sends_credentials_to_another_origin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """A /metrics URL that redirects to another port gets the token; the other port not."""
    seen: dict[int, str | None] = {}

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            port = self.server.server_address[1]
            seen[port] = self.headers.get("Authorization")
            if port == first.server_address[1]:
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{second.server_address[1]}/m")
                self.end_headers()
                return
            body = b"victor_requests_total 1\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    first = http.server.HTTPServer(("127.0.0.1", 0), Recorder)
    second = http.server.HTTPServer(("127.0.0.1", 0), Recorder)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (first, second)]
    for thread in threads:
        thread.start()
    try:
        directory = tmp_path / "m"
        directory.mkdir(mode=0o700)
        main(["doctor", "--dir", str(directory), "--url",
              f"http://127.0.0.1:{first.server_address[1]}/metrics", "--token", "s3cret"])
    finally:
        for s in (first, second):
            s.shutdown()
            s.server_close()
    assert "Bearer s3cret" == seen[first.server_address[1]]
    assert seen[second.server_address[1]] is None
    assert "answered 200" in capsys.readouterr().out
