#!/usr/bin/env python3
"""powerloss.py - cut the power of every node at once, and check what the volume keeps.

The nodes of a volume that lives on one machine's disk all lose power together. Here
they are 7 node directories on one ext4 filesystem in a loop-mounted image file (so root
only). A workload writes through the walrusfs mount: files fsynced, and files rewritten
or created and only closed. The kernel writes dirty pages back in its own order (its
writeback is sped up for the run: inodes dirty for over a second go to the "disk"), so
at any moment some of what walrusfs wrote is on the disk and some only in memory.

The power goes out: the server is stopped where it is, and the image file is copied as
the disk holds it then (the pages the loop device has been given); what ext4 still held
in memory is lost with it. The copy is mounted as a fresh disk, and walrusfs mounts the
volume from it with an empty state directory. Checked:
- every file reads back whole (no EIO, no garbage): its content is the one it had at
  the last fsync (of any file: an fsync flushes every node) or one it was given since;
  a file created since may be missing or empty;
- the mount finds the sliver files the power loss spoilt (its check of what was written
  since the last durable sync, then a repair pass), and `walrusfs fsck` after it finds
  no lost data and no corrupt or missing sliver file.
Whether recovery left out journal changes whose blobs the disk did not have is printed:
that is the case this run exists for, and how often it comes up depends on timing.

    powerloss.py [--seconds S] [--seed N] [--keep]

Exits 0 when every check passed, 1 otherwise. The last line:
`powerloss: files N, fsynced intact K, unsynced F (older A, newest B, absent or empty C), left out: yes|no, fsck: ...`
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from faultlib import procs

WALRUSFS = [sys.executable, "-m", "walrusfs.cli"]
SYSCTLS = {"vm/dirty_expire_centisecs": "100", "vm/dirty_writeback_centisecs": "20"}


def sh(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300)
    if check and res.returncode:
        raise SystemExit(f"powerloss: {' '.join(map(str, args))} failed: {res.stderr.strip()}")
    return res


def walrusfs(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh(*WALRUSFS, *args, check=check)


def settle(mnt: Path, timeout: float = 120.0) -> str:
    """Wait for the mount's check of the files written just before the crash, then run
    a repair pass; what did not happen ("" if all did)."""
    deadline = time.monotonic() + timeout
    while True:
        st = json.loads(walrusfs("status", mnt, "--json").stdout)
        if st["scrub"]["after_crash_left"] == 0:
            break
        if time.monotonic() > deadline:
            return f"{st['scrub']['after_crash_left']} files unchecked after {timeout:g} s"
        time.sleep(0.2)
    res = walrusfs("repair", mnt, check=False)
    return "" if res.returncode == 0 else f"repair: {res.stdout.strip()} {res.stderr.strip()}"


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class Workload:
    """Writes files through the mount and remembers, per file, every content it may be
    found with after a power loss."""

    def __init__(self, mnt: Path, rng: random.Random) -> None:
        self.mnt, self.rng = mnt, rng
        # name -> digests acceptable after a crash; "" stands for missing or empty.
        self.allowed: dict[str, set[str]] = {}
        self.durable: dict[str, str] = {}  # name -> digest at the last fsync (of any file)
        self.newest: dict[str, str] = {}
        self.had: dict[str, set[str]] = {}  # name -> every content it was given
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.ops = 0

    def _write(self, name: str, size: int, fsync: bool) -> None:
        data = self.rng.randbytes(size)
        d = digest(data)
        # Allowed before the write starts: the power may go out in the middle of it.
        self.allowed.setdefault(name, {""}).add(d)
        with open(self.mnt / name, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        self.newest[name] = d
        self.had.setdefault(name, set()).add(d)
        if fsync:  # every node was flushed: all closed files are durable as they are now
            self.durable = dict(self.newest)
            for n, dg in self.newest.items():
                self.allowed[n] = {dg}
        self.ops += 1

    def prepare(self) -> None:
        for i in range(8):
            self._write(f"rewritten-{i}", self.rng.randrange(100_000, 600_000), fsync=False)
        self._write("synced-0", 200_000, fsync=True)

    def run(self) -> None:
        try:
            k = 0
            while not self.stop.is_set():
                k += 1
                roll = self.rng.random()
                if roll < 0.02:
                    self._write(f"synced-{k}", self.rng.randrange(1000, 400_000), fsync=True)
                elif roll < 0.15:
                    name = f"rewritten-{self.rng.randrange(8)}"
                    self._write(name, self.rng.randrange(100_000, 600_000), fsync=False)
                else:
                    self._write(f"new-{k}", self.rng.randrange(1000, 600_000), fsync=False)
        except OSError as exc:  # the mount went away with the power
            if not self.stop.is_set():
                self.error = exc


def _what(found: str, had: set[str]) -> str:
    """What a file that came back wrong holds, in words."""
    if found == "":
        return "missing or empty, though it was neither at the last fsync"
    if found in had:
        return "content older than it had at the last fsync"
    return "content it was never given (garbage)"


def server_pid(mnt: Path) -> int:
    return int(json.loads(walrusfs("status", mnt, "--json").stdout)["pid"])


def power_loss(args: argparse.Namespace, base: Path) -> int:
    img, disk = base / "disk.img", base / "disk"
    mnt, state = base / "mnt", base / "state"
    for d in (disk, mnt):
        d.mkdir()
    with open(img, "wb") as f:
        f.truncate(4 << 30)
    sh("mkfs.ext4", "-q", "-F", img)
    sh("mount", "-o", "loop", img, disk)
    nodes = [disk / f"n{i}" for i in range(7)]
    walrusfs("mkfs", *nodes)
    walrusfs("mount", "--state-dir", state, nodes[0], mnt)
    rng = random.Random(args.seed)
    work = Workload(mnt, rng)
    work.prepare()
    thread = threading.Thread(target=work.run, daemon=True)
    thread.start()
    time.sleep(args.seconds * (0.5 + rng.random() / 2))
    pid = server_pid(mnt)
    # The power goes out: the server stops where it is, and the disk keeps what the
    # kernel has given it so far.
    os.kill(pid, signal.SIGSTOP)
    work.stop.set()
    snap = base / "after.img"
    shutil.copyfile(img, snap)
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=60)
    sh("umount", "-l", mnt, check=False)
    sh("umount", "-l", disk, check=False)
    print(f"power lost after {work.ops} writes; {len(work.durable)} files were durable")

    # The same disk, powered up again where it was mounted (the nodes know their mount).
    sh("mount", "-o", "loop", snap, disk)
    after = disk
    try:
        got = walrusfs("mount", "--state-dir", base / "state-after", after / "n0", mnt, check=False)
        print(got.stdout.strip())
        print(got.stderr.strip())
        if got.returncode:
            print("FAILED: the volume does not mount after the power loss")
            return 1
        left_out = "changes before a crash" in got.stderr
        bad, older, newest, gone, intact = [], 0, 0, 0, 0
        try:
            for name, allowed in sorted(work.allowed.items()):
                try:
                    found = digest((mnt / name).read_bytes())
                except FileNotFoundError:
                    found = ""
                except OSError as exc:
                    bad.append(f"{name}: {exc}")
                    continue
                if found == digest(b""):
                    found = ""
                if found not in allowed:
                    bad.append(f"{name}: {_what(found, work.had.get(name, set()))}")
                elif name in work.durable and allowed == {work.durable[name]}:
                    intact += 1
                elif found == "":
                    gone += 1
                elif found == work.newest.get(name):
                    newest += 1
                else:
                    older += 1
            unsettled = settle(mnt)
        finally:
            walrusfs("umount", mnt, check=False)
        fsck = walrusfs("fsck", after / "n0", check=False)
        # Orphans (blobs of changes left out or never named) are expected; sliver files
        # the power loss spoilt must have been found and repaired by the mount.
        fsck_line = "; ".join(
            line.strip()
            for line in fsck.stdout.splitlines()
            if line.startswith(("sliver files:", "orphans:", "blobs:"))
        )
        lost = "LOST" in fsck.stdout
        spoilt = re.search(r"sliver files: \d+ verified, (\d+) missing, (\d+) corrupt", fsck.stdout)
        if unsettled or spoilt is None or spoilt.group(1) != "0" or spoilt.group(2) != "0":
            bad.append(f"the mount did not repair what the power loss spoilt: {unsettled}")
    finally:
        sh("umount", "-l", after, check=False)
    for line in bad:
        print(f"WRONG: {line}")
    if lost:
        print(fsck.stdout)
    print(
        f"powerloss: files {len(work.allowed)}, fsynced intact {intact}, unsynced "
        f"{len(work.allowed) - intact} (older {older}, newest {newest}, absent or empty "
        f"{gone}), left out: {'yes' if left_out else 'no'}, fsck: {fsck_line}"
    )
    return 1 if bad or lost or work.error else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="longest run before the cut")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--dir", default="/var/tmp", help="where to make the work directory (default /var/tmp)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    procs.exit_on_sigterm()
    if os.geteuid():
        print("powerloss: needs root (a loop-mounted ext4 image)", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="walrusfs-powerloss-", dir=args.dir))
    saved = {k: Path("/proc/sys", k).read_text() for k in SYSCTLS}
    try:
        for k, v in SYSCTLS.items():
            Path("/proc/sys", k).write_text(v)
        return power_loss(args, base)
    finally:
        for k, v in saved.items():
            with contextlib.suppress(OSError):
                Path("/proc/sys", k).write_text(v)
        for d in ("mnt", "disk"):
            sh("umount", "-l", base / d, check=False)
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
