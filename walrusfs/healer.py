"""Healer: the repair service that keeps a volume whole in the background.

A pass (RepairService.pass_once) lists the nodes (inventory: what each should hold, from
the catalog, vs what it holds), adds hints (puts that missed nodes, corrupt slivers from
scrub), repairs blob by blob in order of fewest healthy pairs through the engine
(walrusfs.repair), and always ends with a RepairReport. Blobs that cannot be repaired
now (too few pairs readable, target node down) are listed and retried by a later pass,
never looped on. Cancelling a pass loses nothing: every sliver file is written
atomically, and the next pass finds what is still missing.

`run_forever` runs in the mount's nursery: a full pass every `interval`, a quick one when
hints arrive or a node comes back; after a failed pass only the next full one retries,
so a broken metadata database is not hammered. `replace_node` puts an empty directory in
a dead node's place and has the passes rebuild it while the volume is in use. `status`
reports progress. The default rates keep the foreground first (see DEFAULT_RATE).

Must not import pyfuse3, nor the modules that drive it (scrub, fsck, service, mount);
it uses the catalog and the engine below it, never the reverse.

Runs in trio tasks of one run (not thread-safe); one pass at a time (a trio.Lock).
Blocking work (a replacement directory's checks, comparing listings) runs in worker
threads.
"""

from __future__ import annotations

import heapq
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field

import trio

from backends import NodeError, is_mountpoint
from walrusfs.catalog import BlobRef, BlobSource, list_slivers, missing_on
from walrusfs.checkpoint import SUPERBLOCK_KEY, Superblock
from walrusfs.identity import NodeIdentity, read_identity, write_identity
from walrusfs.lock import LOCK_KEY
from walrusfs.nodeset import NodeState
from walrusfs.repair import Counters, RepairEngine, was_cancelled
from walrusfs.segment import PREFIX as JOURNAL_PREFIX
from walrusfs.sliverfile import PREFIX as SLIVER_PREFIX
from walrusfs.sliverfile import parse_key
from walrusfs.volume import Volume, inside_a_node, make_store, nested

log = logging.getLogger(__name__)

MiB = 1 << 20


# Node bytes read + written per second by background repair: when the filesystem is
# idle, and while it reads or writes blobs.
DEFAULT_RATE = 512 * MiB
DEFAULT_BUSY_RATE = 128 * MiB


@dataclass
class RepairReport:
    """The end of every pass. Blob ids are hex; unrepairable ones are retried next pass."""

    started: float  # wall clock (time.time())
    duration: float = 0.0
    blobs_checked: int = 0
    blobs_repaired: int = 0
    pairs_written: int = 0
    bytes_read: int = 0
    bytes_rebuilt: int = 0
    unrepairable: dict[str, str] = field(default_factory=dict)  # blob -> reason
    lost: list[str] = field(default_factory=list)  # not decodable now (subset of the above)
    inconsistent: dict[str, str] = field(default_factory=dict)  # never written
    cancelled: bool = False

    @property
    def rate(self) -> float:
        """Sliver bytes rebuilt per second."""
        return self.bytes_rebuilt / self.duration if self.duration > 0 else 0.0

    @property
    def read_per_rebuilt(self) -> float:
        return self.bytes_read / self.bytes_rebuilt if self.bytes_rebuilt else 0.0

    def summary(self) -> str:
        text = (
            f"repair pass: {self.blobs_checked} blobs checked, {self.blobs_repaired} repaired "
            f"({self.pairs_written} sliver pairs, {self.bytes_rebuilt / MiB:.1f} MiB rebuilt, "
            f"{self.bytes_read / MiB:.1f} MiB read, {self.rate / MiB:.1f} MiB/s) "
            f"in {self.duration:.1f}s"
        )
        if self.unrepairable:
            text += f"; {len(self.unrepairable)} unrepairable now ({len(self.lost)} not decodable)"
        if self.inconsistent:
            text += f"; {len(self.inconsistent)} inconsistently encoded"
        return text + ("; cancelled" if self.cancelled else "")

    def to_dict(self) -> dict[str, object]:
        return {
            "started": self.started,
            "duration": round(self.duration, 3),
            "blobs_checked": self.blobs_checked,
            "blobs_repaired": self.blobs_repaired,
            "pairs_written": self.pairs_written,
            "bytes_read": self.bytes_read,
            "bytes_rebuilt": self.bytes_rebuilt,
            "rate": round(self.rate),
            "unrepairable": dict(self.unrepairable),
            "lost": list(self.lost),
            "inconsistent": dict(self.inconsistent),
            "cancelled": self.cancelled,
        }


