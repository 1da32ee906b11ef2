"""The time the mount stamps on files and directories, kept in step with the kernel's.

Why: a mount's timestamps come from two clocks. With the writeback cache the kernel
stamps a regular file's mtime and ctime itself on write, truncate and utimensat (FUSE's
trust_local_cmtime), and a directory's mtime on utimensat: from the coarse wall clock,
which lags the fine one by up to a tick or more, raised since Linux 6.13 to the newest
fine-grained stamp handed to a filesystem that asks for them (ext4, xfs, tmpfs; the node
directories are on one). The mount stamps the rest: create, mkdir, unlink, rename,
link, xattrs. Stamped from the fine clock, a directory made and then touched ended up
older than it was made, every time (measured), and a file made just after another was
written could look older than it; make, rsync -u and tar's --newer compare exactly
these.

So a stamp of ours is the coarse clock, raised to the newest ctime the kernel has sent
(ctime is always the kernel's own stamp: no call sets it to a chosen value). The kernel's
stamps never run backwards and are never below the coarse clock, so a stamp of ours is
never newer than one the kernel makes later, nor older than any the mount has been told.

Thread/task safety: one trio thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# Linux's CLOCK_REALTIME_COARSE, the clock the kernel stamps inodes from; Python's time
# module does not name it.
CLOCK_REALTIME_COARSE = 5


def _coarse_ns() -> int:
    try:
        return time.clock_gettime_ns(CLOCK_REALTIME_COARSE)
    except OSError:  # not Linux, or a kernel without it: the fine clock
        return time.time_ns()


class StampClock:
    """Callable: nanoseconds to stamp now (see the module's docstring)."""

    def __init__(
        self,
        coarse_ns: Callable[[], int] = _coarse_ns,
        fine_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._coarse = coarse_ns
        self._fine = fine_ns
        self._kernel = 0  # the newest ctime the kernel has sent

    def __call__(self) -> int:
        now = self._coarse()
        if self._kernel > now:
            if self._kernel <= self._fine():
                return self._kernel
            self._kernel = 0  # the wall clock was set back: keep to it
        return now

    def kernel_stamped(self, ns: int) -> None:
        """Note a ctime the kernel stamped (a setattr's). One ahead of the fine clock
        cannot be the kernel's: it is ignored."""
        if self._kernel < ns <= self._fine():
            self._kernel = ns
