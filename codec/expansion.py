"""The two-dimensional expansion of a blob, ordered so that every symbol is used while hot.

The padded blob is an R x C matrix of s-byte symbols; expansion extends it to n x n (rows
with the [n, C] code, columns with the [n, R] code). At 16 MiB the n x n matrix is ~52 MiB,
more than the L3 cache, so the order of work decides the speed: a pass that reads cold
symbols from DRAM runs at a third of the in-cache rate, for XORs and blake3 alike. So the
matrix is built in batches of columns small enough to stay in cache:

1. for each batch of systematic columns j < C: copy the blob's symbols in, run the column
   code; every symbol goes to `ready` as soon as it is final (the encoder hashes it there,
   while it is still in cache); the row code accumulates the batch too (codec.rowcode),
   so it never reads the blob cold again (codes it cannot accumulate run after the loop);
2. for each batch of parity columns j >= C: the column code, again with `ready`.

A matrix that fits in cache (IN_CACHE_BYTES) is built rows first in one column batch
instead: there is no DRAM traffic to save, only numpy calls. Either way the XORs are those
of rows-then-columns (the cheaper order, ~4n/3 1D encodings).
Where the symbols live is a Layout: one n x n matrix (`expand`), or the sliver buffers
the encoder returns, so no symbol is copied after it is computed.

Pure numpy; thread-safe as long as callers do not share a layout or workspace.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from typing import Protocol

import numpy as np

from codec.codes import parity_program
from codec.config import Params
from codec.rowcode import RowAccumulator, exponents
from codec.workspace import U8Array, U64Array, Workspace
from codec.xorsched import Program, run, scratch_words, step_words

# Bytes of the matrix's columns one batch may span (see xorsched.WORKING_SET).
BATCH_BYTES = 8 << 20
# A matrix up to this size is built rows first in one column batch: it stays in the 32 MiB
# L3 next to the other core's data, and fewer, larger numpy calls win. Measured at 4 MiB
# blobs: n=4 (10.7 MiB) and n=7 (13.1 MiB) +20% parity that way, n=10 (14.3 MiB) -15%.
IN_CACHE_BYTES = 14 << 20


class Layout(Protocol):
    """Where the symbols of the n x n matrix live. Views are uint64, one symbol per row."""

    def along_row(self, i: int, j0: int, j1: int) -> U64Array:
        """Symbols (i, j0..j1-1)."""
        ...

    def along_column(self, j: int, i0: int, i1: int) -> U64Array:
        """Symbols (i0..i1-1, j), i1 <= R."""
        ...

    def fill(self, i: int, j0: int, j1: int) -> None:
        """Put the blob's symbols (i, j0..j1-1) where the column code reads them (i < R)."""
        ...


def _copy_padded(blob: U8Array, start: int, out: U8Array) -> None:
    """out = blob[start : start+len(out)], zero-padded past the blob's end."""
    piece = blob[start : start + len(out)]
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

    def fill(self, i: int, j0: int, j1: int) -> None:
        s = self.matrix.shape[2]
        _copy_padded(self._blob, (i * self._c + j0) * s, self.matrix[i, j0:j1].reshape(-1))


