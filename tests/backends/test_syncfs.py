"""syncfs: what durable=False left in the page cache reaches stable storage."""

from __future__ import annotations

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
    [("ext4", True), ("xfs", True), ("nfs4", True), ("virtiofs", True), ("fuse.sshfs", False),
     ("fuse", False), ("fuseblk", False), ("cifs", False), ("9p", False), (None, False)],
)
def test_syncfs_is_durable_except_where_the_server_is_never_asked(
    fstype: str | None, durable: bool
) -> None:
    assert files.syncfs_is_durable(fstype) is durable
