"""LocalStore on a real directory: the data path, listing, space, probe, cleanup, node errors."""

from __future__ import annotations

import errno
import os
import random
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from backends import (
    KeyExists,
    KeyNotFound,
    LocalStore,
    NodeDown,
    NodeIOError,
    NodeStore,
    files,
)
from tests.backends.util import files_in, snapshot


def test_localstore_is_a_nodestore(node: Path) -> None:
    store = LocalStore(node, name="n0")
    assert isinstance(store, NodeStore)
    assert store.path == str(node)
    assert store.name == "n0"
    assert LocalStore(node).name == str(node)


def test_relative_path_is_made_absolute(node: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(node.parent)
    assert LocalStore("node").path == str(node)


@pytest.mark.parametrize("kwargs", [{"timeout": 0}, {"timeout": -1.0}, {"max_threads": 0}])
def test_constructor_rejects_nonsense(node: Path, kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        LocalStore(node, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 1 << 20])
async def test_put_get_roundtrip(store: LocalStore, node: Path, size: int) -> None:
    data = random.Random(size).randbytes(size)
    await store.put("slivers/ab/blob", data)
    assert await store.get("slivers/ab/blob") == data
    assert await store.size("slivers/ab/blob") == size
    assert (node / "slivers" / "ab" / "blob").read_bytes() == data


@pytest.mark.parametrize("kind", [bytearray, memoryview])
async def test_put_accepts_buffers_and_copies_them(store: LocalStore, kind: type) -> None:
    buf = bytearray(b"original bytes")
    await store.put("k", kind(buf))
    buf[:] = b"XXXXXXXXXXXXXX"
    assert await store.get("k") == b"original bytes"


async def test_put_accepts_non_byte_memoryview(store: LocalStore) -> None:
    words = memoryview(bytearray(range(8))).cast("H")
    await store.put("k", words)
    assert await store.get("k") == bytes(range(8))


async def test_put_of_pieces_stores_them_in_order(store: LocalStore) -> None:
    big = random.Random(9).randbytes(1 << 20)
    buf = bytearray(b"mutable")
    pieces = (b"head", memoryview(big).toreadonly(), b"", buf, memoryview(big)[:3])
    await store.put("slivers/ab/blob", pieces, durable=False)
    buf[:] = b"XXXXXXX"  # a writable piece was copied before the put returned
    assert await store.get("slivers/ab/blob") == b"head" + big + b"mutable" + big[:3]


async def test_append_creates_then_extends_a_key(store: LocalStore, node: Path) -> None:
    await store.append("journal/e1/log", b"one,")
    await store.append("journal/e1/log", b"two", durable=True)
    assert await store.get("journal/e1/log") == b"one,two"
    assert (node / "journal" / "e1" / "log").stat().st_mode & 0o777 == 0o600


async def test_append_refuses_a_symlink_at_the_key(store: LocalStore, node: Path) -> None:
    (node / "target").write_bytes(b"kept")
    (node / "log").symlink_to(node / "target")
    with pytest.raises(NodeIOError, match="symlink"):
        await store.append("log", b"x")
    assert (node / "target").read_bytes() == b"kept"


async def test_non_durable_put_is_still_readable(store: LocalStore) -> None:
    await store.put("a/b", b"fast", durable=False)
    assert await store.get("a/b") == b"fast"


RANGES = [
    (0, None),
    (0, 0),
    (0, 10),
    (3, 4),
    (95, None),
    (95, 10),  # runs past EOF: short read
    (100, None),  # exactly at EOF
    (100, 5),
    (150, 5),  # beyond EOF
    (0, 1 << 40),  # a huge length must not be allocated
]


@pytest.mark.parametrize(("offset", "length"), RANGES)
async def test_get_ranges_match_slicing(store: LocalStore, offset: int, length: int | None) -> None:
    data = bytes(range(100))
    await store.put("r", data)
    expected = data[offset:] if length is None else data[offset : offset + length]
    assert await store.get("r", offset, length) == expected


@pytest.mark.parametrize(("offset", "length"), [(-1, None), (0, -1)])
async def test_get_rejects_negative_ranges(
    store: LocalStore, offset: int, length: int | None
) -> None:
    await store.put("r", b"data")
    with pytest.raises(ValueError):
        await store.get("r", offset, length)


@pytest.mark.parametrize(
    ("offset", "sizes"), [(0, (10, 90)), (5, (0, 7, 3)), (60, (30, 30)), (100, (4,))]
)
async def test_get_into_fills_buffers_in_order(
    store: LocalStore, offset: int, sizes: tuple[int, ...]
) -> None:
    data = bytes(range(100))
    await store.put("r", data)
    bufs = [bytearray(b"\xee" * n) for n in sizes]
    seen: list[int] = []
    got = await store.get_into("r", offset, tuple(map(memoryview, bufs)), check=seen.append)
    expected = data[offset : offset + sum(sizes)]
    assert got == len(expected) and seen == [got]
    assert b"".join(bufs)[:got] == expected
    assert set(b"".join(bufs)[got:]) <= {0xEE}  # past EOF: left untouched


async def test_get_into_refuses_read_only_buffers_and_missing_keys(store: LocalStore) -> None:
    await store.put("r", b"data")
    with pytest.raises(ValueError):
        await store.get_into("r", 0, (memoryview(b"four"),))
    with pytest.raises(ValueError):
        await store.get_into("r", -1, (memoryview(bytearray(4)),))
    with pytest.raises(KeyNotFound):
        await store.get_into("nope", 0, (memoryview(bytearray(4)),))


async def test_get_into_propagates_what_check_raises(store: LocalStore) -> None:
    await store.put("r", b"data")

    def check(count: int) -> None:
        raise RuntimeError(f"bad {count}")

    with pytest.raises(RuntimeError, match="bad 4"):
        await store.get_into("r", 0, (memoryview(bytearray(8)),), check=check)


async def test_put_replaces_and_leaves_no_temps(store: LocalStore, node: Path) -> None:
    await store.put("x/k", b"first version, longer")
    await store.put("x/k", b"second")
    assert await store.get("x/k") == b"second"
    assert files_in(node) == ["x/k"]


async def test_a_put_that_may_not_replace_leaves_a_file_of_its_size(
    store: LocalStore, node: Path
) -> None:
    await store.put("x/k", b"first")
    before = (node / "x/k").stat()
    with pytest.raises(KeyExists):
        await store.put("x/k", b"again", replace=False)  # same size: taken as the same
    assert await store.get("x/k") == b"first"
    assert (node / "x/k").stat().st_ino == before.st_ino  # not even rewritten
    await store.put("x/k", b"a longer value", replace=False)  # another size: damaged
    assert await store.get("x/k") == b"a longer value"
    await store.put("x/new", b"new", replace=False)
    assert await store.get("x/new") == b"new"
    assert files_in(node) == ["x/k", "x/new"]


async def test_files_and_directories_are_private(store: LocalStore, node: Path) -> None:
    await store.put("d1/d2/k", b"secret")
    for rel in ["d1", "d1/d2"]:
        mode = (node / rel).stat().st_mode
        assert stat.S_ISDIR(mode)
        assert stat.S_IMODE(mode) & 0o077 == 0, rel
    assert stat.S_IMODE((node / "d1/d2/k").stat().st_mode) & 0o177 == 0


async def test_delete_is_idempotent(store: LocalStore, node: Path) -> None:
    await store.put("d/k", b"v")
    await store.put("d/other", b"w")
    await store.delete("d/k")
    assert files_in(node) == ["d/other"]
    await store.delete("d/k")
    await store.delete("no/such/dir/k")
    with pytest.raises(KeyNotFound):
        await store.get("d/k")


async def test_delete_of_a_key_directory_is_a_no_op(store: LocalStore) -> None:
    await store.put("d/k", b"v")
    await store.delete("d")
    assert await store.get("d/k") == b"v"


async def test_missing_keys(store: LocalStore) -> None:
    await store.put("d/file", b"v")
    for key in ["nope", "d/nope", "nope/deeper/k", "d/file/below", "d"]:
        with pytest.raises(KeyNotFound) as info:
            await store.get(key)
        assert info.value.errno == errno.ENOENT
        assert info.value.key == key
        assert str(store.path) in str(info.value)
        with pytest.raises(KeyNotFound):
            await store.size(key)


async def test_put_below_a_file_is_refused(store: LocalStore, node: Path) -> None:
    await store.put("d", b"a file where a directory would go")
    with pytest.raises(NodeIOError):
        await store.put("d/k", b"v")
    assert files_in(node) == ["d"]


async def test_put_over_a_key_directory_is_refused(store: LocalStore, node: Path) -> None:
    await store.put("d/k", b"v")
    with pytest.raises(NodeIOError) as info:
        await store.put("d", b"would replace a whole directory")
    assert info.value.os_errno == errno.EISDIR
    assert files_in(node) == ["d/k"]  # and its temp file is gone


async def test_list_keys(store: LocalStore, node: Path) -> None:
    keys = ["top", "slivers/ab/1", "slivers/ab/2", "slivers/cd/1", "meta/x.json"]
    for key in keys:
        await store.put(key, key.encode())
    # Things that are not keys: temp files, foreign names, a symlink, a FIFO, an empty dir.
    (node / "slivers" / "ab" / ".tmp-deadbeef").write_bytes(b"partial")
    (node / "slivers" / "ab" / "bad name").write_bytes(b"")
    (node / ".DS_Store").write_bytes(b"")
    (node / "slivers" / "link").symlink_to(node / "top")
    os.mkfifo(node / "slivers" / "fifo")
    (node / "empty").mkdir()

    assert await store.list_keys() == sorted(keys)
    assert await store.list_keys("slivers") == ["slivers/ab/1", "slivers/ab/2", "slivers/cd/1"]
    assert await store.list_keys("slivers/ab") == ["slivers/ab/1", "slivers/ab/2"]
    assert await store.list_keys("empty") == []
    assert await store.list_keys("missing/dir") == []
    assert await store.list_keys("top") == []  # a key is not a key directory


async def test_list_keys_on_empty_node(store: LocalStore) -> None:
    assert await store.list_keys() == []


async def test_size_does_not_open_the_file(store: LocalStore, node: Path) -> None:
    await store.put("k", b"12345")
    assert await store.size("k") == 5
    os.mkfifo(node / "fifo")  # opening it would block; stat must not
    with pytest.raises(NodeIOError, match="not a regular file"):
        await store.size("fifo")


async def test_sizes_answers_many_keys_in_one_call_leaving_out_missing_ones(
    store: LocalStore, node: Path
) -> None:
    await store.put("a", b"12345")
    await store.put("slivers/ab/b", bytes(70_000))
    got = await store.sizes(["a", "slivers/ab/b", "missing", "slivers/cd/none"])
    assert got == {"a": 5, "slivers/ab/b": 70_000}
    os.mkfifo(node / "fifo")
    with pytest.raises(NodeIOError, match="not a regular file"):
        await store.sizes(["a", "fifo"])


async def test_free_space_agrees_with_statvfs(store: LocalStore, node: Path) -> None:
    avail, total = await store.free_space()
    st = os.statvfs(node)
    assert total == st.f_blocks * st.f_frsize
    assert 0 <= avail <= total
    # Other processes write to this filesystem meanwhile; allow them 256 MiB.
    assert abs(avail - st.f_bavail * st.f_frsize) < 256 << 20


async def test_probe_returns_latency_and_leaves_nothing(store: LocalStore, node: Path) -> None:
    latency = await store.probe()
    assert isinstance(latency, float)
    assert 0 < latency < store.timeout
    assert snapshot(node) == {}


async def test_concurrent_puts_and_gets(node: Path) -> None:
    store = LocalStore(node, timeout=20.0, max_threads=3)
    payloads = {f"slivers/{i % 7}/{i}": random.Random(i).randbytes(1000 + i) for i in range(60)}

    async with trio.open_nursery() as nursery:
        for key, data in payloads.items():
            nursery.start_soon(store.put, key, data)
    got: dict[str, bytes] = {}

    async def fetch(key: str) -> None:
        got[key] = await store.get(key)

    async with trio.open_nursery() as nursery:
        for key in payloads:
            nursery.start_soon(fetch, key)
    assert got == payloads
    assert await store.list_keys() == sorted(payloads)
    assert store.busy_threads == 0


async def test_concurrent_puts_of_one_key_leave_one_whole_value(store: LocalStore) -> None:
    values = [bytes([i]) * 50_000 for i in range(8)]
    async with trio.open_nursery() as nursery:
        for value in values:
            nursery.start_soon(store.put, "same", value)
    assert await store.get("same") in values
    assert await store.list_keys() == ["same"]


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


async def test_cleanup_temps_removes_only_stale_temps(store: LocalStore, node: Path) -> None:
    await store.put("d/k", b"keep me")
    _age(node / "d" / "k", 10_000)  # an old key is not a temp
    stale = [node / ".tmp-0001", node / "d" / ".tmp-0002"]
    fresh = node / "d" / ".tmp-0003"
    for path in [*stale, fresh]:
        path.write_bytes(b"partial")
    for path in stale:
        _age(path, 7200)
    old_dir = node / ".tmp-dir"  # a directory named like a temp is not ours to remove
    old_dir.mkdir()
    _age(old_dir, 7200)

    assert await store.cleanup_temps(older_than=3600) == 2
    assert files_in(node) == ["d/.tmp-0003", "d/k"]
    assert old_dir.is_dir()
    assert await store.cleanup_temps(older_than=0) == 1
    assert files_in(node) == ["d/k"]


async def test_cleanup_temps_of_one_key_directory(store: LocalStore, node: Path) -> None:
    (node / "a" / "b").mkdir(parents=True)
    for path in (node / ".tmp-1", node / "a" / ".tmp-2", node / "a" / "b" / ".tmp-3"):
        path.write_bytes(b"partial")
        _age(path, 7200)
    assert await store.cleanup_temps(prefix="a", recursive=False) == 1
    assert await store.cleanup_temps(prefix="nothing/here") == 0
    assert files_in(node) == [".tmp-1", "a/b/.tmp-3"]
    assert await store.cleanup_temps(prefix="", recursive=False) == 1
    assert await store.cleanup_temps(prefix="a") == 1
    assert files_in(node) == []


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.put("k", b"v"),
        lambda s: s.get("k"),
        lambda s: s.size("k"),
        lambda s: s.delete("k"),
        lambda s: s.list_keys(),
        lambda s: s.free_space(),
        lambda s: s.probe(),
        lambda s: s.cleanup_temps(),
    ],
)
async def test_missing_node_directory_is_node_down(
    tmp_path: Path, call: Callable[[LocalStore], Awaitable[object]]
) -> None:
    missing = tmp_path / "gone"
    a_file = tmp_path / "file"
    a_file.write_bytes(b"")
    for path in [missing, a_file]:
        store = LocalStore(path)
        with pytest.raises(NodeDown) as info:
            await call(store)
        assert info.value.errno == errno.ENODEV
        assert str(path) in str(info.value)
    assert not missing.exists()  # the store never creates its node directory
    assert a_file.read_bytes() == b""


