"""Batch jobs: process pools aggregate like Gunicorn workers, and `victor-metrics push`
sends the directory's totals to a real Pushgateway (``prometheus-pushgateway``)."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests._dirs import live_owner, write_data_file
from tests._gunicorn import ROOT, free_port, request, stop, wait_ready
from tests._tools import require_tool
from victor_mp_metrics.cli import main
from victor_mp_metrics.exceptions import ConfigurationError, DirectoryError
from victor_mp_metrics.push import PushError, PushResult, push_directory

ROWS = 100
WORKERS = 4
JOB_TIMEOUT = 120.0

# The batch job, as a user writes one. Its settings come from the environment, so that
# spawned workers (which import this file afresh as __mp_main__) see the same ones.
JOB_SCRIPT = '''
import concurrent.futures
import json
import multiprocessing
import os
import time

SOURCE = os.environ["JOB_SOURCE"]  # registry, plain or configured
METHOD = os.environ["JOB_START_METHOD"]
EXECUTOR = os.environ["JOB_EXECUTOR"]  # pool or executor
ROWS = int(os.environ["JOB_ROWS"])
SETUP = os.environ["JOB_SETUP"] == "1"  # the parent counts before it starts the workers
MAXTASKS = int(os.environ["JOB_MAXTASKS"]) or None
LINGER = float(os.environ["JOB_LINGER"])

if SOURCE == "configured":  # the library configured first: plain metrics use its files
    import victor_mp_metrics

    victor_mp_metrics.configure()
if SOURCE in ("plain", "configured"):  # created at import, in the parent and every spawn
    import prometheus_client

    PLAIN = prometheus_client.Counter("batch_rows", "Rows processed.", ["kind"])


def rows():
    if SOURCE == "registry":  # configures the library lazily, in whichever process asks
        import victor_mp_metrics

        return victor_mp_metrics.get_prometheus_registry().counter(
            "batch_rows", "Rows processed.", label_names=["kind"])
    return PLAIN


def start(barrier):
    if barrier is not None:  # every worker is up before the first row: all of them count
        barrier.wait(timeout=60)


def count(row):
    time.sleep(0.002)
    rows().labels(kind="even" if row % 2 == 0 else "odd").inc()
    return os.getpid()


def main():
    ctx = multiprocessing.get_context(METHOD)
    if SETUP:
        rows().labels(kind="setup").inc()
    barrier = None if MAXTASKS else ctx.Barrier(4)
    # Leaving the with-block terminates the workers (SIGTERM): what they counted is
    # already in their files.
    if EXECUTOR == "pool":
        with ctx.Pool(4, start, (barrier,), maxtasksperchild=MAXTASKS) as pool:
            pids = pool.map(count, range(ROWS), chunksize=1)
    else:
        with concurrent.futures.ProcessPoolExecutor(4, ctx, start, (barrier,)) as pool:
            pids = list(pool.map(count, range(ROWS)))
    time.sleep(LINGER)
    print(json.dumps({"parent": os.getpid(), "pids": sorted(set(pids))}))


if __name__ == "__main__":
    main()
'''

# A forked pool whose parent ran many garbage collections before forking; the workers live
# long enough for their watchdog to sample the process metrics (every second).
GC_SCRIPT = '''
import gc
import json
import multiprocessing
import os
import time

import victor_mp_metrics

victor_mp_metrics.get_prometheus_registry().counter("batch_rows", "Rows processed.").inc()
for _ in range(1000):
    gc.collect(0)
BEFORE_FORK = gc.get_stats()[0]["collections"]


def work(_):
    time.sleep(2.5)
    return os.getpid()


if __name__ == "__main__":
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.map(work, range(4), chunksize=1)
    time.sleep(1.5)
    print(json.dumps({"before_fork": BEFORE_FORK,
                      "parent": gc.get_stats()[0]["collections"]}))
'''


# --- the Pushgateway -----------------------------------------------------------------------


@dataclass(frozen=True)
class Gateway:
    url: str

    def group(self, job: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample the gateway exposes for ``job``: {(name, labels but job and
        instance): value}, parsed from its /metrics."""
        response = request(self.url + "/metrics", timeout=10)
        assert 200 == response.status, response.text
        found = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                labels = dict(sample.labels)
                if labels.pop("job", None) != job:
                    continue
                labels.pop("instance", None)
                found[(sample.name, tuple(sorted(labels.items())))] = sample.value
        return found

    def rows(self, job: str) -> dict[str, float]:
        """The pushed ``batch_rows_total`` of ``job``, by its ``kind`` label."""
        return {dict(labels)["kind"]: value for (name, labels), value in self.group(job).items()
                if name == "batch_rows_total"}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A real Pushgateway on a free loopback port, in memory only (no persistence file)."""
    binary = require_tool("prometheus-pushgateway", "apt-get install prometheus-pushgateway")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("pushgateway") / "pushgateway.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(proc, "prometheus-pushgateway",
                   lambda: request(url + "/-/ready", timeout=2).status == 200,
                   log_path.read_text, timeout=30)
        yield Gateway(url)
    finally:
        stop(proc, timeout=10)


def new_job() -> str:
    return f"batch-{secrets.token_hex(4)}"


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    path = tmp_path / "metrics"
    path.mkdir(mode=0o700)
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VICTOR_", "JOB_")) and k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_bounded(argv: list[str], env: Mapping[str, str], timeout: float = JOB_TIMEOUT,
                ) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in its own process group; whatever of it is left at the end is killed."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=dict(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        stop(proc, timeout=10)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@dataclass(frozen=True)
class Job:
    source: str = "registry"
    method: str = "fork"
    executor: str = "pool"
    setup: bool = True
    maxtasks: int = 0
    linger: float = 0.0


def run_job(tmp_path: Path, directory: Path, job: Job, script: str = JOB_SCRIPT
            ) -> dict[str, Any]:
    """Run the batch job with PROMETHEUS_MULTIPROC_DIR=``directory``; its JSON report."""
    path = tmp_path / "batch_job.py"
    path.write_text(script)
    done = run_bounded([sys.executable, str(path)], _env(
        PROMETHEUS_MULTIPROC_DIR=str(directory), JOB_SOURCE=job.source,
        JOB_START_METHOD=job.method, JOB_EXECUTOR=job.executor, JOB_ROWS=str(ROWS),
        JOB_SETUP="1" if job.setup else "0", JOB_MAXTASKS=str(job.maxtasks),
        JOB_LINGER=str(job.linger)))
    assert 0 == done.returncode, done.stderr
    report: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return report


def push_cli(directory: Path, gateway: Gateway, job: str, *extra: str
             ) -> subprocess.CompletedProcess[str]:
    """`victor-metrics push` in a subprocess, as a batch job's last step runs it."""
    return run_bounded([sys.executable, "-m", "victor_mp_metrics", "push", "--dir",
                        str(directory), "--gateway", gateway.url, "--job", job, *extra],
                       _env(), timeout=60)


