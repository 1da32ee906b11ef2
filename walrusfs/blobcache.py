"""Stored blocks' bytes for the file layer: a bounded cache of blobs, and their fetching.

Role: a block is a blob of its own or a range of a pack (walrusfs.filedata); `fetch`
returns its stored bytes from an LRU of blob bytes keyed by blob_id (content addressed,
so never stale), or reads them from the store, once however many readers wait for them.
`prefetch` starts that read in the background for a sequential reader.

A pack's first block asked for is read alone (a few KiB, not the pack's MiBs); from a
second block of the same pack on, the reader is taken to go through what was written
together (a tree, as it was written), and the whole pack is read and cached.

A blob too big to cache whole next to others (a volume made with a large --blob-size)
is read and cached in *windows*: aligned runs of whole symbols, the smallest ranges the
store verifies on their own. Caching it whole would not fit, and not caching it made
every 1 MiB read of the kernel fetch all of a 128 MiB blob again (measured: 13 MB/s).

A reader that jumps about (a database, a VM image, git's pack lookups) is served by
windows too, of a symbol or so: fetching the whole 4 MiB blob for each 4 KiB read cost
3.8 ms a read here, the symbol 1.5 ms, and a cold disk reads 15x fewer bytes. A
sequential reader still gets whole blobs, read ahead.

Must not import pyfuse3. Talks to the blob store only through `BlobStoreProtocol`.
Thread/task safety: trio tasks of one thread.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import trio

from walrusfs.errors import FSError
from walrusfs.metadata import BlockRef
from walrusfs.reclaim import BlobStoreProtocol, Buffer

log = logging.getLogger(__name__)

# A length that reaches past the end of any blob.
WHOLE_BLOB = 1 << 62
# Packs remembered as read from (see BlockFetcher.fetch).
PACKS_SEEN = 4096
# A blob larger than this share of the cache is read in windows (see the module).
WHOLE_SHARE = 4
# A window is the fewest whole symbols that make at least this many bytes, or the
# cache's share (a small cache, as in tests, gets small windows).
WINDOW_BYTES = 4 << 20
WINDOWS_IN_CACHE = 16
# A read that is not sequential fetches the fewest whole symbols that make at least this
# many bytes around it (one symbol of a 4 MiB blob at n=7: 280 KiB), unless it asks for
# more than that (the kernel's read-around of an mmap fault: 1 MiB requests, each of
# which would take several windows in turn), or the block is cached or on its way.
RANDOM_WINDOW = 64 << 10


class _BlobCache:
    """LRU of blob bytes by blob_id (or window key), bounded in bytes."""

    def __init__(self, capacity: int, on_evict: Callable[[bytes], None] | None = None) -> None:
        self.capacity = capacity
        self.used = 0
        self._items: OrderedDict[bytes, Buffer] = OrderedDict()
        self._on_evict = on_evict

    def get(self, blob_id: bytes, length: int) -> Buffer | None:
        data = self._items.get(blob_id)
        if data is None or len(data) < length:  # a shorter copy cannot serve this read
            return None
        self._items.move_to_end(blob_id)
        return data

    def put(self, blob_id: bytes, data: Buffer) -> None:
        self.discard(blob_id)
        if len(data) > self.capacity:
            return
        self._items[blob_id] = data
        self.used += len(data)
        while self.used > self.capacity:
            key, old = self._items.popitem(last=False)
            self.used -= len(old)
            if self._on_evict is not None:
                self._on_evict(key)

    def discard(self, blob_id: bytes) -> None:
        old = self._items.pop(blob_id, None)
        if old is not None:
            self.used -= len(old)

    def __contains__(self, blob_id: bytes) -> bool:
        return blob_id in self._items


_K_BYTES = 8


def _window_key(blob_id: bytes, k: int) -> bytes:
    """The cache key of window k of a blob (never a blob id: those are shorter)."""
    return blob_id + k.to_bytes(_K_BYTES, "big")


def block_of(blob: Buffer, ref: BlockRef) -> Buffer:
    """The block's bytes of `blob` (the blob itself when they are all of it)."""
    if ref.start == 0 and len(blob) == ref.length:
        return blob
    return memoryview(blob).toreadonly()[ref.start : ref.start + ref.length]