async def test_node_directory_may_be_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    store = LocalStore(tmp_path / "alias")
    await store.put("k", b"via the configured symlink")
    assert (real / "k").read_bytes() == b"via the configured symlink"


async def test_a_pinned_store_refuses_another_directory_at_its_path(
    store: LocalStore, node: Path
) -> None:
    """Pinned where it read a trusted key, a store takes no call on a directory put at its
    path since (a disk swapped under a mount) until pinned there; unpinned, any will do."""
    await store.put("id", b"node A")
    data, where = await store.get_pinning("id")
    assert data == b"node A" and where == (node.stat().st_dev, node.stat().st_ino)
    store.pin(where)
    await store.put("k", b"1")
    os.rename(node, str(node) + ".a")
    node.mkdir()
    for call in (store.put("k", b"2"), store.get("k"), store.list_keys()):
        with pytest.raises(NodeDown, match="another directory is at this path now"):
            await call
    assert os.listdir(node) == []  # nothing written there
    with pytest.raises(KeyNotFound):
        await store.get_pinning("id")  # reads whatever is there, pinned or not
    os.rmdir(node)
    os.rename(str(node) + ".a", node)
    assert await store.get("k") == b"1"  # the pinned directory, back in place
    store.pin(None)
    os.rename(node, str(node) + ".a")
    node.mkdir()
    await store.put("k", b"3")  # unpinned: whatever directory is there
    assert (node / "k").read_bytes() == b"3"


def test_only_filesystems_with_stable_inode_numbers_are_pinned() -> None:
    assert files.inodes_are_stable("ext4") and files.inodes_are_stable("tmpfs")
    for fstype in ("fuse.sshfs", "nfs4", "cifs", None):
        assert not files.inodes_are_stable(fstype)
