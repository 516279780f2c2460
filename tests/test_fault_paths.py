"""Issue 11's fault paths, with real FIFOs, symlinks, directories, forks and a full tmpfs."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import prometheus_client as pc
import psutil
import pytest

from victor_mp_metrics import _mpdir, _runtime, _system
from victor_mp_metrics._mpdir import _reader

from ._dirs import live_owner, samples, write_data_file, write_entries

IS_ROOT = os.geteuid() == 0


def _total(directory: Path, name: str = "jobs_total") -> float:
    got = samples(_mpdir.DirectoryReader(str(directory)).collect())
    return sum(v for (sample, _labels), v in got.items() if sample == name)


def _plant_hostile_entries(directory: Path, outside: Path) -> list[str]:
    """A FIFO, a symlink, a directory, a bad-key file and a sparse 'huge' file, named like
    dead writers' data files; returns their names."""
    names = ["counter_91-0000aa01.db", "counter_92-0000aa02.db", "histogram_93-0000aa03.db",
             "counter_94-0000aa04.db", "counter_95-0000aa05.db"]
    os.mkfifo(directory / names[0])
    (outside / "victim.db").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"x" * 8)
    (directory / names[1]).symlink_to(outside / "victim.db")
    (directory / names[2]).mkdir()
    key = json.dumps(["jobs", "jobs_total", ["not", "a", "dict"], "h"])
    write_entries(str(directory / names[3]), [(key, 1e9, 0.0)])
    with open(directory / names[4], "wb") as f:
        f.write((1 << 30).to_bytes(4, "little") + b"\0" * 4)
        f.truncate(1 << 30)  # sparse: a gigabyte claimed, nothing allocated
    return names


def test_hostile_entries_are_skipped_without_blocking(tmp_path: Path):
    """A FIFO, symlink, directory, bad key and sparse 1 GiB file: read at once, exact totals."""
    directory, outside = tmp_path / "m", tmp_path / "outside"
    directory.mkdir(mode=0o700)
    outside.mkdir()
    names = _plant_hostile_entries(directory, outside)
    fd = live_owner(directory, "7-00000007")
    try:
        write_data_file(directory, "counter", "7-00000007", [("jobs", "jobs_total", {}, 3.0, 0)])
        reader = _mpdir.DirectoryReader(str(directory))
        started = time.monotonic()
        families, report = reader.read()
        assert time.monotonic() - started < 1.0
        assert {("jobs_total", ()): 3.0} == samples(families)
        assert len(names) == report.corrupt
        assert psutil.Process().memory_info().rss < 1 << 30
        _families, again = reader.read()
        assert 0 == again.corrupt  # reported once per process
    finally:
        os.close(fd)


def test_compaction_skips_hostile_entries_and_keeps_the_directory_bounded(tmp_path: Path):
    """One bad entry never stops compaction: dead writers are still absorbed, nothing blocks."""
    directory, outside = tmp_path / "m", tmp_path / "outside"
    directory.mkdir(mode=0o700)
    outside.mkdir()
    _plant_hostile_entries(directory, outside)
    for i in range(20):
        write_data_file(directory, "counter", f"{2**22 + i}", [("jobs", "jobs_total", {}, 1.0, 0)])
    started = time.monotonic()
    result = _mpdir.compact(str(directory))
    assert time.monotonic() - started < 5.0
    assert 20 <= len(result.absorbed)
    assert 20.0 == _total(directory)
    assert (outside / "victim.db").exists()  # a symlink is moved, never followed
    left = [n for n in os.listdir(directory) if n.endswith(".db")]
    assert len(left) <= 6, left  # the archive plus what could not be moved
    for i in range(20, 40):
        write_data_file(directory, "counter", f"{2**22 + i}", [("jobs", "jobs_total", {}, 1.0, 0)])
    _mpdir.compact(str(directory))
    assert 40.0 == _total(directory)
    assert len([n for n in os.listdir(directory) if n.endswith(".db")]) <= len(left)


def test_quarantine_symlink_to_a_victim_directory_is_never_followed(tmp_path: Path):
    """A `quarantine` symlink to another directory: the victim's files are left untouched."""
    directory, victim = tmp_path / "m", tmp_path / "victim"
    directory.mkdir(mode=0o700)
    victim.mkdir()
    for i in range(150):
        (victim / f"precious-{i:03}").write_text("keep")
    (directory / "quarantine").symlink_to(victim)
    (directory / f"counter_{2**22 + 1}.db").write_bytes(b"garbage!" * 4)
    _families, report = _mpdir.DirectoryReader(str(directory)).read()
    assert 150 == len(os.listdir(victim))
    assert 1 == report.corrupt


