#!/usr/bin/env python3
"""A chaos run: a mixed workload through a walrusfs mount while faults are injected.

The workload (create, overwrite, fsynced commits, append, truncate, rename, delete, cp -r,
rsync, tar, and reads checked against a shadow copy in a plain directory) runs while
faults of every kind are injected at random: with scripts/faults.py node directories are
taken away (renamed, removed, made read-only) and restored, wiped, and corrupted (bits
flipped, truncated, zeroed, swapped, replaced by another blob's sliver); one node lives on
a scripts/badmount.py passthrough that turns slow, hangs, fails with EIO, or reports the
disk full, then recovers. Never more than f nodes are faulty at once; a node stays
counted as faulty until a scrub and a repair pass after its fault ended.

Every --crash-every seconds (give or take half) the mount's server is killed (SIGKILL) between
two operations, while faults are in place and background work (block rewrites, deletes,
repair) is under way, and the volume is mounted again through a node that is not faulty,
one time in three with an empty state directory (rebuilt from the nodes alone). What a
crash may lose is what no close() or fsync() promised: a rename, delete or truncate made
last (rsync's rename of its temp file, say) is journalled within a second, not at once.
So before the kill the script fsyncs the mount's root directory, which makes walrusfs
store every change made so far; then the remounted tree must equal the shadow at once:
every file is compared before the workload goes on.

At the end the faults stop, `walrusfs repair` runs until the volume is whole, every file
is compared with the shadow, `walrusfs scrub` verifies every sliver, and `walrusfs fsck`
checks the unmounted volume. Seeded and bounded in time. Last line, exactly:
`chaos: ops N, faults F, crashes C, verified B bytes, mismatches M, late ops L, repaired in T s`
(mismatches and late ops, operations slower than --deadline seconds, must be 0).

  scripts/chaos.py --seconds 60 --seed 1            # its own 7-node volume in a temp dir
  scripts/chaos.py --nodes DIR... --mountpoint MNT  # an existing, unmounted volume
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from faultlib import procs

HERE = Path(__file__).resolve().parent
WALRUSFS = [sys.executable, "-m", "walrusfs.cli"]
FAULTS = [sys.executable, str(HERE / "faults.py")]
BADMOUNT = [sys.executable, str(HERE / "badmount.py")]


def sh(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def walrusfs(*args: object, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    res = sh([*WALRUSFS, *map(str, args)], timeout)
    if res.returncode not in (0,):
        raise RuntimeError(
            f"walrusfs {' '.join(map(str, args))}: {res.stderr.strip() or res.stdout.strip()}"
        )
    return res


@dataclass
class Stats:
    ops: int = 0
    late: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    faults: int = 0
    crashes: int = 0
    fault_log: list[str] = field(default_factory=list)


class Workload:
    """Random file operations on the mount, mirrored on a plain shadow directory."""

    def __init__(
        self, mnt: Path, shadow: Path, rng: random.Random, stats: Stats, deadline: float
    ) -> None:
        self.mnt, self.shadow, self.rng, self.stats, self.deadline = (
            mnt,
            shadow,
            rng,
            stats,
            deadline,
        )
        self.sample = HERE.parent / "codec"  # a small real tree for cp, rsync and tar

    def files(self) -> list[str]:
        return sorted(
            str(p.relative_to(self.shadow)) for p in self.shadow.rglob("*") if p.is_file()
        )

    def both(self, rel: str) -> tuple[Path, Path]:
        return self.mnt / rel, self.shadow / rel

    def op(self) -> None:
        r = self.rng
        files = self.files()
        kind = r.choice(
            [
                "create",
                "create",
                "overwrite",
                "commit",
                "append",
                "truncate",
                "rename",
                "delete",
                "read",
                "read",
                "pread",
                "tree",
            ]
        )
        if not files and kind not in ("create", "tree"):
            kind = "create"
        t0 = time.monotonic()
        try:
            getattr(self, kind)(files)
        except OSError as exc:
            # Within f faults every operation must work: an error is a finding.
            self.stats.errors.append(f"{kind}: {exc}")
        elapsed = time.monotonic() - t0
        self.stats.ops += 1
        if elapsed > self.deadline:
            self.stats.late.append(f"{kind} took {elapsed:.1f}s")

    def _write(self, rel: str, data: bytes, mode: str = "wb") -> None:
        for p in self.both(rel):
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(p, mode) as f:
                f.write(data)

    def create(self, files: list[str]) -> None:
        size = self.rng.choice([0, 1, 4095, 4097, 100_000, 300_000, 1_500_000])
        self._write(
            f"d{self.rng.randrange(4)}/f{self.rng.randrange(10**6)}.bin", self.rng.randbytes(size)
        )

    def overwrite(self, files: list[str]) -> None:
        rel = self.rng.choice(files)
        data = self.rng.randbytes(self.rng.randrange(1, 200_000))
        offset = self.rng.randrange(0, (self.shadow / rel).stat().st_size + 1)
        for p in self.both(rel):
            with open(p, "r+b") as f:
                f.seek(offset)
                f.write(data)

    def commit(self, files: list[str]) -> None:
        """A database's transactions: pages rewritten in place and a log record appended,
        each fsynced, on a file kept open."""
        rel = self.rng.choice(files)
        size = (self.shadow / rel).stat().st_size
        writes = []
        for _ in range(self.rng.randrange(1, 9)):
            writes.append((self.rng.randrange(0, size + 1), self.rng.randbytes(4096)))
            size = max(size, writes[-1][0] + 4096)
            writes.append((size, self.rng.randbytes(self.rng.randrange(1, 600))))
            size += len(writes[-1][1])
        for p in self.both(rel):
            fd = os.open(p, os.O_RDWR)
            try:
                for k, (offset, data) in enumerate(writes):
                    os.pwrite(fd, data, offset)
                    if k % 2:
                        os.fsync(fd)
            finally:
                os.close(fd)

    def append(self, files: list[str]) -> None:
        self._write(
            self.rng.choice(files), self.rng.randbytes(self.rng.randrange(1, 300_000)), "ab"
        )

    def truncate(self, files: list[str]) -> None:
        rel = self.rng.choice(files)
        size = self.rng.randrange(0, 2 * (self.shadow / rel).stat().st_size + 2)
        for p in self.both(rel):
            os.truncate(p, size)

    def rename(self, files: list[str]) -> None:
        rel = self.rng.choice(files)
        new = f"d{self.rng.randrange(4)}/r{self.rng.randrange(10**6)}.bin"
        for old_p, new_p in zip(self.both(rel), self.both(new), strict=True):
            new_p.parent.mkdir(parents=True, exist_ok=True)
            os.rename(old_p, new_p)

    def delete(self, files: list[str]) -> None:
        for p in self.both(self.rng.choice(files)):
            p.unlink()

    def read(self, files: list[str]) -> None:
        rel = self.rng.choice(files)
        a, b = self.both(rel)
        if a.read_bytes() != b.read_bytes():
            self.stats.errors.append(f"read: {rel} differs from the shadow copy")

    def pread(self, files: list[str]) -> None:
        """Small reads at random offsets, as a database or an image reader does: each
        fetches only the symbols around it, from other nodes where its row's is bad."""
        rel = self.rng.choice(files)
        a, b = self.both(rel)
        want = b.read_bytes()
        if not want:
            return
        fd = os.open(a, os.O_RDONLY)
        try:
            for _ in range(4):
                off = self.rng.randrange(len(want))
                n = self.rng.choice([1, 512, 4096, 65536])
                if os.pread(fd, n, off) != want[off : off + n]:
                    self.stats.errors.append(f"pread: {rel} at {off} differs from the shadow")
                    return
        finally:
            os.close(fd)

    def tree(self, files: list[str]) -> None:
        how = self.rng.choice(["cp", "rsync", "tar"])
        name = f"t{self.rng.randrange(10**6)}"
        for root in (self.mnt, self.shadow):
            dst = root / name
            if how == "cp":
                subprocess.run(["cp", "-r", str(self.sample), str(dst)], check=True)
            elif how == "rsync" and shutil.which("rsync"):
                subprocess.run(["rsync", "-a", f"{self.sample}/", str(dst)], check=True)
            else:
                dst.mkdir()
                tar = subprocess.Popen(
                    ["tar", "-C", str(self.sample), "-cf", "-", "."], stdout=subprocess.PIPE
                )
                subprocess.run(["tar", "-C", str(dst), "-xf", "-"], stdin=tar.stdout, check=True)
                tar.wait()
        for p in (self.mnt / name, self.shadow / name):  # keep only data files: pyc caches differ
            for junk in p.rglob("__pycache__"):
                shutil.rmtree(junk)


