"""File bytes <-> blocks <-> blobs: dirty buffers, the read cache, flushing.

Role: a file's content is a sequence of blocks of the volume's block size; block k holds
bytes [k*bs, (k+1)*bs) and is stored as one immutable, content-addressed blob, or in a
pack (below); a missing block is a hole and reads as zeros. Writes patch in-memory
*dirty* copies of blocks (read-modify-write: a partly written block is loaded first).
A flush puts dirty blocks as blobs in parallel, then switches the file's block map, size
and times in ONE metadata transaction; the blobs nothing names any more are then deleted
(walrusfs.reclaim: once that transaction is on the nodes' stable storage).
Reads look at dirty and in-flight blocks first, then at stored blocks (walrusfs.blobcache:
an LRU of blob bytes, then the store), with read-ahead of the next blocks.

fsync() commits a small change to a stored block, or a small new block, as patches (the
changed bytes, in the metadata) rather than as a new blob, and leaves the block dirty.
Such a *settled* file (every change committed) costs close() nothing more. Its blocks are
stored whole, which drops the patches, when its patches would grow past a quarter of the
block, under memory pressure, at unmount, and by the background flusher once the file is
closed and `flush_age` old: a database that stays open is not rewritten every few
seconds, and a file fsynced and deleted within seconds (a rollback journal) is never
stored at all. A block that has patches but no dirty copy (after a crash) is read as its
blob with the patches applied, and becomes dirty, so that it is stored whole.

close() commits a small file (SMALL_PATCH_BYTES of unstored bytes at most) the same way,
and the flusher stores small settled files together: one blob (a *pack*) holds the
blocks of many files, each at its own start after a short header. A block is one blob,
or a range of a pack; a pack lives while any block names it, and one that is mostly
dead bytes has its live blocks packed again (compact_packs). A blob that replaces
patches is put durably: fsync() may have made them so, and the commit that names the
blob drops them.

While a file has unflushed changes its live size and times are kept here (`live`); the
metadata row has the values of the last flush. Dirty memory is bounded: a writer over
the limit flushes (full blocks first) before its write is accepted. A background flusher,
run in the mount's nursery, writes out files dirty for longer than `flush_age` seconds
(settled ones only once closed, see above).

Must not import pyfuse3. Talks to the blob store only through `BlobStoreProtocol`.

Thread/task safety: trio tasks of one thread. Per file, `write_lock` orders writes and
truncates (a block load awaits the store) and `flush_lock` keeps one flush or truncate at
a time. A put and a delete of the same blob_id may race (content addressing makes two
files share blobs); walrusfs.reclaim makes that safe.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np
import trio

from walrusfs.blobcache import BlockFetcher
from walrusfs.errors import FSError, errno_of, is_known
from walrusfs.metadata import THINNED_MAX, BlockRef, BlockUpdate, FreedBlob, Metadata
from walrusfs.reclaim import BlobStoreProtocol, Buffer, Reclaimer

log = logging.getLogger(__name__)

# The read cache of a mount, unless `mount --cache-size` says otherwise.
DEFAULT_CACHE_BYTES = 64 << 20
# Blocks fetched ahead of a sequential reader (4 MiB blocks: 24 MiB in flight; at most
# half the read cache, see FileData.__init__). Measured
# on 512 MiB cold reads, 6 runs each: 3 blocks ~500 MB/s, 6 ~600, 8 about the same as 6,
# 12 ~480 (48 of the 64 MiB cache in flight).
READ_AHEAD_BLOCKS = 6
# A reader is given read-ahead as it goes on reading: this many times what it has read so
# far (this read included), up to READ_AHEAD_BLOCKS. `head -c 100` of a big file fetched
# 7 blobs (28 MiB) for its 100 bytes; a 1 GiB `cat` reaches the full window after its
# first block. What it has read in all, not in turn: the kernel's read-ahead requests
# arrive out of order, and a count that each of them reset would keep the window small.
READ_AHEAD_RAMP = 4
# fsync() of a small change to a stored block records the changed bytes as patches in the
# metadata (journalled to every node) instead of storing the whole block again, which
# costs 3.7x the block at n=7: a database's 4 KiB page in a 4 MiB block, 15 MiB. A block
# takes patches while they stay below this fraction of it (new bytes in one fsync, and in
# all since its blob was written); the background flush then folds them into a new blob.
PATCH_FRACTION = 4
# Patches go to every node whole (the journal is replicated, not erasure coded): past this
# many bytes in one fsync, storing the blocks costs the nodes less.
PATCH_MAX_BYTES = 1 << 20
# A block whose patches stay within this many bytes (and a PATCH_FRACTION of the block
# size) takes them whatever its own size: a new small file, or a log's tail. Storing a
# blob costs an encode and a new file on every node (4.5 ms for a 32 KiB blob at n=7
# here); the journal append that fsync() makes anyway carries 64 KiB more to each node
# in ~0.1 ms.
SMALL_PATCH_BYTES = 64 << 10
# Changed ranges remembered per dirty block; a block changed in more places is stored whole.
MAX_RANGES = 64
# The first bytes of every pack, so that no block in a pack starts at 0: a mount finds
# every pack (Metadata.recheck_packs), also one whose only block left is its first.
PACK_HEADER = b"walrusfs pack 1\n"
# A pack whose live blocks fill less than 1/COMPACT_FRACTION of it has those blocks
# stored again (in a new pack) and is deleted: deleting small files must free space
# too. Rewriting moves at most half of what it frees.
COMPACT_FRACTION = 2
# Thinned blobs looked at per round of the flusher (an indexed query each).
COMPACT_CHECKS = 256
# Seconds a pack must keep all of its blocks before it is looked at: a tree being
# deleted, or rewritten by tar or rsync, drops the rest of the pack moments later, and
# blocks moved before that would be stored again for nothing.
COMPACT_QUIET = 15.0


@dataclass(frozen=True, slots=True)
class Live:
    """Attributes of a file whose newest state is still in memory."""

    size: int
    mtime_ns: int
    ctime_ns: int
    cleared: bool  # none of its committed blocks are its bytes any more


class _File:
    """In-memory state of one file with unflushed changes (or an operation under way)."""

    def __init__(self, inode: int, size: int, mtime_ns: int, ctime_ns: int) -> None:
        self.inode = inode
        self.size = size
        self.mtime_ns = mtime_ns
        self.ctime_ns = ctime_ns
        self.attrs_dirty = False  # size/times differ from the metadata row
        # Truncated to 0 in memory only: the committed blocks and patches are no longer
        # the file's, and the next commit drops them in its own transaction (see truncate).
        self.cleared = False
        self.dirty: dict[int, bytearray] = {}  # block index -> block bytes (may be short)
        # Per dirty block: the (start, end) ranges that differ from its committed bytes
        # (blob plus patches), or None if unknown (stored whole at the next sync).
        self.changed: dict[int, list[tuple[int, int]] | None] = {}
        self.patched: dict[int, int] = {}  # per dirty block: bytes committed as patches
        # Per patched block: the journal seq of its first patch this mount (unknown: the
        # patches are taken to be durable, see _must_be_durable).
        self.patch_seq: dict[int, int] = {}
        self.inflight: dict[int, bytearray] = {}  # being flushed; never mutated
        # Per block in flight: its patched bytes and patch_seq before it was taken. The
        # patches stay committed until its blob is: if that fails, they are its again.
        self.taken: dict[int, tuple[int, int | None]] = {}
        self.dirty_since: float | None = None  # trio time of the oldest unflushed change
        # Write-behind: dirty blocks written front to back from empty (a sequential
        # writer's), and those of them it has completed, to be stored at once.
        self.filling: set[int] = set()
        self.completed: set[int] = set()
        self.behind = False  # a write-behind task runs for this file
        self.write_lock = trio.Lock()
        self.flush_lock = trio.Lock()
        self.users = 0  # operations holding this object; evicted only at 0

    def is_clean(self) -> bool:
        return not (self.dirty or self.inflight or self.attrs_dirty)

    def dirty_size(self) -> int:
        return sum(map(len, self.dirty.values()))


def _is_zero(buf: bytearray) -> bool:
    if not buf:
        return True
    if buf[0] or buf[-1]:
        return False
    return not bool(np.frombuffer(buf, dtype=np.uint8).any())


def _piece(data: Buffer, limit: int, offset: int, n: int) -> bytes:
    """`n` bytes of `data[:limit]` from `offset`, zero-padded."""
    with memoryview(data) as view:
        out = view[offset : min(offset + n, limit)].tobytes()
    return out if len(out) == n else out + bytes(n - len(out))


def _log_failed(what: str, exc: Exception) -> None:
    """A background step failed: expected storage trouble quietly, a bug loudly."""
    known = is_known(exc)
    level = logging.DEBUG if known else logging.ERROR
    log.log(level, "%s failed: %s", what, exc, exc_info=not known)


def _copy_into(buf: bytearray, start: int, chunk: memoryview) -> None:
    """buf[start : start + len(chunk)] = chunk, for start <= len(buf). Slice assignment
    first copies anything but a bytearray into a new one: each 1 MiB write request was
    copied twice, in the thread that serves every request."""
    inside = min(len(chunk), len(buf) - start)
    if inside:
        with memoryview(buf) as view:
            view[start : start + inside] = chunk[:inside]
    if inside < len(chunk):
        buf += chunk[inside:]


def _note_change(f: _File, index: int, start: int, end: int) -> None:
    """Bytes [start, end) of dirty block `index` no longer match its committed bytes."""
    ranges = f.changed.get(index)
    if ranges is None:
        return
    kept = []
    for a, b in ranges:
        if b < start or a > end:
            kept.append((a, b))
        else:
            start, end = min(a, start), max(b, end)
    kept.append((start, end))
    f.changed[index] = sorted(kept) if len(kept) <= MAX_RANGES else None


class FileData:
    """Reads and writes file content through dirty buffers, a cache and the blob store."""

    def __init__(
        self,
        meta: Metadata,
        store: BlobStoreProtocol,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        dirty_limit: int = 128 << 20,
        flush_age: float = 5.0,
        max_parallel: int = 6,
        clock_ns: Callable[[], int] = time.time_ns,
        is_open: Callable[[int], bool] = lambda inode: False,
        room_for_data: Callable[[], bool] = lambda: True,
    ) -> None:
        self._meta = meta
        # False while too few nodes have room to store a blob. File bytes then go no
        # further than memory, not into the journal as patches either: what space the
        # full nodes have left (their reserve, see walrusfs.nodeset) is for the deletes
        # that free them.
        self._room_for_data = room_for_data
        self._is_open = is_open  # whether a file has open handles (walrusfs.fs knows)
        self._store = store
        self.block_size = meta.block_size
        self._blobs = BlockFetcher(store, cache_bytes)
        # No more ahead than half the cache holds, or what is read ahead would push out
        # what the reader has yet to read (16 MiB blocks, 6 ahead: each read twice).
        self._ahead_bytes = min(READ_AHEAD_BLOCKS * self.block_size, cache_bytes // 2)
        # Two blocks at least, or a writer could never make room for a partial block.
        self._dirty_limit = max(dirty_limit, 2 * self.block_size)
        self._flush_age = flush_age
        self._small_patch = min(SMALL_PATCH_BYTES, self.block_size // PATCH_FRACTION)
        self._limiter = trio.CapacityLimiter(max_parallel)
        self._clock_ns = clock_ns
        # With the FUSE writeback cache the kernel stamps mtime and ctime at write(2)
        # and sends them (a setattr) when they changed; its WRITE requests come later,
        # and a stamp of ours then would disagree with the kernel's (which it keeps).
        self.stamp_writes = True
        self._files: dict[int, _File] = {}
        self.dirty_bytes = 0  # dirty + in-flight block bytes, all files
        self._progress = trio.Event()  # set (and replaced) whenever a flush ends
        self._thinned: dict[bytes, float] = {}  # blobs that lost blocks, and when (trio)
        self._nursery: trio.Nursery | None = None  # for read-ahead, while the flusher runs
        self._flush_failing = False
        self._reclaim = Reclaimer(store, meta.blob_refcount, self._limiter, self._blobs.forget)

    # -- state --------------------------------------------------------------------------

    @contextmanager
    def _use(self, inode: int) -> Iterator[_File]:
        f = self._files.get(inode)
        if f is None:
            row = self._meta.get_inode(inode)
            f = self._files[inode] = _File(inode, row.size, row.mtime_ns, row.ctime_ns)
        f.users += 1
        try:
            yield f
        finally:
            f.users -= 1
            if f.users == 0 and f.is_clean() and self._files.get(inode) is f:
                del self._files[inode]

    def cache_usage(self) -> dict[str, int]:
        """The read cache's size and the bytes it holds now."""
        return self._blobs.usage()

    def unsaved_bytes(self) -> int:
        """Bytes of changes a crash of this process would lose: in memory, not committed
        (a settled file's are, as patches, while they wait to be stored whole)."""
        return sum(
            sum(map(len, f.inflight.values())) + (0 if self._settled(f) else f.dirty_size())
            for f in self._files.values()
        )

    @property
    def deletes_pending(self) -> int:
        """Freed blobs waiting for their delete round (walrusfs.reclaim)."""
        return self._reclaim.pending

    def live(self, inode: int) -> Live | None:
        """Size and times of `inode` if newer than its metadata row, else None."""
        f = self._files.get(inode)
        return None if f is None else Live(f.size, f.mtime_ns, f.ctime_ns, f.cleared)

    def set_times(
        self, inode: int, *, mtime_ns: int | None = None, ctime_ns: int | None = None
    ) -> None:
        """Times just written to the metadata row: make a later flush keep them."""
        f = self._files.get(inode)
        if f is not None:
            f.mtime_ns = f.mtime_ns if mtime_ns is None else mtime_ns
            f.ctime_ns = f.ctime_ns if ctime_ns is None else ctime_ns

    def hold_times(self, inode: int, *, mtime_ns: int, ctime_ns: int) -> bool:
        """Take new times for a file with uncommitted changes in memory: they are committed
        with those (close, fsync, the flusher), in the same transaction. False, with
        nothing done, if it has none (only committed ones, or none in memory).

        Why: with the writeback cache the kernel sends a file's times just before every
        close that follows a write, and tools that restore them (tar, cp -p, rsync) do
        so before closing. As transactions of their own, they were two of the six
        commits (SQLite, journal record) of each small file written.
        """
        f = self._files.get(inode)
        if f is None or not (f.dirty or f.attrs_dirty) or self._settled(f):
            return False
        f.mtime_ns, f.ctime_ns = mtime_ns, ctime_ns
        self._mark_dirty(f)
        return True

    def _mark_dirty(self, f: _File) -> None:
        f.attrs_dirty = True
        if f.dirty_since is None:
            f.dirty_since = trio.current_time()

    # -- read ---------------------------------------------------------------------------

    async def read(
        self, inode: int, offset: int, length: int, *, readahead: bool = False, done: int = 0
    ) -> bytes | memoryview:
        """Up to `length` bytes at `offset` (short only at end of file). Raises FSError.

        `readahead`: the caller reads sequentially (this read starts where its last one
        ended; it has read `done` bytes before it), so what follows is fetched ahead (see
        READ_AHEAD_RAMP) and blocks are fetched whole; otherwise a small read fetches only
        the symbols around it (see walrusfs.blobcache).
        The result may be a read-only view of a cached blob: blobs are immutable, so the
        kernel can be handed their bytes without a copy.
        """
        f = self._files.get(inode)
        size = f.size if f is not None else self._meta.get_inode(inode).size
        end = min(size, offset + length)
        if end <= offset:
            return b""
        bs = self.block_size
        first, last = offset // bs, (end - 1) // bs
        step = min(bs, self._blobs.window_bytes)
        if readahead and (offset % step == 0 or offset // step != (end - 1) // step):
            # A sequential reader entering a block (or a window of a big one): keep what
            # follows on its way, so the nodes' reads of it overlap the kernel's
            # consumption of this. Once per step, not per request: each block looked at
            # costs a metadata lookup.
            ahead = min(self._ahead_bytes, READ_AHEAD_RAMP * (done + end - offset))
            stop = min(size, end + ahead)
            for index in range(end // bs, -(-stop // bs)):
                base = index * bs
                self._prefetch(inode, index, max(end - base, 0), min(stop - base, bs))
        if first == last:
            return await self._read_block(
                inode, first, offset - first * bs, end - offset, sequential=readahead
            )
        pieces = []
        pos = offset
        while pos < end:
            index, start = divmod(pos, bs)
            n = min(bs - start, end - pos)
            pieces.append(await self._read_block(inode, index, start, n, sequential=readahead))
            pos += n
        return b"".join(pieces)

    async def _read_block(
        self, inode: int, index: int, start: int, n: int, *, sequential: bool = True
    ) -> bytes | memoryview:
        for _attempt in range(3):
            f = self._files.get(inode)
            if f is not None:
                buf = f.dirty.get(index)
                if buf is None:
                    buf = f.inflight.get(index)
                if buf is not None:
                    return _piece(buf, len(buf), start, n)  # mutable: copy
                if f.cleared:
                    return bytes(n)
            ref = self._meta.block(inode, index)
            if self._meta.patches(inode, index):
                with self._use(inode) as f:
                    async with f.write_lock:
                        buf = await self._materialize(f, index)
                        return _piece(buf, len(buf), start, n)
            if ref is None:
                return bytes(n)
            try:
                part = await self._blobs.read(ref, start, n, sequential=sequential)
            except FSError:
                # A flush or truncate may have replaced the block and deleted its blob
                # while we read it: then read the new version instead of failing.
                if self._meta.block(inode, index) == ref:
                    raise
                continue
            return part if len(part) == n else _piece(part, len(part), 0, n)
        raise FSError(errno.EIO, f"block {index} of inode {inode} keeps changing under a read")

    async def _materialize(self, f: _File, index: int) -> bytearray:
        """Block `index` as committed (its blob with its patches applied) as a dirty block,
        so that the next flush folds the patches into a new blob. Caller holds write_lock.
        """
        buf = f.dirty.get(index)
        if buf is not None:
            return buf
        ref = self._meta.block(f.inode, index)
        patches = self._meta.patches(f.inode, index)
        buf = bytearray()
        if ref is not None:
            buf[:] = memoryview(await self._blobs.fetch(ref))[: ref.length]
        for offset, data in patches:
            if offset > len(buf):
                buf.extend(bytes(offset - len(buf)))
            buf[offset : offset + len(data)] = data
        f.dirty[index] = buf
        f.changed[index] = []
        f.patched[index] = sum(len(data) for _, data in patches)
        self.dirty_bytes += len(buf)
        if f.dirty_since is None:
            f.dirty_since = trio.current_time()
        return buf

    async def fold_patches(self) -> None:
        """Bring every patched block into memory, so that the flusher stores it whole (a
        mount after a crash). Best effort: a block that cannot be read now is folded when
        it is next read or written."""
        for inode, index in self._meta.patched_blocks():
            try:
                await self._make_room(inode)
                with self._use(inode) as f:
                    async with f.write_lock:
                        await self._materialize(f, index)
            except Exception as exc:
                log.warning("patched block %d of inode %d not folded yet: %s", index, inode, exc)

    def _prefetch(self, inode: int, index: int, start: int, stop: int) -> None:
        if self._nursery is None:
            return
        f = self._files.get(inode)
        if f is not None and (index in f.dirty or index in f.inflight or f.cleared):
            return
        ref = self._meta.block(inode, index)
        if ref is not None:
            self._blobs.prefetch(self._nursery, ref, start, stop)

    # -- write and truncate -------------------------------------------------------------

    async def write(self, inode: int, offset: int, data: Buffer) -> None:
        """Write all of `data` at `offset`; sets mtime and ctime. Raises FSError."""
        if not len(data):
            return
        await self._make_room(inode)
        now = self._clock_ns()
        with self._use(inode) as f:
            async with f.write_lock:
                bs = self.block_size
                end = offset + len(data)
                pos = offset
                with memoryview(data) as src:
                    while pos < end:
                        index, start = divmod(pos, bs)
                        n = min(bs - start, end - pos)
                        buf = await self._writable_block(f, index, start, n)
                        old_len = len(buf)
                        if start > old_len:
                            buf.extend(bytes(start - old_len))
                        if start != old_len:
                            f.filling.discard(index)  # a gap or a rewrite: not streaming
                        _copy_into(buf, start, src[pos - offset : pos - offset + n])
                        self.dirty_bytes += len(buf) - old_len
                        _note_change(f, index, min(start, old_len), start + n)
                        if len(buf) == bs and index in f.filling:
                            f.filling.discard(index)
                            f.completed.add(index)
                        pos += n
                f.size = max(f.size, end)
                if self.stamp_writes:
                    f.mtime_ns = f.ctime_ns = now
                self._mark_dirty(f)
                if f.completed and not f.behind and self._nursery is not None:
                    f.behind = True
                    self._nursery.start_soon(self._write_behind, f.inode)

    async def _writable_block(self, f: _File, index: int, start: int, n: int) -> bytearray:
        buf = f.dirty.get(index)
        if buf is not None:
            return buf
        base = f.inflight.get(index)
        changed: list[tuple[int, int]] | None = None  # unknown: the committed bytes may change
        if base is not None:
            buf = bytearray(base)  # in-flight buffers are being stored: copy
        elif not f.cleared and self._meta.patches(f.inode, index):
            return await self._materialize(f, index)
        else:
            # Cleared: nothing committed is the file's any more, every block is a hole.
            ref = None if f.cleared else self._meta.block(f.inode, index)
            if ref is None:
                buf = bytearray()  # a hole: every byte written is a change over zeros
                changed = []
                f.filling.add(index)
            elif start == 0 and n >= ref.length:
                buf = bytearray()  # all of the stored bytes are being overwritten
                f.filling.add(index)
            else:
                data = await self._blobs.fetch(ref)
                buf = bytearray(memoryview(data)[: ref.length])
                changed = []
        f.dirty[index] = buf
        f.changed[index] = changed
        self.dirty_bytes += len(buf)
        return buf

    async def truncate(
        self, inode: int, size: int, *, now_ns: int, by_handle: bool = False
    ) -> None:
        """Set the size; bytes past it are gone (zeros if extended again).

        A truncate to 0 through an open file (`by_handle`: open(O_TRUNC) before a file is
        written anew, or ftruncate) stays in memory (`cleared`), as writes do, and is
        committed with the file's next content, in one transaction: a crash in between
        finds the file as it was, not empty, as ext4 does for the same pattern. So does
        every truncate after it until then. One by path (truncate(2)) is committed at
        once, in order with the changes around it, as every change made without an open
        file is; if the file is cleared, that commits its pending content too.
        """
        with self._use(inode) as f:
            async with f.write_lock, f.flush_lock:
                lazy = (size == 0 and by_handle) or f.cleared
                freed = (
                    []
                    if lazy
                    else self._meta.truncate(inode, size, mtime_ns=now_ns, ctime_ns=now_ns)
                )
                bs = self.block_size
                for index in [i for i in f.dirty if i * bs >= size]:
                    self.dirty_bytes -= len(f.dirty.pop(index))
                    f.changed.pop(index, None)
                    f.patched.pop(index, None)
                    f.patch_seq.pop(index, None)
                cut = size % bs
                buf = f.dirty.get(size // bs)
                if buf is not None and len(buf) > cut:
                    self.dirty_bytes -= len(buf) - cut
                    del buf[cut:]
                    ranges = f.changed.get(size // bs)
                    if ranges:  # the metadata cut the block's patches just the same
                        f.changed[size // bs] = [(a, min(b, cut)) for a, b in ranges if a < cut]
                f.size, f.mtime_ns, f.ctime_ns = size, now_ns, now_ns
                if lazy:
                    f.cleared = True
                    self._mark_dirty(f)
                    if not by_handle:
                        await self._flush_locked(f, False)
                else:
                    f.attrs_dirty = False  # the row has just been written
                    if not f.dirty:
                        f.dirty_since = None
        await self.free(freed)

    async def discard(self, inode: int) -> None:
        """Forget a deleted file's unflushed data (waits for a flush under way)."""
        f = self._files.get(inode)
        if f is None:
            return
        async with f.write_lock, f.flush_lock:
            for buf in f.dirty.values():
                self.dirty_bytes -= len(buf)
            f.dirty.clear()
            f.changed.clear()
            f.patched.clear()
            f.patch_seq.clear()
            f.attrs_dirty = f.cleared = False
            f.dirty_since = None
        if self._files.get(inode) is f and f.users == 0:
            del self._files[inode]

    # -- flush --------------------------------------------------------------------------

    async def flush(self, inode: int, *, full_only: bool = False, fold: bool = True) -> None:
        """Store the file's dirty blocks (only whole ones if `full_only`) and commit them.

        Without `fold` (close(2)), a settled file is left as it is: its changes are
        committed already, as patches. So is a small file: its bytes are committed as
        patches (what fsync() does) and stored later in a pack with others (see _pack).
        On failure the blocks stay dirty for a later attempt. Raises FSError.
        """
        if inode not in self._files:
            return
        with self._use(inode) as f:
            async with f.flush_lock:
                if not fold:
                    if self._settled(f):
                        return
                    if self._packable(f):
                        freed = self._commit_patches(f)
                        if freed is not None:
                            await self.free(freed)
                            return
                await self._flush_locked(f, full_only)

    def _packable(self, f: _File) -> bool:
        """A small file (all of its unstored bytes, that is), which a pack may store."""
        if not f.dirty or f.inflight:
            return False
        return f.dirty_size() <= self._small_patch

    @staticmethod
    def _settled(f: _File) -> bool:
        """Every change of the file is committed (as patches), none is being stored."""
        return not (f.attrs_dirty or f.inflight) and all(
            f.changed.get(index) == [] for index in f.dirty
        )

    async def sync(self, inode: int) -> None:
        """fsync(2): commit the file's changes so that they survive a crash. Small changes
        become patches (see PATCH_FRACTION, SMALL_PATCH_BYTES); otherwise as flush.
        Raises FSError."""
        if inode not in self._files:
            return
        with self._use(inode) as f:
            async with f.flush_lock:
                freed = self._commit_patches(f)
                if freed is None:
                    await self._flush_locked(f, False)
                else:
                    await self.free(freed)

    def _commit_patches(self, f: _File) -> list[FreedBlob] | None:
        """Commit all of the file's dirty bytes as patches and return the blobs that
        freed (a cleared file's), or commit nothing and return None if a block's committed
        bytes are unknown or it has changed too much. Never yields: no write can slip in
        between reading the buffers and marking them committed (flush_lock held)."""
        if not f.dirty or f.inflight:
            return None
        patches: list[tuple[int, int, bytes]] = []
        for index, buf in f.dirty.items():
            ranges = f.changed.get(index)
            if ranges is None:
                return None
            total = f.patched.get(index, 0) + sum(b - a for a, b in ranges)
            if total * PATCH_FRACTION > len(buf) and total > self._small_patch:
                return None
            patches.extend((index, a, bytes(buf[a:b])) for a, b in ranges)
        if sum(len(p[2]) for p in patches) > PATCH_MAX_BYTES:
            return None
        if patches and not self._room_for_data():
            return None  # stored as blobs instead, which fails with ENOSPC
        freed: list[FreedBlob] = []
        if patches or f.attrs_dirty:
            freed = self._meta.patch_blocks(
                f.inode,
                patches,
                size=f.size,
                mtime_ns=f.mtime_ns,
                ctime_ns=f.ctime_ns,
                clear=f.cleared,
            )
            f.cleared = False
        for index, _offset, data in patches:
            f.patched[index] = f.patched.get(index, 0) + len(data)
            f.patch_seq.setdefault(index, self._meta.last_seq)
        for index in f.dirty:
            f.changed[index] = []
        f.attrs_dirty = False  # the row has just been written; the blocks stay dirty
        return freed

    async def flush_all(self) -> None:
        """Flush every file with unflushed changes (the small settled ones in packs), and
        delete the blobs freed so far.

        Raises (FSError) only for changes that nothing committed: a settled file's are
        committed as patches, and stay so when the nodes cannot take its blocks now
        (full, say), as they do in the journal after a crash; unmounting then is no loss.
        """
        for f in list(self._files.values()):
            if f.flush_lock.locked():
                # A close finishing (release is asynchronous): a pack skips a file whose
                # lock is taken, and the flush below would give each block a blob.
                async with f.flush_lock:
                    pass
        failed: Exception | None = None  # storing a settled file's blocks: not tried again
        try:
            await self._pack([f for f in self._files.values() if self._settled(f)])
        except Exception as exc:
            if not is_known(exc):
                raise
            failed = exc
        for inode in list(self._files):
            held = self._files.get(inode)
            settled = held is not None and self._settled(held)
            if settled and failed is not None:
                continue
            try:
                await self.flush(inode)
            except Exception as exc:
                if not (settled and is_known(exc)):
                    raise
                failed = exc
        if failed is not None:
            log.warning("files left as committed patches, not stored whole now: %s", failed)
        await self._reclaim.drain()

    async def _flush_locked(self, f: _File, full_only: bool) -> None:
        bs = self.block_size
        picked = {k: b for k, b in f.dirty.items() if not full_only or len(b) == bs}
        if not picked and (full_only or not f.attrs_dirty):
            return
        await self._store_and_commit(f, picked)

    async def _write_behind(self, inode: int) -> None:
        """Store the blocks a sequential writer completed, while it writes the next ones.

        A completed block is as full as it gets, so storing it now costs nothing extra and
        overlaps encoding and node writes with the writer instead of stopping it at the
        dirty limit. Blocks that are rewritten in place (a database) are left to flush.
        """
        bs = self.block_size
        if inode not in self._files:
            return  # flushed (or deleted) since: nothing left to do
        with self._use(inode) as f:
            try:
                while f.completed:
                    async with f.flush_lock:
                        picked = {
                            k: f.dirty[k]
                            for k in sorted(f.completed)
                            if len(f.dirty.get(k, b"")) == bs
                        }
                        f.completed.clear()
                        if picked:
                            await self._store_and_commit(f, picked)
            except Exception as exc:  # the blocks stay dirty: flush or close reports it
                log.debug("write-behind of inode %d failed: %s", inode, exc)
            finally:
                f.behind = False

    @staticmethod
    def _take(f: _File, picked: dict[int, bytearray]) -> tuple[int, int, int]:
        """Move `picked` dirty blocks in flight, to be stored; returns the size and times
        to commit with them (flush_lock held)."""
        for index, buf in picked.items():
            del f.dirty[index]
            f.changed.pop(index, None)
            f.taken[index] = (f.patched.pop(index, 0), f.patch_seq.pop(index, None))
            f.completed.discard(index)
            f.inflight[index] = buf
        if not f.dirty:
            f.dirty_since = None
        return f.size, f.mtime_ns, f.ctime_ns

    def _untake(self, f: _File, picked: dict[int, bytearray], *, settled: bool = False) -> None:
        """They were not stored: dirty again, unless rewritten meanwhile, with the patches
        they had (still committed, so the next put must be as durable as they are). If
        `settled`, they were settled and are again: committed as they are, none of their
        bytes a change."""
        for index, buf in picked.items():
            del f.inflight[index]
            patched, seq = f.taken.pop(index)
            if patched:
                f.patched[index] = patched
                if seq is not None:
                    f.patch_seq[index] = seq
            if index in f.dirty:  # rewritten meanwhile: the newer copy wins
                self.dirty_bytes -= len(buf)
            else:
                f.dirty[index] = buf
                f.changed[index] = [] if settled else None
        if not settled:
            self._mark_dirty(f)
        elif f.dirty_since is None:
            f.dirty_since = trio.current_time()

    def _stored(
        self, f: _File, picked: dict[int, bytearray], snapshot: tuple[int, int, int], complete: bool
    ) -> None:
        """They are stored and committed, with the size and times of `snapshot`."""
        for index, buf in picked.items():
            del f.inflight[index]
            del f.taken[index]
            self.dirty_bytes -= len(buf)
        if complete and not f.dirty and snapshot == (f.size, f.mtime_ns, f.ctime_ns):
            f.attrs_dirty = False

    def _must_be_durable(self, f: _File, index: int) -> bool:
        """Whether a blob storing block `index` must be on stable storage before it is
        committed: a crash of every node could otherwise keep the commit and lose the
        blob, and with it what the commit replaced (read before `_take`).

        - The block's patches, if a sync that asked for it made them durable (an fsync,
          or any other since they were committed): fsync() promised them. Patches not
          promised so (not yet durable, or only by the background's commit interval)
          may be dropped by a crash: the recovery that leaves out a commit whose blob the
          crash lost then finds them as they were (closing small files then costs no
          flush of the nodes for their pack).
        - Its committed bytes unchanged, moved to a new blob (a pack compacted): they
          may have been durable for long.
        """
        if f.patched.get(index):
            return self._meta.promised_through(f.patch_seq.get(index, 0))
        return f.changed.get(index) == []

    def _round_done(self, pinned: list[bytes]) -> None:
        self._reclaim.unpin(pinned)
        self._progress.set()
        self._progress = trio.Event()

    async def _store_and_commit(self, f: _File, picked: dict[int, bytearray]) -> None:
        """Store `picked` dirty blocks as blobs, then commit them (flush_lock held)."""
        bs = self.block_size
        durable_blocks = {index for index in picked if self._must_be_durable(f, index)}
        snapshot = self._take(f, picked)
        complete = not f.dirty
        refs: dict[int, BlockRef | None] = {}
        pinned: list[bytes] = []
        try:
            async with trio.open_nursery() as nursery:
                for index, buf in picked.items():
                    if _is_zero(buf):
                        refs[index] = None  # an all-zero block is stored as a hole
                    else:
                        durable = index in durable_blocks
                        nursery.start_soon(self._put_block, index, buf, refs, pinned, durable)
            size = snapshot[0]
            if not complete:
                # Blocks left dirty may lie below: do not claim bytes not yet stored.
                stored_end = max((k * bs + len(b) for k, b in picked.items()), default=0)
                row_size = 0 if f.cleared else self._meta.get_inode(f.inode).size
                size = min(size, max(row_size, stored_end))
            freed = self._meta.set_blocks(
                f.inode,
                refs,
                size=size,
                mtime_ns=snapshot[1],
                ctime_ns=snapshot[2],
                clear=f.cleared,
            )
            f.cleared = False
        except BaseException:
            self._untake(f, picked)
            self._reclaim.free_later(
                [FreedBlob(r.blob_id, r.meta) for r in refs.values() if r is not None]
            )
            raise
        finally:
            self._round_done(pinned)
        self._stored(f, picked, snapshot, complete)
        for index, buf in picked.items():
            ref = refs[index]
            if ref is not None:
                self._blobs.remember(ref.blob_id, buf)
        await self.free(freed)

    async def _pack(self, files: list[_File]) -> int:
        """Store the small ones of these settled files together, in blobs of up to a
        block (packs); returns how many were stored.

        A small file costs a blob otherwise: an encode and a new file on every node for
        a few KiB. Files whose flush_lock is taken are left to whoever holds it. Locks
        are taken one pack at a time: a close() of a file in a later pack does not wait
        for the earlier ones to be stored.
        """
        todo = sorted(files, key=lambda f: f.inode)
        stored = 0
        while todo:
            group: list[_File] = []
            rest: list[_File] = []
            size = len(PACK_HEADER)
            for f in todo:
                if f.flush_lock.locked() or not (self._settled(f) and self._packable(f)):
                    continue  # busy, or written to while a pack was stored: left to a flush
                n = f.dirty_size()
                if group and size + n > self.block_size:
                    rest.append(f)
                else:
                    group.append(f)
                    size += n
            if group:
                with ExitStack() as stack:
                    for f in group:
                        stack.enter_context(self._use(f.inode))
                        f.flush_lock.acquire_nowait()
                        stack.callback(f.flush_lock.release)
                    await self._store_pack(group)
            stored += len(group)
            todo = rest
        return stored

    async def _store_pack(self, files: list[_File]) -> None:
        """Store all dirty blocks of `files` as one blob, then commit them in one
        transaction (their flush_locks held). If this fails, they stay settled."""
        picked = {f.inode: dict(f.dirty) for f in files}
        durable = any(self._must_be_durable(f, index) for f in files for index in f.dirty)
        snapshots = {f.inode: self._take(f, picked[f.inode]) for f in files}
        pack = bytearray(PACK_HEADER)
        where: dict[tuple[int, int], int] = {}  # (inode, block index) -> start in the pack
        for f in files:
            for index, buf in picked[f.inode].items():
                if not _is_zero(buf):  # an all-zero block is stored as a hole
                    where[f.inode, index] = len(pack)
                    pack += buf
        pinned: list[bytes] = []
        try:
            blob_id, meta = b"", b""
            if where:
                blob_id, meta = await self._reclaim.put(pack, durable=durable)
                pinned.append(blob_id)
            updates: list[BlockUpdate] = []
            for f in files:
                size, mtime_ns, ctime_ns = snapshots[f.inode]
                refs: dict[int, BlockRef | None] = {
                    index: None
                    if (f.inode, index) not in where
                    else BlockRef(blob_id, meta, len(buf), where[f.inode, index])
                    for index, buf in picked[f.inode].items()
                }
                updates.append(
                    BlockUpdate(
                        ino=f.inode, blocks=refs, size=size, mtime_ns=mtime_ns, ctime_ns=ctime_ns
                    )
                )
            freed = self._meta.set_blocks_many(updates)  # all of them, or none
        except BaseException:
            for f in files:
                self._untake(f, picked[f.inode], settled=True)
            if pinned:
                self._reclaim.free_later([FreedBlob(blob_id, meta)])
            raise
        finally:
            self._round_done(pinned)
        for f in files:
            self._stored(f, picked[f.inode], snapshots[f.inode], complete=True)
        if where:
            self._blobs.remember(blob_id, pack)
        await self.free(freed)

    async def compact_packs(self, *, quiet_for: float = COMPACT_QUIET) -> int:
        """Store again the live blocks of packs that are mostly dead bytes and lost none
        for `quiet_for` seconds, up to a new pack's worth, so that those packs are freed;
        returns how many files had blocks moved.

        A pack lives while any block names it, so files deleted from it leave dead bytes
        on every node. A moved block is read into memory as committed (settled), then
        packed at once with the others. A block in use (dirty, patched, changed
        meanwhile) is left: a flush of its file frees its old reference anyway.
        """
        now = trio.current_time()
        for blob_id in self._meta.take_thinned():
            if blob_id in self._thinned or len(self._thinned) < THINNED_MAX:
                self._thinned[blob_id] = now  # the last time it was seen losing a block
        quiet = [b for b, when in self._thinned.items() if when <= now - quiet_for]
        moved: dict[int, _File] = {}
        budget = self.block_size
        with ExitStack() as stack:
            for blob_id in quiet[:COMPACT_CHECKS]:
                if budget <= 0:
                    break  # the next round looks at the rest
                del self._thinned[blob_id]
                users = self._meta.blob_blocks(blob_id)
                if not self._mostly_dead(blob_id, users):
                    continue
                for inode, index, ref in users:
                    try:
                        f = stack.enter_context(self._use(inode))
                        async with f.write_lock:
                            if not self._movable(f, index, ref):
                                continue
                            await self._materialize(f, index)
                    except FSError as exc:  # deleted meanwhile, or unreadable now
                        log.debug("block %d of inode %d not moved: %s", index, inode, exc)
                        continue
                    moved[inode] = f
                    budget -= ref.length
            if moved:
                await self._pack(list(moved.values()))
        return len(moved)

    def _mostly_dead(self, blob_id: bytes, users: list[tuple[int, int, BlockRef]]) -> bool:
        if not users or any(r.start == 0 or r.length > self._small_patch for _, _, r in users):
            return False  # gone already, or not a pack
        try:
            length = self._store.blob_length(blob_id, users[0][2].meta)
        except FSError:
            return False  # its reads fail the same way; repair and fsck report it
        live = 0
        end = 0
        for start, stop in sorted({(r.start, r.start + r.length) for _, _, r in users}):
            live += max(0, stop - max(start, end))
            end = max(end, stop)
        return live * COMPACT_FRACTION < length - len(PACK_HEADER)

    def _movable(self, f: _File, index: int, ref: BlockRef) -> bool:
        return (
            not f.cleared
            and index not in f.dirty
            and index not in f.inflight
            and self._meta.block(f.inode, index) == ref
            and not self._meta.patches(f.inode, index)
        )

    async def _put_block(
        self,
        index: int,
        buf: bytearray,
        refs: dict[int, BlockRef | None],
        pinned: list[bytes],
        durable: bool,
    ) -> None:
        blob_id, meta = await self._reclaim.put(buf, durable=durable)
        pinned.append(blob_id)
        refs[index] = BlockRef(blob_id, meta, len(buf))

    async def free(self, freed: list[FreedBlob]) -> None:
        """Delete blobs whose last reference was just committed away (walrusfs.reclaim)."""
        await self._reclaim.free(freed)

    # -- memory pressure and the background flusher -------------------------------------

    async def _make_room(self, inode: int) -> None:
        while self.dirty_bytes > self._dirty_limit:
            victim = self._pick_victim(inode)
            if victim is None:
                await self._progress.wait()  # all of it is in flight: wait for a flush
            elif not (self._settled(victim) and await self._pack(self._closed_settled())):
                await self.flush(victim.inode, full_only=self._has_full(victim))

    def _closed_settled(self) -> list[_File]:
        files = self._files.values()
        return [f for f in files if self._settled(f) and not self._is_open(f.inode)]

    def _has_full(self, f: _File) -> bool:
        return any(len(b) == self.block_size for b in f.dirty.values())

    def _pick_victim(self, inode: int) -> _File | None:
        """Whole blocks first (the writer's own, then the biggest), else the biggest file."""
        own = self._files.get(inode)
        if own is not None and self._has_full(own):
            return own
        dirty = [f for f in self._files.values() if f.dirty]
        full = [f for f in dirty if self._has_full(f)]
        if not full and any(f.inflight for f in self._files.values()):
            # Whole blocks are being stored already: wait for them rather than store a
            # partial block that the writer will complete, and rewrite, moments later.
            return None
        pool = full or dirty
        return max(pool, key=_File.dirty_size, default=None)

    async def run_flusher(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Flush files dirty for `flush_age` seconds, until cancelled; hosts read-ahead."""
        tick = max(0.05, min(1.0, self._flush_age / 2))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await nursery.start(self._reclaim.run)
                task_status.started()
                await self.fold_patches()
                self._meta.recheck_packs()
                while True:
                    await trio.sleep(tick)
                    await self._flush_old()
            finally:
                self._nursery = None

    async def _flush_old(self) -> None:
        cutoff = trio.current_time() - self._flush_age
        # Small closed files wait for a pack to fill, as long as the others wait.
        small = [f for f in self._closed_settled() if self._packable(f)]
        if sum(f.dirty_size() for f in small) >= self.block_size or any(
            f.dirty_since is not None and f.dirty_since <= cutoff for f in small
        ):
            try:
                await self._pack(small)
            except Exception as exc:  # they stay in memory; the flush below says what fails
                _log_failed("packing small files", exc)
        for f in list(self._files.values()):
            if f.dirty_since is None or f.dirty_since > cutoff:
                continue
            if self._settled(f) and self._is_open(f.inode):
                continue  # committed; stored once closed, too patched, or memory is short
            try:
                await self.flush(f.inode)
            except Exception as exc:
                # Kept dirty; the next round retries. Said once, not every round.
                if not self._flush_failing:
                    log.warning(
                        "background flush failing (%s), data stays in memory",
                        os.strerror(errno_of(exc)),
                        exc_info=not is_known(exc),
                    )
                self._flush_failing = True
            else:
                if self._flush_failing:
                    log.info("background flush works again")
                self._flush_failing = False
        try:
            await self.compact_packs()
        except Exception as exc:  # the blocks stay where they are; the next round retries
            _log_failed("compacting packs", exc)
