"""What the benchmarks share: cold caches and warm memory.

A benchmark compares walrusfs with a plain file in the same run, on this machine. Two
things of the machine, not of either side, would otherwise decide the result:

- The page cache. Reads are measured cold: `drop_caches` empties it first.
- The first touch of memory in a fresh virtual machine. Until a page of guest memory is
  used once, the host does not back it, and the first write into it pays for that:
  measured here, populating 16 GiB took 25 s on a fresh VM and 11 s once touched, and a
  1 GiB write through walrusfs to tmpfs nodes went at 95 MiB/s, then at 190-200 MiB/s
  after the same memory had been touched once. walrusfs writes 3.7x the bytes of its
  plain reference (into the page cache, or into memory on tmpfs), so it paid 3.7x that
  toll, and whichever side ran first paid for the other. `warm_memory` touches the free
  memory once before anything is measured, as any machine that has been up a while has.
  It wears off: this VM's host takes back memory the guest leaves free (free page
  reporting), so a measurement minutes later that fills memory touches it again first.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

# Left untouched by warm_memory, for the system and the benchmark's own data.
KEEP_FREE = 3 << 30


def drop_caches() -> bool:
    """Drop the page cache so reads are cold; False where not permitted."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def available_memory() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def warm_memory(limit: int = 16 << 30) -> int:
    """Touch up to `limit` bytes of free memory once and give it back; returns how many.

    The kernel populates the mapping itself (MAP_POPULATE): a few seconds per GiB on a
    fresh VM, less than a second per GiB after."""
    size = max(0, min(limit, available_memory() - KEEP_FREE))
    size -= size % mmap.PAGESIZE
    if size <= 0:
        return 0
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    try:
        mmap.mmap(-1, size, flags=flags).close()
    except (OSError, ValueError):
        return 0
    return size
