"""Request metrics for ASGI apps: Starlette, FastAPI, or any ASGI 3 app.

Usage (inside Starlette's error handling, so an exception is recorded by its type)::

    app = FastAPI()
    app.add_middleware(MetricsMiddleware)

or around any ASGI app: ``app = MetricsMiddleware(app)``. HTTP requests are recorded as
the WSGI middleware records them (:class:`.instrument.RequestTracker`, the same life cycle):
in flight from the first moment, counted when ``http.response.start`` goes out, timed
until the final ``http.response.body`` (``more_body`` false) has been sent, so streamed
responses are timed to their last byte. WebSocket and lifespan scopes pass through.

The route template comes from ``scope[ENDPOINT_KEY]`` if the app set it
(:func:`.wsgi.set_endpoint`), else from ``scope["route"].path``, which Starlette's router
sets on the scope after routing (prefixed with the path of the ``Mount`` it is in);
otherwise the request is ``<unmatched>``. A handler names the ``error_type`` of its
error response with ``set_error_type(request.scope, "rate_limit")``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from . import _runtime, instrument
from .instrument import RequestTracker
from .wsgi import (
    DEFAULT_EXCLUDED,
    ENDPOINT_KEY,
    ERROR_TYPE_KEY,
    UNMATCHED,
    set_endpoint,
    set_error_type,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

__all__ = ["MetricsMiddleware", "endpoint_of", "set_endpoint", "set_error_type"]


def endpoint_of(scope: Scope, root_path: str = "") -> str:
    """The route template of a routed request, or ``<unmatched>``.

    ``root_path`` is the scope's ``root_path`` before routing: what a ``Mount`` added to
    it since is the mount's path, put before the route's own.
    """
    explicit = scope.get(ENDPOINT_KEY)
    if isinstance(explicit, str) and explicit:
        return explicit
    route = scope.get("route")
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return UNMATCHED
    current = scope.get("root_path", "")
    prefix = current.removeprefix(root_path) if current.startswith(root_path) else ""
    if hasattr(route, "routes"):  # a Mount whose app is not a router: its own path
        return prefix or path or UNMATCHED
    return prefix + path or UNMATCHED


class MetricsMiddleware:
    """ASGI middleware recording the request metrics of ``app`` (see the module docstring).

    ``exclude_paths``: paths passed through unrecorded (the scrape path). With
    ``VICTOR_METRICS_ENABLED=false`` requests pass straight through.
    """

    def __init__(self, app: ASGIApp, *, exclude_paths: Iterable[str] = DEFAULT_EXCLUDED) -> None:
        self.app = app
        self.excluded = frozenset(exclude_paths)
        self.enabled = _runtime.get_settings().enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.enabled or scope["type"] != "http" or scope.get("path") in self.excluded:
            await self.app(scope, receive, send)
            return
        tracker = RequestTracker(scope.get("method", ""), _header(scope, b"traceparent"))
        root_path = scope.get("root_path", "")

        async def tracked_send(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                tracker.answered(
                    endpoint_of(scope, root_path), int(message["status"]), scope.get(ERROR_TYPE_KEY)
                )
            await send(message)
            if kind == "http.response.body" and not message.get("more_body", False):
                tracker.end()

        try:
            await self.app(scope, receive, tracked_send)
        except BaseException as exc:
            scope.setdefault(ERROR_TYPE_KEY, instrument.error_type_of(exc))
            tracker.answered(endpoint_of(scope, root_path), 500, scope[ERROR_TYPE_KEY])
            raise
        finally:
            if tracker.endpoint is None:  # no response: the server answers 500 for the app
                tracker.answered(endpoint_of(scope, root_path), 500, scope.get(ERROR_TYPE_KEY))
            tracker.end()


def _header(scope: Scope, name: bytes) -> str | None:
    """One request header of an ASGI scope, decoded; None when absent."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None
