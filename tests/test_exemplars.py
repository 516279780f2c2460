"""Exemplars across processes (issue 14): stored per writer, newest shown, archived, and
proven end to end on a real Prometheus with exemplar storage."""

from __future__ import annotations

import os
import time
from pathlib import Path

import prometheus_client as pc
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest

from victor_mp_metrics import _mpdir, _runtime
from victor_mp_metrics._exposition import FamiliesCollector


def _openmetrics(directory: Path) -> str:
    families, _report = _mpdir.DirectoryReader(str(directory)).read(created=True)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FamiliesCollector(families))
    return generate_latest(registry).decode()


def test_exemplars_of_any_process_reach_counters_and_buckets(metrics_dir: Path):
    """inc(exemplar=) and observe(v, exemplar=) in a forked worker show on the deployment's
    counter and bucket; the newest exemplar wins; compaction keeps it."""
    counter = pc.Counter("jobs", "Jobs", registry=None)
    histogram = pc.Histogram("latency", "Latency", buckets=[1, 10], registry=None)
    counter.inc(exemplar={"trace_id": "aaaa"})
    time.sleep(0.01)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        counter.inc(2, exemplar={"trace_id": "bbbb"})
        histogram.observe(5, exemplar={"trace_id": "cccc"})
        os._exit(0)
    os.waitpid(pid, 0)
    text = _openmetrics(metrics_dir)
    assert 'jobs_total 3.0 # {trace_id="bbbb"} 2.0' in text
    assert 'latency_bucket{le="10.0"} 1.0 # {trace_id="cccc"} 5.0' in text
    _mpdir.compact(str(metrics_dir), exclude=_runtime.own_idents())
    assert 'latency_bucket{le="10.0"} 1.0 # {trace_id="cccc"} 5.0' in _openmetrics(metrics_dir)
    exemplar_files = [n for n in os.listdir(metrics_dir) if n.endswith(".exemplars")]
    assert len(exemplar_files) == 2  # ours and the archive's: the dead child's is merged


def test_no_exemplar_no_file(metrics_dir: Path):
    """Metrics used without exemplars write no exemplar file at all."""
    pc.Counter("plain", "Plain", registry=None).inc()
    assert not [n for n in os.listdir(metrics_dir) if n.endswith(".exemplars")]


@pytest.mark.gunicorn
@pytest.mark.prometheus
def test_trace_ids_reach_prometheus_exemplar_storage(tmp_path: Path):
    """The app's traceparent trace id becomes an exemplar of victor_request_duration_ms that
    a real Prometheus 2.42 with exemplar storage returns from /api/v1/query_exemplars."""
    from ._gunicorn import gunicorn, request
    from ._prometheus import prometheus, single_target_config
    from ._tools import require_tool

    binary = require_tool("prometheus", "Debian/Ubuntu: apt-get install prometheus")
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    with gunicorn(tmp_path, workers=2, env={"VICTOR_APP_LLM_LATENCY_MS": "0"}) as app:
        for _ in range(5):
            resp = request(app.url + "/chat", "POST", b'{"message": "hi"}',
                           {"Content-Type": "application/json",
                            "traceparent": f"00-{trace}-00f067aa0ba902b7-01"})
            assert 200 == resp.status
        om = app.get("/metrics", headers={"Accept": "application/openmetrics-text"}).text
        assert f'trace_id="{trace}"' in om
        config = single_target_config(tmp_path, f"127.0.0.1:{app.port}")
        with prometheus(binary, tmp_path, config,
                        ["--enable-feature=exemplar-storage"]) as prom:
            deadline = time.monotonic() + 30
            found: list = []
            while not found and time.monotonic() < deadline:
                time.sleep(1)
                now = time.time()
                found = prom.api("query_exemplars",
                                 query="victor_request_duration_ms_bucket",
                                 start=now - 300, end=now + 60)
            ids = {e["labels"].get("trace_id") for series in found for e in series["exemplars"]}
            assert trace in ids, prom.logs()
