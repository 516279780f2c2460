"""Module-level metrics that stock multiprocess mode cannot aggregate (issue 14)."""

from __future__ import annotations

import prometheus_client as pc
from flask import Flask

from victor_mp_metrics.flask_ext import VictorMetrics

BUILD = pc.Info("build", "Build of the service")
BUILD.info({"version": "1.2.3", "commit": "abc123"})
PHASE = pc.Enum("phase", "Lifecycle phase", states=["starting", "serving", "draining"])
PHASE.state("serving")
FIVE = pc.Gauge("five", "Five per live process", multiprocess_mode="livesum")
FIVE.set_function(lambda: 5)
QUEUE = pc.Gauge("queue_depth", "Queue depth per queue", ["queue"], multiprocess_mode="livesum")

app = Flask(__name__)
VictorMetrics(app)


@app.get("/queue/<name>/<int:depth>")
def set_queue(name: str, depth: int) -> dict[str, int]:
    QUEUE.labels(name).set(depth)
    return {"depth": depth}


@app.delete("/queue/<name>")
def drop_queue(name: str) -> dict[str, str]:
    QUEUE.remove(name)
    return {"removed": name}
