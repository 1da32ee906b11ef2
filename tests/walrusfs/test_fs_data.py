"""File content without a mount: blocks, holes, truncation, flushing, caching, failures."""

from __future__ import annotations

import errno
import functools
import os
import random
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import blake3
import pytest
import trio

from tests.walrusfs.conftest import BS, FakeClock, fake_space
from tests.walrusfs.memblobs import MemBlobStore
from walrusfs.errors import NoSpace, errno_of
from walrusfs.filedata import COMPACT_QUIET, PACK_HEADER, READ_AHEAD_BLOCKS
from walrusfs.fs import FileSystem
from walrusfs.metadata import ROOT_INODE, Change, Metadata

R = ROOT_INODE
SIZES = [0, 1, 4095, 4096, 4097, BS - 1, BS, BS + 1, 3 * BS + 7]


async def new_file(fs: FileSystem, name: bytes = b"f", flags: int = os.O_RDWR) -> tuple[int, int]:
    fh, attrs = await fs.create(R, name, 0o644, flags, 0, 0)
    return attrs.ino, fh


async def stored_file(meta: Metadata, store: MemBlobStore, data: bytes) -> int:
    """A file of `data`, written and closed through a FileSystem of its own; its inode."""
    fs = FileSystem(meta, store)
    ino, fh = await new_file(fs)
    await fs.write(fh, 0, data)
    await fs.release(fh)
    return ino


async def read_all(fs: FileSystem, fh: int, size: int) -> bytes:
    return await fs.read(fh, 0, size + 10)


async def read_fresh(meta: Metadata, store: MemBlobStore, ino: int, size: int) -> bytes:
    """The file as a new FileSystem over the same volume reads it: from the store."""
    fs = FileSystem(meta, store)
    fh = await fs.open(ino, os.O_RDONLY, 0)
    try:
        return await read_all(fs, fh, size)
    finally:
        await fs.release(fh)


def assert_no_leaks(fs: FileSystem, store: MemBlobStore) -> None:
    """Every stored blob is named by some block, and every named blob is stored."""
    db = fs.meta._db
    named = {bytes(r[0]) for r in db.execute("SELECT blob_id FROM blobs")}
    assert named == set(store.blobs)
    counts = dict(db.execute("SELECT blob_id, COUNT(*) FROM blocks GROUP BY blob_id"))
    assert counts == dict(db.execute("SELECT blob_id, refcount FROM blobs"))


