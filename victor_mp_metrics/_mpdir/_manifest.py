"""The archive manifest: which archive generation is current and which writers it absorbed.

``manifest.json`` is the single commit point of a compaction (see ``_compaction``)::

    {"generation": 7, "absorbed": ["123-9f2c01aa", ...], "epoch": "5be0c1d2e3f4a5b6"}

``epoch`` is drawn at random when a directory gets its first manifest, so a directory
that was deleted and created again never passes for the old one in a reader's cache.
It is replaced atomically and durably (``_fs.write_file``): a reader sees either the
old or the new manifest, never a mix.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field

from ._format import CorruptFile
from ._fs import Unreadable, read_small, write_file
from ._names import MANIFEST


@dataclass(frozen=True)
class Manifest:
    """Current archive generation, and writer idents whose files it already includes."""

    generation: int = 0
    absorbed: frozenset[str] = field(default_factory=frozenset)
    epoch: str = ""


def read_manifest(directory: str) -> Manifest:
    """The manifest in ``directory``; an empty one (generation 0) if there is none.

    Raises :class:`CorruptFile` when it cannot be parsed or is not a regular file of ours.
    """
    try:
        raw = read_small(directory, MANIFEST)
    except Unreadable as err:
        raise CorruptFile(f"{os.path.join(directory, MANIFEST)}: {err.reason}") from None
    if raw is None:
        return Manifest()
    try:
        data = json.loads(raw)
        absorbed = data["absorbed"]
        if not isinstance(absorbed, list):
            raise TypeError("absorbed is not a list")
        return Manifest(int(data["generation"]), frozenset(map(str, absorbed)),
                        str(data.get("epoch", "")))
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptFile(f"{os.path.join(directory, MANIFEST)}: {err}") from err


def write_manifest(directory: str, manifest: Manifest) -> None:
    """Replace the manifest atomically and durably."""
    body = json.dumps({
        "generation": manifest.generation,
        "absorbed": sorted(manifest.absorbed),
        "epoch": manifest.epoch or secrets.token_hex(8),
    }).encode()
    write_file(os.path.join(directory, MANIFEST), body)
