"""Metadata on the nodes: journal, checkpoints, recovery from nothing, and the mount lock."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import shutil
import sqlite3
import stat
from pathlib import Path

import blake3
import pytest
import trio

from tests.walrusfs.volumes import back_unseen_others_gone, node_paths, sliver_files, tmpfs
from walrusfs import checkpoint, metastore
from walrusfs.blobstore import PutResult
from walrusfs.checkpoint import SUPERBLOCK_KEY, RecoveryError, install, snapshot
from walrusfs.errors import NoSpace, StorageUnavailable
from walrusfs.lock import LOCK_KEY, LockRecord, MountLock, MountLockError
from walrusfs.metadata import ROOT_INODE, BlockRef, BlockUpdate, Change, Metadata
from walrusfs.metastore import MetaStore, db_path, format_metadata
from walrusfs.nodeset import RESERVE_KEY
from walrusfs.segment import (
    JournalError,
    Segment,
    decode_change,
    encode_change,
    scan_log,
    segment_key,
)
from walrusfs.volume import Volume, create_volume, open_volume

OPTS = {"node_timeout": 3.0, "hedge_after": 0.3, "grace": 0.3}
FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


async def new_volume(root: Path) -> tuple[Volume, list[str]]:
    paths = node_paths(root / "nodes", 7)
    await create_volume(paths, blob_size=1 << 16)
    vol = await open_volume(paths[0], **OPTS)
    await format_metadata(vol, str(root / "state0"), uid=0, gid=0)
    return vol, paths


def dump(path: str) -> dict[str, list[tuple[object, ...]]]:
    """Every table's rows, for comparing two databases."""
    db = sqlite3.connect(path)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {
            t: sorted(db.execute(f"SELECT * FROM {t}").fetchall(), key=repr)
            for t in tables
            if t not in ("meta", "sqlite_sequence")
        }
    finally:
        db.close()


async def make_changes(ms: MetaStore, vol: Volume, tag: bytes) -> None:
    md = ms.metadata
    d = md.create(ROOT_INODE, b"dir-" + tag, mode=DIR, uid=1, gid=2, now_ns=10)
    f = md.create(d.id, b"file", mode=FILE, uid=1, gid=2, now_ns=11)
    r = await vol.blobs.put_blob(b"content " + tag)
    md.set_blocks(
        f.id,
        {0: BlockRef(r.blob_id, r.meta, 9 + len(tag))},
        size=9 + len(tag),
        mtime_ns=12,
        ctime_ns=12,
    )
    md.set_xattr(f.id, b"user.tag", tag, now_ns=13)
    md.link(f.id, ROOT_INODE, b"link-" + tag, now_ns=14)
    md.rename(d.id, b"file", ROOT_INODE, b"moved-" + tag, now_ns=15)
    md.set_attrs(f.id, mode=FILE | 0o600, ctime_ns=16)


async def test_a_fresh_machine_recovers_the_same_tree(tmp_path: Path) -> None:
    vol, paths = await new_volume(tmp_path)
    ms = await MetaStore.open(vol, str(tmp_path / "state1"))
    await make_changes(ms, vol, b"a")
    await ms.sync()
    await make_changes(ms, vol, b"b")
    await ms.sync()
    expected = dump(ms.metadata.path)
    ms.metadata.close()  # a crash: no final checkpoint, the local state is then lost
    shutil.rmtree(tmp_path / "state1")
    fresh = await open_volume(paths[3], **OPTS)
    ms2 = await MetaStore.open(fresh, str(tmp_path / "state2"))
    assert dump(ms2.metadata.path) == expected
    assert ms2.journal.epoch == ms.journal.epoch + 1
    await ms2.close()