def writer_pids(directory: Path) -> set[int]:
    """The pids of the processes that wrote counter files (ours or stock)."""
    return {int(name[len("counter_"):-len(".db")].split("-")[0])
            for name in os.listdir(directory)
            if name.startswith("counter_") and not name.startswith("counter_archive")}


def expected_rows(setup: bool) -> dict[str, float]:
    return {"even": ROWS / 2, "odd": ROWS / 2, **({"setup": 1.0} if setup else {})}


def check_pool_push(tmp_path: Path, directory: Path, gateway: Gateway, job: Job) -> None:
    report = run_job(tmp_path, directory, job)
    pids = set(report["pids"])
    if job.maxtasks:  # each worker exits after at most maxtasks rows
        assert ROWS // job.maxtasks <= len(pids), report
    else:
        assert WORKERS == len(pids), report
    assert pids <= writer_pids(directory), "a worker wrote no file of its own"
    name = new_job()
    done = push_cli(directory, gateway, name)
    assert (0, "") == (done.returncode, done.stderr)
    # More families when a process lived past its first process-metrics sample (1 s).
    assert re.fullmatch(rf"push: pushed \d+ metric families \(\d+ samples\) of {directory} "
                        rf"to {gateway.url}/metrics/job/{name} \(PUT\)\n", done.stdout)
    pushed = gateway.rows(name)
    assert expected_rows(job.setup) == pushed
    assert ROWS == pushed["even"] + pushed["odd"]


# --- pools aggregate exactly -----------------------------------------------------------------


def test_fork_pool_job_pushed_with_the_cli_reads_exactly_100(
    tmp_path: Path, directory: Path, gateway: Gateway
) -> None:
    """A 4-process fork Pool counting 100 rows, pushed by `victor-metrics push`: 100 on the
    Pushgateway, and the parent's pre-fork count once, not once per worker."""
    check_pool_push(tmp_path, directory, gateway, Job())


