"""A small, bounded HTTP/1.1 server for metrics scrapes: one selector thread, a tiny worker pool.

Invariants (what the master's metrics port relies on):

* Threads: one daemon selector thread plus ``workers`` daemon worker threads, whatever the
  number of clients. No thread is ever started per connection.
* Descriptors: at most ``max_connections`` accepted sockets are open at once, plus the
  listener, the selector and one wake-up socket pair. Past the cap a new connection first
  evicts the oldest connection that has no request in progress (a client that has not
  finished its headers, an idle keep-alive, a TLS handshake); when every connection is busy
  the new one is answered ``503`` (plain HTTP only) and closed at once. Accepting never stops
  for long and the listen queue holds 2,048 (or the kernel's ``somaxconn``), so a burst of
  connections is never dropped half-open by the kernel.
* Time: every connection that is not waiting for the handler has a deadline: complete
  request headers (and the TLS handshake) within ``header_timeout`` of being accepted or of
  its first byte after a keep-alive pause, a keep-alive pause of at most ``idle_timeout``,
  and write progress (the kernel taking more of the answer) at least every ``idle_timeout``.
  Past it the socket is closed.
* The selector thread never blocks: sockets are non-blocking, TLS handshakes are driven by
  readiness events, and ``auth`` and ``handler`` (which may be slow) run on the worker pool.
  At most ``workers + max_queued`` requests are in flight; more are answered ``503`` with
  ``Retry-After`` at once.
* No exception in a connection, nor EMFILE/ENFILE on ``accept``, ends the loop: errors are
  logged to ``logging.getLogger("victor_mp_metrics")`` and only that connection is closed;
  out of descriptors, the oldest idle connection is closed or accepting pauses briefly.

Only GET and HEAD are served (405 otherwise); a request body is refused (400); every
answer carries ``Content-Length``; ``Connection: close`` and HTTP/1.0 are honoured.
"""

from __future__ import annotations

import collections
import errno
import logging
import math
import queue
import re
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["Handler", "PeerCheck", "ServerHandle", "serve"]

log = logging.getLogger("victor_mp_metrics")

Handler = Callable[
    [str, str, dict[str, list[str]], dict[str, str]], tuple[str, list[tuple[str, str]], bytes]
]
"""``handler(method, path, query, headers) -> (status line, headers, body)``.

``headers`` has lower-case names; repeated headers are joined with ``", "``. The server adds
``Content-Length``, ``Connection`` and ``Date`` itself (the handler's own are dropped) and
sends no body for HEAD."""

PeerCheck = Callable[[dict[str, Any]], bool]
"""Called with ``SSLSocket.getpeercert()`` after a TLS handshake; False closes the socket."""

_RECV_CHUNK = 65536
_LINGER = 1.0  # seconds a closing connection is drained so that the client reads our answer
_LINGER_BYTES = 65536
_ACCEPT_BATCH = 64
_ACCEPT_PAUSE = 0.1
_MAX_WAIT = 1.0
_OUT_OF_FDS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_STATUS = re.compile(r"[1-5][0-9][0-9] [^\r\n]*")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HOP_BY_HOP = {"content-length", "connection", "transfer-encoding", "date", "keep-alive"}

# Connection states.
_HANDSHAKE = "handshake"
_READ = "read"  # reading request headers, or idle between keep-alive requests
_WAIT = "wait"  # the request is with the worker pool
_WRITE = "write"
_LINGERING = "linger"  # answer sent, write side shut: draining input until EOF or _LINGER


