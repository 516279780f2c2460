"""The Victor AI reference app in one process (Flask test client, no Gunicorn)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

import app as app_package
from app import create_app
from app.coordinator import ToolSelectionCache
from app.routes import EXTENSION_KEY
from app.tools import TOOLS, Tool
from victor_mp_metrics import configure
from victor_mp_metrics._exposition import DISABLED_BODY, gather
from victor_mp_metrics.catalog import CATALOG
from victor_mp_metrics.flask_ext import UNMATCHED

SANDBOX = Path(app_package.__file__).parent / "sandbox"
CHAT = {"endpoint": "/chat", "method": "POST"}
SONNET = {"provider": "anthropic", "model": "claude-sonnet-4-5"}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples() -> Samples:
    """Every sample gather() returns, as {(sample name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in gather()
        for s in family.samples
    }


def value(name: str, **labels: str) -> float | None:
    """The sample ``name`` with exactly ``labels``, None if there is none."""
    return samples().get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch) -> Flask:
    """A fresh app without simulated LLM latency."""
    monkeypatch.setenv("VICTOR_APP_LLM_LATENCY_MS", "0")
    return create_app()


@pytest.fixture
def client(app: Flask) -> Iterator[FlaskClient]:
    with app.test_client() as c:
        yield c


def post(client: FlaskClient, body: Any = None, data: bytes | None = None) -> TestResponse:
    """POST /chat. buffered=True closes the response, as a server does, which is when the
    extension records the request."""
    if data is None:
        data = json.dumps(body).encode()
    return client.post("/chat", data=data, content_type="application/json", buffered=True)


def cache(app: Flask) -> ToolSelectionCache:
    return app.extensions[EXTENSION_KEY].coordinator.cache  # type: ignore[no-any-return]


# --- routes ------------------------------------------------------------------------------


def test_healthz_answers_ok_with_the_worker_pid(client: FlaskClient) -> None:
    """GET /healthz answers 200 {"status": "ok", "worker_pid": <this process>}."""
    response = client.get("/healthz", buffered=True)
    assert 200 == response.status_code
    assert {"status": "ok", "worker_pid": os.getpid()} == response.get_json()
    assert 1.0 == value("victor_requests_total", endpoint="/healthz", method="GET")


def test_chat_replies_with_deterministic_text_and_tokens(client: FlaskClient) -> None:
    """Prompt tokens are the message's words, completion tokens the reply's words."""
    response = post(client, {"message": "one two  three\nfour"})
    assert 200 == response.status_code
    expected: dict[str, Any] = {
        "reply": "claude-sonnet-4-5 read 4 word(s).",
        "provider": "anthropic",
        "model": "claude-sonnet-4-5",
        "usage": {"prompt_tokens": 4, "completion_tokens": 4},
        "tools": [],
        "tool_selection": None,
    }
    assert expected == response.get_json()


def test_chat_records_request_and_llm_metrics(client: FlaskClient) -> None:
    """One chat: one request, one LLM call with its tokens, no errors, nothing in flight."""
    post(client, {"message": "hello there", "provider": "openai", "model": "gpt-4o-mini"})
    post(client, {"message": "a b c", "provider": "openai", "model": "gpt-4o-mini"})
    llm = {"provider": "openai", "model": "gpt-4o-mini"}
    assert 2.0 == value("victor_requests_total", **CHAT)
    assert 2.0 == value("victor_request_duration_ms_count", **CHAT)
    assert 2.0 == value("victor_llm_requests_total", **llm)
    assert 2.0 == value("victor_llm_duration_ms_count", **llm)
    assert 5.0 == value("victor_llm_tokens_total", **llm, type="prompt")
    assert 8.0 == value("victor_llm_tokens_total", **llm, type="completion")
    assert [] == [k for k in samples() if k[0].endswith("errors_total")]
    assert 0.0 == value("victor_active_connections")