async def test_recovery_with_f_nodes_gone_and_a_corrupt_copy(tmp_path: Path) -> None:
    vol, paths = await new_volume(tmp_path)
    ms = await MetaStore.open(vol, str(tmp_path / "state1"))
    await make_changes(ms, vol, b"x")
    await ms.sync()
    expected = dump(ms.metadata.path)
    ms.metadata.close()
    shutil.rmtree(paths[1])
    shutil.rmtree(paths[5])
    # A damaged copy of the segment on one more node is outvoted, not trusted.
    key = Path(paths[2]) / segment_key(ms.journal.epoch, 1)
    raw = bytearray(key.read_bytes())
    raw[70] ^= 0xFF
    key.write_bytes(bytes(raw))
    ms2 = await MetaStore.open(await open_volume(paths[0], **OPTS), str(tmp_path / "state2"))
    assert dump(ms2.metadata.path) == expected
    ms2.metadata.close()


async def test_unsynced_changes_are_not_on_the_nodes(tmp_path: Path) -> None:
    vol, paths = await new_volume(tmp_path)
    ms = await MetaStore.open(vol, str(tmp_path / "state1"))
    await make_changes(ms, vol, b"kept")
    await ms.sync()
    kept = dump(ms.metadata.path)
    await make_changes(ms, vol, b"lost")  # committed locally only: a crash may lose it
    assert ms.journal.lag > 0
    ms.metadata.close()
    ms2 = await MetaStore.open(await open_volume(paths[0], **OPTS), str(tmp_path / "state2"))
    assert dump(ms2.metadata.path) == kept
    ms2.metadata.close()


async def test_checkpoints_mid_session_and_replay_after_them(tmp_path: Path) -> None:
    vol, paths = await new_volume(tmp_path)
    ms = await MetaStore.open(vol, str(tmp_path / "state1"))
    await make_changes(ms, vol, b"1")
    await ms.checkpoint()
    await make_changes(ms, vol, b"2")  # lands in the snapshot's database before its segment
    await ms.checkpoint()
    await make_changes(ms, vol, b"3")
    await ms.sync(durable=True)
    expected = dump(ms.metadata.path)
    ms.metadata.close()
    ms2 = await MetaStore.open(await open_volume(paths[0], **OPTS), str(tmp_path / "state2"))
    assert dump(ms2.metadata.path) == expected
    # Only the newest two checkpoints' blobs stay on the nodes.
    await ms2.close()
    ms3 = await MetaStore.open(await open_volume(paths[0], **OPTS), str(tmp_path / "state3"))
    assert dump(ms3.metadata.path) == expected
    ms3.metadata.close()


async def test_patches_survive_checkpoint_and_replay_and_their_bytes_make_one_due(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metastore, "CHECKPOINT_BYTES", 75_000)
    vol, paths = await new_volume(tmp_path)
    ms = await MetaStore.open(vol, str(tmp_path / "state1"))
    md = ms.metadata
    f = md.create(ROOT_INODE, b"db", mode=FILE, uid=0, gid=0, now_ns=1).id
    r = await vol.blobs.put_blob(b"x" * 1000)
    md.set_blocks(f, {0: BlockRef(r.blob_id, r.meta, 1000)}, size=1000, mtime_ns=2, ctime_ns=2)
    md.patch_blocks(f, [(0, 10, os.urandom(30_000))], size=30_010, mtime_ns=3, ctime_ns=3)
    assert not ms.checkpoint_due()
    md.patch_blocks(f, [(0, 40_000, os.urandom(50_000))], size=90_000, mtime_ns=4, ctime_ns=4)
    assert ms.checkpoint_due()  # 80 KB of file data, as much journalled: few changes, many bytes
    await ms.checkpoint()
    assert not ms.checkpoint_due()
    md.patch_blocks(f, [(0, 5, b"after")], size=90_000, mtime_ns=5, ctime_ns=5)
    await ms.sync(durable=True)
    expected = dump(md.path)
    assert len(expected["patches"]) == 3
    md.close()
    ms2 = await MetaStore.open(await open_volume(paths[0], **OPTS), str(tmp_path / "state2"))
    assert dump(ms2.metadata.path) == expected  # from the checkpoint, then the journal
    ms2.metadata.close()


