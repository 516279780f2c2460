"""Request metrics for any WSGI app: Django, Falcon, Flask or plain WSGI.

Usage::

    application = MetricsMiddleware(application)

Each request is recorded as the Flask extension records it: in flight
(``victor_active_connections``) from the first moment, counted
(``victor_requests_total``, ``victor_request_errors_total``) when the app calls
``start_response``, and timed until the server closes the response iterable, after its
last byte, so streamed responses are timed whole. An exception out of the app counts a
500 with the exception's ``error_type`` (:func:`.instrument.error_type_of`), any other
status >= 400 its own (:func:`.instrument.error_type_for_status`).

Labels carry the route template, never the raw path. The template is, first that is set:
``environ[ENDPOINT_KEY]`` (framework glue sets it, see :class:`DjangoRouteMiddleware`
and :class:`FalconRouteMiddleware`), then what the ``route`` callable given to the
middleware returns; otherwise ``<unmatched>``. Methods outside the standard nine are
``OTHER``. :class:`RequestTracker` is the one implementation of this life cycle, shared
by the ASGI middleware (:mod:`.asgi`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any

from . import _runtime, instrument
from .catalog import get_catalog

log = logging.getLogger("victor_mp_metrics")

ENDPOINT_KEY = "victor_mp_metrics.endpoint"
ERROR_TYPE_KEY = "victor_mp_metrics.error_type"
UNMATCHED = "<unmatched>"
OTHER_METHOD = "OTHER"
STANDARD_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE")
)
DEFAULT_EXCLUDED = ("/metrics",)

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
RouteOf = Callable[[dict[str, Any]], str | None]
_DJANGO_FAILURE = "victor_mp_metrics.django_exception"


def set_endpoint(environ: MutableMapping[str, Any], template: str) -> None:
    """Name the route template of this request (a WSGI environ or an ASGI scope)."""
    environ[ENDPOINT_KEY] = template


def set_error_type(environ: MutableMapping[str, Any], error_type: str) -> None:
    """Name the ``error_type`` recorded if this request's status is an error (a WSGI
    environ or an ASGI scope; a FastAPI handler passes ``request.scope``)."""
    environ[ERROR_TYPE_KEY] = error_type


class RequestTracker:
    """One request: in flight from :meth:`begin`, counted once by :meth:`answered`, timed
    until :meth:`end` (idempotent). Recording errors are logged, never raised.

    ``traceparent`` (a W3C header) becomes the exemplar ``{"trace_id": ...}`` of the
    request's duration, and of the LLM and tool durations observed while it runs.
    """

    __slots__ = ("done", "endpoint", "exemplar", "method", "started")

    def __init__(self, method: str, traceparent: str | None = None) -> None:
        self.method = method if method in STANDARD_METHODS else OTHER_METHOD
        self.endpoint: str | None = None
        self.done = False
        self.started = 0.0
        self.exemplar = instrument.trace_exemplar(traceparent) if traceparent else None

    def begin(self) -> None:
        self.started = time.perf_counter()
        try:
            get_catalog().active_connections.inc()
        except Exception:
            log.exception("victor_mp_metrics: could not count the request in flight")
        if self.exemplar is not None:
            instrument.set_request_exemplar(self.exemplar)

    def answered(self, endpoint: str, status: int, error_type: str | None = None) -> None:
        """Count the request (the first call only) as its status goes to the server;
        ``error_type`` names the error of a status >= 400 (default: the status's own)."""
        if self.endpoint is not None:
            return
        self.endpoint = endpoint
        try:
            instrument.record_request(endpoint, self.method, status, None,
                                      error_type if status >= 400 else None)
        except Exception:
            log.exception("victor_mp_metrics: could not record request metrics")

    def end(self) -> None:
        if self.done:
            return
        self.done = True
        elapsed_ms = (time.perf_counter() - self.started) * 1000.0
        try:
            if self.endpoint is not None:  # timed before it leaves the in-flight gauge
                instrument.observe_request_duration(self.endpoint, self.method, elapsed_ms,
                                                    self.exemplar)
            get_catalog().active_connections.dec()
        except Exception:
            log.exception("victor_mp_metrics: could not record request metrics")
        if self.exemplar is not None:
            instrument.set_request_exemplar(None)


class MetricsMiddleware:
    """WSGI middleware recording the request metrics of ``app`` (see the module docstring).

    ``exclude_paths``: ``PATH_INFO`` values passed through unrecorded (the scrape path).
    ``route``: called with the environ when the response starts, returns the route
    template or None. With ``VICTOR_METRICS_ENABLED=false`` requests pass straight through.
    """

    def __init__(
        self,
        app: WSGIApp,
        *,
        exclude_paths: Iterable[str] = DEFAULT_EXCLUDED,
        route: RouteOf | None = None,
    ) -> None:
        self.app = app
        self.excluded = frozenset(exclude_paths)
        self.route = route
        self.enabled = _runtime.get_settings().enabled

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if not self.enabled or environ.get("PATH_INFO", "") in self.excluded:
            return self.app(environ, start_response)
        tracker = RequestTracker(environ.get("REQUEST_METHOD", ""),
                                 environ.get("HTTP_TRACEPARENT"))
        tracker.begin()

        def capture(status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
            self._answered(tracker, environ, int(status[:3]))
            return start_response(status, headers, *exc_info)

        try:
            body = self.app(environ, capture)
        except BaseException as exc:
            environ.setdefault(ERROR_TYPE_KEY, instrument.error_type_of(exc))
            self._answered(tracker, environ, 500)
            tracker.end()
            raise
        return ClosingBody(body, tracker)

    def _answered(self, tracker: RequestTracker, environ: dict[str, Any], status: int) -> None:
        if tracker.endpoint is None:
            tracker.answered(self.endpoint_of(environ), status, environ.get(ERROR_TYPE_KEY))

    def endpoint_of(self, environ: dict[str, Any]) -> str:
        """The route template of the request being answered, or ``<unmatched>``."""
        endpoint = environ.get(ENDPOINT_KEY)
        if endpoint is None and self.route is not None:
            try:
                endpoint = self.route(environ)
            except Exception:
                log.exception("victor_mp_metrics: the route callable failed")
        return endpoint if isinstance(endpoint, str) and endpoint else UNMATCHED


class ClosingBody:
    """The response iterable; ends its request when the server closes it."""

    __slots__ = ("_body", "_tracker")

    def __init__(self, body: Iterable[bytes], tracker: RequestTracker) -> None:
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


class DjangoRouteMiddleware:
    """Django middleware handing :class:`MetricsMiddleware` the matched URL pattern
    (``"/" + request.resolver_match.route``) and, for a view's exception that became a
    500, its ``error_type``. Put it first in ``MIDDLEWARE``; wrap the WSGI application
    (``MetricsMiddleware(get_wsgi_application())``) for the metrics themselves.
    """

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        response = self.get_response(request)
        meta = request.META
        match = getattr(request, "resolver_match", None)
        route = getattr(match, "route", None)
        if isinstance(route, str):
            set_endpoint(meta, "/" + route.removeprefix("^").removeprefix("/"))
        failure = meta.pop(_DJANGO_FAILURE, None)
        if failure is not None and getattr(response, "status_code", 200) >= 500:
            set_error_type(meta, failure)
        return response

    def process_exception(self, request: Any, exception: Exception) -> None:
        # Http404, PermissionDenied & co. become 4xx and keep their status's error_type.
        request.META[_DJANGO_FAILURE] = instrument.error_type_of(exception)


class FalconRouteMiddleware:
    """Falcon middleware handing :class:`MetricsMiddleware` the matched URI template
    (``req.uri_template``): ``falcon.App(middleware=[FalconRouteMiddleware()])``."""

    def process_response(self, req: Any, resp: Any, resource: Any, req_succeeded: bool) -> None:
        template = getattr(req, "uri_template", None)
        if isinstance(template, str) and template:
            set_endpoint(req.env, template)