@pytest.mark.skipif(not IS_ROOT, reason="a file owned by another uid needs root to make")
def test_a_data_file_owned_by_another_uid_is_not_counted(tmp_path: Path):
    """A well-formed file planted by another user is skipped and reported, never summed."""
    directory = tmp_path / "m"
    directory.mkdir(mode=0o700)
    fd = live_owner(directory, "7-00000007")
    try:
        write_data_file(directory, "counter", "7-00000007", [("jobs", "jobs_total", {}, 2.0, 0)])
        planted = write_data_file(directory, "counter", "8-00000008",
                                  [("jobs", "jobs_total", {}, 1e9, 0)])
        os.chown(planted, 65534, 65534)
        families, report = _mpdir.DirectoryReader(str(directory)).read()
        assert {("jobs_total", ()): 2.0} == samples(families)
        assert 1 == report.corrupt
    finally:
        os.close(fd)


def test_a_deleted_owner_file_keeps_the_writer_alive_and_is_recreated(metrics_dir: Path):
    """Deleting a live writer's .owner file loses nothing: it is not compacted, and the
    watchdog creates the owner file again."""
    counter = pc.Counter("jobs", "jobs", registry=None)
    counter.inc(5)
    store = _runtime.RUNTIME.store
    assert store is not None and store.ident is not None
    (metrics_dir / f"{store.ident}.owner").unlink()
    assert [] == _mpdir.compact(str(metrics_dir)).absorbed
    store.check()
    assert (metrics_dir / f"{store.ident}.owner").exists()
    counter.inc(2)
    assert [] == _mpdir.compact(str(metrics_dir)).absorbed
    assert 7.0 == _total(metrics_dir)


def test_compaction_waits_for_a_stuck_lock_holder_only_so_long(tmp_path: Path):
    """Another process holding compact.lock makes compaction report busy, never hang."""
    directory = tmp_path / "m"
    directory.mkdir(mode=0o700)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT);"
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(30)",
         str(directory / _mpdir.COMPACT_LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert "held" == holder.stdout.readline().strip()  # type: ignore[union-attr]
        started = time.monotonic()
        result = _mpdir.compact(str(directory), lock_wait=0.3)
        assert result.busy and time.monotonic() - started < 2.0
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()  # type: ignore[union-attr]


def test_a_starved_reader_reads_under_the_lock_instead_of_failing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A reader that keeps seeing compactions commit reads once under compact.lock."""
    directory = tmp_path / "m"
    directory.mkdir(mode=0o700)
    monkeypatch.setattr(_reader, "_MAX_ATTEMPTS", 0)
    stop = threading.Event()
    made = [0]

    def churn() -> None:
        while not stop.is_set():
            made[0] += 1
            write_data_file(directory, "counter", f"{2**22 + made[0]}",
                            [("jobs", "jobs_total", {}, 1.0, 0)])
            _mpdir.compact(str(directory))

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        reader = _mpdir.DirectoryReader(str(directory))
        seen = [_total_of(reader) for _ in range(50)]
    finally:
        stop.set()
        thread.join()
    assert seen == sorted(seen)
    assert made[0] == _total(directory)


def _total_of(reader: _mpdir.DirectoryReader) -> float:
    return sum(v for (s, _l), v in samples(reader.collect()).items() if s == "jobs_total")


def test_compaction_racing_forked_dying_writers_counts_each_increment_once(metrics_dir: Path):
    """Real forked writers that die at random while compactions loop: every scrape's total
    is monotonic, and the final total is exactly the increments made."""
    counter = pc.Counter("jobs", "jobs", ["w"], registry=None)
    stop = threading.Event()
    errors: list[BaseException] = []

    def compact_loop() -> None:
        while not stop.is_set():
            try:
                _mpdir.compact(str(metrics_dir), exclude=_runtime.own_idents())
            except BaseException as err:  # pragma: no cover - reported below
                errors.append(err)

    thread = threading.Thread(target=compact_loop)
    thread.start()
    reader = _mpdir.DirectoryReader(str(metrics_dir))
    seen: list[float] = []
    writers = 0
    try:
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                try:
                    counter.labels(str(random.randrange(50))).inc()
                    time.sleep(random.random() * 0.01)
                finally:
                    os._exit(0)
            writers += 1
            os.waitpid(pid, 0)
            if writers % 10 == 0:
                seen.append(sum(v for (s, _l), v in samples(reader.collect()).items()
                                if s == "jobs_total"))
    finally:
        stop.set()
        thread.join()
    assert [] == errors
    assert seen == sorted(seen)
    _mpdir.compact(str(metrics_dir), exclude=_runtime.own_idents())
    assert writers == _total(metrics_dir)
    assert writers > 100


def test_fork_is_not_blocked_by_a_long_compaction(tmp_path: Path):
    """The master forks while its compactor merges 1,000 dead writers: fork() takes < 50 ms."""
    directory = tmp_path / "m"
    directory.mkdir(mode=0o700)
    for i in range(1000):
        write_data_file(directory, "counter", f"{2**22 + i}",
                        [("jobs", "jobs_total", {"k": str(j)}, 1.0, 0) for j in range(20)])
    thread = threading.Thread(target=lambda: _mpdir.compact(str(directory), max_writers=1000))
    thread.start()
    time.sleep(0.05)
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os._exit(0)
    forked = time.perf_counter() - started
    os.waitpid(pid, 0)
    thread.join()
    assert forked < 0.05, forked
    assert 20_000 == _total(directory)


def test_system_metrics_survive_a_process_exiting_during_the_sample():
    """A child that exits during the first CPU sample adds nothing and raises nothing."""
    child = subprocess.Popen(["cat"], stdin=subprocess.PIPE)

    def end_and_reap() -> None:  # during the 0.1 s sample: the child is gone entirely
        time.sleep(0.02)
        child.stdin.close()  # type: ignore[union-attr]
        child.wait()

    reaper = threading.Thread(target=end_and_reap)
    try:
        tree = [psutil.Process(), psutil.Process(child.pid)]
        reaper.start()
        sampler = _system.CpuSampler()
        assert sampler.cpu_percent(tree) >= 0.0
        assert all(key[0] != child.pid for key in sampler.seen)
    finally:
        reaper.join()


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs (root only), unmounted afterwards."""
    if not IS_ROOT or shutil.which("mount") is None:
        pytest.skip("mounting a 1 MiB tmpfs needs root and mount(8)")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount)],
                   check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_never_double_counts(tiny_tmpfs: Path, monkeypatch: pytest.MonkeyPatch):
    """400 series made while a 1 MiB tmpfs fills: once space returns, and again after the
    writer dies and is compacted, every total is exact."""
    directory = tiny_tmpfs / "m"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    _runtime.configure()
    counter = pc.Counter("jobs", "jobs", ["series"], registry=None)
    counter.labels("first").inc(100)
    ballast = tiny_tmpfs / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    for i in range(400):
        counter.labels(f"s{i}").inc()
    store = _runtime.RUNTIME.store
    assert store is not None and store.pending, "the disk never filled"
    assert _total(directory) <= 500.0
    ballast.unlink()
    store.check()
    assert not store.pending
    assert 500.0 == _total(directory)
    assert 100.0 == samples(_mpdir.DirectoryReader(str(directory)).collect())[
        ("jobs_total", (("series", "first"),))]
    _runtime.reset()  # the writer dies: its owner lock is released
    _mpdir.compact(str(directory))
    assert 500.0 == _total(directory)


