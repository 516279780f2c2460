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
``OTHER``. :class:`.instrument.RequestTracker` is the one implementation of this life
cycle, shared by the ASGI middleware (:mod:`.asgi`); ``_wsgi_request.Request`` (an optional
C extension) is the WSGI request object in C, for requests without a ``traceparent``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any

from . import _runtime, instrument
from .instrument import OTHER_METHOD, STANDARD_METHODS, RequestTracker

__all__ = [
    "DEFAULT_EXCLUDED", "ENDPOINT_KEY", "ERROR_TYPE_KEY", "OTHER_METHOD", "STANDARD_METHODS",
    "UNMATCHED", "DjangoRouteMiddleware", "FalconRouteMiddleware",
    "MetricsMiddleware", "RequestTracker", "set_endpoint", "set_error_type",
]

log = logging.getLogger("victor_mp_metrics")

ENDPOINT_KEY = "victor_mp_metrics.endpoint"
ERROR_TYPE_KEY = "victor_mp_metrics.error_type"
UNMATCHED = "<unmatched>"
DEFAULT_EXCLUDED = ("/metrics",)

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
RouteOf = Callable[[dict[str, Any]], str | None]
_DJANGO_FAILURE = "victor_mp_metrics.django_exception"

_FastRequest: Any = None  # _wsgi_request.Request: _Request in C, when it was built
try:
    from ._wsgi_request import Request as _CRequest
    from ._wsgi_request import set_error_type_key as _set_error_type_key
except ImportError:  # built without a C compiler
    pass
else:
    _set_error_type_key(ERROR_TYPE_KEY)
    _FastRequest = _CRequest


def set_endpoint(environ: MutableMapping[str, Any], template: str) -> None:
    """Name the route template of this request (a WSGI environ or an ASGI scope)."""
    environ[ENDPOINT_KEY] = template


def set_error_type(environ: MutableMapping[str, Any], error_type: str) -> None:
    """Name the ``error_type`` recorded if this request's status is an error (a WSGI
    environ or an ASGI scope; a FastAPI handler passes ``request.scope``)."""
    environ[ERROR_TYPE_KEY] = error_type


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
        traceparent = environ.get("HTTP_TRACEPARENT")
        request: Any
        if traceparent is None and _FastRequest is not None:
            request = _FastRequest(environ.get("REQUEST_METHOD", ""), environ, start_response,
                                   self)
        else:  # an exemplar to attach, or no C: the same request in Python
            request = _Request(environ.get("REQUEST_METHOD", ""), traceparent)
            request.environ = environ
            request.start_response = start_response
            request.middleware = self
        try:
            request.body = self.app(environ, request.capture)
        except BaseException as exc:
            environ.setdefault(ERROR_TYPE_KEY, instrument.error_type_of(exc))
            if request.endpoint is None:
                request.answered(self.endpoint_of(environ), 500, environ[ERROR_TYPE_KEY])
            request.end()
            raise
        return request

    def endpoint_of(self, environ: dict[str, Any]) -> str:
        """The route template of the request being answered, or ``<unmatched>``."""
        endpoint = environ.get(ENDPOINT_KEY)
        if endpoint is None and self.route is not None:
            try:
                endpoint = self.route(environ)
            except Exception:
                log.exception("victor_mp_metrics: the route callable failed")
        return endpoint if isinstance(endpoint, str) and endpoint else UNMATCHED


class _Request(RequestTracker):
    """One WSGI request: its tracker, the ``start_response`` the app calls (counting the
    request) and the response iterable the server gets (ending it on ``close()``). One
    object per request, not three: the request path's cost is its frames and objects.

    ``_wsgi_request.Request`` (optional C extension) is the same object in C, used for
    requests without a ``traceparent``; ``tests/test_wsgi_asgi.py`` and
    ``tests/test_flask_ext.py`` run against both."""

    __slots__ = ("body", "environ", "middleware", "start_response")

    body: Iterable[bytes]
    environ: dict[str, Any]
    middleware: MetricsMiddleware
    start_response: Callable[..., Any]

    def capture(self, status: str, headers: list[tuple[str, str]], *exc_info: Any) -> Any:
        """The app's ``start_response``: count the request (unless it is counted already:
        a second call with ``exc_info``), then hand the response to the server."""
        if self.endpoint is None:
            environ = self.environ
            self.answered(self.middleware.endpoint_of(environ), int(status[:3]),
                          environ.get(ERROR_TYPE_KEY))
        return self.start_response(status, headers, *exc_info)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.body)

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            self.end()


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