@pytest.mark.parametrize(
    ("provider", "model", "expected_model"),
    [
        (None, None, "claude-sonnet-4-5"),
        ("anthropic", "claude-haiku-4-5", "claude-haiku-4-5"),
        ("openai", None, "gpt-4o"),
        ("local", None, "llama-3.1-8b"),
    ],
)
def test_provider_and_model_default_per_provider(
    client: FlaskClient, provider: str | None, model: str | None, expected_model: str
) -> None:
    """A missing provider is anthropic; a missing model is the provider's first model."""
    body = json.loads(post(client, {"message": "hi", "provider": provider, "model": model}).data)
    assert (provider or "anthropic", expected_model) == (body["provider"], body["model"])
    assert 1.0 == value(
        "victor_llm_requests_total", provider=provider or "anthropic", model=expected_model
    )


def test_latency_is_read_when_the_app_is_created(monkeypatch: pytest.MonkeyPatch) -> None:
    """VICTOR_APP_LLM_LATENCY_MS set after import is used: each LLM call takes at least that."""
    monkeypatch.setenv("VICTOR_APP_LLM_LATENCY_MS", "30")
    app = create_app()
    assert 30.0 == app.config["VICTOR_APP_LLM_LATENCY_MS"]
    post(app.test_client(), {"message": "slow"})
    assert 1.0 == value("victor_llm_duration_ms_count", **SONNET)
    assert 30.0 <= value("victor_llm_duration_ms_sum", **SONNET)  # type: ignore[operator]


def test_config_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """create_app(config) values win over the environment variables of the same name."""
    monkeypatch.setenv("VICTOR_APP_LLM_LATENCY_MS", "7")
    monkeypatch.setenv("VICTOR_APP_TOOL_CACHE_ENTRIES", "3")
    app = create_app({"VICTOR_APP_LLM_LATENCY_MS": 0, "VICTOR_APP_TOOL_CACHE_ENTRIES": None})
    assert (0.0, 3) == (
        app.config["VICTOR_APP_LLM_LATENCY_MS"],
        app.config["VICTOR_APP_TOOL_CACHE_ENTRIES"],
    )


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("VICTOR_APP_LLM_LATENCY_MS", "fast",
         "the environment variable VICTOR_APP_LLM_LATENCY_MS = 'fast' is not valid: expected "
         "a number of milliseconds from 0 to 60000, such as 5 or 0.5."),
        ("VICTOR_APP_LLM_LATENCY_MS", "-1",
         "the environment variable VICTOR_APP_LLM_LATENCY_MS = '-1' is not valid: expected "
         "a number of milliseconds from 0 to 60000, such as 5 or 0.5."),
        ("VICTOR_APP_TOOL_CACHE_ENTRIES", "0",
         "the environment variable VICTOR_APP_TOOL_CACHE_ENTRIES = '0' is not valid: expected "
         "a whole number >= 1, such as 256."),
        ("VICTOR_APP_SANDBOX", "/nonexistent/victor",
         "the environment variable VICTOR_APP_SANDBOX = '/nonexistent/victor' is not valid: "
         "expected an existing directory holding the files read_file may read (unset it for "
         "the bundled app/sandbox)."),
    ],
)  # fmt: skip
def test_bad_app_settings_are_refused_with_the_fix(
    monkeypatch: pytest.MonkeyPatch, key: str, raw: str, expected: str
) -> None:
    """A bad VICTOR_APP_* value stops create_app with a message naming it and what is accepted."""
    monkeypatch.setenv(key, raw)
    with pytest.raises(ValueError) as info:
        create_app()
    assert expected == str(info.value)


def test_module_attribute_app_is_created_once_on_first_access() -> None:
    """`app:app` (what Gunicorn loads) is one Flask app, created lazily by create_app()."""
    first = app_package.app
    assert isinstance(first, Flask)
    assert first is app_package.app
    with pytest.raises(AttributeError):
        app_package.no_such_attribute  # noqa: B018


# --- bad input -----------------------------------------------------------------------------