@pytest.mark.parametrize("size", SIZES)
async def test_roundtrip_sizes_and_reopen(
    size: int, fs: FileSystem, store: MemBlobStore, meta: Metadata
) -> None:
    data = random.Random(size).randbytes(size)
    ino, fh = await new_file(fs)
    for pos in range(0, size, 40_000):  # writes that straddle block boundaries
        assert await fs.write(fh, pos, data[pos : pos + 40_000]) == len(data[pos : pos + 40_000])
    await fs.flush(fh)
    assert await read_all(fs, fh, size) == data
    await fs.release(fh)
    assert meta.get_inode(ino).size == size
    # Committed at close: a fresh FileSystem reads it (a small file from its patches)...
    assert await read_fresh(meta, store, ino, size) == data
    await fs.data.flush_all()  # ...stored whole (a small file in a pack) at the latest now
    assert len(meta.block_indexes(ino)) == -(-size // BS)
    # A fresh FileSystem on the same volume reads it back from the store.
    fs2 = FileSystem(meta, store)
    fh2 = await fs2.open(ino, os.O_RDONLY, 0)
    assert await read_all(fs2, fh2, size) == data
    attrs = await fs2.getattr(ino)
    assert attrs.size == size and attrs.blocks == -(-size // 512)
    assert_no_leaks(fs, store)


@pytest.mark.parametrize("seed", [20240601, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
async def test_random_io_matches_a_plain_file(
    fs: FileSystem, store: MemBlobStore, seed: int
) -> None:
    rng = random.Random(seed)
    model = bytearray()
    ino, fh = await new_file(fs)
    limit = 6 * BS
    for step in range(400):
        op = rng.random()
        if op < 0.5:
            off = rng.randrange(0, limit)
            data = rng.randbytes(rng.choice([1, 100, 4096, BS - 3, BS, 2 * BS + 5]))
            await fs.write(fh, off, data)
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off : off + len(data)] = data
        elif op < 0.6:
            # A truncate to 0 through the file waits for its next commit: give it its share.
            size = 0 if rng.random() < 0.3 else rng.randrange(0, limit)
            await fs.setattr(ino, size=size, by_handle=rng.random() < 0.5)
            del model[size:]
            model.extend(bytes(size - len(model)))
        elif op < 0.65:
            await fs.flush(fh)
        elif op < 0.7:
            await fs.fsync(fh)  # committed as it is now: what a crash keeps
            assert await committed(fs, store, ino) == (len(model), bytes(model)), step
        else:
            off = rng.randrange(0, limit + BS)
            n = rng.randrange(0, 3 * BS)
            assert await fs.read(fh, off, n) == bytes(model[off : off + n]), step
        assert (await fs.getattr(ino)).size == len(model)
    await fs.release(fh)
    fh = await fs.open(ino, os.O_RDONLY, 0)
    assert await read_all(fs, fh, len(model)) == bytes(model)
    assert fs.meta.get_inode(ino).size == len(model)
    await fs.data.flush_all()  # a small file waits for a pack until then
    assert_no_leaks(fs, store)
    assert fs.data.dirty_bytes == 0


async def test_sparse_file_at_10_gib_stores_one_block(fs: FileSystem, store: MemBlobStore) -> None:
    ino, fh = await new_file(fs)
    far = 10 * 2**30
    await fs.write(fh, far, b"tail")
    await fs.write(fh, 5, b"head")
    await fs.flush(fh)
    await fs.data.flush_all()  # a small file's blocks: stored in a pack
    assert (await fs.getattr(ino)).size == far + 4
    assert fs.meta.block_indexes(ino) == [0, far // BS]
    assert store.puts == 1
    assert await fs.read(fh, far - 3, 10) == b"\0\0\0tail"
    assert await fs.read(fh, 5 * 2**30, 8) == bytes(8)  # a hole reads as zeros
    assert await fs.read(fh, 0, 12) == b"\0" * 5 + b"head\0\0\0"
    await fs.setattr(ino, size=far // 2)  # truncating a huge sparse file drops one block
    assert fs.meta.block_indexes(ino) == [0]
    assert store.deletes == 0 and fs.meta.blob_refcount(next(iter(store.blobs))) == 1  # the pack
    assert await fs.read(fh, 0, 12) == b"\0" * 5 + b"head\0\0\0"


async def test_truncate_down_then_up_reads_zeros(fs: FileSystem) -> None:
    ino, fh = await new_file(fs)
    await fs.write(fh, 0, b"x" * (2 * BS))
    await fs.flush(fh)
    await fs.setattr(ino, size=BS + 10)  # cuts the stored block short
    await fs.write(fh, 0, b"y")  # dirty block 0; block 1 stays stored
    await fs.setattr(ino, size=3)  # cuts the dirty block
    await fs.setattr(ino, size=2 * BS)
    assert await fs.read(fh, 0, 2 * BS) == b"yxx" + bytes(2 * BS - 3)
    await fs.flush(fh)
    assert await fs.read(fh, 0, 2 * BS) == b"yxx" + bytes(2 * BS - 3)


async def test_append_and_o_trunc(fs: FileSystem, clock: FakeClock) -> None:
    ino, fh = await new_file(fs)
    await fs.write(fh, 0, b"0123456789")
    await fs.release(fh)
    fh = await fs.open(ino, os.O_WRONLY | os.O_APPEND, 0)
    await fs.write(fh, 0, b"ab")  # the offset is ignored: appends
    await fs.write(fh, 3, b"cd")
    await fs.release(fh)
    rd = await fs.open(ino, os.O_RDONLY, 0)
    assert await fs.read(rd, 0, 100) == b"0123456789abcd"
    before = await fs.getattr(ino)
    fh = await fs.open(ino, os.O_WRONLY | os.O_TRUNC, 0)
    after = await fs.getattr(ino)
    assert after.size == 0 and after.mtime_ns > before.mtime_ns
    assert await fs.read(rd, 0, 100) == b""
    for h in (fh, rd):
        await fs.release(h)


class Commits:
    """A journal sink that records the name of each committed change."""

    promised = 0

    def __init__(self) -> None:
        self.ops: list[str] = []

    def append(self, change: Change) -> int:
        self.ops.append(change.op)
        return len(self.ops)

    def retract(self, seq: int) -> None:
        self.ops.pop()


async def test_times_set_on_a_file_being_written_are_committed_with_its_data(
    fs: FileSystem, store: MemBlobStore, meta: Metadata
) -> None:
    # The kernel (writeback cache) sets a file's times before each close that follows
    # writes, and tar, cp -p and rsync restore them before closing: not a commit each.
    commits = Commits()
    meta.attach_journal(commits)
    ino, fh = await new_file(fs)
    await fs.write(fh, 0, b"data")
    await fs.setattr(ino, mtime_ns=1_000, ctime_ns=2_000)
    await fs.setattr(ino, mtime_ns=3_000)  # ctime: now
    attrs = await fs.getattr(ino)
    assert attrs.mtime_ns == 3_000 and attrs.ctime_ns > 3_000  # seen at once
    assert commits.ops == ["create"]
    await fs.flush(fh)  # close(2)
    assert commits.ops == ["create", "patch_blocks"]
    row = meta.get_inode(ino)
    assert (row.size, row.mtime_ns, row.ctime_ns) == (4, 3_000, attrs.ctime_ns)
    assert (await FileSystem(meta, store).getattr(ino)).mtime_ns == 3_000
    # Nothing left to commit with: committed at once, as any other attribute always is.
    await fs.setattr(ino, mtime_ns=5_000)
    await fs.setattr(ino, mode=0o600)
    assert commits.ops[2:] == ["set_attrs", "set_attrs"]
    assert meta.get_inode(ino).mtime_ns == 5_000
    await fs.release(fh)
    assert await read_fresh(meta, store, ino, 4) == b"data"


async def test_times_the_kernel_stores_for_an_unlinked_file_are_not_committed(
    fs: FileSystem, meta: Metadata
) -> None:
    # rm -rf: the kernel (writeback cache) stores the times of each file it has just
    # unlinked before it forgets it. Nobody can see them: no commit. An unlinked file
    # still open keeps them as any file does (fstat shows them).
    commits = Commits()
    meta.attach_journal(commits)
    gone, fh = await new_file(fs)
    await fs.release(fh)
    kept, fh = await new_file(fs, b"g")
    await fs.unlink(R, b"f")
    await fs.unlink(R, b"g")
    before = list(commits.ops)
    attrs = await fs.setattr(gone, mtime_ns=7_000, ctime_ns=8_000)
    assert (attrs.nlink, attrs.mtime_ns, attrs.ctime_ns) == (0, 7_000, 8_000)
    assert commits.ops == before
    await fs.setattr(kept, mtime_ns=9_000, ctime_ns=10_000)
    assert commits.ops == [*before, "set_attrs"]
    assert (await fs.getattr(kept)).mtime_ns == 9_000
    await fs.forget([(gone, 1), (kept, 1)])
    await fs.release(fh)
    assert commits.ops[-2:] == ["delete_inode", "delete_inode"]


async def committed(fs: FileSystem, store: MemBlobStore, ino: int) -> tuple[int, bytes]:
    """Size and bytes of the file as its metadata has them (what a crash would keep)."""
    other = FileSystem(fs.meta, store)
    size = fs.meta.get_inode(ino).size
    fh = await other.open(ino, os.O_RDONLY, 0)
    try:
        return size, bytes(await other.read(fh, 0, size + 10))
    finally:
        await other.release(fh)


@pytest.mark.parametrize("new", [b"small", b"n" * (BS + 77)], ids=["patches", "blobs"])
async def test_a_truncate_to_zero_is_committed_with_the_new_content(
    fs: FileSystem, store: MemBlobStore, new: bytes
) -> None:
    old = random.Random(5).randbytes(2 * BS + 9)
    ino, fh = await new_file(fs)
    await fs.write(fh, 0, old)
    await fs.release(fh)  # a file of blobs: a pack does not take it
    fh = await fs.open(ino, os.O_RDWR | os.O_TRUNC, 0)
    assert (await fs.getattr(ino)).size == 0 and await fs.read(fh, 0, 10) == b""
    # Until the new content is committed, a crash finds the old one, not an empty file.
    assert await committed(fs, store, ino) == (len(old), old)
    await fs.write(fh, 3, new)  # past the end: the gap reads as zeros, not as old bytes
    want = bytes(3) + new
    assert await fs.read(fh, 0, len(want) + 10) == want
    assert await committed(fs, store, ino) == (len(old), old)
    await fs.release(fh)  # the truncate and the new bytes in one transaction
    assert await committed(fs, store, ino) == (len(want), want)
    assert store.deletes == 3  # the old blobs, once nothing names them
    assert_no_leaks(fs, store)


async def test_a_truncate_to_zero_then_up_reads_zeros_and_frees_the_old_blobs(
    fs: FileSystem, store: MemBlobStore
) -> None:
    ino, fh = await new_file(fs)
    await fs.write(fh, 0, b"x" * (2 * BS))
    await fs.flush(fh)
    await fs.setattr(ino, size=0, by_handle=True)  # ftruncate
    await fs.setattr(ino, size=BS + 5, by_handle=True)  # in memory: nothing stored is its
    assert await fs.read(fh, 0, 2 * BS) == bytes(BS + 5)
    assert (await fs.getattr(ino)).blocks == 0  # du sees a hole, not the old blocks
    assert fs.meta.get_inode(ino).size == 2 * BS
    await fs.release(fh)
    assert await committed(fs, store, ino) == (BS + 5, bytes(BS + 5))
    assert not store.blobs and fs.meta.block_indexes(ino) == []
    assert_no_leaks(fs, store)


async def test_a_truncate_by_path_is_committed_at_once_in_order(
    fs: FileSystem, store: MemBlobStore
) -> None:
    # truncate(2) names no open file, so no close of it will come: committed at once,
    # like every change made without an open file. Also when the file is open and
    # cleared (an O_TRUNC open): the cleared content is committed with it.
    ino, fh = await new_file(fs)
    await fs.write(fh, 0, b"x" * (BS + 1))
    await fs.release(fh)
    await fs.setattr(ino, size=0)
    assert await committed(fs, store, ino) == (0, b"")
    assert not store.blobs
    await fs.setattr(ino, size=10)
    fh = await fs.open(ino, os.O_RDWR | os.O_TRUNC, 0)
    await fs.write(fh, 0, b"pending")
    assert await committed(fs, store, ino) == (10, bytes(10))
    await fs.setattr(ino, size=3)
    assert await committed(fs, store, ino) == (3, b"pen")
    await fs.release(fh)
    assert_no_leaks(fs, store)


async def test_identical_blocks_share_one_blob(fs: FileSystem, store: MemBlobStore) -> None:
    data = random.Random(1).randbytes(2 * BS)
    inos = []
    for name in (b"a", b"b"):
        ino, fh = await new_file(fs, name)
        await fs.write(fh, 0, data)
        await fs.release(fh)
        inos.append(ino)
    assert len(store.blobs) == 2 and fs.meta.blob_count() == 2
    await fs.unlink(R, b"a")
    await fs.forget([(inos[0], 1)])
    assert store.deletes == 0 and len(store.blobs) == 2
    await fs.unlink(R, b"b")
    await fs.forget([(inos[1], 1)])
    assert store.deletes == 2 and not store.blobs and fs.meta.blob_count() == 0


async def test_zero_blocks_become_holes(fs: FileSystem, store: MemBlobStore) -> None:
    ino, fh = await new_file(fs)
    await fs.write(fh, 0, bytes(3 * BS))
    await fs.write(fh, 3 * BS, b"end")
    await fs.release(fh)
    assert fs.meta.block_indexes(ino) == [3] and store.puts == 1
    rd = await fs.open(ino, os.O_RDONLY, 0)
    assert await fs.read(rd, BS, 4) == bytes(4)
    await fs.release(rd)


async def test_overwrite_frees_the_old_blob(fs: FileSystem, store: MemBlobStore) -> None:
    _ino, fh = await new_file(fs)
    await fs.write(fh, 0, b"a" * BS)
    await fs.flush(fh)
    await fs.write(fh, 10, b"b")  # read-modify-write of the stored block
    await fs.flush(fh)
    assert store.deletes == 1 and len(store.blobs) == 1
    assert await fs.read(fh, 8, 4) == b"aaba"
    await fs.release(fh)
    assert_no_leaks(fs, store)


async def test_failed_flush_keeps_data_and_retries(fs: FileSystem, store: MemBlobStore) -> None:
    ino, fh = await new_file(fs)
    await fs.write(fh, 0, b"precious" * 5000)  # not small: stored at close
    store.fail_puts = True
    with pytest.raises(Exception) as info:
        await fs.flush(fh)
    assert errno_of(info.value) == errno.EIO
    assert await fs.read(fh, 0, 8) == b"precious"  # still served from memory
    assert fs.meta.get_inode(ino).size == 0 and (await fs.getattr(ino)).size == 40_000
    store.fail_puts = False
    await fs.flush(fh)
    assert fs.meta.get_inode(ino).size == 40_000 and fs.data.dirty_bytes == 0
    await fs.release(fh)


async def test_blocks_stored_for_a_commit_that_failed_are_deleted(
    fs: FileSystem, store: MemBlobStore
) -> None:
    """Two blocks stored at once, one put fails (nodes full): the other's blob, named by
    nothing, used to stay on the nodes until a scrub, a day later."""
    _ino, fh = await new_file(fs)
    await fs.write(fh, 0, b"a" * BS + b"b" * BS)
    store.fail_prefix = b"b"
    with pytest.raises(Exception) as info:
        await fs.flush(fh)
    assert errno_of(info.value) == errno.EIO and len(store.blobs) == 1
    store.fail_prefix = None
    await fs.write(fh, 0, b"x" * 2 * BS)  # rewritten before it was ever stored
    await fs.flush(fh)
    await fs.data.flush_all()  # and the deletes' round
    assert [b[:1] for b in store.blobs.values()] == [b"x"] and store.deletes == 1
    await fs.release(fh)

    # One named again by the next commit is kept.
    _ino, fh = await new_file(fs, b"g")
    await fs.write(fh, 0, b"c" * BS + b"d" * BS)
    store.fail_prefix = b"d"
    with pytest.raises(Exception) as info:
        await fs.flush(fh)
    assert errno_of(info.value) == errno.EIO
    store.fail_prefix = None
    await fs.flush(fh)
    await fs.data.flush_all()
    assert sorted(b[:1] for b in store.blobs.values()) == [b"c", b"d", b"x"]
    assert await read_all(fs, fh, 2 * BS) == b"c" * BS + b"d" * BS
    await fs.release(fh)
    assert_no_leaks(fs, store)


async def test_unreadable_blob_is_eio(fs: FileSystem, store: MemBlobStore, meta: Metadata) -> None:
    ino, fh = await new_file(fs)
    await fs.write(fh, 0, b"z" * 100)
    await fs.release(fh)
    await fs.data.flush_all()  # in a pack, no longer in the metadata
    fresh = FileSystem(meta, store)  # nothing cached
    store.fail_gets = True
    fh = await fresh.open(ino, os.O_RDONLY, 0)
    with pytest.raises(Exception) as info:
        await fresh.read(fh, 0, 10)
    assert errno_of(info.value) == errno.EIO
    store.fail_gets = False
    assert await fresh.read(fh, 0, 3) == b"zzz"


@asynccontextmanager
async def read_afresh(
    meta: Metadata, store: MemBlobStore, data: bytes, cache_bytes: int
) -> AsyncIterator[tuple[FileSystem, int, int]]:
    """`data` stored as a file, open read-only in a new FileSystem (nothing cached) whose
    background (read-ahead) runs: (that FileSystem, the inode, the handle)."""
    ino = await stored_file(meta, store, data)
    fresh = FileSystem(meta, store, cache_bytes=cache_bytes)
    async with trio.open_nursery() as nursery:
        await nursery.start(fresh.run_background)
        yield fresh, ino, await fresh.open(ino, os.O_RDONLY, 0)
        nursery.cancel_scope.cancel()


async def read_settled(fs: FileSystem, fh: int, data: bytes, offset: int, n: int) -> None:
    """Read and check `n` bytes at `offset`, then let the read-ahead it started land."""
    assert await fs.read(fh, offset, n) == data[offset : offset + n]
    await trio.testing.wait_all_tasks_blocked()


async def test_read_cache_and_read_ahead(meta: Metadata, store: MemBlobStore) -> None:
    ahead = READ_AHEAD_BLOCKS
    blocks = ahead + 3
    data = random.Random(7).randbytes(blocks * BS)
    async with read_afresh(meta, store, data, 2 * blocks * BS) as (fresh, _ino, fh):
        gets = store.gets
        await read_settled(fresh, fh, data, 0, 4096)
        assert store.gets == gets + 1  # block 0: 4096 bytes read do not call for more yet
        await read_settled(fresh, fh, data, 4096, BS)
        assert store.gets == gets + 6  # block 1, and ahead of the reader 4x what it read
        assert await fresh.read(fh, 0, 10) == data[:10]  # cached
        assert store.gets == gets + 6  # nothing fetched twice
        await read_settled(fresh, fh, data, 4096 + BS, blocks * BS)
        assert store.gets == gets + blocks  # each block once, none beyond the end


async def test_read_ahead_grows_as_the_reader_proves_sequential(
    meta: Metadata, store: MemBlobStore
) -> None:
    """`head -c 100` of a big file fetched 7 blocks for its 100 bytes; a reader going on
    gets the full read-ahead after its first block."""
    blocks = 12
    data = random.Random(11).randbytes(blocks * BS)
    async with read_afresh(meta, store, data, 4 * blocks * BS) as (fresh, ino, fh):
        gets = store.gets
        await read_settled(fresh, fh, data, 0, 100)
        assert store.gets == gets + 1  # its own block only
        await fresh.release(fh)
        fh = await fresh.open(ino, os.O_RDONLY, 0)
        await read_settled(fresh, fh, data, 0, BS)  # block 0, cached
        assert store.gets == gets + 1 + 4  # 4 blocks ahead: 4x the block it has read
        await read_settled(fresh, fh, data, BS, BS)
        assert store.gets == gets + 2 + READ_AHEAD_BLOCKS  # up to block 7: the full window
        await fresh.release(fh)


async def read_sequentially(fs: FileSystem, ino: int, size: int, request: int) -> bytes:
    """Read a file as `cat` does, a request at a time, with the flusher (read-ahead) on."""
    out = bytearray()
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run_background)
        fh = await fs.open(ino, os.O_RDONLY, 0)
        while len(out) < size:
            out += await fs.read(fh, len(out), request)
            await trio.testing.wait_all_tasks_blocked()  # read-ahead lands before the next
        await fs.release(fh)
        nursery.cancel_scope.cancel()
    return bytes(out)


async def test_read_ahead_stays_within_the_cache(meta: Metadata, store: MemBlobStore) -> None:
    """Blocks read ahead must not push out those the reader has yet to read: with a cache
    of 4 blocks, 6 blocks ahead had every block fetched twice."""
    blocks = 12
    data = random.Random(8).randbytes(blocks * BS)
    ino = await stored_file(meta, store, data)
    gets = store.gets
    fresh = FileSystem(meta, store, cache_bytes=4 * BS)
    assert await read_sequentially(fresh, ino, len(data), 4096) == data
    assert store.gets - gets == blocks  # each block once


async def test_a_block_too_big_to_cache_whole_is_read_in_windows_once(
    meta: Metadata, store: MemBlobStore
) -> None:
    """A volume of big blobs (e.g. --blob-size 128M, with a 64 MiB cache): each read used
    to fetch the whole blob again, as it did not fit in the cache."""
    blocks = 3
    data = random.Random(9).randbytes(blocks * BS - 1000)  # the last block short
    ino = await stored_file(meta, store, data)
    got = len(store.got)
    cache = 2 * BS  # a block is more than a quarter of it: windows of 8 KiB
    fresh = FileSystem(meta, store, cache_bytes=cache)
    assert await read_sequentially(fresh, ino, len(data), 4096) == data
    ranges = store.got[got:]
    assert sum(n for _, n in ranges) == len(data)  # every byte fetched once
    assert {n for _, n in ranges[:-1]} == {cache // 16}  # in whole windows
    assert all(offset % store.unit == 0 for offset, _ in ranges)  # of whole symbols

    # A read in the middle, not sequential, from a cold cache: one window, not the block.
    cold = FileSystem(meta, store, cache_bytes=cache)
    got = len(store.got)
    fh = await cold.open(ino, os.O_RDONLY, 0)
    assert await cold.read(fh, BS + 20000, 100) == data[BS + 20000 : BS + 20100]
    assert store.got[got:] == [(16384, 8192)]  # the window of block 1 holding 20000
    store.fail_gets = True
    with pytest.raises(Exception) as info:
        await cold.read(fh, 2 * BS, 100)
    assert errno_of(info.value) == errno.EIO
    await cold.release(fh)


async def test_a_reader_that_jumps_about_fetches_the_symbols_it_reads_not_blocks(
    meta: Metadata, store: MemBlobStore
) -> None:
    """A database or VM image read at random offsets: each small read used to fetch its
    whole block (a 4 MiB blob for 4 KiB). Now it fetches the window of whole symbols
    around it; a sequential reader still gets whole blocks, and what is cached serves
    both."""
    blocks = 4
    data = random.Random(10).randbytes(blocks * BS)
    ino = await stored_file(meta, store, data)
    cache = 16 * 16384  # windows of 16 KiB: 4 symbols of the store's 4 KiB
    cold = FileSystem(meta, store, cache_bytes=cache)
    fh = await cold.open(ino, os.O_RDONLY, 0)
    got = len(store.got)
    at = 2 * BS + 40000  # not where a sequential reader of this handle would read
    assert await cold.read(fh, at, 100) == data[at : at + 100]
    assert store.got[got:] == [(32768, 16384)]  # the window of block 2 holding 40000
    assert await cold.read(fh, at + 3000, 100) == data[at + 3000 : at + 3100]
    assert len(store.got) == got + 1  # the same window, cached
    # Across a window's end: both windows, and nothing else.
    assert await cold.read(fh, BS + 16000, 1000) == data[BS + 16000 : BS + 17000]
    assert store.got[got + 1 :] == [(0, 16384), (16384, 16384)]
    # The next read goes on where that one ended: sequential, so whole blocks again.
    got = len(store.got)
    assert await cold.read(fh, BS + 17000, 100) == data[BS + 17000 : BS + 17100]
    assert store.got[got] == (0, BS)
    # A read bigger than a window (an mmap fault's read-around): the whole block.
    got = len(store.got)
    assert await cold.read(fh, 3 * BS + 100, BS // 2) == data[3 * BS + 100 : 3 * BS + 100 + BS // 2]
    assert store.got[got:] == [(0, BS)]
    # A block cached whole serves a jump into it without a fetch.
    got = len(store.got)
    assert await cold.read(fh, 3 * BS + 5, 10) == data[3 * BS + 5 : 3 * BS + 15]
    assert len(store.got) == got
    store.fail_gets = True
    with pytest.raises(Exception) as info:
        await cold.read(fh, 100, 100)
    assert errno_of(info.value) == errno.EIO
    await cold.release(fh)


async def test_dirty_memory_is_bounded(meta: Metadata, store: MemBlobStore) -> None:
    fs = FileSystem(meta, store, dirty_limit=4 * BS)
    ino, fh = await new_file(fs)
    peak = 0
    data = random.Random(3).randbytes(40 * BS)
    for pos in range(0, len(data), 16384):
        await fs.write(fh, pos, data[pos : pos + 16384])
        peak = max(peak, fs.data.dirty_bytes)
    assert peak <= 4 * BS + 16384
    assert store.puts >= 36  # written out along the way, whole blocks only
    await fs.release(fh)
    assert store.puts == 40  # no partial block was stored twice
    assert fs.meta.get_inode(ino).size == len(data)


async def test_sequential_writer_has_completed_blocks_stored_at_once(
    fs: FileSystem, store: MemBlobStore
) -> None:
    data = random.Random(5).randbytes(3 * BS + 10)
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run_background)
        ino, fh = await new_file(fs)
        for pos in range(0, len(data), 16384):
            await fs.write(fh, pos, data[pos : pos + 16384])
        await trio.testing.wait_all_tasks_blocked()
        # Written behind the writer, and committed: not waiting for close or the limit.
        assert store.puts == 3 and fs.meta.block_indexes(ino) == [0, 1, 2]
        assert fs.meta.get_inode(ino).size == 3 * BS  # never more than is stored
        assert await fs.read(fh, 0, len(data) + 1) == data
        await fs.release(fh)  # the 10 bytes left are small: committed, stored in a pack
        assert store.puts == 3 and fs.meta.get_inode(ino).size == len(data)
        await fs.data.flush_all()
        assert store.puts == 4 and fs.meta.block_indexes(ino) == [0, 1, 2, 3]
        nursery.cancel_scope.cancel()


async def test_blocks_rewritten_in_place_or_with_gaps_wait_for_flush(
    fs: FileSystem, store: MemBlobStore
) -> None:
    ino, fh = await new_file(fs)
    await fs.write(fh, 0, b"a" * (2 * BS))
    await fs.release(fh)
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run_background)
        fh = await fs.open(ino, os.O_RDWR, 0)
        puts = store.puts
        await fs.write(fh, 100, b"b" * 4096)  # a database page inside a stored block
        await fs.write(fh, 3 * BS - 10, b"c" * 10)  # ends a new block, after a gap
        await trio.testing.wait_all_tasks_blocked()
        assert store.puts == puts  # each would cost a whole block per small write
        await fs.release(fh)
        assert store.puts == puts + 2
        expect = b"a" * 100 + b"b" * 4096 + b"a" * (2 * BS - 4196) + bytes(BS - 10) + b"c" * 10
        fh = await fs.open(ino, os.O_RDONLY, 0)
        assert await fs.read(fh, 0, 3 * BS) == expect
        nursery.cancel_scope.cancel()


async def test_background_flusher_writes_old_dirty_data(
    fs: FileSystem, store: MemBlobStore, autojump_clock: object
) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run_background)
        ino, fh = await new_file(fs)
        await fs.write(fh, 0, b"later")
        await trio.sleep(1)
        assert store.puts == 0  # young dirty data waits
        await trio.sleep(10)
        assert store.puts == 1 and fs.meta.get_inode(ino).size == 5
        assert fs.data.live(ino) is None  # clean: attributes come from the row again
        nursery.cancel_scope.cancel()


async def small_files(
    fs: FileSystem, count: int, seed: int = 1, most: int = BS // 4
) -> dict[int, bytes]:
    """`count` new files of 1 byte to `most` (small: BS // 4 at most), written and closed."""
    rng = random.Random(seed)
    files = {}
    for i in range(count):
        data = rng.randbytes(rng.randint(1, most))
        ino, fh = await new_file(fs, b"small%d" % i)
        await fs.write(fh, 0, data)
        await fs.release(fh)
        files[ino] = data
    return files


async def test_small_files_are_committed_at_close_and_stored_together(
    fs: FileSystem, store: MemBlobStore, meta: Metadata, autojump_clock: object
) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run_background)
        files = await small_files(fs, 12)
        assert store.puts == 0  # committed as patches: no blob per file
        for ino, data in files.items():  # all there for a mount that starts afresh
            assert await read_fresh(meta, store, ino, len(data)) == data
            assert (await FileSystem(meta, store).getattr(ino)).blocks == -(-len(data) // 512)
        await trio.sleep(10)  # the flusher stores them: a few packs of up to a block
        total = sum(map(len, files.values()))
        assert -(-total // BS) <= store.puts <= 2 * -(-total // BS) < len(files)
        assert all(len(blob) <= BS for blob in store.blobs.values())
        assert store.durable_puts == store.puts  # they replace patches fsync may have made
        starts = {(meta.block(ino, 0).blob_id, meta.block(ino, 0).start) for ino in files}
        assert len(starts) == len(files) and not meta.patched_blocks()
        for ino, data in files.items():
            assert await read_fresh(meta, store, ino, len(data)) == data
        assert_no_leaks(fs, store)
        nursery.cancel_scope.cancel()


async def test_a_pack_lives_while_any_of_its_files_does(
    fs: FileSystem, store: MemBlobStore, meta: Metadata
) -> None:
    files = await small_files(fs, 3, seed=2)
    await fs.data.flush_all()
    assert store.puts == 1
    (pack,) = store.blobs
    first, *rest = files
    # Rewritten in part: stored again (in a pack of its own), the old pack still named.
    fh = await fs.open(first, os.O_RDWR, 0)
    await fs.write(fh, 0, b"new")
    await fs.release(fh)
    await fs.data.flush_all()
    expect = b"new" + files[first][3:]
    assert await read_fresh(meta, store, first, len(expect)) == expect
    assert meta.blob_refcount(pack) == len(rest) and store.deletes == 0
    for i, ino in enumerate(rest):
        await fs.unlink(R, b"small%d" % (i + 1))
        await fs.forget([(ino, 1)])  # the kernel lets go: the file is gone
        assert (pack in store.blobs) == (ino != rest[-1])
    assert_no_leaks(fs, store)


async def test_unmount_waits_for_a_close_in_progress_and_packs_its_file(
    fs: FileSystem, store: MemBlobStore, meta: Metadata
) -> None:
    files = await small_files(fs, 3, seed=3)
    busy = fs.data._files[next(iter(files))].flush_lock  # as a late release(2) holds it
    await busy.acquire()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.data.flush_all)
        await trio.sleep(0.01)
        assert store.puts == 0  # waiting for the close, not storing that file alone
        busy.release()
    assert store.puts == 1 and not meta.patched_blocks()
    for ino, data in files.items():
        assert await read_fresh(meta, store, ino, len(data)) == data


async def test_a_close_waits_only_for_the_pack_its_file_is_in(
    fs: FileSystem, store: MemBlobStore, meta: Metadata
) -> None:
    files = await small_files(fs, 12, seed=9)  # more than a block: packs of a few files
    assert sum(map(len, files.values())) > BS
    first, last = min(files), max(files)  # packed first and last
    store.put_gate = trio.Event()
    closed: list[int] = []

    async def close_one(ino: int) -> None:
        fh = await fs.open(ino, os.O_RDWR, 0)  # a writer's: a reader's close waits for nothing
        await fs.release(fh)
        closed.append(ino)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.data.flush_all)
        await trio.testing.wait_all_tasks_blocked()
        assert store.puts_waiting == 1  # the first pack, not yet acknowledged
        nursery.start_soon(close_one, first)
        nursery.start_soon(close_one, last)
        await trio.testing.wait_all_tasks_blocked()
        assert closed == [last]  # the file being packed waits; a later one does not
        store.put_gate.set()
    assert closed == [last, first] and store.puts >= 2 and not meta.patched_blocks()
    for ino, data in files.items():
        assert await read_fresh(meta, store, ino, len(data)) == data


async def test_one_file_of_a_pack_is_read_alone_and_a_second_reads_the_pack(
    fs: FileSystem, store: MemBlobStore, meta: Metadata
) -> None:
    files = await small_files(fs, 6, seed=4)
    await fs.data.flush_all()
    (content,) = store.blobs.values()
    reader = FileSystem(meta, store)  # nothing cached
    inos = list(files)
    for k, ino in enumerate(inos):
        fh = await reader.open(ino, os.O_RDONLY, 0)
        assert await reader.read(fh, 0, BS) == files[ino]
        await reader.release(fh)
        if k == 0:  # a cat of one file reads that file's bytes only
            assert store.got == [(meta.block(ino, 0).start, len(files[ino]))]
    # The second file's read takes the whole pack, and the rest come from the cache.
    assert store.got[1:] == [(0, len(content))] and store.gets == 2


async def test_a_blob_replacing_patches_is_stored_durably(
    fs: FileSystem, store: MemBlobStore, meta: Metadata
) -> None:
    ino, fh = await new_file(fs)
    await fs.write(fh, 0, b"d" * (2 * BS))
    await fs.release(fh)  # close(): on a quorum of nodes, not yet on their disks
    assert store.puts == 2 and store.durable_puts == 0
    fh = await fs.open(ino, os.O_RDWR, 0)
    await fs.write(fh, BS + 5, b"page")
    await fs.fsync(fh)  # a patch, durable
    await fs.release(fh)
    await fs.data.flush_all()  # the patched block, stored whole: as safe as its patch
    assert store.puts == 3 and store.durable_puts == 1 and not meta.patched_blocks()
    assert await read_fresh(meta, store, ino, 2 * BS) == b"d" * (BS + 5) + b"page" + b"d" * (BS - 9)


async def test_a_pack_that_fails_keeps_its_files_in_memory(
    fs: FileSystem, store: MemBlobStore, meta: Metadata
) -> None:
    files = await small_files(fs, 4, seed=3)
    store.fail_puts = True
    await fs.data.flush_all()  # no error: their bytes are committed, as patches
    assert fs.data.dirty_bytes > 0 and meta.patched_blocks()
    store.fail_puts = False
    for ino, data in files.items():
        assert await read_fresh(meta, store, ino, len(data)) == data  # committed still
    await fs.data.flush_all()
    assert store.puts == 1 and fs.data.dirty_bytes == 0 and not meta.patched_blocks()
    for ino, data in files.items():
        assert await read_fresh(meta, store, ino, len(data)) == data
    assert_no_leaks(fs, store)


async def test_closing_a_reader_does_not_fail_on_data_a_writer_cannot_store(
    fs: FileSystem, store: MemBlobStore
) -> None:
    # Too many nodes full: the writer's close fails, the data stays in memory and reads
    # back. A reader's close reports nothing: cat of that file must exit 0.
    ino, wfh = await new_file(fs)
    data = os.urandom(3 * BS)
    await fs.write(wfh, 0, data)
    store.fail_puts = True
    with pytest.raises(Exception) as info:
        await fs.flush(wfh)
    assert errno_of(info.value) == errno.EIO
    rfh = await fs.open(ino, os.O_RDONLY, 0)
    assert await read_all(fs, rfh, len(data)) == data
    await fs.flush(rfh)
    await fs.release(rfh)
    store.fail_puts = False
    await fs.flush(wfh)  # the writer's close stores it once the nodes take it again
    assert fs.data.dirty_bytes == 0
    await fs.release(wfh)


async def test_a_readers_close_commits_metadata_as_far_as_the_nodes_take_it(
    meta: Metadata, store: MemBlobStore
) -> None:
    commits: list[bool] = []
    failing = False

    async def commit(durable: bool) -> None:
        commits.append(durable)
        if failing:
            raise NoSpace("journal: too many nodes full")

    fs = FileSystem(meta, store, space=fake_space, commit=commit)
    ino, wfh = await new_file(fs)
    await fs.release(wfh)
    rfh = await fs.open(ino, os.O_RDONLY, 0)
    await fs.setattr(ino, mode=0o600)  # fchmod through the reader: its close commits it
    commits.clear()
    await fs.flush(rfh)
    assert commits == [False]
    failing = True
    await fs.flush(rfh)  # not the reader's failure to report
    wfh = await fs.open(ino, os.O_WRONLY, 0)
    with pytest.raises(NoSpace):
        await fs.flush(wfh)  # a writer's close says it
    await fs.release(wfh)
    await fs.release(rfh)


async def delete_small(fs: FileSystem, files: dict[int, bytes], ino: int) -> None:
    """Delete a file `small_files` made, for good (the kernel lets go of it too)."""
    await fs.unlink(R, b"small%d" % list(files).index(ino))
    await fs.forget([(ino, 1)])


async def one_pack(
    fs: FileSystem, store: MemBlobStore, count: int, seed: int
) -> tuple[dict[int, bytes], bytes]:
    """`small_files` (an eighth of a block at most each), stored: in one pack."""
    files = await small_files(fs, count, seed=seed, most=BS // 8)
    await fs.data.flush_all()
    (pack,) = store.blobs
    return files, pack


def live_fraction(store: MemBlobStore, pack: bytes, files: dict[int, bytes]) -> float:
    return sum(map(len, files.values())) / len(store.blobs[pack])


async def test_a_pack_mostly_deleted_is_rewritten_and_freed(
    fs: FileSystem, store: MemBlobStore, meta: Metadata
) -> None:
    files, pack = await one_pack(fs, store, 8, seed=5)
    inos = list(files)
    await delete_small(fs, files, inos[0])
    assert await fs.data.compact_packs(quiet_for=0) == 0  # mostly live: left as it is
    for ino in inos[1:6]:
        await delete_small(fs, files, ino)
    kept = {ino: files[ino] for ino in inos[6:]}
    assert live_fraction(store, pack, kept) < 0.5
    attrs = {ino: await fs.getattr(ino) for ino in kept}
    assert await fs.data.compact_packs(quiet_for=0) == len(kept)
    # A new pack holds what lives; the old one is gone from the nodes.
    assert pack not in store.blobs and store.puts == 2 and store.durable_puts == 2
    (new,) = store.blobs
    assert len(store.blobs[new]) == len(PACK_HEADER) + sum(map(len, kept.values()))
    for ino, data in kept.items():
        assert await read_fresh(meta, store, ino, len(data)) == data
        assert await fs.getattr(ino) == attrs[ino]  # moving bytes is not a change
    assert fs.data.dirty_bytes == 0 and not meta.patched_blocks()
    assert await fs.data.compact_packs(quiet_for=0) == 0
    assert_no_leaks(fs, store)


async def test_files_cut_short_in_a_pack_thin_it_too(
    fs: FileSystem, store: MemBlobStore, meta: Metadata
) -> None:
    files, pack = await one_pack(fs, store, 4, seed=8)
    for ino in files:
        await fs.setattr(ino, size=1)  # the rest of each file's bytes are dead
    assert await fs.data.compact_packs(quiet_for=0) == len(files)
    assert pack not in store.blobs
    for ino, data in files.items():
        assert await read_fresh(meta, store, ino, BS) == data[:1]
    assert_no_leaks(fs, store)


async def test_a_block_being_rewritten_stays_and_frees_the_pack_when_stored(
    fs: FileSystem, store: MemBlobStore, meta: Metadata
) -> None:
    files, pack = await one_pack(fs, store, 6, seed=7)
    inos = list(files)
    for ino in inos[:4]:
        await delete_small(fs, files, ino)
    busy, idle = inos[4:]
    assert live_fraction(store, pack, {busy: files[busy], idle: files[idle]}) < 0.5
    fh = await fs.open(busy, os.O_RDWR, 0)
    await fs.write(fh, 0, b"new")  # dirty: its bytes are its writer's to store
    assert await fs.data.compact_packs(quiet_for=0) == 1
    assert meta.blob_refcount(pack) == 1  # the busy file still names it
    await fs.release(fh)
    await fs.data.flush_all()
    assert pack not in store.blobs
    assert await read_fresh(meta, store, busy, BS) == b"new" + files[busy][3:]
    assert await read_fresh(meta, store, idle, BS) == files[idle]
    assert_no_leaks(fs, store)


async def test_packs_thinned_before_a_mount_are_compacted_by_its_flusher(
    fs: FileSystem, store: MemBlobStore, meta: Metadata, autojump_clock: object
) -> None:
    files, pack = await one_pack(fs, store, 8, seed=5)
    first, *rest = files
    assert meta.block(first, 0).start > 0  # no block of a pack starts at 0, not even its first
    for ino in rest:
        await delete_small(fs, files, ino)
    kept = {first: files[first]}
    again = Metadata(meta.path)  # the next mount: it has not seen those files go
    try:
        mount = FileSystem(again, store, space=fake_space)
        assert await mount.data.compact_packs(quiet_for=0) == 0
        async with trio.open_nursery() as nursery:
            await nursery.start(mount.run_background)
            await trio.sleep(COMPACT_QUIET - 1)
            assert pack in store.blobs  # it might be losing more blocks: left a while
            await trio.sleep(3)
            assert pack not in store.blobs
            nursery.cancel_scope.cancel()
        for ino, data in kept.items():
            assert await read_fresh(again, store, ino, len(data)) == data
        assert_no_leaks(mount, store)
    finally:
        again.close()


async def overwrite(fs: FileSystem, fh: int, byte: int) -> None:
    """A whole block of `byte` at 0, stored: frees the blob it replaces, if any."""
    await fs.write(fh, 0, bytes([byte]) * BS)
    await fs.flush(fh)


async def test_a_freed_blob_is_deleted_only_after_a_settle(
    fs: FileSystem, store: MemBlobStore
) -> None:
    """A blob goes once the change that freed it is on stable storage on the nodes: a
    power loss must not bring back a state that names a deleted blob."""
    _ino, fh = await new_file(fs)
    await overwrite(fs, fh, 1)
    store.events.clear()
    await overwrite(fs, fh, 2)
    assert store.events == ["settle", "delete"] and len(store.blobs) == 1
    await fs.release(fh)


async def test_blobs_freed_while_the_flusher_runs_go_in_rounds(
    fs: FileSystem, store: MemBlobStore, autojump_clock: object
) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run_background)
        fhs = []
        for k in range(4):
            _ino, fh = await new_file(fs, b"f%d" % k)
            await overwrite(fs, fh, k + 1)
            fhs.append(fh)
        store.events.clear()
        for k, fh in enumerate(fhs):
            await overwrite(fs, fh, k + 10)
        await trio.sleep(5)
        # The first free starts a round at once; the others wait for the next one: a
        # tree being rewritten costs a flush of the nodes a second, not one per file.
        assert store.events == ["settle", "delete", "settle"] + ["delete"] * 3
        await overwrite(fs, fhs[3], 20)
        await trio.testing.wait_all_tasks_blocked()  # its round is done: the next waits
        assert store.events[-2:] == ["settle", "delete"]
        store.events.clear()
        # A blob freed and named again before its round stays.
        await overwrite(fs, fhs[0], 21)  # frees blob 10...
        await overwrite(fs, fhs[1], 10)  # ...which file 1 names again, freeing blob 11
        assert fs.data.deletes_pending == 2 and store.events == []
        await trio.sleep(5)
        assert store.events == ["settle", "delete"]
        assert blake3.blake3(bytes([10]) * BS).digest() in store.blobs
        for fh in fhs:
            await fs.release(fh)
        nursery.cancel_scope.cancel()
    assert_no_leaks(fs, store)


async def test_deletes_that_could_not_settle_are_tried_again(
    fs: FileSystem, store: MemBlobStore, autojump_clock: object
) -> None:
    _ino, fh = await new_file(fs)
    await overwrite(fs, fh, 1)
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run_background)
        store.fail_settles = True  # more than f nodes away: no flush reaches a quorum
        await overwrite(fs, fh, 2)
        await trio.sleep(5)
        assert store.deletes == 0 and fs.data.deletes_pending == 1
        store.fail_settles = False  # back: the queued delete goes without a new free
        await trio.sleep(5)
        assert store.deletes == 1 and fs.data.deletes_pending == 0
        nursery.cancel_scope.cancel()
    await fs.release(fh)
    assert_no_leaks(fs, store)


async def test_blobs_still_queued_at_unmount_are_deleted(
    fs: FileSystem, store: MemBlobStore
) -> None:
    _ino, fh = await new_file(fs)
    await overwrite(fs, fh, 1)
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run_background)
        store.delete_gate = trio.Event()
        await overwrite(fs, fh, 2)
        await trio.testing.wait_all_tasks_blocked()
        assert store.events[-1] == "settle" and store.deletes == 0  # deleting, held
        nursery.cancel_scope.cancel()  # the kernel is gone: the background stops
    store.delete_gate = None
    await fs.release(fh)
    await fs.shutdown()
    assert store.deletes == 1
    assert_no_leaks(fs, store)


