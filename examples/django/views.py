"""Views of the Django example: a health check, a simulated chat, and ``/metrics``."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    JsonResponse,
    StreamingHttpResponse,
)
from victor_mp_metrics import render, track_llm_call
from victor_mp_metrics.wsgi import set_error_type


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok", "worker_pid": os.getpid()})


def chat(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    body = json.loads(request.body or b"{}")
    message = str(body.get("message", ""))
    if body.get("simulate_error") == "rate_limit":
        set_error_type(request.META, "rate_limit")
        return JsonResponse({"error_type": "rate_limit"}, status=429)
    if body.get("simulate_error") == "crash":
        raise RuntimeError("the view failed")  # a 500 recorded as error_type RuntimeError
    with track_llm_call("anthropic", "claude-sonnet-4-5") as call:
        reply = f"You said {len(message.split())} words."
        call.record_tokens(prompt=len(message.split()), completion=len(reply.split()))
    return JsonResponse({"reply": reply, "worker_pid": os.getpid()})


def item(request: HttpRequest, item_id: int) -> JsonResponse:
    return JsonResponse({"item": item_id})


def stream(request: HttpRequest, chunks: int) -> StreamingHttpResponse:
    def generate() -> Iterator[bytes]:
        for i in range(chunks):
            time.sleep(0.02)
            yield f"{i}\n".encode()

    return StreamingHttpResponse(generate(), content_type="text/plain")


def metrics(request: HttpRequest) -> HttpResponse:
    status, headers, body = render(dict(request.headers), dict(request.GET.lists()))
    response = HttpResponse(body, status=int(status[:3]))
    for name, value in headers:
        response[name] = value
    return response
