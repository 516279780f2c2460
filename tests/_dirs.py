"""Building multiprocess directories by hand, and reading them with both aggregators."""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client.mmap_dict import mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

from victor_mp_metrics import _mpdir
from victor_mp_metrics._mpdir import DirectoryReader

Entry = tuple[str, str, dict[str, str], float, float]  # metric, sample, labels, value, ts


def write_entries(path: str, rows: list[tuple[str, float, float]]) -> None:
    """Write a complete data file of (key, value, timestamp) rows at ``path``, atomically."""
    body, size = _mpdir._format.encode_file(rows)
    _mpdir.write_file(path, body, size)


def read_data_file(path: str) -> bytes:
    """The used bytes of the data file at ``path`` (as readers see them)."""
    data, _stat = _mpdir._fs.read_data(os.path.dirname(path), os.path.basename(path))
    return data


def write_data_file(directory: Path, kind: str, ident: str, entries: list[Entry]) -> Path:
    """Write one data file in prometheus_client's format."""
    path = directory / f"{kind}_{ident}.db"
    rows = [
        (mmap_key(metric, sample, list(labels), list(labels.values()), f"help {metric}"), v, t)
        for metric, sample, labels, v, t in entries
    ]
    write_entries(str(path), rows)
    return path


def live_owner(directory: Path, ident: str) -> int:
    """Create a locked owner file for ``ident``, as a live writer holds; returns the fd."""
    return _mpdir.create_owner_file(str(directory), ident)


def samples(families) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Families as {(sample name, sorted labels): value}, for exact comparison."""
    out = {}
    for family in families:
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def ours(directory: Path) -> dict:
    return samples(DirectoryReader(str(directory)).collect())


def stock(directory: Path) -> dict:
    return samples(MultiProcessCollector(None, str(directory)).collect())


def data_files(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".db"))
