"""The write path: per-process files, fork, and surviving a broken directory."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from pathlib import Path

import prometheus_client as pc
import pytest

from victor_mp_metrics import UnsafeDirectoryError, _runtime

from ._dirs import ours


def _counter(name: str = "jobs") -> pc.Counter:
    return pc.Counter(name, "jobs done", registry=None)


def test_files_are_private_and_named_after_a_unique_ident(metrics_dir: Path):
    """Each process writes 0600 files named {kind}_{pid}-{random}.db next to its owner lock."""
    _counter().inc()
    store = _runtime.RUNTIME.store
    assert store is not None and store.ident is not None
    assert store.ident.startswith(f"{os.getpid()}-")
    for name in os.listdir(metrics_dir):
        assert 0o600 == stat.S_IMODE((metrics_dir / name).stat().st_mode), name
    assert {f"counter_{store.ident}.db", f"{store.ident}.owner"} <= set(os.listdir(metrics_dir))


def test_forked_child_writes_its_own_files(metrics_dir: Path):
    """After fork the child starts from zero in new files; the parent's total is kept."""
    counter = _counter()
    counter.inc(5)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        counter.inc(2)
        os._exit(0)
    assert 0 == os.waitpid(pid, 0)[1]
    assert 7.0 == ours(metrics_dir)[("jobs_total", ())]
    assert 5.0 == counter._value.get()


def test_missing_directory_keeps_counting_in_memory(tmp_path: Path, monkeypatch, caplog):
    """An uncreatable directory logs one clear error; values count on in memory."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(blocker / "metrics"))
    with caplog.at_level(logging.ERROR, logger="victor_mp_metrics"):
        _runtime.configure()
        counter = _counter()
        counter.inc(3)
        counter.inc(4)
    assert 7.0 == counter._value.get()
    store = _runtime.RUNTIME.store
    assert store is not None and store.failing and store.write_errors >= 1
    messages = [r.getMessage() for r in caplog.records]
    assert any("values are kept in memory" in m for m in messages), messages


def test_full_disk_is_an_error_not_a_crash(metrics_dir: Path, monkeypatch, caplog):
    """ENOSPC when a file is created: logged, counted, the value lives on; then recovered."""
    real = os.posix_fallocate

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with caplog.at_level(logging.ERROR, logger="victor_mp_metrics"):
        counter = _counter()
        counter.inc(2)
    store = _runtime.RUNTIME.store
    assert store.failing
    assert any("No space left" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(os, "posix_fallocate", real)
    store.check()  # what the watchdog does every few seconds
    counter.inc(1)
    assert not store.failing
    assert 3.0 == ours(metrics_dir)[("jobs_total", ())]


def test_directory_replaced_under_a_running_process_loses_nothing(metrics_dir: Path, caplog):
    """When the directory is deleted and re-created, this process's values move to it."""
    counter = _counter()
    counter.inc(5)
    shutil.rmtree(metrics_dir)
    metrics_dir.mkdir(mode=0o700)
    counter.inc(1)  # lands in the unlinked file; the watchdog's check moves everything
    with caplog.at_level(logging.ERROR, logger="victor_mp_metrics"):
        _runtime.RUNTIME.store.check()
    assert any("removed or replaced" in r.getMessage() for r in caplog.records)
    counter.inc(1)
    assert 7.0 == ours(metrics_dir)[("jobs_total", ())]


def test_directory_deleted_is_recreated_by_the_watchdog_check(metrics_dir: Path):
    """A deleted directory is re-created (0700) and refilled with this process's values."""
    counter = _counter()
    counter.inc(4)
    shutil.rmtree(metrics_dir)
    _runtime.RUNTIME.store.check()
    assert 0o700 == stat.S_IMODE(metrics_dir.stat().st_mode)
    assert 4.0 == ours(metrics_dir)[("jobs_total", ())]


