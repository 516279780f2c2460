"""The multiprocess directory's files: names, the binary format, owners and liveness.

Data files keep prometheus_client's names and format, so its own ``MultiProcessCollector``
reads our directory::

    {kind}_{ident}.db           kind: counter, histogram, summary, gauge_{mode}
    {kind}_archive-{gen}.db     merged values of compacted (dead) writers, generation gen

A data file starts with a 4-byte little-endian int, the bytes used, and 4 bytes of
padding. Entries follow, each: a 4-byte int ``n``, ``n`` bytes of UTF-8 JSON key
``[metric_name, sample_name, {labels}, help]`` padded with spaces to 8-byte alignment,
then two doubles: value and timestamp. Entries are only ever appended.

Next to them, files that stock readers ignore (they glob ``*.db``)::

    {ident}.owner       held with an exclusive flock by writer ``ident`` while it lives
    manifest.json       the archive generation and the idents it has absorbed
    compact.lock        serialises compactions
    *.tmp               files being written; renamed into place when complete
    quarantine/         corrupt files moved out of the way

A writer's ident is ``{pid}-{random hex}``: unique even when the kernel reuses a pid, and
free of underscores so stock readers parse it. A writer is alive exactly while its owner
file is locked: the kernel drops the lock when the process dies, however it dies. Files
written by stock prometheus_client (ident = bare pid, no owner file) are judged by the pid
and the process start time.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import re
import secrets
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil

INITIAL_SIZE = 1 << 14
ARCHIVE = "archive"
MANIFEST = "manifest.json"
COMPACT_LOCK = "compact.lock"
QUARANTINE = "quarantine"
OWNER_SUFFIX = ".owner"
TMP_SUFFIX = ".tmp"
OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC

_int = struct.Struct("<i")
_two_doubles = struct.Struct("<dd")
_FILE_RE = re.compile(
    r"^(?P<kind>counter|histogram|summary|gauge_(?P<mode>[a-z]+))"
    r"_(?P<ident>[0-9]+(?:-[0-9a-f]+)?|archive-(?P<gen>[0-9]+))\.db$"
)
_OUR_IDENT_RE = re.compile(r"^[0-9]+-[0-9a-f]+$")

GAUGE_MODES = frozenset(
    ("all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum",
     "mostrecent", "livemostrecent")
)


class CorruptFile(Exception):
    """A data file cannot be parsed."""


@dataclass(frozen=True, slots=True)
class DataFile:
    """What a data file's name says about it."""

    name: str
    kind: str  # counter, histogram, summary or gauge_{mode}
    typ: str  # counter, histogram, summary or gauge
    mode: str  # gauge mode, "" for other types
    ident: str  # writer ident, or "archive-{gen}"
    generation: int | None  # archive generation, None for writer files

    @property
    def is_archive(self) -> bool:
        return self.generation is not None

    @property
    def is_live_gauge(self) -> bool:
        return self.mode.startswith("live")


def parse_name(name: str) -> DataFile | None:
    """The parts of a data file name, or None for any other file."""
    match = _FILE_RE.match(name)
    if match is None:
        return None
    kind, mode, gen = match["kind"], match["mode"] or "", match["gen"]
    if mode and mode not in GAUGE_MODES:
        return None
    return DataFile(
        name=name,
        kind=kind,
        typ="gauge" if mode else kind,
        mode=mode,
        ident=match["ident"],
        generation=int(gen) if gen is not None else None,
    )


def archive_name(kind: str, generation: int) -> str:
    return f"{kind}_{ARCHIVE}-{generation}.db"


def new_ident() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def is_our_ident(ident: str) -> bool:
    return _OUR_IDENT_RE.match(ident) is not None


# --- the binary format -------------------------------------------------------------------


def encode_entry(key: str, value: float, timestamp: float) -> bytes:
    encoded = key.encode("utf-8")
    padded = encoded + b" " * (8 - (len(encoded) + 4) % 8)
    return _int.pack(len(encoded)) + padded + _two_doubles.pack(value, timestamp)


