"""The blob store over real node directories: healthy, degraded, corrupt, hung, full, beyond f."""

from __future__ import annotations

import errno
import os
import random
import shutil
import threading
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from backends import LocalStore, NodeIOError, RemoteMountStore
from codec import BlobMetadata
from tests.walrusfs.volumes import (
    back_unseen_others_gone,
    flip_byte,
    hung_file,
    node_paths,
    sliver_file,
    sliver_files,
    tmpfs,
)
from walrusfs.blobstore import PutResult
from walrusfs.errors import NoSpace, StorageUnavailable
from walrusfs.nodeset import CORRUPT_WARNINGS, NodeState
from walrusfs.sliverfile import header_size
from walrusfs.volume import Volume, create_volume, open_volume

N = 7
OPTS = {"node_timeout": 3.0, "hedge_after": 0.3, "grace": 0.3}


async def make_volume(root: Path, n: int = N, blob_size: int = 1 << 20) -> tuple[Volume, list[str]]:
    paths = node_paths(root, n)
    await create_volume(paths, blob_size=blob_size)
    return await open_volume(paths[0], **OPTS), paths


def states(vol: Volume) -> list[str]:
    return [str(n["state"]) for n in vol.nodes.snapshot()]


def systematic_nodes(vol: Volume, meta: bytes) -> list[int]:
    """The nodes holding the blob's systematic primary slivers (the ones healthy reads use)."""
    m = BlobMetadata.from_bytes(meta)
    return [m.node_of_pair(p) for p in range(vol.params.R)]


async def test_roundtrip_of_many_sizes_and_ranges(tmp_path: Path) -> None:
    vol, _ = await make_volume(tmp_path)
    rng = random.Random(1)
    for size in (0, 1, 63, 64, 4095, 4097, 15 * 64 + 1, 1 << 20, (1 << 20) + 1):
        data = rng.randbytes(size)
        r = await vol.blobs.put_blob(data)
        assert r.missed == ()
        assert bytes(await vol.blobs.get_blob(r.blob_id, r.meta)) == data
        for _ in range(5):
            off, length = rng.randrange(size + 1), rng.randrange(size + 10)
            assert (
                await vol.blobs.get_range(r.blob_id, r.meta, off, length)
                == data[off : off + length]
            )
    assert states(vol) == ["up"] * N


async def test_identical_content_is_stored_once(tmp_path: Path) -> None:
    vol, paths = await make_volume(tmp_path)
    a = await vol.blobs.put_blob(b"same bytes" * 1000)
    b = await vol.blobs.put_blob(bytearray(b"same bytes" * 1000))
    assert a.blob_id == b.blob_id
    assert all(len(sliver_files(p)) == 1 for p in paths)


async def test_range_reads_touch_only_the_node_holding_them(tmp_path: Path) -> None:
    vol, _ = await make_volume(tmp_path)
    data = os.urandom(600_000)
    r = await vol.blobs.put_blob(data)
    meta = vol.blobs.metadata(r.blob_id, r.meta)
    row = vol.params.C * meta.symbol_size
    before = [n.calls for n in vol.nodes.nodes]
    assert await vol.blobs.get_range(r.blob_id, r.meta, row + 10, 100) == data[row + 10 : row + 110]
    touched = [i for i, n in enumerate(vol.nodes.nodes) if n.calls != before[i]]
    assert touched == [meta.node_of_pair(1)]


async def a_stored_blob(
    tmp_path: Path,
) -> tuple[Volume, list[str], bytes, PutResult, BlobMetadata]:
    """A volume holding one 900 kB blob: (volume, node paths, data, put result, metadata)."""
    vol, paths = await make_volume(tmp_path)
    data = os.urandom(900_000)
    r = await vol.blobs.put_blob(data)
    return vol, paths, data, r, vol.blobs.metadata(r.blob_id, r.meta)


