"""Finding the sliver files of a node directory and where their parts lie.

The format is defined (and documented as a table) in ``walrusfs/sliverfile.py``; this
module uses its key scheme and header size from there. What fault injection needs beyond
that is *where* the bytes that a reader verifies are, so damage lands where it counts:

* the verified header: magic, version, pair, blob id, metadata length, the metadata and
  both leaf sets (the reserved byte and the zero padding are checked by nobody, so a flip
  there is harmless and would prove nothing);
* the primary sliver, then the secondary sliver.

A file that is already damaged may not parse; its parts are then worked out from the
node's identity (n, f) and the file size, or, failing that, the whole file is "data".

Blocking; for scripts. Thread-safe (no state).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

from codec import BlobMetadata, CodecError, Params
from walrusfs.identity import IDENTITY_KEY
from walrusfs.sliverfile import MAGIC, PREFIX, header_size, parse_key

# The fixed part of the header, as in the table in walrusfs/sliverfile.py:
# magic, version, reserved, pair, blob id, metadata length.
_FIXED = struct.Struct("<4sBBH32sI")
_RESERVED = 5  # offset of the reserved byte, the only unverified byte of the fixed part


@dataclass(frozen=True)
class SliverFile:
    """A sliver file found in a node directory (by its name; contents not checked)."""

    path: str
    key: str
    blob_id: bytes
    pair: int
    size: int

    def describe(self) -> str:
        return f"{self.blob_id.hex()} p{self.pair}"


@dataclass(frozen=True)
class Layout:
    """Byte ranges [start, end) of a sliver file's parts."""

    header: tuple[tuple[int, int], ...]  # verified header bytes (possibly several ranges)
    primary: tuple[int, int]
    secondary: tuple[int, int]

    def region(self, name: str) -> tuple[tuple[int, int], ...]:
        if name == "header":
            return self.header
        return (self.primary,) if name == "primary" else (self.secondary,)


def scan(node: str) -> list[SliverFile]:
    """Every sliver file of the node directory, sorted by key (temp files ignored).

    Raises OSError if the node directory cannot be read.
    """
    found = []
    top = os.path.join(node, PREFIX)
    if not os.path.isdir(node):
        raise FileNotFoundError(2, "not a directory (or missing)", node)
    for dirpath, dirnames, filenames in os.walk(top, onerror=_raise):
        dirnames.sort()
        for name in filenames:
            path = os.path.join(dirpath, name)
            key = os.path.relpath(path, node).replace(os.sep, "/")
            parsed = parse_key(key)
            if parsed is None or not os.path.isfile(path) or os.path.islink(path):
                continue
            found.append(SliverFile(path, key, parsed[0], parsed[1], os.path.getsize(path)))
    found.sort(key=lambda s: s.key)
    return found


def _raise(exc: OSError) -> None:
    # A missing slivers/ directory just means no slivers; anything else is a real error.
    if not isinstance(exc, FileNotFoundError):
        raise exc


def read_identity(node: str) -> dict[str, object] | None:
    """The node's identity document (walrusfs-node.json), or None if absent or unreadable."""
    try:
        with open(os.path.join(node, IDENTITY_KEY), encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def layout(data: bytes, identity: dict[str, object] | None) -> Layout:
    """Where the parts of the sliver file `data` are; see the module docstring."""
    size = len(data)
    if size >= _FIXED.size:
        magic, _, _, _, _, meta_len = _FIXED.unpack_from(data)
        meta_end = _FIXED.size + meta_len
        if magic == MAGIC and meta_end <= size:
            try:
                meta = BlobMetadata.from_bytes(data[_FIXED.size : meta_end])
            except CodecError:
                meta = None
            if meta is not None:
                s, p, n = meta.symbol_size, meta.params, meta.n
                leaves_end = min(size, meta_end + 64 * n)
                h = header_size(n)
                # Clipped to the file: one damaged before may be shorter than its header says.
                return Layout(
                    header=((0, _RESERVED), (_RESERVED + 1, leaves_end)),
                    primary=(min(size, h), min(size, h + p.C * s)),
                    secondary=(min(size, h + p.C * s), min(size, h + (p.C + p.R) * s)),
                )
    return _layout_from_identity(size, identity)


def _layout_from_identity(size: int, identity: dict[str, object] | None) -> Layout:
    try:
        params = Params(int(str(identity["n"])), int(str(identity["f"])))  # type: ignore[index]
    except (TypeError, KeyError, ValueError, CodecError):
        params = None
    if params is not None:
        h = header_size(params.n)
        per = params.C + params.R
        if size > h and (size - h) % per == 0:
            s = (size - h) // per
            return Layout(((0, h),), (h, h + params.C * s), (h + params.C * s, size))
    # Unknown shape: the first half stands in for the primary, the rest for the secondary.
    half = size // 2
    return Layout(((0, min(size, 64)),), (0, half), (half, size))