class Faults:
    """Injects and undoes faults on at most f nodes at once."""

    def __init__(
        self,
        nodes: list[Path],
        f: int,
        rng: random.Random,
        stats: Stats,
        mnt: Path,
        bad: int | None,
    ) -> None:
        self.nodes, self.f, self.rng, self.stats, self.mnt = nodes, f, rng, stats, mnt
        self.bad = bad  # the node behind a misbehaving FUSE mount (scripts/badmount.py), if any
        self.away: dict[int, float] = {}  # node -> when to restore
        self.dirty: set[int] = set()  # faulted since the last repair pass
        self.silent = False  # a fault since then that only a scrub finds (corrupt, wipe)
        self.faulted: dict[int, int] = {}  # node -> faults so far
        # A heal under way in its own thread (faults go on meanwhile): the thread, the
        # fault counts of the nodes it heals when it began, whether to scrub, its result.
        self._heal: tuple[threading.Thread, dict[int, int], bool] | None = None
        self._healed = False
        # Held while a fault is injected or undone, and across a crash and remount, so
        # that the set of faulty nodes holds still while the volume is mounted again.
        self.lock = threading.Lock()

    def step(self, now: float) -> None:
        for i, until in list(self.away.items()):
            if now >= until:
                self._restore(i)
        if self._heal is not None and not self._heal[0].is_alive():
            _, counts, silent = self._heal
            self._heal = None
            if self._healed:  # whole again, unless faulted once more meanwhile
                self.dirty -= {i for i, k in counts.items() if self.faulted.get(i, 0) == k}
            else:
                self.silent = self.silent or silent
        if self._heal is None and not self.away and self.dirty and self.rng.random() < 0.3:
            # Everything is back: heal the faulted nodes (see _heal_now), in a thread so
            # that a long scrub does not stop the faults.
            counts = {i: self.faulted.get(i, 0) for i in self.dirty}
            thread = threading.Thread(target=self._heal_now, args=(self.silent,), daemon=True)
            self._heal = (thread, counts, self.silent)
            self.silent = False
            thread.start()
            return
        candidates = [i for i in range(len(self.nodes)) if i not in self.away]
        if len(self.dirty) >= self.f:
            candidates = [i for i in candidates if i in self.dirty]
        if not candidates or self.rng.random() < 0.5:
            return
        i = self.rng.choice(candidates)
        node = str(self.nodes[i])
        if i == self.bad:  # a mount point: it misbehaves instead of being renamed away
            kinds = ["latency", "hang", "eio", "enospc", "wipe", "flip", "zero"]
        else:
            kinds = [
                "rename",
                "remove",
                "ro",
                "wipe",
                "flip",
                "truncate",
                "zero",
                "swap",
                "foreign",
            ]
        kind = self.rng.choice(kinds)
        if kind in ("latency", "hang", "eio", "enospc"):
            flag = {
                "latency": ["--latency", "150"],
                "hang": ["--hang"],
                "eio": ["--eio", "0.3"],
                "enospc": ["--enospc"],
            }[kind]
            if self._run(["set", node, *flag], f"node {i} misbehaves ({kind})", BADMOUNT):
                self.away[i] = now + self.rng.uniform(1, 6)
        elif kind in ("rename", "remove", "ro"):
            if self._run(["take-away", node, "--how", kind], f"take node {i} away ({kind})"):
                self.away[i] = now + self.rng.uniform(1, 6)
        elif kind == "wipe":
            self._run(["wipe", node], f"wipe node {i}")
            self.silent = True
        else:
            self.silent = True
            seed = str(self.rng.randrange(10**9))
            self._run(
                ["corrupt", node, "--mode", kind, "--fraction", "0.2", "--seed", seed],
                f"corrupt node {i} ({kind})",
            )
        self.dirty.add(i)
        self.faulted[i] = self.faulted.get(i, 0) + 1

    def _run(self, args: list[str], what: str, tool: list[str] | None = None) -> bool:
        res = sh([*(tool or FAULTS), *args], 120)
        ok = res.returncode == 0
        if ok:
            self.stats.faults += 1
        self.stats.fault_log.append(
            f"{what}: {'ok' if ok else res.stderr.strip() or res.stdout.strip()}"
        )
        return ok

    def _heal_now(self, silent: bool) -> None:
        """After a silent fault (flipped bits, a wiped node: no read need have noticed)
        scrub finds the damage; then repair makes the faulted nodes whole again. A repair
        pass alone fixes only what is known bad, so faults on other nodes could pile up
        past f on one blob. Either not clean (a node not scrubbed yet, a blob not
        repairable yet): the nodes stay faulted, to be healed later."""
        scrubbed = not silent or sh([*WALRUSFS, "scrub", str(self.mnt)]).returncode == 0
        self._healed = scrubbed and sh([*WALRUSFS, "repair", str(self.mnt)]).returncode == 0

    def stop(self) -> None:
        if self._heal is not None:
            self._heal[0].join()
        for i in list(self.away):
            self._restore(i)

    def _restore(self, i: int) -> None:
        if i == self.bad:
            self._run(["set", str(self.nodes[i]), "--ok"], f"node {i} behaves again", BADMOUNT)
        else:
            self._run(["restore", str(self.nodes[i])], f"restore node {i}")
        del self.away[i]


