"""Helpers for application code: one obvious way to record each family of the catalog.

The ``track_*`` helpers are context managers: they time the body, count it, and when the
body raises they record the error and re-raise. The error type of an exception is its
``error_type`` attribute if it has one (for example ``"rate_limit"``), else its class name.

    with track_llm_call("anthropic", "claude-sonnet-4-5") as call:
        reply = client.messages.create(...)
        call.record_tokens(prompt=reply.usage.input_tokens,
                           completion=reply.usage.output_tokens)

Label children are looked up through the guarded metrics' cache: after the first call
with given label values, each lookup is one dict lookup.
"""

from __future__ import annotations

import logging
import os
import re
import time
from contextvars import ContextVar
from types import TracebackType
from typing import Any, Literal

import psutil

from . import _compat, _runtime
from ._metrics import NoopMetric
from ._mpdir import PER_SECOND, on_grid
from .catalog import get_catalog

_perf = time.perf_counter


def _ms(seconds: float) -> float:
    """A duration in ms on a grid of 1/1024 ms (about 1 us), so histogram sums stay exact
    whatever compaction regroups (:func:`._mpdir.on_grid`); the C request does the same."""
    return on_grid(seconds * 1000.0)


log = logging.getLogger("victor_mp_metrics")


STATUS_ERROR_TYPES: dict[int, str] = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 408: "timeout", 409: "conflict", 413: "payload_too_large",
    415: "unsupported_media_type", 422: "unprocessable", 429: "rate_limit",
    500: "server_error", 501: "not_implemented", 502: "bad_gateway", 503: "unavailable",
    504: "timeout",
}  # fmt: skip


_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_exemplar: ContextVar[dict[str, str] | None] = ContextVar("victor_mp_metrics_exemplar",
                                                          default=None)


def trace_exemplar(traceparent: str | None) -> dict[str, str] | None:
    """``{"trace_id": ...}`` of a W3C ``traceparent`` header; None if absent or malformed."""
    if not traceparent:
        return None
    match = _TRACEPARENT.match(traceparent.strip().lower())
    if match is None or match[1] == "0" * 32:
        return None
    return {"trace_id": match[1]}


def set_request_exemplar(exemplar: dict[str, str] | None) -> None:
    """The exemplar the request in progress attaches to its duration and to the LLM and tool
    histograms observed while it runs (None: none). Integrations set it per request."""
    _exemplar.set(exemplar)


def error_type_for_status(status: int) -> str | None:
    """The one status -> ``error_type`` rule of every integration; None for a success.

    Every status >= 400 is an error: a known status has its name in
    :data:`STATUS_ERROR_TYPES`, any other 4xx is ``client_error``, any other 5xx
    ``server_error``.
    """
    if status < 400:
        return None
    return STATUS_ERROR_TYPES.get(status, "client_error" if status < 500 else "server_error")


def error_type_of(exc: BaseException) -> str:
    """``exc.error_type`` if it is a non-empty str, else the exception's class name.

    A ``SystemExit``/``KeyboardInterrupt`` cutting work short is not an error of the work:
    ``timeout`` when Gunicorn is killing the worker for its timeout, else ``aborted``.
    """
    value = getattr(exc, "error_type", None)
    if isinstance(value, str) and value:
        return value
    if not isinstance(exc, Exception):
        return "timeout" if _runtime.RUNTIME.aborting else "aborted"
    return type(exc).__name__