@pytest.mark.parametrize("job", [
    Job(source="plain"),
    Job(setup=False),
    Job(maxtasks=5),
    Job(method="spawn"),
    Job(method="spawn", source="plain"),
    Job(method="spawn", source="configured"),
    Job(executor="executor"),
    Job(executor="executor", method="spawn"),
    Job(executor="executor", method="spawn", source="plain"),
    Job(executor="executor", method="forkserver"),
], ids=lambda job: f"{job.executor}-{job.method}-{job.source}"
       + ("" if job.setup else "-lazy") + (f"-maxtasks{job.maxtasks}" if job.maxtasks else ""))
def test_pool_jobs_push_exact_totals(
    tmp_path: Path, directory: Path, gateway: Gateway, job: Job
) -> None:
    """Pool and ProcessPoolExecutor, fork, spawn and forkserver, registry or plain
    prometheus_client counters, short-lived workers: the pushed totals are exact."""
    check_pool_push(tmp_path, directory, gateway, job)


def test_finished_workers_push_their_counters_but_not_their_live_gauges(
    tmp_path: Path, directory: Path, gateway: Gateway
) -> None:
    """Once the job has ended, its process counters are pushed and its livesum gauges are
    not; the Pushgateway accepts process_* next to its own."""
    run_job(tmp_path, directory, Job(linger=1.5))
    name = new_job()
    assert 0 == push_cli(directory, gateway, name).returncode
    pushed = {sample for sample, _labels in gateway.group(name)}
    assert {"batch_rows_total", "process_cpu_seconds_total"} <= pushed
    assert not {"process_resident_memory_bytes", "process_open_fds", "python_info"} & pushed


def test_forked_workers_do_not_recount_their_parents_garbage_collections(
    tmp_path: Path, directory: Path, gateway: Gateway
) -> None:
    """python_gc_collections_total counts each collection once: forked workers do not
    report the collections their parent ran before the fork."""
    report = run_job(tmp_path, directory, Job(), script=GC_SCRIPT)
    name = new_job()
    assert 0 == push_cli(directory, gateway, name).returncode
    pushed = gateway.group(name)[("python_gc_collections_total", (("generation", "0"),))]
    # The four workers sleep; together they run far fewer collections than the parent's
    # 1,000 before the fork. Re-reporting the parent's adds 4 x 1,000.
    assert pushed - report["parent"] < report["before_fork"], report


# --- the Python function -------------------------------------------------------------------

LIVE, DEAD = "1111-aaaaaaaa", "4242-0badc0de"


def test_push_directory_pushes_totals_and_live_gauges_of_live_writers(
    directory: Path, gateway: Gateway
) -> None:
    """push_directory: counters summed over live and dead writers, livesum gauges of live
    writers only, max gauges of all; a grouping value with a slash arrives intact."""
    for ident, count, busy in ((LIVE, 3.0, 5.0), (DEAD, 2.0, 7.0)):
        write_data_file(directory, "counter", ident,
                        [("batch_rows", "batch_rows_total", {"kind": "odd"}, count, 0.0)])
        write_data_file(directory, "gauge_livesum", ident,
                        [("batch_busy", "batch_busy", {}, busy, 0.0)])
    write_data_file(directory, "gauge_max", DEAD, [("batch_last", "batch_last", {}, 9.0, 0.0)])
    os.close(live_owner(directory, DEAD))
    fd = live_owner(directory, LIVE)
    name = new_job()
    try:
        result = push_directory(directory, gateway.url + "/", name, {"shard": "eu/1"})
    finally:
        os.close(fd)
    assert PushResult(f"{gateway.url}/metrics/job/{name}/shard@base64/ZXUvMQ==", "PUT", 3, 3
                      ) == result
    shard = (("shard", "eu/1"),)
    assert {
        ("batch_rows_total", (("kind", "odd"), *shard)): 5.0,
        ("batch_busy", shard): 5.0,
        ("batch_last", shard): 9.0,
    } == {k: v for k, v in gateway.group(name).items() if k[0].startswith("batch_")}


