"""The file format, names, and who is alive."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from victor_mp_metrics import _mpdir

from ._dirs import live_owner, read_data_file, write_data_file, write_entries


@pytest.mark.parametrize(
    ("name", "kind", "mode", "ident", "generation"),
    [
        ("counter_123.db", "counter", "", "123", None),
        ("gauge_livesum_123-9f0a.db", "gauge_livesum", "livesum", "123-9f0a", None),
        ("histogram_archive-7.db", "histogram", "", "archive-7", 7),
        ("gauge_max_archive-2.db", "gauge_max", "max", "archive-2", 2),
    ],
)
def test_parse_name_reads_kind_mode_ident(name, kind, mode, ident, generation):
    """Data file names give kind, gauge mode, writer ident and archive generation."""
    info = _mpdir.parse_name(name)
    assert info is not None
    assert (kind, mode, ident, generation) == (info.kind, info.mode, info.ident, info.generation)


@pytest.mark.parametrize(
    "name", ["manifest.json", "123.owner", "gauge_bogus_1.db", "counter_1.db.x.tmp", "x_1.db"]
)
def test_parse_name_ignores_other_files(name):
    """Names that are not data files are not mistaken for them."""
    assert _mpdir.parse_name(name) is None


def test_entries_round_trip(tmp_path: Path):
    """What write_file_atomically writes, iter_entries reads back in order."""
    rows = [("k1", 1.5, 0.0), ("a longer key with ünïcode", -2.0, 123.25)]
    path = tmp_path / "counter_1.db"
    write_entries(str(path), rows)
    data = read_data_file(str(path))
    got = [(k.decode(), v, t) for k, v, t, _ in _mpdir._format.iter_entries(data, len(data))]
    assert rows == got
    assert 0o600 == path.stat().st_mode & 0o777


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "shorter than the 8-byte header"),
        (b"\x03\x00\x00\x00\x00\x00\x00\x00", "header says 3 bytes used"),
        (b"\x00\x01\x00\x00\x00\x00\x00\x00", "header says 256 bytes used, file has 8"),
    ],
)
def test_read_file_rejects_corrupt_headers(tmp_path: Path, content: bytes, problem: str):
    """A 0-byte or truncated file is Unreadable, saying what is wrong."""
    path = tmp_path / "counter_1.db"
    path.write_bytes(content)
    with pytest.raises(_mpdir.Unreadable, match=problem):
        read_data_file(str(path))


def test_read_file_does_not_follow_symlinks(tmp_path: Path):
    """A symlink planted in the directory is never followed."""
    target = tmp_path / "secret"
    target.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"x" * 8)
    (tmp_path / "counter_1.db").symlink_to(target)
    with pytest.raises(_mpdir.Unreadable, match="symbolic link"):
        read_data_file(str(tmp_path / "counter_1.db"))


def test_writer_alive_while_owner_lock_held(tmp_path: Path):
    """A writer is alive exactly while its owner file is locked."""
    ident = _mpdir._names.new_ident()
    fd = live_owner(tmp_path, ident)
    assert _mpdir.writer_alive(str(tmp_path), ident)
    os.close(fd)
    assert not _mpdir.writer_alive(str(tmp_path), ident)


def test_writer_dead_after_process_killed(tmp_path: Path):
    """The kernel releases a killed writer's lock: it is dead, though its files remain."""
    code = (
        "import os, sys, time; from victor_mp_metrics import _mpdir;"
        "_mpdir.create_owner_file(sys.argv[1], sys.argv[2]); print('ready', flush=True);"
        "time.sleep(60)"
    )
    ident = "999999-abcdef01"
    with subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path), ident], stdout=subprocess.PIPE
    ) as proc:
        try:
            assert b"ready\n" == proc.stdout.readline()
            assert _mpdir.writer_alive(str(tmp_path), ident)
        finally:
            proc.kill()
            proc.wait(10)
        assert (tmp_path / f"{ident}.owner").exists()
        assert not _mpdir.writer_alive(str(tmp_path), ident)


def test_reused_pid_does_not_revive_dead_writer(tmp_path: Path):
    """A dead writer whose pid now belongs to a live process (ours) is still dead."""
    ident = f"{os.getpid()}-0badc0de"
    os.close(live_owner(tmp_path, ident))  # owner file exists, lock released: writer died
    assert not _mpdir.writer_alive(str(tmp_path), ident)


def test_stock_writer_file_older_than_process_is_dead(tmp_path: Path):
    """A stock file named after a live pid, last written before that process started, is dead."""
    path = write_data_file(tmp_path, "counter", str(os.getpid()), [("c", "c_total", {}, 1, 0)])
    assert _mpdir.writer_alive(str(tmp_path), str(os.getpid()), str(path))
    old = time.time() - 10 * 365 * 86400
    os.utime(path, (old, old))
    assert not _mpdir.writer_alive(str(tmp_path), str(os.getpid()), str(path))


def test_stock_writer_with_exited_pid_is_dead(tmp_path: Path):
    """A stock file whose pid no longer exists is dead."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = proc.stdout.strip()
    path = write_data_file(tmp_path, "counter", pid, [("c", "c_total", {}, 1, 0)])
    assert not _mpdir.writer_alive(str(tmp_path), pid, str(path))
