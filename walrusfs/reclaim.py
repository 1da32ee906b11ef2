"""Blobs' puts and deletes for the file layer: deletes only once no state can name them.

Role: FileData hands over the blobs that a commit freed (no block names them). They are
deleted from the nodes in rounds, each after `BlobStoreProtocol.settle`: every change
committed so far is on stable storage on the nodes. A blob's sliver files therefore go
only once no state that could come back names it, also after a power loss of every node:
a journal append in a node's page cache may be lost where the unlink of a sliver file is
not, since a filesystem does not promise to keep that order.

While the mount's background runs (`run`), a round starts at most every REAP_EVERY
seconds, so that a tree being deleted or rewritten costs one flush of the nodes a second,
not one per file. Without it (tests, tools) `free` drains the queue at once.

Content addressing makes files share blobs, so a put and a delete of the same blob_id
may race: `put` waits out a delete of the id it got and puts again, and returns the id
pinned, so that a delete decided before the caller's commit leaves it alone (`unpin`
after the commit). A blob named again before its round is not deleted.

Must not import pyfuse3. Thread/task safety: trio tasks of one thread.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Protocol

import trio

from walrusfs.metadata import FreedBlob

log = logging.getLogger(__name__)

# Seconds between delete rounds, each one flush (syncfs) of the nodes. 1 GiB overwritten
# in place (256 blobs freed) took as long as with deletes after a plain journal sync.
REAP_EVERY = 1.0

# Freed blobs kept waiting while their rounds fail (more than f nodes away): ~1 KiB each at
# n=7. Past it the oldest are left on the nodes, where a scrub finds and removes them.
QUEUE_MAX = 16_384

Buffer = bytes | bytearray | memoryview


class BlobStoreProtocol(Protocol):
    """What the file layer needs from the blob store (walrusfs.service.FsBlobs)."""

    async def put_blob(self, data: Buffer, *, durable: bool = False) -> tuple[bytes, bytes]:
        """Store `data` on a quorum of nodes (`durable`: on their stable storage too);
        return (blob_id, metadata). Same content, same blob_id."""
        ...

    async def get_range(self, blob_id: bytes, meta: bytes, offset: int, length: int) -> Buffer:
        """Verified bytes of the blob (never written to afterwards), clipped to its end (so
        WHOLE_BLOB asks for all of it). Raises an FSError (EIO) if they cannot be read."""
        ...

    async def delete_blob(self, blob_id: bytes, meta: bytes) -> None: ...

    async def settle(self) -> None:
        """Return once every metadata change committed so far is on stable storage on a
        quorum of nodes. Raises an FSError if too few nodes take it."""
        ...

    def blob_length(self, blob_id: bytes, meta: bytes) -> int:
        """The blob's length in bytes, as its metadata says (no I/O). Raises an FSError if
        the metadata is damaged."""
        ...

    def read_unit(self, blob_id: bytes, meta: bytes) -> int:
        """The smallest range of the blob get_range reads and verifies on its own (a
        symbol): ranges aligned to it cost no bytes beyond them. No I/O; raises an
        FSError if the metadata is damaged."""
        ...


class Reclaimer:
    """Puts blobs safely against deletes, and deletes freed blobs once that is safe."""

    def __init__(
        self,
        store: BlobStoreProtocol,
        refcount: Callable[[bytes], int],
        limiter: trio.CapacityLimiter,
        forget: Callable[[bytes], None],
        *,
        queue_max: int = QUEUE_MAX,
    ) -> None:
        self._store = store
        self._queue_max = queue_max
        self._overflowing = False
        self._refcount = refcount  # how many committed blocks name a blob
        self._limiter = limiter  # shared with the caller's other store calls
        self._forget = forget  # drop a blob from the caller's caches
        self._queue: list[FreedBlob] = []
        self._queued = trio.Event()
        self._background = False
        self._in_round = 0
        self._pinned: Counter[bytes] = Counter()
        self._deleting: dict[bytes, trio.Event] = {}
        self._watchers: dict[object, set[bytes]] = {}
        self.left_to_scrub = 0  # freed blobs dropped from a full queue

    @property
    def pending(self) -> int:
        """Freed blobs not yet deleted: queued, or in the round under way."""
        return len(self._queue) + self._in_round

    async def put(self, buf: Buffer, *, durable: bool = False) -> tuple[bytes, bytes]:
        """put_blob, safe against a concurrent delete of the same blob_id; the id returned
        is pinned (see `unpin`). Raises what put_blob raises.

        The blob_id is only known when the put returns. If a delete of that id started
        while we were putting, our slivers may be among those deleted: wait for the
        delete and put again.
        """
        while True:
            token = object()
            seen: set[bytes] = set()
            self._watchers[token] = seen
            try:
                async with self._limiter:
                    blob_id, meta = await self._store.put_blob(buf, durable=durable)
            finally:
                del self._watchers[token]
            deleting = self._deleting.get(blob_id)
            if deleting is not None:
                await deleting.wait()
            elif blob_id not in seen:
                self._pinned[blob_id] += 1
                return blob_id, meta

    def unpin(self, blob_ids: list[bytes]) -> None:
        """The commit naming these puts' blobs is done (or failed): they are free game."""
        self._pinned.subtract(blob_ids)
        self._pinned += Counter()  # drop zero counts

    async def free(self, freed: list[FreedBlob]) -> None:
        """Delete these blobs (their last reference was just committed away) unless they
        are named again first: in the next round while `run` runs, else now."""
        if not freed:
            return
        self.free_later(freed)
        if not self._background:
            await self.drain()

    def free_later(self, blobs: list[FreedBlob]) -> None:
        """As `free`, in the next round (or drain): also for blobs put for a commit that
        did not happen, which nothing may name (a put that a later one in the same
        store left uncommitted, nodes being full, would otherwise hold its space on the
        nodes until a scrub, a day later)."""
        self._queue.extend(blobs)
        if len(self._queue) > self._queue_max:
            dropped = len(self._queue) - self._queue_max
            del self._queue[:dropped]
            if not self._overflowing:  # said once per outage, not per free
                log.warning(
                    "over %d freed blobs wait for the nodes: the oldest are left for a scrub",
                    self._queue_max,
                )
                self._overflowing = True
            self.left_to_scrub += dropped
        if self._background:
            self._queued.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Delete freed blobs in rounds, until cancelled; what is left stays queued."""
        self._background = True
        try:
            task_status.started()
            while True:
                if not self._queue:  # else a round failed: try again
                    await self._queued.wait()
                self._queued = trio.Event()
                await self._round()
                await trio.sleep(REAP_EVERY)
        finally:
            self._background = False

    async def drain(self) -> None:
        """Delete every queued blob now (unmount); what cannot be waits for the next
        round or drain, or, if the mount ends first, for a scrub."""
        while self._queue:
            try:
                await self._round(raise_errors=True)
            except Exception as exc:  # garbage on the nodes, not a user-visible error
                log.warning("%d freed blobs not deleted yet: %s", len(self._queue), exc)
                return

    async def _round(self, *, raise_errors: bool = False) -> None:
        batch, self._queue = self._queue, []
        if not batch:
            return
        self._in_round = len(batch)
        try:
            try:
                await self._store.settle()
            except BaseException as exc:
                self._queue[:0] = batch  # the next round (or drain) tries again
                if raise_errors or not isinstance(exc, Exception):
                    raise
                log.debug("deletes wait for the nodes: %s", exc)
                return
            self._overflowing = False
            await self._delete(batch)
        finally:
            self._in_round = 0

    async def _delete(self, freed: list[FreedBlob]) -> None:
        victims = []
        for blob in freed:
            if (
                self._pinned[blob.blob_id]
                or blob.blob_id in self._deleting
                or self._refcount(blob.blob_id)
            ):
                continue  # named again (or about to be) since the commit
            self._deleting[blob.blob_id] = trio.Event()
            for seen in self._watchers.values():
                seen.add(blob.blob_id)
            self._forget(blob.blob_id)
            victims.append(blob)
        async with trio.open_nursery() as nursery:
            for blob in victims:
                nursery.start_soon(self._delete_one, blob)

    async def _delete_one(self, blob: FreedBlob) -> None:
        try:
            async with self._limiter:
                await self._store.delete_blob(blob.blob_id, blob.meta)
        except Exception as exc:
            # Garbage on the nodes, not a user-visible error: a scrub collects it.
            log.warning("blob %s not deleted: %s", blob.blob_id.hex(), exc)
        except BaseException:
            self._queue.append(blob)  # cancelled (unmount): drain deletes it
            raise
        finally:
            self._deleting.pop(blob.blob_id).set()
