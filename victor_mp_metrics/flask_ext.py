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
from typing import Any

from flask import Flask, Response, got_request_exception, request

from . import _runtime, instrument, wsgi
from ._exposition import render
from .instrument import error_type_for_status  # noqa: F401 - re-exported
from .wsgi import OTHER_METHOD, STANDARD_METHODS, UNMATCHED  # noqa: F401 - re-exported

log = logging.getLogger("victor_mp_metrics")

EXTENSION_KEY = "victor_mp_metrics"
_ERROR_KEY = wsgi.ERROR_TYPE_KEY


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
            app.wsgi_app = wsgi.MetricsMiddleware(  # type: ignore[method-assign]
                app.wsgi_app, exclude_paths=excluded, route=_route_of(app)
            )
        if serve:
            app.add_url_rule(path, "victor_metrics", _metrics_view, methods=["GET"])


def _remember_exception(sender: Flask, exception: BaseException, **extra: Any) -> None:
    # Sent by Flask for an unhandled exception, before it builds the 500 response.
    request.environ.setdefault(_ERROR_KEY, instrument.error_type_of(exception))


def _metrics_view() -> Response:
    status, headers, body = render(dict(request.headers.items()), request.args.to_dict(flat=False))
    return Response(body, status=status, headers=headers)


def _route_of(app: Flask) -> wsgi.RouteOf:
    url_map = app.url_map

    def route(environ: dict[str, Any]) -> str | None:
        req = environ.get("werkzeug.request")
        if req is not None:
            rule = req.url_rule
            return rule.rule if rule is not None else None
        # A request ended by an exception Flask does not handle (SystemExit of a worker
        # timeout) is counted after Flask dropped its request from the environ: match again.
        try:
            adapter = url_map.bind_to_environ(environ, server_name=app.config["SERVER_NAME"],
                                              subdomain=url_map.default_subdomain or None)
            matched, _args = adapter.match(return_rule=True)
        except Exception:  # no route (404, 405, a redirect): <unmatched>
            return None
        return matched.rule

    return route
