"""Failure safety on real filesystems: full and read-only nodes, and hostile symlinks."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from backends import (
    KeyNotFound,
    LocalStore,
    NodeFull,
    NodeIOError,
    NodePermissionError,
)
from tests.backends.util import files_in, fill_up, snapshot

BIG = b"\xab" * (2 << 20)  # twice the 1 MiB tmpfs


async def test_failed_put_leaves_no_final_and_no_temp(tmpfs: Callable[..., Path]) -> None:
    node = tmpfs(size="1m")
    store = LocalStore(node, timeout=20.0)
    with pytest.raises(NodeFull) as info:
        await store.put("slivers/big", BIG)
    assert info.value.errno == errno.ENOSPC
    assert info.value.key == "slivers/big"
    assert files_in(node) == []  # neither the key nor its temp file
    with pytest.raises(KeyNotFound):
        await store.get("slivers/big")
    # The space came back: a normal put works.
    await store.put("slivers/small", b"fits")
    assert await store.get("slivers/small") == b"fits"


async def test_failed_replace_keeps_the_old_value(tmpfs: Callable[..., Path]) -> None:
    node = tmpfs(size="1m")
    store = LocalStore(node, timeout=20.0)
    await store.put("k", b"old value")
    with pytest.raises(NodeFull):
        await store.put("k", BIG)
    assert await store.get("k") == b"old value"
    assert snapshot(node) == {"k": b"old value"}


async def test_free_space_of_a_sized_tmpfs(tmpfs: Callable[..., Path]) -> None:
    node = tmpfs(size="1m")
    store = LocalStore(node)
    avail, total = await store.free_space()
    assert total == 1 << 20
    await store.put("k", b"\0" * (256 << 10))
    avail_after, _ = await store.free_space()
    assert avail - avail_after >= 256 << 10


async def test_probe_notices_a_full_node(tmpfs: Callable[..., Path]) -> None:
    node = tmpfs(size="1m")
    store = LocalStore(node)
    await store.probe()
    fill_up(node)
    with pytest.raises(NodeFull):
        await store.probe()
    assert files_in(node) == ["filler"]  # the failed probe left no temp


async def test_an_append_that_runs_out_of_space_leaves_the_space_it_took(
    tmpfs: Callable[..., Path],
) -> None:
    """The part of an append that fitted used to stay behind it (readers skip a torn
    tail): on a full node, it took the room the next, smaller append needed."""
    node = tmpfs(size="256k")
    store = LocalStore(node)
    await store.append("log", b"a" * (128 << 10))
    with pytest.raises(NodeFull):
        await store.append("log", b"b" * (256 << 10))
    assert (node / "log").stat().st_size == 128 << 10
    await store.append("log", b"c" * (64 << 10))  # fits in what is left
    assert await store.get("log") == b"a" * (128 << 10) + b"c" * (64 << 10)


async def test_read_only_node_refuses_writes_but_serves_reads(
    tmpfs: Callable[..., Path],
) -> None:
    node = tmpfs(size="1m")
    store = LocalStore(node)
    await store.put("k", b"readable")
    await trio.run_process(["mount", "-o", "remount,ro", str(node)])
    before = snapshot(node)
    with pytest.raises(NodePermissionError) as info:
        await store.put("k2", b"v")
    assert info.value.errno == errno.EROFS
    with pytest.raises(NodePermissionError):
        await store.probe()
    with pytest.raises(NodePermissionError):
        await store.delete("k")
    assert await store.get("k") == b"readable"
    assert await store.list_keys() == ["k"]
    assert snapshot(node) == before


@pytest.fixture
def hostile(tmp_path: Path) -> tuple[Path, Path]:
    """A node dir with symlinks pointing outside it, and the outside dir they point to."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"not yours")
    node = tmp_path / "node"
    node.mkdir()
    (node / "key").symlink_to(outside / "secret")
    (node / "dirlink").symlink_to(outside)
    (node / "a").mkdir()
    (node / "a" / "b").symlink_to(outside)
    return node, outside


