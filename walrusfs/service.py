"""A mounted volume, start to finish: open, lock, recover, serve, and stop cleanly.

`run_mount` is what `walrusfs mount` runs (in the foreground, or in the child process
it starts): it opens the volume, refuses to mount with more than f nodes unusable, takes
the mount lock, recovers the metadata from the nodes, serves the filesystem, and answers
`status` on a control socket; background repair and a rolling scrub run beside it. On unmount it flushes every file, syncs the journal
durably, writes a checkpoint and releases the lock, so `walrusfs umount` returning means
everything is stored.

close() returns once a file's blobs and the journal record naming them are on n-f nodes
(in their page caches: a crash of this process or machine loses nothing); fsync() also
makes the nodes flush to stable storage. A blob is deleted from the nodes only after the
change that freed it is on their stable storage (walrusfs.reclaim).

Only walrusfs.mount imports pyfuse3; this module stays importable without a mount.
Runs in trio tasks.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import trio

from codec import BlobMetadata
from walrusfs.blobstore import BlobStore
from walrusfs.catalog import Catalog
from walrusfs.control import (
    CommandError,
    clear_outcome,
    real_mountpoint,
    serve_control,
    write_outcome,
)
from walrusfs.errors import message_of
from walrusfs.filedata import DEFAULT_CACHE_BYTES, PACK_HEADER
from walrusfs.fs import Space, SpaceFn
from walrusfs.healer import RepairService, ReplaceError
from walrusfs.lock import MountLock
from walrusfs.metadata import ROOT_INODE
from walrusfs.metadata import usage as metadata_usage
from walrusfs.metastore import DEFAULT_COMMIT_S, MetaStore
from walrusfs.nodeset import Node, NodeState
from walrusfs.scrub import Scrubber
from walrusfs.volume import Volume, VolumeError, open_volume, placed

log = logging.getLogger(__name__)


class FsBlobs:
    """The blob store as the filesystem sees it (walrusfs.reclaim.BlobStoreProtocol)."""

    def __init__(self, blobs: BlobStore, metastore: MetaStore) -> None:
        self.blobs = blobs
        self.metastore = metastore
        self.missed: dict[bytes, tuple[int, ...]] = {}

    async def put_blob(
        self, data: bytes | bytearray | memoryview, *, durable: bool = False
    ) -> tuple[bytes, bytes]:
        # Usually into the nodes' page cache: close() needs n-f nodes to hold the data,
        # fsync() then flushes the nodes (MetaStore.sync(durable=True) runs syncfs on them).
        r = await self.blobs.put_blob(data, durable=durable)
        if r.missed:
            self.missed[r.blob_id] = r.missed  # for repair to fill in
        return r.blob_id, r.meta

    def blob_length(self, blob_id: bytes, meta: bytes) -> int:
        return self.blobs.metadata(blob_id, meta).length

    def read_unit(self, blob_id: bytes, meta: bytes) -> int:
        return self.blobs.metadata(blob_id, meta).symbol_size

    async def get_range(
        self, blob_id: bytes, meta: bytes, offset: int, length: int
    ) -> bytes | memoryview:
        if offset == 0 and length >= self.blobs.metadata(blob_id, meta).length:
            return await self.blobs.get_blob(blob_id, meta)  # whole block: no copy
        return await self.blobs.get_range(blob_id, meta, offset, length)

    async def settle(self) -> None:
        await self.metastore.sync(durable=True)

    async def delete_blob(self, blob_id: bytes, meta: bytes) -> None:
        # Called after settle() (walrusfs.reclaim): no state that can come back names it.
        self.missed.pop(blob_id, None)
        await self.blobs.delete_blob(blob_id, meta)


def space_of(vol: Volume) -> SpaceFn:
    """statfs numbers from the nodes' real free space, as of the last probe."""
    p = vol.params
    overhead = p.n * (p.R + p.C) / (p.R * p.C)
    quorum = p.n - p.f

    async def space() -> Space:
        # Every blob puts 1/n of its encoded bytes on each node, so a filesystem holding k
        # of the nodes takes k/n of them. Nodes sharing one disk (a demo, a test) must not
        # count its space k times.
        shared: dict[object, list[Node]] = {}
        for node in vol.nodes.nodes:
            if node.total:
                key = node.index if node.filesystem is None else ("fs", node.filesystem)
                shared.setdefault(key, []).append(node)
        if not shared:
            return Space(0, 0, overhead)
        # A node not probed yet (down since the mount) may share any of these filesystems:
        # count it in each, so that df errs low, never high.
        unknown = sum(1 for node in vol.nodes.nodes if not node.total)
        totals: list[int] = []
        frees: list[int] = []
        for group in shared.values():
            k = len(group) + unknown
            free = min(n.free or 0 for n in group)
            for node in group:
                totals.append((node.total or 0) * p.n // k)
                if node.state is not NodeState.DOWN:
                    frees.append(free * p.n // k)
        # Writes go on while n-f nodes take them (the others miss their pairs, left to
        # repair), so the (n-f)th roomiest node limits, not the fullest: a full node does
        # not make df say 0 while writes succeed, and df says 0 once they would fail.
        return Space(
            total_bytes=_nth_largest(totals, quorum),
            free_bytes=_nth_largest(frees, quorum) if len(frees) >= quorum else 0,
            overhead=overhead,
        )

    return space


def _nth_largest(values: list[int], n: int) -> int:
    """The n-th largest value; with fewer values, the smallest (0 if none)."""
    ranked = sorted(values, reverse=True)
    return ranked[min(n, len(ranked)) - 1] if ranked else 0


# A mount goes on this long after n-f nodes showed their identity (or four times the
# slowest of them) without the nodes still silent: a hung NFS node then costs a mount ~2 s,
# not --node-timeout. A node that is merely slow is probed again at once, and comes up.
MOUNT_STRAGGLER_GRACE = 2.0


@dataclass
class MountOptions:
    node_dir: str
    mountpoint: str
    state_dir: str
    overrides: dict[int, str]
    allow_other: bool = False
    node_timeout: float = 10.0
    cache_bytes: int = DEFAULT_CACHE_BYTES
    commit_s: float = DEFAULT_COMMIT_S  # see MetaStore.run_background


class Mounted:
    """The live parts of a mount: answers `status` and the control commands."""

    def __init__(
        self,
        vol: Volume,
        metastore: MetaStore,
        fs: object,
        blobs: FsBlobs,
        opts: MountOptions,
        repair: RepairService,
        scrubber: Scrubber,
    ) -> None:
        self.vol = vol
        self.metastore = metastore
        self.fs = fs
        self.blobs = blobs
        self.opts = opts
        self.repair = repair
        self.scrubber = scrubber

    def health(self) -> dict[str, object]:
        """Blobs by how many more node losses each survives (it needs R healthy pairs).

        Each node holds one pair of every blob, so a blob's healthy pairs are n minus the
        nodes that are down or missed its pair; slivers found corrupt but not yet rebuilt
        are in repair's queue ("hinted_blobs" of `repair`).
        """
        p = self.vol.params
        down = {n.index for n in self.vol.nodes.nodes if n.state is NodeState.DOWN}
        survives: Counter[int] = Counter()
        for nodes in self.blobs.missed.values():
            survives[p.n - len(down | set(nodes)) - p.R] += 1
        survives[p.n - len(down) - p.R] += max(
            0, self.metastore.metadata.blob_count() - len(self.blobs.missed)
        )
        return {
            "healthy": survives[p.n - p.R],
            "degraded": sum(c for k, c in survives.items() if 0 < k < p.n - p.R),
            "at_risk": survives[0],
            "unreadable": sum(c for k, c in survives.items() if k < 0),
            "survives": {str(k): c for k, c in sorted(survives.items()) if c},
        }

    async def usage(self) -> dict[str, int]:
        """Bytes held and stored (walrusfs.metadata.usage), and about what the nodes hold
        for them: each blob takes n sliver pairs of R + C symbols, R x C symbols a blob."""
        md, p = self.metastore.metadata, self.vol.params
        got = await trio.to_thread.run_sync(
            metadata_usage, md.path, BlobMetadata.length_of, len(PACK_HEADER)
        )
        return {
            "file_bytes": got.file_bytes,
            "data_bytes": got.data_bytes,
            "blob_bytes": got.blob_bytes,
            "node_bytes": got.blob_bytes * p.n * (p.R + p.C) // (p.R * p.C),
            "pack_bytes": got.pack_bytes,
            "pack_dead_bytes": got.pack_dead_bytes,
        }

    async def status(self) -> dict[str, object]:
        vol, md = self.vol, self.metastore.metadata
        stats = vol.blobs.stats
        data = getattr(self.fs, "data", None)
        usage: dict[str, int] | None = None
        usage_error = ""
        try:
            usage = await self.usage()
        except Exception as exc:  # status is what one runs when things go wrong: answer
            log.warning("status: data usage not known: %s", exc)
            usage_error = message_of(exc)
        return {
            "mountpoint": self.opts.mountpoint,
            "pid": os.getpid(),
            "volume_id": vol.identity.volume_id,
            "n": vol.params.n,
            "f": vol.params.f,
            "blob_size": vol.identity.blob_size,
            "nodes": vol.nodes.snapshot(),
            "files": md.inode_count(),
            "blobs": md.blob_count(),
            "usage": usage,
            "usage_error": usage_error,
            "dirty_bytes": 0 if data is None else data.unsaved_bytes(),
            "read_cache": {"size": 0, "used": 0} if data is None else data.cache_usage(),
            "journal_lag": self.metastore.journal.lag,
            # Sessions since the last checkpoint that fitted on the nodes (see MetaStore).
            "checkpoint_carries": len(self.metastore.superblock.carry),
            # New data, names and xattrs get ENOSPC (see FileSystem's room_for_data).
            "out_of_room": vol.out_of_room(),
            "commit_s": self.opts.commit_s,
            "deletes_pending": 0 if data is None else data.deletes_pending,
            "degraded_blobs": len(self.blobs.missed),
            "health": self.health(),
            "repair": self.repair.status(),
            "scrub": self.scrubber.status(),
            "stats": {k: v for k, v in vars(stats).items() if k != "extra"},
        }

    def blobs_of(self, path: str) -> dict[str, object]:
        """The blobs holding a file's data, by its path inside the mount (for fault tools).

        Raises CommandError for a path that does not name a file.
        """
        md = self.metastore.metadata
        ino = ROOT_INODE
        for name in (p for p in path.split("/") if p):
            found = md.lookup(ino, os.fsencode(name))
            if found is None:
                raise CommandError(f"blobs-of: {path}: no such file in the mount")
            ino = found
        refs = [md.block(ino, i) for i in md.block_indexes(ino)]
        return {"inode": ino, "blobs": [r.blob_id.hex() for r in refs if r is not None]}

    async def handle(self, request: dict[str, object]) -> dict[str, object]:
        """One control command (see walrusfs.control). Raises CommandError."""
        cmd = request.get("cmd")
        if cmd == "status":
            return await self.status()
        if cmd == "repair":
            return (await self.repair.pass_once()).to_dict()
        if cmd == "scrub":
            return (await self.scrubber.scrub_pass()).to_dict()
        if cmd == "blobs-of":
            return self.blobs_of(str(request.get("path", "")))
        if cmd == "replace-node":
            try:
                index = int(str(request["index"]))
                new_dir = str(request["dir"])
                # In a thread, as every path lookup of this server's: a lookup that
                # reached the mount itself would wait for this very loop to answer it.
                await trio.to_thread.run_sync(
                    check_apart,
                    self.opts.mountpoint,
                    {"the new node directory": new_dir},
                    "choose a directory outside the mount",
                )
                warnings = await self.repair.replace_node(index, new_dir)
            except (KeyError, ValueError, ReplaceError, VolumeError) as exc:
                raise CommandError(f"replace-node: {exc}") from exc
            return {"warnings": warnings}
        raise CommandError(f"unknown command {cmd!r}")


def check_apart(
    mountpoint: str, dirs: dict[str, str], advice: str = "mount somewhere else"
) -> None:
    """Refuse a mountpoint that is, holds, or lies inside a directory the mount itself
    uses (`dirs`: a description of each -> its path); the error ends with `advice`.
    Mounted over, the directory would be hidden, and the server's own I/O to it would
    come back through its own mount: a deadlock. Paths are compared as written and with
    the mountpoint's symlinks resolved, without a stat of the mountpoint itself
    (real_mountpoint: once mounted, that stat would ask this server); node paths are not
    resolved, since a hung node would hang that. Blocking. Raises VolumeError.
    """
    mnts = {os.path.abspath(mountpoint), real_mountpoint(mountpoint)}
    for what, path in dirs.items():
        for mnt in mnts:
            how = placed(mnt, os.path.abspath(path))
            if how == "is":
                raise VolumeError(f"the mountpoint {mountpoint} is {what}; {advice}")
            if how == "holds":
                raise VolumeError(
                    f"{what} ({path}) is inside the mountpoint {mountpoint}: its I/O would "
                    f"come back through the mount itself; {advice}"
                )
            if how == "inside":
                raise VolumeError(
                    f"the mountpoint {mountpoint} is inside {what} ({path}); {advice}"
                )


def check_state_apart(state_dir: str, nodes: dict[str, str]) -> None:
    """Refuse a state directory that is, holds, or lies inside a node's directory: the
    node's loss, replacement or wipe would take this machine's working copy of the
    metadata with it, and its files would be foreign entries among the node's. Paths as
    written (resolving a hung node's would hang). Raises VolumeError."""
    state = os.path.abspath(state_dir)
    for what, path in nodes.items():
        how = placed(state, os.path.abspath(path))
        if how is not None:
            where = {"is": f"is {what}", "inside": f"is inside {what} ({path})"}.get(
                how, f"holds {what} ({path})"
            )
            raise VolumeError(
                f"the state directory {state_dir} {where}; give --state-dir a directory "
                "apart from the node directories"
            )


async def open_for_mount(opts: MountOptions) -> Volume:
    """Open the volume and refuse when more than f nodes are unusable, or when the
    mountpoint would cover a node or the state directory. Raises VolumeError."""
    vol = await open_volume(
        opts.node_dir,
        opts.overrides,
        node_timeout=opts.node_timeout,
        straggler_grace=min(MOUNT_STRAGGLER_GRACE, opts.node_timeout),
    )
    node_dirs = {f"node {n.index}'s directory": n.store.path for n in vol.nodes.nodes}
    await trio.to_thread.run_sync(
        check_apart, opts.mountpoint, node_dirs | {"the state directory": opts.state_dir}
    )
    check_state_apart(opts.state_dir, node_dirs)
    bad = [n for n in vol.nodes.nodes if n.state is NodeState.DOWN]
    if len(bad) > vol.params.f:
        lines = "\n".join(f"  node {n.index} ({n.store.path}): {n.reason}" for n in bad)
        raise VolumeError(
            f"{len(bad)} of {vol.params.n} nodes are unusable; at most f={vol.params.f} may be:\n{lines}"
        )
    for n in bad:
        log.warning("mounting without node %d (%s): %s", n.index, n.store.path, n.reason)
    return vol


async def run_mount(opts: MountOptions, ready: Callable[[list[str]], object] | None = None) -> None:
    """Mount and serve until unmounted; raises VolumeError, MountLockError, RecoveryError.

    Leaves beside the control socket whether everything was stored in the end (see
    walrusfs.control.take_outcome): `walrusfs umount` reports it.
    """
    await trio.to_thread.run_sync(clear_outcome, opts.mountpoint)
    failure: BaseException | None = None
    try:
        await _serve_volume(opts, ready)
    except BaseException as exc:
        failure = exc
        raise
    finally:
        outcome = None if failure is None else message_of(failure)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(write_outcome, opts.mountpoint, outcome)


def unwell(vol: Volume) -> list[str]:
    """A line for each node the mount goes on without, or with trouble."""
    return [
        f"node {n.index} ({n.store.path}) is {n.state.value}: {n.reason or 'no reason given'}"
        for n in vol.nodes.nodes
        if n.state is not NodeState.UP
    ]


def mount_warnings(vol: Volume, metastore: MetaStore) -> list[str]:
    """What `mount` prints as warnings: each node it goes on without (or with trouble),
    and changes recovery left out after a crash (the log has them too, but nobody reads
    it at mount time)."""
    nodes = unwell(vol)
    said = list(nodes)
    if metastore.dropped:
        said.append(
            f"the last {metastore.dropped} changes before a crash name data that never "
            "reached the nodes' disks: left out, so the files they changed are as they were "
            "before them"
        )
    if nodes:
        said.append(
            f"the mount works without {'it' if len(nodes) == 1 else 'them'}; "
            "`walrusfs status` shows when the nodes are well again"
        )
    return said


async def _check_tail(scrubber: Scrubber, metastore: MetaStore) -> None:
    """Scrubber.check_blobs on what a crash recovery kept; a failure must not end the mount
    (the rolling scrub passes check those files too)."""
    try:
        await scrubber.check_blobs(metastore.tail, metastore.torn)
    except Exception as exc:
        log.warning("checking the files written just before a crash failed: %s", exc)


async def _serve_volume(opts: MountOptions, ready: Callable[[list[str]], object] | None) -> None:
    from walrusfs.fs import FileSystem
    from walrusfs.mount import serve

    vol = await open_for_mount(opts)
    lock = MountLock(vol)
    await lock.acquire()
    try:
        metastore = await MetaStore.open(vol, opts.state_dir)
        blobs = FsBlobs(vol.blobs, metastore)
        # Torn by a crash: filled in by repair like the pairs a put missed.
        blobs.missed.update(metastore.torn)
        fs = FileSystem(
            metastore.metadata,
            blobs,
            space=space_of(vol),
            commit=lambda durable: metastore.sync(durable=durable),
            cache_bytes=opts.cache_bytes,
            room_for_data=lambda: not vol.out_of_room(),
        )
        catalog = Catalog(metastore.metadata.path, lambda: metastore.superblock)
        repair = RepairService(vol, catalog, missed=blobs.missed, on_replaced=metastore.checkpoint)
        scrubber = Scrubber(vol, catalog, repair)
        vol.blobs.on_bad_sliver = repair.note_bad  # corrupt slivers found by reads
        mounted = Mounted(vol, metastore, fs, blobs, opts, repair, scrubber)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lock.heartbeat_forever)
                nursery.start_soon(
                    functools.partial(metastore.run_background, commit=opts.commit_s)
                )
                nursery.start_soon(vol.nodes.probe_forever)
                await nursery.start(repair.run_forever)
                await nursery.start(scrubber.run_forever)
                if metastore.tail:
                    nursery.start_soon(_check_tail, scrubber, metastore)
                await nursery.start(serve_control, opts.mountpoint, mounted.handle)
                await serve(
                    fs,
                    opts.mountpoint,
                    allow_other=opts.allow_other,
                    ready=None if ready is None else lambda: ready(mount_warnings(vol, metastore)),
                    stop_signals=(signal.SIGTERM, signal.SIGINT),
                )
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await metastore.close()
                finally:
                    catalog.close()
    finally:
        with trio.CancelScope(shield=True):
            await lock.release()