async def test_put_racing_a_delete_of_the_same_blob(fs: FileSystem, store: MemBlobStore) -> None:
    content = b"shared" * 3000  # not small: a blob of its own at close
    a, fa = await new_file(fs, b"a")
    await fs.write(fa, 0, content)
    await fs.flush(fa)  # blob X is stored, named by a
    b, fb = await new_file(fs, b"b")
    await fs.write(fb, 0, content)
    store.put_gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.flush, fb)  # stores X again, not yet acknowledged
        await trio.testing.wait_all_tasks_blocked()
        assert store.puts_waiting == 1
        await fs.setattr(a, size=0)  # drops the last name of X: X is deleted
        assert store.deletes == 1 and not store.blobs
        store.put_gate.set()  # the put now returns X, whose slivers are gone...
        store.put_gate = None
    # ...so the flush put it again before naming it.
    assert len(store.blobs) == 1
    rd = FileSystem(fs.meta, store)
    fh = await rd.open(b, os.O_RDONLY, 0)
    assert await rd.read(fh, 0, len(content)) == content
    assert_no_leaks(fs, store)


async def test_delete_racing_a_put_of_the_same_blob(fs: FileSystem, store: MemBlobStore) -> None:
    content = b"again" * 4000  # not small: a blob of its own at close
    a, fa = await new_file(fs, b"a")
    await fs.write(fa, 0, content)
    await fs.flush(fa)
    _b, fb = await new_file(fs, b"b")
    await fs.write(fb, 0, content)
    store.delete_gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(fs.setattr, a, size=0))  # delete of X is held
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(fs.flush, fb)  # puts X while its delete is under way
        await trio.testing.wait_all_tasks_blocked()
        store.delete_gate.set()
    assert len(store.blobs) == 1 and store.puts == 3  # put again after the delete
    assert_no_leaks(fs, store)


