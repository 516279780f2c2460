"""The optional C extension of the request path: the same bits as its Python twin."""

from __future__ import annotations

import math
import os
import struct
import threading
import time
from pathlib import Path

import prometheus_client as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from victor_mp_metrics import _runtime
from victor_mp_metrics._mpdir import _writer

from ._dirs import ours

BOUNDS = (5.0, 10.0, 25.0, 60000.0, math.inf)
_amounts = st.one_of(
    st.floats(allow_nan=False, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 5.0, 10.0, 25.0, 60000.0, 1e308, -1e308]),
)


def _speedups():
    if _writer._speedups is None:
        if os.environ.get("CI"):
            pytest.fail("the C extension victor_mp_metrics._mpdir._speedups was not built; "
                        ".ci/run installs gcc so that `pip install -e .` builds it")
        pytest.skip("built without the C extension (no C compiler at install)")
    return _writer._speedups


def _values(prefix: str, n: int) -> list[pc.Gauge]:
    return [pc.Gauge(f"{prefix}_{i}", "g", multiprocess_mode="livesum", registry=None)
            for i in range(n)]


def _bits(value: float) -> bytes:
    return struct.pack("<d", value)


def _file_bits(value: object) -> bytes | None:
    f = value._file  # type: ignore[attr-defined]
    if f is None:
        return None
    return _bits(f.doubles[value._index])  # type: ignore[attr-defined]


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.booleans(), st.lists(_amounts, min_size=7, max_size=7),
                              st.sets(st.integers(0, 6), max_size=2)), max_size=12))
def test_c_and_python_leave_the_same_bits(metrics_dir: Path, ops) -> None:
    """add_each and observe_and_add in C and in Python, on twin values (some pending, with
    no file slot): the same floats in memory and in the files, bit for bit."""
    c = _speedups()
    twins = (_values("c", 7), _values("p", 7))
    for gauges in twins:
        for g in gauges:
            g.inc(0.0)  # a slot in the file
    for observe, amounts, pending in ops:
        for index in pending:  # as a full disk leaves them: counting in memory only
            for gauges in twins:
                gauges[index]._value._file = None
        for use_c, gauges in zip((True, False), twins, strict=True):
            values = tuple(g._value for g in gauges)
            if observe:
                fn = c.observe_and_add if use_c else _writer.observe_and_add_in_python
                fn(values, BOUNDS, amounts[0], amounts[1])
            else:
                fn = c.add_each if use_c else _writer.add_each_in_python
                fn(values, tuple(amounts))
    for c_gauge, p_gauge in zip(*twins, strict=True):
        assert _bits(c_gauge._value._value) == _bits(p_gauge._value._value)
        for gauge in (c_gauge, p_gauge):  # a value with a slot has its value there
            assert _file_bits(gauge._value) in (None, _bits(gauge._value._value))


def test_observe_and_add_takes_bisect_lefts_bucket(metrics_dir: Path) -> None:
    """A value on a bound goes to that bound's bucket; the last value is the extra one."""
    c = _speedups()
    gauges = _values("h", len(BOUNDS) + 2)
    values = tuple(g._value for g in gauges)
    for amount in (5.0, 5.0000001, 60000.0, math.inf, -3.0):
        c.observe_and_add(values, BOUNDS, -1.0, amount)
    assert [g._value.get() for g in gauges] == [math.inf, 2.0, 1.0, 0.0, 1.0, 1.0, -5.0]
    assert ours(metrics_dir)[("h_0", ())] == math.inf


def test_bad_arguments_raise_a_clear_error_and_leave_the_lock_free(metrics_dir: Path) -> None:
    c = _speedups()
    gauges = _values("b", 3)
    values = tuple(g._value for g in gauges)
    with pytest.raises(ValueError, match="as many amounts as values"):
        c.add_each(values, (1.0,))
    with pytest.raises(ValueError, match="no bucket"):
        c.observe_and_add(values, (1.0,), -1.0, math.nan)
    with pytest.raises(AttributeError):
        c.add_each((object(),), (1.0,))
    assert _writer._lock_cell[0].acquire(blocking=False)  # released after the error
    _writer._lock_cell[0].release()


