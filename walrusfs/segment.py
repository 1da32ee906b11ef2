"""The metadata journal's on-disk format: records, segments, and the log files they live in.

A record is one committed change; a segment is the records of one journal sync; a log file
is the segments a node received, appended one after another. Each node has one log file
per run of the journal, key `journal/e<epoch>/<seq of the log's first record, 16 digits>`,
and starts a new one at every checkpoint (so that older log files hold only history and
can be deleted) and after a failed append (which may have left a torn tail). A volume
written before log files existed has one segment per file: the same thing, read the same
way.

Segment, format version 1:

| offset | size | field                                                              |
|-------:|-----:|--------------------------------------------------------------------|
|      0 |    4 | magic b"WSJS"                                                      |
|      4 |    1 | format version (1)                                                 |
|      5 |    8 | epoch (u64 LE): one per mount session                              |
|     13 |    8 | seq of the first record (u64 LE); records are numbered from 1     |
|     21 |    4 | record count (u32 LE)                                              |
|     25 |   32 | hash of the previous segment of this epoch, or of the checkpoint   |
|     57 |    4 | body length L (u32 LE)                                             |
|     61 |    L | body: one JSON record per line, {"op": name, "args": {...}}        |
| 61 + L |   32 | blake3 of everything before it                                     |

A log file is a sequence of segments with nothing between them. Readers take every
segment whose hash checks and skip anything else (a torn tail, a repeat, garbage) by
looking for the next magic: a segment is only ever trusted whole and verified.

JSON cannot hold bytes or the block map's types, so values are tagged: {"$b": base64} for
bytes, {"$ref": [blob_id, meta, length]} or {"$ref": [blob_id, meta, length, start]} for
a BlockRef (the start only when it is not 0, so that records of unpacked blocks read as
they did before packs), {"$map": [[k, v], ...]} for a dict with integer keys. Nothing read from a node is ever unpickled or evaluated.

Pure (no I/O); thread-safe.
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass
from typing import Any

from blake3 import blake3

from walrusfs.metadata import BlockRef, Change

MAGIC = b"WSJS"
VERSION = 1
_HEAD = struct.Struct("<4sBQQI32sI")
PREFIX = "journal"


class JournalError(Exception):
    """A segment is damaged, out of order, or of an unknown version."""


def segment_key(epoch: int, first_seq: int) -> str:
    return f"{PREFIX}/e{epoch}/{first_seq:016d}"


def _encode(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$b": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, BlockRef):
        ref = [_encode(value.blob_id), _encode(value.meta), value.length]
        return {"$ref": [*ref, value.start] if value.start else ref}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v) for k, v in value.items()}
        return {"$map": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot journal a {type(value).__name__}")


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "$b" in value:
            return base64.b64decode(value["$b"], validate=True)
        if "$ref" in value:
            blob_id, meta, length, *start = value["$ref"]
            if len(start) > 1:
                raise ValueError("a block reference of more than four items")
            first = int(start[0]) if start else 0
            return BlockRef(_decode(blob_id), _decode(meta), int(length), first)
        if "$map" in value:
            return {_decode(k): _decode(v) for k, v in value["$map"]}
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def encode_change(change: Change) -> bytes:
    """One journal record: a line of JSON."""
    return json.dumps(
        {"op": change.op, "args": _encode(dict(change.args))}, separators=(",", ":")
    ).encode()


def decode_change(line: bytes) -> Change:
    """Parse one record; raises JournalError."""
    try:
        doc = json.loads(line)
        return Change(str(doc["op"]), _decode(doc["args"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise JournalError(f"damaged journal record: {exc}") from exc


@dataclass(frozen=True)
class Segment:
    epoch: int
    first_seq: int
    prev: bytes
    records: tuple[bytes, ...]

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.records) - 1

    def to_bytes(self) -> bytes:
        body = b"\n".join(self.records)
        head = _HEAD.pack(
            MAGIC, VERSION, self.epoch, self.first_seq, len(self.records), self.prev, len(body)
        )
        raw = head + body
        return raw + blake3(raw).digest()

    @classmethod
    def from_bytes(cls, raw: bytes, where: str = "") -> Segment:
        """Parse and check a segment; raises JournalError."""
        if len(raw) < _HEAD.size + 32:
            raise JournalError(f"{where}: journal segment truncated")
        if blake3(raw[:-32]).digest() != raw[-32:]:
            raise JournalError(f"{where}: journal segment checksum mismatch")
        magic, version, epoch, first, count, prev, length = _HEAD.unpack_from(raw)
        if magic != MAGIC:
            raise JournalError(f"{where}: not a journal segment")
        if version != VERSION:
            raise JournalError(f"{where}: journal segment version {version} unknown")
        body = raw[_HEAD.size : len(raw) - 32]
        if len(body) != length:
            raise JournalError(f"{where}: journal segment length mismatch")
        records = tuple(body.split(b"\n")) if count else ()
        if len(records) != count:
            raise JournalError(f"{where}: journal segment record count mismatch")
        return cls(epoch, first, prev, records)


def segment_hash(raw: bytes) -> bytes:
    return blake3(raw).digest()


def parse_log_key(key: str) -> tuple[int, int] | None:
    """(epoch, first seq) of a log file key, or None if `key` is not one."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != PREFIX or not parts[1].startswith("e"):
        return None
    epoch, first = parts[1][1:], parts[2]
    if not (epoch.isdigit() and first.isdigit() and len(first) == 16):
        return None
    return int(epoch), int(first)


def scan_log(data: bytes, where: str = "") -> list[bytes]:
    """Every intact segment of a log file, in file order (repeats included).

    Raises nothing: damage is skipped, the caller decides what enough copies are.
    """
    found: list[bytes] = []
    pos = data.find(MAGIC)
    while pos >= 0 and pos + _HEAD.size + 32 <= len(data):
        length = _HEAD.unpack_from(data, pos)[6]
        end = pos + _HEAD.size + length + 32
        try:
            Segment.from_bytes(data[pos:end], where)
        except JournalError:
            pos = data.find(MAGIC, pos + 1)  # torn or foreign: look for the next one
            continue
        found.append(data[pos:end])
        pos = data.find(MAGIC, end)
    return found
