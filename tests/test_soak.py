"""bench/soak.py at a short size: a real Gunicorn master under worker churn and SIGKILLs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOAK = ROOT / "bench" / "soak.py"

pytestmark = pytest.mark.gunicorn


def soak(*args: str, timeout: float = 240.0) -> dict[str, Any]:
    """Run the soak script with ``--json``; the one run's summary (last stdout line)."""
    proc = subprocess.run(
        # --deadline bounds the load phase; readiness, settling and stopping are bounded too.
        [sys.executable, str(SOAK), "--json", "--deadline", "60", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stdout.strip().splitlines()
    assert lines, output
    summary = json.loads(lines[-1])
    assert len(summary["runs"]) == 1, output
    run: dict[str, Any] = summary["runs"][0]
    assert "error" not in run, output
    run["_output"] = output
    run["_passed"] = summary["passed"] and proc.returncode == 0
    return run


def assert_goals(run: dict[str, Any]) -> None:
    output = run["_output"]
    assert run["decreases"] == 0 and run["vanished"] == 0, output
    assert run["scrapes"] > 0 and run["comparisons"] > 0, output
    assert run["final_total"] is not None, output
    assert run["acknowledged"] <= run["final_total"] <= run["sent"], output
    for figures in run["per_endpoint"].values():
        assert figures["acknowledged"] <= figures["recorded"] <= figures["sent"], output
    assert run["final_other_endpoints"] == {}, output
    assert run["dir_peak"] < run["dir_bound"], output
    assert not run["deadline_hit"] and not run["hung_threads"] and run["final_stable"], output


def test_soak_r1_worker_recycling_keeps_scrapes_monotonic_and_totals_exact() -> None:
    """Workers recycled every 20 requests: counters monotonic, total = acknowledged, dir bounded."""
    run = soak("--run", "R1", "--requests", "1500", "--clients", "4")
    assert_goals(run)
    assert run["scrape_errors"] == 0, run["_output"]
    assert run["final_total"] == run["acknowledged"], run["_output"]
    assert run["worker_pids_seen"] > 4 * 5, run["_output"]  # the workers really churned
    assert run["_passed"], run["_output"]


def test_soak_r2_sigkilled_workers_never_make_counters_go_backwards() -> None:
    """A worker SIGKILLed every second: counters monotonic, ack <= recorded <= sent, dir bounded."""
    run = soak("--run", "R2", "--duration", "6", "--clients", "4")
    assert_goals(run)
    assert run["kills"] >= 4, run["_output"]
    assert run["scrape_errors"] == run["scrape_errors_cut_by_kill"], run["_output"]
    assert run["_passed"], run["_output"]
