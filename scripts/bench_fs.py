#!/usr/bin/env python3
"""Benchmark the mounted filesystem (n=7) against a plain directory on the same disk.

In one run: 1 GiB of random data written (then fsynced) and read back cold through a
walrusfs mount and through a plain directory, sequentially and in 4 KiB at random
offsets; the sequential read with 2 node directories taken away; extracting a tar of
2,000 small files (1-64 KiB); 1,000 SQLite commits, each one fsync (a database's
workload), and 200 more with a rollback journal; and the write again
with the node directories on tmpfs. Reads are cold: the filesystem is remounted (its own
cache empty) and the page cache dropped. Free memory is touched once before anything is
measured (scripts/benchlib.py: a fresh VM's first touch of a page would otherwise cost
walrusfs, which writes 3.7x the bytes, 3.7x what it costs the plain reference).
Everything runs the real `walrusfs` command.
References put the figures in context: the same bytes walrusfs lays on the nodes (3.7x
the file at n=7) written as plain files of sliver size, which bounds any writer on this
disk, and the same on tmpfs, with the time blake3 takes to hash them (a write must both
store and commit to every sliver); and the small files extracted through a pyfuse3 passthrough to the disk
(scripts/badmount.py) and, with the big file's cold read, through an in-memory
pyfuse3 filesystem (scripts/memfuse.py): the floor of any pyfuse3 filesystem, kernel round
trips and dispatch with no storage behind them. The machine is shared and noisy (a plain
1 GiB write swings from 300 to 850 MB/s between runs here): --rounds N repeats everything
in fresh directories and reports medians.
Last line:
`fs n=7: write X MB/s (plain P), read Y MB/s (plain Q), degraded read Z MB/s, small files T s (plain U s)`
"""

from __future__ import annotations

import argparse
import io
import mmap
import os
import random
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import numpy as np
from benchlib import drop_caches, warm_memory

MIB = 1 << 20
CHUNK = MIB


def walrusfs(*args: object) -> str:
    res = subprocess.run(
        [sys.executable, "-m", "walrusfs.cli", *map(str, args)], capture_output=True, text=True
    )
    if res.returncode:
        raise SystemExit(f"walrusfs {' '.join(map(str, args))}: {res.stderr.strip()}")
    return res.stdout


def write_file(path: Path, data: memoryview) -> float:
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for off in range(0, len(data), CHUNK):
            f.write(data[off : off + CHUNK])
        os.fsync(f.fileno())
    return len(data) / (time.perf_counter() - t0) / 1e6


def read_file(path: Path, expect: memoryview) -> float:
    buf = bytearray(CHUNK)
    pos = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            # Whole chunks compare in place: slicing would allocate (and page-fault) a
            # fresh 1 MiB per chunk, reader CPU that competes with the filesystem's own.
            if (buf if n == len(buf) else buf[:n]) != expect[pos : pos + n]:
                raise SystemExit(f"{path}: WRONG data at offset {pos}")
            pos += n
    elapsed = time.perf_counter() - t0
    if pos != len(expect):
        raise SystemExit(f"{path}: read {pos} bytes, expected {len(expect)}")
    return pos / elapsed / 1e6


RANDOM_READS = 2000


def random_reads(path: Path, expect: memoryview) -> float:
    """Reads per second of 4 KiB at random offsets (a database's or a VM image's reads),
    each checked; the same offsets every time."""
    rng = random.Random(12)
    offsets = [rng.randrange(len(expect) - 4096) for _ in range(RANDOM_READS)]
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        for off in offsets:
            if os.pread(fd, 4096, off) != expect[off : off + 4096]:
                raise SystemExit(f"{path}: WRONG data at offset {off}")
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
    return len(offsets) / elapsed


def node_bytes_ceiling(where: Path, file_bytes: int, expansion: float, file_size: int) -> float:
    """MB/s of file data when its node bytes (`expansion` times it) go to plain files.

    Files of sliver size, over 7 directories, four writers, then sync, as walrusfs
    writes them (O_DIRECT from an aligned buffer where the filesystem takes it, see
    backends.files): the disk's own limit for the bytes walrusfs must store.
    """
    payload = mmap.mmap(-1, file_size)  # page-aligned, as O_DIRECT wants
    payload.write(os.urandom(file_size))
    count = int(file_bytes * expansion) // file_size

    def one(i: int) -> None:
        d = where / f"node{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(d / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
        except OSError:
            fd = os.open(d / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.write(fd, payload)
        finally:
            os.close(fd)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(count)))
    os.sync()
    return file_bytes / (time.perf_counter() - t0) / 1e6


# n=7: 7 * (3 + 5) symbols stored per 15 of data; a 4 MiB blob's sliver file is 2.3 MiB.
SLIVERS = (56 / 15, 2348 << 10)