def test_a_snapshot_leaves_the_pages_freed_since_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    md = Metadata(tmp_path / "m.db", block_size=1 << 16)
    try:
        files = [
            md.create(ROOT_INODE, b"f%d" % i, mode=FILE, uid=0, gid=0, now_ns=1).id
            for i in range(20)
        ]
        for f in files:  # small files' bytes wait in patches for their pack
            md.patch_blocks(f, [(0, 0, os.urandom(50_000))], size=50_000, mtime_ns=2, ctime_ns=2)
        for f in files:
            md.truncate(f, 0, mtime_ns=3, ctime_ns=3)  # and leave
        expected = dump(md.path)
        data = snapshot(md.path)[0]
        monkeypatch.setattr(checkpoint, "VACUUM_FRACTION", 0)
        assert len(data) < len(snapshot(md.path)[0]) // 10
        install(str(tmp_path / "restored.db"), data)
        assert dump(str(tmp_path / "restored.db")) == expected
    finally:
        md.close()


async def test_blocks_sharing_a_blob_survive_checkpoint_and_replay(tmp_path: Path) -> None:
    vol, paths = await new_volume(tmp_path)
    ms = await MetaStore.open(vol, str(tmp_path / "state1"))
    md = ms.metadata
    r = await vol.blobs.put_blob(b"aaaa" + b"bbbbbb")  # a pack of two small files
    f = md.create(ROOT_INODE, b"a", mode=FILE, uid=0, gid=0, now_ns=1).id
    g = md.create(ROOT_INODE, b"b", mode=FILE, uid=0, gid=0, now_ns=1).id
    md.set_blocks(f, {0: BlockRef(r.blob_id, r.meta, 4)}, size=4, mtime_ns=2, ctime_ns=2)
    await ms.checkpoint()
    md.set_blocks(g, {0: BlockRef(r.blob_id, r.meta, 6, 4)}, size=6, mtime_ns=3, ctime_ns=3)
    # A pack commits its files in one record; one of them had patches, one a hole.
    h = md.create(ROOT_INODE, b"c", mode=FILE, uid=0, gid=0, now_ns=1).id
    k = md.create(ROOT_INODE, b"d", mode=FILE, uid=0, gid=0, now_ns=1).id
    md.patch_blocks(h, [(0, 0, b"cc")], size=2, mtime_ns=4, ctime_ns=4)
    p = await vol.blobs.put_blob(b"hdr" + b"cc" + b"ddd")
    in_p = BlockRef(p.blob_id, p.meta, 2, 3)
    md.set_blocks_many(
        [
            BlockUpdate(ino=h, blocks={0: in_p}, size=2, mtime_ns=5, ctime_ns=5),
            BlockUpdate(
                ino=k,
                blocks={0: BlockRef(p.blob_id, p.meta, 3, 5), 1: None},
                size=3,
                mtime_ns=5,
                ctime_ns=5,
            ),
        ]
    )
    await ms.sync(durable=True)
    expected = dump(md.path)
    md.close()
    ms2 = await MetaStore.open(await open_volume(paths[0], **OPTS), str(tmp_path / "state2"))
    assert dump(ms2.metadata.path) == expected  # from the checkpoint, then the journal
    assert ms2.metadata.block(g, 0) == BlockRef(r.blob_id, r.meta, 6, 4)
    assert ms2.metadata.blob_refcount(r.blob_id) == 2
    assert ms2.metadata.block(h, 0) == in_p and ms2.metadata.get_inode(k).mtime_ns == 5
    assert ms2.metadata.blob_refcount(p.blob_id) == 2 and not ms2.metadata.patched_blocks()
    ms2.metadata.close()


def test_a_block_reference_names_its_start_only_inside_a_pack() -> None:
    plain = Change("set_blocks", {"blocks": {0: BlockRef(b"i" * 32, b"m", 5)}})
    packed = Change("set_blocks", {"blocks": {0: BlockRef(b"i" * 32, b"m", 5, 7)}})
    assert b"[5]" not in encode_change(plain) and b",5]" in encode_change(plain)
    assert b",5,7]" in encode_change(packed)
    # Records written before packs (three items) read as blocks at the blob's start.
    assert decode_change(encode_change(plain)) == plain
    assert decode_change(encode_change(packed)) == packed
    with pytest.raises(JournalError):
        decode_change(encode_change(packed).replace(b",5,7]", b",5,7,9]"))


