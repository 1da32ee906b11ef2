"""Repair engine: rebuild the missing or damaged sliver pairs of a blob from the other nodes.

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
operation waits for. Writes go to the nodes' page cache; the healer ends each pass with
syncfs on the nodes written to (`sync_touched`).

The engine repairs one blob's pairs when told which; deciding which blobs need repair
(passes, hints, priorities) is the service's job (walrusfs.healer), and it takes
`BlobMetadata`, not catalog entries. `RateLimit` (the engine's and scrub's) and
`was_cancelled` (the healer's and scrub's) live here, the lowest layer both users share.

Must not import pyfuse3, nor anything above it: walrusfs.healer, scrub, fsck, service.

Runs in trio tasks of one run (not thread-safe: counters, the write set and the token
bucket are plain attributes); coding and verification run in worker threads, at most
`cpu_threads` at once, each with its own Workspace from the engine's pool.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import trio

from backends import KeyNotFound, NodeError
from codec import (
    PRIMARY,
    SECONDARY,
    BlobMetadata,
    CodecError,
    InconsistentEncoding,
    Sliver,
    Workspace,
    decode_primaries,
    decode_secondaries,
    encode,
    rebuild,
    verify_sliver,
    verify_symbol,
)
from codec.encoder import SliverPair
from walrusfs.sliverfile import (
    SliverFileError,
    build,
    header_size,
    parse_header,
    sliver_key,
)
from walrusfs.volume import Volume

log = logging.getLogger(__name__)


def was_cancelled(exc: BaseException) -> bool:
    """Did `exc` (maybe a group from nurseries) end a task by cancellation?"""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[0] is not None
    return isinstance(exc, trio.Cancelled)


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
                try:
                    salvaged = await self._by_salvage(meta, sorted(todo), readable)
                except InconsistentEncoding as exc:
                    out.inconsistent = str(exc)
                    for p in todo:
                        out.failed[p] = "blob is inconsistently encoded"
                    return out
                if salvaged is None:
                    out.lost = (
                        f"only {len(sources)} of {n} pairs readable, {params.R} needed to "
                        f"decode, and no {params.R} primary or {params.C} secondary slivers verify"
                    )
                    for p in todo:
                        out.failed[p] = out.lost
                    return out
                await self._write_all(
                    meta,
                    {p: d for p, d in salvaged.items() if meta.node_of_pair(p) in writable},
                    out,
                )
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

    async def _sliver(self, meta: BlobMetadata, axis: str, q: int, verify: bool) -> memoryview:
        """The `axis` sliver of pair q; with `verify`, read with its header and check every
        symbol in the read's thread. Raises _Unusable."""
        node = meta.node_of_pair(q)
        key = sliver_key(meta.blob_id, q)
        where = f"node {node} {key}"
        p, s = meta.params, meta.symbol_size
        hsize = header_size(meta.n)
        start = hsize if axis == PRIMARY else hsize + p.C * s
        size = (p.C if axis == PRIMARY else p.R) * s

        def check(raw: bytes) -> None:
            head = parse_header(raw[:hsize], meta.blob_id, q, where)
            if head.meta != meta:
                raise SliverFileError(f"{where}: metadata differs from the volume's")
            data = memoryview(raw)[start : start + size]
            if len(data) != size:
                raise SliverFileError(f"{where}: sliver file truncated")
            leaves = head.primary_leaves if axis == PRIMARY else head.secondary_leaves
            verify_sliver(meta, Sliver(axis, _pair_of(meta, axis, q), data, leaves))

        try:
            if verify:
                raw = await self._get(node, key, 0, start + size, check=check)
                return memoryview(raw)[start:]
            return memoryview(await self._get(node, key, start, size))
        except KeyNotFound as exc:
            raise _Unusable({q}, {q}) from exc
        except NodeError as exc:
            raise _Unusable({q}, set()) from exc
        except (SliverFileError, CodecError) as exc:
            self.nodes.note_corrupt(node, str(exc))
            raise _Unusable({q}, {q}) from exc

    async def _slivers(
        self, meta: BlobMetadata, axis: str, order: list[int], verify: bool
    ) -> tuple[dict[int, memoryview], set[int], set[int]]:
        """As many `axis` slivers as decode the blob (R primaries or C secondaries), from
        the pairs in `order`, skipping unusable ones: (sliver index -> bytes, failed, bad
        pairs)."""
        need = meta.params.R if axis == PRIMARY else meta.params.C
        pending = iter(order)
        got: dict[int, memoryview] = {}
        failed: set[int] = set()
        bad: set[int] = set()

        async def worker() -> None:
            # One read per worker at a time, and a worker only moves on after a failure:
            # exactly `need` reads when all goes well.
            for q in pending:
                try:
                    got[_pair_of(meta, axis, q)] = await self._sliver(meta, axis, q, verify)
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
        got, failed, bad = await self._slivers(
            meta, PRIMARY, self._decode_order(meta, sources), self.symbol_check
        )
        if len(got) < meta.params.R:
            raise _Unusable(failed, bad)
        wanted = sorted(set(targets) | bad)
        try:
            files = await self._reencode(meta, got, wanted)
        except InconsistentEncoding:
            if not self.symbol_check:
                _, failed2, bad2 = await self._slivers(meta, PRIMARY, list(got), True)
                if failed2 or bad2:
                    raise _Unusable(failed | failed2, bad | bad2) from None
            raise
        return files, bad

    def _decode_order(self, meta: BlobMetadata, pairs: Iterable[int]) -> list[int]:
        """Healthiest nodes first, and systematic rows first: decoding them is a copy."""
        R = meta.params.R
        return sorted(pairs, key=lambda q: (self.nodes.rank(meta.node_of_pair(q)), q >= R, q))

    async def _reencode(
        self,
        meta: BlobMetadata,
        got: dict[int, memoryview],
        targets: list[int],
        axis: str = PRIMARY,
    ) -> dict[int, bytes]:
        """_reencode in a worker thread, with a workspace of the engine's pool."""
        ws = self._workspaces.pop() if self._workspaces else Workspace()
        try:
            files = await self._cpu_run(lambda: _reencode(meta, got, targets, ws, axis))
        finally:
            self._workspaces.append(ws)
        assert isinstance(files, dict)
        return files

    async def _by_salvage(
        self, meta: BlobMetadata, targets: list[int], readable: set[int]
    ) -> dict[int, bytes] | None:
        """Files for `targets` decoded from slivers of pairs taken as bad, or None.

        A pair is bad when either of its slivers is, but a torn file (a power loss keeps
        part of what was written) often still holds one whole sliver: the primary at its
        start, or the secondary. With too few good pairs, every readable pair's primary is
        tried, then every secondary, each read with its header and verified.
        """
        p = meta.params
        pairs = [q for q in range(meta.n) if meta.node_of_pair(q) in readable]
        axis = PRIMARY
        got, _, _ = await self._slivers(meta, axis, self._decode_order(meta, pairs), True)
        if len(got) < p.R:
            axis = SECONDARY
            got, _, _ = await self._slivers(meta, axis, self._order(meta, pairs), True)
            if len(got) < p.C:
                return None
        files = await self._reencode(meta, got, targets, axis)
        log.info(
            "blob %s: pairs %s rebuilt from %d %s slivers of damaged files",
            meta.blob_id.hex()[:16],
            targets,
            len(got),
            axis,
        )
        return files


def _reencode(
    meta: BlobMetadata,
    slivers: dict[int, memoryview],
    targets: list[int],
    ws: Workspace,
    axis: str = PRIMARY,
) -> dict[int, bytes]:
    """Decode from R primaries (or C secondaries), re-encode, check the blob id, lay out
    the target files."""
    decode = decode_primaries if axis == PRIMARY else decode_secondaries
    blob = decode(meta, slivers)
    enc = encode(meta.params, blob, ws)
    if enc.metadata != meta:
        raise InconsistentEncoding(
            f"blob {meta.blob_id.hex()} decodes to data whose encoding has another blob id"
        )
    return {t: _file_bytes(meta, enc.pairs[t]) for t in targets}
