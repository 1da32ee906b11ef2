"""The metadata journal's on-disk format: records, segments, and the log files they live in.

A record is one committed change; a segment is the records of one journal sync; a log file
is the segments a node received, appended one after another. Each node has one log file
per run of the journal, key `journal/e<epoch>/<seq of the log's first record, 16 digits>`,
and starts a new one at every checkpoint (so that older log files hold only history and
can be deleted) and after a failed append (which may have left a torn tail). A volume
written before log files existed has one segment per file: the same thing, read the same
way.

Segment, format version 2 (version 1, still read, joined its records with b"\n" instead of
prefixing each with its length):

| offset | size | field                                                              |
|-------:|-----:|--------------------------------------------------------------------|
|      0 |    4 | magic b"WSJS"                                                      |
|      4 |    1 | format version (2)                                                 |
|      5 |    8 | epoch (u64 LE): one per mount session                              |
|     13 |    8 | seq of the first record (u64 LE); records are numbered from 1     |
|     21 |    4 | record count (u32 LE)                                              |
|     25 |   32 | hash of the previous segment of this epoch, or of the checkpoint   |
|     57 |    4 | body length L (u32 LE)                                             |
|     61 |    L | body: the records (see below)                                      |
| 61 + L |   32 | blake3 of everything before it                                     |

The body is the records, each a u32 LE length and the record. A record is a JSON text
{"op": name, "args": {...}}, then, if it has attachments, b"\0" and their bytes one after
another (JSON text never holds a raw NUL).

A log file is a sequence of segments with nothing between them. Readers take every
segment whose hash checks and skip anything else (a torn tail, a repeat, garbage) by
looking for the next magic: a segment is only ever trusted whole and verified.

JSON cannot hold bytes or the block map's types, so values are tagged:
- {"$a": [start, length]} for bytes of ATTACH_MIN or more: an attachment's. Base64 would
  make a small file's bytes (at close) or a database page (at fsync) a third longer on
  every node, and the JSON encoder would scan them character by character;
- {"$b": base64} for shorter bytes;
- {"$ref": [blob_id, meta, length]} or {"$ref": [blob_id, meta, length, start]} for a
  BlockRef (the start only when it is not 0, so records of unpacked blocks read as
  they did before packs);
- {"$map": [[k, v], ...]} for a dict with integer keys.
Nothing read from a node is ever unpickled or evaluated.

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
VERSION = 2
ATTACH_MIN = 64
_LENGTH = struct.Struct("<I")
_HEAD = struct.Struct("<4sBQQI32sI")
PREFIX = "journal"


class JournalError(Exception):
    """A segment is damaged, out of order, or of an unknown version."""


def segment_key(epoch: int, first_seq: int) -> str:
    return f"{PREFIX}/e{epoch}/{first_seq:016d}"


class _Attachments:
    """The raw bytes of one record, after its JSON text."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes | bytearray | memoryview) -> list[int]:
        where = [self.size, len(data)]
        self.parts.append(bytes(data))
        self.size += len(data)
        return where


def _encode(value: Any, attach: _Attachments) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        if len(value) >= ATTACH_MIN:
            return {"$a": attach.add(value)}
        return {"$b": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, BlockRef):
        ref = [_encode(value.blob_id, attach), _encode(value.meta, attach), value.length]
        return {"$ref": [*ref, value.start] if value.start else ref}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v, attach) for k, v in value.items()}
        return {"$map": [[_encode(k, attach), _encode(v, attach)] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return [_encode(v, attach) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot journal a {type(value).__name__}")


def _decode(value: Any, attached: bytes) -> Any:
    if isinstance(value, dict):
        if "$a" in value:
            start, length = value["$a"]
            if not (isinstance(start, int) and isinstance(length, int)):
                raise ValueError("an attachment's place is not two integers")
            if start < 0 or length < 0 or start + length > len(attached):
                raise ValueError("an attachment past the record's end")
            return attached[start : start + length]
        if "$b" in value:
            return base64.b64decode(value["$b"], validate=True)
        if "$ref" in value:
            blob_id, meta, length, *start = value["$ref"]
            if len(start) > 1:
                raise ValueError("a block reference of more than four items")
            first = int(start[0]) if start else 0
            return BlockRef(_decode(blob_id, attached), _decode(meta, attached), int(length), first)
        if "$map" in value:
            return {_decode(k, attached): _decode(v, attached) for k, v in value["$map"]}
        return {k: _decode(v, attached) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, attached) for v in value]
    return value


def encode_change(change: Change) -> bytes:
    """One journal record: JSON text, then its attachments if it has any."""
    attach = _Attachments()
    args = _encode(dict(change.args), attach)
    text = json.dumps({"op": change.op, "args": args}, separators=(",", ":")).encode()
    return b"".join([text, b"\0", *attach.parts]) if attach.parts else text


def decode_change(record: bytes) -> Change:
    """Parse one record; raises JournalError."""
    text, _, attached = record.partition(b"\0")
    try:
        doc = json.loads(text)
        return Change(str(doc["op"]), _decode(doc["args"], attached))
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
        body = b"".join(piece for r in self.records for piece in (_LENGTH.pack(len(r)), r))
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
        if version not in (1, VERSION):
            raise JournalError(f"{where}: journal segment version {version} unknown")
        body = raw[_HEAD.size : len(raw) - 32]
        if len(body) != length:
            raise JournalError(f"{where}: journal segment length mismatch")
        records = _split(body, version) if count else ()
        if records is None or len(records) != count:
            raise JournalError(f"{where}: journal segment record count mismatch")
        return cls(epoch, first, prev, records)


def _split(body: bytes, version: int) -> tuple[bytes, ...] | None:
    """The records of a segment body; None if they do not fill it exactly."""
    if version == 1:
        return tuple(body.split(b"\n"))
    records = []
    pos = 0
    while pos < len(body):
        if pos + _LENGTH.size > len(body):
            return None
        (n,) = _LENGTH.unpack_from(body, pos)
        pos += _LENGTH.size + n
        if pos > len(body):
            return None
        records.append(body[pos - n : pos])
    return tuple(records)


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
