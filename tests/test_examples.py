"""The guide's examples run as scripts and print what they recorded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "observability"


def _run(script: str, **env: str) -> str:
    ours = ("VICTOR_", "PROMETHEUS_MULTIPROC_DIR")
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith(ours)}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert 0 == result.returncode, result.stderr
    return result.stdout


@pytest.mark.parametrize("multiprocess", [False, True])
def test_metrics_collector_example(tmp_path: Path, multiprocess: bool) -> None:
    """metrics_collector.py prints the summary of what it recorded."""
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)} if multiprocess else {}
    assert [
        "Tool calls: 3",
        "Error rate: 33.33%",
        "Model requests: 1",
        "Model latency: 2 calls, avg 447.6 ms, p50 50.0 ms, p95 950.0 ms",
    ] == _run("metrics_collector.py", **env).splitlines()


@pytest.mark.parametrize("multiprocess", [False, True])
def test_custom_metrics_example(tmp_path: Path, multiprocess: bool) -> None:
    """custom_metrics.py prints the guide's counter, gauge and histogram samples."""
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)} if multiprocess else {}
    lines = _run("custom_metrics.py", **env).splitlines()
    assert 'custom_operations_total{service="my_service"} 1.0' in lines
    assert "queue_size 10.0" in lines
    assert 'operation_latency_ms_bucket{le="100.0"} 1.0' in lines
    assert "operation_latency_ms_sum 75.0" in lines
