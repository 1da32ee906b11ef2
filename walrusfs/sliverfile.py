"""The sliver file: one node's sliver pair of one blob, self-describing and verifiable.

Key: `slivers/<id[0:2]>/<id[2:4]>/<blob id hex>.p<pair>`. Format version 1, little-endian:

| offset   | size     | field                                                       |
|---------:|---------:|-------------------------------------------------------------|
|        0 |        4 | magic b"WSLV"                                               |
|        4 |        1 | format version (1)                                          |
|        5 |        1 | reserved, 0                                                 |
|        6 |        2 | pair index p                                                |
|        8 |       32 | blob id                                                     |
|       40 |        4 | length L of the blob metadata                               |
|       44 |        L | blob metadata (codec.metadata format)                       |
|   44 + L |     32*n | leaf hashes of primary sliver p (its full row)              |
|          |     32*n | leaf hashes of secondary sliver n-1-p (its full column)     |
|          |      pad | zeros up to a multiple of 64 bytes (uint64-aligned symbols) |
|        H |      C*s | primary sliver p                                            |
|    H+C*s |      R*s | secondary sliver n-1-p                                      |

The header size H depends only on n, so a reader can fetch the header and any symbol with
range reads. Nothing here is trusted until checked: the metadata must hash to the blob id
the caller expects, the leaves to their roots, each symbol to its leaf.

Pure; thread-safe.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from codec import (
    PRIMARY,
    SECONDARY,
    BlobMetadata,
    CodecError,
    Sliver,
    VerificationError,
    verify_leaves,
)
from codec.encoder import SliverPair

MAGIC = b"WSLV"
VERSION = 1
_FIXED = struct.Struct("<4sBBH32sI")
_META_FIXED = 17  # codec metadata bytes besides the roots
PREFIX = "slivers"


class SliverFileError(Exception):
    """A sliver file is damaged, of another blob or pair, or of an unknown version."""


def sliver_key(blob_id: bytes, pair: int) -> str:
    """The node-store key of pair `pair` of blob `blob_id`."""
    h = blob_id.hex()
    return f"{PREFIX}/{h[:2]}/{h[2:4]}/{h}.p{pair}"


def parse_key(key: str) -> tuple[bytes, int] | None:
    """(blob id, pair) of a sliver key, or None for any other key."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != PREFIX:
        return None
    name, _, pair = parts[3].partition(".p")
    try:
        blob_id = bytes.fromhex(name)
        return (blob_id, int(pair)) if len(blob_id) == 32 and pair.isdigit() else None
    except ValueError:
        return None


def header_size(n: int) -> int:
    """H: bytes before the primary sliver, for a volume of n nodes."""
    raw = _FIXED.size + _META_FIXED + 64 * n + 64 * n
    return -(-raw // 64) * 64


def file_size(meta: BlobMetadata) -> int:
    """Bytes of a sliver file of this blob."""
    p = meta.params
    return header_size(meta.n) + (p.C + p.R) * meta.symbol_size


def build(meta: BlobMetadata, pair: SliverPair) -> list[bytes | memoryview]:
    """The pieces of a sliver file, in order (join or writev them)."""
    meta_bytes = meta.to_bytes()
    head = _FIXED.pack(MAGIC, VERSION, 0, pair.pair, meta.blob_id, len(meta_bytes))
    head += meta_bytes + pair.primary.leaves + pair.secondary.leaves
    head += bytes(header_size(meta.n) - len(head))
    return [head, memoryview(pair.primary.data), memoryview(pair.secondary.data)]


@dataclass(frozen=True)
class Header:
    """A parsed, verified sliver file header."""

    meta: BlobMetadata
    pair: int
    primary_leaves: bytes
    secondary_leaves: bytes

    @property
    def primary_index(self) -> int:
        return self.pair

    @property
    def secondary_index(self) -> int:
        return self.meta.n - 1 - self.pair

    @property
    def primary_offset(self) -> int:
        return header_size(self.meta.n)

    @property
    def secondary_offset(self) -> int:
        return self.primary_offset + self.meta.params.C * self.meta.symbol_size

    @property
    def file_size(self) -> int:
        return file_size(self.meta)


def parse_header(raw: bytes, blob_id: bytes, pair: int, where: str = "") -> Header:
    """Parse and verify a header against the expected blob id and pair.

    The metadata must hash to `blob_id` and both leaf sets must match their roots, so a
    header that passes can be trusted to check symbols. Raises SliverFileError.
    """
    if len(raw) < _FIXED.size:
        raise SliverFileError(f"{where}: sliver file truncated in its header")
    magic, version, _, got_pair, got_id, meta_len = _FIXED.unpack_from(raw)
    if magic != MAGIC:
        raise SliverFileError(f"{where}: not a sliver file")
    if version != VERSION:
        raise SliverFileError(f"{where}: sliver file version {version} unknown (reads {VERSION})")
    if got_id != blob_id or got_pair != pair:
        raise SliverFileError(
            f"{where}: holds pair {got_pair} of blob {got_id.hex()[:16]}, not the one asked for"
        )
    end = _FIXED.size + meta_len
    if len(raw) < end:
        raise SliverFileError(f"{where}: sliver file truncated in its metadata")
    try:
        meta = BlobMetadata.from_bytes(raw[_FIXED.size : end])
    except CodecError as exc:
        raise SliverFileError(f"{where}: damaged blob metadata ({exc})") from exc
    if meta.blob_id != blob_id:
        raise SliverFileError(f"{where}: blob metadata does not hash to the blob id")
    n = meta.n
    if len(raw) < end + 64 * n or not 0 <= pair < n:
        raise SliverFileError(f"{where}: sliver file truncated in its leaf hashes")
    head = Header(meta, pair, raw[end : end + 32 * n], raw[end + 32 * n : end + 64 * n])
    try:
        verify_leaves(meta, PRIMARY, head.primary_index, head.primary_leaves)
        verify_leaves(meta, SECONDARY, head.secondary_index, head.secondary_leaves)
    except VerificationError as exc:
        raise SliverFileError(f"{where}: {exc}") from exc
    return head


def slivers(head: Header, raw: bytes) -> tuple[Sliver, Sliver]:
    """Both slivers of a whole sliver file (not yet verified symbol by symbol)."""
    mv = memoryview(raw)
    prim = Sliver(
        PRIMARY,
        head.primary_index,
        mv[head.primary_offset : head.secondary_offset],
        head.primary_leaves,
    )
    sec = Sliver(
        SECONDARY,
        head.secondary_index,
        mv[head.secondary_offset : head.file_size],
        head.secondary_leaves,
    )
    return prim, sec
