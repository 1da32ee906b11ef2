"""Decoding a blob from any R primary slivers or any C secondary slivers, and byte ranges.

Slivers handed to these functions must already be verified (codec.sliver.verify_sliver or
symbol by symbol): decoding trusts its inputs, and the caller never trusts a node.

When the R systematic primary slivers are given, decoding is one copy into the output and
no arithmetic. Otherwise the missing rows (or columns) are solved with a cached XOR program
for that erasure pattern, choosing the cheapest set of available slivers.

Pure; thread-safe as long as callers do not share an `out` buffer between threads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from codec.codes import cheapest_known, solve_program
from codec.errors import NotEnoughSlivers, ParameterError
from codec.metadata import BlobMetadata
from codec.sliver import Buffer
from codec.xorsched import run


def _check(
    meta: BlobMetadata, slivers: Mapping[int, Buffer], need: int, size: int, axis: str
) -> None:
    bad = [i for i in slivers if not 0 <= i < meta.n]
    if bad:
        raise ParameterError(f"{axis} sliver indices {bad} out of range for n={meta.n}")
    if len(slivers) < need:
        raise NotEnoughSlivers(f"decoding needs {need} {axis} slivers, got {len(slivers)}")
    for i, data in slivers.items():
        if len(data) != size:
            raise ParameterError(f"{axis} sliver {i} is {len(data)} bytes, expected {size}")


def _output(meta: BlobMetadata, out: bytearray | None) -> np.ndarray:
    p, s = meta.params, meta.symbol_size
    size = p.R * p.C * s
    if out is None:
        out = bytearray(size)
    if len(out) < size:
        raise ParameterError(f"output buffer of {len(out)} bytes, need {size}")
    return np.frombuffer(out, dtype=np.uint8, count=size).reshape(p.R, p.C, s)


def _u64(data: Buffer, rows: int, s: int) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint64).reshape(rows, s // 8)


def decode_primaries(
    meta: BlobMetadata, slivers: Mapping[int, Buffer], out: bytearray | None = None
) -> memoryview:
    """The blob from at least R verified primary slivers (index -> sliver bytes).

    Raises NotEnoughSlivers or ParameterError.
    """
    p, s = meta.params, meta.symbol_size
    _check(meta, slivers, p.R, p.C * s, "primary")
    m = _output(meta, out)
    wanted = tuple(i for i in range(p.R) if i not in slivers)
    if wanted:
        known = cheapest_known(p.n, p.R, tuple(slivers), wanted)
        m64 = m.view(np.uint64).reshape(p.R, p.C, s // 8)
        run(
            solve_program(p.n, p.R, known, wanted),
            [_u64(slivers[i], p.C, s) for i in known],
            [m64[i] for i in wanted],
        )
    for i in range(p.R):
        if i in slivers:
            m[i] = np.frombuffer(slivers[i], dtype=np.uint8).reshape(p.C, s)
    return m.reshape(-1).data[: meta.length]


def decode_secondaries(
    meta: BlobMetadata, slivers: Mapping[int, Buffer], out: bytearray | None = None
) -> memoryview:
    """The blob from at least C verified secondary slivers (index -> sliver bytes).

    Raises NotEnoughSlivers or ParameterError.
    """
    p, s = meta.params, meta.symbol_size
    _check(meta, slivers, p.C, p.R * s, "secondary")
    m = _output(meta, out)
    wanted = tuple(j for j in range(p.C) if j not in slivers)
    if wanted:
        known = cheapest_known(p.n, p.C, tuple(slivers), wanted)
        m64 = m.view(np.uint64).reshape(p.R, p.C, s // 8)
        run(
            solve_program(p.n, p.C, known, wanted),
            [_u64(slivers[j], p.R, s) for j in known],
            [m64[:, j] for j in wanted],
        )
    for j in range(p.C):
        if j in slivers:
            m[:, j] = np.frombuffer(slivers[j], dtype=np.uint8).reshape(p.R, s)
    return m.reshape(-1).data[: meta.length]


@dataclass(frozen=True)
class RangePiece:
    """Bytes [start, stop) of primary sliver `sliver` are blob bytes at `blob_offset`."""

    sliver: int
    start: int
    stop: int
    blob_offset: int

    def symbols(self, symbol_size: int) -> range:
        """The stored symbol positions of the sliver that hold this piece."""
        return range(self.start // symbol_size, -(-self.stop // symbol_size))


def range_plan(meta: BlobMetadata, offset: int, length: int) -> list[RangePiece]:
    """Which systematic primary slivers hold blob bytes [offset, offset+length).

    The range is clipped to the blob. Raises ParameterError for a negative offset/length.
    """
    if offset < 0 or length < 0:
        raise ParameterError(f"bad range offset={offset} length={length}")
    end = min(offset + length, meta.length)
    row = meta.params.C * meta.symbol_size
    pieces = []
    pos = offset
    while pos < end:
        i = pos // row
        stop = min(end, (i + 1) * row)
        pieces.append(RangePiece(i, pos - i * row, stop - i * row, pos))
        pos = stop
    return pieces
