"""The node set: n node stores, each with a health state kept up to date from every call.

States: up (answering), suspect (one recent failure or timeout: still used, but last),
down (unreachable, hung, dropped mount, foreign directory: skipped until a probe succeeds),
full (answers reads, refuses writes). A state change is logged once, at WARNING when a
node gets worse and at INFO when it recovers; requests are logged at DEBUG only.

This is where node failure policy lives: callers run node operations through `call`, which
records the outcome; the blob store asks `readable()`/`writable()` which nodes to use.

Runs in the trio task that owns the mount; not thread-safe (trio tasks only).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from backends import (
    KeyExists,
    KeyNotFound,
    LocalStore,
    NodeDown,
    NodeError,
    NodeFull,
    NodeStore,
    NodeTimeout,
    RemoteMountStore,
)
from backends.base import Payload
from backends.batch import run_batch

log = logging.getLogger(__name__)
T = TypeVar("T")


class NodeState(enum.Enum):
    UP = "up"
    SUSPECT = "suspect"
    DOWN = "down"
    FULL = "full"


# Writes of at most this many bytes in all go to the healthy nodes from one worker thread
# (backends.batch): closing a small file then costs two thread hand-offs, not sixteen,
# and a 4 MiB blob's seven sliver files are written about 20% faster than by seven
# threads contending for the GIL at every syscall (measured on tmpfs and on a disk).
BATCH_BYTES = 64 << 20
# A batch not done within BATCH_DEADLINE + its bytes / BATCH_RATE leaves its remaining
# writes to the per-node path, and the node it is stuck on turns suspect, which keeps it
# out of batches until it answers again: a slow or hung node only ever stalls one batch.
BATCH_DEADLINE = 0.25
BATCH_RATE = 50e6

_NO_ANSWER = object()  # a batch position its thread never reached

# Corrupt slivers found on one node are warned of at most this many times a window; the
# rest of the window's go to debug (`status` counts them all). A failing disk read by a
# scrub pass would otherwise write a line per sliver file.
CORRUPT_WARNINGS = 5
CORRUPT_WINDOW_S = 60.0

# A write short of its quorum probes the nodes taken as down or full again before it
# fails (NodeSet.revive): one back since its last probe, up to 5 s ago, is used at once;
# otherwise f nodes that came back unseen and f others that just left would fail every
# write. The probes get this long, so a hung node delays a failing write at most that.
REVIVE_WAIT_S = 1.0

# Each node keeps this key filled with allocated space, given back when a write of the
# metadata (a journal append, the superblock) finds the node full: a volume filled to
# the last byte (by small files, which wait in the journal until packed) must still
# commit the deletes that free it, and the checkpoint after them that lets go of the
# journal holding the deleted files. Taken again once the node has room. Its size:
# 1/RESERVE_FRACTION of the node's filesystem, within bounds, plus what a checkpoint
# takes (NodeSet.reserve_extra), at most an eighth of the filesystem.
RESERVE_KEY = "space-reserve"
RESERVE_FRACTION = 32
RESERVE_MIN = 128 << 10
RESERVE_MAX = 8 << 20
# What a small write that finds its node full has it give back (a journal segment is
# KiBs): the rest stays for the writes after it, the superblock and the mount lock.
RESERVE_SLICE = 64 << 10


def reserve_bytes(total: int, extra: int = 0) -> int:
    """The space a node whose filesystem holds `total` bytes keeps in reserve, with
    `extra` for a checkpoint (see above)."""
    own = min(RESERVE_MAX, max(RESERVE_MIN, total // RESERVE_FRACTION))
    return min(own + extra, total // 8)


# Lower ranks are preferred when choosing which nodes to read from.
_RANK = {NodeState.UP: 0, NodeState.FULL: 0, NodeState.SUSPECT: 1, NodeState.DOWN: 2}
_UNWRITABLE = (NodeState.DOWN, NodeState.FULL)


@dataclass
class Node:
    """One node: its store and what we know of its health."""

    index: int
    store: NodeStore
    state: NodeState = NodeState.UP
    reason: str = ""
    latency: float = 0.0
    failures: int = 0
    calls: int = 0
    errors: int = 0
    corrupt: int = 0
    free: int | None = None
    total: int | None = None
    filesystem: int | None = None  # nodes with the same id share free space
    since: float = field(default=0.0)
    stuck_batches: int = 0  # batch threads left behind on this node, not ended yet
    reserved: int | None = None  # bytes its RESERVE_KEY holds (None: not known yet)
    spending: bool = False  # has given up reserve since it last took it (logged once)
    corrupt_logged: tuple[float, int] = (0.0, 0)  # (window start, findings in it)


def for_want_of_space(n: int, quorum: int, full: int, other: int) -> bool:
    """Whether a write short of its quorum failed for want of space (ENOSPC for the user,
    not EIO): `full` nodes had no room, and so few failed or were skipped for any other
    reason (`other`) that the rest would have made the quorum had the full ones had room."""
    return full > 0 and n - other >= quorum


class NodeSet:
    """The volume's n nodes and their states.

    `identity_check`, if given, is awaited by every probe: a directory that came back, or
    was swapped under a running mount, may be another volume's.
    """

    def __init__(
        self,
        stores: list[NodeStore],
        identity_check: Callable[[int, NodeStore], Awaitable[None]] | None = None,
    ) -> None:
        self.nodes = [Node(i, s) for i, s in enumerate(stores)]
        self._identity_check = identity_check
        self._probe_soon: set[int] = set()  # turned suspect: probe_forever looks early
        self._reviving: trio.Event | None = None  # a revive round under way: set at its end
        self._revive_at: float | None = None  # when the latest round started
        # Bytes a checkpoint of the metadata takes on a node: held in reserve as well.
        self.reserve_extra = 0

    def __len__(self) -> int:
        return len(self.nodes)

    def state(self, index: int) -> NodeState:
        return self.nodes[index].state

    def rank(self, index: int) -> int:
        """Preference when reading: 0 healthy, 1 suspect, 2 down."""
        return _RANK[self.nodes[index].state]

    def readable(self) -> set[int]:
        return {n.index for n in self.nodes if n.state is not NodeState.DOWN}

    def writable(self, *, small: bool = False) -> set[int]:
        """The nodes to write to; with `small`, for a write of KiBs (the metadata's),
        also the full ones.

        A node is taken as full when it refused a blob's sliver file, MiBs, and stays so
        until it has room for many: the journal segment of a delete, which is what frees
        space, or the lock's heartbeat, may well fit meanwhile.
        """
        if small:
            return self.readable()
        return {n.index for n in self.nodes if n.state in (NodeState.UP, NodeState.SUSPECT)}

    def full_count(self) -> int:
        return sum(1 for n in self.nodes if n.state is NodeState.FULL)

    def out_of_room(self, quorum: int) -> bool:
        """Whether a write of data can reach `quorum` only through full nodes: then it
        would go into the metadata journal (a patch), spending the full nodes' reserves,
        which are kept for the deletes that free them. Down nodes count too: with f down,
        one full node is enough."""
        return self.full_count() > 0 and len(self.writable()) < quorum

    def set_state(self, index: int, state: NodeState, reason: str = "") -> None:
        """Change a node's state, logging only actual changes."""
        node = self.nodes[index]
        if node.state is state:
            node.reason = reason or node.reason
            return
        old, node.state, node.reason = node.state, state, reason
        if state is NodeState.SUSPECT:
            self._probe_soon.add(index)
        node.since = trio.current_time() if _in_trio() else 0.0
        name = f"node {index} ({node.store.path})"
        if state is NodeState.UP:
            log.info("%s is back up (was %s)", name, old.value)
        else:
            log.warning("%s is %s: %s", name, state.value, reason or "no reason given")

    def note_corrupt(self, index: int, what: str) -> None:
        """Record that a node returned bytes that failed verification."""
        node = self.nodes[index]
        node.corrupt += 1
        now = time.monotonic()
        start, count = node.corrupt_logged
        if now - start >= CORRUPT_WINDOW_S:
            start, count = now, 0
        node.corrupt_logged = (start, count + 1)
        if count < CORRUPT_WARNINGS:
            log.warning("node %d (%s): corrupt data: %s", index, node.store.path, what)
        else:
            log.debug("node %d (%s): corrupt data: %s", index, node.store.path, what)
        if count + 1 == CORRUPT_WARNINGS:
            log.warning(
                "node %d (%s): more corrupt data in the next %.0f s is logged at debug "
                "level only (`walrusfs status` counts it all)",
                index,
                node.store.path,
                CORRUPT_WINDOW_S,
            )

    def _ok(self, node: Node, elapsed: float, *, probed: bool = False) -> None:
        """A call succeeded. A suspect node is up again; a down one only by a probe
        (`probed`): a call answering proves a directory is there, not which one, and a
        directory back after a loss, or swapped under the mount, may be another node's
        or another volume's (the probe checks the identity first)."""
        node.failures = 0
        node.latency = elapsed if node.latency == 0 else 0.8 * node.latency + 0.2 * elapsed
        if node.state is NodeState.SUSPECT or (probed and node.state is NodeState.DOWN):
            self.set_state(node.index, NodeState.UP)

    def _failed(self, node: Node, exc: NodeError) -> None:
        node.errors += 1
        node.failures += 1
        if isinstance(exc, NodeFull):
            self.set_state(node.index, NodeState.FULL, str(exc))
        elif isinstance(exc, NodeDown) or node.failures >= 2:
            self.set_state(node.index, NodeState.DOWN, str(exc))
        elif isinstance(exc, NodeTimeout | NodeError) and node.state is not NodeState.DOWN:
            self.set_state(node.index, NodeState.SUSPECT, str(exc))

    async def call(self, index: int, op: Callable[[NodeStore], Awaitable[T]]) -> T:
        """Run one node operation and record its outcome; re-raises NodeError.

        A missing key, or one a put may not replace, is not a node fault: the node answered.
        """
        node = self.nodes[index]
        node.calls += 1
        t0 = trio.current_time()
        try:
            result = await op(node.store)
        except (KeyNotFound, KeyExists):
            self._ok(node, trio.current_time() - t0)
            raise
        except NodeError as exc:
            self._failed(node, exc)
            raise
        self._ok(node, trio.current_time() - t0)
        return result

    async def call_small(self, index: int, op: Callable[[NodeStore], Awaitable[T]], size: int) -> T:
        """`call`, for a write of `size` bytes of the metadata's (see `writable(small=True)`):
        a node that refuses it for want of space gives up a slice of its reserve and is
        asked once more."""
        try:
            return await self.call(index, op)
        except NodeFull:
            if not await self.release_reserve(index, max(RESERVE_SLICE, 2 * size)):
                raise
        return await self.call(index, op)

    async def release_reserve(self, index: int, size: int | None = None) -> bool:
        """Give back `size` bytes of a node's reserve (RESERVE_KEY), or all of it; False
        if it has none to give."""
        node = self.nodes[index]
        if node.reserved == 0 or node.state is NodeState.DOWN:
            return False
        try:
            held = node.reserved
            if held is None:
                held = await self.call(index, lambda st: st.size(RESERVE_KEY))
            keep = 0 if size is None else max(0, held - size)
            if keep:
                await self.call(index, lambda st: st.reserve(RESERVE_KEY, keep))
            else:
                await self.call(index, lambda st: st.delete(RESERVE_KEY))
        except KeyNotFound:
            node.reserved = 0
            return False
        except NodeError as exc:
            log.debug("node %d: reserve not released: %s", index, exc)
            return False
        node.reserved = keep
        log.log(
            logging.DEBUG if node.spending else logging.WARNING,
            "node %d (%s) is full: %d KiB of its space reserve given up, %d KiB left, so "
            "that the metadata (the deletes that free space) can still be stored; new data "
            "is refused while the nodes with room are too few to store it",
            index,
            node.store.path,
            (held - keep) >> 10,
            keep >> 10,
        )
        node.spending = True
        return True

    async def release_reserves(self) -> int:
        """Release the whole reserve of every node taken as full (see release_reserve);
        returns how many gave one."""
        given = 0

        async def one(i: int) -> None:
            nonlocal given
            if await self.release_reserve(i):
                given += 1

        async with trio.open_nursery() as nursery:
            for node in self.nodes:
                if node.state is NodeState.FULL:
                    nursery.start_soon(one, node.index)
        return given

    async def _keep_reserve(self, node: Node) -> None:
        """Make sure a node that is not full holds its reserve (probes call it)."""
        if node.total is None or node.state is NodeState.FULL:
            return
        want = reserve_bytes(node.total, self.reserve_extra)
        if node.reserved is not None and node.reserved >= want:
            return
        try:
            await node.store.reserve(RESERVE_KEY, want)
        except NodeError as exc:
            log.debug("node %d: no space reserve taken now: %s", node.index, exc)
            return
        node.reserved, node.spending = want, False

    async def put_batch(
        self, puts: list[tuple[int, str, Payload]], *, replace: bool = True
    ) -> dict[int, NodeError | None]:
        """Try puts (node, key, data), not durable, on the nodes that are up, from one
        worker thread (durability comes from walrusfs.flush afterwards); see
        NodeStore.put for `replace`.

        Returns the outcome (None: stored) of each put it finished, recorded as `call`
        records them; the caller puts the rest through `call`. Only healthy local stores
        take part, and only up to BATCH_BYTES in all. Raises InvalidKey.
        """
        size = sum(sum(map(len, p)) if isinstance(p, tuple) else len(p) for _, _, p in puts)
        return await self._batch([(i, key, _putter(key, p, replace)) for i, key, p in puts], size)

    async def append_batch(
        self, appends: list[tuple[int, str, bytes]]
    ) -> dict[int, NodeError | None]:
        """Like put_batch, for appends (node, key, data) that need not be durable."""
        return await self._batch(
            [(i, key, _appender(key, d)) for i, key, d in appends],
            sum(len(d) for _, _, d in appends),
        )

    async def read_batch(
        self,
        reads: list[tuple[int, str, int, tuple[memoryview, ...], Callable[[int], None]]],
        deadline: float | None = None,
    ) -> dict[int, NodeError | None] | None:
        """Reads (node, key, offset, buffers, check) from one worker thread, as put_batch
        writes: returns the outcome (None: read, and `check` passed it the byte count) of
        each read it finished; a missing key is the node's answer, not its fault.

        `deadline`, if given, shortens the batch's own (see BATCH_DEADLINE).
        None when it did not start (a node not healthy, not local or on a remote mount, or
        too many bytes):
        the buffers are untouched then. Otherwise the thread may be left behind at the
        deadline, and still write into the buffers of the reads it did not finish.
        Raises InvalidKey, ValueError.
        """
        size = sum(sum(map(len, into)) for _, _, _, into, _ in reads)
        if size > BATCH_BYTES or len(reads) < 2 or not all(self._batchable(r[0]) for r in reads):
            return None
        if any(isinstance(self.nodes[r[0]].store, RemoteMountStore) for r in reads):
            # Over a network each read waits out its round trips: in turn, they would add
            # up where the careful path overlaps them.
            return None
        return await self._batch(
            [(i, key, _reader(key, off, into, check)) for i, key, off, into, check in reads],
            size,
            "read",
            deadline,
        )

    def _batchable(self, index: int) -> bool:
        # A node that still holds a batch thread left behind gets no more: a hung mount
        # would otherwise take one more thread, and stall one more batch, each time a
        # probe found it up again.
        node = self.nodes[index]
        return (
            node.state is NodeState.UP
            and isinstance(node.store, LocalStore)
            and not node.stuck_batches
        )

    async def _batch(
        self,
        items: list[tuple[int, str, Callable[[LocalStore], Job]]],
        size: int,
        what: str = "write",
        deadline: float | None = None,
    ) -> dict[int, NodeError | None]:
        batch: list[tuple[int, LocalStore, str, Job]] = []
        for i, key, make in items:
            store = self.nodes[i].store
            if self._batchable(i) and isinstance(store, LocalStore):
                batch.append((i, store, key, make(store)))
        if size > BATCH_BYTES or len(batch) < 2:
            return {}
        t0 = trio.current_time()
        longest = BATCH_DEADLINE + size / BATCH_RATE
        deadline = longest if deadline is None else min(deadline, longest)
        token = trio.lowlevel.current_trio_token()
        finished = False
        stuck: tuple[int, int] | None = None  # (position, node) the thread was left on
        why = f"a batched {what} took over {deadline:.2f}s"

        def ended(final: dict[int, NodeError | None]) -> None:  # in the trio thread
            nonlocal finished
            finished = True
            if stuck is None:
                return
            pos, index = stuck
            node = self.nodes[index]
            node.stuck_batches -= 1
            late = final.get(pos, _NO_ANSWER)
            if (
                node.state is NodeState.SUSPECT
                and node.reason == why
                and (late is None or isinstance(late, KeyNotFound | KeyExists))
            ):
                # Late, not hung: a cold disk or a busy moment. Left suspect, it would be
                # read last until a probe, and reads would decode around a healthy node.
                self._ok(node, trio.current_time() - t0)

        def on_exit(final: dict[int, NodeError | None]) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(ended, final)

        done = await run_batch(
            [(store, key, job) for _, store, key, job in batch], deadline=deadline, on_exit=on_exit
        )
        if len(done) < len(batch) and not finished:
            # The thread goes node by node: it is stuck on the first one not done. (One
            # that ended meanwhile was only late; the caller redoes what it left.)
            index = batch[len(done)][0]
            stuck = (len(done), index)
            self.nodes[index].stuck_batches += 1
            self.set_state(index, NodeState.SUSPECT, why)
        share = (trio.current_time() - t0) / max(1, len(done))
        outcomes: dict[int, NodeError | None] = {}
        for pos, outcome in done.items():
            node = self.nodes[batch[pos][0]]
            node.calls += 1
            if outcome is None or isinstance(outcome, KeyNotFound | KeyExists):
                self._ok(node, share)
            else:
                self._failed(node, outcome)
            outcomes[node.index] = outcome
        return outcomes

    async def check_identity(self, index: int) -> None:
        """Run the set's identity check on one node (nothing if it has none). Raises what
        the check raises: NodeError, or the check's own refusal."""
        if self._identity_check is not None:
            await self._identity_check(index, self.nodes[index].store)

    async def probe(self, index: int) -> None:
        """Probe one node: health, identity (if it was down) and free space."""
        node = self.nodes[index]
        try:
            # Always: a directory swapped under a healthy node must stop receiving writes.
            await self.check_identity(index)
            latency = await node.store.probe()
            node.free, node.total = await node.store.free_space()
            node.filesystem = await node.store.filesystem()
        except NodeFull as exc:
            self.set_state(index, NodeState.FULL, str(exc))
            # The probe's own write failed, so the free space was not read: what `status`
            # shows must still say how full the node is.
            with contextlib.suppress(NodeError):
                node.free, node.total = await node.store.free_space()
            return
        except NodeError as exc:
            node.failures += 1
            self.set_state(index, NodeState.DOWN, str(exc))
            return
        except Exception as exc:  # identity refused: the directory is not this node
            self.set_state(index, NodeState.DOWN, str(exc))
            return
        total = node.total or 0
        # Room for many blobs again: 64 MiB or 1% of the filesystem, or a quarter of a
        # small one, which would otherwise never have that much to give back.
        still_full = node.free is not None and node.free < min(
            max(64 << 20, total // 100), total // 4
        )
        if node.state is NodeState.FULL:
            if still_full:
                return
            # Only a probe can tell that space came back: a read succeeding on a full node
            # must not make it writable again.
            self.set_state(index, NodeState.UP)
        self._ok(node, latency, probed=True)
        await self._keep_reserve(node)

    async def revive(self, since: float) -> None:
        """See that the nodes taken as down or full have been probed by a round started
        at or after `since` (trio time), starting one if need be.

        For a write that began at `since` and found too few nodes: it then asks
        `writable()` again. Writes failing at the same time share one round, and each
        gets at most one of its own. Probes not done within REVIVE_WAIT_S are cancelled:
        a hung node stays down, so more than f nodes down still fail a write quickly.
        """
        while True:
            if self._revive_at is not None and self._revive_at >= since:
                if self._reviving is not None:
                    await self._reviving.wait()
                return
            if self._reviving is None:
                break
            await self._reviving.wait()  # older than the write: then one of our own
        self._reviving = done = trio.Event()
        self._revive_at = trio.current_time()
        try:
            with trio.move_on_after(REVIVE_WAIT_S):
                async with trio.open_nursery() as nursery:
                    for node in self.nodes:
                        if node.state in _UNWRITABLE:
                            nursery.start_soon(self.probe, node.index)
        finally:
            self._reviving = None
            done.set()

    async def writable_again(
        self, since: float, done: Collection[int], *, small: bool = False
    ) -> list[int]:
        """For a write that began at `since` and is short of nodes: `revive`, then the
        writable nodes (see `writable`) not in `done`, to try now."""
        await self.revive(since)
        return sorted(self.writable(small=small) - set(done))

    async def probe_all(self) -> None:
        """Probe every node concurrently."""
        async with trio.open_nursery() as nursery:
            for i in range(len(self.nodes)):
                nursery.start_soon(self.probe, i)

    async def probe_forever(self, interval: float = 5.0, soon: float = 0.5) -> None:
        """Background task: keep states and free space current. Runs until cancelled.

        Each node is probed on its own clock, so a hung one (whose probe waits out the
        node timeout) delays no news of the others. A node that turned suspect is probed
        within `soon` seconds, not `interval`: one slow read (a cold disk) makes a node
        suspect, and reads then go around it, decoding, until something shows it healthy
        again; a hung one is found down.
        """
        async with trio.open_nursery() as nursery:
            for index in range(len(self.nodes)):
                nursery.start_soon(self._probe_node_forever, index, interval, soon)

    async def _probe_node_forever(self, index: int, interval: float, soon: float) -> None:
        while True:
            self._probe_soon.discard(index)  # before: turning suspect meanwhile is seen
            await self.probe(index)
            waited = 0.0
            while waited < interval and index not in self._probe_soon:
                await trio.sleep(soon)
                waited += soon

    def snapshot(self) -> list[dict[str, object]]:
        """Per-node state for `status`."""
        return [
            {
                "index": n.index,
                "path": n.store.path,
                "state": n.state.value,
                "reason": n.reason,
                "latency_ms": round(n.latency * 1000, 2),
                "free": n.free,
                "total": n.total,
                "reserve": n.reserved,
                "errors": n.errors,
                "corrupt": n.corrupt,
            }
            for n in self.nodes
        ]


Job = Callable[[int], object]


def _putter(key: str, data: Payload, replace: bool) -> Callable[[LocalStore], Job]:
    return lambda store: store.put_job(key, data, durable=False, replace=replace)


def _reader(
    key: str, offset: int, into: tuple[memoryview, ...], check: Callable[[int], None]
) -> Callable[[LocalStore], Job]:
    return lambda store: store.get_into_job(key, offset, into, check=check)


def _appender(key: str, data: bytes) -> Callable[[LocalStore], Job]:
    return lambda store: store.append_job(key, data, durable=False)


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True
