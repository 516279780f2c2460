"""The bounded selector HTTP server: HTTP semantics, bounds on threads, descriptors and time.

Everything runs on 127.0.0.1 with real sockets; every server is stopped and every client
socket closed by the fixtures, and every wait has a deadline.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import selectors
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from victor_mp_metrics._httpserver import ServerHandle, serve

MODULE = Path(__file__).resolve().parent.parent / "victor_mp_metrics" / "_httpserver.py"
BODY = b"# TYPE up gauge\nup 1\n"
HALF_REQUEST = b"GET /metrics HTTP/1.1\r\nHost: x\r\n"


def metrics_handler(
    method: str, path: str, query: dict[str, list[str]], headers: dict[str, str]
) -> tuple[str, list[tuple[str, str]], bytes]:
    """/metrics answers BODY (echoing the query and Accept in headers); the rest is 404."""
    if path != "/metrics":
        return "404 Not Found", [("Content-Type", "text/plain")], b"Not found: use /metrics\n"
    return "200 OK", [
        ("Content-Type", "text/plain; version=0.0.4"),
        ("X-Query", json.dumps(query, sort_keys=True)),
        ("X-Accept", headers.get("accept", "")),
        ("Content-Length", "999"),  # the server's own Content-Length wins
    ], BODY


class Servers:
    """Starts servers and client sockets for one test and closes all of them afterwards."""

    def __init__(self) -> None:
        self.handles: list[ServerHandle] = []
        self.socks: list[socket.socket] = []

    def start(self, handler: Callable[..., tuple[str, list[tuple[str, str]], bytes]]
              = metrics_handler, **options: object) -> ServerHandle:
        handle = serve(handler, "127.0.0.1", 0, **options)  # type: ignore[arg-type]
        self.handles.append(handle)
        return handle

    def connect(self, handle: ServerHandle, timeout: float = 5.0) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", handle.port), timeout=timeout)
        self.socks.append(sock)
        return sock

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        for handle in self.handles:
            handle.stop()


@pytest.fixture
def servers() -> Iterator[Servers]:
    """A Servers registry whose servers and sockets are closed after the test."""
    registry = Servers()
    try:
        yield registry
    finally:
        registry.close()


def read_response(
    sock: socket.socket, head_only: bool = False
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of one answer read from ``sock``.

    Reads exactly one answer (the head byte by byte), so a pipelined next one stays unread.
    """
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"closed before a full answer: {head!r}")
        head += chunk
    head, body = head[:-4], b""
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = 0 if head_only else int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(min(65536, length - len(body)))
        if not chunk:
            raise ConnectionError("closed in the body")
        body += chunk
    return int(status_line.split(" ")[1]), headers, body


def is_closed(sock: socket.socket, timeout: float) -> bool:
    """True if the peer closes ``sock`` (EOF or reset) within ``timeout`` s; data is skipped."""
    deadline = time.monotonic() + timeout
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        if time.monotonic() > deadline:
            return False


