"""A read-only look at a directory for ``victor-metrics doctor``: what is there, and what
is wrong with it. Nothing is created, moved or written; compactions are held off (a
shared ``compact.lock``, waited for at most two seconds) while the files are read."""

from __future__ import annotations

import fcntl
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ._format import CorruptFile, iter_entries, parse_key
from ._fs import OPEN_FLAGS, Unreadable, check_regular, flock_within, is_stale_temp, read_data
from ._liveness import writer_liveness
from ._manifest import Manifest, read_manifest
from ._names import COMPACT_LOCK, QUARANTINE, TMP_SUFFIX, parse_name, writer_ident


@dataclass
class Inspection:
    """What :func:`inspect` found."""

    regular_files: int = 0
    nbytes: int = 0
    kinds: dict[str, int] = field(default_factory=dict)  # writer data files per kind
    archive_files: int = 0
    generations: set[int] = field(default_factory=set)
    manifest: Manifest | None = None
    manifest_error: str = ""
    live: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    dead_files: int = 0
    data_files: int = 0
    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    quarantined: list[str] = field(default_factory=list)
    stale_temps: list[str] = field(default_factory=list)


def inspect(path: str) -> Inspection:
    """Look at every entry of ``path``; the caller has checked it is a usable directory."""
    with _compactions_held(path):
        names = sorted(os.listdir(path))
        found = Inspection()
        infos = [i for i in map(parse_name, names) if i is not None]
        for name in names:
            try:
                entry = os.lstat(os.path.join(path, name))
                check_regular(entry)
            except (OSError, Unreadable):
                continue
            found.regular_files += 1
            found.nbytes += entry.st_size
        found.kinds = dict(Counter(i.kind for i in infos if not i.is_archive))
        found.archive_files = sum(1 for i in infos if i.is_archive)
        found.generations = {i.generation for i in infos if i.generation is not None}
        try:
            found.manifest = read_manifest(path)
        except CorruptFile as err:
            found.manifest_error = str(err)
            return found
        alive = writer_liveness(path, names, skip=found.manifest.absorbed)
        found.live = sorted(i for i, a in alive.items() if a)
        found.dead = sorted(i for i, a in alive.items() if not a)
        found.dead_files = sum(1 for n in names if writer_ident(n) in set(found.dead))
        found.data_files = len(infos)
        for info in infos:
            reason = _problem(path, info.name)
            if reason is not None:
                found.corrupt.append((info.name, reason))
        try:
            found.quarantined = sorted(os.listdir(os.path.join(path, QUARANTINE)))
        except OSError:
            found.quarantined = []
        found.stale_temps = [n for n in names if n.endswith(TMP_SUFFIX)
                             and is_stale_temp(path, n)]
        return found


def _problem(path: str, name: str) -> str | None:
    """Why data file ``name`` cannot be read, or None when every entry parses."""
    try:
        data, _stat = read_data(path, name)
        for raw, *_rest in iter_entries(data, len(data)):
            parse_key(raw)
    except FileNotFoundError:
        return None  # compacted away meanwhile
    except Unreadable as err:
        return err.reason
    except CorruptFile as err:
        return str(err)
    return None


@contextmanager
def _compactions_held(directory: str, timeout: float = 2.0) -> Iterator[None]:
    try:
        fd = os.open(os.path.join(directory, COMPACT_LOCK),
                     os.O_RDONLY | os.O_NONBLOCK | OPEN_FLAGS)
    except OSError:
        fd = -1
    if fd >= 0:
        flock_within(fd, fcntl.LOCK_SH, timeout)  # a long compaction: inspect anyway
    try:
        yield
    finally:
        if fd >= 0:
            os.close(fd)