async def test_blob_named_by_a_flush_under_way_is_not_deleted(
    fs: FileSystem, store: MemBlobStore
) -> None:
    shared = b"S" * BS
    a, fa = await new_file(fs, b"a")
    await fs.write(fa, 0, shared)
    await fs.flush(fa)  # blob X named by a
    _b, fb = await new_file(fs, b"b")
    await fs.write(fb, 0, shared)  # block 0: X again, stored at once
    await fs.write(fb, BS, b"slow" * 10)  # block 1: its put is held
    store.put_gate, store.gate_prefix = trio.Event(), b"slow"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.flush, fb)
        await trio.testing.wait_all_tasks_blocked()
        assert store.puts_waiting == 1  # X is back from the store, not yet committed
        await fs.setattr(a, size=0)  # the last committed name of X goes
        assert store.deletes == 0  # ...but b's flush is about to name it
        store.put_gate.set()
    assert fs.meta.blob_refcount(blake3.blake3(shared).digest()) == 1
    assert_no_leaks(fs, store)


async def test_shutdown_flushes_and_removes_orphans(meta: Metadata, store: MemBlobStore) -> None:
    fs = FileSystem(meta, store, space=fake_space)
    keep, fk = await new_file(fs, b"keep")
    _gone, fg = await new_file(fs, b"gone")
    await fs.write(fk, 0, b"k" * 10)
    await fs.write(fg, 0, b"g" * 10)
    await fs.flush(fg)
    await fs.unlink(R, b"gone")  # still open and looked up when the kernel goes away
    await fs.shutdown()
    assert meta.get_inode(keep).size == 10 and meta.orphans() == []
    assert list(store.blobs.values()) == [b"k" * 10]