BAD_REQUESTS: list[tuple[Any, str]] = [
    (b"not json", "the body is not valid JSON: Expecting value: line 1 column 1 (char 0)"),
    (b"", "the body is not valid JSON: Expecting value: line 1 column 1 (char 0)"),
    (b"\xff\xfe\xfa", "the body is not valid JSON"),
    (b"[" * 100_000, "the body is not valid JSON: nested too deeply"),
    (["hello"], 'the body must be a JSON object such as {"message": "Hello"}, got list'),
    (None, 'the body must be a JSON object such as {"message": "Hello"}, got NoneType'),
    ({}, "'message' is required: a non-empty string"),
    ({"message": 42}, "'message' must be a string, got int"),
    ({"message": "  \n"}, "'message' must not be empty"),
    ({"message": "hi", "temperature": 1},
     "unknown field(s) 'temperature'; accepted fields: 'message', 'provider', 'model', "
     "'tools', 'simulate_error'"),
    ({"message": "hi", "provider": "acme"},
     "unknown provider 'acme'; known providers: 'anthropic', 'openai', 'local'"),
    ({"message": "hi", "provider": ["openai"]}, "'provider' must be a string, got list"),
    ({"message": "hi", "provider": ""},
     "unknown provider ''; known providers: 'anthropic', 'openai', 'local'"),
    ({"message": "hi", "model": ""},
     "unknown model '' for provider 'anthropic'; its models: 'claude-sonnet-4-5', "
     "'claude-haiku-4-5', 'claude-opus-4-1'"),
    ({"message": "hi", "provider": "openai", "model": "claude-sonnet-4-5"},
     "unknown model 'claude-sonnet-4-5' for provider 'openai'; its models: 'gpt-4o', "
     "'gpt-4o-mini'"),
    ({"message": "hi", "tools": "word_count"},
     "'tools' must be a list of strings such as [\"word_count\"], got str"),
    ({"message": "hi", "tools": [{"name": "word_count"}]},
     'each tool must be a string "name" or "name:argument", got dict'),
    ({"message": "hi", "tools": ["shell:rm -rf /"]},
     "unknown tool 'shell'; known tools: 'read_file', 'word_count', 'calculator'"),
    ({"message": "hi", "tools": ["read_file"]},
     "tool 'read_file' needs a path: use \"read_file:<path>\""),
    ({"message": "hi", "tools": ["calculator:"]},
     "tool 'calculator' needs a expression: use \"calculator:<expression>\""),
    ({"message": "hi", "tools": ["word_count"] * 9}, "at most 8 tools per request, got 9"),
    ({"message": "hi", "simulate_error": "meteor"},
     "unknown simulate_error 'meteor'; accepted: 'rate_limit', 'timeout', 'server_error'"),
    ({"message": "hi", "simulate_error": True}, "'simulate_error' must be a string, got bool"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "expected"), BAD_REQUESTS)
def test_bad_input_is_a_400_with_a_json_error(
    client: FlaskClient, body: Any, expected: str
) -> None:
    """Malformed chat requests answer 400 {"error": ...} saying what is wrong; nothing runs."""
    response = post(client, data=body) if isinstance(body, bytes) else post(client, body)
    assert 400 == response.status_code
    assert "application/json" == response.mimetype
    error = response.get_json()["error"]
    assert expected == error if body != b"\xff\xfe\xfa" else error.startswith(expected)
    assert 1.0 == value("victor_request_errors_total", **CHAT, error_type="bad_request")
    assert [] == [k for k in samples() if k[0].startswith(("victor_llm_", "victor_tool_"))]


def test_a_form_post_is_refused_as_bad_json(client: FlaskClient) -> None:
    """A body that is not JSON (here a form) is a 400, never a 500."""
    response = client.post("/chat", data={"message": "hi"}, buffered=True)
    assert 400 == response.status_code
    assert response.get_json()["error"].startswith("the body is not valid JSON")


def test_unknown_route_is_a_json_404(client: FlaskClient) -> None:
    """An unknown path answers 404 with a JSON error, recorded without the raw path."""
    response = client.get("/v1/secret-path", buffered=True)
    assert 404 == response.status_code
    assert "application/json" == response.mimetype
    assert "The requested URL was not found" in response.get_json()["error"]
    assert 1.0 == value(
        "victor_request_errors_total", endpoint=UNMATCHED, method="GET", error_type="not_found"
    )


def test_wrong_method_is_a_json_405_with_allow(client: FlaskClient) -> None:
    """GET /chat answers 405 with a JSON error and the Allow header."""
    response = client.get("/chat", buffered=True)
    assert 405 == response.status_code
    assert "application/json" == response.mimetype
    assert "The method is not allowed for the requested URL." == response.get_json()["error"]
    assert {"OPTIONS", "POST"} == set(response.headers["Allow"].split(", "))


