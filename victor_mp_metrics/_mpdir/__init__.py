"""The multiprocess directory's on-disk protocol: the only code that touches its files.

Modules, from the bottom up: ``_format`` (the binary format and the one key parser),
``_names`` (what names mean), ``_fs`` (every system call: safe reads, atomic writes,
directory trust, quarantine), ``_liveness`` (owner files), ``_manifest`` (the commit
point), ``_merge`` (the one merge rule), then the three users of them: ``_writer`` (this
process's files and value class), ``_reader`` (the aggregator behind ``/metrics``) and
``_compaction`` (merging dead writers), plus ``_inspect`` for ``doctor``.

Storage reports, callers count: the reader returns a :class:`ReadReport`, compaction a
:class:`CompactionResult`, the store its write errors; nothing here knows of metrics.
"""

from __future__ import annotations

from ._compaction import (
    DEFAULT_MAX_SERIES,
    FAULT_POINTS,
    OVERFLOW,
    CompactionResult,
    compact,
    recover,
    wipe_dead,
)
from ._compaction import after_fork_in_child as _compaction_after_fork
from ._format import CorruptFile, encode_key
from ._fs import Unreadable, directory_problems, ensure_directory, write_file
from ._inspect import Inspection, inspect
from ._liveness import create_owner_file, writer_alive
from ._manifest import Manifest, read_manifest, write_manifest
from ._masters import MASTER_LOCK, MASTER_PREFIX, claim, live_masters, remove_dead_masters
from ._masters import held as master_running
from ._merge import PER_SECOND, on_grid
from ._names import COMPACT_LOCK, MANIFEST, QUARANTINE, TMP_SUFFIX, parse_name
from ._reader import DirectoryReader, ReadReport
from ._tombstones import add_tombstone
from ._writer import ProcessStore, bind_lock, make_value_class

__all__ = [
    "COMPACT_LOCK",
    "DEFAULT_MAX_SERIES",
    "FAULT_POINTS",
    "MANIFEST",
    "MASTER_LOCK",
    "MASTER_PREFIX",
    "OVERFLOW",
    "PER_SECOND",
    "QUARANTINE",
    "TMP_SUFFIX",
    "Unreadable",
    "CompactionResult",
    "CorruptFile",
    "DirectoryReader",
    "Inspection",
    "Manifest",
    "ProcessStore",
    "ReadReport",
    "add_tombstone",
    "after_fork_in_child",
    "bind_lock",
    "claim",
    "compact",
    "create_owner_file",
    "directory_problems",
    "encode_key",
    "ensure_directory",
    "inspect",
    "live_masters",
    "master_running",
    "make_value_class",
    "on_grid",
    "parse_name",
    "read_manifest",
    "recover",
    "remove_dead_masters",
    "wipe_dead",
    "write_file",
    "write_manifest",
    "writer_alive",
]


def after_fork_in_child() -> None:
    """Reset the protocol's process state in a forked child (the runtime calls this)."""
    _compaction_after_fork()
