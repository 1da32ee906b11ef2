"""A power loss of every node can keep a journal record and lose the blob it names, since
neither was flushed: recovery then stops before that record (walrusfs.recovery), and the
files are as they were, never naming data that is nowhere. Real volumes; the power loss
is played by deleting the sliver files that were never flushed."""

from __future__ import annotations

import functools
import io
import logging
import os
from pathlib import Path

import pytest
import trio

from codec import PRIMARY
from tests.walrusfs.volumes import (
    formatted_volume,
    lose_secondary,
    secondary_start,
    sliver_files,
    zero_range,
)
from walrusfs.blobstore import BlobStore
from walrusfs.catalog import Catalog
from walrusfs.errors import FSError, StorageUnavailable
from walrusfs.fs import FileSystem
from walrusfs.fsck import EXIT_LOST, fsck
from walrusfs.healer import RepairService
from walrusfs.metadata import ROOT_INODE
from walrusfs.metastore import MetaStore
from walrusfs.scrub import Scrubber
from walrusfs.service import FsBlobs
from walrusfs.sliverfile import header_size
from walrusfs.volume import Volume

SIZE = 2 << 16  # two 64 KiB blocks: blobs of their own, put by close() without a flush


def live_files(paths: list[str]) -> set[Path]:
    return {p for node in paths for p in sliver_files(node)}


class PowerLostFirst(FsBlobs):
    """The real FsBlobs, where the power goes out before a delete round's flush of the
    nodes could make the frees (and all before them) durable: nothing is deleted."""

    async def settle(self) -> None:
        raise StorageUnavailable("the power went out first")


def mounted(vol: Volume, ms: MetaStore, blobs: type[FsBlobs] = FsBlobs) -> FileSystem:
    return FileSystem(ms.metadata, blobs(vol.blobs, ms), commit=lambda d: ms.sync(durable=d))


async def write(fs: FileSystem, name: bytes, data: bytes, *, fsync: bool = False) -> None:
    try:
        ino = (await fs.lookup(ROOT_INODE, name)).ino
        fh = await fs.open(ino, os.O_RDWR, 0)
    except FSError:
        fh, _ = await fs.create(ROOT_INODE, name, 0o644, os.O_RDWR, 0, 0)
    await fs.write(fh, 0, data)
    if fsync:
        await fs.fsync(fh)
    await fs.flush(fh)  # close(): blobs put, the change journalled on the nodes
    await fs.release(fh)


async def read(fs: FileSystem, name: bytes) -> bytes:
    fh = await fs.open((await fs.lookup(ROOT_INODE, name)).ino, os.O_RDONLY, 0)
    try:
        return bytes(await fs.read(fh, 0, 2 * SIZE))
    finally:
        await fs.release(fh)


async def names(fs: FileSystem, *candidates: bytes) -> set[bytes]:
    """Which of `candidates` exist in the root directory."""
    found = set()
    for name in candidates:
        try:
            await fs.lookup(ROOT_INODE, name)
        except FSError:
            continue
        found.add(name)
    return found


async def crash_and_remount(
    vol: Volume, ms: MetaStore, root: Path, lost: set[Path], *, fsck_node: str | None = None
) -> MetaStore:
    """Every node loses power: the sliver files `lost` were never flushed, and the
    mount's process is gone (nothing of it is closed or synced). With `fsck_node`, fsck
    must say what the mount will leave out, and find nothing lost."""
    for path in lost:
        path.unlink()
    ms.metadata.close()
    if fsck_node is not None:
        out = io.StringIO()
        code = await fsck(fsck_node, repair=False, out=out, node_timeout=5.0)
        assert "name data that a crash of the nodes lost" in out.getvalue()
        assert code != EXIT_LOST and "LOST" not in out.getvalue(), out.getvalue()
    return await MetaStore.open(vol, str(root / "state-after"))


async def test_changes_whose_blobs_a_crash_lost_are_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    vol, ms, paths = await formatted_volume(tmp_path)
    old_a, old_b = os.urandom(SIZE), os.urandom(SIZE)
    fs = mounted(vol, ms, PowerLostFirst)
    await write(fs, b"a", old_a, fsync=True)
    await write(fs, b"b", old_b, fsync=True)
    before = live_files(paths)
    await write(fs, b"a", os.urandom(SIZE))  # blob X: lost
    x = live_files(paths) - before
    await write(fs, b"b", os.urandom(SIZE))  # blob Y: lost
    y = live_files(paths) - before - x
    kept = live_files(paths)
    # Rewriting a frees X; with the cut before b's change, a would name X again.
    await write(fs, b"a", os.urandom(SIZE))
    await write(fs, b"c", os.urandom(SIZE))  # made after: goes with the rest
    assert x and y
    caplog.set_level(logging.WARNING, logger="walrusfs.recovery")
    ms = await crash_and_remount(vol, ms, tmp_path, x | y, fsck_node=paths[2])
    try:
        fs = mounted(vol, ms)
        assert await read(fs, b"a") == old_a
        assert await read(fs, b"b") == old_b
        assert await names(fs, b"a", b"b", b"c") == {b"a", b"b"}
        assert "Recovery stops before change" in caplog.text
        # The blobs the kept state names were never deleted: nothing freed them durably.
        assert before <= kept
    finally:
        await ms.close()