class _Tracked:
    """Shared timing and failure state of the ``track_*`` context managers."""

    __slots__ = ("_error", "_start")

    def __init__(self) -> None:
        self._error: str | None = None
        self._start = 0.0

    def fail(self, error_type: str) -> None:
        """Mark this call failed with ``error_type`` (e.g. ``"rate_limit"``, ``"timeout"``)."""
        self._error = error_type

    def __enter__(self) -> Any:
        self._start = _perf()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]:
        elapsed = _perf() - self._start
        if exc is not None and self._error is None:
            self._error = error_type_of(exc)
        self._record(elapsed)
        return False

    def _record(self, elapsed: float) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class LLMCall(_Tracked):
    """One LLM request: counted, timed in ms, its tokens and error (if any) recorded."""

    __slots__ = ("_model", "_provider")

    def __init__(self, provider: str, model: str) -> None:
        super().__init__()
        self._provider = provider
        self._model = model

    def record_tokens(self, prompt: int = 0, completion: int = 0) -> None:
        """Add ``prompt`` and ``completion`` tokens to ``victor_llm_tokens_total``."""
        tokens = get_catalog().llm_tokens_total
        if prompt:
            tokens.labels(self._provider, self._model, "prompt").inc(prompt)
        if completion:
            tokens.labels(self._provider, self._model, "completion").inc(completion)

    def _record(self, elapsed: float) -> None:
        catalog = get_catalog()
        provider, model = self._provider, self._model
        catalog.llm_requests_total.labels(provider, model).inc()
        catalog.llm_duration_ms.labels(provider, model).observe(_ms(elapsed), _exemplar.get())
        if self._error is not None:
            catalog.llm_errors_total.labels(provider, model, self._error).inc()


def track_llm_call(provider: str, model: str) -> LLMCall:
    """Context manager recording one LLM request; yields an :class:`LLMCall`."""
    return LLMCall(provider, model)


class ToolRun(_Tracked):
    """One tool execution: status success or error, duration in ms, error type."""

    __slots__ = ("_tool",)

    def __init__(self, tool_name: str) -> None:
        super().__init__()
        self._tool = tool_name

    def _record(self, elapsed: float) -> None:
        catalog = get_catalog()
        tool = self._tool
        status = "success" if self._error is None else "error"
        catalog.tool_executions_total.labels(tool, status).inc()
        catalog.tool_duration_ms.labels(tool).observe(_ms(elapsed), _exemplar.get())
        if self._error is not None:
            catalog.tool_errors_total.labels(tool, self._error).inc()


def track_tool(tool_name: str) -> ToolRun:
    """Context manager recording one tool execution; yields a :class:`ToolRun`."""
    return ToolRun(tool_name)


class CoordinatorRun(_Tracked):
    """One coordinator run: count, seconds, errors, and the process's memory and CPU.

    Memory: resident memory of this process when the run ends (``livemax`` across
    processes). CPU: CPU time of the running thread divided by the run's wall time x 100
    (``livemostrecent``): 100 means the run kept one core busy.
    """

    __slots__ = ("_cpu_start", "_name")

    def __init__(self, coordinator_name: str) -> None:
        super().__init__()
        self._name = coordinator_name
        self._cpu_start = 0.0

    def __enter__(self) -> Any:
        self._cpu_start = time.thread_time()
        return super().__enter__()

    def _record(self, elapsed: float) -> None:
        cpu = time.thread_time() - self._cpu_start
        catalog = get_catalog()
        if isinstance(catalog.coordinator_executions_total, NoopMetric):
            return  # metrics disabled: skip even reading the memory
        name = self._name
        catalog.coordinator_executions_total.labels(name).inc()
        catalog.coordinator_duration_seconds.labels(name).observe(on_grid(elapsed, PER_SECOND))
        if self._error is not None:
            catalog.coordinator_errors_total.labels(name).inc()
        catalog.coordinator_memory_bytes.labels(name).set(_rss())
        if elapsed > 0:
            catalog.coordinator_cpu_percent.labels(name).set(min(100.0, cpu / elapsed * 100.0))


def track_coordinator(coordinator_name: str) -> CoordinatorRun:
    """Context manager recording one coordinator run; yields a :class:`CoordinatorRun`."""
    return CoordinatorRun(coordinator_name)


_statm: tuple[int, int] | None = None  # (pid, fd of /proc/self/statm)
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> float:
    """This process's resident memory: /proc/self/statm kept open (~1 us), else psutil."""
    global _statm
    pid = os.getpid()
    try:
        if _statm is None or _statm[0] != pid:  # first call, or a forked child
            _statm = (pid, os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC))
        return float(int(os.pread(_statm[1], 64, 0).split()[1]) * _PAGE)
    except OSError:
        return float(psutil.Process().memory_info().rss)


