"""The metadata journal: every committed change, replicated to the nodes, and read back.

Metadata is never held in one place only. Each committed SQLite transaction appends its
change (the mutation's name and arguments) here; `sync` packs the pending changes into one
segment, appends it to the current log file of every writable node, and counts it
committed once n-f nodes have it (the same quorum as blobs). close() waits for a sync and
fsync() for a durable one (the nodes flush to stable storage); other changes are synced in
the background within a second. Segments are small, so they are replicated, not erasure
coded; the format is in walrusfs.segment.

Appending, rather than a file per segment, keeps closing a small file cheap (an append
costs a fraction of creating and renaming a file) and the node directories small. A
segment whose sync failed is sent again unchanged, so every copy of a segment anywhere is
byte-identical and a reader never has to choose between versions. `rotate` starts new
log files at a checkpoint; `drop_history` then deletes the files the checkpoint made
history. `read_epoch` collects the segments of a session from every node for recovery.

Runs in trio tasks (append is synchronous and never yields); not thread-safe.
"""

from __future__ import annotations

import functools
import logging

import trio

from backends import NodeError, NodeStore, describe_failures
from walrusfs.errors import NoSpace, StorageUnavailable
from walrusfs.flush import flush_filesystems, quorum_of
from walrusfs.metadata import Change
from walrusfs.nodeset import NodeSet, NodeState, for_want_of_space
from walrusfs.segment import (
    PREFIX,
    JournalError,
    Segment,
    encode_change,
    parse_log_key,
    scan_log,
    segment_hash,
    segment_key,
)

log = logging.getLogger(__name__)

# A record that is no change: "every record up to `through`, and every blob they name, is
# on stable storage". Sent with the next changes after a durable sync (it costs no append
# of its own); recovery uses it to tell a blob a crash of every node lost from one lost
# after it was flushed (walrusfs.recovery).
DURABLE_MARK = "durable_mark"


