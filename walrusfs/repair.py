"""Repair: rebuild missing or damaged sliver pairs from the other nodes, lowest health first.

A pair p of a blob lives on node `meta.node_of_pair(p)` as one sliver file (primary p,
secondary n-1-p). When that file is missing (node wiped or replaced, a put that missed
the node) or damaged (found by scrub or a read), the engine rebuilds it in one of two ways:

* **from stored symbols** (Red Stuff recovery, reference §4): primary p needs M[p][j]
  from C secondary slivers j, stored there iff p < R; secondary n-1-p needs M[i][n-1-p]
  from R primary slivers i, stored there iff n-1-p < C. So when f <= p < R both slivers
  come from single-symbol range reads, C + R of them, and the pair reads exactly the
  bytes it rebuilds.
* **by decoding** the blob from R primary slivers and re-encoding it, when a sliver
  needs symbols no node stores (a parity primary p >= R, or a parity secondary
  n-1-p >= C): computing those symbols takes the whole blob anyway, so one decode then
  yields every missing pair of the blob. Re-encoding must reproduce the blob id, i.e.
  every root.

Nothing unverified is ever written, but verification is placed where it costs nothing
on the happy path: symbols and slivers are read raw (no headers), and the result is
checked against its commitments, a rebuilt sliver against its root (codec.rebuild), a
re-encoded blob against its blob id. A rebuilt row or column that matches its root
proves every symbol that went into it, since the decoder's output passes through them
(Walrus's client-side recovery, #2758). Only on a mismatch are the sources' headers read
(leaves verified against their roots) and each symbol or sliver checked against its
leaves: a bad one marks its pair corrupt (repaired as well) and the rebuild is planned
again without it; if every input is genuine the blob is *inconsistently encoded*:
reported, nothing written. This keeps read/rebuilt at exactly 1.0 for symbol rebuilds;
`symbol_check=True` verifies every input first instead (one extra header read each).

Foreground first: at most `per_node` repair calls run on a node at once (the stores
allow 4, so user I/O keeps at least half), coding runs in one worker thread, and a token
bucket caps node I/O (bytes read + written per second), lower while the blob store has
served user reads or writes in the last half second. Nothing here holds a lock a FUSE
operation waits for. Writes go to the nodes' page cache; each pass ends with syncfs on
the nodes it wrote to.

A pass (RepairService.pass_once) lists the nodes (inventory: what each should hold vs
what it holds), adds hints (puts that missed nodes, corrupt slivers from scrub), repairs
blob by blob in order of fewest healthy pairs, and always ends with a RepairReport.
Blobs that cannot be repaired now (too few pairs readable, target node down) are listed
and retried by a later pass, never looped on. Cancelling a pass loses nothing: every
sliver file is written atomically, and the next pass finds what is still missing.

Must not import pyfuse3. Runs in trio tasks of one run (not thread-safe); coding and
verification run in worker threads.
"""

from __future__ import annotations

import heapq
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Container, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Protocol

import trio

from backends import KeyNotFound, NodeError, is_mountpoint
from codec import (
    PRIMARY,
    SECONDARY,
    BlobMetadata,
    CodecError,
    InconsistentEncoding,
    Sliver,
    Workspace,
    decode_primaries,
    encode,
    rebuild,
    verify_sliver,
    verify_symbol,
)
from codec.encoder import SliverPair
from walrusfs.checkpoint import SUPERBLOCK_KEY, Superblock
from walrusfs.identity import NodeIdentity, read_identity, write_identity
from walrusfs.nodeset import NodeState
from walrusfs.sliverfile import (
    PREFIX,
    SliverFileError,
    build,
    header_size,
    parse_header,
    parse_key,
    sliver_key,
)
from walrusfs.volume import Volume, make_store

log = logging.getLogger(__name__)

MiB = 1 << 20


# -- what the volume references ---------------------------------------------------------


@dataclass(frozen=True)
class BlobRef:
    """A referenced blob and its (verified) metadata; `kind` is "file" or "checkpoint"."""

    blob_id: bytes
    meta: BlobMetadata
    kind: str = "file"


