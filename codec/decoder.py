"""Decoding a blob from any R primary slivers or any C secondary slivers, and byte ranges.

Slivers handed to these functions must already be verified (codec.sliver.verify_sliver or
symbol by symbol): decoding trusts its inputs, and the caller never trusts a node.

When the R systematic primary slivers are given, decoding is one copy into the output and
no arithmetic, and not even the copy for slivers read straight into their place in `out`.
Otherwise the missing rows (or columns) are solved with a cached XOR program for that
erasure pattern, choosing the cheapest set of available slivers.

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


def _decode(
    meta: BlobMetadata, slivers: Mapping[int, Buffer], k: int, blob: np.ndarray, axis: str
) -> None:
    """Fill `blob`, viewed as k slivers of one axis (rows, or the transposed columns).

    The k systematic slivers of that axis are the blob itself: copied when present,
    solved from the cheapest k available ones when missing.
    """
    p, s = meta.params, meta.symbol_size
    per_sliver = blob.shape[1]
    _check(meta, slivers, k, per_sliver * s, axis)
    wanted = tuple(i for i in range(k) if i not in slivers)
    if wanted:
        known = cheapest_known(p.n, k, tuple(slivers), wanted)
        out64 = blob.view(np.uint64)
        run(
            solve_program(p.n, k, known, wanted),
            [_u64(slivers[i], per_sliver, s) for i in known],
            [out64[i] for i in wanted],
        )
    for i in range(k):
        if i in slivers:
            src = np.frombuffer(slivers[i], dtype=np.uint8).reshape(per_sliver, s)
            if not _is_view_of(src, blob[i]):
                blob[i] = src


def _is_view_of(a: np.ndarray, b: np.ndarray) -> bool:
    """True if `a` is exactly the memory of `b` (a sliver read straight into its place)."""
    return bool(
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.strides == b.strides
        and a.shape == b.shape
    )


def decode_primaries(
    meta: BlobMetadata, slivers: Mapping[int, Buffer], out: bytearray | None = None
) -> memoryview:
    """The blob from at least R verified primary slivers (index -> sliver bytes).

    Raises NotEnoughSlivers or ParameterError.
    """
    m = _output(meta, out)
    _decode(meta, slivers, meta.params.R, m, "primary")
    return m.reshape(-1).data[: meta.length]


def decode_secondaries(
    meta: BlobMetadata, slivers: Mapping[int, Buffer], out: bytearray | None = None
) -> memoryview:
    """The blob from at least C verified secondary slivers (index -> sliver bytes).

    Secondary sliver j is column j of the blob matrix, so this is the primary case on the
    transposed matrix. Raises NotEnoughSlivers or ParameterError.
    """
    m = _output(meta, out)
    _decode(meta, slivers, meta.params.C, m.transpose(1, 0, 2), "secondary")
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