def test_bytes_travel_raw_after_a_records_json() -> None:
    page, small = os.urandom(4096), b"\n\0tiny"
    ref = BlockRef(os.urandom(32), os.urandom(500), 10, 3)
    change = Change("patch_blocks", {"patches": [[0, 7, page], [0, 9, small]], "ref": ref})
    record = encode_change(change)
    assert page in record and ref.meta in record  # raw, not base64
    assert len(record) < len(page) + len(ref.meta) + 300
    seg = Segment(1, 5, bytes(32), (record, encode_change(Change("unlink", {"x": 1}))))
    again = Segment.from_bytes(seg.to_bytes())
    assert [decode_change(r) for r in again.records] == [change, Change("unlink", {"x": 1})]
    # An attachment's place must lie inside the record.
    with pytest.raises(JournalError):
        decode_change(record.replace(b'"$a":[0,4096]', b'"$a":[0,9999]', 1))
    with pytest.raises(JournalError):  # a record's length past the body's end
        Segment.from_bytes(_resealed(seg.to_bytes()[:-33]))


def _resealed(raw_without_hash: bytes) -> bytes:
    """A segment with its body length and hash made to fit `raw_without_hash` again."""
    import struct

    head = bytearray(raw_without_hash[:61])
    struct.pack_into("<I", head, 57, len(raw_without_hash) - 61)
    raw = bytes(head) + raw_without_hash[61:]
    return raw + blake3.blake3(raw).digest()


def test_a_version_1_segment_still_reads() -> None:
    import json
    import struct

    lines = [
        json.dumps({"op": "unlink", "args": {"parent": 1, "name": {"$b": "YQ=="}}}).encode(),
        json.dumps({"op": "set_attrs", "args": {"ino": 2, "mode": 420}}).encode(),
    ]
    body = b"\n".join(lines)
    raw = struct.pack("<4sBQQI32sI", b"WSJS", 1, 3, 10, 2, bytes(32), len(body)) + body
    seg = Segment.from_bytes(raw + blake3.blake3(raw).digest())
    assert seg.first_seq == 10 and seg.last_seq == 11
    assert decode_change(seg.records[0]) == Change("unlink", {"parent": 1, "name": b"a"})


async def test_a_journal_below_quorum_fails_and_keeps_its_changes(tmp_path: Path) -> None:
    vol, paths = await new_volume(tmp_path)
    ms = await MetaStore.open(vol, str(tmp_path / "state1"))
    for i in (0, 1, 2):
        os.rename(paths[i], paths[i] + ".away")
    ms.metadata.create(ROOT_INODE, b"pending", mode=DIR, uid=0, gid=0, now_ns=1)
    with pytest.raises(StorageUnavailable, match="need 5"):
        await ms.sync()
    assert ms.journal.lag == 1
    ms.metadata.create(ROOT_INODE, b"later", mode=DIR, uid=0, gid=0, now_ns=2)
    for i in (0, 1, 2):
        os.rename(paths[i] + ".away", paths[i])
    await vol.nodes.probe_all()
    await ms.sync()
    assert ms.journal.lag == 0
    # The failed segment went out again unchanged; the later change got one of its own.
    # So no two copies of a segment anywhere differ, and recovery never has to choose.
    for p in paths[3:]:
        segs = scan_log((Path(p) / ms.journal.log_key).read_bytes())
        assert [Segment.from_bytes(r).first_seq for r in segs] == [1, 1, 2]  # sent twice
        assert segs[0] == segs[1]
    expected = dump(ms.metadata.path)
    ms.metadata.close()
    ms2 = await MetaStore.open(await open_volume(paths[0], **OPTS), str(tmp_path / "state2"))
    assert dump(ms2.metadata.path) == expected
    ms2.metadata.close()


