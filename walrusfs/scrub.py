"""Scrub: a rolling check of every sliver file on every node against its commitments.

For each node, the scrubber lists the sliver files and compares them with what the node
should hold (each referenced blob's pair `meta.pair_of_node(node)`), then reads every
expected file whole and verifies it in the read's worker thread: the header against the
blob id and the volume's metadata, the exact size, both leaf sets against their roots and
every stored symbol against its leaf (`verify_file`). Corrupt and missing pairs go to
repair (RepairService.note_bad); the node's corrupt counter shows in status.

Orphans are sliver files of blobs nothing references (neither the metadata database nor
the current or previous checkpoint), or pairs lying on the wrong node. A put writes its
files before the metadata names the blob, so a young orphan may be a blob being written:
an orphan is removed only once it has been seen for `grace` seconds and is still
unreferenced when removal comes (re-checked then). The node store exposes no file times,
so "seen for" counts from the first pass that saw it (a restart starts the clock again).

Reads are paced by a token bucket (`rate` bytes/s over all nodes, `busy_rate` while the
blob store serves users) and one call per node at a time, so user I/O keeps the node's
other threads. `sweep_node` is also what fsck
uses, unpaced.

Must not import pyfuse3. Runs in trio tasks (not thread-safe); verification runs in the
node stores' worker threads.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import trio

from backends import KeyNotFound, NodeError, NodeStore
from codec import BlobMetadata, CodecError, VerificationError, verify_sliver
from walrusfs.catalog import BlobRef, BlobSource, list_slivers, missing_on
from walrusfs.healer import RepairService
from walrusfs.nodeset import NodeSet
from walrusfs.repair import RateLimit, was_cancelled
from walrusfs.segment import PREFIX as JOURNAL
from walrusfs.sliverfile import PREFIX as SLIVERS
from walrusfs.sliverfile import (
    SliverFileError,
    file_size,
    header_size,
    parse_header,
    parse_key,
    sliver_key,
    slivers,
)
from walrusfs.volume import Volume

log = logging.getLogger(__name__)

MiB = 1 << 20
DEFAULT_RATE = 32 * MiB  # bytes verified per second over all nodes ...
DEFAULT_BUSY_RATE = 8 * MiB  # ... and while the blob store serves users
DEFAULT_GRACE = 24 * 3600.0  # seconds an orphan is seen before it is removed


class SliverCorrupt(VerificationError):
    """A sliver file with a sound header and size whose slivers do not all verify;
    `intact` names the axes (PRIMARY, SECONDARY) of those that do."""

    def __init__(self, cause: VerificationError, intact: tuple[str, ...]) -> None:
        super().__init__(str(cause), cause.sliver)
        self.intact = intact


def verify_file(meta: BlobMetadata, pair: int, raw: bytes, where: str) -> None:
    """Check a whole sliver file against the volume's metadata of its blob.

    Raises SliverFileError (header, size) or SliverCorrupt (a sliver's bytes; both are
    checked, since a file torn by a power loss often keeps one whole: decoding can use it).
    """
    head = parse_header(raw[: header_size(meta.n)], meta.blob_id, pair, where)
    if head.meta != meta:
        raise SliverFileError(f"{where}: metadata differs from the volume's")
    if len(raw) != head.file_size:
        raise SliverFileError(f"{where}: {len(raw)} bytes, expected {head.file_size}")
    first: VerificationError | None = None
    intact: list[str] = []
    for sliver in slivers(head, raw):
        try:
            verify_sliver(meta, sliver)
            intact.append(sliver.axis)
        except VerificationError as exc:
            first = first or exc
    if first is not None:
        raise SliverCorrupt(first, tuple(intact))


@dataclass(frozen=True)
class Finding:
    """One problem with one sliver file; `kind` is corrupt, missing, unreadable or orphan."""

    node: int
    blob_id: bytes
    pair: int
    kind: str
    detail: str = ""
    intact: tuple[str, ...] = ()  # of a corrupt file: the slivers in it that verify

    @property
    def key(self) -> str:
        return sliver_key(self.blob_id, self.pair)


@dataclass
class NodeSweep:
    """What one node holds: verified blobs, problems, orphans; `complete` if it was all read."""

    node: int
    verified: set[bytes] = field(default_factory=set)
    findings: list[Finding] = field(default_factory=list)
    orphans: list[Finding] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    complete: bool = False
    error: str = ""


async def _check_file(nodes: NodeSet, node: int, meta: BlobMetadata, pair: int) -> None:
    """Read one sliver file whole and verify it in the read's thread."""
    key = sliver_key(meta.blob_id, pair)

    def check(raw: bytes) -> None:
        verify_file(meta, pair, raw, f"node {node} {key}")

    await nodes.call(node, lambda st: st.get(key, check=check))


