"""The blob store: put, get and delete blobs across the n node directories.

put_blob encodes in a worker thread, writes the n sliver files in parallel and succeeds once
n-f nodes have stored theirs (Walrus's write quorum); stragglers get a short grace period,
then whoever missed the blob is reported so repair can fill it in. Below the quorum the put
fails as a whole and what was written is removed again.

get_blob reads only the R systematic primary slivers when they are healthy, straight into
the blob's buffer: no arithmetic, no copy. One worker thread reads and verifies all R in
turn (NodeSet.read_batch), with parity primaries in place of those on nodes that are down.
That left a busy mount's event loop a quarter less work per block than a task, deadline
and thread hop per sliver (1 GiB cold through the mount: main thread 0.72-0.92 s
against 0.96-1.76 s; 471-532 MB/s against 312-489). Every byte
is verified (header against the blob id, leaves against their roots, each symbol against
its leaf) before use. A node that is down, slow past the hedge delay (past the batch's
deadline, on the healthy path), or returns bad bytes is replaced by another sliver; with
fewer than R good primaries the blob is decoded from secondaries. More than f bad nodes:
StorageUnavailable, never a hang and never unverified bytes.

Bounded memory: at most `max_puts` puts are in flight, each holding about 7x its blob.
Six, not four, since sliver files are written O_DIRECT: a put then waits on the disk
rather than the CPU, and more of them overlap (1 GiB through the mount, 3 rounds: 4 in
flight 150-166 MB/s, 6: 165-189, 8: 176-199 for 80 MB more peak memory than 4).

Runs in trio tasks (not thread-safe); encoding, decoding and hashing of large slivers are
offloaded to worker threads.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import trio

from backends import KeyExists, NodeError, NodeFull, NodeStore, NodeTimeout, describe_failures
from codec import (
    PRIMARY,
    SECONDARY,
    BlobMetadata,
    CodecError,
    Params,
    RangePiece,
    decode_primaries,
    decode_secondaries,
    encode,
    range_plan,
    rebuild,
    verify_symbol,
)
from walrusfs.errors import NoSpace, StorageUnavailable
from walrusfs.flush import flush_filesystems
from walrusfs.nodeset import NodeSet, NodeState, for_want_of_space
from walrusfs.sliverfile import (
    Header,
    SliverFileError,
    build,
    file_size,
    header_size,
    parse_header,
    sliver_key,
)

log = logging.getLogger(__name__)

PARSED_CACHE = 4096  # parsed blob metadata remembered (~1 KiB each at n=7)
SIZES_AT_ONCE = 512  # sliver files whose sizes one node call looks up (whole_files)


class PutResult(NamedTuple):
    """A stored blob: its id, serialized metadata, and the nodes that missed their pair."""

    blob_id: bytes
    meta: bytes
    missed: tuple[int, ...]


@dataclass
class _SharedGet:
    """A get_blob under way, which callers asking for the same blob wait for."""

    done: trio.Event = field(default_factory=trio.Event)
    result: memoryview | None = None


class _BadSliver(Exception):
    """A sliver could not be used: node error, missing, or failed verification."""

    def __init__(self, why: str, abandoned: bool = False) -> None:
        super().__init__(why)
        #: The read's worker thread was left behind at its deadline and may still write.
        self.abandoned = abandoned


@dataclass
class BlobStats:
    """Counters for `status`."""

    puts: int = 0
    put_bytes: int = 0
    gets: int = 0
    get_bytes: int = 0
    degraded_reads: int = 0
    corrupt_slivers: int = 0
    missed_pairs: int = 0
    failed_puts: int = 0
    failed_gets: int = 0
    extra: dict[str, int] = field(default_factory=dict)


def _encode_files(
    params: Params, data: bytes | bytearray | memoryview
) -> tuple[BlobMetadata, dict[int, tuple[str, tuple[bytes | memoryview, ...]]]]:
    """Encode and lay out one sliver file per node, as pieces (runs in a worker thread).

    The pieces are read-only views of buffers this encode allocated for itself, not of a
    reused workspace: they are written with writev and no copy, and a late write by an
    abandoned thread still sees its bytes (the views keep them alive). Freed buffers go
    back to the heap (walrusfs.tuning), so fresh ones cost no page faults.
    """
    enc = encode(params, data)
    meta = enc.metadata
    files: dict[int, tuple[str, tuple[bytes | memoryview, ...]]] = {}
    for pair in enc.pairs:
        pieces = tuple(
            p if isinstance(p, bytes) else memoryview(p).toreadonly() for p in build(meta, pair)
        )
        files[meta.node_of_pair(pair.pair)] = (sliver_key(meta.blob_id, pair.pair), pieces)
    return meta, files


def _parse(meta: BlobMetadata, pair: int, raw: bytes, where: str) -> Header:
    """Parse a header and insist its metadata is the volume's record of the blob."""
    head = parse_header(raw[: header_size(meta.n)], meta.blob_id, pair, where)
    if head.meta != meta:
        raise SliverFileError(f"{where}: metadata differs from the volume's")
    return head


