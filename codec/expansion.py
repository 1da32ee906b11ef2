"""The two-dimensional expansion of a blob, ordered so that every symbol is used while hot.

The padded blob is an R x C matrix of s-byte symbols; expansion extends it to n x n (rows
with the [n, C] code, columns with the [n, R] code). At 16 MiB the n x n matrix is ~52 MiB,
more than the L3 cache, so the order of work decides the speed: a pass that reads cold
symbols from DRAM runs at a third of the in-cache rate, for XORs and blake3 alike. So the
matrix is built in batches of columns small enough to stay in cache:

1. for each batch of systematic columns j < C: copy the blob's symbols in, run the column
   code, hand the finished batch to `done` (the encoder hashes it there, while hot);
2. the row code over the R blob rows gives the parity columns' first R symbols;
3. for each batch of parity columns j >= C: the column code, then `done`.

This costs the same XORs as rows-then-columns (the cheaper order, ~4n/3 1D encodings).
Where the symbols live is a Layout: one n x n matrix (`expand`), or the sliver buffers
the encoder returns, so no symbol is copied after it is computed.

Pure numpy; thread-safe as long as callers do not share a layout or workspace.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from codec.codes import parity_program
from codec.config import Params
from codec.workspace import U8Array, U64Array, Workspace
from codec.xorsched import Program, run, scratch_words, step_words

# Bytes of the matrix's columns one batch may span (see xorsched.WORKING_SET).
BATCH_BYTES = 8 << 20


class Layout(Protocol):
    """Where the symbols of the n x n matrix live. Views are uint64, one symbol per row."""

    def along_row(self, i: int, j0: int, j1: int) -> U64Array:
        """Symbols (i, j0..j1-1)."""
        ...

    def along_column(self, j: int, i0: int, i1: int) -> U64Array:
        """Symbols (i0..i1-1, j); rows i0..i1-1 must lie in one of `row_groups`."""
        ...

    def row_groups(self) -> list[tuple[int, int]]:
        """Ranges of blob rows that `along_column` can view together."""
        ...

    def fill(self, j0: int, j1: int) -> None:
        """Put the blob's symbols (0..R-1, j0..j1-1) where the column code reads them."""
        ...