class Crasher:
    """Kills the mount's server between operations and mounts the volume again."""

    def __init__(
        self,
        work: Path,
        nodes: list[Path],
        mnt: Path,
        rng: random.Random,
        stats: Stats,
        cache_size: str = "64M",
    ) -> None:
        self.work, self.nodes, self.mnt, self.rng, self.stats = work, nodes, mnt, rng, stats
        self.state = work / "state"
        self.cache_size = cache_size

    def mount(self, faults: Faults | None) -> list[str]:
        """Mount through a node that is not faulty (its identity file names the others);
        return what the mount said besides where it mounted."""
        healthy = [i for i in range(len(self.nodes)) if faults is None or i not in faults.dirty]
        via = self.nodes[self.rng.choice(healthy) if faults is not None else 0]
        res = walrusfs(
            "mount",
            *("--state-dir", self.state, "--node-timeout", "5", "--cache-size", self.cache_size),
            *(via, self.mnt),
        )
        return [
            line
            for line in (res.stdout + res.stderr).splitlines()
            if not line.startswith("mounted at")
        ]

    def next_crash(self, now: float, every: float) -> float:
        """When to crash next: `every` seconds from now, give or take half (never if 0)."""
        return now + every * self.rng.uniform(0.5, 1.5) if every > 0 else float("inf")

    def crash(self, faults: Faults, shadow: Path) -> None:
        """SIGKILL the server, mount again, and compare every file with the shadow."""
        pid = int(json.loads(walrusfs("status", self.mnt, "--json").stdout)["pid"])
        started = procs.start_time(pid)
        try:
            fd = os.open(self.mnt, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)  # every operation so far is promised from here on
            finally:
                os.close(fd)
        except OSError as exc:  # with at most f nodes faulty it must succeed
            self.stats.errors.append(f"fsync of the mount before crash: {exc}")
        os.kill(pid, signal.SIGKILL)
        # Faults go on meanwhile: a thread of the server stuck on the hung FUSE node dies
        # only once that node answers (the kernel waits out a request already sent to a
        # FUSE server, uninterruptibly), and it answers once the injector restores it.
        # Until then the process is a zombie that still holds the mount's /dev/fuse: a
        # mount now would block on it (and on the fault lock the injector needs).
        deadline = time.monotonic() + 120
        while not procs.released(pid, started):
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {pid} still there 120 s after SIGKILL")
            time.sleep(0.05)
        with faults.lock:
            self.stats.crashes += 1
            fresh = self.rng.random() < 1 / 3
            if fresh:
                self.state = self.work / f"state{self.stats.crashes}"
            t0 = time.monotonic()
            said = self.mount(faults)
            self.stats.fault_log.append(
                f"crash {self.stats.crashes}: server killed with faulty nodes "
                f"{sorted(faults.dirty)}; mounted again in {time.monotonic() - t0:.1f} s"
                f"{' with an empty state directory' if fresh else ''}: ok"
            )
            self.stats.fault_log.extend(f"  the mount said: {line}" for line in said)
        differ = differing(digest_tree(self.mnt), digest_tree(shadow))
        if differ:
            self.stats.errors.append(
                f"after crash {self.stats.crashes}: {len(differ)} files differ from the "
                f"shadow copy, e.g. {differ[:5]}"
            )


