"""The HTTP API: ``POST /chat``, ``GET /healthz``, and JSON bodies for every error.

``GET /metrics`` is served by the :class:`~victor_mp_metrics.flask_ext.VictorMetrics`
extension.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.wrappers import Response as WerkzeugResponse

from victor_mp_metrics.flask_ext import set_error_type

from .chat import InvalidRequest, parse_chat_request
from .coordinator import ToolCoordinator
from .llm import LLMError, RateLimitError, SimulatedLLM

EXTENSION_KEY = "victor_ai"
RETRY_AFTER_SECONDS = 1

bp = Blueprint("victor_ai", __name__)


@dataclass(frozen=True)
class VictorAI:
    """The app's services, kept in ``app.extensions["victor_ai"]``."""

    llm: SimulatedLLM
    coordinator: ToolCoordinator


def _services() -> VictorAI:
    return current_app.extensions[EXTENSION_KEY]  # type: ignore[no-any-return]


@bp.post("/chat")
def chat() -> tuple[Response, int] | Response:
    """Run the requested tools, then ask the LLM; answer with its reply and the results."""
    try:
        payload = json.loads(_read_body())
    except ValueError as err:
        raise InvalidRequest(f"the body is not valid JSON: {err}") from None
    except RecursionError:
        raise InvalidRequest("the body is not valid JSON: nested too deeply") from None
    req = parse_chat_request(payload)
    services = _services()

    results: list[dict[str, Any]] = []
    selection = None
    if req.tools:
        results, selection = services.coordinator.run(req.tools, req.message)
    context = [_summary(result) for result in results]
    try:
        completion = services.llm.complete(
            req.provider, req.model, req.message, context, req.simulate_error
        )
    except LLMError as err:
        set_error_type(err.error_type)
        response = jsonify(
            error=str(err), error_type=err.error_type, provider=req.provider, model=req.model
        )
        if isinstance(err, RateLimitError):
            response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response, err.status
    return jsonify(
        reply=completion.text,
        provider=req.provider,
        model=req.model,
        usage={
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
        },
        tools=results,
        tool_selection=selection,
    )


def _read_body() -> bytes:
    """The request body, at most ``MAX_CONTENT_LENGTH`` bytes; 413 when it is longer.

    Werkzeug refuses a too-large ``Content-Length`` before reading, but a streamed body
    (chunked, on the ``wsgi.input_terminated`` stream Gunicorn provides) is only read up
    to the limit and then handed over truncated, without an error. One more byte from the
    server's stream tells "exactly the limit" from "longer": the latter is a 413, and the
    rest of the body is never read.
    """
    data = request.get_data()
    limit = request.max_content_length
    streamed = request.content_length is None
    if limit is not None and streamed and len(data) >= limit and request.input_stream.read(1):
        raise RequestEntityTooLarge()
    return data


def _summary(result: dict[str, Any]) -> str:
    if result["status"] == "success":
        return f"{result['tool']} ok"
    return f"{result['tool']} failed ({result['error_type']})"


@bp.get("/healthz")
def healthz() -> Response:
    """Liveness: always ``{"status": "ok"}``, with the pid of the worker that answered."""
    return jsonify(status="ok", worker_pid=os.getpid())


@bp.app_errorhandler(InvalidRequest)
def invalid_request(err: InvalidRequest) -> tuple[Response, int]:
    return jsonify(error=str(err)), 400


@bp.app_errorhandler(HTTPException)
def http_error(err: HTTPException) -> WerkzeugResponse:
    """Every HTTP error (404, 405, 413, the 500 of an unhandled exception...) as JSON.

    The response keeps the exception's headers, such as ``Allow`` of a 405.
    """
    response = err.get_response()
    response.set_data(json.dumps({"error": err.description}))
    response.content_type = "application/json"
    return response