def test_put_replaces_the_group_and_post_only_the_families_pushed(
    tmp_path: Path, gateway: Gateway
) -> None:
    """method="post" keeps the group's other families; "put" replaces them all."""
    first, second = tmp_path / "first", tmp_path / "second"
    for path, metrics in ((first, ("batch_a", "batch_b")), (second, ("batch_c",))):
        path.mkdir(mode=0o700)
        write_data_file(path, "counter", "7-ab",
                        [(m, m + "_total", {}, 1.0, 0.0) for m in metrics])
    name = new_job()

    def families() -> set[str]:
        return {s for s, _labels in gateway.group(name) if s.startswith("batch_")}

    push_directory(first, gateway.url, name)
    assert "POST" == push_directory(second, gateway.url, name, method="post").method
    assert {"batch_a_total", "batch_b_total", "batch_c_total"} == families()
    push_directory(second, gateway.url, name, method="put")
    assert {"batch_c_total"} == families()


def test_push_directory_raises_errors_that_say_the_fix(
    tmp_path: Path, directory: Path
) -> None:
    """Bad arguments raise ConfigurationError, a missing directory DirectoryError, an
    unreachable gateway PushError (an OSError)."""
    with pytest.raises(DirectoryError, match=re.escape(
            "is not a directory, so there is nothing to push. Pass the "
            "PROMETHEUS_MULTIPROC_DIR the job's processes wrote to.")):
        push_directory(tmp_path / "nowhere", "localhost:9091", "j")
    for kwargs, message in (
        ({"gateway": "ftp://h"}, "gateway 'ftp://h' is not a Pushgateway URL"),
        ({"job": ""}, "job is empty"),
        ({"grouping_key": {"job": "x"}}, "may not contain 'job'"),
        ({"grouping_key": {"a-b": "x"}}, "grouping key label 'a-b' is not a label name"),
        ({"method": "get"}, "method 'get' is not a push method"),
        ({"timeout": 0.0}, "timeout 0.0 is not a number of seconds > 0"),
    ):
        args: dict[str, Any] = {"gateway": "localhost:9091", "job": "j", **kwargs}
        with pytest.raises(ConfigurationError, match=re.escape(message)):
            push_directory(directory, **args)
    with pytest.raises(PushError, match="cannot reach the Pushgateway") as raised:
        push_directory(directory, f"127.0.0.1:{free_port()}", "j")
    assert isinstance(raised.value, OSError)


# --- the command's errors ------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """main(argv) in this process: (exit status, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_push_help(capsys: pytest.CaptureFixture[str]) -> None:
    """`push --help` shows the push options and exits 0."""
    code, out, _ = run(capsys, "push", "--help")
    assert 0 == code
    assert out.startswith("usage: victor-metrics push [-h] [--dir DIR] --gateway URL --job JOB")
    for option in ("--grouping KEY=VALUE", "--method {put,post}", "--timeout S"):
        assert option in out


@pytest.mark.parametrize(("argv", "message"), [
    (("--grouping", "nope"), "argument --grouping: 'nope' is not KEY=VALUE"),
    (("--grouping", "job=x"), "the grouping key may not contain 'job'"),
    (("--grouping", "1a=b"), "grouping key label '1a' is not a label name"),
    (("--grouping", "a=1", "--grouping", "a=2"), "--grouping a= given twice"),
    (("--method", "get"), "argument --method: invalid choice: 'get'"),
    (("--timeout", "0"), "argument --timeout: '0' is not a number of seconds > 0"),
    (("--gateway", "ftp://h"), "gateway 'ftp://h' is not a Pushgateway URL"),
])
def test_bad_arguments_are_usage_errors(
    capsys: pytest.CaptureFixture[str], directory: Path, argv: tuple[str, ...], message: str
) -> None:
    """A malformed push argument exits 2 with one error line naming it, before any push."""
    code, out, err = run(capsys, "push", "--dir", str(directory), "--gateway",
                         "localhost:1", "--job", "j", *argv)
    assert (2, "") == (code, out)
    assert err.splitlines()[-1].startswith(f"victor-metrics push: error: {message}")


def test_missing_directory_exits_1_and_pushes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, gateway: Gateway
) -> None:
    """push of a missing directory exits 1 with one line, and the gateway gets no group."""
    missing, name = tmp_path / "nowhere", new_job()
    code, out, err = run(capsys, "push", "--dir", str(missing), "--gateway", gateway.url,
                         "--job", name)
    assert (1, "") == (code, out)
    assert (f"victor-metrics push: error: {missing} is not a directory, so there is nothing "
            "to push. Pass the PROMETHEUS_MULTIPROC_DIR the job's processes wrote to.\n"
            ) == err
    assert {} == gateway.group(name)


