"""A Starlette app for the ASGI middleware's tests: routes, a mount, errors, a stream."""

from __future__ import annotations

import asyncio
import os

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Mount, Route, Router

from victor_mp_metrics import render
from victor_mp_metrics.asgi import MetricsMiddleware, set_error_type


async def ok(request: Request) -> Response:
    return JSONResponse({"pid": os.getpid()})


async def item(request: Request) -> Response:
    return JSONResponse({"item": request.path_params["item_id"]})


async def sleep(request: Request) -> Response:
    await asyncio.sleep(request.path_params["ms"] / 1000)
    return JSONResponse({"pid": os.getpid()})


async def boom(request: Request) -> Response:
    raise KeyError("boom")


async def limited(request: Request) -> Response:
    set_error_type(request.scope, "upstream_rate_limit")
    return PlainTextResponse("slow down", status_code=429)


async def stream(request: Request) -> Response:
    async def chunks():
        for i in range(request.path_params["chunks"]):
            await asyncio.sleep(0.05)
            yield f"{i}\n"

    return StreamingResponse(chunks(), media_type="text/plain")


async def user(request: Request) -> Response:
    return JSONResponse({"user": request.path_params["user_id"]})


async def metrics(request: Request) -> Response:
    status, headers, body = await run_in_threadpool(render, dict(request.headers))
    return Response(body, status_code=int(status[:3]), headers=dict(headers))


v1 = Router([Route("/users/{user_id:int}", user)])

app = Starlette(routes=[
    Route("/ok", ok),
    Route("/items/{item_id:int}", item),
    Route("/sleep/{ms:int}", sleep),
    Route("/boom", boom),
    Route("/limited", limited),
    Route("/stream/{chunks:int}", stream),
    Mount("/v1", app=v1),
    Route("/metrics", metrics),
])  # fmt: skip
app.add_middleware(MetricsMiddleware)