class BlobSource(Protocol):
    """Which blobs must be kept whole (repair, scrub and fsck ask it)."""

    async def load(self) -> dict[bytes, BlobRef]:
        """Every referenced blob."""
        ...

    async def lookup(self, blob_ids: Iterable[bytes]) -> dict[bytes, BlobRef]:
        """Those of `blob_ids` that are referenced."""
        ...

    def protected(self) -> set[bytes]:
        """Blob ids never to treat as orphans even without metadata (checkpoints)."""
        ...


def _parse_ref(blob_id: bytes, meta: bytes, kind: str) -> BlobRef | None:
    try:
        parsed = BlobMetadata.from_bytes(meta)
    except CodecError as exc:
        log.warning("blob %s: damaged metadata record ignored: %s", blob_id.hex()[:16], exc)
        return None
    if parsed.blob_id != blob_id:
        log.warning("blob %s: metadata record belongs to another blob", blob_id.hex()[:16])
        return None
    return BlobRef(blob_id, parsed, kind)


class StaticBlobs:
    """A fixed set of blobs (tests, benchmarks, a volume without a filesystem)."""

    def __init__(self, refs: Iterable[BlobRef] = (), protected: Iterable[bytes] = ()) -> None:
        self.refs = {r.blob_id: r for r in refs}
        self._protected = set(protected)

    def add(self, blob_id: bytes, meta: bytes | BlobMetadata, kind: str = "file") -> None:
        parsed = meta if isinstance(meta, BlobMetadata) else BlobMetadata.from_bytes(meta)
        self.refs[blob_id] = BlobRef(blob_id, parsed, kind)

    async def load(self) -> dict[bytes, BlobRef]:
        await trio.lowlevel.checkpoint()
        return dict(self.refs)

    async def lookup(self, blob_ids: Iterable[bytes]) -> dict[bytes, BlobRef]:
        await trio.lowlevel.checkpoint()
        return {b: self.refs[b] for b in blob_ids if b in self.refs}

    def protected(self) -> set[bytes]:
        return set(self._protected)


class Catalog:
    """The filesystem's blobs (the metadata database's `blobs` table) plus checkpoint blobs.

    Reads the database through its own read-only SQLite connection, in worker threads one
    at a time; never writes. `superblock` returns the newest superblock (the metastore's).
    """

    def __init__(self, db_path: str, superblock: Callable[[], Superblock | None]) -> None:
        self.db_path = db_path
        self._superblock = superblock
        self._db: sqlite3.Connection | None = None
        self._limiter = trio.CapacityLimiter(1)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = sqlite3.connect(
                f"file:{self.db_path}?mode=ro", uri=True, check_same_thread=False
            )
            self._db.execute("PRAGMA busy_timeout = 5000")
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _checkpoint_refs(self) -> dict[bytes, BlobRef]:
        sb = self._superblock()
        refs: dict[bytes, BlobRef] = {}
        # The previous checkpoint too: it is the fallback should the newest be unreadable.
        for blob_hex, meta_hex, _ in (*sb.blobs, *sb.previous) if sb else ():
            ref = _parse_ref(bytes.fromhex(blob_hex), bytes.fromhex(meta_hex), "checkpoint")
            if ref is not None:
                refs[ref.blob_id] = ref
        return refs

    async def _query(self, sql: str, args: tuple[object, ...] = ()) -> dict[bytes, BlobRef]:
        """Run a `SELECT blob_id, meta` and parse the rows, all in a worker thread."""

        def run() -> dict[bytes, BlobRef]:
            refs = {}
            for b, m in self._conn().execute(sql, args):
                ref = _parse_ref(bytes(b), bytes(m), "file")
                if ref is not None:
                    refs[ref.blob_id] = ref
            return refs

        return await trio.to_thread.run_sync(run, limiter=self._limiter)

    async def load(self) -> dict[bytes, BlobRef]:
        refs = self._checkpoint_refs()
        refs.update(await self._query("SELECT blob_id, meta FROM blobs"))
        return refs

    async def lookup(self, blob_ids: Iterable[bytes]) -> dict[bytes, BlobRef]:
        wanted = list(dict.fromkeys(blob_ids))
        found = {b: r for b, r in self._checkpoint_refs().items() if b in set(wanted)}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(
                await self._query(
                    f"SELECT blob_id, meta FROM blobs WHERE blob_id IN ({marks})", tuple(chunk)
                )
            )
        return found

    def protected(self) -> set[bytes]:
        sb = self._superblock()
        if sb is None:
            return set()
        return {bytes.fromhex(b) for b, _, _ in (*sb.blobs, *sb.previous)}


