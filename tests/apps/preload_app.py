"""Plain prometheus_client metrics made at import time, before victor_mp_metrics is
imported: the --preload case of issue 12."""

from __future__ import annotations

import prometheus_client as pc

JOBS = pc.Counter("preload_jobs", "Requests seen by a plain counter")
LATENCY = pc.Histogram("preload_latency_seconds", "A plain unlabelled histogram")
PEAK = pc.Gauge("preload_peak", "A plain max gauge set at import", multiprocess_mode="max")
PEAK.set(42)

from flask import Flask  # noqa: E402

from victor_mp_metrics.flask_ext import VictorMetrics  # noqa: E402

app = Flask(__name__)
VictorMetrics(app)


@app.get("/work")
def work() -> dict[str, str]:
    JOBS.inc()
    LATENCY.observe(0.01)
    return {"ok": "yes"}
