"""The simulated LLM provider: deterministic replies and token counts, configurable latency.

Token counts follow from the text alone, so tests can predict them: prompt tokens are the
words of the message, completion tokens the words of the reply. Errors a real provider
raises (rate limit, timeout, server error) are simulated on request; each carries the
``error_type`` that ``victor_llm_errors_total`` records and the HTTP status the API
answers with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from victor_mp_metrics.instrument import track_llm_call

# Provider -> its models, the first being the default. A closed set keeps request data
# out of the provider and model labels.
PROVIDERS: dict[str, tuple[str, ...]] = {
    "anthropic": ("claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1"),
    "openai": ("gpt-4o", "gpt-4o-mini"),
    "local": ("llama-3.1-8b",),
}
DEFAULT_PROVIDER = "anthropic"


class LLMError(Exception):
    """A provider call failed; ``error_type`` and ``status`` say how the API reports it."""

    error_type = "provider_error"
    status = 502


class RateLimitError(LLMError):
    """The provider refused the call: too many requests."""

    error_type = "rate_limit"
    status = 429


class ProviderTimeoutError(LLMError):
    """The provider did not answer in time."""

    error_type = "timeout"
    status = 504


class ProviderServerError(LLMError):
    """The provider failed on its side (reported as 502: our service itself is fine)."""

    error_type = "server_error"
    status = 502


SIMULATED_ERRORS: dict[str, type[LLMError]] = {
    cls.error_type: cls for cls in (RateLimitError, ProviderTimeoutError, ProviderServerError)
}


@dataclass(frozen=True)
class Completion:
    """A provider's answer."""

    text: str
    prompt_tokens: int
    completion_tokens: int


def count_tokens(text: str) -> int:
    """The simulated tokenizer: one token per white-space separated word."""
    return len(text.split())


class SimulatedLLM:
    """Answers like a provider would, after ``latency_ms`` milliseconds."""

    def __init__(self, latency_ms: float) -> None:
        self.latency_ms = latency_ms

    def complete(
        self,
        provider: str,
        model: str,
        message: str,
        context: list[str],
        simulate_error: str | None = None,
    ) -> Completion:
        """One recorded LLM call; raises an :class:`LLMError` when ``simulate_error`` names one.

        ``context`` holds one line per tool result; the reply mentions each.
        """
        with track_llm_call(provider, model) as call:
            if self.latency_ms:
                time.sleep(self.latency_ms / 1000.0)
            if simulate_error is not None:
                error = SIMULATED_ERRORS[simulate_error]
                raise error(f"simulated {simulate_error} from provider {provider!r} ({model})")
            prompt_tokens = count_tokens(message)
            reply = f"{model} read {prompt_tokens} word(s)."
            if context:
                reply += " Tool results: " + "; ".join(context) + "."
            completion_tokens = count_tokens(reply)
            call.record_tokens(prompt=prompt_tokens, completion=completion_tokens)
        return Completion(reply, prompt_tokens, completion_tokens)