def iter_entries(data: bytes | mmap.mmap, used: int) -> Iterator[tuple[bytes, float, float, int]]:
    """Yield (key bytes, value, timestamp, value offset) for the first ``used`` bytes."""
    pos = 8
    unpack_int = _int.unpack_from
    unpack_doubles = _two_doubles.unpack_from
    while pos < used:
        (length,) = unpack_int(data, pos)
        end = pos + 4 + length + (8 - (length + 4) % 8)
        if length <= 0 or end + 16 > used:
            raise CorruptFile(f"entry at offset {pos} runs past the used size {used}")
        key = bytes(data[pos + 4 : pos + 4 + length])
        value, timestamp = unpack_doubles(data, end)
        yield key, value, timestamp, end
        pos = end + 16


def read_used(fd: int) -> bytes:
    """The used part of an open data file; raises CorruptFile when its header is impossible."""
    data = os.pread(fd, mmap.PAGESIZE, 0)
    if len(data) < 8:
        raise CorruptFile(f"{len(data)} bytes, shorter than the 8-byte header")
    (used,) = _int.unpack_from(data, 0)
    if used < 8 or used % 8:
        raise CorruptFile(f"header says {used} bytes used")
    if used > len(data):
        data += os.pread(fd, used - len(data), len(data))
        if len(data) < used:
            raise CorruptFile(f"header says {used} bytes used, file has {len(data)}")
    return data[:used]


def read_file(path: str) -> bytes:
    """The used part of the data file at ``path`` (never through a symlink)."""
    fd = os.open(path, os.O_RDONLY | OPEN_FLAGS)
    try:
        return read_used(fd)
    finally:
        os.close(fd)


def write_file_atomically(path: str, entries: list[tuple[str, float, float]]) -> None:
    """Write a complete data file at ``path`` (temp file, fsync, rename)."""
    body = b"".join(encode_entry(k, v, t) for k, v, t in entries)
    used = 8 + len(body)
    size = max(INITIAL_SIZE, 1 << (used - 1).bit_length())
    tmp = f"{path}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | OPEN_FLAGS, 0o600)
    try:
        os.write(fd, _int.pack(used) + b"\0" * 4 + body)
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- owners and liveness -------------------------------------------------------------------


def create_owner_file(directory: str, ident: str) -> int:
    """Create ``{ident}.owner`` already locked (temp file, flock, rename); return its fd."""
    path = os.path.join(directory, ident + OWNER_SUFFIX)
    tmp = path + TMP_SUFFIX
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | OPEN_FLAGS, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, json.dumps({"pid": os.getpid(), "started": time.time()}).encode())
        os.rename(tmp, path)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    return fd


def _unlocked(path: str) -> bool | None:
    """True if nobody holds a lock on ``path``, False if someone does, None if it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | OPEN_FLAGS)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def writer_alive(directory: str, ident: str, data_path: str | None = None) -> bool:
    """Whether the process that writes files under ``ident`` still runs.

    Our writers: their owner file is locked. Stock writers (ident is a bare pid): the pid
    exists and the process started before the data file was last modified, so a reused
    pid does not keep a dead writer's files alive.
    """
    if is_our_ident(ident):
        return _unlocked(os.path.join(directory, ident + OWNER_SUFFIX)) is False
    try:
        process = psutil.Process(int(ident))
        started = process.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False
    if data_path is None:
        return True
    try:
        modified = os.stat(data_path, follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return False
    return started <= modified + 1.0


def writer_ident(name: str) -> str | None:
    """The writer ident of a writer's data file or owner file; None for any other file."""
    info = parse_name(name)
    if info is not None:
        return None if info.is_archive else info.ident
    return name.removesuffix(OWNER_SUFFIX) if name.endswith(OWNER_SUFFIX) else None


def writer_liveness(
    directory: str, names: list[str], skip: frozenset[str] = frozenset()
) -> dict[str, bool]:
    """Every writer with a data or owner file among ``names`` (but ``skip``): alive or not."""
    data_paths: dict[str, str | None] = {}
    for name in names:
        ident = writer_ident(name)
        if ident is None or ident in skip:
            continue
        if name.endswith(".db") and data_paths.get(ident) is None:
            data_paths[ident] = os.path.join(directory, name)
        else:
            data_paths.setdefault(ident, None)
    return {i: writer_alive(directory, i, path) for i, path in data_paths.items()}


def stale_temp(path: str, min_age: float = 60.0) -> bool:
    """A temp file left by a dead writer: old enough and not locked."""
    try:
        age = time.time() - os.stat(path, follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return False
    return age >= min_age and _unlocked(path) is not False


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