async def test_a_journal_failing_alike_on_every_node_says_so_once(tmp_path: Path) -> None:
    vol, paths = await new_volume(tmp_path)
    ms = await MetaStore.open(vol, str(tmp_path / "state1"))
    for p in paths:  # a directory where each node's log file goes
        (Path(p) / ms.journal.log_key).mkdir(parents=True)
    ms.metadata.create(ROOT_INODE, b"pending", mode=DIR, uid=0, gid=0, now_ns=1)
    with pytest.raises(StorageUnavailable) as failed:
        await ms.sync()
    text = str(failed.value)
    assert "nodes 0, 1, 2, 3, 4, 5, 6: " in text and "EISDIR" in text
    assert text.count("EISDIR") == 1 and not any(p in text for p in paths)
    ms.metadata.close()


async def test_a_journal_short_of_nodes_looks_again_at_those_taken_as_down(
    tmp_path: Path,
) -> None:
    vol, paths = await new_volume(tmp_path)
    ms = await MetaStore.open(vol, str(tmp_path / "state1"))
    # f nodes gone, 2f looking so: a close must go on.
    await back_unseen_others_gone(vol, paths, back=(3, 4), gone=(1, 5))
    ms.metadata.create(ROOT_INODE, b"made", mode=DIR, uid=0, gid=0, now_ns=1)
    await ms.sync()
    assert ms.journal.lag == 0
    for i in (3, 4):
        segs = scan_log((Path(paths[i]) / ms.journal.log_key).read_bytes())
        assert [Segment.from_bytes(r).last_seq for r in segs] == [ms.journal.seq]
    # So does the superblock of a checkpoint (an unmount's last step), once more.
    for i in (1, 5):
        os.rename(paths[i] + ".away", paths[i])
    await back_unseen_others_gone(vol, paths, back=(3, 4), gone=(0, 6))
    await checkpoint.write_superblock(vol, ms.superblock)
    new = ms.superblock.to_bytes()
    assert all((Path(paths[i]) / SUPERBLOCK_KEY).read_bytes() == new for i in (1, 2, 3, 4, 5))
    await ms.checkpoint()  # the checkpoint's blob, too
    ms.metadata.close()


async def test_an_unformatted_volume_and_garbage_superblocks_are_refused(tmp_path: Path) -> None:
    paths = node_paths(tmp_path / "nodes", 4)
    await create_volume(paths)
    vol = await open_volume(paths[0], **OPTS)
    with pytest.raises(RecoveryError, match="mkfs"):
        await MetaStore.open(vol, str(tmp_path / "s"))
    for p in paths:
        Path(p, SUPERBLOCK_KEY).write_bytes(b"{}\nnot a checksum\n")
    with pytest.raises(RecoveryError, match="held identically"):
        await MetaStore.open(vol, str(tmp_path / "s"))


def test_a_log_yields_its_intact_segments_around_damage() -> None:
    segs = [Segment(3, k, bytes(32), (b'{"op":"x","args":{}}',)).to_bytes() for k in (1, 2, 3)]
    torn = segs[1][:-5]  # a crash mid-append, then later appends after it
    log = segs[0] + b"garbage WSJS and more" + torn + segs[2] + segs[2] + segs[1][:40]
    assert scan_log(log) == [segs[0], segs[2], segs[2]]
    assert scan_log(b"") == [] and scan_log(b"WSJS") == []


async def test_many_syncs_append_to_one_log_file_per_node(tmp_path: Path) -> None:
    vol, paths = await new_volume(tmp_path)
    ms = await MetaStore.open(vol, str(tmp_path / "state1"))
    for k in range(20):
        ms.metadata.create(ROOT_INODE, b"d%d" % k, mode=DIR, uid=0, gid=0, now_ns=k)
        await ms.sync()
    assert ms.journal.segments_written == 20
    for p in paths:
        assert len(list((Path(p) / "journal").rglob("*"))) == 2  # e<epoch>/ and its log
    ms.metadata.close()