def was_cancelled(exc: BaseException) -> bool:
    """Did `exc` (maybe a group from nurseries) end a task by cancellation?"""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[0] is not None
    return isinstance(exc, trio.Cancelled)


def missing_on(
    refs: dict[bytes, BlobRef], node: int, present: Container[tuple[bytes, int] | None]
) -> list[tuple[bytes, int]]:
    """(blob id, pair) of every referenced blob whose pair for `node` is not in `present`.

    Plain CPU work over every blob: run it in a worker thread.
    """
    missing = []
    for blob_id, ref in refs.items():
        pair = ref.meta.pair_of_node(node)
        if (blob_id, pair) not in present:
            missing.append((blob_id, pair))
    return missing


# -- throttling ---------------------------------------------------------------------------


class RateLimit:
    """A pacing token bucket: `take(k)` returns once k bytes fit in the current rate.

    `rate` (bytes/s; None or 0: unlimited) applies while the foreground is idle. With
    `activity` (a counter of user operations) and `busy_rate`, the pace drops to
    `busy_rate` for `linger` seconds after the counter last moved: foreground first.
    Both rates may be changed at any time.
    """

    def __init__(
        self,
        rate: float | None,
        *,
        busy_rate: float | None = None,
        activity: Callable[[], int] | None = None,
        linger: float = 0.5,
    ) -> None:
        self.rate = rate
        self.busy_rate = busy_rate
        self.activity = activity
        self.linger = linger
        self._next = 0.0
        self._seen = activity() if activity is not None else 0
        self._busy_until = 0.0

    def current(self) -> float | None:
        """The rate in force now (None: unlimited)."""
        if self.activity is not None and self.busy_rate:
            seen = self.activity()
            if seen != self._seen:
                self._seen, self._busy_until = seen, trio.current_time() + self.linger
            if trio.current_time() < self._busy_until:
                return min(self.rate, self.busy_rate) if self.rate else self.busy_rate
        return self.rate or None

    async def take(self, nbytes: int) -> None:
        rate = self.current()
        if not rate:
            await trio.lowlevel.checkpoint()
            return
        now = trio.current_time()
        start = max(now, self._next)
        self._next = start + nbytes / rate
        await trio.sleep_until(start)


# -- the engine ---------------------------------------------------------------------------


@dataclass
class Counters:
    """Cumulative engine counters. `bytes_rebuilt` counts sliver bytes written (headers
    excluded); `bytes_read` every byte read from a node (symbols, slivers, headers)."""

    bytes_read: int = 0
    bytes_rebuilt: int = 0
    pairs_written: int = 0


@dataclass
class Outcome:
    """What one blob's repair did."""

    written: set[int] = field(default_factory=set)
    # pair -> why it could not be repaired now
    failed: dict[int, str] = field(default_factory=dict)
    # pairs found missing or corrupt while reading sources (repaired too when possible)
    found_bad: set[int] = field(default_factory=set)
    lost: str = ""  # non-empty: too few pairs readable to rebuild anything
    inconsistent: str = ""  # non-empty: the blob is inconsistently encoded


class _Unusable(Exception):
    """Source pairs could not be used; `bad` ones are missing/corrupt (to be repaired)."""

    def __init__(self, failed: set[int], bad: set[int]) -> None:
        super().__init__(f"source pairs {sorted(failed)} unusable")
        self.failed = failed
        self.bad = bad


def _pair_of(meta: BlobMetadata, axis: str, index: int) -> int:
    return index if axis == PRIMARY else meta.n - 1 - index