async def test_a_range_of_a_lost_row_is_read_from_its_column_copies(tmp_path: Path) -> None:
    """Symbol (i, j) of a blob is also symbol i of secondary sliver j: with the node of
    row 1 gone, a range in row 1 is read from those copies (the range, not the blob)."""
    vol, paths, data, r, meta = await a_stored_blob(tmp_path)
    s, row = meta.symbol_size, vol.params.C * meta.symbol_size
    lost = meta.node_of_pair(1)
    shutil.rmtree(paths[lost])
    await vol.nodes.probe(lost)
    assert states(vol)[lost] == "down"
    columns = [meta.node_of_pair(N - 1 - j) for j in (0, 1, 2)]  # of row 1's symbols 0-2
    before = [n.calls for n in vol.nodes.nodes]
    off, length = row + s - 10, s + 20
    assert await vol.blobs.get_range(r.blob_id, r.meta, off, length) == data[off : off + length]
    touched = [i for i, n in enumerate(vol.nodes.nodes) if n.calls != before[i]]
    assert sorted(touched) == sorted(columns)
    assert vol.blobs.stats.degraded_reads == 1

    # A copy that fails verification is never returned: the blob is decoded instead.
    # (Column 1's secondary sliver follows its pair's primary; row 1 is its symbol 1.)
    at = header_size(N) + (vol.params.C + 1) * s + 7
    flip_byte(sliver_file(paths[columns[1]], r.blob_id), at)
    assert await vol.blobs.get_range(r.blob_id, r.meta, off, length) == data[off : off + length]
    assert vol.blobs.stats.corrupt_slivers == 1


async def test_a_range_whose_copies_are_both_lost_is_decoded_from_its_column(
    tmp_path: Path,
) -> None:
    """Row 1's node and the node of column 0's copy gone (f = 2): symbol (1, 0) is rebuilt
    from symbol 0 of R other rows, without reading the rest of any sliver."""
    vol, paths, data, r, meta = await a_stored_blob(tmp_path)
    s, row = meta.symbol_size, vol.params.C * meta.symbol_size
    lost = [meta.node_of_pair(1), meta.node_of_pair(N - 1)]  # row 1; column 0's copy
    for i in lost:
        shutil.rmtree(paths[i])
        await vol.nodes.probe(i)
    # Every other sliver damaged past symbol 0: a read of more than column 0 would see it.
    for i in set(range(N)) - set(lost):
        flip_byte(sliver_file(paths[i], r.blob_id), header_size(N) + 3 * s + 5)
    off, length = row + 100, s - 200
    assert await vol.blobs.get_range(r.blob_id, r.meta, off, length) == data[off : off + length]
    assert vol.blobs.stats.corrupt_slivers == 0


async def test_a_range_on_a_hung_row_is_hedged_with_its_column_copies(tmp_path: Path) -> None:
    """Row 1's sliver file hangs (its node still taken as up): the range comes from the
    copies of its symbols, not from the whole blob decoded after the range's deadline."""
    vol, paths, data, r, meta = await a_stored_blob(tmp_path)
    s, row = meta.symbol_size, vol.params.C * meta.symbol_size
    hung = meta.node_of_pair(1)
    columns = {meta.node_of_pair(N - 1 - j) for j in (0, 1)}
    # Every other sliver damaged past symbol 1: reading more than the copies would see it.
    for i in set(range(N)) - columns - {hung}:
        flip_byte(sliver_file(paths[i], r.blob_id), header_size(N) + 3 * s + 5)
    off, length = row + 100, s
    with hung_file(sliver_file(paths[hung], r.blob_id)):
        got = await vol.blobs.get_range(r.blob_id, r.meta, off, length)
    assert got == data[off : off + length]
    assert vol.blobs.stats.corrupt_slivers == 0


