"""Building multiprocess directories by hand, and reading them with both aggregators."""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client.mmap_dict import mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

from victor_mp_metrics import _files
from victor_mp_metrics.aggregate import DirectoryCollector

Entry = tuple[str, str, dict[str, str], float, float]  # metric, sample, labels, value, ts


def write_data_file(directory: Path, kind: str, ident: str, entries: list[Entry]) -> Path:
    """Write one data file in prometheus_client's format."""
    path = directory / f"{kind}_{ident}.db"
    rows = [
        (mmap_key(metric, sample, list(labels), list(labels.values()), f"help {metric}"), v, t)
        for metric, sample, labels, v, t in entries
    ]
    _files.write_file_atomically(str(path), rows)
    return path


def live_owner(directory: Path, ident: str) -> int:
    """Create a locked owner file for ``ident``, as a live writer holds; returns the fd."""
    return _files.create_owner_file(str(directory), ident)


def samples(families) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Families as {(sample name, sorted labels): value}, for exact comparison."""
    out = {}
    for family in families:
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def ours(directory: Path) -> dict:
    return samples(DirectoryCollector(str(directory)).collect())


def stock(directory: Path) -> dict:
    return samples(MultiProcessCollector(None, str(directory)).collect())


def data_files(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".db"))
