"""RemoteMountStore: a LocalStore on a mount (NFS, sshfs, ...) that refuses I/O once the mount is gone.

When a remote mount drops (``umount -l``, an automounter expiring, a crashed sshfs that
was cleaned up), its mountpoint is again the bare directory of the parent filesystem. A
plain LocalStore would then happily write slivers onto the root disk, where nobody will
ever look for them, and report a healthy but empty node. This store instead raises
NodeDown and never touches the bare directory.

How the check stays exact and cheap, per operation, inside the worker thread (a stat on
a hung NFS mount blocks, so it must run under the deadline):

* The node directory is opened first; every later step works relative to that fd.
* Its device (``fstat().st_dev``) is compared with the device seen at the last full check.
  Equal and the full check is under ``recheck_interval`` old: the fd is on the mount, so
  whatever we write lands on the mount (or on a lazily detached one), never underneath.
* Otherwise a full check: the mountpoint must be listed in ``/proc/self/mountinfo`` (read
  directly: ``os.path.ismount`` compares devices and says False for a dead FUSE mount it
  cannot stat) and the node fd must be on the mountpoint's device.

The node directory must live on the mount's own filesystem (no other mount in between).

Must not import: codec, walrusfs, pyfuse3.

Thread/task safety: the check's cache is shared by worker threads and guarded by a lock;
otherwise as LocalStore.
"""

from __future__ import annotations

import os
import re
import threading
import time

from backends.errors import NodeDown
from backends.local import LocalStore

MOUNTINFO = "/proc/self/mountinfo"

_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> str:
    # The kernel writes space, tab, newline and backslash in paths as \ooo octal.
    raw = _OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), field)
    return os.fsdecode(raw)


def parse_mount_points(mountinfo: bytes) -> list[str]:
    """Return the mount point (5th field) of every line of a mountinfo text, unescaped.

    Raises nothing; malformed lines are skipped.
    """
    points = []
    for line in mountinfo.splitlines():
        fields = line.split(b" ")
        if len(fields) >= 5:
            points.append(_unescape(fields[4]))
    return points


def mount_devices(mountinfo: str = MOUNTINFO) -> dict[str, str]:
    """Map each mount point to the "major:minor" of the newest filesystem mounted there.

    Blocking: reads procfs. Raises OSError if ``mountinfo`` cannot be read.
    """
    with open(mountinfo, "rb") as f:
        text = f.read()
    devices = {}
    for line in text.splitlines():
        fields = line.split(b" ")
        if len(fields) >= 5:
            devices[_unescape(fields[4])] = os.fsdecode(fields[2])  # later lines win
    return devices


def mount_points(mountinfo: str = MOUNTINFO) -> set[str]:
    """Return the set of mount points this process sees (blocking: reads procfs).

    Raises OSError if ``mountinfo`` cannot be read.
    """
    with open(mountinfo, "rb") as f:
        return set(parse_mount_points(f.read()))


def is_mountpoint(path: str | os.PathLike[str]) -> bool:
    """Tell whether ``path`` (symlinks resolved) is a mount point, even a dead one.

    Blocking: resolving the path stats its components, which can hang on a dead NFS
    mount, so call it from a worker thread under a deadline. Raises OSError if
    /proc/self/mountinfo cannot be read.
    """
    return os.path.realpath(os.fspath(path)) in mount_points()


class RemoteMountStore(LocalStore):
    """A node directory on a mount that must still be mounted for any I/O to happen."""

    mountpoint: str
    recheck_interval: float

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        mountpoint: str | os.PathLike[str] | None = None,
        timeout: float = 10.0,
        max_threads: int = 4,
        name: str | None = None,
        recheck_interval: float = 1.0,
    ) -> None:
        super().__init__(path, timeout=timeout, max_threads=max_threads, name=name)
        self.mountpoint = (
            self.path if mountpoint is None else os.path.abspath(os.fspath(mountpoint))
        )
        if os.path.commonpath([self.mountpoint, self.path]) != self.mountpoint:
            raise ValueError(f"node directory {self.path} is not under mount {self.mountpoint}")
        self.recheck_interval = recheck_interval
        self._lock = threading.Lock()
        self._verified_dev: int | None = None
        self._verified_at = 0.0

    def _open_root(self) -> int:
        """Open the node directory, refusing if it is not on the live mount (worker thread).

        Raises NodeDown, OSError.
        """
        try:
            root = super()._open_root()
        except NodeDown:
            # A dropped mount often takes the node directory with it; say so if that is why.
            self._verify_mounted()
            raise
        try:
            dev = os.fstat(root).st_dev
            now = time.monotonic()
            with self._lock:
                fresh = (
                    dev == self._verified_dev and now - self._verified_at < self.recheck_interval
                )
            if not fresh:
                self._verify(dev)
                with self._lock:
                    self._verified_dev, self._verified_at = dev, now
        except BaseException:
            os.close(root)
            raise
        return root

    def _verify_mounted(self) -> str:
        """Check the mountpoint is listed in mountinfo; return its resolved path.

        Raises NodeDown, OSError.
        """
        # realpath so a mountpoint configured through a symlink matches the kernel's view.
        real = os.path.realpath(self.mountpoint)
        if real not in mount_points():
            with self._lock:
                self._verified_dev = None
            raise NodeDown(
                f"mount {self.mountpoint} has dropped; refusing to write into the bare "
                "directory underneath",
                path=self.path,
            )
        return real

    def _verify(self, dev: int) -> None:
        """Full check: the mountpoint is mounted and ``dev`` is its device.

        Raises NodeDown, OSError.
        """
        real = self._verify_mounted()
        if os.stat(real).st_dev != dev:
            raise NodeDown(
                f"node directory is not on the filesystem mounted at {self.mountpoint} (the "
                "mount was replaced, or another mount lies in between); refusing I/O",
                path=self.path,
            )