async def test_concurrent_gets_of_a_blob_share_one_read(tmp_path: Path) -> None:
    """Range reads that fall back to the whole blob at once (windows read ahead) must not
    each read and decode it: one read, and its bytes for all."""
    vol, paths = await make_volume(tmp_path)
    data = os.urandom(900_000)
    r = await vol.blobs.put_blob(data)
    for i in systematic_nodes(vol, r.meta)[:2]:  # a decode, not only reads
        shutil.rmtree(paths[i])
    got: list[bytes] = []

    async def get() -> None:
        got.append(bytes(await vol.blobs.get_blob(r.blob_id, r.meta)))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(get)
    assert got == [data] * 3
    assert (vol.blobs.stats.gets, vol.blobs.stats.degraded_reads) == (1, 1)
    # Once it has ended, a get reads again (nothing is kept here: caching is the file
    # layer's business).
    assert bytes(await vol.blobs.get_blob(r.blob_id, r.meta)) == data
    assert vol.blobs.stats.gets == 2

    # When the shared read fails, each caller gets the error (after trying on its own).
    for i in range(N):
        shutil.rmtree(paths[i], ignore_errors=True)
    failed: list[str] = []

    async def get_failing() -> None:
        with pytest.raises(StorageUnavailable) as info:
            await vol.blobs.get_blob(r.blob_id, r.meta)
        failed.append(str(info.value))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(get_failing)
    assert len(failed) == 3 and vol.blobs.stats.failed_gets == 3


async def test_f_nodes_removed_reads_and_writes_go_on(tmp_path: Path) -> None:
    vol, paths = await make_volume(tmp_path)
    data = os.urandom(900_000)
    r = await vol.blobs.put_blob(data)
    gone = systematic_nodes(vol, r.meta)[:2]  # the worst case: two systematic slivers lost
    for i in gone:
        shutil.rmtree(paths[i])
    assert bytes(await vol.blobs.get_blob(r.blob_id, r.meta)) == data
    r2 = await vol.blobs.put_blob(data[::-1])
    assert set(r2.missed) == set(gone)
    assert bytes(await vol.blobs.get_blob(r2.blob_id, r2.meta)) == data[::-1]
    assert [s for i, s in enumerate(states(vol)) if i in gone] == ["down", "down"]
    assert vol.blobs.stats.degraded_reads >= 1


async def test_more_than_f_nodes_lost_is_a_clean_error_and_recovers(tmp_path: Path) -> None:
    vol, paths = await make_volume(tmp_path)
    data = os.urandom(300_000)
    r = await vol.blobs.put_blob(data)
    # f+1 nodes lost: writes need n-f = 5 nodes and fail; reads need only R = 3 primaries.
    away = [0, 1, 2]
    for i in away:
        os.rename(paths[i], paths[i] + ".away")
    with trio.fail_after(20):
        with pytest.raises(StorageUnavailable, match="need 5"):
            await vol.blobs.put_blob(b"new data")
    # Nothing of the failed put is left on the nodes that took it.
    assert all(len(sliver_files(p)) == 1 for i, p in enumerate(paths) if i not in away)
    assert bytes(await vol.blobs.get_blob(r.blob_id, r.meta)) == data
    # n-R+1 = 5 nodes lost: fewer than R slivers of either kind remain; a clean error, no hang.
    away += [3, 4]
    for i in (3, 4):
        os.rename(paths[i], paths[i] + ".away")
    with trio.fail_after(20), pytest.raises(StorageUnavailable, match="readable"):
        await vol.blobs.get_blob(r.blob_id, r.meta)
    for i in away:
        os.rename(paths[i] + ".away", paths[i])
    await vol.nodes.probe_all()
    assert states(vol) == ["up"] * N
    assert bytes(await vol.blobs.get_blob(r.blob_id, r.meta)) == data


async def test_a_put_short_of_nodes_looks_again_at_those_taken_as_down(tmp_path: Path) -> None:
    vol, paths = await make_volume(tmp_path)
    # Only f nodes are gone, so the put must still find its n-f.
    await back_unseen_others_gone(vol, paths, back=(3, 4), gone=(1, 5))
    assert [states(vol)[i] for i in (1, 3, 4, 5)] == ["up", "down", "down", "up"]
    data = os.urandom(300_000)
    r = await vol.blobs.put_blob(data)
    assert set(r.missed) == {1, 5}
    assert [states(vol)[i] for i in (1, 3, 4, 5)] == ["down", "up", "up", "down"]
    assert all(len(sliver_files(paths[i])) == 1 for i in (0, 2, 3, 4, 6))
    assert bytes(await vol.blobs.get_blob(r.blob_id, r.meta)) == data
    # With more than f truly gone it still fails, after one more look.
    os.rename(paths[3], paths[3] + ".away")
    with trio.fail_after(20), pytest.raises(StorageUnavailable, match="need 5"):
        await vol.blobs.put_blob(b"new data")