def hash_ceiling(file_bytes: int, expansion: float, file_size: int) -> float:
    """MB/s of file data when its node bytes are hashed with blake3 (one thread): the
    least a put must do to commit to every sliver, besides writing them."""
    payload = os.urandom(file_size)
    count = int(file_bytes * expansion) // file_size
    t0 = time.perf_counter()
    for _ in range(count):
        blake3.blake3(payload).digest()
    return file_bytes / (time.perf_counter() - t0) / 1e6


def passthrough_small(base: Path, tar: Path) -> float | None:
    """Seconds to extract `tar` through a pyfuse3 passthrough (badmount.py); None if it fails."""
    src, mnt = base / "pass-src", base / "pass-mnt"
    src.mkdir()
    mnt.mkdir()
    script = Path(__file__).parent / "badmount.py"
    if subprocess.run(
        [sys.executable, str(script), "mount", str(src), str(mnt), "--daemon"], capture_output=True
    ).returncode:
        return None
    try:
        return extract(tar, mnt / "small")
    finally:
        subprocess.run([sys.executable, str(script), "unmount", str(mnt)], capture_output=True)


def memfuse_reference(base: Path, tar: Path, data: memoryview) -> dict[str, float]:
    """What any pyfuse3 filesystem costs here: through an in-memory one (memfuse.py), the
    seconds to extract `tar` and the big file's cold read in MB/s (kernel round trips and
    pyfuse3's dispatch alone, no storage behind them). Empty if it fails."""
    mnt = base / "mem-mnt"
    mnt.mkdir()
    script = Path(__file__).parent / "memfuse.py"
    server = subprocess.Popen([sys.executable, str(script), str(mnt)])
    try:
        deadline = time.monotonic() + 10
        while f" {mnt} " not in Path("/proc/self/mountinfo").read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                return {}
            time.sleep(0.05)
        r = {"memfuse_small": extract(tar, mnt / "small")}
        write_file(mnt / "big.bin", data)  # not a reference: its bytearray is the bound
        drop_caches()  # the kernel's copy: the read must ask the filesystem
        r["memfuse_read"] = read_file(mnt / "big.bin", data)
        return r
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def sqlite_commits(where: Path, count: int = 1000, mode: str = "WAL") -> float:
    """Milliseconds per SQLite commit (synchronous=FULL) of a 3 KB row. WAL: a database's
    pages rewritten in place and its log appended, one fsync each. DELETE (SQLite's
    default): a rollback journal created, fsynced and deleted, and the database fsynced,
    for every commit."""
    db = sqlite3.connect(where / f"bench-{mode.lower()}.db", isolation_level=None)
    try:
        db.execute(f"PRAGMA journal_mode = {mode}")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB)")
        rows = random.Random(3)
        t0 = time.perf_counter()
        for _ in range(count):
            db.execute("INSERT INTO t (body) VALUES (?)", (rows.randbytes(3000),))
        elapsed = time.perf_counter() - t0
        if db.execute("PRAGMA integrity_check").fetchone() != ("ok",):
            raise SystemExit(f"SQLite database in {where} is damaged")
    finally:
        db.close()
    return elapsed / count * 1e3


def small_tar(path: Path, count: int, seed: int) -> None:
    rng = random.Random(seed)
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            data = rng.randbytes(rng.randint(1024, 64 * 1024))
            info = tarfile.TarInfo(f"d{i // 100:02d}/f{i:04d}.bin")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def extract(tar: Path, dest: Path) -> float:
    dest.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    subprocess.run(["tar", "-xf", str(tar), "-C", str(dest)], check=True)
    return time.perf_counter() - t0


