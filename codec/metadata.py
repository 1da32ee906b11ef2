"""Blob metadata: the sliver roots and length that commit to a blob, and its blob id.

Serialized format, version 1 (little-endian), written down here once:

| offset | size | field                                                      |
|-------:|-----:|------------------------------------------------------------|
|      0 |    4 | magic b"WSBM"                                              |
|      4 |    1 | format version (1)                                         |
|      5 |    2 | n, nodes                                                   |
|      7 |    2 | f, faults tolerated                                        |
|      9 |    8 | unencoded blob length in bytes                             |
|     17 | 64*n | per pair p: primary root p (32) || secondary root p (32)   |

primary root p = Merkle root over the n symbols of row p of the expanded n x n matrix;
secondary root p = Merkle root over the n symbols of column n-1-p.
blob id = blake3(0x02 || version u8 || n u16 || f u16 || length u64 || R) where R is the
Merkle root over leaves (primary root p || secondary root p). The 0x02 prefix keeps blob
ids apart from Merkle leaves (0x00) and inner nodes (0x01).

Pure; immutable values; thread-safe.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cached_property

from blake3 import blake3

from codec.config import Params
from codec.errors import FormatError, ParameterError
from codec.merkle import DIGEST, leaf_hash, root_of_leaves

MAGIC = b"WSBM"
VERSION = 1
_HEAD = struct.Struct("<4sBHHQ")


@dataclass(frozen=True)
class BlobMetadata:
    """Everything needed to verify any sliver or symbol of one blob."""

    params: Params
    length: int
    primary_roots: tuple[bytes, ...]
    secondary_roots: tuple[bytes, ...]

    def __post_init__(self) -> None:
        n = self.params.n
        if len(self.primary_roots) != n or len(self.secondary_roots) != n:
            raise FormatError(f"metadata needs {n} primary and {n} secondary roots")
        if not 0 <= self.length < 2**64:
            raise FormatError(f"blob length {self.length} out of range")

    @property
    def n(self) -> int:
        return self.params.n

    @cached_property
    def symbol_size(self) -> int:
        """Bytes per symbol, derived from the length."""
        return self.params.symbol_size(self.length)

    @cached_property
    def blob_id(self) -> bytes:
        """The 32-byte blob id committing to parameters, length and every sliver root."""
        leaves = [
            leaf_hash(p + s) for p, s in zip(self.primary_roots, self.secondary_roots, strict=True)
        ]
        head = struct.pack("<BHHQ", VERSION, self.params.n, self.params.f, self.length)
        return blake3(b"\x02" + head + root_of_leaves(leaves)).digest()

    def root(self, axis: str, index: int) -> bytes:
        """The root of primary sliver `index` or secondary sliver `index`."""
        if not 0 <= index < self.n:
            raise ParameterError(f"sliver index {index} out of range for n={self.n}")
        if axis == "primary":
            return self.primary_roots[index]
        return self.secondary_roots[self.n - 1 - index]

    def node_of_pair(self, pair: int) -> int:
        """Which node stores pair `pair`: rotated by the blob id to spread systematic slivers."""
        return (pair + int.from_bytes(self.blob_id, "big")) % self.n

    def pair_of_node(self, node: int) -> int:
        """Which pair node `node` stores for this blob."""
        return (node - int.from_bytes(self.blob_id, "big")) % self.n

    def to_bytes(self) -> bytes:
        """Serialize (format version 1)."""
        head = _HEAD.pack(MAGIC, VERSION, self.params.n, self.params.f, self.length)
        roots = b"".join(
            p + s for p, s in zip(self.primary_roots, self.secondary_roots, strict=True)
        )
        return head + roots

    @staticmethod
    def length_of(data: bytes | memoryview) -> int:
        """The blob length in serialized metadata, without parsing the rest (summing
        millions of them); raises FormatError if the header is not blob metadata."""
        if len(data) < _HEAD.size:
            raise FormatError("blob metadata truncated")
        magic, version, _n, _f, length = _HEAD.unpack_from(data)
        if magic != MAGIC or version != VERSION:
            raise FormatError("not blob metadata of this version")
        return int(length)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> BlobMetadata:
        """Parse serialized metadata; raises FormatError on anything malformed."""
        data = bytes(data)
        if len(data) < _HEAD.size:
            raise FormatError("blob metadata truncated")
        magic, version, n, f, length = _HEAD.unpack_from(data)
        if magic != MAGIC:
            raise FormatError("not blob metadata (bad magic)")
        if version != VERSION:
            raise FormatError(
                f"unknown blob metadata version {version} (this build reads {VERSION})"
            )
        try:
            params = Params(n, f)
        except ParameterError as exc:
            raise FormatError(f"blob metadata has bad parameters: {exc}") from exc
        if len(data) != _HEAD.size + 2 * DIGEST * n:
            raise FormatError(f"blob metadata is {len(data)} bytes, expected {_HEAD.size + 64 * n}")
        body = data[_HEAD.size :]
        prim = tuple(body[64 * p : 64 * p + 32] for p in range(n))
        sec = tuple(body[64 * p + 32 : 64 * p + 64] for p in range(n))
        return cls(params, length, prim, sec)