def test_too_large_body_is_a_json_413(monkeypatch: pytest.MonkeyPatch) -> None:
    """A body over MAX_CONTENT_LENGTH answers 413 with a JSON error."""
    app = create_app({"MAX_CONTENT_LENGTH": 64, "VICTOR_APP_LLM_LATENCY_MS": 0})
    response = post(app.test_client(), {"message": "x" * 100})
    assert 413 == response.status_code
    assert "application/json" == response.mimetype
    assert 1.0 == value("victor_request_errors_total", **CHAT, error_type="payload_too_large")


def test_unhandled_exception_is_a_json_500_named_by_its_class(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in a tool: 500 JSON; request, tool and coordinator errors all recorded."""

    def broken(argument: str | None, ctx: Any) -> dict[str, Any]:
        raise KeyError("bug")

    monkeypatch.setitem(TOOLS, "word_count", Tool("word_count", None, "broken", broken))
    response = post(client, {"message": "hi", "tools": ["word_count"]})
    assert 500 == response.status_code
    assert "application/json" == response.mimetype
    assert "internal" in response.get_json()["error"].lower()
    assert 1.0 == value("victor_request_errors_total", **CHAT, error_type="KeyError")
    assert 1.0 == value("victor_tool_errors_total", tool_name="word_count", error_type="KeyError")
    assert 1.0 == value("victor_coordinator_errors_total", coordinator_name="ToolCoordinator")
    assert None is value("victor_llm_requests_total", **SONNET)


# --- simulated LLM errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("simulated", "status"), [("rate_limit", 429), ("timeout", 504), ("server_error", 502)]
)
def test_simulated_llm_error_statuses_and_metrics(
    client: FlaskClient, simulated: str, status: int
) -> None:
    """Each simulated provider error has its status; request and LLM errors carry its type."""
    response = post(client, {"message": "hi", "simulate_error": simulated})
    assert status == response.status_code
    assert {
        "error": f"simulated {simulated} from provider 'anthropic' (claude-sonnet-4-5)",
        "error_type": simulated,
        "provider": "anthropic",
        "model": "claude-sonnet-4-5",
    } == response.get_json()
    assert ("1" if simulated == "rate_limit" else None) == response.headers.get("Retry-After")
    assert 1.0 == value("victor_request_errors_total", **CHAT, error_type=simulated)
    assert 1.0 == value("victor_llm_errors_total", **SONNET, error_type=simulated)
    assert 1.0 == value("victor_llm_requests_total", **SONNET)
    assert None is value("victor_llm_tokens_total", **SONNET, type="prompt")


# --- tools ---------------------------------------------------------------------------------


def test_read_file_returns_the_sandbox_file(client: FlaskClient) -> None:
    """read_file:notes.txt returns the bundled file's text; one successful execution."""
    body = post(client, {"message": "read it", "tools": ["read_file:notes.txt"]}).get_json()
    text = (SANDBOX / "notes.txt").read_text()
    assert [{
        "tool": "read_file",
        "status": "success",
        "output": {"path": "notes.txt", "bytes": len(text.encode()), "content": text},
    }] == body["tools"]  # fmt: skip
    assert "claude-sonnet-4-5 read 2 word(s). Tool results: read_file ok." == body["reply"]
    assert 1.0 == value("victor_tool_executions_total", tool_name="read_file", status="success")
    assert 1.0 == value("victor_tool_duration_ms_count", tool_name="read_file")
    assert 1.0 == value("victor_coordinator_executions_total", coordinator_name="ToolCoordinator")
    assert None is value("victor_coordinator_errors_total", coordinator_name="ToolCoordinator")


@pytest.fixture
def sandboxed(tmp_path: Path) -> FlaskClient:
    """A client of an app whose sandbox has a file, a directory, links inside and out."""
    outside = tmp_path / "outside.txt"
    outside.write_text("secret\n")
    box = tmp_path / "box"
    (box / "sub").mkdir(parents=True)
    (box / "inside.txt").write_text("hello sandbox\n")
    (box / "link-in").symlink_to(box / "inside.txt")
    (box / "link-out").symlink_to(outside)
    (box / "sub" / "dir-out").symlink_to(tmp_path)
    (box / "big.txt").write_bytes(b"x" * (64 * 1024 + 1))
    (box / "binary.bin").write_bytes(b"\xff\xfe\x00")
    os.mkfifo(box / "fifo")
    return create_app(
        {"VICTOR_APP_SANDBOX": str(box), "VICTOR_APP_LLM_LATENCY_MS": 0}
    ).test_client()


@pytest.mark.parametrize(
    "path",
    [
        "../outside.txt",
        "sub/../../outside.txt",
        "link-out",
        "sub/dir-out/outside.txt",
        "/etc/passwd",
        "//etc/passwd",
    ],
)
def test_read_file_escaping_the_sandbox_is_a_tool_error(sandboxed: FlaskClient, path: str) -> None:
    """A path leaving the sandbox (.., absolute, symlink) is a path_escape tool error; 200."""
    response = post(sandboxed, {"message": "m", "tools": [f"read_file:{path}"]})
    assert 200 == response.status_code
    result = response.get_json()["tools"][0]
    assert ("read_file", "error", "path_escape") == (
        result["tool"],
        result["status"],
        result["error_type"],
    )
    assert "secret" not in response.get_data(as_text=True)
    assert 1.0 == value("victor_tool_errors_total", tool_name="read_file", error_type="path_escape")
    assert 1.0 == value("victor_tool_executions_total", tool_name="read_file", status="error")
    assert None is value("victor_tool_executions_total", tool_name="read_file", status="success")
    assert 1.0 == value("victor_coordinator_errors_total", coordinator_name="ToolCoordinator")
    assert 1.0 == value("victor_llm_requests_total", **SONNET)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("inside.txt", {"status": "success"}),
        ("link-in", {"status": "error", "error_type": "path_escape"}),
        ("sub/../inside.txt", {"status": "error", "error_type": "path_escape"}),
        ("missing.txt", {"status": "error", "error_type": "not_found"}),
        ("sub", {"status": "error", "error_type": "not_a_file"}),
        ("fifo", {"status": "error", "error_type": "not_a_file"}),
        ("big.txt", {"status": "error", "error_type": "too_large"}),
        ("binary.bin", {"status": "error", "error_type": "not_text"}),
    ],
)
def test_read_file_inside_the_sandbox(
    sandboxed: FlaskClient, path: str, expected: dict[str, str]
) -> None:
    """Paths that stay inside are read; missing, non-regular, huge or binary files are errors."""
    result = post(sandboxed, {"message": "m", "tools": [f"read_file:{path}"]})
    result = result.get_json()["tools"][0]
    assert expected == {k: result[k] for k in expected}
    if expected["status"] == "success":
        assert "hello sandbox\n" == result["output"]["content"]
    else:
        assert 1.0 == value(
            "victor_tool_errors_total", tool_name="read_file", error_type=expected["error_type"]
        )