def _symbol_plan_ok(meta: BlobMetadata, pair: int) -> bool:
    """Both slivers of `pair` can be rebuilt from symbols the other pairs store."""
    p = meta.params
    return p.f <= pair < p.R


def _file_bytes(meta: BlobMetadata, pair: SliverPair) -> bytes:
    return b"".join(build(meta, pair))


class RepairEngine:
    """Rebuilds the sliver pairs of one blob at a time (many blobs may run concurrently)."""

    def __init__(
        self,
        vol: Volume,
        *,
        rate: float | None = None,
        busy_rate: float | None = None,
        per_node: int = 2,
        cpu_threads: int = 1,
        symbol_check: bool = False,
    ) -> None:
        self.vol = vol
        self.nodes = vol.nodes
        stats = vol.blobs.stats
        self.limit = RateLimit(
            rate, busy_rate=busy_rate, activity=lambda: stats.gets + stats.puts + stats.failed_gets
        )
        self.symbol_check = symbol_check
        self.counters = Counters()
        self.touched: set[int] = set()
        #: Called after each sliver pair written: (blob id, pair).
        self.on_write: Callable[[bytes, int], None] | None = None
        self._per_node = [trio.CapacityLimiter(per_node) for _ in range(vol.params.n)]
        self._cpu = trio.CapacityLimiter(cpu_threads)
        self._workspaces: list[Workspace] = []

    # node I/O, throttled and counted

    async def _get(
        self,
        node: int,
        key: str,
        offset: int,
        length: int,
        check: Callable[[bytes], None] | None = None,
    ) -> bytes:
        await self.limit.take(length)
        async with self._per_node[node]:
            raw = await self.nodes.call(node, lambda st: st.get(key, offset, length, check=check))
        self.counters.bytes_read += len(raw)
        if len(raw) != length:
            raise SliverFileError(f"node {node} {key}: sliver file truncated")
        return raw

    async def _put(self, meta: BlobMetadata, pair: int, data: bytes) -> None:
        node = meta.node_of_pair(pair)
        key = sliver_key(meta.blob_id, pair)
        await self.limit.take(len(data))
        async with self._per_node[node]:
            await self.nodes.call(node, lambda st: st.put(key, data, durable=False))
        self.touched.add(node)
        p = meta.params
        self.counters.bytes_rebuilt += (p.C + p.R) * meta.symbol_size
        self.counters.pairs_written += 1
        if self.on_write is not None:
            self.on_write(meta.blob_id, pair)

    async def sync_touched(self) -> None:
        """Flush the nodes written to since the last call (syncfs); errors are left to probes."""
        touched, self.touched = self.touched, set()

        async def one(i: int) -> None:
            try:
                await self.nodes.call(i, lambda st: st.syncfs())
            except NodeError as exc:
                log.debug("syncfs on node %d after repair failed: %s", i, exc)

        async with trio.open_nursery() as nursery:
            for i in sorted(touched):
                nursery.start_soon(one, i)

    async def _cpu_run(self, fn: Callable[[], object]) -> object:
        return await trio.to_thread.run_sync(fn, limiter=self._cpu)

    # one blob

    async def repair(
        self, meta: BlobMetadata, bad: Iterable[int], *, mode: str = "auto"
    ) -> Outcome:
        """Rebuild and write the pairs `bad` of a blob; never raises for node or data faults.

        `mode` "auto" rebuilds from stored symbols where the layout allows and decodes
        otherwise; "decode" always decodes and re-encodes (how Reed-Solomon systems heal).
        Pairs found missing or corrupt on the way are rebuilt too (`Outcome.found_bad`).
        """
        out = Outcome()
        n, params = meta.n, meta.params
        wanted = set(bad)  # pairs to rebuild
        excluded = set(bad)  # pairs not to use as sources
        for _ in range(n + 1):
            writable, readable = self.nodes.writable(), self.nodes.readable()
            todo = {p for p in wanted - out.written if meta.node_of_pair(p) in writable}
            for p in wanted - out.written - todo:
                node = meta.node_of_pair(p)
                out.failed[p] = f"node {node} is {self.nodes.state(node).value}"
            if not todo:
                return out
            sources = [
                q for q in range(n) if q not in excluded and meta.node_of_pair(q) in readable
            ]
            if len(sources) < params.R:
                out.lost = f"only {len(sources)} of {n} pairs readable, {params.R} needed to decode"
                for p in todo:
                    out.failed[p] = out.lost
                return out
            by_symbols = (
                mode == "auto"
                and len(sources) >= params.C
                and all(_symbol_plan_ok(meta, p) for p in todo)
            )
            newly_bad: set[int] = set()
            try:
                if by_symbols:
                    files = await self._by_symbols(meta, sorted(todo), sources)
                else:
                    files, newly_bad = await self._by_decode(meta, sorted(todo), sources)
            except _Unusable as exc:
                excluded |= exc.failed | exc.bad
                wanted |= exc.bad
                out.found_bad |= exc.bad
                continue
            except InconsistentEncoding as exc:
                out.inconsistent = str(exc)
                for p in todo:
                    out.failed[p] = "blob is inconsistently encoded"
                return out
            excluded |= newly_bad
            wanted |= newly_bad
            out.found_bad |= newly_bad
            await self._write_all(
                meta, {p: d for p, d in files.items() if meta.node_of_pair(p) in writable}, out
            )
            if not wanted - out.written - set(out.failed):
                return out
        return out

    async def _write_all(self, meta: BlobMetadata, files: dict[int, bytes], out: Outcome) -> None:
        async def one(p: int, data: bytes) -> None:
            try:
                await self._put(meta, p, data)
                out.written.add(p)
                out.failed.pop(p, None)
            except NodeError as exc:
                out.failed[p] = f"write failed: {exc}"

        async with trio.open_nursery() as nursery:
            for p, data in files.items():
                nursery.start_soon(one, p, data)

    def _order(self, meta: BlobMetadata, pairs: Iterable[int]) -> list[int]:
        """Healthiest nodes first."""
        return sorted(pairs, key=lambda q: (self.nodes.rank(meta.node_of_pair(q)), q))

    # plan 1: stored symbols

    async def _symbol(
        self, meta: BlobMetadata, axis: str, index: int, position: int, got: dict[int, bytes]
    ) -> None:
        """Read symbol `position` of sliver (axis, index) into got[index]; raises _Unusable."""
        q = _pair_of(meta, axis, index)
        node = meta.node_of_pair(q)
        p, s = meta.params, meta.symbol_size
        base = header_size(meta.n) + (0 if axis == PRIMARY else p.C * s)
        try:
            got[index] = await self._get(node, sliver_key(meta.blob_id, q), base + position * s, s)
        except KeyNotFound as exc:
            raise _Unusable({q}, {q}) from exc
        except NodeError as exc:
            raise _Unusable({q}, set()) from exc
        except SliverFileError as exc:
            raise _Unusable({q}, {q}) from exc

    async def _gather_symbols(
        self, meta: BlobMetadata, axis: str, position: int, indexes: list[int]
    ) -> dict[int, bytes]:
        got: dict[int, bytes] = {}
        failed: set[int] = set()
        bad: set[int] = set()

        async def one(i: int) -> None:
            try:
                await self._symbol(meta, axis, i, position, got)
            except _Unusable as exc:
                failed.update(exc.failed)
                bad.update(exc.bad)

        async with trio.open_nursery() as nursery:
            for i in indexes:
                nursery.start_soon(one, i)
        if failed:
            raise _Unusable(failed, bad)
        return got

    async def _by_symbols(
        self, meta: BlobMetadata, targets: list[int], sources: list[int]
    ) -> dict[int, bytes]:
        ordered = self._order(meta, sources)
        return {t: await self._pair_by_symbols(meta, t, ordered) for t in targets}

    async def _pair_by_symbols(self, meta: BlobMetadata, t: int, sources: list[int]) -> bytes:
        """Pair t from C + R stored symbols: primary t takes M[t][j] from secondaries j
        (stored as t < R), secondary n-1-t takes M[i][n-1-t] from primaries i (n-1-t < C)."""
        n, p = meta.n, meta.params
        got: dict[str, dict[int, bytes]] = {}
        errors: list[_Unusable] = []

        async def fetch(axis: str, position: int, indexes: list[int]) -> None:
            try:
                got[axis] = await self._gather_symbols(meta, axis, position, indexes)
            except _Unusable as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch, SECONDARY, t, [n - 1 - q for q in sources[: p.C]])
            nursery.start_soon(fetch, PRIMARY, n - 1 - t, sources[: p.R])
        if errors:
            raise _Unusable(
                set().union(*(e.failed for e in errors)), set().union(*(e.bad for e in errors))
            )
        if self.symbol_check:
            await self._blame(meta, SECONDARY, t, got[SECONDARY])
            await self._blame(meta, PRIMARY, n - 1 - t, got[PRIMARY])
        prim = await self._rebuild(meta, PRIMARY, t, got[SECONDARY])
        sec = await self._rebuild(meta, SECONDARY, n - 1 - t, got[PRIMARY])
        return _file_bytes(meta, SliverPair(t, prim, sec))

    async def _rebuild(
        self, meta: BlobMetadata, axis: str, index: int, symbols: dict[int, bytes]
    ) -> Sliver:
        """codec.rebuild in a worker thread; on a root mismatch find the bad symbol."""
        try:
            result = await self._cpu_run(lambda: rebuild(meta, axis, index, symbols))
        except InconsistentEncoding:
            src_axis = SECONDARY if axis == PRIMARY else PRIMARY
            await self._blame(meta, src_axis, index, symbols)
            raise  # every symbol is genuine: the encoding itself is inconsistent
        assert isinstance(result, Sliver)
        return result

    async def _blame(
        self, meta: BlobMetadata, axis: str, position: int, symbols: dict[int, bytes]
    ) -> None:
        """Check each symbol against its leaf from its file's verified header; raises
        _Unusable naming the pairs whose symbols are bad."""
        bad: set[int] = set()
        failed: set[int] = set()
        hsize = header_size(meta.n)

        async def one(index: int, data: bytes) -> None:
            q = _pair_of(meta, axis, index)
            node = meta.node_of_pair(q)
            key = sliver_key(meta.blob_id, q)
            try:
                raw = await self._get(node, key, 0, hsize)
                head = parse_header(raw, meta.blob_id, q, f"node {node} {key}")
                if head.meta != meta:
                    raise SliverFileError(f"node {node} {key}: metadata differs from the volume's")
                leaves = head.primary_leaves if axis == PRIMARY else head.secondary_leaves
                verify_symbol(meta, axis, index, leaves, position, data)
            except NodeError:
                failed.add(q)
            except (SliverFileError, CodecError) as exc:
                self.nodes.note_corrupt(node, str(exc))
                bad.add(q)

        async with trio.open_nursery() as nursery:
            for index, data in symbols.items():
                nursery.start_soon(one, index, data)
        if bad or failed:
            raise _Unusable(failed | bad, bad)

    # plan 2: decode and re-encode

    async def _primary(self, meta: BlobMetadata, q: int, verify: bool) -> memoryview:
        """Primary sliver q; with `verify`, read with its header and check every symbol in
        the read's thread. Raises _Unusable."""
        node = meta.node_of_pair(q)
        key = sliver_key(meta.blob_id, q)
        where = f"node {node} {key}"
        hsize, size = header_size(meta.n), meta.params.C * meta.symbol_size

        def check(raw: bytes) -> None:
            head = parse_header(raw[:hsize], meta.blob_id, q, where)
            if head.meta != meta:
                raise SliverFileError(f"{where}: metadata differs from the volume's")
            data = memoryview(raw)[hsize : hsize + size]
            if len(data) != size:
                raise SliverFileError(f"{where}: sliver file truncated")
            verify_sliver(meta, Sliver(PRIMARY, q, data, head.primary_leaves))

        try:
            if verify:
                raw = await self._get(node, key, 0, hsize + size, check=check)
                return memoryview(raw)[hsize:]
            return memoryview(await self._get(node, key, hsize, size))
        except KeyNotFound as exc:
            raise _Unusable({q}, {q}) from exc
        except NodeError as exc:
            raise _Unusable({q}, set()) from exc
        except (SliverFileError, CodecError) as exc:
            self.nodes.note_corrupt(node, str(exc))
            raise _Unusable({q}, {q}) from exc

    async def _primaries(
        self, meta: BlobMetadata, order: list[int], verify: bool
    ) -> tuple[dict[int, memoryview], set[int], set[int]]:
        """R primary slivers taken in `order`, skipping unusable ones: (got, failed, bad)."""
        need = meta.params.R
        pending = iter(order)
        got: dict[int, memoryview] = {}
        failed: set[int] = set()
        bad: set[int] = set()

        async def worker() -> None:
            # One read per worker at a time, and a worker only moves on after a failure:
            # exactly R reads when all goes well.
            for q in pending:
                try:
                    got[q] = await self._primary(meta, q, verify)
                    return
                except _Unusable as exc:
                    failed.update(exc.failed)
                    bad.update(exc.bad)

        async with trio.open_nursery() as nursery:
            for _ in range(need):
                nursery.start_soon(worker)
        return got, failed, bad

    async def _by_decode(
        self, meta: BlobMetadata, targets: list[int], sources: list[int]
    ) -> tuple[dict[int, bytes], set[int]]:
        """Files for `targets` and for any source found bad on the way, and those bad pairs.

        Slivers are read without their headers and trusted only once the re-encoded blob
        reproduces the blob id; on a mismatch they are read again, verified, to find the
        culprit (or prove the encoding inconsistent).
        """
        need = meta.params.R
        # Systematic rows first: decoding them is a copy.
        order = sorted(sources, key=lambda q: (self.nodes.rank(meta.node_of_pair(q)), q >= need, q))
        got, failed, bad = await self._primaries(meta, order, self.symbol_check)
        if len(got) < need:
            raise _Unusable(failed, bad)
        wanted = sorted(set(targets) | bad)
        ws = self._workspaces.pop() if self._workspaces else Workspace()
        try:
            files = await self._cpu_run(lambda: _reencode(meta, got, wanted, ws))
        except InconsistentEncoding:
            if not self.symbol_check:
                _, failed2, bad2 = await self._primaries(meta, list(got), True)
                if failed2 or bad2:
                    raise _Unusable(failed | failed2, bad | bad2) from None
            raise
        finally:
            self._workspaces.append(ws)
        assert isinstance(files, dict)
        return files, bad