@pytest.mark.parametrize("told_by", ["the next change", "the background sync"])
async def test_a_fsynced_change_is_kept_though_its_blob_is_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, told_by: str
) -> None:
    vol, ms, paths = await formatted_volume(tmp_path)
    fs = mounted(vol, ms)
    await write(fs, b"a", os.urandom(SIZE), fsync=True)
    before = live_files(paths)
    await write(fs, b"a", os.urandom(SIZE), fsync=True)
    lost = live_files(paths) - before
    # The nodes learn of that durable sync from a mark that goes with the next change,
    # or from the background sync when no change comes.
    if told_by == "the next change":
        await write(fs, b"later", b"after the fsync")
    else:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ms.run_background, 0.01)
            await trio.sleep(0.3)
            nursery.cancel_scope.cancel()
    caplog.set_level(logging.WARNING, logger="walrusfs.recovery")
    # Flushed and lost anyway (more than f disks died): no crash's doing, and what fsync()
    # committed is not undone. The read says the data is gone.
    ms = await crash_and_remount(vol, ms, tmp_path, lost)
    try:
        fs = mounted(vol, ms)
        expected = {b"a", b"later"} if told_by == "the next change" else {b"a"}
        assert await names(fs, b"a", b"later") == expected
        with pytest.raises(StorageUnavailable):
            await read(fs, b"a")
        assert "Recovery stops" not in caplog.text
    finally:
        await ms.close()


async def test_nothing_is_left_out_when_every_blob_survived(tmp_path: Path) -> None:
    vol, ms, _ = await formatted_volume(tmp_path)
    fs = mounted(vol, ms)
    new = os.urandom(SIZE)
    await write(fs, b"a", os.urandom(SIZE), fsync=True)
    await write(fs, b"a", new)
    ms = await crash_and_remount(vol, ms, tmp_path, set())
    try:
        assert await read(mounted(vol, ms), b"a") == new
    finally:
        await ms.close()


async def rewritten_after_fsync(
    root: Path, blobs: type[FsBlobs] = FsBlobs
) -> tuple[Volume, MetaStore, bytes, bytes, list[Path]]:
    """A volume whose file `a` was fsynced with `old`, then rewritten with `new` and
    closed: (vol, ms, old, new, the sliver files of `new`: two blobs, one on each node)."""
    vol, ms, paths = await formatted_volume(root)
    fs = mounted(vol, ms, blobs)
    old, new = os.urandom(SIZE), os.urandom(SIZE)
    await write(fs, b"a", old, fsync=True)
    before = live_files(paths)
    await write(fs, b"a", new)
    files = sorted(live_files(paths) - before)
    assert len(files) == 14
    return vol, ms, old, new, files


async def test_a_kept_blob_the_crash_left_short_on_some_nodes_goes_to_repair(
    tmp_path: Path,
) -> None:
    vol, ms, _, _, new = await rewritten_after_fsync(tmp_path)
    torn = {p for p in new if p.parents[3].name in ("node1", "node4")}
    assert len(torn) == 4
    ms = await crash_and_remount(vol, ms, tmp_path, torn)
    try:
        assert {blob.hex()[:16] for blob in ms.torn} == {p.name[:16] for p in torn}
        assert set(ms.torn.values()) == {(1, 4)}
        assert ms.dropped == 0
    finally:
        await ms.close()


def cut(path: Path, *, keep_size: bool) -> None:
    """What a power loss may leave of an unflushed sliver file: its secondary sliver's
    pages lost, and with `keep_size` its primary's too, the size kept (zeros read back);
    else the file cut short after its primary."""
    if keep_size:
        zero_range(path, header_size(7), path.stat().st_size)
    else:
        os.truncate(path, secondary_start(path))


async def test_a_blob_whose_files_kept_their_size_but_not_their_pages_is_left_out(
    tmp_path: Path,
) -> None:
    vol, ms, old, _, new = await rewritten_after_fsync(tmp_path, PowerLostFirst)
    for path in new:
        cut(path, keep_size=True)
    ms = await crash_and_remount(vol, ms, tmp_path, set())
    try:
        assert await read(mounted(vol, ms), b"a") == old
        assert ms.dropped > 0
    finally:
        await ms.close()


async def test_a_blob_whose_files_lost_only_their_secondaries_is_kept_and_repaired(
    tmp_path: Path,
) -> None:
    vol, ms, _, data, new = await rewritten_after_fsync(tmp_path)
    for path in new:
        cut(path, keep_size=False)
    ms = await crash_and_remount(vol, ms, tmp_path, set())
    try:
        assert await read(mounted(vol, ms), b"a") == data
        assert ms.dropped == 0
        assert {blob.hex()[:16] for blob in ms.torn} == {p.name[:16] for p in new}
        assert set(ms.torn.values()) == {tuple(range(7))}
    finally:
        await ms.close()