class Volume:
    def __init__(self, base: Path, name: str) -> None:
        self.nodes = [base / name / f"node{i}" for i in range(7)]
        self.mnt = base / f"{name}-mnt"
        self.state = base / f"{name}-state"
        self.mnt.mkdir()
        walrusfs("mkfs", *self.nodes)

    def mount(self) -> None:
        said = walrusfs("mount", "--state-dir", self.state, self.nodes[0], self.mnt)
        found = re.search(r"\(server pid (\d+),", said)
        if found is None:
            raise SystemExit(f"walrusfs mount did not name its server: {said.strip()}")
        self.pid = int(found.group(1))

    def measure(self, r: dict[str, float], key: str, fn: Callable[[], float]) -> None:
        """r[key] = fn(), and r["cpu_" + key] = the CPU seconds the server (all of its
        threads) used meanwhile."""
        before = self._cpu()
        r[key] = fn()
        r["cpu_" + key] = self._cpu() - before

    def _cpu(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def umount(self) -> None:
        walrusfs("umount", self.mnt)


# What one round leaves on the disk at most: the volume (3.7x the big file), the same
# again for the node-bytes reference, the small files three times over.
ROUND_DISK_FACTOR = 7.6


def one_round(
    args: argparse.Namespace, data: memoryview, leftovers: list[Path]
) -> dict[str, float]:
    """Every measurement once, in fresh directories, deleted at the end unless the caller
    collects them in `leftovers` (args.keep) to delete after the last round.

    Nothing is deleted between measurements: on ext4 without a journal (these VMs' disks)
    the kernel will not reuse an inode freed in the last minutes, and creating files right
    after deleting thousands walks past them all, up to 0.6 ms a file instead of 0.04.
    """
    base = Path(tempfile.mkdtemp(prefix="walrusfs-benchfs-", dir=args.dir))
    mounted: list[Path] = []
    r: dict[str, float] = {}
    try:
        plain = base / "plain"
        plain.mkdir()
        r["plain_write"] = write_file(plain / "big.bin", data)
        drop_caches()
        r["plain_read"] = read_file(plain / "big.bin", data)
        drop_caches()
        r["plain_random"] = random_reads(plain / "big.bin", data)
        (plain / "big.bin").unlink()

        vol = Volume(base, "disk")
        vol.mount()
        mounted.append(vol.mnt)
        vol.measure(r, "write", lambda: write_file(vol.mnt / "big.bin", data))
        vol.umount()
        drop_caches()
        vol.mount()
        vol.measure(r, "read", lambda: read_file(vol.mnt / "big.bin", data))
        vol.umount()
        drop_caches()
        vol.mount()
        vol.measure(r, "random", lambda: random_reads(vol.mnt / "big.bin", data))
        vol.umount()
        away = [vol.nodes[2], vol.nodes[5]]
        for node in away:
            node.rename(f"{node}.away")
        drop_caches()
        vol.mount()
        vol.measure(r, "degraded_read", lambda: read_file(vol.mnt / "big.bin", data))
        vol.umount()
        for node in away:
            Path(f"{node}.away").rename(node)

        tar = base / "small.tar"
        small_tar(tar, args.files, seed=2)
        drop_caches()
        r["plain_small"] = extract(tar, base / "plain-small")
        vol.mount()
        vol.measure(r, "small", lambda: extract(tar, vol.mnt / "small"))
        r["sqlite_ms"] = sqlite_commits(vol.mnt)
        r["sqlite_delete_ms"] = sqlite_commits(vol.mnt, 200, "DELETE")
        vol.umount()
        r["plain_sqlite_ms"] = sqlite_commits(base / "plain")
        r["plain_sqlite_delete_ms"] = sqlite_commits(base / "plain", 200, "DELETE")
        mounted.remove(vol.mnt)
        passed = passthrough_small(base, tar)
        if passed is not None:
            r["passthrough_small"] = passed
        r.update(memfuse_reference(base, tar, data))
        drop_caches()
        r["node_bytes_ceiling"] = node_bytes_ceiling(base / "ceiling", args.mib * MIB, *SLIVERS)

        tmp = base / "tmpfs"
        tmp.mkdir()
        need = int(args.mib * MIB * 4.2) + (256 << 20)
        # Minutes after warm_memory the host has taken back what it touched, and the tmpfs
        # write is the one measurement that fills fresh memory (3.7x the file, where the
        # reference after it reuses what walrusfs freed): cold, here 161 MB/s with 8.2 s
        # of system time in the server; touched again just before, 278-296 MB/s, 2.7-3.0 s.
        warm_memory()
        if (
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={need}", "tmpfs", str(tmp)]
            ).returncode
            == 0
        ):
            try:
                tvol = Volume(tmp, "t")
                tvol.mount()
                mounted.append(tvol.mnt)
                tvol.measure(r, "tmpfs_write", lambda: write_file(tvol.mnt / "big.bin", data))
                tvol.umount()
                mounted.remove(tvol.mnt)
                # Room for the reference, which then reuses the memory that walrusfs's write
                # touched first: a VM's first touch of a page costs (here up to 2x the system
                # time of the same write), so the reference is, if anything, optimistic.
                shutil.rmtree(tmp / "t")
                r["tmpfs_ceiling"] = node_bytes_ceiling(tmp / "ceiling", args.mib * MIB, *SLIVERS)
                r["hash_ceiling"] = hash_ceiling(args.mib * MIB, *SLIVERS)
            finally:
                subprocess.run(["umount", "-l", str(tmp)], check=False)
    finally:
        for mnt in mounted:
            subprocess.run(
                [sys.executable, "-m", "walrusfs.cli", "umount", str(mnt)], capture_output=True
            )
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        if args.keep:
            leftovers.append(base)
        else:
            shutil.rmtree(base, ignore_errors=True)

    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="size of the big file (default 1024)")
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--dir", default="/var/tmp", help="where to work (on the disk to measure)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat everything; figures are medians"
    )
    args = parser.parse_args()
    # Later rounds start clean only if earlier ones are deleted after the last (see
    # one_round), which needs the room for all of them.
    need = args.rounds * ROUND_DISK_FACTOR * args.mib * MIB
    args.keep = args.rounds > 1 and shutil.disk_usage(args.dir).free > need + (2 << 30)
    if args.rounds > 1 and not args.keep:
        print(
            f"note: no room in {args.dir} to keep every round until the end; each round is "
            "deleted as it ends, which can slow file creation in the next one",
            file=sys.stderr,
        )
    warmed = warm_memory()
    data = memoryview(
        np.random.default_rng(1).integers(0, 256, args.mib * MIB, dtype=np.uint8).tobytes()
    )
    leftovers: list[Path] = []
    try:
        rounds = [one_round(args, data, leftovers) for _ in range(args.rounds)]
    finally:
        for base in leftovers:
            shutil.rmtree(base, ignore_errors=True)
    r = {k: statistics.median(rd[k] for rd in rounds if k in rd) for k in rounds[0]}
    print(
        f"{args.mib} MiB file, {args.files} small files, n=7, node directories on the disk, "
        f"{warmed / 2**30:.0f} GiB of memory touched first (see benchlib); MB/s or s"
        + (f", median of {args.rounds} rounds" if args.rounds > 1 else "")
    )
    for k, v in r.items():
        each = (
            "  (" + " ".join(f"{rd[k]:.2f}" for rd in rounds if k in rd) + ")"
            if args.rounds > 1
            else ""
        )
        print(f"  {k:14s} {v:9.2f}{each}")
    p, q = r["plain_write"], r["plain_read"]
    print(
        f"  ratios: write {r['write'] / p:.2f} (target >= 0.2), read {r['read'] / q:.2f} (>= 0.7), "
        f"degraded {r['degraded_read'] / q:.2f} (>= 0.5), small files {r['small'] / r['plain_small']:.1f}x "
        f"(<= 10x), tmpfs write {r.get('tmpfs_write', float('nan')):.0f} MB/s (>= 250)"
    )
    gib = args.mib * MIB / (1 << 30)
    print(
        "  the server's CPU (all threads; steadier than the speeds on a shared machine): "
        f"write {r['cpu_write'] / gib:.1f} s per GiB, read {r['cpu_read'] / gib:.1f}, "
        f"degraded {r['cpu_degraded_read'] / gib:.1f}, tmpfs write "
        f"{r.get('cpu_tmpfs_write', float('nan')) / gib:.1f}, small files "
        f"{r['cpu_small'] / args.files * 1000:.1f} ms per file"
    )
    if "node_bytes_ceiling" in r:
        print(
            f"  references: node bytes as plain files {r['node_bytes_ceiling']:.0f} MB/s of file data "
            f"(write reaches {r['write'] / r['node_bytes_ceiling']:.2f} of it); small files through a "
            f"pyfuse3 passthrough {r.get('passthrough_small', float('nan')):.1f} s, through an "
            f"in-memory pyfuse3 filesystem {r.get('memfuse_small', float('nan')):.1f} s"
        )
        if "tmpfs_ceiling" in r:
            print(
                f"  tmpfs: node bytes as plain files {r['tmpfs_ceiling']:.0f} MB/s of file data, "
                f"blake3 of them {r['hash_ceiling']:.0f} MB/s (one core): a write does both, and "
                f"encodes, on {os.cpu_count()} cores"
            )
        if "memfuse_read" in r:
            print(
                f"  the most any pyfuse3 filesystem does here (in memory): cold read "
                f"{r['memfuse_read']:.0f} MB/s ({r['memfuse_read'] / q:.2f} of plain), small files "
                f"{r['memfuse_small'] / r['plain_small']:.1f}x plain"
            )
    print(
        f"  random 4 KiB reads, cold: {r['random']:.0f} a second (plain {r['plain_random']:.0f}; "
        "the plain file's come from the host's cache)"
    )
    print(
        f"  database: SQLite commit (WAL, an fsync each) {r['sqlite_ms']:.1f} ms "
        f"(plain {r['plain_sqlite_ms']:.2f} ms), with a rollback journal "
        f"{r['sqlite_delete_ms']:.1f} ms (plain {r['plain_sqlite_delete_ms']:.2f} ms)"
    )
    print(
        f"fs n=7: write {r['write']:.0f} MB/s (plain {p:.0f}), read {r['read']:.0f} MB/s (plain {q:.0f}), "
        f"degraded read {r['degraded_read']:.0f} MB/s, small files {r['small']:.1f} s (plain {r['plain_small']:.1f} s)"
    )


if __name__ == "__main__":
    main()
