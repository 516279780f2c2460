"""The binary format of a data file, and the one parser of its entry keys.

A data file (prometheus_client's ``mmap_dict`` format, so stock readers read ours) starts
with a 4-byte little-endian int, the bytes used, and 4 bytes of padding. Entries follow,
each: a 4-byte int ``n``, ``n`` bytes of UTF-8 JSON key ``[metric_name, sample_name,
{label: value}, help]`` padded with spaces to 8-byte alignment, then two doubles: value
and timestamp. Entries are only ever appended; the header is updated after the entry.

Nothing here touches the file system: callers hand in bytes read by ``_fs``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass

HEADER = 8
INT = struct.Struct("<i")
TWO_DOUBLES = struct.Struct("<dd")


class CorruptFile(Exception):
    """A data file (or the manifest) cannot be parsed."""


Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Key:
    """A parsed entry key. ``labels`` are sorted; ``le`` is a histogram bucket's bound."""

    metric: str
    sample: str
    labels: Labels
    help: str
    le: float | None
    without_le: Labels


def parse_key(raw: bytes) -> Key:
    """The key of one entry; :class:`CorruptFile` unless it is ``[str, str, {str: str}, str]``."""
    try:
        decoded = json.loads(raw)
    except ValueError as err:  # UnicodeDecodeError is a ValueError
        raise CorruptFile(f"key {raw[:60]!r} is not JSON: {err}") from None
    if not (isinstance(decoded, list) and len(decoded) == 4):
        raise CorruptFile(f"key {raw[:60]!r} is not [metric, sample, labels, help]")
    metric, sample, labels, help_text = decoded
    if not (isinstance(metric, str) and isinstance(sample, str) and isinstance(help_text, str)
            and isinstance(labels, dict)
            and all(isinstance(v, str) for v in labels.values())):
        raise CorruptFile(f"key {raw[:60]!r} is not [str, str, {{str: str}}, str]")
    items = tuple(sorted(labels.items()))
    le: float | None = None
    without_le = items
    if "le" in labels:
        try:
            le = float(labels["le"])
        except ValueError:
            raise CorruptFile(f"key {raw[:60]!r} has a bucket bound that is not a number") from None
        without_le = tuple(item for item in items if item[0] != "le")
    return Key(metric, sample, items, help_text, le, without_le)


def encode_key(metric: str, sample: str, labels: dict[str, str], help_text: str) -> str:
    """The key text of an entry, as prometheus_client's ``mmap_key`` writes it."""
    return json.dumps([metric, sample, labels, help_text], sort_keys=True)


def encode_entry(key: str, value: float, timestamp: float) -> bytes:
    """One entry's bytes."""
    encoded = key.encode("utf-8")
    padded = encoded + b" " * (8 - (len(encoded) + 4) % 8)
    return INT.pack(len(encoded)) + padded + TWO_DOUBLES.pack(value, timestamp)


def encode_file(entries: list[tuple[str, float, float]]) -> tuple[bytes, int]:
    """A whole file's used bytes and its size in the file system (a power of two)."""
    body = b"".join(encode_entry(k, v, t) for k, v, t in entries)
    used = HEADER + len(body)
    return INT.pack(used) + b"\0" * 4 + body, max(INITIAL_SIZE, 1 << (used - 1).bit_length())


INITIAL_SIZE = 1 << 14


# An exemplar file has the same header and keys, but each key is followed by a fixed slot:
# a 4-byte length, up to EXEMPLAR_LABELS bytes of labels JSON, then value and timestamp.
EXEMPLAR_LABELS = 252
EXEMPLAR_SLOT = 4 + EXEMPLAR_LABELS + 16


def encode_exemplar_slot(labels_json: bytes, value: float, timestamp: float) -> bytes:
    """One exemplar slot; the labels must fit in :data:`EXEMPLAR_LABELS` bytes."""
    return (INT.pack(len(labels_json)) + labels_json.ljust(EXEMPLAR_LABELS, b" ")
            + TWO_DOUBLES.pack(value, timestamp))


def encode_exemplar_file(entries: list[tuple[bytes, bytes, float, float]]) -> tuple[bytes, int]:
    """A whole exemplar file of (key, labels JSON, value, timestamp) and its size."""
    body = b"".join(encode_entry(key.decode("utf-8"), 0.0, 0.0)[:-16]
                    + encode_exemplar_slot(labels, value, ts) for key, labels, value, ts in entries)
    used = HEADER + len(body)
    return INT.pack(used) + b"\0" * 4 + body, max(INITIAL_SIZE, 1 << (used - 1).bit_length())


def iter_exemplars(data: bytes, used: int) -> Iterator[tuple[bytes, bytes, float, float]]:
    """Yield (key bytes, labels JSON, value, timestamp) of an exemplar file."""
    pos = HEADER
    while pos < used:
        (length,) = INT.unpack_from(data, pos)
        slot = pos + 4 + length + (8 - (length + 4) % 8)
        if length <= 0 or slot + EXEMPLAR_SLOT > used:
            raise CorruptFile(f"exemplar entry at offset {pos} runs past the used size {used}")
        (size,) = INT.unpack_from(data, slot)
        if not 0 <= size <= EXEMPLAR_LABELS:
            raise CorruptFile(f"exemplar at offset {slot} has {size} bytes of labels")
        value, timestamp = TWO_DOUBLES.unpack_from(data, slot + 4 + EXEMPLAR_LABELS)
        yield (bytes(data[pos + 4 : pos + 4 + length]), bytes(data[slot + 4 : slot + 4 + size]),
               value, timestamp)
        pos = slot + EXEMPLAR_SLOT


def used_size(header: bytes) -> int:
    """The used size a file's first 8 bytes claim; :class:`CorruptFile` if impossible."""
    if len(header) < HEADER:
        raise CorruptFile(f"{len(header)} bytes, shorter than the 8-byte header")
    (used,) = INT.unpack_from(header, 0)
    if used < HEADER or used % 8:
        raise CorruptFile(f"header says {used} bytes used")
    return int(used)


def iter_entries(data: bytes, used: int) -> Iterator[tuple[bytes, float, float, int]]:
    """Yield (key bytes, value, timestamp, value offset) for the first ``used`` bytes."""
    pos = HEADER
    unpack_int = INT.unpack_from
    unpack_doubles = TWO_DOUBLES.unpack_from
    while pos < used:
        (length,) = unpack_int(data, pos)
        end = pos + 4 + length + (8 - (length + 4) % 8)
        if length <= 0 or end + 16 > used:
            raise CorruptFile(f"entry at offset {pos} runs past the used size {used}")
        key = bytes(data[pos + 4 : pos + 4 + length])
        value, timestamp = unpack_doubles(data, end)
        yield key, value, timestamp, end
        pos = end + 16