@pytest.mark.gunicorn
def test_hostile_entries_in_a_running_service_never_take_it_down(tmp_path: Path):
    """A FIFO, symlink, directory and bad files dropped into a live service's directory:
    /healthz never fails, /metrics answers within 5 s, a SIGKILLed worker is replaced,
    churn keeps the directory bounded and the totals stay exact."""
    from ._gunicorn import gunicorn, parse_samples, total

    outside = tmp_path / "outside"
    outside.mkdir()
    env = {"VICTOR_METRICS_SWEEP_INTERVAL": "0.5"}
    args = ["--max-requests", "20", "--max-requests-jitter", "0", "--timeout", "10"]
    with gunicorn(tmp_path, workers=2, env=env, args=args) as server:
        assert server.directory is not None
        _plant_hostile_entries(server.directory, outside)
        sent = total(parse_samples(server.get("/metrics").text), "victor_requests_total",
                     endpoint="/healthz")  # the readiness checks
        for round_ in range(6):
            for _ in range(25):
                assert 200 == server.get("/healthz", timeout=5).status
                sent += 1
            started = time.monotonic()
            resp = server.get("/metrics", timeout=5)
            assert 200 == resp.status and time.monotonic() - started < 5.0
            if round_ == 2:
                victim = server.workers()[0]
                os.kill(victim, 9)
                deadline = time.monotonic() + 10
                while victim in server.workers() or len(server.workers()) != 2:
                    assert time.monotonic() < deadline, server.logs()
                    time.sleep(0.05)
        entries = len(os.listdir(server.directory))
        assert entries <= 40, sorted(os.listdir(server.directory))
        deadline = time.monotonic() + 10
        while True:
            counted = total(parse_samples(server.get("/metrics").text),
                            "victor_requests_total", endpoint="/healthz")
            if counted == sent or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert sent == counted
        started = time.monotonic()
    assert time.monotonic() - started < 15.0  # SIGTERM: the master exits, on_exit is bounded