class ReplaceError(Exception):
    """A node cannot be replaced by that directory; the message says why."""


@dataclass(order=True)
class _Work:
    health: int  # pairs believed good; lowest first
    blob_id: bytes
    ref: BlobRef = field(compare=False)
    bad: dict[int, str] = field(compare=False)

    @property
    def estimate(self) -> int:
        p = self.ref.meta.params
        return len(self.bad) * (p.R + p.C) * self.ref.meta.symbol_size


_UNWRITABLE = (NodeState.DOWN, NodeState.FULL)


def _superblock_order(raw: bytes) -> tuple[int, int, int]:
    sb = Superblock.from_bytes(raw)
    return (sb.epoch, sb.seq, sb.created_ns)


def _mount_of(path: str) -> str:
    p = os.path.realpath(path)
    while p != "/" and not is_mountpoint(p):
        p = os.path.dirname(p)
    return "" if p == "/" else p


def _prepare_new_node(new_dir: str, others: list[str]) -> tuple[str, str]:
    """Check (or create) an empty directory for a replacement node; returns (path, mount).

    Blocking. Raises ReplaceError.
    """
    path = os.path.abspath(new_dir)
    real, other_real = os.path.realpath(path), {os.path.realpath(o) for o in others}
    if real in other_real:
        raise ReplaceError(f"{path}: is already another node of this volume")
    pair = nested([real, *other_real]) or inside_a_node([real])
    if pair is not None:
        raise ReplaceError(
            f"{pair[0]} is inside {pair[1]}: node directories must not be inside one another"
        )
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ReplaceError(f"{path}: exists and is not a directory")
    try:
        if os.path.isdir(path):
            entries = sorted(e for e in os.listdir(path) if e != "lost+found")
            if entries:
                raise ReplaceError(_not_empty(path, entries))
        else:
            os.makedirs(path, mode=0o700)
        os.chmod(path, 0o700)
    except OSError as exc:
        raise ReplaceError(f"{path}: cannot prepare the directory: {exc.strerror}") from exc
    return path, _mount_of(path)


# What a mount writes into a node's directory between probes. Nothing is removed for the
# user: such files could also be what is left of another volume's node.
_MOUNT_WRITES = {LOCK_KEY, JOURNAL_PREFIX, SLIVER_PREFIX}


def _not_empty(path: str, entries: list[str]) -> str:
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    why = f"{path}: not empty ({shown}); a replacement node must start empty"
    if set(entries) <= _MOUNT_WRITES:
        # Where a store cannot pin its directory (sshfs, SMB: LocalStore.pin), a disk
        # swapped under a mount takes its writes until a probe finds no identity.
        why += (
            ". These are names a mount writes into its nodes: if this mount wrote them there "
            "before it noticed the new disk, remove them and run replace-node again"
        )
    return why


