"""The ``victor-metrics`` command line: doctor, compact, dump and serve, for real."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._dirs import data_files, live_owner, ours, write_data_file
from tests._gunicorn import ROOT, free_port, request
from victor_mp_metrics import _doctor, _runtime, cli
from victor_mp_metrics._server import start_metrics_server
from victor_mp_metrics.cli import main
from victor_mp_metrics.exceptions import ConfigurationError
from victor_mp_metrics.settings import load_settings

LIVE = "1111-aaaaaaaa"
DEAD = "4242-0badc0de"
LABELS = {"endpoint": "/x", "method": "GET", "status": "200"}
SERIES = 'victor_requests_total{endpoint="/x",method="GET",status="200"}'
COMMANDS = ("doctor", "compact", "dump", "serve")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    """main(argv) in this process: (exit status, stdout lines, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def fails(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("FAIL")]


def listing(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def requests_file(directory: Path, ident: str, value: float) -> Path:
    return write_data_file(
        directory, "counter", ident,
        [("victor_requests", "victor_requests_total", LABELS, value, 0.0)],
    )


@pytest.fixture
def owners() -> Iterator[list[int]]:
    """File descriptors of live owner files, released after the test."""
    fds: list[int] = []
    yield fds
    for fd in fds:
        os.close(fd)


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    path = tmp_path / "metrics"
    path.mkdir()
    path.chmod(0o700)
    return path


@pytest.fixture
def healthy(directory: Path, owners: list[int]) -> Path:
    """One live writer with 3 requests counted."""
    requests_file(directory, LIVE, 3.0)
    owners.append(live_owner(directory, LIVE))
    return directory


def add_orphan(directory: Path, value: float = 2.0) -> None:
    """Files of a writer that died without being compacted (its owner lock is free)."""
    requests_file(directory, DEAD, value)
    os.close(live_owner(directory, DEAD))


# --- the program -------------------------------------------------------------------------


def test_python_m_runs_the_cli() -> None:
    """`python -m victor_mp_metrics --help` prints the program's usage and exits 0."""
    done = subprocess.run([sys.executable, "-m", "victor_mp_metrics", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert 0 == done.returncode
    assert "usage: victor-metrics [-h] [--version] COMMAND ..." == done.stdout.splitlines()[0]
    for command in COMMANDS:
        assert any(line.split()[:1] == [command] for line in done.stdout.splitlines())


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(capsys: pytest.CaptureFixture[str], command: str) -> None:
    """`COMMAND --help` prints that command's usage, with --dir, and exits 0."""
    code, lines, _ = run(capsys, command, "--help")
    assert 0 == code
    assert lines[0].startswith(f"usage: victor-metrics {command} [-h] [--dir DIR]")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the program name and the package version."""
    from victor_mp_metrics import __version__

    assert (0, [f"victor-metrics {__version__}"], "") == run(capsys, "--version")


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown command exits 2 with argparse's message."""
    code, _, err = run(capsys, "frobnicate")
    assert 2 == code
    assert "invalid choice: 'frobnicate'" in err


@pytest.mark.parametrize("command", COMMANDS)
def test_no_directory_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], command: str, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """No --dir, no PROMETHEUS_MULTIPROC_DIR, no running master: exit 2, saying what to pass."""
    monkeypatch.setattr(cli, "default_base", lambda: str(tmp_path / "base"))
    code, lines, err = run(capsys, command)
    assert (2, []) == (code, lines)
    assert (f"victor-metrics {command}: error: no metrics directory: PROMETHEUS_MULTIPROC_DIR "
            f"is unset and no running Gunicorn master uses the built-in directory under "
            f"{tmp_path / 'base'}. Pass --dir DIR or set PROMETHEUS_MULTIPROC_DIR."
            ) == err.splitlines()[-1]


@pytest.mark.parametrize("command", ("compact", "dump", "serve"))
def test_bad_setting_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, directory: Path,
    command: str,
) -> None:
    """A bad VICTOR_METRICS_PORT is one line with the ConfigurationError text, exit 2."""
    monkeypatch.setenv("VICTOR_METRICS_PORT", "99999")
    with pytest.raises(ConfigurationError) as expected:
        load_settings()
    assert (2, [], f"victor-metrics: error: {expected.value}\n") == run(
        capsys, command, "--dir", str(directory)
    )


def test_doctor_reports_a_bad_setting_as_fail(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, healthy: Path
) -> None:
    """doctor turns a bad setting into a FAIL line (naming the fix) and goes on checking."""
    monkeypatch.setenv("VICTOR_METRICS_PORT", "99999")
    with pytest.raises(ConfigurationError) as expected:
        load_settings()
    code, lines, _ = run(capsys, "doctor", "--dir", str(healthy))
    assert 1 == code
    assert [f"FAIL  settings: {expected.value}"] == fails(lines)
    assert "OK    writers: 1 live (1111-aaaaaaaa)." in lines


# --- doctor ------------------------------------------------------------------------------


def test_doctor_healthy_directory(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, healthy: Path
) -> None:
    """A healthy directory: exit 0, no FAIL, secrets hidden, and nothing in it changes."""
    monkeypatch.setenv("VICTOR_METRICS_AUTH_TOKEN", "s3cret-token")
    before = listing(healthy)
    code, lines, err = run(capsys, "doctor", "--dir", str(healthy))
    assert (0, "") == (code, err)
    assert [] == fails(lines)
    for expected in (
        "OK    settings: loaded; effective values:",
        "        VICTOR_METRICS_AUTH_TOKEN=(set, hidden)",
        "        VICTOR_METRICS_ENABLED=true",
        f"OK    directory: {healthy} exists.",
        "OK    permissions: mode 0700.",
        f"OK    files: 2 file(s), {16384 + (healthy / f'{LIVE}.owner').stat().st_size} bytes; "
        "writer data files: counter 1; archive files: 0.",
        "OK    writers: 1 live (1111-aaaaaaaa).",
        "OK    orphans: no files of dead writers.",
        "OK    data files: all 1 parse.",
        "OK    manifest: archive generation 0, no interrupted compaction.",
        "OK    quarantine: empty.",
        "OK    temp files: none left over.",
    ):
        assert expected in lines
    assert "s3cret-token" not in "\n".join(lines)
    assert lines[-1].startswith("doctor: 0 FAIL, ")
    assert before == listing(healthy)


def test_doctor_corrupt_file(
    capsys: pytest.CaptureFixture[str], directory: Path, owners: list[int]
) -> None:
    """A data file with an impossible header is a FAIL naming the file, the reason and the fix."""
    (directory / f"counter_{LIVE}.db").write_bytes(struct.pack("<i", 4096) + b"\0" * 4)
    owners.append(live_owner(directory, LIVE))
    code, lines, _ = run(capsys, "doctor", "--dir", str(directory))
    assert 1 == code
    assert [
        f"FAIL  data files: 1 corrupt: counter_{LIVE}.db (header says 4096 bytes used, file has "
        f"8); scrapes skip them. Fix: run `victor-metrics compact --dir {directory}`: it moves "
        "those of dead writers to quarantine/; a live writer's file is set aside once that "
        "worker restarts."
    ] == fails(lines)


def test_doctor_orphaned_files_of_a_dead_writer(
    capsys: pytest.CaptureFixture[str], healthy: Path
) -> None:
    """Files of a dead writer not yet compacted are a FAIL that says to run compact."""
    add_orphan(healthy)
    code, lines, _ = run(capsys, "doctor", "--dir", str(healthy))
    assert 1 == code
    assert [
        f"FAIL  orphans: 1 dead writer(s) not compacted ({DEAD}), 2 file(s). Fix: run "
        f"`victor-metrics compact --dir {healthy}`. A Gunicorn master using "
        "victor_mp_metrics.gunicorn_hooks does this when a worker exits; orphans that stay "
        "mean no master compacts this directory."
    ] == fails(lines)


def test_doctor_world_writable_directory(
    capsys: pytest.CaptureFixture[str], healthy: Path
) -> None:
    """A directory other users can write is a FAIL that says `chmod 700`."""
    healthy.chmod(0o777)
    code, lines, _ = run(capsys, "doctor", "--dir", str(healthy))
    assert 1 == code
    assert [
        f"FAIL  permissions: {healthy} is writable by other users (mode 0777), so they could "
        "plant or delete metric files; the service refuses it. Fix: "
        f"`chmod 700 {healthy}` or use a private directory."
    ] == fails(lines)


def test_doctor_missing_directory_is_not_created(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A missing directory is a FAIL with the fix, and doctor does not create it."""
    missing = tmp_path / "nowhere"
    code, lines, _ = run(capsys, "doctor", "--dir", str(missing))
    assert 1 == code
    assert [
        f"FAIL  directory: {missing} does not exist. Fix: start the service (gunicorn.conf.py "
        f"creates it) or create it with `install -d -m 0700 {missing}`; make sure the "
        "service's PROMETHEUS_MULTIPROC_DIR names this same path."
    ] == fails(lines)
    assert not missing.exists()


def test_doctor_url_of_a_running_server(
    capsys: pytest.CaptureFixture[str], metrics_dir: Path, owners: list[int]
) -> None:
    """--url of a live /metrics server: the endpoint and victor_requests_total are OK."""
    requests_file(metrics_dir, LIVE, 3.0)
    owners.append(live_owner(metrics_dir, LIVE))
    server = start_metrics_server(0, "127.0.0.1")
    url = f"http://127.0.0.1:{server.port}/metrics"
    try:
        code, lines, _ = run(capsys, "doctor", "--dir", str(metrics_dir), "--url", url)
    finally:
        server.stop()
    assert 0 == code
    assert [] == fails(lines)
    endpoint = [line for line in lines if line.startswith("OK    endpoint: ")]
    assert 1 == len(endpoint)
    assert endpoint[0].startswith(f"OK    endpoint: {url} answered 200 with ")
    assert "OK    requests: victor_requests_total present (1 series)." in lines


def test_doctor_url_needing_a_token(
    capsys: pytest.CaptureFixture[str], metrics_dir: Path
) -> None:
    """A protected endpoint FAILs with a hint without --token and is OK with the right one."""
    _runtime.configure(_runtime.get_settings(), auth_token="t0ken")
    server = start_metrics_server(0, "127.0.0.1")
    url = f"http://127.0.0.1:{server.port}/metrics"
    try:
        without = run(capsys, "doctor", "--dir", str(metrics_dir), "--url", url)
        with_token = run(capsys, "doctor", "--dir", str(metrics_dir), "--url", url,
                         "--token", "t0ken")
    finally:
        server.stop()
    assert 1 == without[0]
    assert [
        f"FAIL  endpoint: {url} answered 401 Unauthorized. Fix: pass --token (the service's "
        "VICTOR_METRICS_AUTH_TOKEN)."
    ] == fails(without[1])
    assert (0, []) == (with_token[0], fails(with_token[1]))


def test_doctor_url_on_a_closed_port(capsys: pytest.CaptureFixture[str], healthy: Path) -> None:
    """--url where nothing listens is a FAIL asking whether the service runs on that port."""
    url = f"http://127.0.0.1:{free_port()}/metrics"
    code, lines, _ = run(capsys, "doctor", "--dir", str(healthy), "--url", url)
    assert 1 == code
    [line] = fails(lines)
    assert line.startswith(f"FAIL  endpoint: cannot reach {url}: ")
    assert line.endswith(
        ". Fix: is the service running? is the port right (VICTOR_METRICS_PORT, default 9090)? "
        f"Try `curl {url}`."
    )


def test_doctor_filesystem_check_finds_the_longest_mount() -> None:
    """The mount of a path is the longest (last, if repeated) mount point containing it."""
    mounts = (
        "/dev/vda / ext4 rw 0 0\n"
        "tmpfs /run tmpfs rw 0 0\n"
        "tmpfs /srv/my\\040metrics tmpfs rw 0 0\n"
        "/dev/vdb /run ext4 rw 0 0\n"
    )
    assert ("/srv/my metrics", "tmpfs") == _doctor.mount_of("/srv/my metrics/d", mounts)
    assert ("/", "ext4") == _doctor.mount_of("/srv/my", mounts)
    assert ("/run", "ext4") == _doctor.mount_of("/run/victor", mounts)
    assert _doctor.Check("OK", "filesystem", "tmpfs (mounted at /srv/my metrics).") == (
        _doctor.check_filesystem("/srv/my metrics/d", mounts)
    )
    assert [
        "WARN  filesystem: ext4 (mounted at /), not tmpfs: metric files are mmap-ed, so on disk "
        "the kernel writes values back to storage. Fix: mount a tmpfs there (`docker run "
        "--tmpfs /srv/d:uid=UID,mode=0700`) or use a directory under /dev/shm."
    ] == _doctor.check_filesystem("/srv/d", mounts).lines()


def test_doctor_interrupted_compaction_warns(
    capsys: pytest.CaptureFixture[str], healthy: Path
) -> None:
    """A manifest still listing absorbed writers is a WARN suggesting compact; exit stays 0."""
    (healthy / "manifest.json").write_text('{"generation": 0, "absorbed": ["9-ab"]}')
    code, lines, _ = run(capsys, "doctor", "--dir", str(healthy))
    assert 0 == code
    assert (
        "WARN  manifest: an interrupted compaction left 1 absorbed writer(s) still listed; "
        f"scrapes are still exact. Fix: run `victor-metrics compact --dir {healthy}` to finish it."
    ) in lines


def test_doctor_corrupt_manifest(capsys: pytest.CaptureFixture[str], healthy: Path) -> None:
    """An unreadable manifest is a FAIL that says how to write a valid one."""
    (healthy / "manifest.json").write_text("{not json")
    code, lines, _ = run(capsys, "doctor", "--dir", str(healthy))
    assert 1 == code
    [line] = fails(lines)
    assert line.startswith("FAIL  manifest: corrupt (")
    assert line.endswith(
        'Fix: stop the service and write {"generation": G, "absorbed": []} to '
        f"{healthy}/manifest.json, G being the archive generation in the file names "
        "(found: none)."
    )


def test_directory_defaults_to_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, healthy: Path
) -> None:
    """Without --dir, doctor and compact use PROMETHEUS_MULTIPROC_DIR."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(healthy))
    code, lines, _ = run(capsys, "doctor")
    assert 0 == code
    assert f"OK    directory: {healthy} exists." in lines
    code, lines, _ = run(capsys, "compact")
    assert (0, "compact: no dead writers; archive generation 0") == (
        code, lines[0].rsplit(" in ", 1)[0]
    )


# --- compact, dump, serve ------------------------------------------------------------------


def test_compact_absorbs_orphans_and_keeps_totals(
    capsys: pytest.CaptureFixture[str], healthy: Path
) -> None:
    """compact merges a dead writer's files into the archive; the totals do not move."""
    add_orphan(healthy)
    before = ours(healthy)
    code, lines, err = run(capsys, "compact", "--dir", str(healthy))
    assert (0, "") == (code, err)
    [line] = lines
    assert (f"compact: absorbed 1 dead writer(s) ({DEAD}), removed 2 file(s), wrote 1 file(s); "
            "archive generation 1") == line.rsplit(" in ", 1)[0]
    assert before == ours(healthy)
    assert 5.0 == before[("victor_requests_total", tuple(sorted(LABELS.items())))]
    assert ["counter_1111-aaaaaaaa.db", "counter_archive-1.db"] == data_files(healthy)
    assert not (healthy / f"{DEAD}.owner").exists()


def test_compact_missing_directory_fails(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """compact of a missing directory exits 1 and creates nothing."""
    missing = tmp_path / "nowhere"
    code, lines, err = run(capsys, "compact", "--dir", str(missing))
    assert (1, []) == (code, lines)
    assert f"victor-metrics compact: error: {missing} is not a directory\n" == err
    assert not missing.exists()


def _cache_counters(directory: Path, ident: str) -> None:
    write_data_file(directory, "counter", ident, [
        ("victor_requests", "victor_requests_total", LABELS, 2.0, 0.0),
        ("victor_cache_hits", "victor_cache_hits_total", {"cache_name": "c"}, 3.0, 0.0),
        ("victor_cache_misses", "victor_cache_misses_total", {"cache_name": "c"}, 1.0, 0.0),
    ])


@pytest.mark.parametrize("fmt", ("text", "openmetrics"))
def test_dump_prints_totals_and_writes_nothing(
    capsys: pytest.CaptureFixture[str], healthy: Path, fmt: str
) -> None:
    """dump prints the aggregated totals (derived hit rate too) and leaves the directory as is."""
    add_orphan(healthy, 0.0)
    _cache_counters(healthy, "77-cc")
    before = listing(healthy)
    code, lines, err = run(capsys, "dump", "--dir", str(healthy), "--format", fmt)
    assert (0, "") == (code, err)
    assert f"{SERIES} 5.0" in lines
    assert 'victor_cache_hit_rate{cache_name="c"} 0.75' in lines
    if fmt == "openmetrics":
        assert "# EOF" == lines[-1]
    else:
        assert "# EOF" not in lines
    assert before == listing(healthy)


def test_dump_leaves_corrupt_files_in_place(
    capsys: pytest.CaptureFixture[str], healthy: Path
) -> None:
    """dump skips a dead writer's corrupt file without moving it to quarantine/."""
    (healthy / "counter_99-dd.db").write_bytes(b"\x01\x02")
    before = listing(healthy)
    code, lines, _ = run(capsys, "dump", "--dir", str(healthy))
    assert 0 == code
    assert f"{SERIES} 3.0" in lines
    assert before == listing(healthy)


def test_serve_answers_and_stops_on_sigterm(directory: Path, owners: list[int]) -> None:
    """`serve` prints its URL, serves the directory's totals and exits 0 on SIGTERM."""
    requests_file(directory, LIVE, 3.0)
    owners.append(live_owner(directory, LIVE))
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VICTOR_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "victor_mp_metrics", "serve", "--port", str(port),
         "--addr", "127.0.0.1", "--dir", str(directory)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, proc.communicate(timeout=5)
            try:
                response = request(url, timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "serve did not answer in 20 s"
                time.sleep(0.1)
        assert 200 == response.status
        assert f"{SERIES} 3.0" in response.text.splitlines()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        assert (0, "") == (proc.returncode, err)
        assert [
            f"serving the metrics of {directory} on {url} (stop with Ctrl-C or SIGTERM)",
            "stopped",
        ] == out.splitlines()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