async def test_a_get_short_of_slivers_looks_again_at_nodes_taken_as_down(tmp_path: Path) -> None:
    vol, paths = await make_volume(tmp_path)
    data = os.urandom(300_000)
    r = await vol.blobs.put_blob(data)
    await back_unseen_others_gone(vol, paths, back=(0, 1), gone=(2, 3))
    os.unlink(sliver_files(paths[4])[0])  # say node 4 was away when the blob was put
    # Only 5 and 6 of the nodes not taken as down hold a sliver pair: fewer than R = 3.
    assert bytes(await vol.blobs.get_blob(r.blob_id, r.meta)) == data
    assert [states(vol)[i] for i in (0, 1)] == ["up", "up"]


@pytest.mark.parametrize("where", ["data", "header"])
async def test_flipped_bytes_in_any_sliver_are_caught(tmp_path: Path, where: str) -> None:
    vol, paths = await make_volume(tmp_path)
    data = os.urandom(500_000)
    r = await vol.blobs.put_blob(data)
    rng = random.Random(where)
    for victim in range(N):
        vol2 = await open_volume(paths[0], **OPTS)  # fresh: no cached headers
        path = sliver_file(paths[victim], r.blob_id)
        size = path.stat().st_size
        hsize = header_size(N)
        offset = rng.randrange(hsize, size) if where == "data" else rng.randrange(44, hsize - 64)
        original = path.read_bytes()
        flip_byte(path, offset)
        got = await vol2.blobs.get_blob(r.blob_id, r.meta)
        assert bytes(got) == data
        path.write_bytes(original)


async def test_f_corrupt_nodes_at_once_are_survived_and_reported(tmp_path: Path) -> None:
    vol, paths = await make_volume(tmp_path)
    data = os.urandom(700_000)
    r = await vol.blobs.put_blob(data)
    bad = systematic_nodes(vol, r.meta)[:2]
    for i in bad:
        flip_byte(sliver_file(paths[i], r.blob_id), header_size(N) + 100)
    assert bytes(await vol.blobs.get_blob(r.blob_id, r.meta)) == data
    assert [vol.nodes.nodes[i].corrupt for i in bad] == [1, 1]
    assert vol.blobs.stats.corrupt_slivers == 2