def _rows(blob: U8Array, r: int, c: int, s: int) -> tuple[U8Array, int]:
    """The blob's complete rows as an (rows, c, s) view, and how many there are."""
    full = min(r, len(blob) // (c * s))
    return blob[: full * c * s].reshape(full, c, s), full


def _padded_row(blob: U8Array, i: int, out: U8Array) -> None:
    """out = row i of the blob, zero-padded past the blob's end."""
    piece = blob[i * len(out) : (i + 1) * len(out)]
    out[: len(piece)] = piece
    out[len(piece) :] = 0


class MatrixLayout:
    """The whole n x n x s matrix in one array."""

    def __init__(self, matrix: U8Array, blob: U8Array, r: int) -> None:
        self.matrix = matrix
        n, _, s = matrix.shape
        self._r = r
        self._c = n - (n - r) // 2
        self._blob = blob
        self._m64 = matrix.view(np.uint64).reshape(n, n, s // 8)

    def along_row(self, i: int, j0: int, j1: int) -> U64Array:
        return self._m64[i, j0:j1]

    def along_column(self, j: int, i0: int, i1: int) -> U64Array:
        return self._m64[i0:i1, j]

    def row_groups(self) -> list[tuple[int, int]]:
        return [(0, self._r)]

    def fill(self, j0: int, j1: int) -> None:
        s = self.matrix.shape[2]
        for i in range(self._r):
            piece = self._blob[(i * self._c + j0) * s : (i * self._c + j1) * s]
            out = self.matrix[i, j0:j1].reshape(-1)
            out[: len(piece)] = piece
            out[len(piece) :] = 0


class SliverLayout:
    """Primary slivers, secondary slivers (n, R, s) and a corner scratch.

    Systematic primary slivers are the blob's rows themselves, viewed in place; only rows
    the blob does not fill are copied, zero-padded, into `primary` (n, C, s), which also
    holds the parity primaries. The systematic symbols are copied once more, into their
    secondary slivers: the column code reads them there. The corner M[R..n)[C..n) is never
    stored: each batch of parity columns reuses `corner`, so its symbols are valid only
    until the next batch.
    """

    def __init__(
        self, blob: U8Array, primary: U8Array, secondary: U8Array, corner: U8Array
    ) -> None:
        n, c, s = primary.shape
        r = secondary.shape[1]
        self.secondary, self.corner = secondary, corner
        self._r, self._c = r, c
        self._blob_rows, full = _rows(blob, r, c, s)
        for i in range(full, r):
            _padded_row(blob, i, primary[i].reshape(-1))
        self._full = full
        self.rows = [self._blob_rows[i] if i < full else primary[i] for i in range(n)]
        self._p64 = primary.view(np.uint64).reshape(n, c, s // 8)
        self._b64 = self._blob_rows.view(np.uint64).reshape(full, c, s // 8)
        self._s64 = secondary.view(np.uint64).reshape(n, r, s // 8)
        self._k64 = corner.view(np.uint64).reshape(corner.shape[0], corner.shape[1], s // 8)

    def along_row(self, i: int, j0: int, j1: int) -> U64Array:
        if i < self._r:
            return self._s64[j0:j1, i]
        if j1 <= self._c:
            return self._p64[i, j0:j1]
        return self._k64[i - self._r, : j1 - j0]

    def along_column(self, j: int, i0: int, i1: int) -> U64Array:
        if j >= self._c:
            return self._s64[j, i0:i1]
        return self._b64[i0:i1, j] if i1 <= self._full else self._p64[i0:i1, j]

    def row_groups(self) -> list[tuple[int, int]]:
        groups = [(0, self._full)] if self._full else []
        return groups + [(i, i + 1) for i in range(self._full, self._r)]

    def symbol(self, i: int, j: int, j0: int) -> U8Array:
        """Symbol (i, j) as bytes; in the corner, j0 is the first column of the batch."""
        sym: U8Array
        if i < self._r:
            sym = self.secondary[j, i]
        elif j < self._c:
            sym = self.rows[i][j]
        else:
            sym = self.corner[i - self._r, j - j0]
        return sym

    def fill(self, j0: int, j1: int) -> None:
        full = self._full
        self.secondary[j0:j1, :full] = self._blob_rows[:, j0:j1].transpose(1, 0, 2)
        for i in range(full, self._r):
            self.secondary[j0:j1, i] = self.rows[i][j0:j1]


def batch_columns(params: Params, symbol_size: int) -> int:
    """Columns per batch: as many as keep a batch's n symbols each within BATCH_BYTES."""
    return max(1, BATCH_BYTES // (params.n * symbol_size))


def _run(program: Program, ins: list[U64Array], outs: list[U64Array], workspace: Workspace) -> None:
    batch, words = ins[0].shape
    step = step_words(program, batch, words // 8)
    scratch = workspace.words("scratch", scratch_words(program, batch, step))
    run(program, ins, outs, step, scratch)


def expand_into(
    params: Params,
    layout: Layout,
    workspace: Workspace,
    batch: int,
    done: Callable[[int, int], None] | None = None,
) -> None:
    """Compute every symbol of the matrix in `layout`, calling done(j0, j1) per batch.

    `done` sees columns j0..j1-1 complete; in a SliverLayout corner symbols last only
    until it returns.
    """
    n, r, c = params.n, params.R, params.C
    column_code = parity_program(n, r)

    def columns(j0: int, j1: int) -> None:
        run_ins = [layout.along_row(i, j0, j1) for i in range(r)]
        run_outs = [layout.along_row(i, j0, j1) for i in range(r, n)]
        _run(column_code, run_ins, run_outs, workspace)
        if done is not None:
            done(j0, j1)

    for j0 in range(0, c, batch):
        j1 = min(c, j0 + batch)
        layout.fill(j0, j1)
        columns(j0, j1)
    row_code = parity_program(n, c)
    for i0, i1 in layout.row_groups():
        _run(
            row_code,
            [layout.along_column(j, i0, i1) for j in range(c)],
            [layout.along_column(j, i0, i1) for j in range(c, n)],
            workspace,
        )
    for j0 in range(c, n, batch):
        columns(j0, min(n, j0 + batch))
