"""What the names in the directory mean.

Data files keep prometheus_client's names, so its ``MultiProcessCollector`` reads ours::

    {kind}_{ident}.db           kind: counter, histogram, summary, gauge_{mode}
    {kind}_archive-{gen}.db     merged values of compacted (dead) writers, generation gen

Next to them, files that stock readers ignore (they glob ``*.db``)::

    {ident}.owner       held with an exclusive flock by writer ``ident`` while it lives
    {ident}.exemplars   the latest exemplar of each of its values that ever had one
    manifest.json       the archive generation and the idents it has absorbed
    compact.lock        serialises compactions (readers take it shared when starved)
    *.tmp               files being written; renamed into place when complete
    quarantine/         unreadable files moved out of the way

A writer's ident is ``{pid}-{random hex}``: unique even when the kernel reuses a pid, and
free of underscores so stock readers parse it. Stock prometheus_client names files after
a bare pid.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass

ARCHIVE = "archive"
MANIFEST = "manifest.json"
COMPACT_LOCK = "compact.lock"
QUARANTINE = "quarantine"
OWNER_SUFFIX = ".owner"
EXEMPLARS_SUFFIX = ".exemplars"
TMP_SUFFIX = ".tmp"

GAUGE_MODES = frozenset(
    ("all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum",
     "mostrecent", "livemostrecent", "info", "stateset")
)  # info and stateset: prometheus_client's Info and Enum, the most recent value wins
_FILE_RE = re.compile(
    r"^(?P<kind>counter|histogram|summary|gauge_(?P<mode>[a-z]+))"
    r"_(?P<ident>[0-9]+(?:-[0-9a-f]+)?|archive-(?P<gen>[0-9]+))\.db$"
)
_OUR_IDENT_RE = re.compile(r"^[0-9]+-[0-9a-f]+$")
_ARCHIVE_EXEMPLARS_RE = re.compile(r"^archive-([0-9]+)\.exemplars$")


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


def data_name(kind: str, ident: str) -> str:
    return f"{kind}_{ident}.db"


def archive_name(kind: str, generation: int) -> str:
    return f"{kind}_{ARCHIVE}-{generation}.db"


def archive_exemplars_name(generation: int) -> str:
    """The exemplars kept from compacted writers, of archive ``generation``."""
    return f"{ARCHIVE}-{generation}{EXEMPLARS_SUFFIX}"


def archive_exemplars_generation(name: str) -> int | None:
    """The generation of an archive exemplar file's name; None for any other name."""
    match = _ARCHIVE_EXEMPLARS_RE.match(name)
    return int(match[1]) if match else None


def new_ident() -> str:
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def is_our_ident(ident: str) -> bool:
    return _OUR_IDENT_RE.match(ident) is not None


def writer_ident(name: str) -> str | None:
    """The writer ident of a writer's data file or owner file; None for any other file."""
    info = parse_name(name)
    if info is not None:
        return None if info.is_archive else info.ident
    for suffix in (OWNER_SUFFIX, EXEMPLARS_SUFFIX):
        if name.endswith(suffix):
            ident = name.removesuffix(suffix)
            return ident if is_our_ident(ident) else None
    return None


def is_compactor_temp(name: str) -> bool:
    """A temp file only a compaction writes (removed by recovery whatever its age)."""
    return name.endswith(TMP_SUFFIX) and (
        name.startswith(MANIFEST) or f"_{ARCHIVE}-" in name
    )