def differing(mine: dict[str, str], theirs: dict[str, str]) -> list[str]:
    """Paths whose content (or existence) differs between two digest_tree()s."""
    return sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))


def heal(mnt: Path, timeout: float = 300.0) -> float:
    """After the faults: wait for every node to be back, then repair and scrub until clean."""
    t0 = time.monotonic()
    while True:  # the mount notices returning nodes by probing every few seconds
        st = json.loads(walrusfs("status", mnt, "--json").stdout)
        if all(n["state"] == "up" for n in st["nodes"]):
            break
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"nodes still not up: {[n['state'] for n in st['nodes']]}")
        time.sleep(0.5)
    for _ in range(10):
        rep = sh([*WALRUSFS, "repair", str(mnt)])
        if rep.returncode == 0 and "blobs_repaired 0," in rep.stdout:
            scrub = sh([*WALRUSFS, "scrub", str(mnt)])
            if scrub.returncode == 0 and "corrupt" not in scrub.stdout.split("\n", 1)[-1]:
                return time.monotonic() - t0
    raise RuntimeError("the volume did not become whole after 10 repair passes")


def _last_line(res: subprocess.CompletedProcess[str]) -> str:
    out = res.stdout.strip() or res.stderr.strip()
    return out.splitlines()[-1] if out else ""


