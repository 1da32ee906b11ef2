"""Slivers and their verification against blob metadata.

A primary sliver i is row i of the expanded matrix cut to its first C symbols; a
secondary sliver j is column j cut to its first R symbols. Each travels with the n leaf
hashes of its full expansion (its whole row or column), so a whole sliver or any single
stored symbol can be checked: the leaves against the root in the metadata, a symbol against
its leaf. A symbol M[i][j] has the same leaf in row i's tree and column j's tree.

Pure; thread-safe.
"""

from __future__ import annotations

from dataclasses import dataclass

from codec.errors import ParameterError, VerificationError
from codec.merkle import DIGEST, leaf_hash, root_of_leaves
from codec.metadata import BlobMetadata

PRIMARY = "primary"
SECONDARY = "secondary"
AXES = (PRIMARY, SECONDARY)

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Sliver:
    """One sliver: `axis` (primary/secondary), its index, its symbols and its n leaf hashes."""

    axis: str
    index: int
    data: Buffer
    leaves: bytes

    def symbol(self, position: int, symbol_size: int) -> memoryview:
        """The stored symbol at `position` of this sliver (a view, no copy)."""
        return memoryview(self.data)[position * symbol_size : (position + 1) * symbol_size]


def symbols_per_sliver(meta: BlobMetadata, axis: str) -> int:
    """C for a primary sliver, R for a secondary one."""
    if axis not in AXES:
        raise ParameterError(f"unknown sliver axis {axis!r}")
    return meta.params.C if axis == PRIMARY else meta.params.R


def sliver_size(meta: BlobMetadata, axis: str) -> int:
    """Bytes of a sliver on `axis` for this blob."""
    return symbols_per_sliver(meta, axis) * meta.symbol_size


def verify_leaves(meta: BlobMetadata, axis: str, index: int, leaves: bytes) -> None:
    """Check a sliver's leaf hashes against its root; raises VerificationError."""
    if len(leaves) != DIGEST * meta.n:
        raise VerificationError(
            f"{axis} sliver {index}: {len(leaves)} bytes of leaf hashes", (axis, index)
        )
    packed = memoryview(leaves)
    if root_of_leaves(
        [bytes(packed[i : i + DIGEST]) for i in range(0, len(leaves), DIGEST)]
    ) != meta.root(axis, index):
        raise VerificationError(
            f"{axis} sliver {index}: leaf hashes do not match its root", (axis, index)
        )


def verify_symbol(
    meta: BlobMetadata, axis: str, index: int, leaves: bytes, position: int, data: Buffer
) -> None:
    """Check one symbol against its (already verified) leaf; raises VerificationError."""
    s = meta.symbol_size
    if len(data) != s:
        raise VerificationError(
            f"{axis} sliver {index} symbol {position}: {len(data)} bytes, not {s}", (axis, index)
        )
    if leaf_hash(data) != leaves[DIGEST * position : DIGEST * (position + 1)]:
        raise VerificationError(
            f"{axis} sliver {index} symbol {position}: bytes do not match", (axis, index)
        )


def verify_sliver(meta: BlobMetadata, sliver: Sliver) -> None:
    """Check a whole sliver: size, leaves against the root, every stored symbol.

    Raises VerificationError naming the sliver.
    """
    axis, index = sliver.axis, sliver.index
    if not 0 <= index < meta.n:
        raise VerificationError(f"{axis} sliver index {index} out of range", (axis, index))
    expected = sliver_size(meta, axis)
    if len(sliver.data) != expected:
        raise VerificationError(
            f"{axis} sliver {index}: {len(sliver.data)} bytes, expected {expected}", (axis, index)
        )
    verify_leaves(meta, axis, index, sliver.leaves)
    s = meta.symbol_size
    for position in range(symbols_per_sliver(meta, axis)):
        verify_symbol(meta, axis, index, sliver.leaves, position, sliver.symbol(position, s))