async def test_checkpoints_remove_the_journal_they_made_history(tmp_path: Path) -> None:
    vol, paths = await new_volume(tmp_path)
    ms = await MetaStore.open(vol, str(tmp_path / "state1"))
    await make_changes(ms, vol, b"1")
    await ms.sync()
    old = ms.journal.log_key
    await ms.checkpoint()
    await make_changes(ms, vol, b"2")
    await ms.sync(durable=True)
    await ms.drop_history()
    for p in paths:
        assert not (Path(p) / old).exists() and (Path(p) / ms.journal.log_key).exists()
    expected = dump(ms.metadata.path)
    await ms.close()
    # A new session (epoch): the earlier one's journal goes once its checkpoint is in.
    ms2 = await MetaStore.open(await open_volume(paths[0], **OPTS), str(tmp_path / "state2"))
    assert dump(ms2.metadata.path) == expected
    await ms2.drop_history()
    for p in paths:
        epochs = {d.name for d in (Path(p) / "journal").iterdir() if any(d.iterdir())}
        assert epochs <= {f"e{ms2.journal.epoch}"}
    await ms2.close()


def test_segments_detect_damage() -> None:
    seg = Segment(3, 10, bytes(32), (b'{"op":"x","args":{}}', b'{"op":"y","args":{}}'))
    raw = seg.to_bytes()
    assert Segment.from_bytes(raw) == seg
    for pos in (0, 6, 30, 70, len(raw) - 1):
        bad = bytearray(raw)
        bad[pos] ^= 1
        with pytest.raises(Exception, match="segment"):
            Segment.from_bytes(bytes(bad))


async def test_one_mount_at_a_time_and_stale_locks_are_taken_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    vol, paths = await new_volume(tmp_path)
    first = MountLock(vol)
    await first.acquire()
    second = MountLock(await open_volume(paths[0], **OPTS))
    with pytest.raises(MountLockError, match=f"already mounted by pid {os.getpid()}"):
        await second.acquire()
    await first.release()
    await second.acquire()  # free again
    await second.release()
    # A lock left by a process that is gone (same machine) is taken over at once.
    dead = LockRecord("0" * 16, first.record.host, 2**22 + 12345, first.record.boot_id, 1, 1, 1)
    for p in paths:
        Path(p, LOCK_KEY).write_bytes(dead.to_bytes())
    third = MountLock(vol)
    caplog.set_level(logging.WARNING, logger="walrusfs.lock")
    with trio.fail_after(10):
        await third.acquire()
    # Every node had a copy of the dead mount's record: said once.
    assert caplog.text.count("taking over the lock") == 1
    # So is one whose pid now belongs to another process (same pid, other start time).
    reused = LockRecord("1" * 16, first.record.host, os.getpid(), first.record.boot_id, 1, 1, 12345)
    assert not reused.live(30.0) and first.record.live(30.0)
    assert all(
        LockRecord.from_bytes(Path(p, LOCK_KEY).read_bytes()).token == third.record.token
        for p in paths
    )
    await third.release()
    assert not any(Path(p, LOCK_KEY).exists() for p in paths)


def test_db_path_is_inside_the_state_dir(tmp_path: Path) -> None:
    assert db_path(str(tmp_path)) == str(tmp_path / "metadata.db")


async def test_a_durable_sync_flushes_each_filesystem_once_and_only_when_needed(
    tmp_path: Path,
) -> None:
    vol, _ = await new_volume(tmp_path)
    ms = await MetaStore.open(vol, str(tmp_path / "state"))
    try:
        await vol.nodes.probe_all()  # learns that all seven nodes share one filesystem

        def calls() -> int:
            return sum(n.calls for n in vol.nodes.nodes)

        async def change_and_sync(name: bytes, durable: bool) -> int:
            ms.metadata.create(ROOT_INODE, name, mode=DIR, uid=0, gid=0, now_ns=1)
            before = calls()
            await ms.sync(durable=durable)
            return calls() - before

        appends = await change_and_sync(b"a", durable=False)
        assert await change_and_sync(b"b", durable=True) == appends + 1  # the one flush
        before = calls()
        await ms.sync(durable=True)  # nothing since the last flush: nothing to do
        assert calls() == before
    finally:
        await ms.close()