def _verify_symbols(
    meta: BlobMetadata, axis: str, index: int, leaves: bytes, data: memoryview, first: int
) -> None:
    s = meta.symbol_size
    for k in range(len(data) // s):
        verify_symbol(meta, axis, index, leaves, first + k, data[k * s : (k + 1) * s])


def _batch_check(
    meta: BlobMetadata,
    index: int,
    where: str,
    cached: Header | None,
    head_buf: bytearray,
    row: memoryview,
    found: dict[int, Header],
    damaged: dict[int, str],
) -> Callable[[int], None]:
    """The check of one batched primary sliver read (see BlobStore._read_batched). It runs
    in the batch's thread and notes damage instead of raising it: run_batch would stop
    at an exception that is not a node error, and leave the other reads undone."""
    size = len(row)

    def check(got: int) -> None:
        try:
            if got < len(head_buf) + size:
                raise SliverFileError(f"{where}: sliver file truncated")
            head = cached or _parse(meta, index, bytes(head_buf), where)
            _verify_symbols(meta, PRIMARY, index, head.primary_leaves, row, 0)
            found[index] = head
        except (SliverFileError, CodecError) as exc:
            damaged[index] = str(exc)

    return check


class BlobStore:
    """Blobs over a NodeSet. See the module docstring for the guarantees."""

    def __init__(
        self,
        nodes: NodeSet,
        params: Params,
        *,
        encode_threads: int = 2,
        max_puts: int = 6,
        grace: float = 0.5,
        hedge_after: float = 0.5,
    ) -> None:
        if len(nodes) != params.n:
            raise ValueError(f"{len(nodes)} node stores for n={params.n}")
        self.nodes = nodes
        self.params = params
        self.grace = grace
        self.hedge_after = hedge_after
        self.stats = BlobStats()
        self._encode_limiter = trio.CapacityLimiter(encode_threads)
        self._cpu_limiter = trio.CapacityLimiter(2)
        self._whole_gets: dict[bytes, _SharedGet] = {}
        self._puts = trio.Semaphore(max_puts)
        self._putting: Counter[bytes] = Counter()  # puts under way, by blob id
        self._overlapped: set[bytes] = set()  # blob ids with two puts under way at once
        self._headers: OrderedDict[tuple[bytes, int], Header] = OrderedDict()
        self._parsed: dict[bytes, BlobMetadata] = {}  # by serialized metadata
        # Told of every sliver that failed verification (repair queues it): blob id, pair, why.
        self.on_bad_sliver: Callable[[bytes, int, str], None] | None = None

    # -- metadata -------------------------------------------------------------------------

    def metadata(self, blob_id: bytes, meta: bytes | BlobMetadata) -> BlobMetadata:
        """Parsed metadata, checked against the blob id; raises StorageUnavailable.

        Remembered: parsing and hashing it cost ~8% of the event loop's thread in a
        cold read through the mount, which asked twice for every 4 MiB block.
        """
        if isinstance(meta, BlobMetadata):
            parsed = meta
        else:
            known = self._parsed.get(meta)
            if known is None:
                try:
                    known = BlobMetadata.from_bytes(meta)
                except CodecError as exc:
                    raise StorageUnavailable(
                        f"blob {blob_id.hex()[:16]}: damaged metadata ({exc})"
                    ) from exc
                if len(self._parsed) >= PARSED_CACHE:
                    self._parsed.clear()  # a cheap bound: what is forgotten is parsed again
                self._parsed[bytes(meta)] = known
            parsed = known
        if parsed.blob_id != blob_id:
            raise StorageUnavailable(f"blob {blob_id.hex()[:16]}: metadata belongs to another blob")
        return parsed

    # -- put ------------------------------------------------------------------------------

    async def put_blob(
        self, data: bytes | bytearray | memoryview, *, durable: bool = True, small: bool = False
    ) -> PutResult:
        """Store a blob on at least n-f nodes; `durable`: on their stable storage too;
        `small`: the nodes taken as full are tried as well (see NodeSet.writable).

        Durable puts write their files like the others and then flush each filesystem
        holding them once (walrusfs.flush), instead of an fsync per file and directory:
        ~1.7x faster here with the 7 nodes on one disk.
        Raises StorageUnavailable (or NoSpace when nodes are full) below the quorum.
        """
        quorum = self.params.n - self.params.f
        claimed: bytes | None = None
        try:
            async with self._puts:
                meta, files = await trio.to_thread.run_sync(
                    _encode_files, self.params, data, limiter=self._encode_limiter
                )
                claimed = self._claim(meta.blob_id)
                created: set[int] = set()
                written, errors = await self._store_files(files, created, small)
                keys = {i: key for i, (key, _) in files.items()}
                del files  # the flush below must not hold the encoded bytes out of `_puts`
            stored = written
            if durable and len(written) >= quorum:
                stored, flush_errors = await flush_filesystems(self.nodes, written, quorum)
                for i in written - stored:
                    errors[i] = flush_errors.get(i, "not flushed in time: left for repair")
            if len(stored) < quorum:
                self.stats.failed_puts += 1
                # Only the files this put created: keys follow content, so a file that was
                # there already may be a stored blob's (a copy of a file), and one written
                # by another put of the same blob meanwhile, that put's.
                if meta.blob_id not in self._overlapped:
                    await self._remove(meta.blob_id, {node: keys[node] for node in created})
                detail = describe_failures(errors)
                # Full now, or skipped because a write found it full before: either way the
                # user's answer is ENOSPC, not EIO, when the full nodes are what it lacked.
                failed = [i for i in errors if i not in stored]
                full = sum(
                    1
                    for i in failed
                    if isinstance(errors[i], NodeFull) or self.nodes.state(i) is NodeState.FULL
                )
                short = for_want_of_space(self.params.n, quorum, full, len(failed) - full)
                cls = NoSpace if short else StorageUnavailable
                raise cls(
                    f"blob stored on only {len(stored)} of {self.params.n} nodes, "
                    f"need {quorum}: {detail}"
                )
        finally:
            if claimed is not None:
                self._unclaim(claimed)
        missed = tuple(sorted(set(range(self.params.n)) - stored))
        self.stats.puts += 1
        self.stats.put_bytes += len(data)
        self.stats.missed_pairs += len(missed)
        return PutResult(meta.blob_id, meta.to_bytes(), missed)

    def _claim(self, blob_id: bytes) -> bytes:
        """Count a put of `blob_id` under way; note when another is too (see put_blob)."""
        if self._putting[blob_id]:
            self._overlapped.add(blob_id)
        self._putting[blob_id] += 1
        return blob_id

    def _unclaim(self, blob_id: bytes) -> None:
        self._putting[blob_id] -= 1
        if not self._putting[blob_id]:
            del self._putting[blob_id]
            self._overlapped.discard(blob_id)

    async def _store_files(
        self,
        files: dict[int, tuple[str, tuple[bytes | memoryview, ...]]],
        created: set[int],
        small: bool,
    ) -> tuple[set[int], dict[int, Exception | str]]:
        """Write each node's file (not durably: see put_blob); return once a quorum (plus
        grace) or all have answered. Short of the quorum, the nodes taken as down or full
        are probed again, and those back take their files too. A node that has the file
        already keeps it (counted as stored); `created` gets the nodes written to."""
        quorum = self.params.n - self.params.f
        began = trio.current_time()
        writable = self.nodes.writable(small=small)
        errors: dict[int, Exception | str] = {
            i: f"skipped: node is {self.nodes.state(i).value}" for i in files if i not in writable
        }
        # Too few writable to start: nothing is written, and the look again below decides.
        stored = await self._store_on(
            files, [i for i in files if i in writable], set(), created, errors
        )
        if len(stored) < quorum:
            back = [
                i for i in await self.nodes.writable_again(began, stored, small=small) if i in files
            ]
            stored = await self._store_on(files, back, stored, created, errors)
        return stored, errors

    async def _store_on(
        self,
        files: dict[int, tuple[str, tuple[bytes | memoryview, ...]]],
        pending: list[int],
        stored: set[int],
        created: set[int],
        errors: dict[int, Exception | str],
    ) -> set[int]:
        """Write the files of the `pending` nodes, adding to `stored` (which holds the
        nodes done already), `created` and `errors`; return `stored`."""
        quorum = self.params.n - self.params.f
        if len(stored) + len(pending) < quorum:
            return stored
        # The healthy nodes take their files in one thread job; the rest as below.
        done = await self.nodes.put_batch([(i, *files[i]) for i in pending], replace=False)
        for i, outcome in done.items():
            if outcome is None or isinstance(outcome, KeyExists):
                stored.add(i)
                errors.pop(i, None)
                if outcome is None:
                    created.add(i)
            else:
                errors[i] = outcome
        pending = [i for i in pending if i not in done]
        if not pending:
            return stored
        left = len(pending)
        settled, all_done = trio.Event(), trio.Event()  # quorum or all answered; all answered

        async def write(i: int) -> None:
            nonlocal left
            key, payload = files[i]
            try:
                await self.nodes.call(
                    i, lambda st: st.put(key, payload, durable=False, replace=False)
                )
                created.add(i)
                stored.add(i)
                errors.pop(i, None)
            except KeyExists:
                stored.add(i)
                errors.pop(i, None)
            except NodeError as exc:
                errors[i] = exc
            left -= 1
            # When the quorum becomes impossible, in-flight writes still run to their end
            # (bounded by the node deadline): a cancelled write's thread could land its
            # file after the cleanup and leave an orphan.
            if len(stored) >= quorum or left == 0:
                settled.set()
            if left == 0:
                all_done.set()

        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in pending:
                nursery.start_soon(write, i)
            if len(stored) >= quorum:
                settled.set()  # the batch reached it already
            await settled.wait()
            if len(stored) >= quorum and left:
                # A slow node gets a little longer; a hung one is left to repair.
                with trio.move_on_after(max(self.grace, trio.current_time() - t0)):
                    await all_done.wait()
            nursery.cancel_scope.cancel()
        for i in pending:
            if i not in stored and i not in errors:
                errors[i] = "too slow: left for repair"
        return stored

    async def _remove(self, blob_id: bytes, keys: dict[int, str]) -> list[int]:
        failed: list[int] = []

        async def one(i: int, key: str) -> None:
            try:
                await self.nodes.call(i, lambda st: st.delete(key))
            except NodeError:
                failed.append(i)

        async with trio.open_nursery() as nursery:
            for i, key in keys.items():
                nursery.start_soon(one, i, key)
        for pair in range(self.params.n):
            self._headers.pop((blob_id, pair), None)
        return failed

    async def delete_blob(self, blob_id: bytes, meta: bytes | BlobMetadata) -> list[int]:
        """Delete a blob's slivers from every reachable node; returns nodes that could not.

        What a down node still holds is an orphan for scrub to remove later.
        """
        parsed = self.metadata(blob_id, meta)
        readable = self.nodes.readable()
        keys = {
            parsed.node_of_pair(p): sliver_key(blob_id, p)
            for p in range(parsed.n)
            if parsed.node_of_pair(p) in readable
        }
        failed = await self._remove(blob_id, keys)
        return sorted(failed + [i for i in range(parsed.n) if i not in readable])

    # -- get ------------------------------------------------------------------------------

    def _cached_header(self, blob_id: bytes, pair: int) -> Header | None:
        head = self._headers.get((blob_id, pair))
        if head is not None:
            self._headers.move_to_end((blob_id, pair))
        return head

    def _remember(self, head: Header) -> None:
        self._headers[(head.meta.blob_id, head.pair)] = head
        if len(self._headers) > 4096:
            self._headers.popitem(last=False)

    async def _header(self, meta: BlobMetadata, pair: int, node: int) -> Header:
        """A verified sliver file header, from the cache or the node."""
        head = self._cached_header(meta.blob_id, pair)
        if head is None:
            key = sliver_key(meta.blob_id, pair)
            raw = await self.nodes.call(node, lambda st: st.get(key, 0, header_size(meta.n)))
            head = _parse(meta, pair, raw, f"node {node} {key}")
            self._remember(head)
        return head

    async def _read_sliver(
        self, meta: BlobMetadata, axis: str, index: int, into: memoryview | None = None
    ) -> memoryview:
        """One verified sliver's bytes; raises _BadSliver.

        A primary sliver is read straight into `into` if given (its place in the blob),
        else into fresh bytes. The header check and symbol verification run in the read's
        own worker thread.
        """
        pair = index if axis == PRIMARY else meta.n - 1 - index
        node = meta.node_of_pair(pair)
        key = sliver_key(meta.blob_id, pair)
        where = f"node {node} {key}"
        s, p = meta.symbol_size, meta.params
        hsize = header_size(meta.n)
        start = hsize if axis == PRIMARY else hsize + p.C * s
        size = (p.C if axis == PRIMARY else p.R) * s
        cached = self._cached_header(meta.blob_id, pair)
        heads: list[Header] = []

        def verify(raw_header: bytes, data: memoryview) -> None:
            head = cached or _parse(meta, pair, raw_header, where)
            if len(data) != size:
                raise SliverFileError(f"{where}: sliver file truncated")
            leaves = head.primary_leaves if axis == PRIMARY else head.secondary_leaves
            _verify_symbols(meta, axis, index, leaves, data, 0)
            heads.append(head)

        def read(st: NodeStore) -> Awaitable[object]:
            if into is None:
                # Secondary reads are rare (fewer than R good primaries): the whole file.
                length = start + size if axis == PRIMARY else None
                return st.get(
                    key, 0, length, check=lambda raw: verify(raw, memoryview(raw)[start:][:size])
                )
            if len(into) != size:
                raise ValueError(f"{where}: a {len(into)}-byte buffer for a {size}-byte sliver")
            head_buf = bytearray(0 if cached else hsize)

            def check(got: int) -> None:
                if got < len(head_buf) + size:
                    raise SliverFileError(f"{where}: sliver file truncated")
                verify(bytes(head_buf), into)

            pieces = (into,) if cached else (memoryview(head_buf), into)
            return st.get_into(key, hsize if cached else 0, pieces, check=check)

        try:
            raw = await self.nodes.call(node, read)
        except NodeError as exc:
            raise _BadSliver(str(exc), isinstance(exc, NodeTimeout)) from exc
        except (SliverFileError, CodecError) as exc:
            self._headers.pop((meta.blob_id, pair), None)
            self._bad(meta.blob_id, pair, node, str(exc))
            raise _BadSliver(str(exc)) from exc
        if cached is None:
            self._remember(heads[0])
        if into is not None:
            return into
        assert isinstance(raw, bytes)
        return memoryview(raw)[start : start + size]

    def _bad(self, blob_id: bytes, pair: int, node: int, why: str) -> None:
        self.stats.corrupt_slivers += 1
        self.nodes.note_corrupt(node, why)
        if self.on_bad_sliver is not None:
            self.on_bad_sliver(blob_id, pair, why)

    def _hedge_delay(self, node: int) -> float:
        """How long to wait for a read before asking another node as well."""
        return min(self.hedge_after, max(0.05, 4 * self.nodes.nodes[node].latency))

    async def _gather(
        self,
        meta: BlobMetadata,
        axis: str,
        need: int,
        into: np.ndarray | None = None,
        abandoned: set[int] | None = None,
        skip: set[int] | None = None,
    ) -> dict[int, memoryview]:
        """Read and verify `need` slivers of `axis`, replacing failed or slow ones.

        Systematic primary slivers are read straight into their rows of `into` (R x C*s).
        A read left running (at its deadline, or cancelled once enough slivers arrived)
        may still write its row later: its index goes into `abandoned`. Slivers in `skip`
        (found damaged already) are not read.
        """
        n = meta.n
        k_sys = meta.params.R if axis == PRIMARY else meta.params.C

        def node_of(i: int) -> int:
            return meta.node_of_pair(i if axis == PRIMARY else n - 1 - i)

        def place(i: int) -> memoryview | None:
            if into is None or axis != PRIMARY or i >= k_sys:
                return None
            return memoryview(into[i])

        readable = self.nodes.readable()
        skip = skip or set()
        order = sorted(
            (i for i in range(n) if node_of(i) in readable and i not in skip),
            key=lambda i: (self.nodes.rank(node_of(i)), i >= k_sys, i),
        )
        got: dict[int, memoryview] = {}
        cursor = 0

        async with trio.open_nursery() as nursery:

            def launch() -> None:
                nonlocal cursor
                if cursor < len(order) and len(got) < need:
                    nursery.start_soon(attempt, order[cursor])
                    cursor += 1

            async def attempt(i: int) -> None:
                finished = trio.Event()

                async def hedge() -> None:
                    with trio.move_on_after(self._hedge_delay(node_of(i))):
                        await finished.wait()
                        return
                    launch()

                nursery.start_soon(hedge)
                t0 = trio.current_time()
                try:
                    got[i] = await self._read_sliver(meta, axis, i, place(i))
                except _BadSliver as exc:
                    if exc.abandoned and abandoned is not None:
                        abandoned.add(i)
                    log.debug(
                        "blob %s: %s sliver %d unusable: %s", meta.blob_id.hex()[:16], axis, i, exc
                    )
                    launch()
                except trio.Cancelled:
                    if abandoned is not None:
                        abandoned.add(i)
                    if trio.current_time() - t0 > self._hedge_delay(node_of(i)):
                        self.nodes.set_state(
                            node_of(i), NodeState.SUSPECT, "slower than the hedge delay"
                        )
                    raise
                finally:
                    finished.set()
                if len(got) >= need:
                    nursery.cancel_scope.cancel()

            for _ in range(need):
                launch()
        return got

    async def _read_batched(
        self, meta: BlobMetadata, out: np.ndarray
    ) -> tuple[dict[int, memoryview] | None, bool, set[int]]:
        """The usual path: R primaries read by one worker thread (NodeSet.read_batch) and
        verified there, the systematic ones straight into their rows of `out`. Those
        are the ones read while their nodes are up; a parity primary stands in for each
        that is not (a degraded read, decoded by the caller).

        Returns (slivers, spoiled, damaged). Slivers is None when the batch did not run
        (a chosen node suspect, or not local) or a read failed, found damage, or overran
        the deadline; the caller then gathers them sliver by sliver, with hedging, except
        the damaged ones (already reported). Spoiled: the batch's thread was left behind
        and may still write into `out`.
        """
        hsize = header_size(meta.n)
        size = meta.params.C * meta.symbol_size
        readable = self.nodes.readable()
        chosen = sorted(
            (i for i in range(meta.n) if meta.node_of_pair(i) in readable),
            key=lambda i: (self.nodes.rank(meta.node_of_pair(i)), i >= meta.params.R, i),
        )[: meta.params.R]
        found: dict[int, Header] = {}
        damaged: dict[int, str] = {}
        rows: dict[int, memoryview] = {}
        reads: list[tuple[int, str, int, tuple[memoryview, ...], Callable[[int], None]]] = []
        for i in chosen:
            node = meta.node_of_pair(i)
            key = sliver_key(meta.blob_id, i)
            cached = self._cached_header(meta.blob_id, i)
            buf = out[i] if i < meta.params.R else np.empty(size, dtype=np.uint8)
            rows[i] = row = buf.data
            head_buf = bytearray(0 if cached else hsize)
            check = _batch_check(
                meta, i, f"node {node} {key}", cached, head_buf, row, found, damaged
            )
            pieces = (row,) if cached else (memoryview(head_buf), row)
            reads.append((node, key, hsize if cached else 0, pieces, check))
        # As long as the careful path would wait for each in turn before asking another.
        deadline = sum(self._hedge_delay(node) for node, *_ in reads)
        outcomes = await self.nodes.read_batch(reads, deadline)
        if outcomes is None:
            return None, False, set()
        # Copies: a thread left behind may still add to them.
        found, damaged = dict(found), dict(damaged)
        for i, why in damaged.items():
            self._headers.pop((meta.blob_id, i), None)
            self._bad(meta.blob_id, i, meta.node_of_pair(i), why)
        if len(found) < meta.params.R:
            # Every read done and checked writes nothing more; one not seen done might.
            return None, len(outcomes) < len(reads), set(damaged)
        for head in found.values():
            self._remember(head)
        self.stats.extra["batched_gets"] = self.stats.extra.get("batched_gets", 0) + 1
        return rows, False, set()

    async def whole_files(self, blobs: dict[bytes, bytes]) -> dict[bytes, set[int]]:
        """For each blob (id -> metadata), the readable nodes that hold its sliver file
        at its full size. Only sizes are looked at, a node's keys SIZES_AT_ONCE to a
        call: a blob that was never flushed before a crash of every node has too few.
        A node that fails holds none, as far as this can tell. Raises StorageUnavailable
        for damaged metadata."""
        wanted: dict[int, list[tuple[str, bytes, int]]] = {}  # node -> (key, blob, size)
        for blob_id, meta in blobs.items():
            m = self.metadata(blob_id, meta)
            size = file_size(m)
            for pair in range(m.n):
                wanted.setdefault(m.node_of_pair(pair), []).append(
                    (sliver_key(blob_id, pair), blob_id, size)
                )
        whole: dict[bytes, set[int]] = {blob_id: set() for blob_id in blobs}

        async def node(i: int, files: list[tuple[str, bytes, int]]) -> None:
            for at in range(0, len(files), SIZES_AT_ONCE):
                chunk = files[at : at + SIZES_AT_ONCE]
                keys = [key for key, _, _ in chunk]

                def ask(st: NodeStore, keys: list[str] = keys) -> Awaitable[dict[str, int]]:
                    return st.sizes(keys)

                try:
                    got = await self.nodes.call(i, ask)
                except NodeError:
                    return
                for key, blob_id, size in chunk:
                    if got.get(key) == size:
                        whole[blob_id].add(i)

        async with trio.open_nursery() as nursery:
            for i in sorted(self.nodes.readable() & wanted.keys()):
                nursery.start_soon(node, i, wanted[i])
        return whole

    async def get_blob(self, blob_id: bytes, meta: bytes | BlobMetadata) -> memoryview:
        """The whole blob (a read-only view), every byte verified. Raises StorageUnavailable.

        Healthy systematic slivers are read by the kernel straight into the blob's buffer:
        no copy and no arithmetic. Callers asking for a blob already being read share that
        read (range reads falling back to the whole blob at once would each hold a copy).
        """
        parsed = self.metadata(blob_id, meta)
        shared = self._whole_gets.get(blob_id)
        if shared is not None:
            await shared.done.wait()
            if shared.result is not None:
                return shared.result
            # It failed; nodes may have come back since: try again, on our own.
        shared = _SharedGet()
        self._whole_gets[blob_id] = shared
        try:
            shared.result = await self._get_blob(parsed)
            return shared.result
        finally:
            if self._whole_gets.get(blob_id) is shared:
                del self._whole_gets[blob_id]
            shared.done.set()

    async def _get_blob(self, parsed: BlobMetadata) -> memoryview:
        blob_id = parsed.blob_id
        p = parsed.params
        began = trio.current_time()
        # Uninitialised: every byte is read or decoded into it. The heap (walrusfs.tuning)
        # recycles these buffers, so they cost no page faults.
        out = np.empty((p.R, p.C * parsed.symbol_size), dtype=np.uint8)
        abandoned: set[int] = set()
        primaries, spoiled, damaged = await self._read_batched(parsed, out)
        if primaries is None:
            if spoiled:
                out = np.empty_like(out)  # the batch's thread, left behind, may write the old one
            primaries = await self._gather(parsed, PRIMARY, p.R, out, abandoned, skip=damaged)
        decode: Callable[..., object] = decode_primaries
        slivers = primaries
        if len(primaries) < p.R:
            secondaries = await self._gather(parsed, SECONDARY, p.C)
            if len(secondaries) < p.C:
                # Nodes taken as down may be back since their last probe: if so, once more.
                tried = self.nodes.readable()
                await self.nodes.revive(began)
                if self.nodes.readable() - tried:
                    out = np.empty_like(out)  # threads of the first tries may write the old
                    primaries = await self._gather(
                        parsed, PRIMARY, p.R, out, abandoned, skip=damaged
                    )
                    if len(primaries) < p.R:
                        secondaries = await self._gather(parsed, SECONDARY, p.C)
            if len(primaries) >= p.R:
                slivers = primaries
            elif len(secondaries) >= p.C:
                decode, slivers = decode_secondaries, secondaries
            else:
                self.stats.failed_gets += 1
                raise StorageUnavailable(
                    f"blob {blob_id.hex()[:16]}: only {len(primaries)} of {p.R} primary and "
                    f"{len(secondaries)} of {p.C} secondary slivers readable"
                )
        degraded = decode is not decode_primaries or any(i >= p.R for i in slivers)
        if degraded:
            self.stats.degraded_reads += 1
        # A thread left behind may still write its row of `out`: then decode into a new
        # buffer (the finished rows are copied over, they no longer change).
        target = np.empty_like(out) if abandoned else out
        if degraded or target is not out:

            def assemble() -> None:
                decode(parsed, slivers, target.reshape(-1).data)

            await trio.to_thread.run_sync(assemble, limiter=self._cpu_limiter)
        self.stats.gets += 1
        self.stats.get_bytes += parsed.length
        return target.reshape(-1).data.toreadonly()[: parsed.length]

    async def get_range(
        self, blob_id: bytes, meta: bytes | BlobMetadata, offset: int, length: int
    ) -> bytes:
        """Bytes [offset, offset+length) of a blob (clipped to it), verified.

        Reads only the symbols holding the range. Where a row's node is not healthy, or
        its read fails or is slow, each of its symbols is read from its other copy:
        symbol (i, j) of the blob is also symbol i of secondary sliver j, held by another
        pair (see `_from_columns`). Only when that fails too does it fall back to get_blob
        (all of the blob, decoded). Raises StorageUnavailable.
        """
        parsed = self.metadata(blob_id, meta)
        if offset >= parsed.length or length <= 0:
            return b""
        if length * 2 >= parsed.length:
            blob = await self.get_blob(blob_id, parsed)
            return bytes(blob[offset : offset + length])
        pieces = range_plan(parsed, offset, length)
        parts: list[bytes] = [b""] * len(pieces)
        s, hsize = parsed.symbol_size, header_size(parsed.n)

        async def piece(k: int) -> None:
            pc = pieces[k]
            syms = pc.symbols(s)
            base = syms.start * s
            raw: bytes | None = None
            # A row slow to answer (a node hanging, not yet taken as down) is hedged with
            # the copies too, or every range of its rows would wait for the fallback.
            with trio.move_on_after(self._hedge_delay(parsed.node_of_pair(pc.sliver))):
                with contextlib.suppress(_BadSliver):
                    raw = await row_symbols(pc, syms)
            if raw is None:
                raw = await self._from_columns(parsed, pc.sliver, syms)
            parts[k] = raw[pc.start - base : pc.stop - base]

        async def row_symbols(pc: RangePiece, syms: range) -> bytes:
            node = parsed.node_of_pair(pc.sliver)
            if self.nodes.rank(node) != 0:
                raise _BadSliver("node not healthy")
            key = sliver_key(blob_id, pc.sliver)
            try:
                head = await self._header(parsed, pc.sliver, node)

                def check(raw: bytes) -> None:
                    if len(raw) != len(syms) * s:
                        raise SliverFileError(f"node {node} {key}: sliver file truncated")
                    _verify_symbols(
                        parsed, PRIMARY, pc.sliver, head.primary_leaves, memoryview(raw), syms.start
                    )

                raw = await self.nodes.call(
                    node, lambda st: st.get(key, hsize + syms.start * s, len(syms) * s, check=check)
                )
            except NodeError as exc:
                raise _BadSliver(str(exc)) from exc
            except (SliverFileError, CodecError) as exc:
                self._bad(blob_id, pc.sliver, node, str(exc))
                raise _BadSliver(str(exc)) from exc
            return raw

        fallback = False
        try:
            with trio.move_on_after(self.hedge_after * 4) as slow:
                async with trio.open_nursery() as nursery:
                    for k in range(len(pieces)):
                        nursery.start_soon(piece, k)
            fallback = slow.cancelled_caught
        except* _BadSliver:
            fallback = True
        if fallback:
            blob = await self.get_blob(blob_id, parsed)
            return bytes(blob[offset : offset + length])
        self.stats.gets += 1
        self.stats.get_bytes += sum(len(x) for x in parts)
        return b"".join(parts)

    async def _from_columns(self, meta: BlobMetadata, row: int, syms: range) -> bytes:
        """Symbols `syms` of systematic row `row`, each read from the secondary sliver of
        its column (symbol `row` of column j), verified against that sliver's leaves: a
        degraded range read without decoding. Where that copy is out of reach too (its
        pair's node unhealthy, or the row's own pair), the symbol is decoded from its
        column (`_decoded_symbol`). Raises _BadSliver if even that fails."""
        n = meta.n
        out: list[bytes] = [b""] * len(syms)

        async def one(k: int, column: int) -> None:
            try:
                out[k] = await copy(column)
            except _BadSliver:
                out[k] = await self._decoded_symbol(meta, row, column)

        async def copy(column: int) -> bytes:
            node = meta.node_of_pair(n - 1 - column)
            if n - 1 - column == row or self.nodes.rank(node) != 0:
                raise _BadSliver(f"no healthy other copy of symbol ({row}, {column})")
            return await self._symbol(meta, SECONDARY, column, row)

        async with trio.open_nursery() as nursery:
            for k, column in enumerate(syms):
                nursery.start_soon(one, k, column)
        self.stats.degraded_reads += 1
        return b"".join(out)

    async def _symbol(self, meta: BlobMetadata, axis: str, index: int, position: int) -> bytes:
        """Symbol `position` of sliver (`axis`, `index`), from its pair's node, verified
        against the sliver's leaves. Raises _BadSliver (damage is also reported)."""
        s, n = meta.symbol_size, meta.n
        pair = index if axis == PRIMARY else n - 1 - index
        node = meta.node_of_pair(pair)
        key = sliver_key(meta.blob_id, pair)
        at = header_size(n) + (position if axis == PRIMARY else meta.params.C + position) * s
        try:
            head = await self._header(meta, pair, node)
            leaves = head.primary_leaves if axis == PRIMARY else head.secondary_leaves

            def check(raw: bytes) -> None:
                if len(raw) != s:
                    raise SliverFileError(f"node {node} {key}: sliver file truncated")
                verify_symbol(meta, axis, index, leaves, position, raw)

            return await self.nodes.call(node, lambda st: st.get(key, at, s, check=check))
        except NodeError as exc:
            raise _BadSliver(str(exc)) from exc
        except (SliverFileError, CodecError) as exc:
            self._bad(meta.blob_id, pair, node, str(exc))
            raise _BadSliver(str(exc)) from exc

    async def _decoded_symbol(self, meta: BlobMetadata, row: int, column: int) -> bytes:
        """Symbol (row, column) when both its copies are out of reach: symbol `column` of
        R healthy primary slivers (any rows) rebuild its column (secondary sliver
        `column`, checked against its root). R symbols read, not the blob. Raises
        _BadSliver."""
        s, p, n = meta.symbol_size, meta.params, meta.n
        got: dict[int, bytes] = {}
        rows = [k for k in range(n) if k != row and self.nodes.rank(meta.node_of_pair(k)) == 0]

        async def one(k: int) -> None:
            with contextlib.suppress(_BadSliver):
                got[k] = await self._symbol(meta, PRIMARY, k, column)

        for batch in (rows[: p.R], rows[p.R :]):  # R first; the others if some fail
            if len(got) < p.R:
                async with trio.open_nursery() as nursery:
                    for k in batch:
                        nursery.start_soon(one, k)
        if len(got) < p.R:
            raise _BadSliver(f"column {column}: only {len(got)} healthy rows, need {p.R}")
        try:
            col = await trio.to_thread.run_sync(
                rebuild, meta, SECONDARY, column, got, limiter=self._cpu_limiter
            )
        except CodecError as exc:
            raise _BadSliver(str(exc)) from exc
        return bytes(col.symbol(row, s))