class _Conn:
    """One accepted socket and its HTTP/1.1 state; touched only by the selector thread."""

    __slots__ = (
        "activity", "buf", "close_after", "deadline", "events", "fd", "out",
        "request_started", "serial", "sock", "state",
    )

    def __init__(self, sock: socket.socket, state: str, now: float, deadline: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.state = state
        self.activity = now  # accept time, then the end of the last answer
        self.deadline = deadline
        self.buf = bytearray()
        self.out = memoryview(b"")
        self.events = 0
        self.close_after = False
        self.request_started = False  # bytes of the current request have arrived
        self.serial = 0  # numbers requests, so a late worker result cannot hit a later one


class _Response:
    """What the worker pool hands back to the selector thread."""

    __slots__ = ("close", "conn", "data", "failed", "serial")

    def __init__(self, conn: _Conn, serial: int, data: bytes, close: bool, failed: bool) -> None:
        self.failed = failed  # auth or handler raised (counted by the selector thread)
        self.conn = conn
        self.serial = serial
        self.data = data
        self.close = close


class _Job:
    __slots__ = ("close", "conn", "headers", "keep_alive_10", "method", "path", "query", "serial")

    def __init__(
        self, conn: _Conn, serial: int, method: str, path: str,
        query: dict[str, list[str]], headers: dict[str, str], close: bool, keep_alive_10: bool,
    ) -> None:
        self.keep_alive_10 = keep_alive_10  # HTTP/1.0 with keep-alive: say so in the answer
        self.conn = conn
        self.serial = serial
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.close = close


class _BadRequest(Exception):
    def __init__(self, status: str, extra: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(status)
        self.status = status
        self.extra = list(extra)


def _encode_response(
    status: str,
    headers: Iterable[tuple[str, str]],
    body: bytes,
    *,
    head_only: bool,
    close: bool,
    http10_keep_alive: bool = False,
) -> bytes:
    """The bytes of one answer; always with Content-Length. Raises ValueError on bad input."""
    if not _STATUS.fullmatch(status):
        raise ValueError(f"bad status line {status!r}")
    lines = [f"HTTP/1.1 {status}"]
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or "\r" in value or "\n" in value:
            raise ValueError(f"bad response header {name!r}: {value!r}")
        if name.lower() not in _HOP_BY_HOP:
            lines.append(f"{name}: {value}")
    lines.append(f"Date: {formatdate(usegmt=True)}")
    lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    elif http10_keep_alive:
        lines.append("Connection: keep-alive")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


def _simple(
    status: str, extra: Sequence[tuple[str, str]] = ()
) -> tuple[str, list[tuple[str, str]], bytes]:
    """A plain-text answer whose body is the status' reason phrase."""
    body = (status.partition(" ")[2] or status).encode("latin-1", "replace") + b"\n"
    return status, [("Content-Type", "text/plain; charset=utf-8"), *extra], body


def _canned(status: str, body: bytes, extra: str = "") -> bytes:
    """A fixed answer that closes the connection, built once (no Date: it would go stale)."""
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n{extra}"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("latin-1") + body


_REJECT_503 = _canned("503 Service Unavailable", b"Too many connections, try later\n",
                      "Retry-After: 1\r\n")
_REJECT_500 = _canned("500 Internal Server Error", b"Internal Server Error\n")


class ServerHandle:
    """A running server: its address, counters, TLS reload and ``stop()``.

    All sockets belong to the selector thread; other threads only post to queues and write
    one byte to the wake-up socket, so no lock guards connection state.
    """

    def __init__(
        self,
        handler: Handler,
        listener: socket.socket,
        *,
        ssl_context: ssl.SSLContext | None,
        max_connections: int,
        header_timeout: float,
        idle_timeout: float,
        max_header_bytes: int,
        auth: Callable[[str | None], bool] | None,
        workers: int,
        max_queued: int,
        extra_headers: Sequence[tuple[str, str]],
        peer_check: PeerCheck | None,
    ) -> None:
        self._handler = handler
        self._listener = listener
        self._ssl_context = ssl_context
        self._tls = ssl_context is not None
        self._max_connections = max_connections
        self._header_timeout = header_timeout
        self._idle_timeout = idle_timeout
        self._max_header_bytes = max_header_bytes
        self._auth = auth
        self._extra_headers = list(extra_headers)
        self._peer_check = peer_check
        self._max_in_flight = workers + max_queued
        self._in_flight = 0  # selector thread only
        self._conns: dict[int, _Conn] = {}
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._done: collections.deque[_Response] = collections.deque()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._accept_paused_until = 0.0
        self._listening = False
        self._counters = dict.fromkeys(
            ("accepted", "rejected", "evicted", "timed_out", "handshake_failed", "busy",
             "requests", "errors", "accept_errors"), 0)
        addr = listener.getsockname()
        self.addr: str = str(addr[0])
        self.port: int = int(addr[1])
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._set_listening(True)
        self._workers = [
            threading.Thread(target=self._work, name=f"victor-metrics-http-worker-{i}", daemon=True)
            for i in range(workers)
        ]
        self._thread = threading.Thread(target=self._run, name="victor-metrics-http", daemon=True)
        for thread in self._workers:
            thread.start()
        self._thread.start()

    # -- public API -------------------------------------------------------------------------

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and every connection; join the threads for at most ``timeout`` s.

        Idempotent. Workers busy in a slow handler are daemon threads: they are not waited for
        past ``timeout`` and their late answers are dropped.
        """
        self._stopping.set()
        self._wake()
        deadline = time.monotonic() + timeout
        if threading.current_thread() is not self._thread:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        for _ in self._workers:
            self._jobs.put(None)
        for thread in self._workers:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        if not self._thread.is_alive() and not any(t.is_alive() for t in self._workers):
            self._wake_w.close()  # else a late worker may still write: left to the GC

    @property
    def tls_enabled(self) -> bool:
        """Whether connections are served over TLS."""
        return self._ssl_context is not None

    def reload_ssl(self, context: ssl.SSLContext) -> None:
        """Use ``context`` for connections accepted from now on; open ones keep theirs."""
        if not self._tls:
            raise ValueError("this server was started without TLS; restart it with ssl_context")
        if not isinstance(context, ssl.SSLContext):
            raise TypeError(f"reload_ssl needs an ssl.SSLContext, not {type(context).__name__}")
        self._ssl_context = context  # one attribute store: atomic for the selector thread

    def stats(self) -> dict[str, int]:
        """Gauges ``open`` (connections) and ``in_flight`` (requests), and counters since start.

        Counters: ``accepted``, ``rejected`` (over the cap with all busy), ``evicted`` (idle
        ones closed for a newcomer or on EMFILE), ``timed_out``, ``handshake_failed`` (TLS or
        peer check), ``busy`` (503 for a full worker queue), ``requests``, ``errors``
        (exceptions caught) and ``accept_errors``.
        """
        counters = dict(self._counters)
        counters["open"] = len(self._conns)
        counters["in_flight"] = self._in_flight
        return counters

    @property
    def running(self) -> bool:
        """True while the selector thread is alive."""
        return self._thread.is_alive()

    def close_after_fork(self) -> None:
        """In a forked child, close the inherited descriptors of this server (no thread runs).

        After ``fork()`` the child holds copies of the listener and of every connection; as
        long as a copy is open the peer never sees the server close its socket. Call this in
        the child (e.g. Gunicorn's ``post_fork``); it never touches the parent's server.
        """
        socks: list[socket.socket] = [self._listener, self._wake_r, self._wake_w]
        socks.extend(conn.sock for conn in list(self._conns.values()))
        self._close_all(socks)

    # -- worker pool ------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None or self._stopping.is_set():
                return
            try:
                data, close, failed = self._answer(job)
            except Exception:  # never lose a worker
                log.exception("metrics HTTP worker failed")
                data, close, failed = _REJECT_500, True, True
            self._done.append(_Response(job.conn, job.serial, data, close, failed))
            self._wake()

    def _answer(self, job: _Job) -> tuple[bytes, bool, bool]:
        """(answer bytes, close after it, failed); runs on a worker thread."""
        head_only = job.method == "HEAD"
        try:
            if self._auth is not None and not self._auth(job.headers.get("authorization")):
                status, headers, body = _simple(
                    "401 Unauthorized", [("WWW-Authenticate", 'Basic realm="metrics"')]
                )
            else:
                status, headers, body = self._handler(job.method, job.path, job.query, job.headers)
            data = _encode_response(
                status, [*headers, *self._extra_headers], bytes(body),
                head_only=head_only, close=job.close,
                http10_keep_alive=job.keep_alive_10,
            )
        except Exception as err:
            log.exception("metrics handler failed for %s %s", job.method, job.path)
            status, headers, body = _simple("500 Internal Server Error")
            body = f"metrics scrape failed: {type(err).__name__}\n".encode()
            data = _encode_response(
                status, [*headers, *self._extra_headers], body, head_only=head_only, close=True
            )
            return data, True, True
        return data, job.close, False

    # -- selector loop ----------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # buffer full (already woken) or closed (stopped)
            pass

    def _set_listening(self, on: bool) -> None:
        if on and not self._listening:
            self._selector.register(self._listener, selectors.EVENT_READ, None)
        elif not on and self._listening:
            self._selector.unregister(self._listener)
        self._listening = on

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    self._step()
                except Exception:  # the loop must survive anything
                    self._counters["errors"] += 1
                    log.exception("metrics HTTP server loop error")
                    time.sleep(0.05)
        finally:
            self._shutdown()

    def _step(self) -> None:
        now = time.monotonic()
        timeout = _MAX_WAIT
        for open_conn in self._conns.values():
            timeout = min(timeout, open_conn.deadline - now)
        if not self._listening:
            timeout = min(timeout, self._accept_paused_until - now)
        events = self._selector.select(max(0.0, timeout))
        for key, mask in events:
            if key.fileobj is self._wake_r:
                self._drain_wake()
            elif key.fileobj is self._listener:
                self._accept()
            else:
                conn = self._conns.get(key.fd)
                if conn is not None and conn.sock is key.fileobj:
                    self._guarded(conn, self._on_event, mask)
        while self._done:
            self._guarded_response(self._done.popleft())
        now = time.monotonic()
        for expired in [c for c in self._conns.values() if c.deadline <= now]:
            if expired.state != _LINGERING:
                self._counters["timed_out"] += 1
            self._close(expired)
        if not self._listening and now >= self._accept_paused_until:
            self._set_listening(True)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _guarded(self, conn: _Conn, func: Callable[[_Conn, int], None], mask: int) -> None:
        try:
            func(conn, mask)
        except Exception:
            self._counters["errors"] += 1
            log.exception("metrics HTTP connection error; closing it")
            self._close(conn)

    def _guarded_response(self, response: _Response) -> None:
        conn = response.conn
        self._in_flight -= 1
        if response.failed:
            self._counters["errors"] += 1
        if self._conns.get(conn.fd) is not conn or conn.serial != response.serial:
            return  # closed (timed out, evicted or stopped) meanwhile
        try:
            self._start_write(conn, response.data, response.close)
        except Exception:
            self._counters["errors"] += 1
            log.exception("metrics HTTP connection error; closing it")
            self._close(conn)

    # -- accept -----------------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno in _OUT_OF_FDS:
                    self._counters["accept_errors"] += 1
                    if not self._evict_one():
                        log.warning("metrics HTTP server out of descriptors (%s); pausing accept",
                                    err.strerror)
                        self._accept_paused_until = time.monotonic() + _ACCEPT_PAUSE
                        self._set_listening(False)
                        return
                    continue
                # ECONNABORTED, EPROTO, EPERM...: that client is gone, the listener is fine
                self._counters["accept_errors"] += 1
                log.debug("metrics HTTP accept failed: %s", err)
                continue
            self._counters["accepted"] += 1
            try:
                self._admit(sock)
            except Exception:
                self._counters["errors"] += 1
                log.exception("metrics HTTP server could not set up a connection")
                sock.close()

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if len(self._conns) >= self._max_connections and not self._evict_one():
            self._counters["rejected"] += 1
            if not self._tls:
                try:
                    sock.send(_REJECT_503)
                except OSError:
                    pass
            sock.close()
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        now = time.monotonic()
        deadline = now + self._header_timeout
        context = self._ssl_context
        if context is not None:
            tls_sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            conn = _Conn(tls_sock, _HANDSHAKE, now, deadline)
            self._conns[conn.fd] = conn
            self._handshake(conn, 0)
        else:
            conn = _Conn(sock, _READ, now, deadline)
            self._conns[conn.fd] = conn
            self._set_events(conn, selectors.EVENT_READ)

    def _evict_one(self) -> bool:
        """Close the oldest connection with no request in progress; False if there is none."""
        idle = [c for c in self._conns.values() if c.state in (_HANDSHAKE, _READ, _LINGERING)]
        if not idle:
            return False
        self._counters["evicted"] += 1
        self._close(min(idle, key=lambda c: (c.state != _LINGERING, c.activity)))
        return True

    # -- per-connection I/O -----------------------------------------------------------------

    def _set_events(self, conn: _Conn, events: int) -> None:
        if events == conn.events:
            return
        if conn.events == 0:
            self._selector.register(conn.sock, events, None)
        elif events == 0:
            self._selector.unregister(conn.sock)
        else:
            self._selector.modify(conn.sock, events, None)
        conn.events = events

    def _close(self, conn: _Conn) -> None:
        if self._conns.get(conn.fd) is conn:
            del self._conns[conn.fd]
        if conn.events:
            try:
                self._selector.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass
            conn.events = 0
        conn.state = "closed"
        try:
            conn.sock.close()
        except OSError:
            pass

    def _on_event(self, conn: _Conn, mask: int) -> None:
        if conn.state == _HANDSHAKE:
            self._handshake(conn, mask)
        elif conn.state == _READ:
            self._read(conn)
        elif conn.state == _WRITE:
            self._write(conn)
        elif conn.state == _LINGERING:
            self._linger_read(conn)

    def _handshake(self, conn: _Conn, _mask: int) -> None:
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._set_events(conn, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._set_events(conn, selectors.EVENT_WRITE)
            return
        except (ssl.SSLError, OSError) as err:
            self._counters["handshake_failed"] += 1
            log.debug("metrics TLS handshake failed: %s", err)
            self._close(conn)
            return
        if self._peer_check is not None:
            try:
                allowed = self._peer_check(sock.getpeercert() or {})
            except Exception:
                log.exception("metrics TLS peer check failed")
                allowed = False
            if not allowed:
                self._counters["handshake_failed"] += 1
                self._close(conn)
                return
        conn.state = _READ
        self._set_events(conn, selectors.EVENT_READ)
        self._read(conn)  # the request may already sit in the TLS buffer

    def _recv(self, conn: _Conn) -> bytes | None:
        """Bytes read, b"" at EOF, None when nothing is ready (or TLS wants more)."""
        try:
            return conn.sock.recv(_RECV_CHUNK)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            return None
        except ssl.SSLWantWriteError:
            self._set_events(conn, selectors.EVENT_READ | selectors.EVENT_WRITE)
            return None
        except (ConnectionError, ssl.SSLError, OSError) as err:
            log.debug("metrics HTTP recv failed: %s", err)
            return b""

    def _read(self, conn: _Conn) -> None:
        while True:
            data = self._recv(conn)
            if data is None:
                break
            if not data:
                self._close(conn)
                return
            if not conn.request_started:
                conn.request_started = True
                conn.deadline = time.monotonic() + self._header_timeout
            conn.buf += data
            if b"\r\n\r\n" in conn.buf or len(conn.buf) > self._max_header_bytes:
                break
        self._process(conn)

    def _process(self, conn: _Conn) -> None:
        """Dispatch one complete request in ``conn.buf``, if there is one."""
        if conn.state != _READ:
            return
        while conn.buf.startswith(b"\r\n"):  # RFC 9112 2.2: ignore CRLFs before a request
            del conn.buf[:2]
        end = conn.buf.find(b"\r\n\r\n")
        size = end + 4 if end >= 0 else len(conn.buf)
        if size > self._max_header_bytes:
            self._fail(conn, "431 Request Header Fields Too Large")
            return
        if end < 0:
            return
        head = bytes(conn.buf[:end])
        del conn.buf[: end + 4]
        conn.request_started = bool(conn.buf)
        try:
            job = self._parse(conn, head)
        except _BadRequest as bad:
            self._fail(conn, bad.status, bad.extra)
            return
        self._counters["requests"] += 1
        if self._in_flight >= self._max_in_flight:
            self._counters["busy"] += 1
            self._fail(conn, "503 Service Unavailable", [("Retry-After", "1")])
            return
        self._in_flight += 1
        conn.state = _WAIT
        conn.deadline = math.inf
        self._set_events(conn, 0)  # pipelined bytes wait in the kernel until we answer
        self._jobs.put(job)

    def _parse(self, conn: _Conn, head: bytes) -> _Job:
        try:
            text = head.decode("latin-1")
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes anything
            raise _BadRequest("400 Bad Request") from None
        request_line, _, header_text = text.partition("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise _BadRequest("400 Bad Request")
        method, target, version = parts
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise _BadRequest("505 HTTP Version Not Supported")
        headers: dict[str, str] = {}
        for line in header_text.split("\r\n") if header_text else ():
            name, sep, value = line.partition(":")
            if not sep or not _TOKEN.fullmatch(name):
                raise _BadRequest("400 Bad Request")  # also obs-fold and spaces before ':'
            key = name.lower()
            value = value.strip(" \t")
            if key in headers:
                if key in ("content-length", "host", "authorization"):
                    raise _BadRequest("400 Bad Request")
                headers[key] = f"{headers[key]}, {value}"
            else:
                headers[key] = value
        tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        close = "keep-alive" not in tokens if version == "HTTP/1.0" else "close" in tokens
        if not _TOKEN.fullmatch(method):
            raise _BadRequest("400 Bad Request")
        if method not in ("GET", "HEAD"):
            raise _BadRequest("405 Method Not Allowed", [("Allow", "GET, HEAD")])
        if "transfer-encoding" in headers:
            raise _BadRequest("400 Bad Request")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > 0):
            raise _BadRequest("400 Bad Request")
        try:
            url = urlsplit(target)
            query = parse_qs(url.query, keep_blank_values=True)
        except ValueError:
            raise _BadRequest("400 Bad Request") from None
        conn.serial += 1
        conn.close_after = close
        return _Job(
            conn, conn.serial, method, url.path or "/", query, headers, close,
            keep_alive_10=version == "HTTP/1.0" and not close,
        )

    def _fail(self, conn: _Conn, status: str, extra: Sequence[tuple[str, str]] = ()) -> None:
        """Answer an error from the selector thread and close after it (input is not trusted)."""
        status, headers, body = _simple(status, extra)
        data = _encode_response(
            status, [*headers, *self._extra_headers], body, head_only=False, close=True
        )
        self._start_write(conn, data, True)

    def _start_write(self, conn: _Conn, data: bytes, close: bool) -> None:
        conn.state = _WRITE
        conn.out = memoryview(data)
        conn.close_after = close
        conn.deadline = time.monotonic() + self._idle_timeout
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        while conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
                self._set_events(conn, selectors.EVENT_WRITE)
                return
            except ssl.SSLWantReadError:
                self._set_events(conn, selectors.EVENT_READ)
                return
            except (ConnectionError, ssl.SSLError, OSError) as err:
                log.debug("metrics HTTP send failed: %s", err)
                self._close(conn)
                return
            conn.out = conn.out[sent:]
            conn.deadline = time.monotonic() + self._idle_timeout
        conn.out = memoryview(b"")
        if conn.close_after:
            self._start_linger(conn)
            return
        now = time.monotonic()
        conn.state = _READ
        conn.activity = now
        if conn.request_started:
            conn.deadline = now + self._header_timeout
        else:
            conn.deadline = now + self._idle_timeout
        self._set_events(conn, selectors.EVENT_READ)
        if b"\r\n\r\n" in conn.buf:
            self._process(conn)  # a pipelined request
        elif isinstance(conn.sock, ssl.SSLSocket) and conn.sock.pending():
            self._read(conn)

    def _start_linger(self, conn: _Conn) -> None:
        """Half-close, then discard input briefly so that closing does not reset our answer."""
        conn.state = _LINGERING
        conn.deadline = time.monotonic() + min(_LINGER, self._idle_timeout)
        conn.buf = bytearray()
        conn.out = memoryview(b"")
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except (OSError, ValueError):
            self._close(conn)
            return
        conn.activity = 0.0  # first in line for eviction
        self._set_events(conn, selectors.EVENT_READ)
        self._linger_read(conn)

    def _linger_read(self, conn: _Conn) -> None:
        received = 0
        while received < _LINGER_BYTES:
            try:
                data = conn.sock.recv(_RECV_CHUNK)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                return
            except (OSError, ValueError, ssl.SSLError):
                data = b""
            if not data:
                break
            received += len(data)
        self._close(conn)

    def _shutdown(self) -> None:
        for conn in list(self._conns.values()):
            self._close(conn)
        self._close_all([self._listener, self._wake_r])  # _wake_w: stop() closes it later

    def _close_all(self, socks: list[socket.socket]) -> None:
        """Close ``socks`` and the selector, whatever state each is in."""
        for sock in socks:
            try:
                sock.close()
            except OSError:
                pass
        try:
            self._selector.close()
        except (OSError, RuntimeError):
            pass



def _listen(host: str, port: int, backlog: int) -> socket.socket:
    infos = socket.getaddrinfo(  # "" is every IPv4 address, as http.server has it
        host or "0.0.0.0", port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    if not infos:  # pragma: no cover - getaddrinfo raises instead
        raise OSError(f"cannot resolve {host!r}")
    family, kind, proto, _canon, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def serve(
    handler: Handler,
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    max_connections: int = 64,
    header_timeout: float = 5.0,
    idle_timeout: float = 5.0,
    max_header_bytes: int = 16384,
    auth: Callable[[str | None], bool] | None = None,
    workers: int = 2,
    max_queued: int = 4,
    extra_headers: Sequence[tuple[str, str]] = (),
    peer_check: PeerCheck | None = None,
) -> ServerHandle:
    """Listen on ``host:port`` (0: a free port) and serve in one daemon thread.

    ``auth(authorization_header_or_None)`` returning False answers 401 with
    ``WWW-Authenticate: Basic realm="metrics"``; it runs on the worker pool (bcrypt is slow).
    ``extra_headers`` go on every answer, errors included (e.g. a web config's headers).
    ``peer_check`` vets a TLS client's verified certificate (e.g. allowed SANs). Bind errors
    raise ``OSError`` here, in the caller's thread.
    """
    if max_connections < 1 or workers < 1 or max_queued < 0 or max_header_bytes < 64:
        raise ValueError("max_connections and workers must be >= 1, max_queued >= 0, "
                         "max_header_bytes >= 64")
    if not (header_timeout > 0 and idle_timeout > 0):
        raise ValueError("header_timeout and idle_timeout must be > 0 seconds")
    if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
        raise TypeError("ssl_context must be an ssl.SSLContext")
    # A burst of connects must never overflow the kernel's listen queue while the selector
    # thread is busy: a connection dropped there lingers half-open on the client side until
    # SYN-ACK retransmits bring it in (seconds to a minute). Gunicorn listens with 2048.
    listener = _listen(host, port, backlog=min(socket.SOMAXCONN, 2048))
    try:
        return ServerHandle(
            handler, listener, ssl_context=ssl_context, max_connections=max_connections,
            header_timeout=header_timeout, idle_timeout=idle_timeout,
            max_header_bytes=max_header_bytes, auth=auth, workers=workers,
            max_queued=max_queued, extra_headers=extra_headers, peer_check=peer_check,
        )
    except BaseException:
        listener.close()
        raise
