"""Red Stuff encoding: a blob becomes n sliver pairs plus the metadata that commits to them.

The blob, zero-padded, is an R x C matrix of s-byte symbols, row-major. Rows 0..R-1 are
extended to n columns with the [n, C] code, then all n columns to n rows with the [n, R]
code (about 4n/3 one-dimensional encodings rather than 5n/3 the other way round). Every
one of the n*n symbols is hashed once; its leaf serves both its row tree and its column
tree.

Pure; thread-safe as long as callers do not share a Workspace between threads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from codec.codes import parity_program
from codec.config import Params
from codec.merkle import leaf_hash, root_of_leaves
from codec.metadata import BlobMetadata
from codec.sliver import PRIMARY, SECONDARY, Buffer, Sliver
from codec.xorsched import run

U8Array = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class SliverPair:
    """Pair p: primary sliver p and secondary sliver n-1-p, stored together on one node."""

    pair: int
    primary: Sliver
    secondary: Sliver


@dataclass(frozen=True)
class EncodedBlob:
    """The encoder's output; sliver data are views into buffers owned by this object."""

    metadata: BlobMetadata
    pairs: tuple[SliverPair, ...]

    @property
    def blob_id(self) -> bytes:
        return self.metadata.blob_id


class Workspace:
    """Reusable encoder buffers: fresh large allocations cost page faults worth a copy.

    An EncodedBlob made with a workspace holds views into it, so reuse the workspace only
    after the previous result is no longer needed. Not thread-safe: one per thread.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, U8Array] = {}

    def get(self, name: str, size: int) -> U8Array:
        """A uint8 buffer of `size` bytes, grown if needed; contents undefined."""
        buf = self._bufs.get(name)
        if buf is None or len(buf) < size:
            buf = np.empty(size, dtype=np.uint8)
            self._bufs[name] = buf
        return buf[:size]


def expand(params: Params, blob: Buffer, workspace: Workspace | None = None) -> U8Array:
    """The full n x n x s symbol matrix of `blob` (no hashing): parity computation only."""
    n, r, c = params.n, params.R, params.C
    s = params.symbol_size(len(blob))
    size = n * n * s
    buf = np.empty(size, dtype=np.uint8) if workspace is None else workspace.get("matrix", size)
    m = buf.reshape(n, n, s)
    src = np.frombuffer(blob, dtype=np.uint8)
    row_bytes = c * s
    for i in range(r):
        piece = src[i * row_bytes : (i + 1) * row_bytes]
        dst = m[i, :c].reshape(-1)
        dst[: len(piece)] = piece
        dst[len(piece) :] = 0
    m64 = buf.view(np.uint64).reshape(n, n, s // 8)
    run(parity_program(n, c), [m64[:r, j] for j in range(c)], [m64[:r, j] for j in range(c, n)])
    run(parity_program(n, r), [m64[i] for i in range(r)], [m64[i] for i in range(r, n)])
    return m


def leaf_table(matrix: U8Array) -> list[list[bytes]]:
    """Leaf hashes of every symbol of an n x n x s matrix."""
    n = matrix.shape[0]
    return [[leaf_hash(matrix[i, j].data) for j in range(n)] for i in range(n)]


def encode(params: Params, blob: Buffer, workspace: Workspace | None = None) -> EncodedBlob:
    """Encode `blob` into n sliver pairs and its metadata.

    With a `workspace`, the result's slivers are views into it (see Workspace).
    """
    n, r, c = params.n, params.R, params.C
    m = expand(params, blob, workspace)
    s = m.shape[2]
    leaves = leaf_table(m)
    row_leaves = [b"".join(row) for row in leaves]
    col_leaves = [b"".join(leaves[i][j] for i in range(n)) for j in range(n)]
    prim_roots = tuple(root_of_leaves(row) for row in leaves)
    col_roots = [root_of_leaves([leaves[i][j] for i in range(n)]) for j in range(n)]
    meta = BlobMetadata(
        params, len(blob), prim_roots, tuple(col_roots[n - 1 - p] for p in range(n))
    )
    size = n * r * s
    sec_buf = np.empty(size, dtype=np.uint8) if workspace is None else workspace.get("secondary", size)
    secondary = sec_buf.reshape(n, r, s)
    secondary[...] = m[:r].transpose(1, 0, 2)
    pairs = []
    for p in range(n):
        j = n - 1 - p
        pairs.append(
            SliverPair(
                p,
                Sliver(PRIMARY, p, m[p, :c].reshape(-1).data, row_leaves[p]),
                Sliver(SECONDARY, j, secondary[j].reshape(-1).data, col_leaves[j]),
            )
        )
    return EncodedBlob(meta, tuple(pairs))