async def _verify(
    nodes: NodeSet, node: int, meta: BlobMetadata, pair: int, if_missing: str
) -> Finding | None:
    """Check one sliver file: None if it verifies, else what is wrong with it (a corrupt
    one also counts against its node). Raises NodeError."""
    try:
        await _check_file(nodes, node, meta, pair)
    except KeyNotFound:
        return Finding(node, meta.blob_id, pair, "missing", if_missing)
    except (SliverFileError, CodecError) as exc:
        nodes.note_corrupt(node, str(exc))
        intact = exc.intact if isinstance(exc, SliverCorrupt) else ()
        return Finding(node, meta.blob_id, pair, "corrupt", str(exc), intact)
    return None


async def _delete(nodes: NodeSet, node: int, key: str) -> None:
    await nodes.call(node, lambda st: st.delete(key))


def _classify(
    refs: dict[bytes, BlobRef], protected: set[bytes], node: int, keys: list[str]
) -> tuple[set[tuple[bytes, int]], list[Finding], list[tuple[bytes, int]]]:
    """A node's listing against what it should hold: (expected and present, orphans,
    missing). Plain CPU work over every blob: run it in a worker thread."""
    present: set[tuple[bytes, int]] = set()
    orphans = []
    for key in keys:
        parsed = parse_key(key)
        if parsed is None:
            continue
        blob_id, pair = parsed
        ref = refs.get(blob_id)
        if ref is not None and ref.meta.pair_of_node(node) == pair:
            present.add(parsed)
        elif blob_id not in protected or ref is not None:
            why = "referenced by nothing" if ref is None else "pair belongs on another node"
            orphans.append(Finding(node, blob_id, pair, "orphan", why))
    missing = missing_on(refs, node, present)
    return present, orphans, missing


async def sweep_node(
    nodes: NodeSet,
    node: int,
    refs: dict[bytes, BlobRef],
    protected: set[bytes],
    *,
    limit: RateLimit | None = None,
    progress: Callable[[int], None] | None = None,
) -> NodeSweep:
    """List and verify every sliver file node `node` should hold; never raises NodeError.

    `progress(bytes)` is called after each file. A node that fails mid-way ends the
    sweep with `complete` False and `error` set.
    """
    out = NodeSweep(node)
    try:
        keys = await list_slivers(nodes, node)
    except NodeError as exc:
        out.error = str(exc)
        return out
    present, orphans, missing = await trio.to_thread.run_sync(
        _classify, refs, protected, node, keys
    )
    out.orphans = orphans
    out.findings = [Finding(node, b, p, "missing", "no sliver file") for b, p in missing]
    for blob_id, pair in sorted(present):
        meta = refs[blob_id].meta
        size = file_size(meta)
        if limit is not None:
            await limit.take(size)
        try:
            finding = await _verify(nodes, node, meta, pair, "deleted meanwhile")
        except NodeError as exc:
            out.error = str(exc)
            return out
        if finding is None:
            out.verified.add(blob_id)
        else:
            out.findings.append(finding)
        out.files += 1
        out.bytes += size
        if progress is not None:
            progress(size)
    out.complete = True
    return out


