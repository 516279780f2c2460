"""The generic WSGI and ASGI middlewares, in process: plain WSGI, Django, Falcon, Starlette,
FastAPI. Same metrics and rules as the Flask extension: route templates, ``<unmatched>``,
``OTHER``, the status -> error_type rule, exceptions by type, streams timed to the end."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from werkzeug.test import Client

from victor_mp_metrics import gather
from victor_mp_metrics.wsgi import MetricsMiddleware, set_endpoint

from ._dirs import samples
from ._tools import require_module

# Every test here runs with the C and the Python WSGI request (see conftest).
pytestmark = pytest.mark.usefixtures("wsgi_request_implementation")

Labels = tuple[tuple[str, str], ...]


def need(module: str) -> Any:
    """Import ``module``, a package of the test extra (see ``_tools.require_module``)."""
    return require_module(module, "it comes with the test extra: pip install -e '.[test]'")


def _values() -> dict[tuple[str, Labels], float]:
    return samples(gather())


def _requests(endpoint: str, method: str = "GET") -> float:
    key = ("victor_requests_total", (("endpoint", endpoint), ("method", method)))
    return _values().get(key, 0.0)


def _errors() -> dict[tuple[str, str], float]:
    """{(endpoint, error_type): count} of victor_request_errors_total."""
    return {
        (dict(labels)["endpoint"], dict(labels)["error_type"]): value
        for (name, labels), value in _values().items()
        if name == "victor_request_errors_total" and value
    }


def _durations(endpoint: str, method: str = "GET") -> tuple[float, float]:
    """(count, sum in ms) of victor_request_duration_ms for the route."""
    labels = (("endpoint", endpoint), ("method", method))
    values = _values()
    return (values.get(("victor_request_duration_ms_count", labels), 0.0),
            values.get(("victor_request_duration_ms_sum", labels), 0.0))


def _in_flight() -> float:
    return _values()[("victor_active_connections", ())]


# -- plain WSGI --


def _plain_app(environ: dict[str, Any], start_response: Any) -> Any:
    path = environ["PATH_INFO"]
    if path == "/boom":
        raise LookupError("boom")
    if path.startswith("/users/"):
        set_endpoint(environ, "/users/{id}")
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return _chunks(3)
    status = "404 Not Found" if path == "/missing" else "200 OK"
    start_response(status, [("Content-Type", "text/plain")])
    return [b"ok"]


def _chunks(count: int) -> Iterator[bytes]:
    for i in range(count):
        time.sleep(0.05)
        yield b"%d\n" % i


def test_plain_wsgi_labels_are_templates_or_unmatched() -> None:
    """No route known: <unmatched>; set_endpoint or the route callable name the template."""
    app = MetricsMiddleware(_plain_app, route=lambda env: "/known" if env["PATH_INFO"] == "/k"
                            else None)
    client = Client(app)
    for path in ("/users/1", "/users/2", "/k", "/raw/42", "/missing"):
        client.get(path).close()
    client.open("/k", method="BREW").close()
    client.get("/metrics").close()

    assert (2, 1, 1) == (_requests("/users/{id}"), _requests("/known"),
                         _requests("/known", "OTHER"))
    assert 2 == _requests("<unmatched>")
    assert {("<unmatched>", "not_found"): 1} == _errors()
    assert 0 == _requests("/metrics")
    assert 0 == _in_flight()


def test_plain_wsgi_exception_is_a_500_named_by_its_type_and_reraised() -> None:
    """An exception out of the app: counted 500 with error_type LookupError, then raised."""
    with pytest.raises(LookupError):
        Client(MetricsMiddleware(_plain_app)).get("/boom")
    assert {("<unmatched>", "LookupError"): 1} == _errors()
    assert (1, 0) == (_durations("<unmatched>")[0], _in_flight())


def test_plain_wsgi_stream_is_in_flight_and_timed_until_closed() -> None:
    """A streamed body: in flight while it is read, its duration covers every chunk."""
    response = Client(MetricsMiddleware(_plain_app)).get("/stream")
    assert (1, 1) == (_requests("<unmatched>"), _in_flight())
    assert b"0\n1\n2\n" == response.get_data()
    response.close()
    count, total_ms = _durations("<unmatched>")
    assert (1, 0) == (count, _in_flight())
    assert total_ms >= 150


def test_plain_wsgi_disabled_passes_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """VICTOR_METRICS_ENABLED=false: the app answers, nothing is recorded."""
    monkeypatch.setenv("VICTOR_METRICS_ENABLED", "false")
    response = Client(MetricsMiddleware(_plain_app)).get("/users/1")
    assert (200, []) == (response.status_code, gather())


# -- Django --


@pytest.fixture(scope="module")
def django_app() -> Any:
    need("django")
    from examples.django.wsgi import application

    return application


def test_django_routes_errors_and_streams(django_app: Any) -> None:
    """Django: URL patterns as templates, 404 <unmatched>, set_error_type, a view's exception."""
    client = Client(django_app)
    for path in ("/items/1", "/items/2", "/healthz", "/nope/3"):
        client.get(path).close()
    post = {"content_type": "application/json"}
    client.post("/chat", data=json.dumps({"message": "a b"}), **post).close()
    client.post("/chat", data=json.dumps({"simulate_error": "rate_limit"}), **post).close()
    client.post("/chat", data=json.dumps({"simulate_error": "crash"}), **post).close()
    streamed = client.get("/stream/3")
    assert 1 == _in_flight()
    assert b"0\n1\n2\n" == streamed.get_data()
    streamed.close()
    client.get("/metrics").close()

    assert (2, 1, 3) == (_requests("/items/<int:item_id>"), _requests("/healthz"),
                         _requests("/chat", "POST"))
    assert 1 == _requests("<unmatched>")
    assert {("<unmatched>", "not_found"): 1, ("/chat", "rate_limit"): 1,
            ("/chat", "RuntimeError"): 1} == _errors()
    assert _durations("/stream/<int:chunks>")[1] >= 60
    assert (0, 0) == (_requests("/metrics"), _in_flight())


