"""The Flask extension: request metrics, in-flight connections and the ``/metrics`` route.

Usage::

    metrics = VictorMetrics(app)        # or VictorMetrics(); metrics.init_app(app)

It wraps ``app.wsgi_app``. A request is counted (``victor_requests_total``, and
``victor_request_errors_total`` for an error status) when the app calls
``start_response``, before the server sends a byte, so a worker killed after answering
never loses a request the client received. It stays in flight
(``victor_active_connections``) and is timed until the server has sent the last byte and
closed the response, which is right for streamed responses too, exceptions included.
Labels carry the matched route template, never the raw path: unmatched requests share
``endpoint="<unmatched>"`` and unknown methods share ``method="OTHER"``, so request data
never becomes a label.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import Flask, Response, got_request_exception, request

from . import _runtime, instrument
from ._exposition import render
from .catalog import get_catalog
from .instrument import error_type_for_status

log = logging.getLogger("victor_mp_metrics")

EXTENSION_KEY = "victor_mp_metrics"
UNMATCHED = "<unmatched>"
OTHER_METHOD = "OTHER"
STANDARD_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE")
)
_ENDPOINT_KEY = "victor_mp_metrics.endpoint"
_ERROR_KEY = "victor_mp_metrics.error_type"


def set_error_type(error_type: str) -> None:
    """Inside a request: name the ``error_type`` recorded if the response is an error."""
    request.environ[_ERROR_KEY] = error_type


class VictorMetrics:
    """Flask extension recording the guide's request metrics and serving ``/metrics``."""

    def __init__(self, app: Flask | None = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Instrument ``app``. Config keys read (defaults set with ``setdefault``):

        - ``VICTOR_METRICS_PATH`` (``"/metrics"``): where the scrape route is served.
        - ``VICTOR_METRICS_SERVE`` (``True``): register the scrape route at all.
        - ``VICTOR_METRICS_EXCLUDE_PATHS`` (the scrape path): paths not recorded.

        With ``VICTOR_METRICS_ENABLED=false`` only the scrape route is added (it says so).
        """
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                "VictorMetrics is already registered on this app. Use the instance you "
                "already have (app.extensions['victor_mp_metrics'])."
            )
        path = app.config.setdefault("VICTOR_METRICS_PATH", "/metrics")
        serve = app.config.setdefault("VICTOR_METRICS_SERVE", True)
        excluded = frozenset(app.config.setdefault("VICTOR_METRICS_EXCLUDE_PATHS", (path,)))
        app.extensions[EXTENSION_KEY] = self
        if _runtime.get_settings().enabled:
            # Disabled metrics cost a request nothing: no hook, no middleware.
            got_request_exception.connect(_remember_exception, app, weak=False)
            app.teardown_request(_remember_route)
            app.wsgi_app = _Middleware(app.wsgi_app, excluded)  # type: ignore[method-assign]
        if serve:
            app.add_url_rule(path, "victor_metrics", _metrics_view, methods=["GET"])


def _remember_exception(sender: Flask, exception: BaseException, **extra: Any) -> None:
    # Sent by Flask for an unhandled exception, before it builds the 500 response.
    request.environ.setdefault(_ERROR_KEY, instrument.error_type_of(exception))


def _remember_route(exc: BaseException | None) -> None:
    # A request ended by an exception (SystemExit of a worker timeout included) is counted
    # after Flask has dropped its request object from the environ: keep the route now.
    if exc is not None:
        rule = request.url_rule
        request.environ[_ENDPOINT_KEY] = rule.rule if rule is not None else UNMATCHED


def _metrics_view() -> Response:
    status, headers, body = render(dict(request.headers.items()), request.args.to_dict(flat=False))
    return Response(body, status=status, headers=headers)


class _Middleware:
    """WSGI wrapper: in-flight gauge and request metrics, finished when the response closes."""

    def __init__(self, wsgi_app: Callable[..., Iterable[bytes]], excluded: frozenset[str]):
        self.wsgi_app = wsgi_app
        self.excluded = excluded

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO", "") in self.excluded:
            return self.wsgi_app(environ, start_response)
        tracker = _Tracked(environ)
        tracker.begin()

        def capture(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
            tracker.answered(int(status[:3]))
            return start_response(status, headers, *exc_info)

        try:
            body = self.wsgi_app(environ, capture)
        except BaseException as exc:
            environ.setdefault(_ERROR_KEY, instrument.error_type_of(exc))
            tracker.answered(500)
            tracker.end()
            raise
        return _ClosingBody(body, tracker)


class _Tracked:
    """One request: in flight from the start, counted when answered, timed until closed."""

    __slots__ = ("done", "endpoint", "environ", "exemplar", "method", "started")

    def __init__(self, environ: dict[str, Any]) -> None:
        self.environ = environ
        self.done = False
        self.endpoint: str | None = None
        method = environ.get("REQUEST_METHOD", "")
        self.method = method if method in STANDARD_METHODS else OTHER_METHOD
        self.started = 0.0
        self.exemplar = instrument.trace_exemplar(environ.get("HTTP_TRACEPARENT"))

    def begin(self) -> None:
        self.started = time.perf_counter()
        instrument.set_request_exemplar(self.exemplar)
        try:
            get_catalog().active_connections.inc()
        except Exception:
            log.exception("victor_mp_metrics: could not count the request in flight")

    def answered(self, status: int) -> None:
        """Count the request (once) as the app hands its status to the server."""
        if self.endpoint is not None:
            return
        environ = self.environ
        endpoint = environ.get(_ENDPOINT_KEY)
        if endpoint is None:
            req = environ.get("werkzeug.request")
            rule = req.url_rule if req is not None else None
            endpoint = rule.rule if rule is not None else UNMATCHED
        self.endpoint = endpoint
        error_type = None
        if status >= 400:
            error_type = environ.get(_ERROR_KEY) or error_type_for_status(status)
        try:
            instrument.record_request(self.endpoint, self.method, status, None, error_type)
        except Exception:
            log.exception("victor_mp_metrics: could not record request metrics")

    def end(self) -> None:
        if self.done:
            return
        self.done = True
        elapsed_ms = (time.perf_counter() - self.started) * 1000.0
        try:
            get_catalog().active_connections.dec()
            if self.endpoint is not None:
                instrument.observe_request_duration(self.endpoint, self.method, elapsed_ms,
                                                    self.exemplar)
            instrument.set_request_exemplar(None)
        except Exception:
            log.exception("victor_mp_metrics: could not record request metrics")


class _ClosingBody:
    """The response iterable; records the request when the server closes it."""

    __slots__ = ("_body", "_tracker")

    def __init__(self, body: Iterable[bytes], tracker: _Tracked) -> None:
        self._body = body
        self._tracker = tracker

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._tracker.end()
