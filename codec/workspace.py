"""Reusable buffers for the encoder and the XOR executor.

A fresh 32 MiB+ allocation pays page faults worth a 2 GB/s copy, and a fresh scratch per
program run pays them again on every call; a Workspace keeps its buffers between calls.

Pure numpy; not thread-safe: one Workspace per thread.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

U8Array = npt.NDArray[np.uint8]
U64Array = npt.NDArray[np.uint64]


class Workspace:
    """Named buffers, grown on demand and kept.

    An EncodedBlob made with a workspace holds views into it, so reuse the workspace only
    after the previous result is no longer needed. Not thread-safe: one per thread.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, U8Array] = {}

    def get(self, name: str, size: int) -> U8Array:
        """A uint8 buffer of `size` bytes, grown if needed; contents undefined."""
        buf = self._bufs.get(name)
        if buf is None or len(buf) < size:
            # 64-byte alignment keeps every symbol (a multiple of 64 bytes) on cache lines.
            raw = np.empty(size + 64, dtype=np.uint8)
            start = -raw.ctypes.data % 64
            buf = raw[start : start + size]
            self._bufs[name] = buf
        return buf[:size]

    def words(self, name: str, count: int) -> U64Array:
        """A uint64 buffer of `count` words, as `get`."""
        return self.get(name, 8 * count).view(np.uint64)