async def test_a_node_full_of_corrupt_slivers_is_not_a_log_line_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A failing disk returns garbage for every sliver: each is counted (status), the
    first few are warned of, then one line says the rest go to debug."""
    vol, paths = await make_volume(tmp_path, blob_size=1 << 16)
    victim, blobs = 3, []
    while len(blobs) < 12:
        data = os.urandom(50_000)
        r = await vol.blobs.put_blob(data)
        if victim in systematic_nodes(vol, r.meta):  # a healthy get reads its sliver
            flip_byte(sliver_file(paths[victim], r.blob_id), header_size(N) + 100)
            blobs.append((data, r))
    fresh = await open_volume(paths[0], **OPTS)
    caplog.set_level("DEBUG", logger="walrusfs.nodeset")
    for data, r in blobs:
        assert bytes(await fresh.blobs.get_blob(r.blob_id, r.meta)) == data
    assert [n.corrupt for n in fresh.nodes.nodes] == [12 if i == victim else 0 for i in range(N)]
    warned = [rec for rec in caplog.records if rec.levelname == "WARNING"]
    assert len([w for w in warned if "corrupt data:" in w.getMessage()]) == CORRUPT_WARNINGS
    assert any("logged at debug level only" in w.getMessage() for w in warned)
    debug = [rec for rec in caplog.records if rec.levelname == "DEBUG"]
    assert len([d for d in debug if "corrupt data:" in d.getMessage()]) == 12 - CORRUPT_WARNINGS


async def test_a_hung_node_does_not_stall_reads(tmp_path: Path) -> None:
    """A FIFO in place of a sliver file blocks open() in the kernel, as a hung mount does."""
    vol, paths = await make_volume(tmp_path)
    data = os.urandom(400_000)
    r = await vol.blobs.put_blob(data)
    hung = systematic_nodes(vol, r.meta)[0]
    with hung_file(sliver_file(paths[hung], r.blob_id)):
        with trio.fail_after(OPTS["node_timeout"]):  # well before the hung read would time out
            assert bytes(await vol.blobs.get_blob(r.blob_id, r.meta)) == data
        assert states(vol)[hung] == "suspect"


async def test_gets_read_their_primaries_in_one_batch_also_degraded(tmp_path: Path) -> None:
    vol, paths = await make_volume(tmp_path)
    data = os.urandom(600_000)
    r = await vol.blobs.put_blob(data)
    for _ in range(2):  # header read with the sliver, then from the cache
        assert bytes(await vol.blobs.get_blob(r.blob_id, r.meta)) == data
    assert vol.blobs.stats.extra["batched_gets"] == 2
    assert vol.blobs.stats.degraded_reads == 0
    # Two systematic nodes gone (f = 2): two parity primaries stand in, and are decoded.
    gone = systematic_nodes(vol, r.meta)[1:]
    for down in gone:
        os.rename(paths[down], paths[down] + ".away")
    vol2 = await open_volume(next(p for i, p in enumerate(paths) if i not in gone), **OPTS)
    assert bytes(await vol2.blobs.get_blob(r.blob_id, r.meta)) == data
    assert vol2.blobs.stats.extra["batched_gets"] == 1
    assert vol2.blobs.stats.degraded_reads == 1


async def test_nodes_on_remote_mounts_are_read_in_parallel_not_batched(tmp_path: Path) -> None:
    with tmpfs(str(tmp_path / "mnt"), "64m"):
        vol, _ = await make_volume(tmp_path / "mnt")
        assert all(isinstance(n.store, RemoteMountStore) for n in vol.nodes.nodes)
        data = os.urandom(600_000)
        r = await vol.blobs.put_blob(data)
        assert bytes(await vol.blobs.get_blob(r.blob_id, r.meta)) == data
        assert "batched_gets" not in vol.blobs.stats.extra


async def test_a_batch_left_behind_never_writes_into_a_returned_blob(tmp_path: Path) -> None:
    """The batch reads the systematic slivers in turn: one hung on the first leaves the
    thread behind, which reads the others later, into the buffer it was given."""
    vol, paths = await make_volume(tmp_path)
    data = os.urandom(600_000)
    r = await vol.blobs.put_blob(data)
    first, *others = systematic_nodes(vol, r.meta)
    with hung_file(sliver_file(paths[first], r.blob_id)):
        with trio.fail_after(OPTS["node_timeout"]):
            got = await vol.blobs.get_blob(r.blob_id, r.meta)
        assert bytes(got) == data
        assert states(vol)[first] == "suspect"
        # What the thread left behind reads next is changed, then it is let go.
        for i in others:
            victim = sliver_file(paths[i], r.blob_id)
            raw = bytearray(victim.read_bytes())
            raw[header_size(N) :] = bytes(len(raw) - header_size(N))
            victim.write_bytes(bytes(raw))
    await trio.sleep(1.0)  # the thread reads two small files and ends
    assert bytes(got) == data


async def test_a_node_holding_a_stuck_batch_gets_no_more_batches(tmp_path: Path) -> None:
    """Probes find a node with one hung file up again; its stuck thread keeps it out of
    batches, so it is not asked again and again, one more stuck thread each time."""
    vol, paths = await make_volume(tmp_path)
    data = os.urandom(600_000)
    r = await vol.blobs.put_blob(data)
    hung = systematic_nodes(vol, r.meta)[0]
    with hung_file(sliver_file(paths[hung], r.blob_id)):
        assert bytes(await vol.blobs.get_blob(r.blob_id, r.meta)) == data
        assert vol.nodes.nodes[hung].stuck_batches == 1
        for _ in range(3):
            await vol.nodes.probe(hung)
            assert states(vol)[hung] == "up"
            with trio.fail_after(OPTS["node_timeout"]):
                assert bytes(await vol.blobs.get_blob(r.blob_id, r.meta)) == data
            assert vol.nodes.nodes[hung].stuck_batches == 1
    with trio.fail_after(OPTS["node_timeout"]):
        while vol.nodes.nodes[hung].stuck_batches:  # noqa: ASYNC110 - a thread, not a task, ends it
            await trio.sleep(0.01)  # the thread ends, and says so


async def test_a_full_node_misses_writes_and_is_reported_full(tmp_path: Path) -> None:
    paths = node_paths(tmp_path, N)
    with tmpfs(paths[3], "1m"):
        await create_volume(paths, blob_size=4 << 20)
        vol = await open_volume(paths[0], **OPTS)
        data = os.urandom(4 << 20)
        r = await vol.blobs.put_blob(data)
        assert r.missed == (3,)
        assert states(vol)[3] == "full"
        leftovers = await trio.to_thread.run_sync(lambda: list(Path(paths[3]).rglob(".tmp-*")))
        assert leftovers == []  # no partial files left behind
        assert bytes(await vol.blobs.get_blob(r.blob_id, r.meta)) == data


async def test_a_durable_put_flushes_each_filesystem_once(tmp_path: Path) -> None:
    paths = node_paths(tmp_path, N)
    with tmpfs(paths[6], "64m"):  # six nodes share the disk's filesystem, one has its own
        await create_volume(paths, blob_size=1 << 20)
        vol = await open_volume(paths[0], **OPTS)

        def calls() -> list[int]:
            return [n.calls for n in vol.nodes.nodes]

        await vol.blobs.put_blob(os.urandom(5000), durable=True)  # learns the filesystems
        before = calls()
        assert (await vol.blobs.put_blob(os.urandom(5000), durable=False)).missed == ()
        middle = calls()
        data = os.urandom(5000)
        r = await vol.blobs.put_blob(data, durable=True)
        after = calls()
        assert r.missed == ()
        flushes = [(a - m) - (m - b) for b, m, a in zip(before, middle, after, strict=True)]
        assert sum(flushes[:6]) == 1 and flushes[6] == 1, flushes
        assert bytes(await vol.blobs.get_blob(r.blob_id, r.meta)) == data


async def test_more_than_f_full_nodes_is_no_space_also_when_known_beforehand(
    tmp_path: Path,
) -> None:
    paths = node_paths(tmp_path, N)
    with tmpfs(paths[1], "1m"), tmpfs(paths[3], "1m"), tmpfs(paths[5], "1m"):
        await create_volume(paths, blob_size=4 << 20)
        vol = await open_volume(paths[0], **OPTS)
        for attempt in range(2):  # the second put skips the nodes already known to be full
            with pytest.raises(NoSpace) as info:
                await vol.blobs.put_blob(os.urandom(4 << 20))
            assert info.value.errno == errno.ENOSPC, attempt
        assert [states(vol)[i] for i in (1, 3, 5)] == ["full"] * 3


async def test_f_nodes_down_and_one_full_is_no_space_and_out_of_room(tmp_path: Path) -> None:
    """The full node is what the put lacked: ENOSPC, not EIO. And data must not go to the
    journal instead (NodeSet.out_of_room): it could reach the quorum only through the full
    node's reserve."""
    paths = node_paths(tmp_path, N)
    quorum = N - 2
    with tmpfs(paths[3], "1m"):
        await create_volume(paths, blob_size=4 << 20)
        vol = await open_volume(paths[0], **OPTS)
        r = await vol.blobs.put_blob(os.urandom(4 << 20))  # finds node 3 full
        assert r.missed == (3,) and states(vol)[3] == "full"
        assert not vol.nodes.out_of_room(quorum)  # six nodes with room: no patch needs it
        for i in (1, 5):
            os.rename(paths[i], paths[i] + ".away")
        with pytest.raises(NoSpace) as info:
            await vol.blobs.put_blob(os.urandom(4 << 20))
        assert info.value.errno == errno.ENOSPC
        assert [states(vol)[i] for i in (1, 3, 5)] == ["down", "full", "down"]
        assert vol.nodes.out_of_room(quorum)
        os.rename(paths[1] + ".away", paths[1])
        await vol.nodes.probe_all()
        assert not vol.nodes.out_of_room(quorum)
        for i in (1, 6):  # f+1 down: room on the full node would not help, so EIO
            os.rename(paths[i], paths[i] + ".away")
        with pytest.raises(StorageUnavailable) as gone:
            await vol.blobs.put_blob(os.urandom(4 << 20))
        assert not isinstance(gone.value, NoSpace) and gone.value.errno == errno.EIO


