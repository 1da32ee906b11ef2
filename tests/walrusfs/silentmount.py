"""A walrusfs mount that no server answers, for tests of what the CLI does beside one.

/dev/fuse is opened and mounted by hand, as `fuse.walrusfs`, and never read: every request
on the mount waits, as on a mount whose server is stuck on a hung node or was killed while
one of its threads waited on one. Closing the device ends it: the requests still waiting
fail with ENOTCONN, and the mount is then a dead one.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.leftovers import fuse_connection, mounts_under

_MS_NOSUID, _MS_NODEV = 2, 4


class SilentMount:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def connection(self) -> Path:
        """Its directory under fusectl (/sys/fs/fuse/connections/<st_dev>)."""
        for point, _, dev in mounts_under(self.path):
            if point == str(self.path):
                return fuse_connection(dev)
        raise AssertionError(f"nothing is mounted at {self.path}")

    def end(self) -> None:
        """As the server exiting: the mount stays, dead (ENOTCONN)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@contextlib.contextmanager
def silent_mount(path: Path) -> Iterator[SilentMount]:
    """A `fuse.walrusfs` mount at `path` that never answers; lazily unmounted at the end."""
    libc = ctypes.CDLL(None, use_errno=True)
    mount = SilentMount(path)
    mount.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        options = f"fd={mount.fd},rootmode=40000,user_id=0,group_id=0".encode()
        if libc.mount(b"walrusfs", bytes(path), b"fuse.walrusfs", _MS_NOSUID | _MS_NODEV, options):
            err = ctypes.get_errno()
            raise OSError(err, f"mount of {path}: {os.strerror(err)}")
        yield mount
    finally:
        mount.end()
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