def test_word_count_and_calculator(client: FlaskClient) -> None:
    """word_count counts its argument or the message; calculator evaluates arithmetic."""
    body = post(client, {
        "message": "count these four words",
        "tools": ["word_count", "word_count:just two", "calculator:2*(3+4)-1/4",
                  "calculator:1/0", "calculator:__import__('os')"],
    }).get_json()  # fmt: skip
    assert [
        {"status": "success", "output": {"words": 4}},
        {"status": "success", "output": {"words": 2}},
        {"status": "success", "output": {"expression": "2*(3+4)-1/4", "value": 13.75}},
        {"status": "error", "error_type": "zero_division"},
        {"status": "error", "error_type": "invalid_expression"},
    ] == [{k: v for k, v in r.items() if k in ("status", "output", "error_type")}
          for r in body["tools"]]  # fmt: skip
    assert 2.0 == value("victor_tool_executions_total", tool_name="word_count", status="success")
    assert 1.0 == value("victor_tool_executions_total", tool_name="calculator", status="success")
    assert 2.0 == value("victor_tool_executions_total", tool_name="calculator", status="error")
    assert 1.0 == value(
        "victor_tool_errors_total", tool_name="calculator", error_type="zero_division"
    )


@pytest.mark.parametrize("expression", ["9**9**9", "10**101", "1e308*10", "(-8)**0.5"])
def test_calculator_refuses_huge_or_complex_results(client: FlaskClient, expression: str) -> None:
    """Results beyond 1e100 (or not real) are refused quickly as a tool error."""
    result = post(client, {"message": "m", "tools": [f"calculator:{expression}"]})
    assert "error" == result.get_json()["tools"][0]["status"]