@pytest.mark.parametrize("commit", [0.2, 0.0])
async def test_changes_are_made_durable_a_commit_interval_after_they_were_made(
    tmp_path: Path, commit: float
) -> None:
    vol, _ = await new_volume(tmp_path)
    ms = await MetaStore.open(vol, str(tmp_path / "state"))
    try:
        ms.metadata.create(ROOT_INODE, b"a", mode=DIR, uid=0, gid=0, now_ns=1)
        seq = ms.journal.seq
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(ms.run_background, 0.02, commit=commit))
            with trio.move_on_after(commit + 5.0 if commit else 1.0):
                while ms.journal.durable < seq:  # noqa: ASYNC110 - the task under test has no event
                    await trio.sleep(0.01)
            durable = ms.journal.durable
            # Idle from here: the mark telling the nodes of that flush is synced, and
            # calls for no flush of its own.
            await trio.sleep(5 * commit or 0.2)
            nursery.cancel_scope.cancel()
        if commit:
            assert durable >= seq and ms.journal.durable == durable
            assert ms.journal.committed > seq  # the mark went out
        else:
            assert ms.journal.durable < seq and ms.journal.committed == seq
    finally:
        await ms.close()


def fill_up(directory: str, name: str = "filler") -> None:
    fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as full:
            while True:
                os.write(fd, b"\0" * 4096)
        assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


async def test_a_journal_that_finds_too_many_nodes_full_is_no_space(tmp_path: Path) -> None:
    paths = node_paths(tmp_path / "nodes", 7)
    with tmpfs(paths[1], "1m"), tmpfs(paths[3], "1m"), tmpfs(paths[5], "1m"):
        await create_volume(paths, blob_size=1 << 16)
        vol = await open_volume(paths[0], **OPTS)
        await format_metadata(vol, str(tmp_path / "state0"), uid=0, gid=0)
        ms = await MetaStore.open(vol, str(tmp_path / "state1"))
        with pytest.raises(NoSpace):
            await vol.blobs.put_blob(os.urandom(4 << 20))  # now known to be full
        ms.metadata.create(ROOT_INODE, b"d", mode=DIR, uid=0, gid=0, now_ns=1)
        # Too full for a blob is not too full for a journal record: it is appended (a
        # delete's is what gives the space back).
        await ms.sync()
        assert all(os.listdir(os.path.join(paths[i], "journal")) for i in (1, 3, 5))
        # Full to the last byte, the nodes give up their reserves a slice at a time.
        for attempt in range(5):
            for i in (1, 3, 5):
                fill_up(paths[i], f"filler{attempt}")
            for k in range(100):  # more than the page a log file's last record may end in
                ms.metadata.create(
                    ROOT_INODE,
                    b"e%d-%03d" % (attempt, k) + b"x" * 200,
                    mode=DIR,
                    uid=0,
                    gid=0,
                    now_ns=2,
                )
            try:
                await ms.sync()
            except NoSpace:  # ENOSPC for the user, not EIO
                break
        else:
            pytest.fail("the reserves never ran out")
        assert attempt >= 1
        assert not any(os.path.exists(os.path.join(paths[i], RESERVE_KEY)) for i in (1, 3, 5))
        ms.metadata.close()


