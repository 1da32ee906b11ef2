"""The reclaimer alone: deletes in rounds after a settle, bounded while rounds fail."""

from __future__ import annotations

import logging

import pytest
import trio

from tests.walrusfs.memblobs import MemBlobStore
from walrusfs.metadata import FreedBlob
from walrusfs.reclaim import Reclaimer


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
