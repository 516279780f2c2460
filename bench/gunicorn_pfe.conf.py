"""Gunicorn config of the prometheus_flask_exporter variant of ``bench/http.py``.

The same server settings as ``gunicorn.conf.py`` gives the other variants (sync workers,
no worker recycling, heartbeat files on tmpfs), with prometheus_flask_exporter's own
hooks. PROMETHEUS_MULTIPROC_DIR must be set (to an empty directory) before Gunicorn starts.
"""

import os

from prometheus_flask_exporter.multiprocess import GunicornPrometheusMetrics

worker_class = "sync"
threads = 1
timeout = 30
max_requests = 0
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None


def when_ready(server):
    port = os.environ.get("BENCH_PFE_METRICS_PORT")
    if port:
        GunicornPrometheusMetrics.start_http_server_when_ready(int(port), "127.0.0.1")


def child_exit(server, worker):
    GunicornPrometheusMetrics.mark_process_dead_on_child_exit(worker.pid)