class SliverLayout:
    """Primary slivers (rows of an (n, n, s) array), secondary slivers (n, R, s), the corner.

    The blob's rows are copied, zero-padded, into `primary` (row i: its first C symbols),
    which also holds the parity primaries, and once more, symbol by symbol, into their
    secondary slivers: both codes read them there. (Viewing the blob's rows in place
    instead measured no faster: the copy is what brings them into cache.) The corner
    M[R..n)[C..n) is never stored: it lives in the rest of `primary`'s rows or, when
    `corner` is given, in that scratch, reused by each batch of parity columns (its symbols
    then last only until the next batch).
    """

    def __init__(
        self, blob: U8Array, primary: U8Array, secondary: U8Array, corner: U8Array | None
    ) -> None:
        n, _, s = primary.shape
        r = secondary.shape[1]
        c = n - (n - r) // 2
        self.primary, self.secondary, self.corner = primary, secondary, corner
        self._r, self._c = r, c
        self._blob = blob
        self.rows = [primary[i, :c] for i in range(n)]
        self._p64 = primary.view(np.uint64).reshape(n, n, s // 8)
        self._s64 = secondary.view(np.uint64).reshape(n, r, s // 8)
        self._k64 = None if corner is None else corner.view(np.uint64).reshape(n - r, -1, s // 8)

    def along_row(self, i: int, j0: int, j1: int) -> U64Array:
        if i < self._r:
            return self._s64[j0:j1, i]
        if self._k64 is None or j1 <= self._c:
            return self._p64[i, j0:j1]
        return self._k64[i - self._r, : j1 - j0]

    def along_column(self, j: int, i0: int, i1: int) -> U64Array:
        return self._s64[j, i0:i1]

    def symbol(self, i: int, j: int, j0: int) -> U8Array:
        """Symbol (i, j) as bytes; in a corner scratch, j0 is the first column of the batch."""
        sym: U8Array
        if i < self._r:
            sym = self.secondary[j, i]
        elif self.corner is None or j < self._c:
            sym = self.primary[i, j]
        else:
            sym = self.corner[i - self._r, j - j0]
        return sym

    def fill(self, i: int, j0: int, j1: int) -> None:
        s = self.secondary.shape[2]
        part = self.rows[i][j0:j1]
        _copy_padded(self._blob, (i * self._c + j0) * s, part.reshape(-1))
        self.secondary[j0:j1, i] = part


def batch_columns(params: Params, symbol_size: int) -> int:
    """Columns per batch: n (rows first) if the matrix is within IN_CACHE_BYTES, else as
    many as keep a batch's n symbols each within BATCH_BYTES."""
    n = params.n
    if n * n * symbol_size <= IN_CACHE_BYTES:
        return n
    return max(1, min(n - 1, BATCH_BYTES // (n * symbol_size)))


def _batches(start: int, stop: int, most: int) -> list[tuple[int, int]]:
    """Columns start..stop-1 in as few batches of at most `most` as possible, evenly sized
    (5 columns by 4 are 3 + 2, not 4 + 1: a batch of one costs as many calls as any)."""
    count = -(-(stop - start) // most)
    bounds = [start + (stop - start) * k // count for k in range(count + 1)]
    return list(pairwise(bounds))


def _run(
    program: Program,
    ins: list[U64Array],
    outs: list[U64Array],
    workspace: Workspace,
    on_output: Callable[[int], None] | None = None,
) -> None:
    batch, words = ins[0].shape
    step = step_words(program, batch, words // 8)
    scratch = workspace.words("scratch", scratch_words(program, batch, step))
    run(program, ins, outs, step, scratch, on_output)


def expand_into(
    params: Params,
    layout: Layout,
    workspace: Workspace,
    batch: int,
    ready: Callable[[int, int, int], None] | None = None,
) -> None:
    """Compute every symbol of the matrix in `layout`, `batch` columns at a time.

    ready(i, j0, j1) is called as soon as symbols (i, j0..j1-1) are final, once for every
    i < n and column batch, so they can be hashed while in cache. In a SliverLayout with a
    corner scratch, corner symbols last only until the next batch.
    """
    n, r, c = params.n, params.R, params.C
    column_code = parity_program(n, r)

    def announce(i0: int, i1: int, j0: int, j1: int) -> None:
        if ready is not None:
            for i in range(i0, i1):
                ready(i, j0, j1)

    def fill(j0: int, j1: int) -> None:
        for i in range(r):
            layout.fill(i, j0, j1)
        announce(0, r, j0, j1)

    def columns(j0: int, j1: int) -> None:
        _run(
            column_code,
            [layout.along_row(i, j0, j1) for i in range(r)],
            [layout.along_row(i, j0, j1) for i in range(r, n)],
            workspace,
            None if ready is None else lambda t: announce(r + t, r + t + 1, j0, j1),
        )

    def row_code() -> None:
        _run(
            parity_program(n, c),
            [layout.along_column(j, 0, r) for j in range(c)],
            [layout.along_column(j, 0, r) for j in range(c, n)],
            workspace,
        )
        announce(0, r, c, n)

    exps = exponents(n, c)
    if batch >= n:  # all in cache anyway: rows then columns, the fewest numpy calls
        fill(0, c)
        row_code()
        columns(0, n)
        return
    if exps is None:
        for j0, j1 in _batches(0, c, batch):
            fill(j0, j1)
            columns(j0, j1)
        row_code()
    else:  # the row code rides along, column by column, while each is in cache

        def symbols(j: int) -> U64Array:
            return layout.along_column(j, 0, r).reshape(r, 8, -1)

        rows = RowAccumulator(exps, c, [symbols(j) for j in range(c, n)])
        for j0, j1 in reversed(_batches(0, c, batch)):
            fill(j0, j1)
            columns(j0, j1)
            for j in range(j1 - 1, j0 - 1, -1):
                rows.add(j, symbols(j))
        announce(0, r, c, n)
    for j0, j1 in _batches(c, n, batch):
        columns(j0, j1)
