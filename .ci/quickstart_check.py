#!/usr/bin/env python3
"""The README's quick start in the current environment, counted exactly.

Run with the Python of a venv that has the project installed (``.ci/matrix`` runs it in
every cell). ``app/`` and ``gunicorn.conf.py`` are copied out of the checkout, so
``victor_mp_metrics`` is the installed copy, not the source tree; then, in that copy:

    gunicorn -c gunicorn.conf.py -b 127.0.0.1:PORT app:app

with a fresh PROMETHEUS_MULTIPROC_DIR and no VICTOR_* variables (4 workers, the default).
``/healthz`` is probed until it answers, N more requests are sent from several threads,
and ``victor_requests_total{endpoint="/healthz"}`` (and the duration histogram's count)
must equal N + the answered probes in /metrics, in every one of a few scrapes. The master
is stopped (SIGTERM, then its process group is killed) whatever happens.

Exit status 0 when the counts are exact; the last line of output says what was counted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEALTHZ = 'endpoint="/healthz"'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str, timeout: float) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        body = err.read()
        err.close()
        return err.code, body


def healthz_total(text: str, name: str) -> float:
    """Sum of the ``name`` samples of /healthz, over every other label."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and HEALTHZ in line:
            total += float(line.rpartition(" ")[2])
    return total


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(5)


def check(work: Path, requests: int) -> str:
    for name in ("app", "gunicorn.conf.py"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, work / name)
    bindir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VICTOR_") and k.lower() != "prometheus_multiproc_dir"
           and k != "PYTHONPATH"}
    where = subprocess.run(
        [sys.executable, "-c",
         "import importlib.metadata as m, victor_mp_metrics as v; "
         "print(v.__file__, m.version('prometheus-client'))"],
        cwd=work, env=env, capture_output=True, text=True, timeout=60, check=True,
    ).stdout.split()
    if Path(where[0]).is_relative_to(ROOT):
        raise AssertionError(f"victor_mp_metrics came from the checkout: {where[0]}")

    metrics_dir = work / "metrics"
    metrics_dir.mkdir(mode=0o700)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / "gunicorn.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(bindir / "gunicorn"), "-c", "gunicorn.conf.py", "-b", f"127.0.0.1:{port}",
             "app:app"],
            cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def logs() -> str:
        return log.read_text(errors="replace")[-4000:]

    try:
        # Readiness: a probe that got an answer was served, so it is counted; one refused
        # before the socket was bound was not. A long timeout: no probe is left in doubt.
        probes = 0
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"gunicorn exited {proc.returncode}:\n{logs()}")
            try:
                status, _ = get(url + "/healthz", timeout=30)
                probes += 1
                if status == 200:
                    break
            except (ConnectionError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"/healthz did not answer 200 in 60 s:\n{logs()}")
            time.sleep(0.1)

        # Let all 4 workers boot, so that the requests are spread over them.
        import psutil  # a dependency of the project, so it is in the venv

        deadline = time.monotonic() + 30
        while len(psutil.Process(proc.pid).children()) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)

        def one(_: int) -> int:
            status, body = get(url + "/healthz", timeout=30)
            if status != 200:
                raise AssertionError(f"/healthz answered {status}: {body[:200]!r}")
            return int(json.loads(body)["worker_pid"])

        with ThreadPoolExecutor(6) as pool:
            pids = set(pool.map(one, range(requests)))
        expected = requests + probes

        # A request is counted as its status goes out and timed as its worker closes it,
        # a moment after the client has the response: wait for both.
        deadline = time.monotonic() + 10
        while True:
            status, body = get(url + "/metrics", timeout=10)
            text = body.decode()
            counted = healthz_total(text, "victor_requests_total")
            timed = healthz_total(text, "victor_request_duration_ms_count")
            if status == 200 and counted == expected and timed == expected:
                break
            if counted > expected or time.monotonic() > deadline:
                raise AssertionError(
                    f"/metrics says {counted} /healthz requests, {expected} were served "
                    f"({requests} + {probes} readiness probes):\n{text[:3000]}\n{logs()}")
            time.sleep(0.05)
        for _ in range(3):
            status, body = get(url + "/metrics", timeout=10)
            text = body.decode()
            got = (healthz_total(text, "victor_requests_total"),
                   healthz_total(text, "victor_request_duration_ms_count"))
            if status != 200 or got != (expected, expected):
                raise AssertionError(f"a later scrape says {got}, not {expected}:\n{text[:3000]}")
    finally:
        stop(proc)
    return (f"quickstart OK: victor_requests_total{{endpoint=\"/healthz\"}} = {expected:.0f} = "
            f"{requests} requests + {probes} readiness probe(s), in 4 scrapes; "
            f"{len(pids)} worker(s) answered; prometheus-client {where[1]}; "
            f"victor_mp_metrics from {Path(where[0]).parent}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="victor-quickstart-") as work:
        try:
            print(check(Path(work), args.requests), flush=True)
        except (AssertionError, OSError, subprocess.SubprocessError, ValueError) as err:
            print(f"quickstart FAILED: {err}", flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
