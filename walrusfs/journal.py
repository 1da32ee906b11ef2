"""The metadata journal: every committed change, replicated to the nodes in segments.

Metadata is never held in one place only. Each committed SQLite transaction appends its
change (the mutation's name and arguments) here; `sync` packs the pending changes into one
segment and writes it to every writable node, and counts it committed once n-f nodes have
it (the same quorum as blobs). close() waits for a sync and fsync() for a durable one (the
nodes flush to stable storage); other changes are synced in the background within a second. Segments are small, so they are replicated,
not erasure coded.

Segment file, key `journal/e<epoch>/<first seq, 16 digits>`, format version 1:

| offset | size | field                                                              |
|-------:|-----:|--------------------------------------------------------------------|
|      0 |    4 | magic b"WSJS"                                                      |
|      4 |    1 | format version (1)                                                 |
|      5 |    8 | epoch (u64 LE): one per mount session                              |
|     13 |    8 | seq of the first record (u64 LE); records are numbered from 1     |
|     21 |    4 | record count (u32 LE)                                              |
|     25 |   32 | hash of the previous segment of this epoch, or of the checkpoint   |
|     57 |    4 | body length L (u32 LE)                                             |
|     61 |    L | body: one JSON record per line, {"op": name, "args": {...}}        |
| 61 + L |   32 | blake3 of everything before it                                     |

JSON cannot hold bytes or the block map's types, so values are tagged: {"$b": base64} for
bytes, {"$ref": [blob_id, meta, length]} for a BlockRef, {"$map": [[k, v], ...]} for a dict
with integer keys. Nothing read from a node is ever unpickled or evaluated.

Runs in trio tasks (append is synchronous and never yields); not thread-safe.
"""

from __future__ import annotations

import base64
import json
import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio
from blake3 import blake3

from backends import NodeError, NodeStore
from walrusfs.errors import StorageUnavailable
from walrusfs.metadata import BlockRef, Change
from walrusfs.nodeset import NodeSet

log = logging.getLogger(__name__)

MAGIC = b"WSJS"
VERSION = 1
_HEAD = struct.Struct("<4sBQQI32sI")
PREFIX = "journal"
# After the quorum answered, how long slower nodes may still finish before being left behind.
QUORUM_GRACE_S = 0.2


class JournalError(Exception):
    """A segment is damaged, out of order, or of an unknown version."""


def segment_key(epoch: int, first_seq: int) -> str:
    return f"{PREFIX}/e{epoch}/{first_seq:016d}"