# A temp file this old cannot belong to a write still under way (node calls have deadlines
# of seconds): it is what a crash or an abandoned write left behind.
STALE_TEMP_S = 3600.0


async def remove_stale_temps(nodes: NodeSet, node: int, older_than: float = STALE_TEMP_S) -> int:
    """Remove temp files older than `older_than` s on `node`, a key directory at a time.

    Never raises NodeError.

    Per fan-out directory, like the listing: one walk of a big node could outlast the
    node deadline. Returns how many went.
    """
    removed = 0
    prefixes = [("", False), (JOURNAL, True)] + [
        (f"{SLIVERS}/{top:02x}", True) for top in range(256)
    ]
    try:
        for prefix, recursive in prefixes:
            removed += await nodes.call(
                node, functools.partial(_cleanup, older_than, prefix, recursive)
            )
    except NodeError as exc:
        log.debug("stale temp files on node %d left for the next pass: %s", node, exc)
    return removed


async def _cleanup(older_than: float, prefix: str, recursive: bool, store: NodeStore) -> int:
    return await store.cleanup_temps(older_than, prefix, recursive=recursive)


@dataclass
class ScrubReport:
    """The end of a scrub pass."""

    started: float
    duration: float = 0.0
    files: int = 0
    bytes: int = 0
    corrupt: list[str] = field(default_factory=list)  # "node i: key: why"
    missing: int = 0
    orphans: int = 0
    orphans_removed: int = 0
    temps_removed: int = 0  # stale temp files of writes that never finished
    incomplete: dict[int, str] = field(default_factory=dict)  # node -> why it was not done
    cancelled: bool = False

    def summary(self) -> str:
        text = (
            f"scrub pass: {self.files} sliver files ({self.bytes / MiB:.1f} MiB) verified in "
            f"{self.duration:.1f}s: {len(self.corrupt)} corrupt, {self.missing} missing, "
            f"{self.orphans} orphans ({self.orphans_removed} removed)"
        )
        if self.temps_removed:
            text += f", {self.temps_removed} stale temp files removed"
        if self.incomplete:
            text += f"; nodes not scrubbed: {sorted(self.incomplete)}"
        return text + ("; cancelled" if self.cancelled else "")

    def to_dict(self) -> dict[str, object]:
        return {
            "started": self.started,
            "duration": round(self.duration, 3),
            "files": self.files,
            "bytes": self.bytes,
            "corrupt": list(self.corrupt),
            "missing": self.missing,
            "orphans": self.orphans,
            "orphans_removed": self.orphans_removed,
            "temps_removed": self.temps_removed,
            "incomplete": {str(k): v for k, v in self.incomplete.items()},
            "cancelled": self.cancelled,
        }


