"""A FastAPI service instrumented with victor-mp-metrics (extra `[asgi]`).

Run it under Gunicorn with Uvicorn workers, from the repository's root::

    gunicorn -c gunicorn.conf.py -k uvicorn_worker.UvicornWorker examples.asgi.app:app

``/chat`` simulates an LLM call (``track_llm_call``) and its errors; the middleware
records every request with its route template; ``/metrics`` answers with the totals of
every worker, live and dead (rendered in a thread: reading the files must not hold up
the event loop).
"""

from __future__ import annotations

import asyncio
import os

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from victor_mp_metrics import render, track_llm_call
from victor_mp_metrics.asgi import MetricsMiddleware, set_error_type

LATENCY_S = float(os.environ.get("VICTOR_APP_LLM_LATENCY_MS", "5")) / 1000.0
# Simulated provider errors: (HTTP status, error_type).
ERRORS = {"rate_limit": (429, "rate_limit"), "timeout": (504, "timeout"),
          "server_error": (502, "server_error")}  # fmt: skip


class ChatRequest(BaseModel):
    message: str
    provider: str = "anthropic"
    model: str = "claude-sonnet-4-5"
    simulate_error: str | None = None


class LLMError(Exception):
    def __init__(self, error_type: str) -> None:
        super().__init__(f"simulated {error_type}")
        self.error_type = error_type


app = FastAPI(title="Victor AI (ASGI example)")
app.add_middleware(MetricsMiddleware)


@app.get("/healthz")
async def healthz() -> dict[str, object]:
    return {"status": "ok", "worker_pid": os.getpid()}


@app.post("/chat")
async def chat(body: ChatRequest, request: Request) -> Response:
    prompt_tokens = len(body.message.split())
    try:
        with track_llm_call(body.provider, body.model) as call:
            await asyncio.sleep(LATENCY_S)
            if body.simulate_error in ERRORS:
                raise LLMError(ERRORS[body.simulate_error][1])
            reply = f"You said {prompt_tokens} words."
            call.record_tokens(prompt=prompt_tokens, completion=len(reply.split()))
    except LLMError as err:
        set_error_type(request.scope, err.error_type)
        status = ERRORS[err.error_type][0]
        return JSONResponse({"error": str(err), "error_type": err.error_type}, status_code=status)
    return JSONResponse({"reply": reply, "worker_pid": os.getpid()})


@app.get("/metrics")
async def metrics(request: Request) -> Response:
    params: dict[str, list[str]] = {}
    for key, value in request.query_params.multi_items():
        params.setdefault(key, []).append(value)
    status, headers, body = await run_in_threadpool(render, dict(request.headers), params)
    return Response(body, status_code=int(status[:3]), headers=dict(headers))