async def test_a_node_of_another_volume_is_refused(tmp_path: Path) -> None:
    vol, paths = await make_volume(tmp_path / "a")
    other = node_paths(tmp_path / "b", N)
    await create_volume(other)
    data = os.urandom(100_000)
    r = await vol.blobs.put_blob(data)
    # Swap node 4 for the other volume's node 4 under the running store.
    os.rename(paths[4], paths[4] + ".mine")
    os.rename(other[4], paths[4])
    await vol.nodes.probe_all()
    assert states(vol)[4] == "down"
    assert "another volume" in str(vol.nodes.snapshot()[4]["reason"])
    assert bytes(await vol.blobs.get_blob(r.blob_id, r.meta)) == data
    r2 = await vol.blobs.put_blob(b"not for the other volume")
    assert 4 in r2.missed and sliver_files(paths[4]) == []
    # Opening afresh refuses it too, with the reason.
    vol2 = await open_volume(paths[0], **OPTS)
    assert states(vol2)[4] == "down"


async def test_a_failed_put_of_a_stored_blobs_content_leaves_its_files(tmp_path: Path) -> None:
    """A copy of a stored file puts the same blob again. When that put failed (3 nodes
    away, f=2), undoing it deleted the stored blob's sliver files on the 4 nodes it had
    written to: with the 3 still away, a file nobody touched was unreadable."""
    vol, paths = await make_volume(tmp_path)
    data = os.urandom(300_000)
    first = await vol.blobs.put_blob(data)

    def on_nodes_left() -> list[Path]:
        return sorted(p for node in paths[3:] for p in sliver_files(node))

    kept = on_nodes_left()
    assert len(kept) == 4
    for i in (0, 1, 2):
        os.rename(paths[i], paths[i] + ".away")
    with pytest.raises(StorageUnavailable):
        await vol.blobs.put_blob(data)
    assert on_nodes_left() == kept
    assert bytes(await vol.blobs.get_blob(first.blob_id, first.meta)) == data
    # What a failed put of new content wrote is still undone.
    with pytest.raises(StorageUnavailable):
        await vol.blobs.put_blob(os.urandom(300_000))
    assert on_nodes_left() == kept


