"""A minimal instrumented Flask app for fault tests: fast, slow and streamed routes."""

from __future__ import annotations

import os
import time

from flask import Flask, Response

from victor_mp_metrics.flask_ext import VictorMetrics

app = Flask(__name__)
VictorMetrics(app)


@app.get("/ok")
def ok() -> dict[str, int]:
    return {"pid": os.getpid()}


@app.get("/sleep/<int:ms>")
def sleep(ms: int) -> dict[str, int]:
    time.sleep(ms / 1000)
    return {"pid": os.getpid()}


@app.get("/stream/<int:chunks>")
def stream(chunks: int) -> Response:
    def generate():
        for i in range(chunks):
            time.sleep(0.01)
            yield f"{i}\n"

    return Response(generate(), mimetype="text/plain")
