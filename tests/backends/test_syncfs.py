"""syncfs: what durable=False left in the page cache reaches stable storage; the
filesystem traits a node store learns (syncfs durability, O_DIRECT writes)."""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from backends import LocalStore, NodeDown, files


async def test_syncfs_after_page_cache_puts(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path), timeout=10)
    await store.put("a/b", b"x" * 100_000, durable=False)
    await store.syncfs()
    assert await store.get("a/b") == b"x" * 100_000


async def test_syncfs_on_a_vanished_node(tmp_path: Path) -> None:
    node = tmp_path / "node"
    node.mkdir()
    store = LocalStore(str(node), timeout=10)
    shutil.rmtree(node)
    with pytest.raises(NodeDown):
        await store.syncfs()


def test_filesystem_type_agrees_with_findmnt(tmp_path: Path) -> None:
    found = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "--target", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert files.filesystem_type(os.stat(tmp_path).st_dev) == found


def test_filesystem_type_reads_the_type_after_the_separator(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "40 22 0:51 / /mnt/remote\\040node rw,nosuid shared:30 master:2 - fuse.sshfs u@h: rw\n"
        "41 22 0:52 / /mnt/plain rw - nfs4 srv:/x rw\n"
    )
    assert files.filesystem_type(os.makedev(0, 51), str(info)) == "fuse.sshfs"
    assert files.filesystem_type(os.makedev(0, 52), str(info)) == "nfs4"
    assert files.filesystem_type(os.makedev(8, 1), str(info)) == "ext4"
    assert files.filesystem_type(os.makedev(9, 9), str(info)) is None


@pytest.mark.parametrize(
    ("fstype", "durable"),
    [
        ("ext4", True),
        ("xfs", True),
        ("nfs4", True),
        ("virtiofs", True),
        ("fuse.sshfs", False),
        ("fuse", False),
        ("fuseblk", False),
        ("cifs", False),
        ("9p", False),
        (None, False),
    ],
)
def test_syncfs_is_durable_except_where_the_server_is_never_asked(
    fstype: str | None, durable: bool
) -> None:
    assert files.syncfs_is_durable(fstype) is durable


def resident_pages(path: Path) -> int:
    """Pages of the file in the page cache (mincore(2) over a read-only mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        try:
            vec = ctypes.create_string_buffer(-(-size // mmap.PAGESIZE))
            assert libc.mincore(addr, size, vec) == 0
            return sum(b & 1 for b in vec.raw)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


async def test_large_puts_bypass_the_page_cache_on_a_local_disk(tmp_path: Path) -> None:
    fstype = files.filesystem_type(os.stat(tmp_path).st_dev)
    if not files.direct_writes_help(fstype):
        pytest.skip(f"the test directory is on {fstype}, which gets buffered writes")
    store = LocalStore(str(tmp_path), timeout=10)
    big = os.urandom(2 * files.DIRECT_MIN_BYTES + 777)  # not a multiple of any alignment
    small = os.urandom(files.DIRECT_MIN_BYTES - 1)
    await store.put("ab/big", (big[:5], memoryview(big)[5:]), durable=False)
    await store.put("ab/small", small, durable=False)
    # Written O_DIRECT, all but the last partial page (of the 129 the file spans).
    assert resident_pages(tmp_path / "ab" / "big") == 1
    assert resident_pages(tmp_path / "ab" / "small") > 0  # through the page cache
    assert (tmp_path / "ab" / "big").stat().st_size == len(big)
    await store.syncfs()
    assert await store.get("ab/big") == big and await store.get("ab/small") == small
    assert sorted(p.name for p in (tmp_path / "ab").iterdir()) == ["big", "small"]  # no temps


@pytest.mark.parametrize(
    ("fstype", "direct"),
    [
        ("ext4", True),
        ("xfs", True),
        ("btrfs", True),
        ("tmpfs", False),
        ("nfs4", False),
        ("fuse.sshfs", False),
        ("cifs", False),
        (None, False),
    ],
)
def test_o_direct_only_on_local_disk_filesystems(fstype: str | None, direct: bool) -> None:
    assert files.direct_writes_help(fstype) is direct