class RepairService:
    """Background repair for a mounted volume (or a tool): passes, hints, progress.

    `missed` is the mount's FsBlobs.missed (blob id -> nodes a put missed): read as a
    hint and emptied of the blobs repaired. `on_replaced` runs after a node replacement
    (the mount passes MetaStore.checkpoint, so metadata is again on every node).
    """

    def __init__(
        self,
        vol: Volume,
        blobs: BlobSource,
        *,
        missed: MutableMapping[bytes, tuple[int, ...]] | None = None,
        rate: float | None = DEFAULT_RATE,
        busy_rate: float | None = DEFAULT_BUSY_RATE,
        interval: float = 3600.0,
        parallel: int = 4,
        per_node: int = 2,
        symbol_check: bool = False,
        on_replaced: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.vol = vol
        self.nodes = vol.nodes
        self.blobs = blobs
        self.missed: MutableMapping[bytes, tuple[int, ...]] = missed if missed is not None else {}
        self.interval = interval
        self.parallel = parallel
        self.on_replaced = on_replaced
        self.engine = RepairEngine(
            vol, rate=rate, busy_rate=busy_rate, per_node=per_node, symbol_check=symbol_check
        )
        self.last_report: RepairReport | None = None
        self.passes = 0
        self.queue = 0
        self.pending_bytes = 0
        self._hints: dict[bytes, dict[int, str]] = {}
        self._fresh_hints = False
        self._full_now = False
        self._missed_seen: set[bytes] = set()
        self._unreferenced_missed: set[bytes] = set()
        self._rebuilding: set[int] = set()
        self._pass_lock = trio.Lock()
        self._pass_t0 = 0.0
        self._pass_rebuilt0 = 0
        self._wake = trio.Event()
        self._pass_done = trio.Event()

    # inputs

    def note_bad(self, blob_id: bytes, pair: int, reason: str) -> None:
        """A sliver pair is missing or corrupt (from scrub or a read): repair it soon."""
        self._hints.setdefault(blob_id, {})[pair] = reason
        self._fresh_hints = True
        self._wake.set()

    def trigger(self) -> None:
        """Make run_forever start a full pass now (every node listed)."""
        self._full_now = True
        self._wake.set()

    @property
    def rate_limit(self) -> float | None:
        return self.engine.limit.rate

    @rate_limit.setter
    def rate_limit(self, rate: float | None) -> None:
        self.engine.limit.rate = rate

    async def wait_for_pass(self) -> RepairReport:
        """Wait until the next pass (or the running one) ends; its report."""
        await self._pass_done.wait()
        assert self.last_report is not None
        return self.last_report

    # a pass

    async def pass_once(self, inventory: Iterable[int] | None = None) -> RepairReport:
        """One repair pass; always returns its report (also kept as `last_report`).

        `inventory`: the nodes whose listing is compared with what they should hold
        (None: every readable node; []: hints only). Raises only what the blob source
        raises (e.g. an unreadable metadata database).
        """
        async with self._pass_lock:
            report = RepairReport(started=time.time())
            c0 = Counters(**vars(self.engine.counters))
            self._pass_t0 = trio.current_time()
            self._pass_rebuilt0 = c0.bytes_rebuilt
            listed: list[int] = []
            try:
                work, listed = await self._plan(inventory, report)
                await self._run(work, report)
                await self.engine.sync_touched()
                # A replaced node is rebuilt once a whole pass listed it (what could not be
                # repaired is in the report, and retried like any other blob). Before the
                # pass is announced done: a waiter must not see a stale rebuilding set and
                # wait for a pass that nothing will start.
                self._rebuilding -= set(listed)
            except BaseException as exc:
                report.cancelled = was_cancelled(exc)
                raise
            finally:
                c = self.engine.counters
                report.duration = trio.current_time() - self._pass_t0
                report.bytes_read = c.bytes_read - c0.bytes_read
                report.bytes_rebuilt = c.bytes_rebuilt - c0.bytes_rebuilt
                report.pairs_written = c.pairs_written - c0.pairs_written
                self.queue, self.pending_bytes = 0, 0
                self.last_report = report
                self.passes += 1
                self._pass_done.set()
                self._pass_done = trio.Event()
                level = (
                    logging.WARNING if report.unrepairable or report.inconsistent else logging.INFO
                )
                if (
                    report.pairs_written
                    or report.unrepairable
                    or report.inconsistent
                    or report.cancelled
                ):
                    log.log(level, "%s", report.summary())
            return report

    async def _plan(
        self, inventory: Iterable[int] | None, report: RepairReport
    ) -> tuple[list[_Work], list[int]]:
        n = self.vol.params.n
        readable = self.nodes.readable()
        listing = sorted(readable) if inventory is None else sorted(set(inventory) & readable)
        missed = dict(self.missed)
        self._missed_seen = set(missed)
        self._fresh_hints = False
        if listing:
            refs = await self.blobs.load()
        else:
            refs = await self.blobs.lookup(set(self._hints) | set(missed))
        report.blobs_checked = len(refs)
        bad: dict[bytes, dict[int, str]] = {}
        held: dict[int, set[tuple[bytes, int] | None]] = {}

        async def list_node(i: int) -> None:
            try:
                keys = await list_slivers(self.nodes, i)
            except NodeError as exc:
                log.debug("repair: cannot list node %d: %s", i, exc)
                return
            held[i] = {parse_key(k) for k in keys}

        async with trio.open_nursery() as nursery:
            for i in listing:
                nursery.start_soon(list_node, i)
        for i, present in sorted(held.items()):
            for blob_id, p in await trio.to_thread.run_sync(missing_on, refs, i, present):
                bad.setdefault(blob_id, {})[p] = f"missing on node {i}"
        for blob_id, pairs in list(self._hints.items()):
            if blob_id not in refs:
                if listing:  # a full view: the blob is gone, so is the hint
                    del self._hints[blob_id]
                continue
            bad.setdefault(blob_id, {}).update(pairs)
        if inventory is None:
            # A put's blob is named by the metadata soon after; one that two full passes
            # found unreferenced was deleted or never committed: nothing to repair.
            unreferenced = {b for b in missed if b not in refs}
            for b in unreferenced & self._unreferenced_missed:
                self.missed.pop(b, None)
            self._unreferenced_missed = unreferenced - self._unreferenced_missed
        for blob_id, nodes in missed.items():
            found = refs.get(blob_id)
            if found is None:
                continue
            for node in nodes:
                bad.setdefault(blob_id, {}).setdefault(
                    found.meta.pair_of_node(node), "put missed it"
                )
        work = []
        for blob_id, pairs in bad.items():
            meta = refs[blob_id].meta
            unreadable = {p for p in range(n) if meta.node_of_pair(p) not in readable}
            work.append(_Work(n - len(set(pairs) | unreadable), blob_id, refs[blob_id], pairs))
        heapq.heapify(work)
        return [heapq.heappop(work) for _ in range(len(work))], sorted(held)

    async def _run(self, work: list[_Work], report: RepairReport) -> None:
        self.queue = len(work)
        self.pending_bytes = sum(w.estimate for w in work)
        slots = trio.Semaphore(self.parallel)

        async def one(w: _Work) -> None:
            try:
                await self._repair_one(w, report)
            finally:
                slots.release()
                self.queue -= 1
                self.pending_bytes -= w.estimate

        async with trio.open_nursery() as nursery:
            for w in work:
                await slots.acquire()
                nursery.start_soon(one, w)

    async def _repair_one(self, w: _Work, report: RepairReport) -> None:
        key = w.blob_id.hex()
        if not await self.blobs.lookup([w.blob_id]):
            self._hints.pop(w.blob_id, None)  # deleted since the pass began
            return
        out = await self.engine.repair(w.ref.meta, w.bad)
        if (out.failed or out.inconsistent) and not await self.blobs.lookup([w.blob_id]):
            # Deleted while being repaired: its files went away under us; not a loss.
            self._hints.pop(w.blob_id, None)
            return
        hints = self._hints.get(w.blob_id, {})
        for p in out.written:
            hints.pop(p, None)
        for p, why in out.failed.items():
            hints.setdefault(p, why)
        if hints:
            self._hints[w.blob_id] = hints
        else:
            self._hints.pop(w.blob_id, None)
        if out.inconsistent:
            report.inconsistent[key] = out.inconsistent
            log.warning("blob %s: %s; nothing written", key[:16], out.inconsistent)
        elif out.failed:
            reasons = sorted(set(out.failed.values()))
            report.unrepairable[key] = "; ".join(reasons)
            if out.lost:
                report.lost.append(key)
        elif out.written:
            report.blobs_repaired += 1
        missed = self.missed.get(w.blob_id, ())
        if missed and not {w.ref.meta.pair_of_node(i) for i in missed} & set(out.failed):
            self.missed.pop(w.blob_id, None)

    # running in the mount

    def _new_work(self) -> bool:
        if self._fresh_hints:
            return True
        writable = self.nodes.writable()
        return any(
            set(nodes) & writable
            for b, nodes in list(self.missed.items())
            if b not in self._missed_seen
        )

    async def run_forever(
        self,
        *,
        first_delay: float = 10.0,
        poll: float = 1.0,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Background task for the mount's nursery: a full pass every `interval` seconds
        (the first after `first_delay`), and a quick pass when hints arrive, a put missed
        a writable node, or a node comes back up (its listing is then checked). Stops by
        cancellation."""
        n = self.vol.params.n
        task_status.started()
        next_full = trio.current_time() + first_delay
        quiet_until = 0.0  # after a failed pass, only the next full one retries
        states = [self.nodes.state(i) for i in range(n)]
        while True:
            with trio.move_on_at(min(next_full, trio.current_time() + poll)):
                await self._wake.wait()
            self._wake = trio.Event()
            now = [self.nodes.state(i) for i in range(n)]
            # Down or full before, writable now: list it, and retry what waited for it.
            back = [i for i in range(n) if states[i] in _UNWRITABLE and now[i] not in _UNWRITABLE]
            states = now
            try:
                if self._full_now or trio.current_time() >= next_full:
                    self._full_now = False
                    await self.pass_once()
                    next_full = trio.current_time() + self.interval
                elif trio.current_time() >= quiet_until and (
                    back or self._rebuilding & self.nodes.readable() or self._new_work()
                ):
                    await self.pass_once(sorted(set(back) | self._rebuilding))
            except Exception as exc:  # the metadata database unreadable, say: retried later
                log.warning("repair pass failed: %s", exc)
                quiet_until = trio.current_time() + 60.0
                next_full = max(next_full, quiet_until)

    async def replace_node(self, index: int, new_dir: str) -> list[str]:
        """Put the empty directory `new_dir` in node `index`'s place and rebuild it in the
        background while it is in use. Returns warnings (nodes whose identity file could
        not be updated to the new path). Raises ReplaceError."""
        vol = self.vol
        n = vol.params.n
        if not 0 <= index < n:
            raise ReplaceError(f"no node {index} (n={n})")
        others = [p for i, p in enumerate(vol.identity.nodes) if i != index]
        path, mount = await trio.to_thread.run_sync(_prepare_new_node, new_dir, others)
        old = vol.nodes.nodes[index].store
        store = make_store(path, mount, timeout=float(getattr(old, "timeout", 10.0)))
        paths, mounts = list(vol.identity.nodes), list(vol.identity.mounts)
        paths[index], mounts[index] = path, mount
        ident = vol.identity
        mine = NodeIdentity(
            ident.volume_id, index, n, ident.f, ident.blob_size, tuple(paths), tuple(mounts)
        )
        try:
            await write_identity(store, mine)
            sb = await self._agreed_superblock()
            if sb is not None:
                await store.put(SUPERBLOCK_KEY, sb, durable=True)
        except NodeError as exc:
            raise ReplaceError(f"{path}: cannot write to the new node: {exc}") from exc
        vol.identity = ident.with_nodes(tuple(paths), tuple(mounts))
        node = vol.nodes.nodes[index]
        node.store, node.failures, node.corrupt = store, 0, 0
        await vol.nodes.probe(index)
        log.warning("node %d replaced by %s (was %s); rebuilding it", index, path, old.path)
        warnings = await self._update_identities(index, tuple(paths), tuple(mounts))
        self._rebuilding.add(index)
        if self.on_replaced is not None:
            await self.on_replaced()
        self._wake.set()
        return warnings

    async def _agreed_superblock(self) -> bytes | None:
        """The raw superblock f+1 nodes hold identically (newest), if any."""
        copies: dict[bytes, int] = {}

        async def one(i: int) -> None:
            try:
                raw = await self.nodes.call(i, lambda st: st.get(SUPERBLOCK_KEY))
                Superblock.from_bytes(raw)
            except (NodeError, ValueError, KeyError, TypeError):
                return
            copies[raw] = copies.get(raw, 0) + 1

        async with trio.open_nursery() as nursery:
            for i in sorted(self.nodes.readable()):
                nursery.start_soon(one, i)
        agreed = [raw for raw, c in copies.items() if c >= self.vol.params.f + 1]
        if not agreed:
            return None
        return max(agreed, key=_superblock_order)

    async def _update_identities(
        self, index: int, paths: tuple[str, ...], mounts: tuple[str, ...]
    ) -> list[str]:
        warnings: list[str] = []

        async def one(i: int) -> None:
            try:
                cur = await self.nodes.call(i, read_identity)
                await self.nodes.call(
                    i, lambda st: write_identity(st, cur.with_nodes(paths, mounts))
                )
            except Exception as exc:  # NodeError or IdentityError: the node keeps the old path
                warnings.append(
                    f"node {i}: identity not updated ({exc}); open the volume from another "
                    f"node or pass --node {index}={paths[index]}"
                )

        async with trio.open_nursery() as nursery:
            for i in range(self.vol.params.n):
                if i != index:
                    nursery.start_soon(one, i)
        return sorted(warnings)

    def status(self) -> dict[str, object]:
        """Progress for `walrusfs status`."""
        running = self._pass_lock.locked()
        elapsed = trio.current_time() - self._pass_t0 if running else 0.0
        done = self.engine.counters.bytes_rebuilt - self._pass_rebuilt0 if running else 0
        rate = done / elapsed if elapsed > 0 else 0.0
        last = self.last_report
        return {
            "running": running,
            "queue": self.queue,
            "pending_bytes": max(self.pending_bytes, 0),
            "rate": round(rate),
            "eta_s": round(self.pending_bytes / rate, 1) if running and rate > 0 else None,
            "bytes_rebuilt": self.engine.counters.bytes_rebuilt,
            "bytes_read": self.engine.counters.bytes_read,
            "pairs_written": self.engine.counters.pairs_written,
            "rebuilding_nodes": sorted(self._rebuilding),
            "hinted_blobs": len(self._hints),
            "passes": self.passes,
            "rate_limit": self.engine.limit.rate,
            "rate_limit_now": self.engine.limit.current(),
            "last_pass": None if last is None else last.to_dict(),
        }