class Journal:
    """The pending tail of committed changes and the writer of segments.

    `seq` is the number of the last appended record, `committed` of the last one stored on
    a quorum of nodes, `durable` of the last one on their stable storage (the records it
    starts from are taken to be). `prev` is the hash that the next segment chains to.
    """

    def __init__(self, nodes: NodeSet, quorum: int, epoch: int, seq: int, prev: bytes) -> None:
        self.nodes = nodes
        self.quorum = quorum
        self.epoch = epoch
        self.seq = seq
        self.committed = seq
        self.durable = seq
        # The last record that a sync asked for (fsync(), a delete round) made durable:
        # only those promise it. The background's commit interval also makes records
        # durable, without that promise (see sync).
        self.promised = seq
        self._marked = seq  # the last `durable` sent as a DURABLE_MARK (or started from)
        self._changed = seq  # the seq of the last change that is not a DURABLE_MARK
        self.prev = prev
        self._pending: list[bytes] = []
        self._attempt: tuple[Segment, bytes] | None = None  # sent, not yet on a quorum
        self._log = segment_key(epoch, seq + 1)  # the current log file of every node
        self._lock = trio.Lock()  # one segment append at a time
        self._flush_lock = trio.Lock()  # one flush of the nodes at a time
        self.segments_written = 0
        self.log_bytes = 0  # of records appended since the current log files began

    def append(self, change: Change) -> int:
        """Record one committed change (synchronous); returns its seq."""
        self.mark()
        self._changed = self._push(encode_change(change))
        return self._changed

    @property
    def undurable(self) -> bool:
        """Whether changes were appended since the last durable sync began (marks aside:
        making a mark durable only calls for another mark)."""
        return self._changed > self.durable

    def mark(self) -> None:
        """Queue a DURABLE_MARK if the nodes were not told of the last durable sync yet:
        the next change takes it along, or the background sync when none comes."""
        if self.durable > self._marked:
            self._marked = self.durable
            self._push(encode_change(Change(DURABLE_MARK, {"through": self.durable})))

    def _push(self, record: bytes) -> int:
        self._pending.append(record)
        self.log_bytes += len(record)
        self.seq += 1
        return self.seq

    def retract(self, seq: int) -> None:
        """Withdraw the last appended change (its local COMMIT failed)."""
        sent = len(self._attempt[0].records) if self._attempt else 0
        if seq != self.seq or len(self._pending) <= sent:
            raise ValueError(f"can only retract the last unsent change ({self.seq}), not {seq}")
        self.log_bytes -= len(self._pending.pop())
        self.seq -= 1

    @property
    def log_key(self) -> str:
        """The key of the log file that segments are appended to now (on every node)."""
        return self._log

    @property
    def lag(self) -> int:
        """Changes committed locally but not yet on a quorum of nodes."""
        return self.seq - self.committed

    async def sync(self, *, durable: bool = False, promise: bool = True) -> None:
        """Store every change appended so far on a quorum of nodes.

        Concurrent callers share one write (group commit). With `durable`, the nodes then
        flush their filesystems (syncfs), which also makes the data blobs and earlier
        segments written since durable: fsync() needs exactly that; none is needed when
        a flush since these changes did it already (`durable`). Without `promise` (the
        background's commit interval), the changes are made durable but not `promised`.
        Raises
        StorageUnavailable when fewer than n-f nodes take it; the changes stay pending,
        and the segment is sent again as it is.
        """
        target = self.seq
        async with self._lock:
            while self.committed < target and self._pending:
                if self._attempt is None:
                    seg = Segment(self.epoch, self.committed + 1, self.prev, tuple(self._pending))
                    self._attempt = (seg, seg.to_bytes())
                seg, raw = self._attempt
                await self._append(raw)
                self._attempt = None
                del self._pending[: len(seg.records)]
                self.prev = segment_hash(raw)
                self.committed = seg.last_seq
                self.segments_written += 1
        if not durable:
            return
        # Outside the append lock: a flush can take seconds on a busy disk, and close()
        # needs only appends. One flush at a time, shared by the callers it covers.
        async with self._flush_lock:
            if self.durable < target:
                # Records are on the nodes before this flush starts, and their blobs were
                # written before them: it makes all of them durable.
                reached = self.committed
                await self._flush_filesystems()
                self.durable = max(self.durable, reached)
            if promise:
                self.promised = max(self.promised, target)

    async def rotate(self) -> tuple[int, bytes]:
        """Sync, then cut: later segments go to new log files. Returns (seq, hash) at the cut.

        Every log file started before the cut holds only segments up to it, so once a
        checkpoint taken at the cut is committed, they may go (`drop_history`). Raises
        StorageUnavailable.
        """
        await self.sync()
        async with self._lock:
            self._log = segment_key(self.epoch, self.committed + 1)
            self.log_bytes = sum(map(len, self._pending))
            return self.committed, self.prev

    async def _flush_filesystems(self) -> None:
        """syncfs once per filesystem of the writable nodes; n-f nodes must be covered.

        Raises StorageUnavailable.
        """
        durable, errors = await flush_filesystems(
            self.nodes, self.nodes.writable(small=True), self.quorum
        )
        if len(durable) < self.quorum:
            detail = describe_failures(errors)
            raise StorageUnavailable(
                f"flushing the nodes to stable storage: done for only {len(durable)} nodes, "
                f"need {self.quorum}: {detail or 'too many nodes down'}"
            )

    async def _append(self, raw: bytes) -> None:
        """Append a segment to every writable node's log; return once n-f have it.

        Healthy nodes take it in one batch, the others one by one; short of the quorum,
        so do the nodes taken as down that a new probe finds back. Raises NoSpace or
        StorageUnavailable when fewer than n-f succeed.
        """
        errors: dict[int, NodeError] = {}  # kept whole: describe_failures groups them
        key = self._log
        began = trio.current_time()
        writable = sorted(self.nodes.writable(small=True))
        done = await self.nodes.append_batch([(i, key, raw) for i in writable])
        have = {i for i, outcome in done.items() if outcome is None}
        for i, outcome in done.items():
            if outcome is not None:
                errors[i] = outcome

        async def one(i: int) -> int:
            try:
                await self.nodes.call_small(i, lambda st: st.append(key, raw), len(raw))
            except NodeError as exc:
                errors[i] = exc
                return 0
            errors.pop(i, None)
            have.add(i)
            return 1

        ok = await quorum_of(
            [functools.partial(one, i) for i in writable if i not in done],
            self.quorum,
            have=len(have),
        )
        if ok < self.quorum:
            # Nodes taken as down may be back since their last probe (NodeSet.revive).
            back = await self.nodes.writable_again(began, have, small=True)
            ok = await quorum_of([functools.partial(one, i) for i in back], self.quorum, have=ok)
        if ok < self.quorum:
            detail = describe_failures(errors)
            full = sum(
                1
                for node in self.nodes.nodes
                if node.state is NodeState.FULL and node.index not in have
            )
            n = len(self.nodes)
            short = for_want_of_space(n, self.quorum, full, n - ok - full)
            cls = NoSpace if short else StorageUnavailable
            raise cls(
                f"metadata journal {key}: appended on only {ok} nodes, need "
                f"{self.quorum}: {detail or 'too many nodes down or full'}"
            )