def fd_count() -> int:
    """Open descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


def get(handle: ServerHandle, path: str = "/metrics", method: str = "GET",
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh http.client connection."""
    conn = http.client.HTTPConnection("127.0.0.1", handle.port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_get_head_and_404_go_through_the_handler(servers: Servers) -> None:
    """GET answers the handler's body, HEAD the same headers without it, other paths 404."""
    handle = servers.start()
    status, headers, body = get(handle, "/metrics?name[]=up&x=1&x=2", headers={"Accept": "a/b"})
    assert (200, BODY) == (status, body)
    assert str(len(BODY)) == headers["content-length"]
    assert {"name[]": ["up"], "x": ["1", "2"]} == json.loads(headers["x-query"])
    assert "a/b" == headers["x-accept"]
    assert "date" in headers
    status, headers, body = get(handle, method="HEAD")
    assert (200, b"", str(len(BODY))) == (status, body, headers["content-length"])
    status, _, body = get(handle, "/nope")
    assert (404, b"Not found: use /metrics\n") == (status, body)
    assert handle.stats()["requests"] == 3


def test_keep_alive_pipelining_and_connection_close(servers: Servers) -> None:
    """Keep-alive serves several requests, pipelined ones in order; Connection: close closes."""
    handle = servers.start()
    sock = servers.connect(handle)
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert 200 == read_response(sock)[0]
    assert 404 == read_response(sock)[0]
    sock.sendall(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, headers, body = read_response(sock, head_only=True)
    assert (200, "close", b"") == (status, headers["connection"], body)
    assert is_closed(sock, 2.0)
    assert 1 == handle.stats()["accepted"]


def test_large_answer_to_a_slow_reader_arrives_whole(servers: Servers) -> None:
    """A body far above the socket buffers is sent in pieces as a slow client reads it."""
    body = os.urandom(8 * 1024 * 1024)
    handle = servers.start(lambda *_: ("200 OK", [], body))
    sock = servers.connect(handle)
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.3)  # the server meets full socket buffers (EAGAIN) meanwhile
    status, _, got = read_response(sock)
    assert (200, len(body)) == (status, len(got)) and body == got
    assert 0 == handle.stats()["errors"]


def test_http10_closes_unless_keep_alive(servers: Servers) -> None:
    """HTTP/1.0 closes after the answer unless it asks for keep-alive."""
    handle = servers.start()
    sock = servers.connect(handle)
    sock.sendall(b"GET /metrics HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert "keep-alive" == read_response(sock)[1]["connection"]
    sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
    assert "close" == read_response(sock)[1]["connection"]
    assert is_closed(sock, 2.0)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", 405),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\n folded: header\r\n\r\n", 400),
        (b"hello\r\n\r\n", 400),
        (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
    ],
)
def test_bad_requests_are_refused_and_closed(servers: Servers, raw: bytes, status: int) -> None:
    """Other methods get 405, bodies and malformed requests 400; the connection is closed."""
    handle = servers.start()
    sock = servers.connect(handle)
    sock.sendall(raw)
    got, headers, _ = read_response(sock)
    assert status == got
    assert "close" == headers["connection"]
    if status == 405:
        assert "GET, HEAD" == headers["allow"]
    assert is_closed(sock, 2.0)


def test_oversized_headers_get_431(servers: Servers) -> None:
    """Headers past max_header_bytes get 431 and a close, complete or not."""
    handle = servers.start(max_header_bytes=1024)
    for ending in (b"\r\n\r\n", b"\r\n"):  # complete, and a stream that never ends
        sock = servers.connect(handle)
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4000 + ending)
        status, headers, _ = read_response(sock)
        assert (431, "close") == (status, headers["connection"])
        assert is_closed(sock, 2.0)
    assert 200 == get(handle)[0]


def test_handler_errors_answer_500_and_the_server_survives(servers: Servers) -> None:
    """An exception or a malformed answer from the handler is a 500; later scrapes work."""
    calls = []

    def flaky(method: str, path: str, query: dict[str, list[str]],
              headers: dict[str, str]) -> tuple[str, list[tuple[str, str]], bytes]:
        calls.append(path)
        if path == "/boom":
            raise RuntimeError("aggregation failed")
        if path == "/bad-header":
            return "200 OK", [("X-Evil", "a\r\nInjected: yes")], b""
        return metrics_handler(method, path, query, headers)

    handle = servers.start(flaky)
    status, _, body = get(handle, "/boom")
    assert (500, b"metrics scrape failed: RuntimeError\n") == (status, body)
    status, headers, _ = get(handle, "/bad-header")
    assert 500 == status and "injected" not in headers
    assert 200 == get(handle)[0]
    assert 2 == handle.stats()["errors"]


def test_auth_refusal_answers_401_with_basic_challenge(servers: Servers) -> None:
    """auth(header) False gives 401 with WWW-Authenticate; True lets the handler answer."""
    seen: list[str | None] = []

    def auth(header: str | None) -> bool:
        seen.append(header)
        return header == "Basic dTpw"

    handle = servers.start(auth=auth, extra_headers=[("X-Content-Type-Options", "nosniff")])
    status, headers, _ = get(handle)
    assert 401 == status
    assert 'Basic realm="metrics"' == headers["www-authenticate"]
    assert "nosniff" == headers["x-content-type-options"]
    assert 200 == get(handle, headers={"Authorization": "Basic dTpw"})[0]
    assert [None, "Basic dTpw"] == seen


