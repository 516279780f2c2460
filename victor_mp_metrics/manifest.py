"""The archive manifest: which archive generation is current and which writers it absorbed.

``manifest.json`` is the single commit point of a compaction (see ``compaction``)::

    {"generation": 7, "absorbed": ["123-9f2c01aa", ...], "epoch": "5be0c1d2e3f4a5b6"}

``epoch`` is drawn at random when a directory gets its first manifest, so a directory
that was deleted and created again never passes for the old one in a reader's cache.

It is replaced atomically (temp file, fsync, rename, fsync of the directory), so a reader
sees either the old or the new manifest, never a mix.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field

from . import _files


@dataclass(frozen=True)
class Manifest:
    """Current archive generation, and writer idents whose files it already includes."""

    generation: int = 0
    absorbed: frozenset[str] = field(default_factory=frozenset)
    epoch: str = ""


def read_manifest(directory: str) -> Manifest:
    """The manifest in ``directory``; an empty one (generation 0) if there is none."""
    path = os.path.join(directory, _files.MANIFEST)
    try:
        fd = os.open(path, os.O_RDONLY | _files.OPEN_FLAGS)
    except FileNotFoundError:
        return Manifest()
    with os.fdopen(fd, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw)
        return Manifest(
            int(data["generation"]),
            frozenset(map(str, data["absorbed"])),
            str(data.get("epoch", "")),
        )
    except (ValueError, KeyError, TypeError) as err:
        raise _files.CorruptFile(f"{path}: {err}") from err


def write_manifest(directory: str, manifest: Manifest) -> None:
    """Replace the manifest atomically and durably."""
    path = os.path.join(directory, _files.MANIFEST)
    tmp = f"{path}.{secrets.token_hex(4)}{_files.TMP_SUFFIX}"
    body = json.dumps({
        "generation": manifest.generation,
        "absorbed": sorted(manifest.absorbed),
        "epoch": manifest.epoch or secrets.token_hex(8),
    }).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _files.OPEN_FLAGS, 0o600)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _files.fsync_dir(directory)
