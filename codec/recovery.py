"""Sliver recovery: rebuild one lost sliver from one symbol of each of k other slivers.

Symbol M[i][j] is the meeting point of primary sliver i (row) and secondary sliver j
(column). Rebuilding primary i takes M[i][j] from C secondary slivers j; rebuilding
secondary j takes M[i][j] from R primary slivers i. A contributed symbol is *stored* in
the source sliver when it lies in the source's first R (secondary) or C (primary)
positions, so a range read of s bytes fetches it; otherwise the source must expand its
sliver to compute it (`recovery_symbol`). Repair planners use `is_stored` to choose.

Every rebuilt sliver is re-expanded, hashed and checked against its root; a mismatch
raises InconsistentEncoding and no sliver is returned.

Pure; thread-safe.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from codec.codes import cheapest_known, solve_program
from codec.errors import InconsistentEncoding, NotEnoughSlivers, ParameterError
from codec.merkle import leaf_hash, root_of_leaves
from codec.metadata import BlobMetadata
from codec.sliver import PRIMARY, SECONDARY, Buffer, Sliver, symbols_per_sliver
from codec.xorsched import run


def _other(axis: str) -> str:
    return SECONDARY if axis == PRIMARY else PRIMARY


def is_stored(meta: BlobMetadata, source_axis: str, target_index: int) -> bool:
    """True if a `source_axis` sliver stores the symbol it contributes to `target_index`.

    A secondary source contributes M[target][j]: stored iff target < R. A primary source
    contributes M[i][target]: stored iff target < C.
    """
    return target_index < symbols_per_sliver(meta, source_axis)


def expand_sliver(meta: BlobMetadata, axis: str, data: Buffer) -> list[bytes]:
    """All n symbols of a (verified) sliver's row or column."""
    p, s = meta.params, meta.symbol_size
    k = symbols_per_sliver(meta, axis)
    if len(data) != k * s:
        raise ParameterError(f"{axis} sliver of {len(data)} bytes, expected {k * s}")
    src = np.frombuffer(data, dtype=np.uint64).reshape(k, 1, s // 8)
    extra = np.empty((p.n - k, 1, s // 8), dtype=np.uint64)
    run(solve_program(p.n, k, tuple(range(k)), tuple(range(k, p.n))), list(src), list(extra))
    mv = memoryview(data)
    return [bytes(mv[i * s : (i + 1) * s]) for i in range(k)] + [e.tobytes() for e in extra]


def recovery_symbol(meta: BlobMetadata, source: Sliver, target_index: int) -> bytes:
    """The symbol `source` contributes to rebuilding sliver `target_index` of the other axis."""
    if not 0 <= target_index < meta.n:
        raise ParameterError(f"target index {target_index} out of range for n={meta.n}")
    s = meta.symbol_size
    if is_stored(meta, source.axis, target_index):
        return bytes(source.symbol(target_index, s))
    return expand_sliver(meta, source.axis, source.data)[target_index]


def rebuild(meta: BlobMetadata, axis: str, index: int, symbols: Mapping[int, Buffer]) -> Sliver:
    """Rebuild sliver (`axis`, `index`) from recovery symbols keyed by their source index.

    Needs C symbols (from secondary slivers) for a primary, R (from primaries) for a
    secondary. Raises NotEnoughSlivers, ParameterError, or InconsistentEncoding when the
    result does not match its root.
    """
    p, s = meta.params, meta.symbol_size
    k = p.C if axis == PRIMARY else p.R
    if axis not in (PRIMARY, SECONDARY) or not 0 <= index < p.n:
        raise ParameterError(f"no {axis} sliver {index} for n={p.n}")
    if len(symbols) < k:
        raise NotEnoughSlivers(
            f"rebuilding {axis} sliver {index} needs {k} symbols, got {len(symbols)}"
        )
    for j, sym in symbols.items():
        if not 0 <= j < p.n or len(sym) != s:
            raise ParameterError(f"recovery symbol from {_other(axis)} sliver {j} is malformed")
    known = cheapest_known(p.n, k, tuple(symbols), tuple(range(p.n)))
    wanted = tuple(i for i in range(p.n) if i not in known)
    full = np.empty((p.n, 1, s // 8), dtype=np.uint64)
    for i in known:
        full[i, 0] = np.frombuffer(symbols[i], dtype=np.uint64)
    run(solve_program(p.n, k, known, wanted), [full[i] for i in known], [full[i] for i in wanted])
    leaves = [leaf_hash(full[i].view(np.uint8).data) for i in range(p.n)]
    if root_of_leaves(leaves) != meta.root(axis, index):
        raise InconsistentEncoding(
            f"rebuilt {axis} sliver {index} of blob {meta.blob_id.hex()} does not match its root"
        )
    kept = symbols_per_sliver(meta, axis)
    return Sliver(axis, index, full[:kept].tobytes(), b"".join(leaves))