# --- tool-selection cache ------------------------------------------------------------------


def test_second_identical_tool_selection_is_a_cache_hit(app: Flask, client: FlaskClient) -> None:
    """Same tool names (other arguments) hit the cache; another order misses; hit rate follows."""
    first = post(client, {"message": "a", "tools": ["read_file:notes.txt", "word_count"]})
    second = post(client, {"message": "b", "tools": ["read_file:todo.txt", "word_count:x"]})
    third = post(client, {"message": "c", "tools": ["word_count", "read_file:notes.txt"]})
    assert ["miss", "hit", "miss"] == [
        r.get_json()["tool_selection"] for r in (first, second, third)
    ]
    assert 1.0 == value("victor_cache_hits_total", cache_name="tool_selection")
    assert 2.0 == value("victor_cache_misses_total", cache_name="tool_selection")
    assert 1 / 3 == value("victor_cache_hit_rate", cache_name="tool_selection")
    size = cache(app).nbytes
    assert 0 < size
    assert float(size) == value("victor_cache_size_bytes", cache_name="tool_selection")


def test_cache_evicts_the_least_recently_used_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    """With room for 2 entries, A B A C B: B was evicted by C, A was kept by its reuse."""
    monkeypatch.setenv("VICTOR_APP_TOOL_CACHE_ENTRIES", "2")
    app = create_app({"VICTOR_APP_LLM_LATENCY_MS": 0})
    client = app.test_client()
    order = [["word_count"], ["calculator:1"], ["word_count"], ["read_file:notes.txt"],
             ["calculator:2"], ["word_count"]]  # fmt: skip
    seen = [post(client, {"message": "m", "tools": t}).get_json()["tool_selection"] for t in order]
    assert ["miss", "miss", "hit", "miss", "miss", "miss"] == seen
    assert 2 == len(cache(app))


def test_chat_without_tools_skips_coordinator_and_cache(client: FlaskClient) -> None:
    """No tools requested: no coordinator run, no cache lookup."""
    post(client, {"message": "hi", "tools": []})
    names = {name for name, _ in samples()}
    assert set() == {n for n in names if n.startswith(("victor_coordinator", "victor_cache"))}


# --- the whole catalog ---------------------------------------------------------------------


def test_every_catalog_metric_gets_samples(client: FlaskClient) -> None:
    """Tools with hits, misses and errors, plus a rate limit: every catalog metric has samples."""
    post(client, {"message": "one", "tools": ["read_file:notes.txt", "word_count"]})
    post(client, {"message": "two", "tools": ["read_file:../x", "word_count"]})
    post(client, {"message": "three", "simulate_error": "rate_limit"})
    names = {name for name, _ in samples()}
    expected = {spec.name + ("_count" if spec.kind == "histogram" else "") for spec in CATALOG
                if spec.source != "server"}  # kept by a Gunicorn master, absent in-process
    assert set() == expected - names


def test_app_works_with_metrics_disabled(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """VICTOR_METRICS_ENABLED=false: chat, tools and errors work; /metrics says disabled."""
    monkeypatch.setenv("VICTOR_METRICS_ENABLED", "false")
    configure()  # settings are read once per process; re-read them after changing the env
    client = create_app({"VICTOR_APP_LLM_LATENCY_MS": 0}).test_client()
    ok = post(client, {"message": "hi", "tools": ["read_file:notes.txt", "read_file:/etc"]})
    assert 200 == ok.status_code
    assert ["success", "error"] == [r["status"] for r in ok.get_json()["tools"]]
    assert 429 == post(client, {"message": "hi", "simulate_error": "rate_limit"}).status_code
    assert 400 == post(client, {"message": ""}).status_code
    metrics = client.get("/metrics", buffered=True)
    assert (200, DISABLED_BODY) == (metrics.status_code, metrics.data)
    assert [] == gather()