def test_idle_half_sent_connections_stay_bounded(servers: Servers) -> None:
    """300 never-finished requests: a scrape still gets 200 at once, threads and descriptors
    stay bounded, and the server closes every idle socket within header_timeout + 1 s."""
    threads_before = threading.active_count()
    handle = servers.start(max_connections=64, header_timeout=1.0)
    threads_running = threading.active_count()
    fds_running = fd_count()
    clients = []
    for _ in range(300):
        sock = servers.connect(handle)
        sock.sendall(HALF_REQUEST)
        clients.append(sock)
    flood_done = time.monotonic()
    started = time.monotonic()
    status, _, body = get(handle)
    scrape_seconds = time.monotonic() - started
    assert (200, BODY) == (status, body)
    server_fds = fd_count() - fds_running - len(clients)
    threads_during = threading.active_count()
    stats = handle.stats()
    assert stats["open"] <= 64
    assert server_fds <= 64 + 3, f"server holds {server_fds} descriptors"
    assert threads_during == threads_running <= threads_before + 3
    assert scrape_seconds < 0.5

    selector = selectors.DefaultSelector()
    for sock in clients:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    open_clients = set(clients)
    deadline = flood_done + 1.0 + 1.0
    while open_clients and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.05):
            client = key.fileobj
            assert isinstance(client, socket.socket)
            try:
                if client.recv(4096):
                    continue  # a 503 before the close is fine
            except (ConnectionResetError, BlockingIOError):
                pass
            selector.unregister(client)
            open_clients.discard(client)
    closed_after = time.monotonic() - flood_done
    selector.close()
    assert not open_clients, f"{len(open_clients)} idle sockets still open after {closed_after} s"
    final = handle.stats()
    print(f"\n300 idle: server fds {server_fds}, threads {threads_before}->{threads_during}, "
          f"scrape {scrape_seconds * 1000:.1f} ms, all closed after {closed_after:.2f} s, "
          f"stats {final}")
    assert final["evicted"] + final["rejected"] + final["timed_out"] >= 300


def test_new_scrape_evicts_the_oldest_idle_connection(servers: Servers) -> None:
    """At the cap, a new connection closes the oldest one that has no request in progress."""
    handle = servers.start(max_connections=4, header_timeout=30.0)
    idle = [servers.connect(handle) for _ in range(4)]
    for sock in idle:
        sock.sendall(HALF_REQUEST)
        time.sleep(0.02)  # a distinct age for each
    assert 200 == get(handle)[0]
    assert is_closed(idle[0], 2.0)
    assert not is_closed(idle[3], 0.2)
    assert 1 == handle.stats()["evicted"]


def test_connection_cap_rejects_when_all_are_busy(servers: Servers) -> None:
    """Past max_connections with every connection busy, a newcomer gets 503 and a close."""
    gate = threading.Event()

    def slow(*args: object) -> tuple[str, list[tuple[str, str]], bytes]:
        gate.wait(10)
        return "200 OK", [], b"ok"

    handle = servers.start(slow, max_connections=3, workers=1, max_queued=5)
    busy = [servers.connect(handle) for _ in range(3)]
    for sock in busy:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: handle.stats()["in_flight"] == 3)
    extra = servers.connect(handle)
    started = time.monotonic()
    try:
        status, headers, _ = read_response(extra)
        assert (503, "1") == (status, headers["retry-after"])
    except ConnectionError:
        pass  # closed before the 503 could be read: also a refusal
    assert is_closed(extra, 2.0)
    assert time.monotonic() - started < 1.0
    assert 1 == handle.stats()["rejected"]
    gate.set()
    for sock in busy:
        status, _, body = read_response(sock)
        assert (200, b"ok") == (status, body)


def test_full_worker_queue_answers_503_at_once(servers: Servers) -> None:
    """With a slow handler, requests past workers + max_queued get 503 with Retry-After."""
    gate = threading.Event()

    def slow(*args: object) -> tuple[str, list[tuple[str, str]], bytes]:
        gate.wait(10)
        return "200 OK", [], b"ok"

    handle = servers.start(slow, workers=1, max_queued=1)
    socks = [servers.connect(handle) for _ in range(5)]
    for sock in socks[:2]:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: handle.stats()["in_flight"] == 2)
    started = time.monotonic()
    for sock in socks[2:]:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = read_response(sock)
        assert (503, "1") == (status, headers["retry-after"])
    assert time.monotonic() - started < 1.0
    gate.set()
    assert [(200, b"ok")] * 2 == [(s, b) for s, _, b in map(read_response, socks[:2])]
    assert 3 == handle.stats()["busy"]


