"""Security: authenticated scrapes, private files, bounded labels from hostile requests."""

from __future__ import annotations

import base64
import random
import string
from pathlib import Path
from urllib.parse import quote

import pytest
from flask import Flask

from victor_mp_metrics import _runtime, start_metrics_server
from victor_mp_metrics.flask_ext import VictorMetrics

from ._dirs import ours
from ._gunicorn import request

TOKEN = "s3cret-token"
BASIC = "prom:pa55"


def _app() -> Flask:
    app = Flask(__name__)
    VictorMetrics(app)

    @app.get("/items/<int:item>")
    def item(item: int) -> dict[str, int]:
        return {"item": item}

    return app


def _basic(credentials: str) -> str:
    return "Basic " + base64.b64encode(credentials.encode()).decode()


@pytest.mark.parametrize(
    ("env", "authorization", "status"),
    [
        ({"VICTOR_METRICS_AUTH_TOKEN": TOKEN}, None, 401),
        ({"VICTOR_METRICS_AUTH_TOKEN": TOKEN}, "Bearer wrong", 401),
        ({"VICTOR_METRICS_AUTH_TOKEN": TOKEN}, f"Bearer {TOKEN}x", 401),
        ({"VICTOR_METRICS_AUTH_TOKEN": TOKEN}, _basic(BASIC), 401),
        ({"VICTOR_METRICS_AUTH_TOKEN": TOKEN}, f"Bearer {TOKEN}", 200),
        ({"VICTOR_METRICS_AUTH_TOKEN": TOKEN}, f"bearer {TOKEN}", 200),
        ({"VICTOR_METRICS_BASIC_AUTH": BASIC}, None, 401),
        ({"VICTOR_METRICS_BASIC_AUTH": BASIC}, _basic("prom:wrong"), 401),
        ({"VICTOR_METRICS_BASIC_AUTH": BASIC}, "Basic !!!not-base64", 401),
        ({"VICTOR_METRICS_BASIC_AUTH": BASIC}, _basic(BASIC), 200),
        ({}, None, 200),
    ],
)
def test_app_metrics_route_requires_configured_credentials(
    monkeypatch, env: dict[str, str], authorization: str | None, status: int
):
    """/metrics answers 401 (with a challenge) unless the configured credentials are sent."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    client = _app().test_client()
    headers = {"Authorization": authorization} if authorization else {}
    resp = client.get("/metrics", headers=headers)
    assert status == resp.status_code
    if status == 401:
        assert "WWW-Authenticate" in resp.headers
        assert b"victor_" not in resp.data


def test_standalone_server_requires_token_and_binds_where_told(monkeypatch):
    """The standalone server checks the token too, and binds to VICTOR_METRICS_ADDR."""
    monkeypatch.setenv("VICTOR_METRICS_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("VICTOR_METRICS_ADDR", "127.0.0.1")
    server = start_metrics_server(port=0)
    try:
        assert "127.0.0.1" == server.addr
        url = f"http://127.0.0.1:{server.port}/metrics"
        assert 401 == request(url).status
        ok = request(url, headers={"Authorization": f"Bearer {TOKEN}"})
        assert 200 == ok.status and b"victor_metrics_scrape_duration_seconds" in ok.body
    finally:
        server.stop()


def test_hostile_requests_keep_request_series_bounded(metrics_dir: Path):
    """100k random paths, odd methods and huge headers add no series beyond route templates."""
    client = _app().test_client()
    rng = random.Random(7)
    for i in range(100_000):
        raw = "".join(rng.choices(string.printable + "üé€", k=rng.randint(1, 40)))
        path = "/r" + quote(raw, safe="/?=&")  # "//x" would be read as a host
        if i % 1000 == 0:
            path = f"/items/{i}?user_id={i}&token=abc"
        client.get(path, buffered=True)
    for method in ["BREW", "PROPFIND", "X" * 200, "get", "DELETE"]:
        client.open("/items/1", method=method, buffered=True)
    client.get("/items/2", headers={"X-Huge": "h" * 60_000, "Cookie": "c" * 8000}, buffered=True)

    series = ours(metrics_dir)
    requests = {k for k in series if k[0] == "victor_requests_total"}
    endpoints = {dict(labels)["endpoint"] for _, labels in requests}
    methods = {dict(labels)["method"] for _, labels in requests}
    assert {"<unmatched>", "/items/<int:item>"} == endpoints
    assert {"GET", "DELETE", "OTHER"} == methods
    assert 100_000 + 6 == sum(series[k] for k in requests)
    assert not any("user_id" in str(k) or "token" in str(k) for k in series)


def test_disabled_metrics_write_no_files(tmp_path: Path, monkeypatch):
    """With VICTOR_METRICS_ENABLED=false requests work, /metrics says so, no file is written."""
    directory = tmp_path / "m"
    directory.mkdir(mode=0o700)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    monkeypatch.setenv("VICTOR_METRICS_ENABLED", "false")
    _runtime.configure()
    client = _app().test_client()
    assert 200 == client.get("/items/3").status_code
    resp = client.get("/metrics")
    assert 200 == resp.status_code and b"disabled" in resp.data
    assert [] == list(directory.iterdir())