def test_unreachable_gateway_exits_1_with_one_line(
    capsys: pytest.CaptureFixture[str], directory: Path
) -> None:
    """A gateway where nothing listens: exit 1, one line naming the URL, no traceback."""
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = run(capsys, "push", "--dir", str(directory), "--gateway", url,
                         "--job", "j")
    assert (1, "") == (code, out)
    [line] = err.splitlines()
    assert line.startswith(f"victor-metrics push: error: cannot reach the Pushgateway at "
                           f"{url}/metrics/job/j: ")
    assert line.endswith("nothing was pushed. Is it running, and is the gateway URL right?")


def test_refused_push_exits_1_with_the_gateways_reason(
    capsys: pytest.CaptureFixture[str], directory: Path, gateway: Gateway
) -> None:
    """A push the Pushgateway answers 400 (a counter where it holds a gauge of that name):
    exit 1 with the status and the gateway's own message; no metric lands."""
    holder = f"{gateway.url}/metrics/job/{new_job()}"
    gauge = b"# TYPE batch_conflict_total gauge\nbatch_conflict_total 1\n"
    assert 200 == request(holder, "PUT", gauge).status
    write_data_file(directory, "counter", "7-ab",
                    [("batch_conflict", "batch_conflict_total", {}, 4.0, 0.0)])
    name = new_job()
    try:
        code, out, err = run(capsys, "push", "--dir", str(directory), "--gateway",
                             gateway.url, "--job", name)
    finally:
        assert 202 == request(holder, "DELETE").status
    assert (1, "") == (code, out)
    [line] = err.splitlines()
    assert line.startswith(f"victor-metrics push: error: the Pushgateway at {gateway.url}"
                           f"/metrics/job/{name} answered 400 Bad Request: pushed metrics are "
                           "invalid or inconsistent with existing metrics: ")
    assert line.endswith("nothing was pushed.")
    group = gateway.group(name)  # the gateway notes the failure, and no metric
    assert {"push_time_seconds", "push_failure_time_seconds"} == {k[0] for k in group}
    assert 0 == group[("push_time_seconds", ())]


def test_gateway_url_ending_in_metrics_is_a_404_with_a_hint(
    capsys: pytest.CaptureFixture[str], directory: Path, gateway: Gateway
) -> None:
    """--gateway with /metrics appended: the gateway's 404, and a hint to drop /metrics."""
    code, _, err = run(capsys, "push", "--dir", str(directory), "--gateway",
                       gateway.url + "/metrics", "--job", "j")
    assert 1 == code
    assert (f"victor-metrics push: error: the Pushgateway at {gateway.url}/metrics/metrics/job/j"
            " answered 404 Not Found: 404 page not found; nothing was pushed. Is the gateway "
            "URL the Pushgateway's base URL (http://host:9091, without /metrics)?\n") == err


def test_silent_gateway_times_out(capsys: pytest.CaptureFixture[str], directory: Path) -> None:
    """A gateway that never answers: exit 1 after --timeout seconds, saying so."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # connections complete in the backlog; nothing ever answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        code, out, err = run(capsys, "push", "--dir", str(directory), "--gateway", url,
                             "--job", "j", "--timeout", "0.5")
        took = time.monotonic() - started
    assert (1, "") == (code, out)
    assert (f"victor-metrics push: error: the Pushgateway at {url}/metrics/job/j did not "
            "answer within 0.5 s, so the push may or may not have landed; pushing again is "
            "safe. Is it overloaded? Raise the timeout if it is just slow.\n") == err
    assert 0.4 < took < 10, took


def test_empty_directory_pushes_an_empty_group_with_a_warning(
    capsys: pytest.CaptureFixture[str], directory: Path, gateway: Gateway
) -> None:
    """An empty directory is pushed (exit 0) with a warning that it holds no metrics."""
    name = new_job()
    code, out, err = run(capsys, "push", "--dir", str(directory), "--gateway", gateway.url,
                         "--job", name, "--method", "post")
    assert 0 == code
    assert (f"push: pushed 0 metric families (0 samples) of {directory} to "
            f"{gateway.url}/metrics/job/{name} (POST)\n") == out
    assert (f"victor-metrics push: warning: {directory} holds no metrics; is it the directory "
            "the job's processes wrote to?\n") == err