async def test_orphans_of_an_unclean_stop_are_removed_at_start(
    meta: Metadata, store: MemBlobStore, autojump_clock: object
) -> None:
    fs = FileSystem(meta, store)
    ino, fh = await new_file(fs)
    await fs.write(fh, 0, b"o" * 10)
    await fs.flush(fh)
    await fs.unlink(R, b"f")  # ...and the process dies here
    assert meta.orphans() == [ino]
    fs2 = FileSystem(meta, store)
    async with trio.open_nursery() as nursery:
        await nursery.start(fs2.run_background)
        assert meta.orphans() == [] and not store.blobs
        nursery.cancel_scope.cancel()


async def test_special_file_handles_refuse_data(fs: FileSystem) -> None:
    d = await fs.mkdir(R, b"d", 0o755, 0, 0)
    with pytest.raises(Exception) as info:
        await fs.open(d.ino, os.O_RDONLY, 0)
    assert errno_of(info.value) == errno.EISDIR
    f = await fs.mknod(R, b"f", stat.S_IFREG | 0o644, 0, 0, 0)
    with pytest.raises(Exception) as info2:
        await fs.setattr(d.ino, size=0)
    assert errno_of(info2.value) == errno.EISDIR
    assert (await fs.setattr(f.ino, size=100)).size == 100


