"""Recovering the metadata from the nodes, including after a crash of every node.

Recovery restores the newest checkpoint and replays the journal after it
(walrusfs.checkpoint). One more step makes it safe after a power loss of every node, which
is one machine's power loss when the node directories are its own disks.

A close() puts its blobs without flushing the nodes, and the journal record naming them is
appended the same way: after a power loss the record may be on a disk while its blob is
not, and the file would name data that is nowhere instead of what it held before. Such a
record was never durable, and no durable sync followed it, since that would have flushed
its blob as well. So nothing after it was promised either (fsync() waits for a durable
sync), and none of the blobs that it or a later record freed is deleted yet (deletes wait
for a durable sync: walrusfs.reclaim). Recovery therefore stops just before the first
record that names a blob still in use that does not read back, verified (decoded if need
be): the volume as it was a moment before the crash, with every blob it names stored.
Every blob named after the last durable sync is read back once; the background makes
changes durable a few seconds after they are made (MetaStore.run_background, --commit),
which bounds that reading to what was written in those seconds.

A blob kept that some nodes do not hold at full size (the power loss cut part of its
files short), or whose read-back found slivers corrupt, is handed to repair at once
(`Recovered.torn`), not left for a scrub to find.

A record at or before the journal's last durable point (the checkpoint, or a
DURABLE_MARK) is never dropped for a missing blob: that blob was flushed and lost later,
by more than f nodes failing, which fsck and scrub report as lost data. The nodes learn
of a durable sync with the next change, or within a second from the background sync; a
crash in between that also comes with such a loss may leave out more than it should.

Runs in trio tasks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from walrusfs.checkpoint import Replayed, Superblock, replay, restore
from walrusfs.errors import StorageUnavailable
from walrusfs.metadata import Metadata
from walrusfs.volume import Volume

log = logging.getLogger(__name__)

READ_BACK_AT_ONCE = 4  # blobs read back at once after a crash (each held whole)


@dataclass
class Recovered:
    metadata: Metadata  # open on the recovered database; the caller closes it
    seq: int  # where the next session's journal continues: last seq, chain hash
    prev: bytes
    dropped: int  # journal records left out after a crash of every node (0: none)
    # Blobs kept that some readable nodes do not hold whole (the crash tore their files):
    # blob id -> those nodes, for repair to fill in at once rather than at a scrub.
    torn: dict[bytes, tuple[int, ...]]
    # Every blob kept that was named after the last durable sync: blob id -> metadata.
    # Reading one back verified R primary slivers; its other files are checked after the
    # mount (Scrubber.check_blobs), since a crash may have spoilt them without a trace in
    # their sizes.
    tail: dict[bytes, bytes] = field(default_factory=dict)


async def recover(vol: Volume, sb: Superblock, path: str) -> Recovered:
    """Restore `sb`'s checkpoint at `path` and replay the journal, leaving out a tail whose
    blobs a crash lost. Raises RecoveryError or StorageUnavailable."""
    await restore(vol, sb, path)
    md = Metadata(path)
    try:
        done = await replay(vol, sb, md.apply)
        # Durable as far as any surviving mark says, marks past a cut included.
        durable = done.durable
        seen = _Seen()
        kept = done
        while True:
            lost = await _unstored(vol, md, kept, durable, seen)
            if not lost:
                break
            # The state before the first such record may name a blob that a later record
            # (now cut too) had freed: look again at what it names.
            md.close()
            await restore(vol, sb, path)
            md = Metadata(path)
            kept = await replay(vol, sb, md.apply, until=min(lost) - 1)
    except BaseException:
        md.close()
        raise
    dropped = done.seq - kept.seq
    if dropped:
        log.warning(
            "the journal's last %d changes name blobs that do not read back: a crash of the "
            "nodes before they were flushed lost them. Recovery stops before change %d: "
            "files changed in the moments before the crash are as they were before those "
            "changes (none of them had been fsynced).",
            dropped,
            kept.seq + 1,
        )
    readable = vol.nodes.readable()
    torn: dict[bytes, tuple[int, ...]] = {}
    tail: dict[bytes, bytes] = {}
    for blob_id, holders in seen.whole.items():
        if holders is None or blob_id in seen.lost or md.blob_refcount(blob_id) == 0:
            continue
        tail[blob_id] = seen.metas[blob_id]
        missing = (readable - holders) | seen.damaged.get(blob_id, set())
        if missing:
            torn[blob_id] = tuple(sorted(missing))
    if torn:
        log.info(
            "%d blobs written just before a crash have sliver files missing, short or "
            "corrupt: repairing",
            len(torn),
        )
    return Recovered(md, kept.seq, kept.prev, dropped, torn, tail)


@dataclass
class _Seen:
    """What recovery looked at, by blob: the readable nodes holding its sliver file at
    full size (None: its metadata is damaged, which is no crash's doing), and the blobs
    that did not read back."""

    whole: dict[bytes, set[int] | None] = field(default_factory=dict)
    lost: set[bytes] = field(default_factory=set)
    damaged: dict[bytes, set[int]] = field(default_factory=dict)  # nodes read back corrupt
    metas: dict[bytes, bytes] = field(default_factory=dict)  # of the blobs looked at


async def _unstored(
    vol: Volume, md: Metadata, done: Replayed, durable: int, seen: _Seen
) -> list[int]:
    """The seqs of the records after `durable` first naming a blob that the replayed
    state uses and that does not read back (verified, decoded if need be)."""
    named = [
        (seq, blob_id, meta)
        for blob_id, (seq, meta) in done.named.items()
        if seq > durable and md.blob_refcount(blob_id) > 0
    ]
    if not named:
        return []
    readable = len(vol.nodes.readable())
    if readable < vol.params.n - vol.params.f:
        # Blobs on the missing nodes would look lost: dropping changes for them could
        # drop what survived. Keep everything; reads report what is really gone.
        log.warning(
            "only %d nodes are readable: not checking whether the blobs of the journal's "
            "last changes survived a crash",
            readable,
        )
        return []
    todo: dict[bytes, bytes] = {}
    for _seq, blob_id, meta in named:
        if blob_id in seen.whole:
            continue
        try:
            vol.blobs.metadata(blob_id, meta)  # parsed once, remembered for whole_files
        except StorageUnavailable:
            seen.whole[blob_id] = None  # reads report it
            continue
        todo[blob_id] = meta
    seen.metas.update(todo)
    if todo:
        # Sizes tell which files a crash cut short, for repair. Whether the blob survived
        # takes reading it back: a filesystem may keep a file's size and lose its pages
        # (XFS, ext4 with data=writeback), and one cut short may still hold its primary
        # sliver. That reads what was written since the last durable sync (--commit).
        seen.whole.update(await vol.blobs.whole_files(todo))
        seen.lost |= todo.keys() - await _read_back(vol, todo, seen.damaged)
    return [seq for seq, blob_id, _meta in named if blob_id in seen.lost]


async def _read_back(
    vol: Volume, blobs: dict[bytes, bytes], damaged: dict[bytes, set[int]]
) -> set[bytes]:
    """The blobs that read back whole and verified (a few at a time: each is held in
    memory while it is checked). The nodes whose slivers the reads found corrupt are
    added to `damaged`, by blob, for repair."""
    ok: set[bytes] = set()
    limit = trio.CapacityLimiter(READ_BACK_AT_ONCE)

    def note(blob_id: bytes, pair: int, why: str) -> None:
        node = vol.blobs.metadata(blob_id, blobs[blob_id]).node_of_pair(pair)
        damaged.setdefault(blob_id, set()).add(node)

    async def one(blob_id: bytes, meta: bytes) -> None:
        async with limit:
            try:
                await vol.blobs.get_blob(blob_id, meta)
            except StorageUnavailable as exc:
                log.info("blob %s did not survive the crash: %s", blob_id.hex()[:16], exc)
                return
        ok.add(blob_id)

    hooked, vol.blobs.on_bad_sliver = vol.blobs.on_bad_sliver, note
    try:
        async with trio.open_nursery() as nursery:
            for blob_id, meta in blobs.items():
                nursery.start_soon(one, blob_id, meta)
    finally:
        vol.blobs.on_bad_sliver = hooked
    return ok