class InFlight:
    """Counts the enclosed request in ``victor_active_connections`` while it runs."""

    __slots__ = ("_gauge",)

    def __enter__(self) -> None:
        self._gauge = get_catalog().active_connections
        self._gauge.inc()

    def __exit__(self, *exc: object) -> Literal[False]:
        self._gauge.dec()
        return False


def track_request_in_flight() -> InFlight:
    """Context manager: +1 on ``victor_active_connections`` on entry, -1 on exit (always)."""
    return InFlight()


class _RequestChildren:
    """The catalog children of one (endpoint, method), looked up once, written directly
    (:mod:`._compat`: the same writes as ``inc()``/``observe()`` without their checks).
    ``end(duration_ms)``, when the value class allows, observes the duration and takes the
    request out of the in-flight gauge (``gauge``) under one lock (:func:`._compat.ending`)."""

    __slots__ = ("count", "duration", "end", "parts")

    def __init__(self, catalog: Any, endpoint: str, method: str, gauge: Any) -> None:
        self.count = _compat.incrementer(catalog.requests_total.labels(endpoint, method), 1.0)
        self.duration = catalog.request_duration_ms.labels(endpoint, method)
        self.parts = _compat.histogram_parts(self.duration)
        self.end = _compat.ending(self.parts, gauge)

    def observe(self, duration_ms: float, exemplar: dict[str, str] | None) -> None:
        if exemplar is None and self.parts is not None:
            _compat.observe(self.parts, duration_ms)
        else:
            self.duration.observe(duration_ms, exemplar)


class _RequestMetrics:
    """The request metrics of one catalog: the in-flight gauge's +1 and -1 and the
    children of each (endpoint, method), bounded in practice by route templates x nine
    methods."""

    __slots__ = ("catalog", "children", "enter", "errors", "gauge", "leave")

    def __init__(self, catalog: Any) -> None:
        self.catalog = catalog
        self.children: dict[tuple[str, str], _RequestChildren] = {}
        self.enter = _compat.incrementer(catalog.active_connections, 1.0)
        self.leave = _compat.incrementer(catalog.active_connections, -1.0)
        self.gauge = _compat.value_of(catalog.active_connections)
        self.errors = catalog.request_errors_total

    def of(self, endpoint: str, method: str) -> _RequestChildren:
        found = self.children.get((endpoint, method))
        if found is None:
            found = self.children[(endpoint, method)] = _RequestChildren(
                self.catalog, endpoint, method, self.gauge)
        return found

    def count(self, endpoint: str, method: str, status: int,
              error_type: str | None) -> _RequestChildren:
        """Count one answered request (see :func:`record_request`); its children."""
        children = self.of(endpoint, method)
        children.count()
        if status >= 400 or error_type is not None:
            self.errors.labels(endpoint, method,
                               error_type or error_type_for_status(status)).inc()
        return children


_REQUESTS = "request_metrics"  # the runtime's name of this process's _RequestMetrics


def _request_metrics() -> _RequestMetrics:
    """This process's request metrics: a runtime singleton, made anew with the catalog
    after ``reset()`` (which forgets both)."""
    return _runtime.singleton(_REQUESTS, lambda: _RequestMetrics(get_catalog()))


OTHER_METHOD = "OTHER"
STANDARD_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE")
)


def _log_failure(message: str, exc: BaseException) -> None:
    log.error(message, exc_info=exc)


try:  # the optional C twin of wsgi's request (see wsgi._Request), bound to this life cycle
    from ._wsgi_request import bind as _bind_c_request
except ImportError:  # built without a C compiler: wsgi uses its Python request
    pass
else:
    _bind_c_request(STANDARD_METHODS, OTHER_METHOD, _runtime.RUNTIME.singletons, _REQUESTS,
                    _request_metrics, _log_failure)