async def test_a_volume_too_full_for_a_checkpoint_mounts_and_carries_its_journal(
    tmp_path: Path,
) -> None:
    """Each mount starts with a checkpoint. On nodes filled to the last byte (reserves
    spent) none fits, and the volume did not mount, so nothing could be deleted to give
    the space back. The mount now names the old snapshot and carries the journals
    since, until a checkpoint fits again."""
    paths = node_paths(tmp_path / "nodes", 7)
    with contextlib.ExitStack() as stack:
        for p in paths:
            stack.enter_context(tmpfs(p, "1m"))
        await create_volume(paths, blob_size=1 << 16)
        vol = await open_volume(paths[0], **OPTS)
        await format_metadata(vol, str(tmp_path / "state0"), uid=0, gid=0)
        ms = await MetaStore.open(vol, str(tmp_path / "state"))
        first = ms.journal.epoch
        await make_changes(ms, vol, b"a")
        for k in range(1500):  # a snapshot bigger than the nodes' reserves
            ms.metadata.create(ROOT_INODE, b"%0200d" % k, mode=DIR, uid=0, gid=0, now_ns=1)
        await ms.sync()
        ms.metadata.close()  # a crash: the next mount checkpoints what it recovers
        for p in paths:
            fill_up(p)

        expected = None
        for session in (1, 2):
            vol = await open_volume(paths[0], **OPTS)
            ms = await MetaStore.open(vol, str(tmp_path / f"state{session}"))
            assert [e for e, _ in ms.superblock.carry] == list(range(first, first + session))
            if expected is not None:
                assert dump(ms.metadata.path) == expected
            ms.metadata.unlink(ROOT_INODE, b"%0200d" % session, now_ns=20)
            ms.metadata.create(ROOT_INODE, b"s%d" % session, mode=DIR, uid=0, gid=0, now_ns=21)
            expected = dump(ms.metadata.path)
            if session == 1:
                await ms.close()  # its checkpoint does not fit either: the journal holds all
            else:
                await ms.sync()
                ms.metadata.close()  # a crash

        for p in paths:
            os.unlink(os.path.join(p, "filler"))
        vol = await open_volume(paths[0], **OPTS)
        ms = await MetaStore.open(vol, str(tmp_path / "state3"))
        assert dump(ms.metadata.path) == expected
        assert ms.superblock.carry == ()

        def logs() -> list[str]:
            return [f for _, _, fs in os.walk(os.path.join(paths[0], "journal")) for f in fs]

        assert len(logs()) >= 3  # one per session at least, kept while carried
        await ms.drop_history()  # history now: this session has appended nothing yet
        assert logs() == []
        await ms.close()


async def test_a_checkpoint_that_fails_part_way_deletes_the_blobs_it_stored(
    tmp_path: Path,
) -> None:
    """The snapshot takes several blobs; the nodes go away after the first. That blob,
    named by no superblock, used to stay on the nodes until a scrub, a day later."""
    vol, paths = await new_volume(tmp_path)
    ms = await MetaStore.open(vol, str(tmp_path / "state"))
    for k in range(400):  # a database of a few blobs of 64 KiB
        ms.metadata.create(ROOT_INODE, b"%0200d" % k, mode=DIR, uid=0, gid=0, now_ns=1)
    await ms.sync()

    def on_nodes_left() -> set[Path]:
        return {p for node in paths[3:] for p in sliver_files(node)}

    kept = on_nodes_left()
    put = vol.blobs.put_blob
    puts = 0

    async def put_then_lose_three_nodes(data: bytes, **kwargs: bool) -> PutResult:
        nonlocal puts
        puts += 1
        if puts == 2:
            for i in (0, 1, 2):
                os.rename(paths[i], paths[i] + ".away")
        return await put(data, **kwargs)

    vol.blobs.put_blob = put_then_lose_three_nodes  # type: ignore[method-assign]
    with pytest.raises(StorageUnavailable):
        await ms.checkpoint()
    assert puts == 2
    assert on_nodes_left() == kept  # the first blob's files are gone again
    vol.blobs.put_blob = put  # type: ignore[method-assign]
    ms.metadata.close()


async def test_the_checkpoint_before_the_last_two_is_deleted_from_every_node(
    tmp_path: Path,
) -> None:
    vol, paths = await new_volume(tmp_path)
    ms = await MetaStore.open(vol, str(tmp_path / "state"))
    kept = []
    for tag in (b"1", b"2", b"3"):
        await make_changes(ms, vol, tag)
        await ms.checkpoint()
        kept.append({blob_id for blob_id, _, _ in ms.superblock.blobs})

    def sliver_files(blob_ids: set[str]) -> list[Path]:
        return [
            f
            for p in paths
            for f in Path(p).rglob("*")
            if f.is_file() and any(f.name.startswith(b) for b in blob_ids)
        ]

    oldest, newest_two = kept[0] - kept[1] - kept[2], kept[1] | kept[2]
    assert oldest and sliver_files(oldest) == []  # on every node, whichever pair it held
    assert len(sliver_files(newest_two)) == len(newest_two) * len(paths)
    await ms.close()