def _reencode(
    meta: BlobMetadata, slivers: dict[int, memoryview], targets: list[int], ws: Workspace
) -> dict[int, bytes]:
    """Decode from R primaries, re-encode, check the blob id, lay out the target files."""
    blob = decode_primaries(meta, slivers)
    enc = encode(meta.params, blob, ws)
    if enc.metadata != meta:
        raise InconsistentEncoding(
            f"blob {meta.blob_id.hex()} decodes to data whose encoding has another blob id"
        )
    return {t: _file_bytes(meta, enc.pairs[t]) for t in targets}


# -- passes, the service, node replacement ----------------------------------------------


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
    if os.path.realpath(path) in {os.path.realpath(o) for o in others}:
        raise ReplaceError(f"{path}: is already another node of this volume")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ReplaceError(f"{path}: exists and is not a directory")
    try:
        if os.path.isdir(path):
            if [e for e in os.listdir(path) if e != "lost+found"]:
                raise ReplaceError(f"{path}: not empty; a replacement node must start empty")
        else:
            os.makedirs(path, mode=0o700)
        os.chmod(path, 0o700)
    except OSError as exc:
        raise ReplaceError(f"{path}: cannot prepare the directory: {exc.strerror}") from exc
    return path, _mount_of(path)


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
                keys = await self.nodes.call(i, lambda st: st.list_keys(PREFIX))
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