class RequestTracker:
    """One request of any integration: in flight from its creation, counted once by
    :meth:`answered`, timed until :meth:`end` (idempotent). Recording errors are logged,
    never raised. Methods outside the standard nine are recorded as ``OTHER``.

    ``traceparent`` (a W3C header) becomes the exemplar ``{"trace_id": ...}`` of the
    request's duration, and of the LLM and tool durations observed while it runs.
    """

    __slots__ = ("children", "done", "endpoint", "exemplar", "method", "metrics", "started")

    def __init__(self, method: str, traceparent: str | None = None) -> None:
        """A request of ``method`` arriving now: in flight from here."""
        self.method = method if method in STANDARD_METHODS else OTHER_METHOD
        self.endpoint: str | None = None
        self.done = False
        self.children: _RequestChildren | None = None
        self.exemplar = trace_exemplar(traceparent) if traceparent else None
        self.metrics: _RequestMetrics | None = None
        try:
            metrics = self.metrics = (_runtime.RUNTIME.singletons.get(_REQUESTS)
                                      or _request_metrics())
            metrics.enter()
        except Exception:
            log.exception("victor_mp_metrics: could not count the request in flight")
        if self.exemplar is not None:
            _exemplar.set(self.exemplar)
        self.started = _perf()

    def answered(self, endpoint: str, status: int, error_type: str | None = None) -> None:
        """Count the request (the first call only) as its status goes to the server;
        ``error_type`` names the error of a status >= 400 (default: the status's own)."""
        if self.endpoint is not None:
            return
        self.endpoint = endpoint
        try:
            metrics = self.metrics or _request_metrics()
            children = metrics.children.get((endpoint, self.method))
            if children is None or status >= 400:
                children = metrics.count(endpoint, self.method, status,
                                         error_type if status >= 400 else None)
            else:  # the common case of count(): one known route's success
                children.count()
            self.children = children
        except Exception:
            log.exception("victor_mp_metrics: could not record request metrics")

    def end(self) -> None:
        if self.done:
            return
        self.done = True
        elapsed_ms = _ms(_perf() - self.started)
        try:
            children = self.children
            if children is None:
                (self.metrics or _request_metrics()).leave()  # the gauge __init__ counted in
            elif children.end is None or self.exemplar is not None or elapsed_ms != elapsed_ms:
                children.observe(elapsed_ms, self.exemplar)  # timed before it leaves
                (self.metrics or _request_metrics()).leave()
            else:  # the same under one lock: a scrape never sees one without the other
                children.end(elapsed_ms)
        except Exception:
            log.exception("victor_mp_metrics: could not record request metrics")
        if self.exemplar is not None:
            _exemplar.set(None)


def record_request(
    endpoint: str,
    method: str,
    status: int,
    duration_ms: float | None = None,
    error_type: str | None = None,
) -> None:
    """Record one answered HTTP request (used by every framework integration).

    ``duration_ms`` None records the count only (observe the duration later with
    :func:`observe_request_duration`); a duration is floored to a multiple of 1/1024 ms
    (:func:`._mpdir.on_grid`: the histogram's sum then stays exact through compaction).
    A status >= 400 is counted in ``victor_request_errors_total`` with ``error_type`` if
    given, else by :func:`error_type_for_status`; an ``error_type`` given with a success
    status counts an error too.
    """
    children = _request_metrics().count(endpoint, method, status, error_type)
    if duration_ms is not None:
        children.observe(on_grid(duration_ms), None)


def observe_request_duration(endpoint: str, method: str, duration_ms: float,
                             exemplar: dict[str, str] | None = None) -> None:
    """Observe a request's duration in ``victor_request_duration_ms`` (with an exemplar,
    e.g. ``{"trace_id": ...}``, when given)."""
    _request_metrics().of(endpoint, method).observe(on_grid(duration_ms), exemplar)


def record_cache_hit(cache_name: str, count: int = 1) -> None:
    """Count ``count`` hits of cache ``cache_name``."""
    get_catalog().cache_hits_total.labels(cache_name).inc(count)


def record_cache_miss(cache_name: str, count: int = 1) -> None:
    """Count ``count`` misses of cache ``cache_name``."""
    get_catalog().cache_misses_total.labels(cache_name).inc(count)


def set_cache_size(cache_name: str, size_bytes: float) -> None:
    """Set this process's size of cache ``cache_name`` (summed over live processes)."""
    get_catalog().cache_size_bytes.labels(cache_name).set(size_bytes)
