"""Red Stuff encoding: a blob becomes n sliver pairs plus the metadata that commits to them.

The blob, zero-padded, is an R x C matrix of s-byte symbols, row-major, expanded to n x n
by codec.expansion straight into the sliver buffers. Every one of the n*n symbols is hashed
once, in the column batch that computes it, while it is still in cache; its leaf serves
both its row tree and its column tree.

Pure; thread-safe as long as callers do not share a Workspace between threads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from codec.config import Params
from codec.expansion import MatrixLayout, SliverLayout, batch_columns, expand_into
from codec.merkle import leaf_hash, root_of_leaves
from codec.metadata import BlobMetadata
from codec.sliver import PRIMARY, SECONDARY, Buffer, Sliver
from codec.workspace import U8Array, Workspace

__all__ = ["EncodedBlob", "SliverPair", "Workspace", "encode", "expand"]


@dataclass(frozen=True)
class SliverPair:
    """Pair p: primary sliver p and secondary sliver n-1-p, stored together on one node."""

    pair: int
    primary: Sliver
    secondary: Sliver


@dataclass(frozen=True)
class EncodedBlob:
    """The encoder's output. Sliver data are contiguous memoryviews into the encoder's own
    buffers (its Workspace, if one was given), never into the blob."""

    metadata: BlobMetadata
    pairs: tuple[SliverPair, ...]

    @property
    def blob_id(self) -> bytes:
        return self.metadata.blob_id


def _blob_array(blob: Buffer) -> U8Array:
    return np.frombuffer(blob, dtype=np.uint8)


def expand(params: Params, blob: Buffer, workspace: Workspace | None = None) -> U8Array:
    """The full n x n x s symbol matrix of `blob` (no hashing): parity computation only."""
    ws = Workspace() if workspace is None else workspace
    n = params.n
    s = params.symbol_size(len(blob))
    m = ws.get("matrix", n * n * s).reshape(n, n, s)
    expand_into(params, MatrixLayout(m, _blob_array(blob), params.R), ws, batch_columns(params, s))
    return m


def encode(params: Params, blob: Buffer, workspace: Workspace | None = None) -> EncodedBlob:
    """Encode `blob` into n sliver pairs and its metadata.

    With a `workspace`, the result's slivers are views into it (see Workspace).
    """
    ws = Workspace() if workspace is None else workspace
    n, r, c = params.n, params.R, params.C
    s = params.symbol_size(len(blob))
    batch = batch_columns(params, s)
    primary = ws.get("primary", n * n * s).reshape(n, n, s)
    secondary = ws.get("secondary", n * r * s).reshape(n, r, s)
    corner = None
    if batch < n:  # streaming through DRAM: keep the corner in a small reused scratch
        corner = ws.get("corner", (n - r) * min(batch, n - c) * s).reshape(n - r, -1, s)
    layout = SliverLayout(_blob_array(blob), primary, secondary, corner)
    leaves = [[b""] * n for _ in range(n)]

    def hash_symbols(i: int, j0: int, j1: int) -> None:
        for j in range(j0, j1):
            leaves[i][j] = leaf_hash(layout.symbol(i, j, j0).data)

    expand_into(params, layout, ws, batch, hash_symbols)
    prim_roots = tuple(root_of_leaves(row) for row in leaves)
    col_roots = [root_of_leaves([leaves[i][j] for i in range(n)]) for j in range(n)]
    meta = BlobMetadata(
        params, len(blob), prim_roots, tuple(col_roots[n - 1 - p] for p in range(n))
    )
    pairs = []
    for p in range(n):
        j = n - 1 - p
        pairs.append(
            SliverPair(
                p,
                Sliver(PRIMARY, p, layout.rows[p].reshape(-1).data, b"".join(leaves[p])),
                Sliver(
                    SECONDARY,
                    j,
                    secondary[j].reshape(-1).data,
                    b"".join(leaves[i][j] for i in range(n)),
                ),
            )
        )
    return EncodedBlob(meta, tuple(pairs))
