"""Deletes of freed blobs: bounded while rounds fail, and after a durable flush on a real
volume."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import trio

from tests.walrusfs.memblobs import MemBlobStore
from tests.walrusfs.volumes import formatted_volume, sliver_files
from walrusfs.blobstore import BlobStore
from walrusfs.fs import FileSystem
from walrusfs.metadata import ROOT_INODE, FreedBlob
from walrusfs.metastore import MetaStore
from walrusfs.reclaim import Reclaimer
from walrusfs.service import FsBlobs


async def test_a_queue_kept_while_the_nodes_are_away_is_bounded(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    store = MemBlobStore()
    freed = []
    for k in range(8):
        blob_id, meta = await store.put_blob(b"blob %d" % k)
        freed.append(FreedBlob(blob_id, meta))
    reclaim = Reclaimer(
        store, lambda blob_id: 0, trio.CapacityLimiter(4), lambda b: None, queue_max=3
    )
    store.fail_settles = True
    async with trio.open_nursery() as nursery:
        await nursery.start(reclaim.run)
        with caplog.at_level(logging.WARNING, logger="walrusfs.reclaim"):
            for blob in freed:
                await reclaim.free([blob])
            await trio.sleep(5)
        # The newest wait; the oldest are left on the nodes (a scrub removes orphans).
        assert reclaim.pending == 3 and reclaim.left_to_scrub == 5
        assert [r.levelno for r in caplog.records] == [logging.WARNING]  # said once
        store.fail_settles = False
        await trio.sleep(5)
        assert reclaim.pending == 0 and store.deletes == 3
        assert set(store.blobs) == {b.blob_id for b in freed[:5]}
        nursery.cancel_scope.cancel()


class SpiedBlobs(FsBlobs):
    """The real FsBlobs, noting how far the journal was durable at each delete."""

    def __init__(self, blobs: BlobStore, ms: MetaStore) -> None:
        super().__init__(blobs, ms)
        self.deleted: list[tuple[bytes, int, int]] = []  # (blob_id, durable seq, seq)

    async def delete_blob(self, blob_id: bytes, meta: bytes) -> None:
        journal = self.metastore.journal
        self.deleted.append((blob_id, journal.durable, journal.seq))
        await super().delete_blob(blob_id, meta)


async def test_a_real_volume_deletes_a_blob_after_its_freeing_record_is_durable(
    tmp_path: Path,
) -> None:
    vol, ms, paths = await formatted_volume(tmp_path)
    try:
        blobs = SpiedBlobs(vol.blobs, ms)
        fs = FileSystem(ms.metadata, blobs, commit=lambda durable: ms.sync(durable=durable))
        fh, attrs = await fs.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, 0, 0)
        await fs.write(fh, 0, b"a" * (1 << 16))
        await fs.flush(fh)
        (old,) = [ref.blob_id for ref in [ms.metadata.block(attrs.ino, 0)] if ref]
        await fs.write(fh, 0, b"b" * (1 << 16))
        await fs.flush(fh)  # commits the new block, freeing the old blob
        freed_at = ms.journal.seq
        assert [(b, durable >= freed_at) for b, durable, _ in blobs.deleted] == [(old, True)]
        assert not any(p.name.startswith(old.hex()) for p in sliver_files(paths[0]))
        await fs.release(fh)
    finally:
        await ms.close()
