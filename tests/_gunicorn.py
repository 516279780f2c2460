"""Starting a real Gunicorn master on a loopback port, and talking to it."""

from __future__ import annotations

import gzip
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


def request(
    url: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> Response:
    """One HTTP request; error statuses are returned, not raised."""
    req = urllib.request.Request(url, data=body, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = resp.read()
            hdrs = dict(resp.headers.items())
            status = resp.status
    except urllib.error.HTTPError as err:
        data = err.read()
        hdrs = dict(err.headers.items())
        status = err.code
        err.close()
    if hdrs.get("Content-Encoding") == "gzip":
        data = gzip.decompress(data)
    return Response(status, hdrs, data)


def parse_samples(text: str) -> dict[str, float]:
    """Exposition text as {'name{labels}': value} (labels exactly as printed)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out


def total(samples: Mapping[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    result = 0.0
    for key, value in samples.items():
        base = key.split("{", 1)[0]
        if base == name and all(w in key for w in wanted):
            result += value
    return result


@dataclass
class Gunicorn:
    """A running Gunicorn master."""

    proc: subprocess.Popen
    port: int
    directory: Path | None
    log: Path
    extra_ports: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, **kwargs) -> Response:
        return request(self.url + path, **kwargs)

    def post_json(self, path: str, body: bytes, **kwargs) -> Response:
        return request(self.url + path, "POST", body,
                       {"Content-Type": "application/json"}, **kwargs)

    def workers(self) -> list[int]:
        return sorted(c.pid for c in psutil.Process(self.proc.pid).children())

    def wait_workers(self, count: int, timeout: float = 20.0) -> list[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.workers()
            if len(pids) == count:
                return pids
            time.sleep(0.05)
        raise AssertionError(f"expected {count} workers, have {self.workers()}:\n{self.logs()}")

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]


@contextmanager
def gunicorn(
    tmp_path: Path,
    *,
    workers: int = 4,
    env: Mapping[str, str] | None = None,
    args: list[str] | None = None,
    directory: Path | bool | None = True,
    app: str = "app:app",
    ready_path: str = "/healthz",
    config: Path = ROOT / "gunicorn.conf.py",
) -> Iterator[Gunicorn]:
    """Run ``gunicorn -c gunicorn.conf.py app:app`` on a free loopback port; always stopped."""
    port = free_port()
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith("VICTOR_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    metrics_dir: Path | None = None
    if directory is True:
        metrics_dir = tmp_path / "metrics"
    elif isinstance(directory, Path):
        metrics_dir = directory
    if metrics_dir is not None:
        environment["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    environment.update(env or {})
    environment["PYTHONPATH"] = str(ROOT)
    log = tmp_path / f"gunicorn-{port}.log"
    cmd = [sys.executable, "-m", "gunicorn", "-c", str(config),
           "-b", f"127.0.0.1:{port}", "-w", str(workers), *(args or []), app]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=environment, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = Gunicorn(proc, port, metrics_dir, log)
    try:
        wait_ready(proc, "gunicorn", lambda: server.get(ready_path, timeout=2).status < 500,
                   server.logs)
        yield server
    finally:
        stop(proc)


def wait_ready(
    proc: subprocess.Popen, what: str, ready: Callable[[], bool], logs: Callable[[], str],
    timeout: float = 30.0,
) -> None:
    """Poll ``ready()`` until it is true; fail with the logs if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited {proc.returncode}:\n{logs()}")
        try:
            if ready():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} was not ready in {timeout:.0f} s:\n{logs()}")
        time.sleep(0.1)


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop a master gracefully (SIGTERM), then kill its whole process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(5)
