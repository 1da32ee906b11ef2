"""Stored blocks' bytes for the file layer: a bounded cache of blobs, and their fetching.

Role: a block is a blob of its own or a range of a pack (walrusfs.filedata); `fetch`
returns its stored bytes from an LRU of blob bytes keyed by blob_id (content addressed,
so never stale), or reads them from the store, once however many readers wait for them.
`prefetch` starts that read in the background for a sequential reader.

A pack's first block asked for is read alone (a few KiB, not the pack's MiBs); from a
second block of the same pack on, the reader is taken to go through what was written
together (a tree, as it was written), and the whole pack is read and cached.

Must not import pyfuse3. Talks to the blob store only through `BlobStoreProtocol`.
Thread/task safety: trio tasks of one thread.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import trio

from walrusfs.metadata import BlockRef
from walrusfs.reclaim import BlobStoreProtocol, Buffer

log = logging.getLogger(__name__)

# A length that reaches past the end of any blob.
WHOLE_BLOB = 1 << 62
# Packs remembered as read from (see BlockFetcher.fetch).
PACKS_SEEN = 4096


class _BlobCache:
    """LRU of blob bytes by blob_id, bounded in bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._items: OrderedDict[bytes, Buffer] = OrderedDict()

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
            _, old = self._items.popitem(last=False)
            self.used -= len(old)

    def discard(self, blob_id: bytes) -> None:
        old = self._items.pop(blob_id, None)
        if old is not None:
            self.used -= len(old)

    def __contains__(self, blob_id: bytes) -> bool:
        return blob_id in self._items


def block_of(blob: Buffer, ref: BlockRef) -> Buffer:
    """The block's bytes of `blob` (the blob itself when they are all of it)."""
    if ref.start == 0 and len(blob) == ref.length:
        return blob
    return memoryview(blob).toreadonly()[ref.start : ref.start + ref.length]


class BlockFetcher:
    """Stored blocks' bytes: cached, fetched once, read ahead."""

    def __init__(self, store: BlobStoreProtocol, cache_bytes: int) -> None:
        self._store = store
        self._cache = _BlobCache(cache_bytes)
        self._fetching: dict[bytes, trio.Event] = {}
        self._packs_seen: set[bytes] = set()  # packs a block was read from (see _load)

    def remember(self, blob_id: bytes, data: Buffer) -> None:
        """Cache a blob's bytes just stored (never written to afterwards)."""
        self._cache.put(blob_id, data)

    def forget(self, blob_id: bytes) -> None:
        """Drop a blob that is being deleted."""
        self._cache.discard(blob_id)

    async def fetch(self, ref: BlockRef) -> Buffer:
        """The block's stored bytes (`ref.length` of them, fewer only if the blob is
        short). Raises what the store's get_range raises."""
        while True:
            data = self._cache.get(ref.blob_id, ref.start + ref.length)
            if data is not None:
                return block_of(data, ref)
            pending = self._fetching.get(ref.blob_id)
            if pending is None:
                break
            await pending.wait()  # someone (read-ahead) is fetching it; then retry
        done = self._fetching[ref.blob_id] = trio.Event()
        try:
            return await self._load(ref)
        finally:
            del self._fetching[ref.blob_id]
            done.set()

    def prefetch(self, nursery: trio.Nursery, ref: BlockRef) -> None:
        """Start fetching the block in `nursery`, unless it is cached or on its way."""
        if ref.blob_id not in self._cache and ref.blob_id not in self._fetching:
            nursery.start_soon(self._prefetch_one, ref)

    async def _prefetch_one(self, ref: BlockRef) -> None:
        try:
            await self.fetch(ref)
        except Exception as exc:  # the read that needs it will report it
            log.debug("read-ahead of blob %s failed: %s", ref.blob_id.hex(), exc)

    async def _load(self, ref: BlockRef) -> Buffer:
        """fetch from the store. A block that starts at 0 is a blob of its own (packs
        begin with a header): read and cached. A block in a pack, see the module."""
        if ref.start == 0:
            data = await self._store.get_range(ref.blob_id, ref.meta, 0, ref.length)
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
