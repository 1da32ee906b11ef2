"""Random I/O through every path a program has into a file, on a real CLI mount.

pwrite, appends through a second O_APPEND descriptor, ftruncate both ways, writes and
reads through a shared mmap, fsync, reopening, and remounting, mixed at random and
checked against a model of the file; in one case with node directories coming and going. Each path alone is tested elsewhere; mixed, they
meet in the kernel's page cache and writeback, and in our dirty blocks, patches and
packs, across blob boundaries (256 KiB blobs here). The server is another process, so
this test may fault on the mount's pages (see test_fuse_tools).
"""

from __future__ import annotations

import mmap
import os
import random
from pathlib import Path

import pytest

from tests.walrusfs.clivol import Vol, run

pytestmark = pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs /dev/fuse")

BLOB = 256 << 10
LIMIT = 6 * BLOB + 1000  # offsets up to here: files span seven blobs
OPS = ["pwrite", "append", "truncate", "mmap_write", "mmap_read", "pread", "fsync", "reopen"]
WEIGHTS = [30, 8, 8, 10, 8, 15, 4, 5]


class Model:
    """The file as it must read, and the descriptor the test works through."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = bytearray()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self.log: list[tuple[object, ...]] = []

    def put(self, off: int, data: bytes) -> None:
        if off > len(self.data):
            self.data.extend(bytes(off - len(self.data)))
        self.data[off : off + len(data)] = data

    def check(self, where: str) -> None:
        recent = self.log[-6:]
        assert os.fstat(self.fd).st_size == len(self.data), (where, recent)
        got = os.pread(self.fd, len(self.data) + 1, 0)
        if got != self.data:
            first = next(
                (i for i, (a, b) in enumerate(zip(got, self.data, strict=False)) if a != b),
                min(len(got), len(self.data)),
            )
            raise AssertionError(f"{where}: differs from byte {first} on; last ops {recent}")


def step(m: Model, rng: random.Random, op: str) -> None:
    size = len(m.data)
    if op == "pwrite":
        off = rng.randrange(LIMIT)
        n = min(rng.choice([1, 17, 4096, rng.randrange(1, 2 * BLOB)]), LIMIT - off)
        data = rng.randbytes(n)
        assert os.pwrite(m.fd, data, off) == n
        m.put(off, data)
        m.log.append((op, off, n))
    elif op == "append":
        data = rng.randbytes(rng.randrange(1, BLOB // 2))
        fd = os.open(m.path, os.O_WRONLY | os.O_APPEND)
        try:
            assert os.write(fd, data) == len(data)
        finally:
            os.close(fd)
        m.put(size, data)
        m.log.append((op, size, len(data)))
    elif op == "truncate":
        new = rng.choice([0, rng.randrange(LIMIT), max(0, size - rng.randrange(1, 5000))])
        os.ftruncate(m.fd, new)
        del m.data[new:]
        m.data.extend(bytes(new - len(m.data)))
        m.log.append((op, new))
    elif op in ("mmap_write", "mmap_read") and size:
        off = rng.randrange(size)
        n = rng.randrange(1, min(size - off, BLOB + 5000) + 1)
        with mmap.mmap(m.fd, size) as mapped:
            if op == "mmap_write":
                data = rng.randbytes(n)
                mapped[off : off + n] = data
                m.put(off, data)
                if rng.random() < 0.5:
                    mapped.flush()
            else:
                assert mapped[off : off + n] == m.data[off : off + n], (op, off, n, m.log[-6:])
        m.log.append((op, off, n))
    elif op == "pread":
        off, n = rng.randrange(LIMIT + 100), rng.randrange(1, 2 * BLOB)
        assert os.pread(m.fd, n, off) == m.data[off : off + n], (op, off, n, m.log[-6:])
    elif op == "fsync":
        os.fsync(m.fd)
        m.log.append((op,))
    elif op == "reopen":
        os.close(m.fd)
        m.fd = os.open(m.path, os.O_RDWR)
        m.check("after reopening")
        m.log.append((op,))


class Faults:
    """Two node directories at a time moved away and back: never more than f gone, but
    often 2f that the mount has not seen come back yet (NodeSet.revive)."""

    def __init__(self, vol: Vol, rng: random.Random) -> None:
        self.vol, self.rng = vol, rng
        self.away: list[int] = []

    def toggle(self, m: Model) -> None:
        nodes = self.vol.nodes
        if self.away:
            for i in self.away:
                Path(f"{nodes[i]}.away").rename(nodes[i])
            m.log.append(("back", self.away))
            self.away = []
        else:
            self.away = self.rng.sample(range(len(nodes)), 2)
            for i in self.away:
                nodes[i].rename(f"{nodes[i]}.away")
            m.log.append(("away", self.away))

    def present(self) -> int:
        return next(i for i in range(len(self.vol.nodes)) if i not in self.away)


@pytest.mark.parametrize(("seed", "faults"), [(1, False), (2, False), (3, True)])
def test_mixed_random_io_matches_a_model_across_remounts(vol: Vol, seed: int, faults: bool) -> None:
    vol.mount()
    rng = random.Random(seed)
    m = Model(vol.mnt / "f")
    nodes = Faults(vol, rng)
    try:
        for remount in range(3):
            for _ in range(150):
                if faults and rng.random() < 0.03:
                    nodes.toggle(m)
                else:
                    step(m, rng, rng.choices(OPS, WEIGHTS)[0])
            m.check("before unmounting")
            os.close(m.fd)
            run("umount", vol.mnt)
            vol.mount(node=nodes.present())
            m.fd = os.open(m.path, os.O_RDWR)
            m.check(f"after remount {remount + 1}")
            m.log.append(("remount",))
    finally:
        os.close(m.fd)
        if nodes.away:
            nodes.toggle(m)
    run("umount", vol.mnt)
    if faults:
        # What the nodes missed while away (slivers, and deletes) is made good.
        run("fsck", "--repair", vol.nodes[0], check=False)
    # Every blob the file's history left is accounted for: stored whole, or deleted.
    res = run("fsck", vol.nodes[0], check=False)
    assert res.returncode == 0, res.stdout + res.stderr