def digest_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--dir", default="/var/tmp", help="where to make the work directory (default /var/tmp)"
    )
    parser.add_argument(
        "--nodes", nargs="+", help="node directories of an existing volume (unmounted)"
    )
    parser.add_argument("--mountpoint", help="where to mount it (with --nodes)")
    parser.add_argument(
        "--deadline", type=float, default=30.0, help="an operation slower than this is late"
    )
    parser.add_argument(
        "--crash-every",
        type=float,
        default=15.0,
        help="kill the mount's server every this many seconds, give or take half (0: never)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    parser.add_argument("--blob-size", default="256K", help="of the volume made (default 256K)")
    parser.add_argument(
        "--cache-size",
        default="64M",
        help="the mount's read cache (default 64M; under a quarter of the blob size, blobs "
        "are read in windows)",
    )
    args = parser.parse_args()
    procs.exit_on_sigterm()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="walrusfs-chaos-", dir=args.dir))
    badnode: int | None = None
    if args.nodes:
        nodes = [Path(p).resolve() for p in args.nodes]
        mnt = Path(args.mountpoint or work / "mnt").resolve()
    else:
        nodes = [work / f"node{i}" for i in range(7)]
        mnt = work / "mnt"
        # Node 6 lives on a misbehaving FUSE passthrough, as a node on a flaky NFS would.
        (work / "backing6").mkdir()
        nodes[6].mkdir()
        if (
            sh([*BADMOUNT, "mount", str(work / "backing6"), str(nodes[6]), "--daemon"]).returncode
            == 0
        ):
            badnode = 6
        else:
            nodes[6].rmdir()
        walrusfs("mkfs", "--blob-size", args.blob_size, *nodes)
    mnt.mkdir(parents=True, exist_ok=True)
    shadow = work / "shadow"
    shadow.mkdir()
    stats = Stats()
    crasher = Crasher(work, nodes, mnt, random.Random(args.seed + 2), stats, args.cache_size)
    mounted = False
    faults: Faults | None = None
    stop = threading.Event()  # the fault injector's
    injector: threading.Thread | None = None
    try:
        crasher.mount(None)
        mounted = True
        f = int(json.loads(walrusfs("status", mnt, "--json").stdout)["f"])
        faults = Faults(nodes, f, rng, stats, mnt, badnode)
        load = Workload(mnt, shadow, random.Random(args.seed + 1), stats, args.deadline)

        def inject() -> None:
            while not stop.wait(0.5):
                assert faults is not None
                with faults.lock:
                    faults.step(time.monotonic())

        injector = threading.Thread(target=inject, daemon=True)
        injector.start()
        end = time.monotonic() + args.seconds
        crash_at = crasher.next_crash(time.monotonic(), args.crash_every)
        while time.monotonic() < end:
            load.op()
            if time.monotonic() >= crash_at:
                crasher.crash(faults, shadow)
                crash_at = crasher.next_crash(time.monotonic(), args.crash_every)
        stop.set()
        injector.join()
        faults.stop()
        t0 = time.monotonic()
        repaired_in = heal(mnt)
        print(f"  healed: {repaired_in:.1f} s after the last fault ended")
        repaired_in = time.monotonic() - t0
        mine, theirs = digest_tree(mnt), digest_tree(shadow)
        mismatches = len(differing(mine, theirs))
        verified = sum((shadow / k).stat().st_size for k in theirs if mine.get(k) == theirs[k])
        walrusfs("umount", mnt)
        mounted = False
        # Slivers of blobs deleted while their node was away stay behind as orphans: the
        # scrub removes them after a grace period, fsck --repair at once.
        cleanup = sh([*WALRUSFS, "fsck", "--repair", str(nodes[0])])
        print(f"  fsck --repair exit {cleanup.returncode}: {_last_line(cleanup)}")
        fsck = sh([*WALRUSFS, "fsck", str(nodes[0])])
    finally:
        stop.set()
        if injector is not None:
            injector.join()
        if faults is not None:
            faults.stop()
        if mounted:
            sh([*WALRUSFS, "umount", str(mnt)])
            sh(["fusermount3", "-u", "-z", str(mnt)])
        if badnode is not None:
            sh([*BADMOUNT, "unmount", str(nodes[badnode])])
        if not args.keep and not args.nodes:
            shutil.rmtree(work, ignore_errors=True)
    for line in stats.fault_log:
        print(f"  fault: {line}")
    for line in stats.errors + stats.late:
        print(f"  PROBLEM: {line}")
    print(f"  fsck exit {fsck.returncode}: {_last_line(fsck)}")
    mismatches += len(stats.errors)
    print(
        f"chaos: ops {stats.ops}, faults {stats.faults}, crashes {stats.crashes}, verified {verified} bytes, "
        f"mismatches {mismatches}, late ops {len(stats.late)}, repaired in {repaired_in:.1f} s"
    )
    return 0 if mismatches == 0 and not stats.late and fsck.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