async def test_puts_racing_a_node_going_down(tmp_path: Path) -> None:
    vol, paths = await make_volume(tmp_path)
    blobs = [os.urandom(200_000 + i) for i in range(8)]
    results = []

    async def put(data: bytes) -> None:
        results.append((data, await vol.blobs.put_blob(data)))

    async with trio.open_nursery() as nursery:
        for data in blobs:
            nursery.start_soon(put, data)
        await trio.lowlevel.checkpoint()
        await trio.to_thread.run_sync(os.rename, paths[5], paths[5] + ".gone")
    assert len(results) == len(blobs)
    for data, r in results:
        assert set(r.missed) <= {5}
        assert bytes(await vol.blobs.get_blob(r.blob_id, r.meta)) == data


async def test_delete_removes_every_sliver(tmp_path: Path) -> None:
    vol, paths = await make_volume(tmp_path)
    r = await vol.blobs.put_blob(b"short-lived" * 999)
    assert await vol.blobs.delete_blob(r.blob_id, r.meta) == []
    assert all(sliver_files(p) == [] for p in paths)
    with pytest.raises(StorageUnavailable):
        await vol.blobs.get_blob(r.blob_id, r.meta)


async def test_metadata_of_another_blob_is_refused(tmp_path: Path) -> None:
    vol, _ = await make_volume(tmp_path)
    a = await vol.blobs.put_blob(b"a" * 100)
    b = await vol.blobs.put_blob(b"b" * 100)
    assert bytes(await vol.blobs.get_blob(b.blob_id, b.meta)) == b"b" * 100
    assert vol.blobs.metadata(b.blob_id, b.meta) is vol.blobs.metadata(b.blob_id, b.meta)
    with pytest.raises(StorageUnavailable, match="another blob"):  # also once remembered
        await vol.blobs.get_blob(a.blob_id, b.meta)
    with pytest.raises(StorageUnavailable, match="damaged"):
        await vol.blobs.get_blob(a.blob_id, b"garbage")