async def read_epoch(nodes: NodeSet, epoch: int) -> list[dict[int, set[bytes]]]:
    """Every intact segment of session `epoch`, per readable node: first seq -> copies.

    A node that cannot be listed or read is left out (it counts as holding nothing).
    """
    held: list[dict[int, set[bytes]]] = []

    async def one(i: int) -> None:
        found: dict[int, set[bytes]] = {}
        try:
            for key in await nodes.call(i, lambda st: st.list_keys(f"{PREFIX}/e{epoch}")):
                if parse_log_key(key) is None:
                    continue
                raw = await nodes.call(i, functools.partial(_get, key))
                for seg_raw in await trio.to_thread.run_sync(scan_log, raw, f"node {i} {key}"):
                    seg = Segment.from_bytes(seg_raw)
                    if seg.epoch == epoch:
                        found.setdefault(seg.first_seq, set()).add(seg_raw)
        except (NodeError, JournalError) as exc:
            log.debug("journal of epoch %d on node %d unreadable: %s", epoch, i, exc)
            return
        held.append(found)

    async with trio.open_nursery() as nursery:
        for i in sorted(nodes.readable()):
            nursery.start_soon(one, i)
    return held


def agreed_segment(held: list[dict[int, set[bytes]]], first_seq: int, agree: int) -> bytes | None:
    """The segment starting at `first_seq` that at least `agree` nodes hold identically.

    A committed segment is on n-f nodes, so with at most f of them bad, f+1 agree.
    """
    copies: dict[bytes, int] = {}
    for found in held:
        for raw in found.get(first_seq, ()):
            copies[raw] = copies.get(raw, 0) + 1
    best = max(copies.items(), key=lambda kv: kv[1], default=None)
    return best[0] if best is not None and best[1] >= agree else None


async def drop_history(nodes: NodeSet, epoch: int, cut: int) -> int:
    """Delete the log files a checkpoint at (`epoch`, `cut`) made history; returns how many.

    That is every log file of an earlier session, and those of this one started at or
    before the cut (see Journal.rotate). Only call it once that checkpoint's superblock
    is committed. Nodes that fail are left for the next time; never raises NodeError.
    """
    removed = 0

    async def one(i: int) -> None:
        nonlocal removed
        try:
            keys = await nodes.call(i, lambda st: st.list_keys(PREFIX))
            for key in keys:
                where = parse_log_key(key)
                if where is not None and (
                    where[0] < epoch or (where[0] == epoch and where[1] <= cut)
                ):
                    await nodes.call(i, functools.partial(_delete, key))
                    removed += 1
        except NodeError as exc:
            log.debug("old journal on node %d not removed now: %s", i, exc)

    async with trio.open_nursery() as nursery:
        for i in sorted(nodes.writable(small=True)):
            nursery.start_soon(one, i)
    return removed


async def _get(key: str, store: NodeStore) -> bytes:
    return await store.get(key)


async def _delete(key: str, store: NodeStore) -> None:
    await store.delete(key)