def _encode(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$b": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, BlockRef):
        return {"$ref": [_encode(value.blob_id), _encode(value.meta), value.length]}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v) for k, v in value.items()}
        return {"$map": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot journal a {type(value).__name__}")


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "$b" in value:
            return base64.b64decode(value["$b"], validate=True)
        if "$ref" in value:
            blob_id, meta, length = value["$ref"]
            return BlockRef(_decode(blob_id), _decode(meta), int(length))
        if "$map" in value:
            return {_decode(k): _decode(v) for k, v in value["$map"]}
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def encode_change(change: Change) -> bytes:
    """One journal record: a line of JSON."""
    return json.dumps(
        {"op": change.op, "args": _encode(dict(change.args))}, separators=(",", ":")
    ).encode()


def decode_change(line: bytes) -> Change:
    """Parse one record; raises JournalError."""
    try:
        doc = json.loads(line)
        return Change(str(doc["op"]), _decode(doc["args"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise JournalError(f"damaged journal record: {exc}") from exc


@dataclass(frozen=True)
class Segment:
    epoch: int
    first_seq: int
    prev: bytes
    records: tuple[bytes, ...]

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.records) - 1

    def to_bytes(self) -> bytes:
        body = b"\n".join(self.records)
        head = _HEAD.pack(
            MAGIC, VERSION, self.epoch, self.first_seq, len(self.records), self.prev, len(body)
        )
        raw = head + body
        return raw + blake3(raw).digest()

    @classmethod
    def from_bytes(cls, raw: bytes, where: str = "") -> Segment:
        """Parse and check a segment; raises JournalError."""
        if len(raw) < _HEAD.size + 32:
            raise JournalError(f"{where}: journal segment truncated")
        if blake3(raw[:-32]).digest() != raw[-32:]:
            raise JournalError(f"{where}: journal segment checksum mismatch")
        magic, version, epoch, first, count, prev, length = _HEAD.unpack_from(raw)
        if magic != MAGIC:
            raise JournalError(f"{where}: not a journal segment")
        if version != VERSION:
            raise JournalError(f"{where}: journal segment version {version} unknown")
        body = raw[_HEAD.size : len(raw) - 32]
        if len(body) != length:
            raise JournalError(f"{where}: journal segment length mismatch")
        records = tuple(body.split(b"\n")) if count else ()
        if len(records) != count:
            raise JournalError(f"{where}: journal segment record count mismatch")
        return cls(epoch, first, prev, records)


def segment_hash(raw: bytes) -> bytes:
    return blake3(raw).digest()


class Journal:
    """The pending tail of committed changes and the writer of segments.

    `seq` is the number of the last appended record, `committed` of the last one stored on
    a quorum of nodes. `prev` is the hash that the next segment chains to.
    """

    def __init__(self, nodes: NodeSet, quorum: int, epoch: int, seq: int, prev: bytes) -> None:
        self.nodes = nodes
        self.quorum = quorum
        self.epoch = epoch
        self.seq = seq
        self.committed = seq
        self.prev = prev
        self.on_commit: Callable[[int], None] | None = None
        self._pending: list[bytes] = []
        self._lock = trio.Lock()
        self.segments_written = 0

    def append(self, change: Change) -> int:
        """Record one committed change (synchronous); returns its seq."""
        self._pending.append(encode_change(change))
        self.seq += 1
        return self.seq

    def retract(self, seq: int) -> None:
        """Withdraw the last appended change (its local COMMIT failed)."""
        if seq != self.seq or not self._pending:
            raise ValueError(f"can only retract the last change ({self.seq}), not {seq}")
        self._pending.pop()
        self.seq -= 1

    @property
    def lag(self) -> int:
        """Changes committed locally but not yet on a quorum of nodes."""
        return self.seq - self.committed

    async def sync(self, *, durable: bool = False) -> None:
        """Store every change appended so far on a quorum of nodes.

        Concurrent callers share one write (group commit). With `durable`, the nodes then
        flush their filesystems (syncfs), which also makes the data blobs and earlier
        segments written since durable: fsync() needs exactly that. Raises
        StorageUnavailable when fewer than n-f nodes take it; the changes stay pending.
        """
        target = self.seq
        async with self._lock:
            if self.committed < target and self._pending:
                seg = Segment(self.epoch, self.committed + 1, self.prev, tuple(self._pending))
                raw = seg.to_bytes()
                key = segment_key(self.epoch, seg.first_seq)
                await self._quorum(
                    f"metadata journal segment {key}",
                    lambda st: st.put(key, raw, durable=False),
                    put=(key, raw),
                )
                del self._pending[: len(seg.records)]
                self.prev = segment_hash(raw)
                self.committed = seg.last_seq
                self.segments_written += 1
            if durable:
                await self._flush_filesystems()
            if self.on_commit is not None:
                self.on_commit(self.committed)

    async def _flush_filesystems(self) -> None:
        """syncfs once per filesystem of the writable nodes; n-f nodes must be covered.

        Nodes on one filesystem (the same device) are all flushed by one syncfs: seven
        node directories on one disk need one flush, not seven in a row.
        Raises StorageUnavailable.
        """
        groups: dict[object, list[int]] = {}
        for i in sorted(self.nodes.writable()):
            fs = self.nodes.nodes[i].filesystem
            groups.setdefault(i if fs is None else ("fs", fs), []).append(i)
        covered: list[int] = []
        errors: dict[int, str] = {}
        enough, all_done = trio.Event(), trio.Event()
        left = len(groups)

        async def flush(members: list[int]) -> None:
            nonlocal left
            for i in members:  # another node of the group may still flush it
                try:
                    await self.nodes.call(i, lambda st: st.syncfs())
                except NodeError as exc:
                    errors[i] = str(exc)
                else:
                    covered.extend(members)
                    break
            left -= 1
            if len(covered) >= self.quorum or left == 0:
                enough.set()
            if left == 0:
                all_done.set()

        if groups:
            # As in _quorum: a hung node must not stall every fsync().
            async with trio.open_nursery() as nursery:
                for members in groups.values():
                    nursery.start_soon(flush, members)
                await enough.wait()
                with trio.move_on_after(QUORUM_GRACE_S):
                    await all_done.wait()
                nursery.cancel_scope.cancel()
        if len(covered) < self.quorum:
            detail = "; ".join(f"node {i}: {e}" for i, e in sorted(errors.items()))
            raise StorageUnavailable(
                f"flushing the nodes to stable storage: done for only {len(covered)} nodes, "
                f"need {self.quorum}: {detail or 'too many nodes down'}"
            )

    async def _quorum(
        self,
        what: str,
        op: Callable[[NodeStore], Awaitable[None]],
        put: tuple[str, bytes] | None = None,
    ) -> None:
        """Run `op` on every writable node; return once n-f succeeded (stragglers get a
        short grace, then are left behind: a hung node must not stall every close()).

        When `op` is the small `put` (key, bytes), healthy nodes take it in one batch.
        Raises StorageUnavailable when fewer than n-f succeed.
        """
        ok: list[int] = []
        errors: dict[int, str] = {}
        writable = sorted(self.nodes.writable())
        if put is not None:
            done = await self.nodes.put_small([(i, *put) for i in writable], durable=False)
            for i, outcome in done.items():
                if outcome is None:
                    ok.append(i)
                else:
                    errors[i] = str(outcome)
            writable = [i for i in writable if i not in done]
        enough, all_done = trio.Event(), trio.Event()
        if len(ok) >= self.quorum:
            enough.set()

        left = len(writable)

        async def one(i: int) -> None:
            nonlocal left
            try:
                await self.nodes.call(i, op)
                ok.append(i)
            except NodeError as exc:
                errors[i] = str(exc)
            left -= 1
            if len(ok) >= self.quorum:
                enough.set()
            if left == 0:
                all_done.set()
                enough.set()

        if writable:
            async with trio.open_nursery() as nursery:
                for i in writable:
                    nursery.start_soon(one, i)
                await enough.wait()
                with trio.move_on_after(QUORUM_GRACE_S):
                    await all_done.wait()
                nursery.cancel_scope.cancel()
        if len(ok) < self.quorum:
            detail = "; ".join(f"node {i}: {e}" for i, e in sorted(errors.items()))
            raise StorageUnavailable(
                f"{what}: done on only {len(ok)} nodes, need {self.quorum}: {detail or 'too many nodes down'}"
            )


async def read_segment(nodes: NodeSet, key: str, agree: int) -> bytes | None:
    """A segment that at least `agree` nodes hold identically (and intact), or None.

    A committed segment is on n-f nodes, so with at most f of them bad, f+1 agree.
    """
    copies: dict[bytes, int] = {}

    async def one(i: int) -> None:
        try:
            raw = await nodes.call(i, lambda st: st.get(key))
            Segment.from_bytes(raw, f"node {i} {key}")
        except (NodeError, JournalError):
            return
        copies[raw] = copies.get(raw, 0) + 1

    async with trio.open_nursery() as nursery:
        for i in sorted(nodes.readable()):
            nursery.start_soon(one, i)
    best = max(copies.items(), key=lambda kv: kv[1], default=None)
    return best[0] if best is not None and best[1] >= agree else None