async def test_slivers_the_read_back_finds_corrupt_go_to_repair(tmp_path: Path) -> None:
    vol, ms, _, data, new = await rewritten_after_fsync(tmp_path)
    # Pair 0, a systematic row every read takes first: its primary sliver's pages lost.
    first = [p for p in new if p.name.endswith(".p0")]
    assert len(first) == 2
    for path in first:
        zero_range(path, header_size(7), header_size(7) + 100)
    ms = await crash_and_remount(vol, ms, tmp_path, set())
    try:
        assert await read(mounted(vol, ms), b"a") == data
        assert ms.dropped == 0
        assert {blob.hex()[:16]: nodes for blob, nodes in ms.torn.items()} == {
            p.name[:16]: (int(p.parents[3].name[4:]),) for p in first
        }
    finally:
        await ms.close()


async def test_files_a_crash_spoilt_past_what_the_read_back_reads_are_found_and_repaired(
    tmp_path: Path,
) -> None:
    # The secondary slivers' pages of every file lost, sizes kept: the read-back (R
    # primaries) and the sizes see nothing. The check after the mount finds all 14, and
    # repair rebuilds them byte-identical.
    vol, ms, _, data, new = await rewritten_after_fsync(tmp_path)
    intact = {p: p.read_bytes() for p in new}
    for path in new:
        lose_secondary(path)
    ms = await crash_and_remount(vol, ms, tmp_path, set())
    catalog = Catalog(ms.metadata.path, lambda: ms.superblock)
    try:
        assert await read(mounted(vol, ms), b"a") == data
        assert ms.torn == {}
        assert {blob.hex()[:16] for blob in ms.tail} == {p.name[:16] for p in new}
        repair = RepairService(vol, catalog, rate=None)
        scrubber = Scrubber(vol, catalog, repair, rate=None)
        found = await scrubber.check_blobs(ms.tail, ms.torn)
        assert sorted((f.kind, f.intact) for f in found) == [("corrupt", (PRIMARY,))] * 14
        assert scrubber.after_crash_left == 0
        report = await repair.pass_once([])
        assert report.pairs_written == 14
        assert {p: p.read_bytes() for p in new} == intact
        assert await scrubber.check_blobs(ms.tail, ms.torn) == []
    finally:
        catalog.close()
        await ms.close()


class PutsNoted(FsBlobs):
    """The real FsBlobs, noting whether each put was durable."""

    def __init__(self, blobs: BlobStore, ms: MetaStore) -> None:
        super().__init__(blobs, ms)
        self.puts: list[bool] = []

    async def put_blob(
        self, data: bytes | bytearray | memoryview, *, durable: bool = False
    ) -> tuple[bytes, bytes]:
        self.puts.append(durable)
        return await super().put_blob(data, durable=durable)


@pytest.mark.parametrize("made_durable_by", ["fsync", "the commit interval"])
async def test_a_pack_replacing_patches_is_durable_only_if_an_fsync_promised_them(
    tmp_path: Path, made_durable_by: str
) -> None:
    # Patches an fsync made durable must stay so when a pack replaces them. Those the
    # background's commit interval made durable promised nothing: a crash that loses
    # their pack also leaves out the commit naming it, and finds them as they were.
    vol, ms, _ = await formatted_volume(tmp_path)
    blobs = PutsNoted(vol.blobs, ms)
    fs = FileSystem(ms.metadata, blobs, commit=lambda d: ms.sync(durable=d))
    try:
        await write(fs, b"small", b"a small file", fsync=made_durable_by == "fsync")
        seq = ms.journal.seq
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(ms.run_background, 0.01, commit=0.01))
            with trio.fail_after(10):
                while ms.journal.durable < seq:  # noqa: ASYNC110 - the task under test has no event
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert blobs.puts == []  # committed as patches, in the journal
        await fs.data.flush_all()  # now stored in a pack
        assert blobs.puts == [made_durable_by == "fsync"]
    finally:
        await ms.close()


async def rewrite(fs: FileSystem, name: bytes, data: bytes) -> None:
    """Rewrite a file in place as `open(name, "wb")` does: O_TRUNC, write, close."""
    fh = await fs.open((await fs.lookup(ROOT_INODE, name)).ino, os.O_RDWR | os.O_TRUNC, 0)
    await fs.write(fh, 0, data)
    await fs.flush(fh)
    await fs.release(fh)


async def test_a_file_rewritten_in_place_comes_back_as_it_was_not_empty(tmp_path: Path) -> None:
    vol, ms, paths = await formatted_volume(tmp_path)
    fs = mounted(vol, ms, PowerLostFirst)
    old = os.urandom(SIZE)
    await write(fs, b"a", old, fsync=True)
    await write(fs, b"b", b"before")
    before = live_files(paths)
    # The truncate is a change of its own, journalled before the new content's blob.
    await rewrite(fs, b"a", os.urandom(SIZE))
    await write(fs, b"b", b"after")  # after the rewrite: left out with it
    lost = live_files(paths) - before
    assert lost
    ms = await crash_and_remount(vol, ms, tmp_path, lost)
    try:
        fs = mounted(vol, ms)
        assert await read(fs, b"a") == old
        assert await read(fs, b"b") == b"before"
    finally:
        await ms.close()