class Scrubber:
    """Rolling scrub of a volume; hands what it finds to `repair` (if given)."""

    def __init__(
        self,
        vol: Volume,
        blobs: BlobSource,
        repair: RepairService | None = None,
        *,
        rate: float | None = DEFAULT_RATE,
        busy_rate: float | None = DEFAULT_BUSY_RATE,
        grace: float = DEFAULT_GRACE,
        rest: float = 3600.0,
    ) -> None:
        self.vol = vol
        self.nodes = vol.nodes
        self.blobs = blobs
        self.repair = repair
        stats = vol.blobs.stats
        self.limit = RateLimit(
            rate, busy_rate=busy_rate, activity=lambda: stats.gets + stats.puts + stats.failed_gets
        )
        self.grace = grace
        self.rest = rest
        self.last_report: ScrubReport | None = None
        self.last_complete: dict[int, float] = {}  # node -> wall time its last sweep ended
        self.errors_found = 0
        self.passes = 0
        self._seen_orphans: dict[tuple[int, bytes, int], float] = {}
        self.after_crash_left = 0  # sliver files check_blobs has still to verify
        self._ended: float | None = None  # trio time the last pass ended
        self._pass_bytes = 0
        self._pass_total = 0
        self._running = False
        self._pass_lock = trio.Lock()
        self._wake = trio.Event()

    def trigger(self) -> None:
        """Start the next pass now (run_forever)."""
        self._wake.set()

    async def scrub_pass(self) -> ScrubReport:
        """Verify every node once; remove orphans seen for longer than `grace`.

        One pass at a time: a call while one runs waits for it, then runs its own.
        """
        async with self._pass_lock:
            return await self._scrub_pass()

    async def _scrub_pass(self) -> ScrubReport:
        report = ScrubReport(started=time.time())
        t0 = trio.current_time()
        self._running = True
        try:
            refs = await self.blobs.load()
            protected = self.blobs.protected()
            readable = sorted(self.nodes.readable())
            for i in range(self.vol.params.n):
                if i not in readable:
                    report.incomplete[i] = f"node is {self.nodes.state(i).value}"
            self._pass_bytes = 0
            self._pass_total = sum(file_size(r.meta) for r in refs.values()) * len(readable)
            sweeps: list[NodeSweep] = []

            def progress(nbytes: int) -> None:
                self._pass_bytes += nbytes

            async def one(i: int) -> None:
                sweeps.append(
                    await sweep_node(
                        self.nodes, i, refs, protected, limit=self.limit, progress=progress
                    )
                )
                removed = await remove_stale_temps(self.nodes, i)
                report.temps_removed += removed  # not `+= await`: other nodes run meanwhile

            async with trio.open_nursery() as nursery:
                for i in readable:
                    nursery.start_soon(one, i)
            for sw in sorted(sweeps, key=lambda s: s.node):
                await self._absorb(sw, report)
        except BaseException as exc:
            report.cancelled = was_cancelled(exc)
            raise
        finally:
            self._running = False
            report.duration = trio.current_time() - t0
            self._ended = trio.current_time()
            self.last_report = report
            self.passes += 1
            if report.corrupt or report.missing or report.orphans_removed:
                log.warning("%s", report.summary())
        return report

    async def check_blobs(
        self, blobs: Mapping[bytes, bytes], skip: Mapping[bytes, Collection[int]]
    ) -> list[Finding]:
        """Verify the sliver files of `blobs` (id -> metadata) on every readable node but
        those `skip` names for a blob; hand what is corrupt or missing to repair, and
        return it. A node that fails is left to the rolling passes.

        For the blobs a crash recovery kept (Recovered.tail): reading one back verified
        R primary slivers, which tells that its data survived, not that every file did.
        A filesystem may keep a file's size and lose its pages, so the first pass would
        otherwise be the first to notice, hours later on a large volume. Not paced: the
        commit interval bounds those blobs to seconds of writes, and each node is read
        one file at a time, which leaves its other threads to the users.
        """
        todo = sorted(
            (blob_id, self.vol.blobs.metadata(blob_id, meta)) for blob_id, meta in blobs.items()
        )
        readable = sorted(self.nodes.readable())
        mine = {i: [m for b, m in todo if i not in skip.get(b, ())] for i in readable}
        self.after_crash_left += sum(map(len, mine.values()))
        findings: list[Finding] = []

        async def one(node: int) -> None:
            files, done = mine[node], 0
            try:
                for meta in files:
                    try:
                        finding = await _verify(
                            self.nodes, node, meta, meta.pair_of_node(node), "no sliver file"
                        )
                    except NodeError:
                        return
                    done += 1
                    self.after_crash_left -= 1
                    if finding is not None and await self._losses([finding]):
                        # To repair at once: status shows it in hand.
                        findings.append(finding)
                        self.errors_found += 1
                        if self.repair is not None:
                            self.repair.note_bad(
                                finding.blob_id,
                                finding.pair,
                                f"{finding.kind} (after a crash): {finding.detail}",
                            )
            finally:
                self.after_crash_left -= len(files) - done  # left to the rolling passes

        async with trio.open_nursery() as nursery:
            for i in readable:
                nursery.start_soon(one, i)
        if findings:
            log.warning(
                "%d sliver files of blobs written just before a crash are corrupt or "
                "missing: repairing",
                len(findings),
            )
        return findings

    async def _losses(self, findings: list[Finding]) -> list[Finding]:
        """The findings that are losses: not a missing file of a blob freed since the
        blobs were listed (a delete drops the metadata first, then the sliver files)."""
        gone = {fd.blob_id for fd in findings if fd.kind == "missing"}
        still = await self.blobs.lookup(gone) if gone else {}
        return [fd for fd in findings if fd.kind != "missing" or fd.blob_id in still]

    async def _absorb(self, sw: NodeSweep, report: ScrubReport) -> None:
        report.files += sw.files
        report.bytes += sw.bytes
        if sw.complete:
            self.last_complete[sw.node] = time.time()
        else:
            report.incomplete[sw.node] = sw.error
        for fd in await self._losses(sw.findings):
            if fd.kind == "corrupt":
                report.corrupt.append(f"node {fd.node}: {fd.key}: {fd.detail}")
            else:
                report.missing += 1
            self.errors_found += 1
            if self.repair is not None:
                self.repair.note_bad(fd.blob_id, fd.pair, f"{fd.kind} (scrub): {fd.detail}")
        report.orphans += len(sw.orphans)
        now = trio.current_time()
        seen_now = {(o.node, o.blob_id, o.pair) for o in sw.orphans}
        for k in [k for k in self._seen_orphans if k[0] == sw.node and k not in seen_now]:
            del self._seen_orphans[k]
        old = []
        for o in sw.orphans:
            first = self._seen_orphans.setdefault((o.node, o.blob_id, o.pair), now)
            if now - first >= self.grace:
                old.append(o)
        if not old:
            return
        # Re-check: a blob written since the pass began is referenced by now.
        still = await self.blobs.lookup({o.blob_id for o in old})
        protected = self.blobs.protected()
        for o in old:
            ref = still.get(o.blob_id)
            if o.blob_id in protected or (
                ref is not None and ref.meta.pair_of_node(o.node) == o.pair
            ):
                continue
            try:
                await _delete(self.nodes, o.node, o.key)
            except NodeError as exc:
                log.debug("orphan %s on node %d not removed: %s", o.key, o.node, exc)
                continue
            self._seen_orphans.pop((o.node, o.blob_id, o.pair), None)
            report.orphans_removed += 1
            log.info("node %d: removed orphan sliver file %s (%s)", o.node, o.key, o.detail)

    async def run_forever(
        self,
        *,
        first_delay: float = 60.0,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Background task for the mount's nursery: a pass, then `rest` seconds (or a
        trigger), and again; paced by `rate`. Stops by cancellation.

        The rest counts from the end of the last pass of any origin: a pass asked for
        (`walrusfs scrub`) is not followed by another over the same files at once.
        """
        task_status.started()
        due = trio.current_time() + first_delay
        while True:
            with trio.move_on_at(due):
                await self._wake.wait()
            woken = self._wake.is_set()
            self._wake = trio.Event()
            if not woken:
                async with self._pass_lock:  # one under way: look again once it is over
                    pass
                if self._ended is not None and self._ended + self.rest > trio.current_time():
                    due = self._ended + self.rest
                    continue
            try:
                await self.scrub_pass()
            except Exception as exc:  # e.g. metadata unreadable: try again after the rest
                log.warning("scrub pass failed: %s", exc)
            due = trio.current_time() + self.rest

    def status(self) -> dict[str, object]:
        """For `walrusfs status`: progress of the running pass, last times, errors."""
        last = self.last_report
        return {
            "running": self._running,
            "progress": round(self._pass_bytes / self._pass_total, 4)
            if self._running and self._pass_total
            else None,
            "rate_limit": self.limit.rate,
            "last_complete": {str(k): v for k, v in sorted(self.last_complete.items())},
            "errors_found": self.errors_found,
            "orphans_pending": len(self._seen_orphans),
            "after_crash_left": self.after_crash_left,
            "passes": self.passes,
            "last_pass": None if last is None else last.to_dict(),
        }