@pytest.mark.parametrize("key", ["key", "dirlink/secret", "a/b/secret"])
async def test_symlinks_are_not_followed_for_reads(hostile: tuple[Path, Path], key: str) -> None:
    node, _ = hostile
    store = LocalStore(node)
    with pytest.raises(NodeIOError, match="symlink") as info:
        await store.get(key)
    assert info.value.os_errno == errno.ELOOP
    with pytest.raises(NodeIOError, match="symlink"):
        await store.size(key)


@pytest.mark.parametrize("key", ["dirlink/new", "a/b/new", "dirlink/deeper/new", "a/b/secret"])
async def test_symlinked_key_directories_are_refused_for_writes(
    hostile: tuple[Path, Path], key: str
) -> None:
    node, outside = hostile
    store = LocalStore(node)
    before = snapshot(outside)
    with pytest.raises(NodeIOError, match="symlink"):
        await store.put(key, b"escape attempt")
    with pytest.raises(NodeIOError, match="symlink"):
        await store.delete(key)
    assert snapshot(outside) == before


async def test_put_and_delete_replace_a_symlinked_key_without_following_it(
    hostile: tuple[Path, Path],
) -> None:
    node, outside = hostile
    store = LocalStore(node)
    await store.put("key", b"mine now")
    assert not (node / "key").is_symlink()
    assert await store.get("key") == b"mine now"
    assert (outside / "secret").read_bytes() == b"not yours"

    (node / "key").unlink()
    (node / "key").symlink_to(outside / "secret")
    await store.delete("key")
    assert not (node / "key").exists()
    assert not (node / "key").is_symlink()
    assert (outside / "secret").read_bytes() == b"not yours"


async def test_listing_skips_symlinks_and_refuses_a_symlinked_prefix(
    hostile: tuple[Path, Path],
) -> None:
    node, _ = hostile
    store = LocalStore(node)
    await store.put("a/real", b"v")
    assert await store.list_keys() == ["a/real"]
    with pytest.raises(NodeIOError, match="symlink"):
        await store.list_keys("dirlink")


async def test_cleanup_does_not_follow_symlinks(hostile: tuple[Path, Path]) -> None:
    node, outside = hostile
    (outside / ".tmp-0001").write_bytes(b"outside temp")
    store = LocalStore(node)
    assert await store.cleanup_temps(older_than=-1) == 0
    assert (outside / ".tmp-0001").exists()


async def test_a_reserve_holds_space_that_deleting_it_gives_back(
    tmpfs: Callable[..., Path],
) -> None:
    """A full node must still find room for a delete's journal record: the reserve is
    space taken early (allocated, not a sparse file) and given back when needed."""
    node = tmpfs(size="1m")
    store = LocalStore(node)
    assert await store.reserve("reserve", 256 << 10)
    assert (node / "reserve").stat().st_blocks * 512 >= 256 << 10
    assert not await store.reserve("reserve", 256 << 10)  # held already
    fill_up(node)
    with pytest.raises(NodeFull):
        await store.append("log", b"x" * (64 << 10))
    assert await store.reserve("reserve", 160 << 10)  # gives 96 KiB back
    await store.append("log", b"x" * (64 << 10))
    assert await store.get("log") == b"x" * (64 << 10)
    with pytest.raises(NodeFull):
        await store.append("log", b"y" * (64 << 10))
    await store.delete("reserve")
    await store.append("log", b"y" * (64 << 10))
    assert (node / "log").stat().st_size == 128 << 10


async def test_a_reserve_that_does_not_fit_takes_nothing(tmpfs: Callable[..., Path]) -> None:
    node = tmpfs(size="1m")
    store = LocalStore(node)
    with pytest.raises(NodeFull):
        await store.reserve("reserve", 4 << 20)
    assert files_in(node) == []
    free, _ = await store.free_space()
    assert free > 900 << 10
