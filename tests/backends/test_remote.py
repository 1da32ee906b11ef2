"""RemoteMountStore on real tmpfs mounts: works while mounted, refuses once the mount drops."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from backends import KeyNotFound, NodeDown, RemoteMountStore, is_mountpoint
from backends.remote import parse_mount_points
from tests.backends.util import snapshot

MOUNTINFO_SAMPLE = (
    b"22 27 0:21 / /proc rw,relatime - proc proc rw\n"
    b"97 27 0:45 / /srv/my\\040node\\011x rw shared:5 - tmpfs tmpfs rw\n"
    b"98 27 0:46 / /srv/back\\134slash rw - nfs host:/x rw\n"
    b"garbage\n"
    b"\n"
)


def test_parse_mount_points_unescapes_octal() -> None:
    assert parse_mount_points(MOUNTINFO_SAMPLE) == [
        "/proc",
        "/srv/my node\tx",
        "/srv/back\\slash",
    ]


def test_is_mountpoint(tmp_path: Path) -> None:
    assert is_mountpoint("/proc")
    assert not is_mountpoint(tmp_path)
    assert not is_mountpoint(tmp_path / "does-not-exist")


def test_is_mountpoint_sees_a_mount_with_a_space_and_through_a_symlink(
    tmp_path: Path, tmpfs: Callable[..., Path]
) -> None:
    mnt = tmpfs("mnt with space", size="1m")
    assert is_mountpoint(mnt)
    (tmp_path / "alias").symlink_to(mnt)
    assert is_mountpoint(tmp_path / "alias")


def test_node_must_live_under_its_mountpoint(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not under mount"):
        RemoteMountStore(tmp_path / "a", mountpoint=tmp_path / "b")


async def umount(where: Path) -> None:
    await trio.run_process(["umount", "-l", str(where)])


async def test_works_while_mounted_and_refuses_after_a_drop(
    tmpfs: Callable[..., Path],
) -> None:
    mnt = tmpfs("mnt with space", size="4m")
    # A day-long recheck interval: the per-call device check alone must catch the drop.
    store = RemoteMountStore(mnt, timeout=20.0, recheck_interval=86400.0)
    await store.put("slivers/ab/k", b"on the mount")
    assert await store.get("slivers/ab/k") == b"on the mount"
    assert await store.list_keys() == ["slivers/ab/k"]
    assert (await store.free_space())[1] == 4 << 20
    assert await store.probe() > 0

    await umount(mnt)
    assert snapshot(mnt) == {}
    with pytest.raises(NodeDown, match="has dropped; refusing to write") as info:
        await store.put("slivers/ab/k2", b"must not land on the parent disk")
    assert store.path in str(info.value)
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.get("slivers/ab/k"),
        lambda: store.list_keys(),
        lambda: store.probe(),
        lambda: store.free_space(),
        lambda: store.cleanup_temps(),
        lambda: store.delete("slivers/ab/k"),
    ]
    for call in calls:
        with pytest.raises(NodeDown):
            await call()
    assert snapshot(mnt) == {}  # nothing was written into the bare directory


async def test_subdirectory_node_refuses_the_bare_twin_underneath(
    tmpfs: Callable[..., Path], tmp_path: Path
) -> None:
    # A directory of the same name exists under the mountpoint on the parent disk, so
    # after the drop the node path still resolves: only the mount check can object.
    (tmp_path / "mnt").mkdir()
    (tmp_path / "mnt" / "node").mkdir()
    mnt = tmpfs("mnt", size="1m")
    (mnt / "node").mkdir()
    store = RemoteMountStore(mnt / "node", mountpoint=mnt, timeout=20.0)
    await store.put("k", b"v")
    assert is_mountpoint(mnt)
    assert not is_mountpoint(mnt / "node")

    await umount(mnt)
    assert snapshot(mnt) == {"node": "<dir>"}
    with pytest.raises(NodeDown, match="has dropped"):
        await store.put("k2", b"v")
    with pytest.raises(NodeDown):
        await store.get("k")
    assert snapshot(mnt) == {"node": "<dir>"}


async def test_a_new_mount_in_its_place_is_accepted(tmpfs: Callable[..., Path]) -> None:
    mnt = tmpfs("mnt", size="1m")
    store = RemoteMountStore(mnt, timeout=20.0, recheck_interval=86400.0)
    await store.put("k", b"first filesystem")
    await umount(mnt)
    with pytest.raises(NodeDown):
        await store.get("k")
    tmpfs("mnt", size="1m")  # a fresh, empty filesystem on the same mountpoint
    with pytest.raises(KeyNotFound):
        await store.get("k")
    await store.put("k", b"second filesystem")
    assert await store.get("k") == b"second filesystem"


async def test_a_node_directory_gone_with_its_mount_says_the_mount_dropped(
    tmpfs: Callable[..., Path],
) -> None:
    mnt = tmpfs("mnt", size="1m")
    (mnt / "node").mkdir()
    store = RemoteMountStore(mnt / "node", mountpoint=mnt, timeout=20.0)
    await store.put("k", b"v")
    await umount(mnt)
    with pytest.raises(NodeDown, match="has dropped"):
        await store.get("k")


async def test_a_plain_directory_is_not_a_mount(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    store = RemoteMountStore(plain)
    with pytest.raises(NodeDown, match="has dropped"):
        await store.put("k", b"v")
    assert os.listdir(plain) == []


async def test_a_mount_stacked_over_the_node_is_refused(tmpfs: Callable[..., Path]) -> None:
    # The node is a subdirectory of the mount; something mounted on the node dir itself
    # is a different filesystem from the one we were told about.
    mnt = tmpfs("mnt", size="1m")
    (mnt / "node").mkdir()
    store = RemoteMountStore(mnt / "node", mountpoint=mnt, timeout=20.0)
    await store.put("k", b"v")
    await trio.run_process(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt / "node")])
    try:
        with pytest.raises(NodeDown, match="not on the filesystem mounted at"):
            await store.put("k2", b"v")
        assert os.listdir(mnt / "node") == []
    finally:
        await umount(mnt / "node")
    assert await store.get("k") == b"v"  # the right filesystem is back in view