def test_write_errors_self_metric_counts_failures(tmp_path: Path, monkeypatch):
    """victor_metrics_write_errors_total reports failed file writes."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(blocker / "metrics"))
    _runtime.configure()
    _counter().inc()
    store = _runtime.RUNTIME.store
    _runtime.self_counter("write_errors").inc(store.take_write_errors())
    # the counter's own creation failed to write, too
    _runtime.self_counter("write_errors").inc(store.take_write_errors())
    assert store.write_errors >= 2
    assert store.write_errors == _runtime.self_counter("write_errors")._value.get()


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722])
def test_directory_writable_by_others_is_refused(tmp_path: Path, monkeypatch, mode: int):
    """A multiprocess directory other users can write to is refused with a clear error."""
    from victor_mp_metrics import UnsafeDirectoryError

    path = tmp_path / "shared"
    path.mkdir()
    path.chmod(mode)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(path))
    with pytest.raises(UnsafeDirectoryError, match=r"writable by other users.*chmod 700"):
        _runtime.configure()


@pytest.mark.parametrize("mode", [0o1777, 0o1770, 0o3770])
def test_sticky_shared_directory_is_refused(tmp_path: Path, monkeypatch, mode: int):
    """A sticky shared directory (like /tmp) is refused: others could plant files there."""
    path = tmp_path / "sticky"
    path.mkdir()
    path.chmod(mode)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(path))
    with pytest.raises(UnsafeDirectoryError, match="chmod 700"):
        _runtime.configure()


def test_missing_directory_is_created_private(tmp_path: Path, monkeypatch):
    """A missing directory is created with mode 0700."""
    path = tmp_path / "a" / "b"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(path))
    _runtime.configure()
    assert 0o700 == stat.S_IMODE(path.stat().st_mode)


def test_import_order_does_not_matter(tmp_path: Path):
    """prometheus_client imported before the variable is set still writes per-process files."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import os, sys
        import prometheus_client, victor_mp_metrics  # imported first, as gunicorn.conf.py does
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
        from victor_mp_metrics import get_catalog
        get_catalog().requests_total.labels("/x", "GET").inc()
        """
    )
    directory = tmp_path / "m"
    for _ in range(3):
        subprocess.run([sys.executable, "-c", code, str(directory)], check=True)
    key = ("victor_requests_total", (("endpoint", "/x"), ("method", "GET")))
    assert 3.0 == ours(directory)[key]


def test_values_keep_counting_while_the_directory_is_unusable(metrics_dir: Path):
    """Between the directory breaking and recovering, increments go on and are all kept."""
    counter = _counter()
    counter.inc(1)
    store = _runtime.RUNTIME.store
    shutil.rmtree(metrics_dir)
    metrics_dir.write_text("in the way")
    store.check()
    counter.inc(2)
    assert store.failing and 3.0 == counter._value.get()
    metrics_dir.unlink()
    store.check()
    assert not store.failing
    assert 3.0 == ours(metrics_dir)[("jobs_total", ())]


def test_parents_are_created_private_whatever_the_umask(tmp_path: Path, monkeypatch):
    """Under umask 000 the directory and every parent made for it are still mode 0700."""
    path = tmp_path / "p1" / "p2" / "metrics"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(path))
    old = os.umask(0)
    try:
        _runtime.configure()
    finally:
        os.umask(old)
    for made in (path, path.parent, path.parent.parent):
        assert 0o700 == stat.S_IMODE(made.stat().st_mode), made


def test_a_squatted_default_location_is_refused(tmp_path: Path, monkeypatch):
    """A default base that is a symlink planted by someone else is refused, not followed."""
    from victor_mp_metrics import gunicorn_hooks

    victim = tmp_path / "elsewhere"
    victim.mkdir(mode=0o700)
    squat = tmp_path / "victor-metrics-squat"
    squat.symlink_to(victim)
    monkeypatch.setattr(gunicorn_hooks, "default_base", lambda: str(squat))
    with pytest.raises(SystemExit, match="symbolic link"):
        gunicorn_hooks.use_default_directory()
    assert [] == os.listdir(victim)
