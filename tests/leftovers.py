"""No mount outlives the test run that made it, even a run that was killed.

A run killed outright (SIGKILL, a session that ends, a power cut) cannot unmount what its
tests mounted, and a FUSE mount whose server died is left dead: every lstat of it fails
with ENOTCONN. pytest removes old numbered directories at the end of a later run; its
rmtree meets that error and warns, and under our `filterwarnings = error` the warning
failed a CI run whose tests had all passed.

So this plugin, at the start of a run, detaches the mounts left in the numbered
directories of runs that are over, and at the end of the run insists that the run's own
directory holds no mount: a leak fails the run (after it is detached), not the next one.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def mounts_under(prefix: Path) -> list[tuple[str, str, str]]:
    """(mount point, fstype, major:minor) of mounts at or below `prefix`, deepest first."""
    base = str(prefix).rstrip("/")
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            head, _, tail = line.partition(" - ")
            fields = head.split(" ")
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            if point == base or point.startswith(base + "/"):
                found.append((int(fields[0]), point, tail.split(" ")[0], fields[2]))
    found.sort(key=lambda m: (m[1].count("/"), m[0]), reverse=True)
    return [(point, fstype, dev) for _, point, fstype, dev in found]


def fuse_connection(dev: str) -> Path:
    """The fusectl directory of the FUSE mount on device `dev` (major:minor)."""
    major, _, minor = dev.partition(":")
    return Path("/sys/fs/fuse/connections") / str(os.makedev(int(major), int(minor)))


def _abort_fuse(dev: str) -> None:
    with contextlib.suppress(OSError), open(fuse_connection(dev) / "abort", "w") as f:
        f.write("1")


def detach(prefix: Path) -> list[str]:
    """Lazily unmount everything at or below `prefix`, and abort the FUSE connections so
    no thread stays stuck on them. Never waits on a mount. Returns what it unmounted."""
    done: list[str] = []
    for _ in range(3):
        left = mounts_under(prefix)
        if not left:
            break
        for point, fstype, dev in left:
            fuse = fstype.startswith("fuse")
            cmd = ["fusermount3", "-u", "-z", point] if fuse else ["umount", "-l", point]
            subprocess.run(cmd, capture_output=True, timeout=30, check=False)
            if fuse:
                _abort_fuse(dev)
            done.append(f"unmounted {point}")
        time.sleep(0.1)
    return done


def _in_use(numbered: Path) -> bool:
    """Whether a pytest process still holds this numbered directory's lock file."""
    try:
        pid = int((numbered / ".lock").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return b"pytest" in cmdline


def sweep_ended_runs(root: Path, current: Path) -> list[str]:
    """Detach the mounts below `root` (pytest's temporary root) that belong to runs that
    are over. A concurrent run's directory, whose lock a live pytest holds, is left alone."""
    held: dict[Path, list[str]] = {}
    for point, _, _ in mounts_under(root):
        relative = Path(point).relative_to(root).parts
        if relative:
            held.setdefault(root / relative[0], []).append(point)
    done: list[str] = []
    for numbered in sorted(held):
        if numbered != current and not _in_use(numbered):
            done += detach(numbered)
    return done


@pytest.fixture(scope="session", autouse=True)
def no_mount_outlives_the_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    base = tmp_path_factory.getbasetemp()
    if base.parent.name.startswith("pytest-of-"):  # not a --basetemp chosen by hand
        sweep_ended_runs(base.parent, base)
    yield
    left = detach(base)
    assert not left, f"the tests left mounts behind (now detached): {left}"
