"""The Flask extension: labels, error types, in-flight gauge, scrape route, registration."""

from __future__ import annotations

import pytest
from flask import Flask, Response, abort

from victor_mp_metrics import gather
from victor_mp_metrics.flask_ext import VictorMetrics, error_type_for_status, set_error_type

from ._dirs import samples

# Every test here runs with the C and the Python WSGI request (see conftest).
pytestmark = pytest.mark.usefixtures("wsgi_request_implementation")


def _app(**config) -> Flask:
    app = Flask(__name__)
    app.config.update(config)
    VictorMetrics(app)

    @app.get("/items/<int:item>")
    def item(item: int) -> dict[str, int]:
        return {"item": item}

    @app.get("/boom")
    def boom() -> str:
        raise KeyError("boom")

    @app.get("/limited")
    def limited() -> str:
        abort(429)

    @app.get("/slow")
    def slow() -> str:
        set_error_type("upstream_timeout")
        abort(504)

    @app.get("/exit/<int:code>")
    def exits(code: int) -> str:
        raise SystemExit(code)  # what Gunicorn's timeout raises in a sync worker

    @app.get("/stream")
    def stream() -> Response:
        def chunks():
            yield "a"
            yield "b"

        return Response(chunks())

    return app


def _values() -> dict:
    return samples(gather())


def _requests(values: dict, endpoint: str, method: str = "GET") -> float:
    return values.get(
        ("victor_requests_total", (("endpoint", endpoint), ("method", method))), 0.0
    )


def test_registering_twice_says_to_use_the_existing_instance():
    """init_app on an app that already has the extension raises a clear error."""
    app = _app()
    with pytest.raises(RuntimeError, match=r"already registered.*app.extensions"):
        VictorMetrics(app)


def test_labels_are_route_templates_and_standard_methods():
    """endpoint is the route template (or <unmatched>), method a standard one or OTHER."""
    client = _app().test_client()
    for path in ("/items/1", "/items/2", "/items/3?user=9"):
        client.get(path, buffered=True)
    client.get("/nowhere/42", buffered=True)
    client.open("/items/1", method="BREW", buffered=True)
    values = _values()
    assert 3.0 == _requests(values, "/items/<int:item>")
    assert 1.0 == _requests(values, "<unmatched>")
    assert 1.0 == _requests(values, "<unmatched>", "OTHER")


@pytest.mark.parametrize(
    ("path", "endpoint", "error_type"),
    [
        ("/boom", "/boom", "KeyError"),
        ("/limited", "/limited", "rate_limit"),
        ("/slow", "/slow", "upstream_timeout"),
        ("/nowhere", "<unmatched>", "not_found"),
    ],
)
def test_error_types(path: str, endpoint: str, error_type: str):
    """Errors are named: the exception class, rate_limit for 429, set_error_type, status."""
    _app().test_client().get(path, buffered=True)
    key = ("victor_request_errors_total",
           (("endpoint", endpoint), ("error_type", error_type), ("method", "GET")))
    assert 1.0 == _values()[key]


@pytest.mark.parametrize(
    ("status", "expected"),
    [(200, None), (302, None), (400, "bad_request"), (418, "client_error"), (429, "rate_limit"),
     (500, "server_error"), (503, "unavailable"), (599, "server_error")],
)
def test_error_type_for_status(status: int, expected: str | None):
    """Every status maps to a stable error_type (None for successes)."""
    assert expected == error_type_for_status(status)


def test_streamed_response_is_in_flight_until_closed():
    """A streamed response counts as in flight until the server closes it."""
    client = _app().test_client()
    response = client.get("/stream")
    assert 1.0 == _values()[("victor_active_connections", ())]
    assert b"ab" == response.get_data()
    response.close()
    values = _values()
    assert 0.0 == values[("victor_active_connections", ())]
    assert 1.0 == values[("victor_request_duration_ms_count",
                          (("endpoint", "/stream"), ("method", "GET")))]


def test_scrape_path_is_configurable_and_not_recorded():
    """VICTOR_METRICS_PATH moves the scrape route; scrapes are not counted as requests."""
    client = _app(VICTOR_METRICS_PATH="/internal/metrics").test_client()
    assert 404 == client.get("/metrics", buffered=True).status_code
    scrape = client.get("/internal/metrics", buffered=True)
    assert 200 == scrape.status_code and b"victor_requests_total" in scrape.data
    values = _values()
    assert 0.0 == _requests(values, "/internal/metrics")
    assert 1.0 == _requests(values, "<unmatched>")  # the /metrics 404


def test_scrape_route_can_be_left_out():
    """VICTOR_METRICS_SERVE=False registers no route (serve /metrics elsewhere)."""
    client = _app(VICTOR_METRICS_SERVE=False).test_client()
    assert 404 == client.get("/metrics", buffered=True).status_code


@pytest.mark.parametrize("propagate", [False, True])
def test_a_request_ended_by_an_exception_flask_does_not_handle_keeps_its_route(propagate):
    """SystemExit (a worker timeout) or a propagated exception leaves Flask without its
    request object; the request is still counted on its route template, once."""
    app = _app(PROPAGATE_EXCEPTIONS=propagate)
    client = app.test_client()
    with pytest.raises(SystemExit):
        client.get("/exit/3")
    if propagate:
        with pytest.raises(KeyError):
            client.get("/boom")
    values = _values()
    assert 1.0 == _requests(values, "/exit/<int:code>")
    errors = ("victor_request_errors_total", (("endpoint", "/exit/<int:code>"),
                                              ("error_type", "aborted"), ("method", "GET")))
    assert 1.0 == values.get(errors, 0.0)
    if propagate:
        assert 1.0 == _requests(values, "/boom")
    gauge = ("victor_active_connections", ())
    assert 0.0 == values.get(gauge, 0.0)
