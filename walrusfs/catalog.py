"""Catalog: which blobs the volume references, and so which must be kept whole.

Repair, scrub and fsck ask a `BlobSource` for the referenced blobs, each a `BlobRef` with
its metadata already parsed and checked to belong to its blob id. `Catalog` is the
mounted filesystem's source: the metadata database's `blobs` table plus the blobs of the
newest and the previous checkpoint (named by the superblock, not by the database).
`StaticBlobs` is a fixed set for tests, benchmarks and volumes without a filesystem.
`missing_on` compares a node's listing with what it should hold; `list_slivers` makes
that listing.

A damaged or misattributed metadata record is logged and left out, never raised: one bad
row must not stop a repair or scrub pass over every other blob.

The bottom layer of healing: imports no other healing module (repair, healer, scrub,
fsck) and no pyfuse3; it reads the database and the superblock but never writes either.

Task/thread safety: `Catalog` and `StaticBlobs` are used from trio tasks of one run.
`Catalog` reads through its own read-only SQLite connection in worker threads, one at a
time (a CapacityLimiter of 1), which is why the connection may cross threads.
`missing_on` is plain CPU work and safe in any thread.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass
from typing import Protocol

import trio

from backends import NodeStore
from codec import BlobMetadata, CodecError
from walrusfs.checkpoint import Superblock
from walrusfs.metadata import read_only
from walrusfs.nodeset import NodeSet
from walrusfs.sliverfile import PREFIX

log = logging.getLogger(__name__)


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
            self._db = read_only(self.db_path, check_same_thread=False)
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


async def list_slivers(nodes: NodeSet, node: int) -> list[str]:
    """Every sliver file key on `node`, sorted, listed one fan-out directory at a time.

    One listing of a node holding hundreds of thousands of slivers can outlast the node
    deadline on a loaded machine or a slow remote mount, and so make a healthy node look
    hung; 256 small listings each stay well inside it. Raises NodeError.
    """
    keys: list[str] = []
    for top in range(256):
        keys += await nodes.call(node, functools.partial(_list, f"{PREFIX}/{top:02x}"))
    return keys


async def _list(prefix: str, store: NodeStore) -> list[str]:
    return await store.list_keys(prefix)