async def test_fsync_of_a_small_change_commits_patches_not_a_blob(
    fs: FileSystem, store: MemBlobStore, meta: Metadata
) -> None:
    data = bytearray(random.Random(3).randbytes(2 * BS + 1000))
    ino, fh = await new_file(fs)
    await fs.write(fh, 0, data)
    await fs.fsync(fh)
    puts = store.puts
    await fs.write(fh, 100, b"page")  # a database's page, and its log growing
    await fs.write(fh, 2 * BS + 1000, b"more")
    await fs.fsync(fh)
    data[100:104] = b"page"
    data += b"more"
    assert store.puts == puts  # no block stored again
    assert meta.patches(ino, 0) == [(100, b"page")]
    assert meta.patches(ino, 2) == [(1000, b"more")]
    assert meta.get_inode(ino).size == len(data)
    await fs.fsync(fh)  # nothing new: nothing committed, nothing stored
    assert store.puts == puts and meta.patches(ino, 0) == [(100, b"page")]
    await fs.flush(fh)  # close(2): everything is committed already, nothing to store
    assert store.puts == puts and meta.patches(ino, 0) == [(100, b"page")]
    # A crash: what a new mount sees is the stored blocks with their patches.
    after = FileSystem(meta, store)
    rd = await after.open(ino, os.O_RDONLY, 0)
    assert await read_all(after, rd, len(data)) == data
    await after.release(rd)
    assert store.puts == puts and len(meta.patched_blocks()) == 2
    await after.shutdown()  # the two patched blocks it read are stored whole
    assert meta.patched_blocks() == [] and store.puts == puts + 2
    assert await read_fresh(meta, store, ino, len(data)) == data
    assert_no_leaks(after, store)