def test_idle_keep_alive_is_closed_after_idle_timeout(servers: Servers) -> None:
    """A keep-alive connection with no new request is closed after idle_timeout."""
    handle = servers.start(idle_timeout=0.5)
    sock = servers.connect(handle)
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert 200 == read_response(sock)[0]
    started = time.monotonic()
    assert is_closed(sock, 3.0)
    assert 0.4 < time.monotonic() - started < 1.6
    assert 1 == handle.stats()["timed_out"]


def test_stop_joins_closes_and_is_idempotent(servers: Servers) -> None:
    """stop() returns within its bound even with a handler stuck, and frees port and threads."""
    threads_before = threading.active_count()
    gate = threading.Event()

    def stuck(*args: object) -> tuple[str, list[tuple[str, str]], bytes]:
        gate.wait(10)
        return "200 OK", [], b""

    handle = servers.start(stuck)
    idle = servers.connect(handle)
    servers.connect(handle).sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: handle.stats()["in_flight"] == 1)
    started = time.monotonic()
    handle.stop(timeout=2.0)
    assert time.monotonic() - started < 2.5
    assert not handle.running
    assert is_closed(idle, 1.0)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", handle.port), timeout=2).close()
    gate.set()
    wait_for(lambda: threading.active_count() == threads_before)
    handle.stop()


def test_reload_ssl_needs_a_tls_server(servers: Servers) -> None:
    """reload_ssl on a plain-HTTP server is a ValueError, not a silent no-op."""
    import ssl

    handle = servers.start()
    with pytest.raises(ValueError, match="without TLS"):
        handle.reload_ssl(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_close_after_fork_releases_the_childs_copies(servers: Servers) -> None:
    """In a forked child, close_after_fork() closes the inherited listener and connections."""
    handle = servers.start()
    client = servers.connect(handle)
    client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert 200 == read_response(client)[0]
    wait_for(lambda: handle.stats()["open"] == 1)
    fds = [handle._listener.fileno(), *handle._conns]
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            handle.close_after_fork()
            code = 0
            for fd in fds:
                try:
                    os.fstat(fd)
                    code = 2
                except OSError as err:
                    code = code if err.errno == errno.EBADF else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert 0 == os.waitstatus_to_exitcode(status)
    assert 200 == get(handle)[0]


def test_out_of_descriptors_on_accept_never_kills_the_server(tmp_path: Path) -> None:
    """With RLIMIT_NOFILE of 40 and a cap above it, EMFILE on accept evicts or pauses: a
    scrape still answers 200 and the server keeps running."""
    script = textwrap.dedent(f"""
        import importlib.util, json, resource, sys
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
        spec = importlib.util.spec_from_file_location("httpserver", {str(MODULE)!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        def handler(method, path, query, headers):
            return "200 OK", [], b"ok"
        handle = mod.serve(handler, "127.0.0.1", 0, max_connections=500, header_timeout=20.0)
        print(handle.port, flush=True)
        for line in sys.stdin:
            if line.strip() == "stats":
                print(json.dumps(handle.stats()), flush=True)
            else:
                break
        handle.stop()
        print("stopped", flush=True)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True, cwd=tmp_path,
    )
    clients: list[socket.socket] = []
    try:
        assert proc.stdout is not None and proc.stdin is not None
        port = int(proc.stdout.readline())
        for _ in range(100):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            clients.append(sock)
            sock.sendall(HALF_REQUEST)
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                status, _, body = read_response(sock)
                assert (200, b"ok") == (status, body)
        proc.stdin.write("stats\n")
        proc.stdin.flush()
        stats = json.loads(proc.stdout.readline())
        assert stats["accept_errors"] > 0, stats
        assert stats["open"] < 40, stats
        assert proc.poll() is None
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        assert "stopped" == proc.stdout.readline().strip()
        assert 0 == proc.wait(10)
    finally:
        for sock in clients:
            sock.close()
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)  # reaps it and closes both pipes


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {timeout} s")
        time.sleep(0.01)