# -- Falcon --


def test_falcon_uri_templates() -> None:
    """Falcon: req.uri_template names the route; an unrouted path is <unmatched>."""
    falcon = need("falcon")
    from victor_mp_metrics.wsgi import FalconRouteMiddleware

    class Item:
        def on_get(self, req: Any, resp: Any, item_id: int) -> None:
            resp.media = {"item": item_id}

    api = falcon.App(middleware=[FalconRouteMiddleware()])
    api.add_route("/items/{item_id:int}", Item())
    client = Client(MetricsMiddleware(api))
    for path in ("/items/1", "/items/2", "/other"):
        client.get(path).close()
    assert (2, 1) == (_requests("/items/{item_id:int}"), _requests("<unmatched>"))
    assert {("<unmatched>", "not_found"): 1} == _errors()


# -- ASGI: Starlette and FastAPI --


@pytest.fixture
def starlette_client() -> Iterator[Any]:
    testclient = need("starlette.testclient")
    from .apps.asgi_app import app

    with testclient.TestClient(app, raise_server_exceptions=False) as client:
        yield client


def test_starlette_routes_mounts_methods_and_errors(starlette_client: Any) -> None:
    """Route paths as templates (a Mount's prefix included), <unmatched>, OTHER, error types."""
    client = starlette_client
    for path in ("/items/1", "/items/2", "/v1/users/7", "/nowhere/9", "/limited", "/boom"):
        client.get(path)
    client.request("BREW", "/ok")
    client.get("/metrics")

    assert (2, 1) == (_requests("/items/{item_id:int}"), _requests("/v1/users/{user_id:int}"))
    assert (1, 1) == (_requests("<unmatched>"), _requests("/ok", "OTHER"))
    assert {
        ("<unmatched>", "not_found"): 1,
        ("/limited", "upstream_rate_limit"): 1,
        ("/boom", "KeyError"): 1,
        ("/ok", "method_not_allowed"): 1,
    } == _errors()
    assert (0, 0) == (_requests("/metrics"), _in_flight())


def test_starlette_stream_is_timed_to_its_last_byte() -> None:
    """A StreamingResponse: in flight until the final body message, timed over all chunks."""
    need("starlette")
    from .apps.asgi_app import app

    seen: list[tuple[str, bool, float]] = []  # (message type, more_body, in flight then)

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(5)  # the client never disconnects during the test
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        seen.append((message["type"], message.get("more_body", False), _in_flight()))

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": "/stream/4", "raw_path": b"/stream/4",
             "root_path": "", "query_string": b"", "headers": [],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}  # fmt: skip
    asyncio.run(app(scope, receive, send))

    bodies = [(more, flight) for kind, more, flight in seen if kind == "http.response.body"]
    assert [(True, 1)] * 4 == bodies[:4]
    assert (False, 1) == bodies[-1]  # sent, then ended: the gauge drops after the last byte
    count, total_ms = _durations("/stream/{chunks:int}")
    assert (1, 0) == (count, _in_flight())
    assert total_ms >= 200


def test_fastapi_example_counts_chats_and_llm_calls() -> None:
    """The FastAPI example: /chat counted by template, its rate_limit error named."""
    need("fastapi")
    testclient = need("starlette.testclient")
    from examples.asgi.app import app

    with testclient.TestClient(app) as client:
        for _ in range(5):
            assert 200 == client.post("/chat", json={"message": "a b c"}).status_code
        limited = client.post("/chat", json={"message": "x", "simulate_error": "rate_limit"})
        scrape = client.get("/metrics")

    assert 429 == limited.status_code
    assert 6 == _requests("/chat", "POST")
    assert {("/chat", "rate_limit"): 1} == _errors()
    assert "victor_requests_total" in scrape.text
    llm = (("model", "claude-sonnet-4-5"), ("provider", "anthropic"))
    assert 6 == _values()[("victor_llm_requests_total", llm)]