async def test_a_batch_that_was_only_late_leaves_its_node_up(tmp_path: Path) -> None:
    """A batched read overrunning its deadline makes its node suspect (it may be hung);
    once the read comes back, late but done, the node is up again by itself. Left
    suspect, it would be read last until something else called it, and healthy reads
    would decode around it (what a cold disk did to a 1 GiB read through the mount)."""
    vol, _ = await make_volume(tmp_path)
    for i in (1, 2):
        await vol.nodes.nodes[i].store.put("k", b"sliver bytes")
    slow = threading.Event()

    def late(count: int) -> None:  # in the batch's thread, after the real read
        slow.wait(10)

    bufs = [memoryview(bytearray(12)) for _ in range(2)]
    reads = [(1, "k", 0, (bufs[0],), late), (2, "k", 0, (bufs[1],), lambda count: None)]
    done = await vol.nodes.read_batch(reads, deadline=0.05)
    assert done == {}  # nothing in time: the caller reads around it
    assert states(vol)[1] == "suspect" and vol.nodes.nodes[1].stuck_batches == 1
    slow.set()
    with trio.fail_after(OPTS["node_timeout"]):
        while vol.nodes.nodes[1].stuck_batches:  # noqa: ASYNC110 - a thread, not a task, ends it
            await trio.sleep(0.01)
    assert states(vol)[1] == "up" and states(vol)[2] == "up"
    assert bytes(bufs[0]) == bytes(bufs[1]) == b"sliver bytes"


async def test_a_batch_that_failed_late_leaves_its_node_suspect(tmp_path: Path) -> None:
    vol, _ = await make_volume(tmp_path)
    for i in (1, 2):
        await vol.nodes.nodes[i].store.put("k", b"sliver bytes")
    slow = threading.Event()

    def late_eio(count: int) -> None:  # the read ends late, and with an I/O error
        slow.wait(10)
        raise NodeIOError("input/output error", path=vol.nodes.nodes[1].store.path, key="k")

    into = (memoryview(bytearray(12)),)
    reads = [(1, "k", 0, into, late_eio), (2, "k", 0, into, lambda count: None)]
    await vol.nodes.read_batch(reads, deadline=0.05)
    assert states(vol)[1] == "suspect"
    slow.set()
    with trio.fail_after(OPTS["node_timeout"]):
        while vol.nodes.nodes[1].stuck_batches:  # noqa: ASYNC110 - a thread, not a task, ends it
            await trio.sleep(0.01)
    assert states(vol)[1] == "suspect"  # it did not answer right: still read last


async def test_a_suspect_node_is_probed_soon_not_at_the_next_round(tmp_path: Path) -> None:
    """Suspect is a question: a healthy node is up again at once, a gone one down."""
    vol, paths = await make_volume(tmp_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(vol.nodes.probe_forever, interval=3600, soon=0.05))
        await trio.sleep(0.2)  # the first round is done: the next is an hour away
        vol.nodes.set_state(2, NodeState.SUSPECT, "slower than the hedge delay")
        os.rename(paths[3], paths[3] + ".away")
        vol.nodes.set_state(3, NodeState.SUSPECT, "slower than the hedge delay")
        with trio.fail_after(OPTS["node_timeout"]):
            while states(vol)[2:4] != ["up", "down"]:  # noqa: ASYNC110 - the prober's task
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def test_a_durable_put_flushes_a_shared_filesystem_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vol, _ = await make_volume(tmp_path)  # all seven on the filesystem of tmp_path
    flushed: list[str] = []
    real = LocalStore.syncfs

    async def counted(self: LocalStore) -> None:
        flushed.append(self.path)
        await real(self)

    monkeypatch.setattr(LocalStore, "syncfs", counted)
    r = await vol.blobs.put_blob(os.urandom(300_000), durable=True)
    assert r.missed == () and len(flushed) == 1  # syncfs(2) makes all seven durable
