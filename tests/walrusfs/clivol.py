"""A walrusfs volume driven through the real CLI, for tier-3 tests (fixture `vol`)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

WALRUSFS = [sys.executable, "-m", "walrusfs.cli"]


def run(
    *args: str | Path, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        [*WALRUSFS, *map(str, args)], capture_output=True, text=True, timeout=timeout
    )
    if check and res.returncode:
        raise AssertionError(f"walrusfs {' '.join(map(str, args))} failed: {res.stderr}")
    return res


def mounted(mnt: Path) -> bool:
    """From /proc/self/mountinfo: also true for a dead mount (os.path.ismount says False)."""
    return any(
        line.split()[4] == str(mnt)
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
    )


def server_pid(mnt: Path) -> int:
    return int(json.loads(run("status", mnt, "--json").stdout)["pid"])


def kill_server(mnt: Path) -> None:
    """SIGKILL the mount's server (a crash) and return once it is gone."""
    pid = server_pid(mnt)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < deadline, f"server {pid} still there 30 s after SIGKILL"
        time.sleep(0.05)


class Vol:
    def __init__(self, root: Path, n: int = 7) -> None:
        self.root = root
        self.nodes = [root / f"node{i}" for i in range(n)]
        self.mnt = root / "mnt"
        self.mnt.mkdir()
        self.state = root / "state"
        self.pids: list[int] = []  # every server this volume's mounts started

    def mount(
        self, *extra: str, node: int = 0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        res = run(
            "mount",
            "--state-dir",
            self.state,
            "--node-timeout",
            "3",
            *extra,
            self.nodes[node],
            self.mnt,
            check=check,
        )
        started = re.search(r"\(server pid (\d+),", res.stdout)
        if started:
            self.pids.append(int(started.group(1)))
        return res

    def serve(self, log: Path) -> subprocess.Popen[bytes]:
        """Mount with the server in the foreground, its output (the log, and its last
        words) going to `log`; return once the mount is there. `cleanup` ends it."""
        with open(log, "wb") as out:  # a file, not a pipe: nobody reads it while it runs
            server = subprocess.Popen(
                [
                    *WALRUSFS,
                    *("mount", "--foreground", "--state-dir", str(self.state)),
                    *("--node-timeout", "3", str(self.nodes[0]), str(self.mnt)),
                ],
                stdout=out,
                stderr=out,
            )
        self.pids.append(server.pid)
        deadline = time.monotonic() + 60
        while not os.path.ismount(self.mnt):
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        return server

    def cleanup(self) -> None:
        if mounted(self.mnt):
            try:
                pid = server_pid(self.mnt)
            except (AssertionError, ValueError, KeyError, subprocess.TimeoutExpired):
                pid = None
            subprocess.run([*WALRUSFS, "umount", str(self.mnt)], capture_output=True, timeout=120)
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        # A server stuck (a test that found a deadlock, say) answers no status and may
        # have lost its mount already: it is still ours to end. Its argv names this
        # volume's mountpoint, which a process that reused its pid would not.
        for pid in self.pids:
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if b"walrusfs.cli" in argv and os.fsencode(self.mnt) in argv:
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def vol(tmp_path: Path) -> Iterator[Vol]:
    v = Vol(tmp_path)
    run("mkfs", "--blob-size", "256K", *v.nodes)
    try:
        yield v
    finally:
        v.cleanup()
