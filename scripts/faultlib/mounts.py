"""The mount table as the kernel sees it, lazy unmounts, and aborting a hung FUSE connection.

Read ``/proc/self/mountinfo`` directly: ``os.path.ismount`` stats the mountpoint, which
says False for a dead FUSE mount and blocks forever on a hung one. For the same reason
nothing here ever stats a mountpoint: paths are made absolute with ``mount_path``, which
resolves symlinks in the parent only.

Blocking (subprocesses, procfs); for scripts, not for trio tasks. Thread-safe (no state).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"
FUSECTL = "/sys/fs/fuse/connections"

_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    # The kernel escapes space, tab, newline and backslash in paths as \ooo.
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class Mount:
    """One mountinfo line (see proc(5))."""

    mount_id: int
    parent_id: int
    dev: str  # "major:minor" of the filesystem
    root: str  # the directory of that filesystem mounted here ("/" unless a bind mount)
    point: str
    options: tuple[str, ...]  # per-mount options (rw/ro, nosuid, relatime, ...)
    fstype: str
    source: str
    super_options: tuple[str, ...]  # per-filesystem options

    @property
    def is_fuse(self) -> bool:
        return self.fstype == "fuse" or self.fstype.startswith(("fuse.", "fuseblk"))

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def parse(text: str) -> list[Mount]:
    """Parse mountinfo text; malformed lines are skipped."""
    mounts = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(" "), tail.split(" ")
        if not sep or len(fields) < 6 or len(rest) < 3:
            continue
        mounts.append(
            Mount(
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
                dev=fields[2],
                root=_unescape(fields[3]),
                point=_unescape(fields[4]),
                options=tuple(fields[5].split(",")),
                fstype=rest[0],
                source=_unescape(rest[1]),
                super_options=tuple(rest[2].split(",")),
            )
        )
    return mounts


def read(path: str = MOUNTINFO) -> list[Mount]:
    """The mount table, in mount order (a later mount on the same point covers earlier ones)."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return parse(f.read())


def mount_path(path: str) -> str:
    """Absolute, normalized `path` with symlinks resolved in its parent only (never stats it)."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def at(point: str) -> list[Mount]:
    """The mounts stacked on `point`, bottom first."""
    point = mount_path(point)
    return [m for m in read() if m.point == point]


def top(point: str) -> Mount | None:
    """The visible (topmost) mount on `point`, or None if nothing is mounted there."""
    stacked = at(point)
    return stacked[-1] if stacked else None


def under(prefix: str) -> list[Mount]:
    """Mounts on `prefix` or below it, deepest (and most recent) first: the unmount order."""
    prefix = mount_path(prefix)
    found = [m for m in read() if m.point == prefix or m.point.startswith(prefix.rstrip("/") + "/")]
    return sorted(found, key=lambda m: (m.point.count("/"), m.mount_id), reverse=True)


def bind_source(mount: Mount, table: list[Mount] | None = None) -> str | None:
    """A directory that shows what `mount` shows, through another mount of the same filesystem.

    For a bind mount (root != "/") this is the directory it was bound from; for a device
    mounted twice, the other mount. None if `mount` is the only view of its filesystem.
    """
    best: tuple[int, str] | None = None
    for other in table if table is not None else read():
        if other.mount_id == mount.mount_id or other.dev != mount.dev:
            continue
        if other.point == mount.point or other.point.startswith(mount.point.rstrip("/") + "/"):
            continue  # stacked on the same point, or inside the mount: gone with it
        base = other.root.rstrip("/")
        if mount.root != other.root and not mount.root.startswith(base + "/"):
            continue
        path = os.path.join(other.point, mount.root[len(base) :].lstrip("/"))
        if best is None or len(base) > best[0]:
            best = (len(base), path.rstrip("/") or "/")
    return None if best is None else best[1]


def loop_backing_file(source: str) -> str | None:
    """The file behind a loop device (/dev/loopN), or None."""
    name = os.path.basename(source)
    if not re.fullmatch(r"loop\d+", name):
        return None
    try:
        with open(f"/sys/block/{name}/loop/backing_file", encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def ensure_fusectl() -> bool:
    """Make sure the fusectl filesystem is mounted on /sys/fs/fuse/connections.

    Boot normally mounts it, but a careless cleanup ("unmount everything whose type starts
    with fuse") takes it away, and then no hung connection can be aborted. Root only.
    """
    if any(m.fstype == "fusectl" and m.point == FUSECTL for m in read()):
        return True
    if os.geteuid() != 0 or not os.path.isdir(FUSECTL):
        return False
    res = subprocess.run(
        ["mount", "-t", "fusectl", "fusectl", FUSECTL], capture_output=True, check=False
    )
    return res.returncode == 0


def fuse_connection(mount: Mount) -> str | None:
    """The /sys/fs/fuse/connections/<N> directory of a FUSE mount, if it exists."""
    ensure_fusectl()
    major, _, minor = mount.dev.partition(":")
    # FUSE mounts have anonymous devices (major 0); the connection is named by st_dev.
    number = os.makedev(int(major), int(minor))
    path = os.path.join(FUSECTL, str(number))
    return path if os.path.isdir(path) else None


def abort_fuse(mount: Mount) -> bool:
    """Abort a FUSE connection: every pending and future request fails with ENOTCONN.

    Returns False if the connection is already gone.
    """
    conn = fuse_connection(mount)
    if conn is None:
        return False
    try:
        with open(os.path.join(conn, "abort"), "w", encoding="ascii") as f:
            f.write("1")
    except OSError:
        return False
    return True


def lazy_unmount(point: str) -> subprocess.CompletedProcess[str]:
    """Detach the top mount on `point` at once (MNT_DETACH), even if busy or hung.

    FUSE mounts go through ``fusermount3 -u -z`` (which also works for their owner when
    not root); anything else through ``umount -l``.
    """
    mount = top(point)
    if mount is not None and mount.is_fuse and shutil.which("fusermount3"):
        cmd = ["fusermount3", "-u", "-z", mount.point]
    else:
        cmd = ["umount", "-l", mount_path(point)]
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30)


def unmount_all(point: str, abort_hung: bool = True) -> list[str]:
    """Remove every mount stacked on `point`; return a line per step taken.

    A FUSE mount is lazily unmounted and then, if its connection lingers (its server is
    dead or hung), aborted, so no process can stay blocked on it.
    """
    done: list[str] = []
    for _ in range(16):
        mount = top(point)
        if mount is None:
            return done
        res = lazy_unmount(point)
        done.append(f"unmounted {mount.point} ({mount.fstype}, {res.returncode})")
        if mount.is_fuse and abort_hung and abort_fuse(mount):
            done.append(f"aborted FUSE connection {mount.dev} of {mount.point}")
        if res.returncode != 0 and top(point) == mount:
            raise OSError(f"cannot unmount {mount.point}: {res.stderr.strip()}")
    raise OSError(f"{point}: still mounted after 16 unmounts")


def wait_mounted(
    point: str, timeout: float, fstype_prefix: str = "", alive: object = None
) -> Mount:
    """Poll mountinfo until a mount of `fstype_prefix` appears on `point`; returns it.

    `alive`, if given, is a callable returning False once the process that should mount
    has died (then fail at once instead of waiting). Raises TimeoutError, RuntimeError.
    """
    deadline = time.monotonic() + timeout
    while True:
        mount = top(point)
        if mount is not None and mount.fstype.startswith(fstype_prefix):
            return mount
        if callable(alive) and not alive():
            raise RuntimeError(f"the process that should mount {point} exited")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{point} not mounted after {timeout:.0f} s")
        time.sleep(0.02)
