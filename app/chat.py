"""The ``POST /chat`` request: its JSON format, validated before anything runs.

    {"message": "Summarise notes.txt",          required, non-empty string
     "provider": "anthropic",                   optional, one of llm.PROVIDERS
     "model": "claude-sonnet-4-5",              optional, a model of that provider
     "tools": ["read_file:notes.txt", "word_count"],   optional, "name" or "name:argument"
     "simulate_error": "rate_limit"}            optional: rate_limit, timeout, server_error

A field given as ``null`` counts as absent. Strings must be valid Unicode text: a lone
surrogate such as ``"\\ud800"`` (legal in JSON, not encodable as UTF-8) is refused. Anything
else raises :class:`InvalidRequest`, whose message says what is wrong and what is accepted;
the API answers 400 with it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .coordinator import ToolCall
from .llm import DEFAULT_PROVIDER, PROVIDERS, SIMULATED_ERRORS
from .tools import TOOLS

MAX_TOOLS = 8
FIELDS = ("message", "provider", "model", "tools", "simulate_error")


class InvalidRequest(ValueError):
    """The chat request is malformed; the message is the API's answer."""


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat request."""

    message: str
    provider: str
    model: str
    tools: tuple[ToolCall, ...]
    simulate_error: str | None


def _choices(values: Iterable[str]) -> str:
    return ", ".join(repr(v) for v in values)


def _text(value: str, what: str) -> str:
    """``value`` if it encodes as UTF-8; a lone surrogate would fail deep inside a tool."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidRequest(
            f"{what} is not valid Unicode text: lone surrogate "
            f"{value[err.start]!r} at index {err.start}"
        ) from None
    return value


def _optional_str(payload: dict[str, Any], name: str) -> str | None:
    value = payload.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(f"'{name}' must be a string, got {type(value).__name__}")
    return value


def parse_chat_request(payload: Any) -> ChatRequest:
    """Validate a decoded JSON body; raises :class:`InvalidRequest`."""
    if not isinstance(payload, dict):
        raise InvalidRequest(
            'the body must be a JSON object such as {"message": "Hello"}, '
            f"got {type(payload).__name__}"
        )
    unknown = sorted(set(payload) - set(FIELDS))
    if unknown:
        raise InvalidRequest(
            f"unknown field(s) {_choices(unknown)}; accepted fields: {_choices(FIELDS)}"
        )

    message = payload.get("message")
    if message is None:
        raise InvalidRequest("'message' is required: a non-empty string")
    if not isinstance(message, str):
        raise InvalidRequest(f"'message' must be a string, got {type(message).__name__}")
    if not message.strip():
        raise InvalidRequest("'message' must not be empty")
    _text(message, "'message'")

    provider = _optional_str(payload, "provider")
    if provider is None:
        provider = DEFAULT_PROVIDER
    if provider not in PROVIDERS:
        raise InvalidRequest(
            f"unknown provider {provider!r}; known providers: {_choices(PROVIDERS)}"
        )
    models = PROVIDERS[provider]
    model = _optional_str(payload, "model")
    if model is None:
        model = models[0]
    if model not in models:
        raise InvalidRequest(
            f"unknown model {model!r} for provider {provider!r}; its models: {_choices(models)}"
        )

    simulate_error = _optional_str(payload, "simulate_error")
    if simulate_error is not None and simulate_error not in SIMULATED_ERRORS:
        raise InvalidRequest(
            f"unknown simulate_error {simulate_error!r}; accepted: {_choices(SIMULATED_ERRORS)}"
        )

    return ChatRequest(message, provider, model, _parse_tools(payload.get("tools")), simulate_error)


def _parse_tools(value: Any) -> tuple[ToolCall, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InvalidRequest(
            f"'tools' must be a list of strings such as [\"word_count\"], "
            f"got {type(value).__name__}"
        )
    if len(value) > MAX_TOOLS:
        raise InvalidRequest(f"at most {MAX_TOOLS} tools per request, got {len(value)}")
    return tuple(_parse_tool(item) for item in value)


def _parse_tool(item: Any) -> ToolCall:
    if not isinstance(item, str):
        raise InvalidRequest(
            f'each tool must be a string "name" or "name:argument", got {type(item).__name__}'
        )
    name, sep, argument = _text(item, "each tool").partition(":")
    tool = TOOLS.get(name)
    if tool is None:
        raise InvalidRequest(f"unknown tool {name!r}; known tools: {_choices(TOOLS)}")
    if tool.argument is not None and not argument:
        raise InvalidRequest(
            f'tool {name!r} needs a {tool.argument}: use "{name}:<{tool.argument}>"'
        )
    return ToolCall(name, argument if sep else None)