def test_concurrent_threads_lose_no_addition(metrics_dir: Path) -> None:
    """Threads adding through C and through Python's inc() at once: an exact total (the C
    functions take the same store lock as every other write)."""
    c = _speedups()
    (gauge,) = _values("t", 1)
    value = gauge._value
    per_thread = 20_000

    def through_c() -> None:
        for _ in range(per_thread):
            c.add_each((value,), (1.0,))

    def through_python() -> None:
        for _ in range(per_thread):
            gauge.inc(1.0)

    threads = [threading.Thread(target=f) for f in (through_c, through_python) * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 4 * per_thread == value.get()
    assert 4 * per_thread == ours(metrics_dir)[("t_0", ())]


def test_after_fork_the_child_uses_its_own_lock(metrics_dir: Path) -> None:
    """A child forked while another thread holds the store lock still writes (the C
    functions follow the lock the child binds, not the parent's held one)."""
    c = _speedups()
    counter = pc.Counter("f", "forked", registry=None)  # a dead child's value still counts
    value = counter._value
    counter.inc(1.0)
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with _writer._lock_cell[0]:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                c.add_each((value,), (2.0,))
                code = 0
            finally:
                os._exit(code)
        deadline = time.monotonic() + 10
        while (found := os.waitpid(pid, os.WNOHANG)) == (0, 0):
            if time.monotonic() > deadline:  # blocked on the parent's held lock
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                pytest.fail("the child's write waited on the lock its parent held")
            time.sleep(0.01)
        status = found[1]
    finally:
        release.set()
        holder.join()
    assert 0 == status
    assert 3.0 == ours(metrics_dir)[("f_total", ())]


def test_flask_requests_count_exactly_through_the_c_path(metrics_dir: Path) -> None:
    """The Flask extension's request path with the C functions: exact counts, durations
    in their buckets and the in-flight gauge back to zero."""
    _speedups()
    from flask import Flask

    from victor_mp_metrics.flask_ext import VictorMetrics

    _runtime.configure()
    app = Flask(__name__)

    @app.get("/ping")
    def ping() -> str:
        return "pong"

    VictorMetrics(app)
    client = app.test_client()
    for _ in range(25):
        assert client.get("/ping", buffered=True).status_code == 200
    found = ours(metrics_dir)
    assert 25.0 == found[("victor_requests_total", (("endpoint", "/ping"), ("method", "GET")))]
    assert 25.0 == found[("victor_request_duration_ms_count",
                          (("endpoint", "/ping"), ("method", "GET")))]
    assert 0.0 == found[("victor_active_connections", ())]


def test_without_the_c_extensions_everything_runs_in_python(tmp_path: Path) -> None:
    """A machine without a C compiler: both modules missing, the Python twins count the
    same requests exactly (a subprocess where importing them fails, as when not built)."""
    import subprocess
    import sys

    directory = tmp_path / "metrics"
    directory.mkdir(mode=0o700)
    script = """
import sys
sys.modules["victor_mp_metrics._mpdir._speedups"] = None  # import fails: not built
sys.modules["victor_mp_metrics._wsgi_request"] = None
from flask import Flask
from victor_mp_metrics import _runtime, wsgi
from victor_mp_metrics._mpdir import _writer
from victor_mp_metrics.flask_ext import VictorMetrics
assert wsgi._FastRequest is None and _writer._speedups is None
_runtime.configure()
app = Flask("t")
app.get("/ping")(lambda: "pong")
VictorMetrics(app)
client = app.test_client()
for _ in range(30):
    assert client.get("/ping", buffered=True).status_code == 200
assert client.get("/nope", buffered=True).status_code == 404
from victor_mp_metrics.catalog import get_catalog
assert 0.0 == get_catalog().active_connections._value.get()  # live only: read it alive
"""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=60, check=False)
    assert 0 == result.returncode, result.stderr
    found = ours(directory)
    assert 30.0 == found[("victor_requests_total", (("endpoint", "/ping"), ("method", "GET")))]
    assert 30.0 == found[("victor_request_duration_ms_count",
                          (("endpoint", "/ping"), ("method", "GET")))]
    assert 1.0 == found[("victor_request_errors_total", (
        ("endpoint", "<unmatched>"), ("error_type", "not_found"), ("method", "GET")))]
