"""Checkpoints of the metadata database, the superblock that names them, and recovery.

A checkpoint is a consistent snapshot of the SQLite database stored as ordinary blobs
(erasure coded and verified like file data). The superblock, a small replicated file on
every node, names the newest checkpoint and where the journal continues after it.
Recovery, on a machine with no local state, takes the newest superblock that f+1 nodes
agree on, restores its snapshot, and replays the journal segments that f+1 nodes hold
identically and that chain from it. A committed superblock or segment is on n-f nodes,
so with at most f bad nodes f+1 honest copies always exist and a lone damaged or hostile
node cannot substitute its own.

Superblock, key `superblock.json`: JSON, then a line with the blake3 of the JSON.

| field         | meaning                                                           |
|---------------|-------------------------------------------------------------------|
| format        | "walrusfs-superblock"                                             |
| version       | 1                                                                 |
| volume_id     | the volume's id                                                   |
| epoch         | mount session that wrote it; journal segments are per epoch       |
| seq           | last journal record contained in the snapshot                     |
| chain_seq     | last record of the last segment written before the snapshot       |
| chain_hash    | hash the next segment chains to (hex)                             |
| blobs         | the snapshot: [[blob id hex, blob metadata hex, length], ...]     |
| size, digest  | snapshot length and blake3 (hex)                                  |
| previous      | the checkpoint before, as `blobs` (kept, and repaired, until the   |
|               | next one: the fallback should the newest become unreadable)       |
| created_ns    | wall-clock time of writing                                        |
| carry         | version 2 only: [[epoch, seq], ...], journals of earlier sessions |
|               | to replay, each up to seq, before this one's (see `replay`)       |

Runs in trio tasks; SQLite snapshots are taken in worker threads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import trio
from blake3 import blake3

from backends import NodeError
from walrusfs.errors import FSError, StateDiskFull, StorageUnavailable, disk_full
from walrusfs.journal import DURABLE_MARK, agreed_segment, read_epoch
from walrusfs.metadata import BlockRef, Change, read_only
from walrusfs.segment import JournalError, Segment, decode_change, segment_hash
from walrusfs.volume import Volume

log = logging.getLogger(__name__)

SUPERBLOCK_KEY = "superblock.json"
FORMAT = "walrusfs-superblock"
VERSION = 1
# With a `carry`. A reader that knew only version 1 would replay this session's journal
# alone, find nothing where the snapshot ends, and quietly stop there: it must refuse
# the superblock instead, and it refuses unknown versions.
CARRY_VERSION = 2


class RecoveryError(Exception):
    """The metadata cannot be recovered from the nodes; the message says why."""


@dataclass(frozen=True)
class Superblock:
    volume_id: str
    epoch: int
    seq: int
    chain_seq: int
    chain_hash: str
    blobs: tuple[tuple[str, str, int], ...]
    size: int
    digest: str
    previous: tuple[tuple[str, str, int], ...]
    created_ns: int
    carry: tuple[tuple[int, int], ...] = ()

    def to_bytes(self) -> bytes:
        doc = {"format": FORMAT, "version": CARRY_VERSION if self.carry else VERSION}
        doc.update(asdict(self))
        if not self.carry:
            del doc["carry"]
        body = json.dumps(doc, sort_keys=True).encode()
        return body + b"\n" + blake3(body).hexdigest().encode() + b"\n"

    @classmethod
    def from_bytes(cls, raw: bytes) -> Superblock:
        """Parse and check; raises ValueError."""
        body, sep, rest = raw.rstrip(b"\n").rpartition(b"\n")
        if not sep or blake3(body).hexdigest().encode() != rest:
            raise ValueError("superblock checksum mismatch")
        doc = json.loads(body)
        if doc.get("format") != FORMAT or doc.get("version") not in (VERSION, CARRY_VERSION):
            raise ValueError(
                f"unknown superblock format {doc.get('format')!r} v{doc.get('version')!r}"
            )
        return cls(
            volume_id=str(doc["volume_id"]),
            epoch=int(doc["epoch"]),
            seq=int(doc["seq"]),
            chain_seq=int(doc["chain_seq"]),
            chain_hash=str(doc["chain_hash"]),
            blobs=tuple((str(b), str(m), int(n)) for b, m, n in doc["blobs"]),
            size=int(doc["size"]),
            digest=str(doc["digest"]),
            previous=tuple((str(b), str(m), int(n)) for b, m, n in doc["previous"]),
            created_ns=int(doc["created_ns"]),
            carry=tuple((int(e), int(q)) for e, q in doc.get("carry", ())),
        )


# A snapshot is compacted when more than 1/VACUUM_FRACTION of its pages are free.
VACUUM_FRACTION = 4


def snapshot(db_path: str) -> tuple[bytes, int]:
    """A consistent copy of the database and the journal seq it contains (blocking).

    The copy is made next to the database. Raises StateDiskFull when its disk is full."""
    try:
        return _snapshot(db_path)
    except (sqlite3.Error, OSError) as exc:
        if disk_full(exc):
            raise StateDiskFull.of(db_path, exc) from exc
        raise


def _snapshot(db_path: str) -> tuple[bytes, int]:
    src = read_only(db_path)
    tmp = db_path + ".snapshot"
    try:
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst)  # one step: a single read transaction, so consistent
            free = dst.execute("PRAGMA freelist_count").fetchone()[0]
            pages = dst.execute("PRAGMA page_count").fetchone()[0]
            if free * VACUUM_FRACTION > pages:
                # Pages freed since (small files' bytes, in patches until packed) would
                # be stored and erasure coded with every checkpoint: a volume that took
                # 2,000 small files had 2,109 of 2,140 pages free. Only the copy shrinks.
                dst.execute("VACUUM")
            row = dst.execute("SELECT value FROM meta WHERE key = 'journal_seq'").fetchone()
        finally:
            dst.close()
        with open(tmp, "rb") as f:
            data = f.read()
    finally:
        src.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
    return data, int(row[0]) if row else 0


def install(db_path: str, data: bytes) -> None:
    """Replace the local database with a restored snapshot, atomically (blocking).

    Raises StateDiskFull when the disk of the database is full (nothing written stays)."""
    for suffix in ("-wal", "-shm"):
        if os.path.exists(db_path + suffix):
            os.unlink(db_path + suffix)
    tmp = db_path + ".restore"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, db_path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if disk_full(exc):
            raise StateDiskFull.of(db_path, exc) from exc
        raise


async def write_superblock(vol: Volume, sb: Superblock) -> None:
    """Store the superblock durably on every writable node; raises StorageUnavailable below n-f."""
    raw = sb.to_bytes()
    ok: list[int] = []

    async def one(i: int) -> None:
        try:
            await vol.nodes.call_small(
                i, lambda st: st.put(SUPERBLOCK_KEY, raw, durable=True), len(raw)
            )
            ok.append(i)
        except NodeError:
            pass

    began = trio.current_time()
    quorum = vol.params.n - vol.params.f
    async with trio.open_nursery() as nursery:
        for i in sorted(vol.nodes.writable(small=True)):
            nursery.start_soon(one, i)
    if len(ok) < quorum:
        # Nodes taken as down may be back since their last probe (NodeSet.revive).
        back = await vol.nodes.writable_again(began, ok, small=True)
        async with trio.open_nursery() as nursery:
            for i in back:
                nursery.start_soon(one, i)
    if len(ok) < quorum:
        raise StorageUnavailable(f"superblock stored on only {len(ok)} nodes, need {quorum}")


async def read_superblock(vol: Volume) -> Superblock | None:
    """The newest superblock that f+1 nodes hold identically; None if no node has one.

    Raises RecoveryError when superblocks exist but none is agreed on by f+1 nodes.
    """
    copies: dict[bytes, int] = {}
    seen = 0

    async def one(i: int) -> None:
        nonlocal seen
        try:
            raw = await vol.nodes.call(i, lambda st: st.get(SUPERBLOCK_KEY))
        except NodeError:
            return
        seen += 1
        try:
            sb = Superblock.from_bytes(raw)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("node %d: damaged superblock ignored: %s", i, exc)
            return
        if sb.volume_id != vol.identity.volume_id:
            log.warning("node %d: superblock of another volume ignored", i)
            return
        copies[raw] = copies.get(raw, 0) + 1

    async with trio.open_nursery() as nursery:
        for i in sorted(vol.nodes.readable()):
            nursery.start_soon(one, i)
    agreed = [
        Superblock.from_bytes(raw) for raw, count in copies.items() if count >= vol.params.f + 1
    ]
    if not agreed:
        if seen == 0:
            return None
        raise RecoveryError(
            f"no superblock is held identically by {vol.params.f + 1} nodes "
            f"({seen} nodes answered); too many nodes missing or damaged"
        )
    return max(agreed, key=lambda sb: (sb.epoch, sb.seq, sb.created_ns))


async def write_checkpoint(
    vol: Volume,
    db_path: str,
    *,
    epoch: int,
    chain_seq: int,
    chain_hash: bytes,
    previous: Superblock | None,
) -> Superblock:
    """Snapshot the database into blobs and publish a superblock naming it.

    `chain_seq`/`chain_hash` are the journal position at the last sync before the
    snapshot (the snapshot itself may contain later records). Raises StorageUnavailable.
    """
    data, seq = await trio.to_thread.run_sync(snapshot, db_path)
    size = vol.identity.blob_size
    blobs: list[tuple[str, str, int]] = []
    try:
        for off in range(0, max(len(data), 1), size):
            # Full nodes too: a checkpoint is what lets their journal files go.
            r = await vol.blobs.put_blob(data[off : off + size], durable=True, small=True)
            blobs.append((r.blob_id.hex(), r.meta.hex(), len(data[off : off + size])))
    except Exception:
        # No superblock names them: left, they would hold their space until a scrub
        # (a day), on nodes that may be failing for want of it.
        await _delete_unnamed(vol, blobs, previous)
        raise
    sb = Superblock(
        volume_id=vol.identity.volume_id,
        epoch=epoch,
        seq=seq,
        chain_seq=chain_seq,
        chain_hash=chain_hash.hex(),
        blobs=tuple(blobs),
        size=len(data),
        digest=blake3(data).hexdigest(),
        previous=previous.blobs if previous else (),
        created_ns=time.time_ns(),
    )
    await write_superblock(vol, sb)
    if previous is not None:
        await _drop_old(
            vol, previous, keep={b for b, _, _ in sb.blobs} | {b for b, _, _ in previous.blobs}
        )
    return sb


async def _delete_unnamed(
    vol: Volume, stored: list[tuple[str, str, int]], previous: Superblock | None
) -> None:
    """Delete the blobs a failed checkpoint stored, but for those the current or the
    previous checkpoint names too (same content, same id). Not after a superblock write
    that failed: f+1 nodes holding it would make it the one the next mount recovers."""
    named = {b for b, _, _ in (*previous.blobs, *previous.previous)} if previous else set()
    await _delete_blobs(vol, stored, named, "of a failed checkpoint")


async def _drop_old(vol: Volume, previous: Superblock, keep: set[str]) -> None:
    """Delete the checkpoint before `previous`: the newest two stay recoverable."""
    await _delete_blobs(vol, previous.previous, keep, "of an old checkpoint")


async def _delete_blobs(
    vol: Volume, blobs: Iterable[tuple[str, str, int]], keep: set[str], what: str
) -> None:
    for b, meta, _ in blobs:
        if b in keep:
            continue
        try:
            # By its metadata: one key per node, where the id alone costs n tries on each
            # (20 s at a mount beside one slow node, instead of 3).
            await vol.blobs.delete_blob(bytes.fromhex(b), bytes.fromhex(meta))
        except StorageUnavailable:
            log.debug("blob %s %s not deleted now", b[:16], what)


async def restore(vol: Volume, sb: Superblock, db_path: str) -> None:
    """Install the snapshot a superblock names as the local database. Raises RecoveryError."""
    parts: list[bytes] = []
    try:
        for blob_id, meta, length in sb.blobs:
            part = await vol.blobs.get_blob(bytes.fromhex(blob_id), bytes.fromhex(meta))
            if len(part) != length:
                raise RecoveryError(f"checkpoint blob {blob_id[:16]} has the wrong length")
            parts.append(bytes(part))
    except StorageUnavailable as exc:
        raise RecoveryError(f"metadata checkpoint unreadable: {exc}") from exc
    data = b"".join(parts)
    if blake3(data).hexdigest() != sb.digest or len(data) != sb.size:
        raise RecoveryError("metadata checkpoint does not match its digest")
    await trio.to_thread.run_sync(install, db_path, data)


@dataclass
class Replayed:
    """What a replay of the journal found.

    `seq` and `prev`: where the next session's journal continues (last seq, chain hash).
    `durable`: the last record known to be on stable storage with its blobs (the
    checkpoint, or a DURABLE_MARK). `named`: each blob the applied changes name, with the
    seq of the first that does and its metadata.
    """

    seq: int
    prev: bytes
    durable: int
    named: dict[bytes, tuple[int, bytes]]


def _refs(value: Any) -> Iterator[BlockRef]:
    if isinstance(value, BlockRef):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _refs(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _refs(v)


async def replay(
    vol: Volume, sb: Superblock, apply: Callable[[Change], None], *, until: int | None = None
) -> Replayed:
    """Apply the journal after the checkpoint (up to seq `until` if given): the journals
    it carries (`Superblock.carry`), then its own session's.

    Stops at the first segment that f+1 nodes do not hold identically (the uncommitted
    tail of a crashed session) or that does not chain; records already in the snapshot
    are skipped. Raises RecoveryError for a damaged record in an agreed segment.
    """
    seq, prev = sb.chain_seq, bytes.fromhex(sb.chain_hash)
    out = Replayed(seq, prev, sb.seq, {})
    applied = sb.seq
    for epoch, through in (*sb.carry, (sb.epoch, None)):
        stop = min((s for s in (through, until) if s is not None), default=None)
        held = await read_epoch(vol.nodes, epoch)
        while stop is None or seq < stop:
            raw = agreed_segment(held, seq + 1, vol.params.f + 1)
            if raw is None:
                break
            seg = Segment.from_bytes(raw, f"journal of epoch {epoch} at {seq + 1}")
            if seg.prev != prev or seg.first_seq != seq + 1 or seg.epoch != epoch:
                log.warning(
                    "journal segment at %d of epoch %d does not chain; recovery stops before it",
                    seq + 1,
                    epoch,
                )
                break
            if stop is not None and seg.last_seq > stop:
                # Cut inside a segment: what follows chains to the last whole one.
                applied = _apply_records(seg, applied, stop, apply, out)
                seq = stop
                break
            applied = _apply_records(seg, applied, seg.last_seq, apply, out)
            seq, prev = seg.last_seq, segment_hash(raw)
        if through is None:
            break
        seq = max(seq, applied)  # the snapshot may hold records past the last segment
        if seq < through or (until is not None and seq >= until):
            break  # a carried journal that stops short: nothing chains on; or done
    out.seq, out.prev = max(applied, seq), prev
    return out


def _apply_records(
    seg: Segment, applied: int, last: int, apply: Callable[[Change], None], out: Replayed
) -> int:
    """Apply the segment's records after `applied` up to `last`; returns the last applied."""
    for at, record in enumerate(seg.records, seg.first_seq):
        if at > last:
            break
        if at <= applied:
            continue
        try:
            change = decode_change(record)
            mark = int(change.args["through"]) if change.op == DURABLE_MARK else None
        except (JournalError, KeyError, TypeError, ValueError) as exc:
            raise RecoveryError(f"journal at {at}: {exc}") from exc
        if mark is None:
            try:
                apply(change)
            except FSError as exc:
                raise RecoveryError(f"journal at {at}: {exc}") from exc
        else:
            out.durable = max(out.durable, mark)
        for ref in _refs(change.args):
            out.named.setdefault(ref.blob_id, (at, ref.meta))
        applied = at
    return applied