async def test_fsync_stores_a_block_whole_when_much_of_it_changed(
    fs: FileSystem, store: MemBlobStore, meta: Metadata
) -> None:
    ino, fh = await new_file(fs)
    await fs.write(fh, 0, bytes(range(256)) * (BS // 256))
    await fs.fsync(fh)
    puts = store.puts
    for k in range(5):  # each small, together more than a quarter of the block
        await fs.write(fh, k * 4096, b"\1" * (BS // 16))
        await fs.fsync(fh)
    assert store.puts == puts + 1 and meta.patched_blocks() == []
    await fs.write(fh, BS + 10, b"new block")  # a small new block takes patches too
    await fs.fsync(fh)
    assert store.puts == puts + 1 and meta.patches(ino, 1) == [(0, bytes(10) + b"new block")]
    await fs.write(fh, BS + 100, b"\2" * (BS // 2))  # but not half a block
    await fs.fsync(fh)
    assert store.puts == puts + 2 and meta.patched_blocks() == []


async def test_a_file_fsynced_then_deleted_is_never_stored(
    fs: FileSystem, store: MemBlobStore, meta: Metadata
) -> None:
    # A rollback journal: created, written, fsynced, closed and deleted per transaction.
    for k in range(3):
        ino, fh = await new_file(fs, b"db-journal")
        await fs.write(fh, 0, b"old pages %d" % k * 100)
        await fs.fsync(fh)
        assert meta.patches(ino, 0) != []  # committed, through the journal
        await fs.flush(fh)
        await fs.unlink(R, b"db-journal")
        await fs.release(fh)
        await fs.forget([(ino, 1)])
    assert store.puts == 0 and meta.patched_blocks() == []
    assert_no_leaks(fs, store)


async def test_an_open_settled_file_is_stored_only_once_closed(
    fs: FileSystem, store: MemBlobStore, meta: Metadata, autojump_clock: object
) -> None:
    # A database kept open and committing: the flusher does not rewrite its blocks every
    # few seconds; they are stored once the file is closed (and old), or when too patched.
    async with trio.open_nursery() as nursery:
        await nursery.start(fs.run_background)
        ino, fh = await new_file(fs)
        await fs.write(fh, 0, b"\1" * BS)
        await fs.fsync(fh)
        puts = store.puts
        for k in range(4):
            await fs.write(fh, 4096 * k, b"page")
            await fs.fsync(fh)
            await trio.sleep(10)
        assert store.puts == puts and len(meta.patches(ino, 0)) == 4
        await fs.flush(fh)
        await fs.release(fh)
        await trio.sleep(10)
        assert store.puts == puts + 1 and meta.patched_blocks() == []
        expect = bytearray(b"\1" * BS)
        for k in range(4):
            expect[4096 * k : 4096 * k + 4] = b"page"
        assert await read_fresh(meta, store, ino, BS) == expect
        nursery.cancel_scope.cancel()


async def test_crash_after_fsync_keeps_what_fsync_committed(
    fs: FileSystem, store: MemBlobStore, meta: Metadata
) -> None:
    """Random writes, truncates, fsyncs and closes, with crashes (a new FileSystem over the
    same metadata and blobs) in between: a crash keeps exactly the file as of its last
    fsync, close or truncate, whether that stored blocks or patches."""
    rng = random.Random(77)
    model, committed = bytearray(), bytearray()
    ino, fh = await new_file(fs)
    limit = 4 * BS
    for step in range(300):
        op = rng.random()
        if op < 0.55:
            off = rng.randrange(0, limit)
            data = rng.randbytes(rng.choice([1, 7, 512, 4096, BS // 3]))
            await fs.write(fh, off, data)
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off : off + len(data)] = data
        elif op < 0.62:
            size = rng.randrange(0, limit)
            await fs.setattr(ino, size=size)  # committed at once, with what is stored
            del model[size:]
            model.extend(bytes(size - len(model)))
            del committed[size:]
            committed.extend(bytes(size - len(committed)))
        elif op < 0.85:
            await fs.fsync(fh)
            committed[:] = model
        elif op < 0.9:
            await fs.flush(fh)
            committed[:] = model
        else:
            fs = FileSystem(meta, store, cache_bytes=8 * BS, dirty_limit=16 * BS)
            fh = await fs.open(ino, os.O_RDWR, 0)
            model[:] = committed
        assert await read_all(fs, fh, 2 * limit) == model, step
    await fs.release(fh)
    assert await read_fresh(meta, store, ino, 2 * limit) == model
    await fs.shutdown()
    assert meta.patched_blocks() == []
    assert await read_fresh(meta, store, ino, 2 * limit) == model
    assert_no_leaks(fs, store)


async def test_flushing_all_fails_only_for_changes_nothing_committed(
    fs: FileSystem, store: MemBlobStore, meta: Metadata
) -> None:
    """At unmount, a small file closed before the nodes filled up is committed as
    patches: that its blocks cannot be stored whole now is no loss, and unmounting used
    to say "not everything may be stored". A file whose bytes nothing committed still
    fails."""
    small = os.urandom(3000)
    ino, fh = await new_file(fs, b"small")
    await fs.write(fh, 0, small)
    await fs.release(fh)  # committed as patches, waiting for a pack
    store.fail_puts = True
    await fs.data.flush_all()
    assert await read_fresh(meta, store, ino, len(small)) == small

    _, fh = await new_file(fs, b"big")
    await fs.write(fh, 0, os.urandom(BS + 10))  # no close: nothing committed
    with pytest.raises(Exception) as err:
        await fs.data.flush_all()
    assert errno_of(err.value) == errno.EIO
    store.fail_puts = False
    await fs.release(fh)
    await fs.data.flush_all()
    assert len(meta.block_indexes(ino)) == 1