class BlockFetcher:
    """Stored blocks' bytes: cached, fetched once, read ahead."""

    def __init__(self, store: BlobStoreProtocol, cache_bytes: int) -> None:
        self._store = store
        self._cache = _BlobCache(cache_bytes, on_evict=self._evicted)
        self._whole_max = cache_bytes // WHOLE_SHARE
        self._fetching: dict[bytes, trio.Event] = {}
        self._packs_seen: set[bytes] = set()  # packs a block was read from (see _load)
        self._windows: dict[bytes, set[bytes]] = {}  # blob_id -> keys of its cached windows

    def remember(self, blob_id: bytes, data: Buffer) -> None:
        """Cache a blob's bytes just stored (never written to afterwards)."""
        if len(data) <= self._whole_max:
            self._cache.put(blob_id, data)

    def forget(self, blob_id: bytes) -> None:
        """Drop a blob that is being deleted."""
        self._cache.discard(blob_id)
        for key in self._windows.pop(blob_id, ()):
            self._cache.discard(key)

    def usage(self) -> dict[str, int]:
        """The cache's size and the bytes it holds now."""
        return {"size": self._cache.capacity, "used": self._cache.used}

    def windowed(self, ref: BlockRef) -> bool:
        """Whether the block's blob is read in windows (see the module). Raises an FSError
        if its metadata is damaged."""
        return self._store.blob_length(ref.blob_id, ref.meta) > self._whole_max

    async def fetch(self, ref: BlockRef) -> Buffer:
        """The block's stored bytes (`ref.length` of them, fewer only if the blob is
        short). Raises what the store's get_range raises."""

        def cached() -> Buffer | None:
            data = self._cache.get(ref.blob_id, ref.start + ref.length)
            return None if data is None else block_of(data, ref)

        return await self._once(ref.blob_id, cached, functools.partial(self._load, ref))

    async def read(
        self, ref: BlockRef, start: int, n: int, *, sequential: bool = True
    ) -> bytes | memoryview:
        """The block's stored bytes in [start, start + n): fewer past its end, and where
        the blob is short. Reads whole windows of a windowed blob; of another, the whole
        blob, or for a reader that is not `sequential`, the small windows around the
        range (see the module). Raises what the store's get_range raises."""
        stop = min(start + n, ref.length)
        if stop <= start:
            return b""
        if self.windowed(ref):
            w = self._window_size(ref)
        else:
            w = 0 if sequential else self._range_window(ref, stop - start)
            if not w:
                return memoryview(await self.fetch(ref)).toreadonly()[start:stop]
        lo, hi = ref.start + start, ref.start + stop
        parts = []
        for k in range(lo // w, (hi - 1) // w + 1):
            data = memoryview(await self._window(ref, k, w)).toreadonly()
            parts.append(data[max(lo - k * w, 0) : hi - k * w])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _range_window(self, ref: BlockRef, n: int) -> int:
        """The window size in which a read of `n` bytes that is not sequential is better
        served than by the whole blob, or 0 where it is not: the block must be a blob of
        its own (a pack's blocks are read as the module says), the read no bigger than a
        window (so two at the most), less than half the block, and the block neither
        cached whole nor being fetched whole (then that serves it)."""
        if ref.start != 0 or ref.blob_id in self._fetching:
            return 0
        unit = self._store.read_unit(ref.blob_id, ref.meta)
        w = unit * -(-min(RANDOM_WINDOW, self.window_bytes) // unit)
        if n > w or 2 * w > ref.length or self._cache.get(ref.blob_id, ref.length) is not None:
            return 0
        return w

    def prefetch(
        self, nursery: trio.Nursery, ref: BlockRef, start: int = 0, stop: int | None = None
    ) -> None:
        """Start fetching the block's bytes in [start, stop) in `nursery`, unless cached
        or on their way: of a windowed blob, the windows holding them, as many as the
        read-ahead budget allows (half the cache, one window at least); of another, the
        whole block, if `start` is 0 (else a reader is in it, fetching it already)."""
        try:
            windowed = self.windowed(ref)
        except FSError:
            return  # the read that needs it will report it
        if not windowed:
            if start > 0:
                return
            if ref.blob_id not in self._cache and ref.blob_id not in self._fetching:
                nursery.start_soon(self._prefetch_one, self.fetch, ref)
            return
        w = self._window_size(ref)
        stop = ref.length if stop is None else min(stop, ref.length)
        if stop <= start:
            return
        first = (ref.start + start) // w
        last = (ref.start + stop - 1) // w
        budget = max(1, self._cache.capacity // 2 // w - 1)
        for k in range(first, min(last, first + budget - 1) + 1):
            key = _window_key(ref.blob_id, k)
            if key not in self._cache and key not in self._fetching:
                nursery.start_soon(self._prefetch_one, self._window, ref, k, w)

    async def _prefetch_one(self, fetch: Callable[..., Awaitable[Buffer]], *args: object) -> None:
        try:
            await fetch(*args)
        except Exception as exc:  # the read that needs it will report it
            log.debug("read-ahead of a blob failed: %s", exc)

    async def _once(
        self,
        key: bytes,
        cached: Callable[[], Buffer | None],
        load: Callable[[], Awaitable[Buffer]],
    ) -> Buffer:
        """`cached()`, or else `load()`: once however many tasks ask for `key` at once."""
        while True:
            data = cached()
            if data is not None:
                return data
            pending = self._fetching.get(key)
            if pending is None:
                break
            await pending.wait()  # someone (read-ahead) is fetching it; then retry
        done = self._fetching[key] = trio.Event()
        try:
            return await load()
        finally:
            del self._fetching[key]
            done.set()

    @property
    def window_bytes(self) -> int:
        """What a window holds at least: WINDOW_BYTES, or less in a small cache."""
        return max(1, min(WINDOW_BYTES, self._cache.capacity // WINDOWS_IN_CACHE))

    def _window_size(self, ref: BlockRef) -> int:
        unit = self._store.read_unit(ref.blob_id, ref.meta)
        return unit * -(-self.window_bytes // unit)

    async def _window(self, ref: BlockRef, k: int, w: int) -> Buffer:
        """Window k (bytes [k*w, (k+1)*w) of the blob, fewer at its end)."""
        key = _window_key(ref.blob_id, k)

        async def load() -> Buffer:
            data = await self._store.get_range(ref.blob_id, ref.meta, k * w, w)
            self._cache.put(key, data)
            if key in self._cache:
                self._windows.setdefault(ref.blob_id, set()).add(key)
            return data

        return await self._once(key, lambda: self._cache.get(key, 0), load)

    def _evicted(self, key: bytes) -> None:
        keys = self._windows.get(key[:-_K_BYTES])
        if keys is not None and key in keys:
            keys.discard(key)
            if not keys:
                del self._windows[key[:-_K_BYTES]]

    async def _load(self, ref: BlockRef) -> Buffer:
        """fetch from the store. A block that starts at 0 is a blob of its own (packs
        begin with a header): read and cached. A block in a pack, see the module."""
        if ref.start == 0:
            data = await self._store.get_range(ref.blob_id, ref.meta, 0, ref.length)
            if len(data) <= self._whole_max:  # a windowed blob's reads use its windows
                self._cache.put(ref.blob_id, data)
            return data
        if ref.blob_id not in self._packs_seen:
            data = await self._store.get_range(ref.blob_id, ref.meta, ref.start, ref.length)
            if len(self._packs_seen) >= PACKS_SEEN:
                self._packs_seen.clear()  # a cheap bound
            self._packs_seen.add(ref.blob_id)
            return data
        data = await self._store.get_range(ref.blob_id, ref.meta, 0, WHOLE_BLOB)
        self._cache.put(ref.blob_id, data)
        return block_of(data, ref)
