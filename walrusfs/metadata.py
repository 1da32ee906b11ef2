"""SQLite metadata of a walrusfs volume: the namespace, attributes and block map.

Role: the schema (written down once, below, with a comment per column) and the only code
that runs SQL. Reads are plain methods; every mutation is one method and one transaction,
and all of them pass through `Metadata._commit`, the single point where a journal of
changes to the nodes will be appended before COMMIT. POSIX rules (may this rename happen?)
live in walrusfs.fs; this module records what fs decided, keeping link counts, times of
the parents and blob reference counts consistent inside each transaction.

A block's bytes are its blob's first `length` bytes with its `patches` applied in
order (small changes committed by fsync without a new blob, see walrusfs.filedata).
Blobs are reference counted by the block rows naming them. A mutation that drops a blob's
count to zero deletes its row and returns it as a `FreedBlob`: the caller deletes it from
the nodes only after the commit, so a crash leaves garbage, never a dangling reference.

Must not import pyfuse3, trio, or the blob store.

Thread/task safety: one `Metadata` belongs to one thread (the trio thread); calls never
yield, so a check in fs followed by a mutation here is atomic for trio tasks. Calls do
block on SQLite, on purpose: they are short, hit the page cache, and never fsync (WAL,
synchronous=OFF); a thread hop per call would cost more than the call. The slow ones,
`checkpoint` and `usage`, open their own connection and are meant for a worker thread.
"""

from __future__ import annotations

import errno
import inspect
import os
import sqlite3
import stat
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypedDict, TypeVar

from walrusfs.errors import (
    Exists,
    FSError,
    Invalid,
    NoData,
    NotFound,
    StateDiskFull,
    StateUnavailable,
    disk_full,
)

SCHEMA_VERSION = 3
THINNED_MAX = 1 << 16  # thinned blobs remembered; more wait for the next mount
STORED_CACHE = 10_000  # files whose stored_bytes are remembered
# Inode rows and block references remembered between mutations (see Metadata._rows).
ROW_CACHE = 50_000
ROOT_INODE = 1
# Times are stored as SQLite INTEGERs of nanoseconds: years 1677 to 2262. A time outside
# is clamped to the range, as Linux does for filesystems with a narrower one (ext4, XFS),
# rather than refused: touch, tar and rsync would fail on a file from such an archive.
TIME_NS_MIN = -(1 << 63)
TIME_NS_MAX = (1 << 63) - 1

# The on-disk format, version SCHEMA_VERSION. Foreign keys are documented, not enforced
# (enforcement costs a lookup per row; the Metadata methods keep them true).
_SCHEMA = """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,      -- 'schema_version' | 'block_size' | 'journal_seq' (the
                                 -- last journal record this database contains)
    value INTEGER NOT NULL
);

CREATE TABLE inodes (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
                                 -- inode number; AUTOINCREMENT never reuses one, so
                                 -- generation can stay 0 and stale handles stay stale
    mode       INTEGER NOT NULL, -- st_mode: file type and permission bits
    uid        INTEGER NOT NULL, -- owner
    gid        INTEGER NOT NULL, -- group
    size       INTEGER NOT NULL, -- bytes as of the last flush (dirty data may be longer);
                                 -- symlinks: length of the target
    atime_ns   INTEGER NOT NULL, -- times in nanoseconds since the epoch, kept exact
    mtime_ns   INTEGER NOT NULL,
    ctime_ns   INTEGER NOT NULL,
    rdev       INTEGER NOT NULL, -- device number of character and block special files
    nlink      INTEGER NOT NULL, -- names of a file; 2 + subdirectories of a directory;
                                 -- 0: unlinked, kept until the kernel forgets it
    generation INTEGER NOT NULL  -- NFS generation number (see id)
);
CREATE INDEX inodes_orphans ON inodes(nlink) WHERE nlink = 0;

CREATE TABLE dentries (
    cookie INTEGER PRIMARY KEY AUTOINCREMENT,
                                 -- stable readdir position: unique, never reused, kept
                                 -- across rename, so offsets survive concurrent changes
    parent INTEGER NOT NULL,     -- directory inode (inodes.id)
    name   BLOB NOT NULL,        -- raw bytes, 1-255 of them, no '/' or NUL
    inode  INTEGER NOT NULL,     -- inodes.id the name refers to
    UNIQUE (parent, name)
);
CREATE INDEX dentries_by_parent ON dentries(parent, cookie);
CREATE INDEX dentries_by_inode ON dentries(inode);

CREATE TABLE symlinks (
    inode  INTEGER PRIMARY KEY,  -- inodes.id of a symbolic link
    target BLOB NOT NULL         -- the link's target, raw bytes
);

CREATE TABLE xattrs (
    inode INTEGER NOT NULL,      -- inodes.id
    name  BLOB NOT NULL,         -- full name including the namespace, e.g. b'user.x'
    value BLOB NOT NULL,         -- up to 64 KiB
    PRIMARY KEY (inode, name)
) WITHOUT ROWID;

CREATE TABLE blobs (
    blob_id  BLOB PRIMARY KEY,   -- 32-byte content-derived id given by the blob store
    meta     BLOB NOT NULL,      -- the blob's serialized codec metadata (opaque here)
    refcount INTEGER NOT NULL    -- number of blocks rows naming this blob; >= 1
) WITHOUT ROWID;

CREATE TABLE blocks (
    inode       INTEGER NOT NULL, -- inodes.id of a regular file
    block_index INTEGER NOT NULL, -- file offset // block_size; a missing row is a hole
    blob_id     BLOB NOT NULL,    -- blobs.blob_id holding the block's bytes
    length      INTEGER NOT NULL, -- bytes of the blob that belong to the block; the rest
                                  -- of the block reads as zeros (truncate only lowers it)
    start       INTEGER NOT NULL DEFAULT 0,
                                  -- where in the blob those bytes begin (0 unless the
                                  -- blob is a pack of several small blocks)
    PRIMARY KEY (inode, block_index)
) WITHOUT ROWID;
"""

_BLOCKS_BY_BLOB = "CREATE INDEX IF NOT EXISTS blocks_by_blob ON blocks(blob_id)"

# Version 2 added this table (see FileData.sync); a version 1 database lacks only it.
_PATCHES = """
CREATE TABLE IF NOT EXISTS patches (
    inode       INTEGER NOT NULL, -- inodes.id of a regular file
    block_index INTEGER NOT NULL, -- the block changed; its blocks row is the base (none:
                                  -- zeros)
    seq         INTEGER NOT NULL, -- order within the block: a later patch wins
    offset      INTEGER NOT NULL, -- where in the block `data` goes
    data        BLOB NOT NULL,    -- bytes that replace the base's there (zeros before
                                  -- them if the base is shorter)
    PRIMARY KEY (inode, block_index, seq)
) WITHOUT ROWID;
"""
_SCHEMA += _PATCHES

# Version 3 added where in its blob a block starts: small files share blobs (packs, see
# FileData). A version 2 database lacks only the column, and every block starts at 0.
_BLOCK_START = "ALTER TABLE blocks ADD COLUMN start INTEGER NOT NULL DEFAULT 0;"

_INODE_COLUMNS = "id, mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns, rdev, nlink, generation"
_SETTABLE = frozenset({"mode", "uid", "gid", "atime_ns", "mtime_ns", "ctime_ns", "rdev"})


@dataclass(frozen=True, slots=True)
class InodeRow:
    """One row of `inodes`."""

    id: int
    mode: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int
    nlink: int
    generation: int


@dataclass(frozen=True, slots=True)
class BlockRef:
    """Where one block of a file lives: `length` bytes of a blob, from `start` on."""

    blob_id: bytes
    meta: bytes
    length: int
    start: int = 0


def clamp_time_ns(ns: int) -> int:
    """`ns` within the range the inode table can store."""
    return min(max(ns, TIME_NS_MIN), TIME_NS_MAX)


def _clearing(clear: bool) -> dict[str, bool]:
    """The journal argument of a commit that clears the file first: only when it does,
    so that every other record reads as it did before `clear` existed."""
    return {"clear": True} if clear else {}


class BlockUpdate(TypedDict):
    """One file's part of `set_blocks_many`: the arguments of set_blocks, by name (a
    dict, so that the journal records it as it records any change's arguments)."""

    ino: int
    blocks: dict[int, BlockRef | None]
    size: int
    mtime_ns: int
    ctime_ns: int


@dataclass(frozen=True, slots=True)
class FreedBlob:
    """A blob no block names any more; delete it from the nodes after the commit."""

    blob_id: bytes
    meta: bytes


# The mutations a journal may replay, by name. "mkfs" is not one: recovery always starts
# from a checkpoint, and a new volume's first checkpoint is written by mkfs.
_REPLAYABLE = frozenset(
    {
        "create",
        "link",
        "unlink",
        "rename",
        "set_attrs",
        "set_xattr",
        "remove_xattr",
        "truncate",
        "set_blocks",
        "set_blocks_many",
        "patch_blocks",
        "delete_inode",
    }
)


@dataclass(frozen=True)
class Usage:
    """What the files hold and what that takes (see `usage`)."""

    file_bytes: int  # the regular files' sizes, summed (holes included, as ls shows them)
    data_bytes: int  # bytes of file data held in blobs, summed over the files' blocks
    blobs: int
    blob_bytes: int  # bytes of the distinct blobs, each counted once
    pack_bytes: int  # of those, in packs (blobs holding several files' small blocks)
    pack_dead_bytes: int  # bytes in packs that no block names any more


def read_only(path: str, **kwargs: Any) -> sqlite3.Connection:
    """A connection that only reads the database at `path`: a missing file is an error,
    never a new empty database (which the mount's own connection would then meet).
    Raises StateUnavailable when it cannot be opened."""
    try:
        db: sqlite3.Connection = sqlite3.connect(
            f"file:{urllib.parse.quote(path)}?mode=ro", uri=True, **kwargs
        )
    except sqlite3.OperationalError as exc:
        raise StateUnavailable.of(path, exc) from exc
    return db


def usage(path: str, length_of: Callable[[bytes], int], pack_header: int) -> Usage:
    """Sum up the database at `path` in one read transaction of its own connection:
    blocking and O(blobs), for a worker thread while the mount goes on.

    `length_of(meta)` is a blob's length (the metadata is opaque here); a pack's blocks
    start after its `pack_header` bytes, a plain blob's at 0.
    """
    db = read_only(path, isolation_level=None)
    try:
        db.execute("PRAGMA busy_timeout = 5000")
        db.execute("BEGIN")
        (sizes,) = db.execute(
            "SELECT COALESCE(SUM(size), 0) FROM inodes WHERE mode & ? = ?",
            (stat.S_IFMT(0xFFFF), stat.S_IFREG),
        ).fetchone()
        (data,) = db.execute("SELECT COALESCE(SUM(length), 0) FROM blocks").fetchone()
        count = total = packed = dead = 0
        rows = db.execute(
            "SELECT b.meta, COALESCE(SUM(k.length), 0), COALESCE(MAX(k.start), 0)"
            " FROM blobs b LEFT JOIN blocks k ON k.blob_id = b.blob_id GROUP BY b.blob_id"
        )
        for meta, live, last_start in rows:
            length = length_of(bytes(meta))
            count += 1
            total += length
            if last_start > 0:
                packed += length
                dead += max(0, length - pack_header - live)
        db.execute("COMMIT")
    finally:
        db.close()
    return Usage(int(sizes), int(data), count, total, packed, dead)


K = TypeVar("K")
V = TypeVar("V")


def _remember(cache: dict[K, V], key: K, value: V, most: int) -> None:
    """Keep `value` in `cache`, starting over once it holds `most` entries (a cheap bound:
    what is forgotten is read again from the database)."""
    if len(cache) >= most:
        cache.clear()
    cache[key] = value


class JournalSink(Protocol):
    """Where committed changes go (walrusfs.journal.Journal)."""

    promised: int  # the seq through which appended changes were made durable on request

    def append(self, change: Change) -> int: ...

    def retract(self, seq: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Change:
    """One committed mutation: the method name and its arguments (for the journal)."""

    op: str
    args: Mapping[str, Any]


class Metadata:
    """The volume's SQLite database. Opening creates it (with the root) if missing.

    Raises Invalid if the file has another schema version or block size.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        block_size: int | None = None,
        root_uid: int = 0,
        root_gid: int = 0,
        root_mode: int = 0o755,
        now_ns: int = 0,
    ) -> None:
        self.path = os.fspath(path)
        self.journal: JournalSink | None = None
        self.last_seq = 0  # the journal seq of the last change committed (0: none yet)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one per mutation.
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode = WAL")
        # No fsync, not even at WAL checkpoints: this file is a working copy that every
        # mount replaces with the nodes' checkpoint and journal (walrusfs.metastore), so
        # its own durability buys nothing. With NORMAL, the automatic checkpoint every
        # ~4 MiB of WAL fsynced twice: a commit that ran it here took up to 1.9 s, and
        # small mutations cost 1.5-2x what they do without.
        self._db.execute("PRAGMA synchronous = OFF")
        self._db.execute("PRAGMA busy_timeout = 5000")
        created = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        if created is None:
            if block_size is None or block_size <= 0:
                self._db.close()
                raise Invalid("a new volume needs a positive block_size")
            self._create(block_size, root_uid, root_gid, root_mode, now_ns)
        values = dict(self._db.execute("SELECT key, value FROM meta"))
        upgrades = {1: _PATCHES + _BLOCK_START, 2: _BLOCK_START}
        if values.get("schema_version") in upgrades:
            self._db.executescript(
                f"BEGIN; {upgrades[values['schema_version']]}; UPDATE meta SET value ="
                f" {SCHEMA_VERSION} WHERE key = 'schema_version'; COMMIT;"
            )
            values["schema_version"] = SCHEMA_VERSION
        if values.get("schema_version") != SCHEMA_VERSION:
            self._db.close()
            raise Invalid(
                f"{self.path}: schema version {values.get('schema_version')}, "
                f"this walrusfs reads {SCHEMA_VERSION}"
            )
        self.block_size: int = values["block_size"]
        if block_size is not None and block_size != self.block_size:
            self._db.close()
            raise Invalid(f"{self.path}: volume block size is {self.block_size}, not {block_size}")
        # An index, not a schema change: older databases gain it, older code ignores it.
        self._db.execute(_BLOCKS_BY_BLOB)
        # Inodes that may have patches: a superset (a stale entry costs one query), so that
        # reading a block needs no second query in the common case.
        self._patched = {r[0] for r in self._db.execute("SELECT DISTINCT inode FROM patches")}
        # stored_bytes (in blobs, in patches), of files whose blocks are unchanged
        self._stored: dict[int, tuple[int, int]] = {}
        # Answers of get_inode and block since the last mutation. Every SQLite call lets
        # go of the GIL, and under load winning it back costs more than the query: a
        # primary-key SELECT took 60-340 us in a busy mount against 9 us alone, and a
        # 1 MiB read asked for its inode and its block each time.
        self._rows: dict[int, InodeRow] = {}
        self._blocks: dict[tuple[int, int], BlockRef | None] = {}
        # Blobs that lost a block but not their last one: a pack may now be mostly dead
        # bytes (see FileData.compact_packs). A superset: a rolled-back drop stays in it.
        self._thinned: set[bytes] = set()

    def _create(self, block_size: int, uid: int, gid: int, mode: int, now_ns: int) -> None:
        self._db.executescript("BEGIN;" + _SCHEMA)
        self._db.executemany(
            "INSERT INTO meta(key, value) VALUES (?, ?)",
            [("schema_version", SCHEMA_VERSION), ("block_size", block_size), ("journal_seq", 0)],
        )
        self._db.execute(
            f"INSERT INTO inodes({_INODE_COLUMNS}) VALUES (?, ?, ?, ?, 0, ?, ?, ?, 0, 2, 0)",
            (ROOT_INODE, stat.S_IFDIR | (mode & 0o7777), uid, gid, now_ns, now_ns, now_ns),
        )
        self._commit(Change("mkfs", {"block_size": block_size}))

    def close(self) -> None:
        self._db.close()

    # -- transactions -------------------------------------------------------------------

    @contextmanager
    def _transaction(self, op: str, **args: Any) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._commit(Change(op, args))
        except BaseException as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error) and disk_full(exc):
                # The disk of the state directory, not the nodes: say so, as ENOSPC.
                raise StateDiskFull.of(self.path, exc) from exc
            raise
        finally:
            # Forget every remembered answer once the mutation is over (not before: its
            # own reads may remember what it is about to change). Cheaper and surer than
            # knowing which rows each mutation touches (parents, links, renamed-over
            # files).
            self._rows.clear()
            self._blocks.clear()

    def attach_journal(self, journal: JournalSink | None) -> None:
        """From now on, every committed change is also appended to `journal`."""
        self.journal = journal

    def journal_seq(self) -> int:
        """The journal seq of the last change this database contains."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'journal_seq'").fetchone()
        return int(row[0]) if row else 0

    def set_journal_seq(self, seq: int) -> None:
        """Record the journal position after a replay (replayed changes are not re-journalled)."""
        self._db.execute("UPDATE meta SET value = ? WHERE key = 'journal_seq'", (seq,))

    def apply(self, change: Change) -> None:
        """Replay a journalled change (recovery). Raises FSError if it does not apply."""
        if change.op not in _REPLAYABLE:
            raise Invalid(
                f"journal record of unknown kind {change.op!r} (written by a newer walrusfs?)"
            )
        mutation = getattr(self, change.op)
        try:
            mutation(**change.args)
        except TypeError as exc:
            # Only a record that does not fit the signature is a newer build's: checked on
            # this path alone, so that a replay of many records pays nothing for it.
            try:
                inspect.signature(mutation).bind(**change.args)
            except TypeError:
                raise Invalid(
                    f"journal record {change.op!r} with arguments this walrusfs does not know "
                    f"(written by a newer walrusfs?): {exc}"
                ) from None
            raise

    def _commit(self, change: Change) -> None:
        """End the open transaction. THE hook: the change goes to the journal first, and the
        database records the journal position in the same transaction, so a snapshot says
        exactly which changes it contains."""
        journal = self.journal
        if journal is not None:
            seq = journal.append(change)
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'journal_seq'", (seq,))
            try:
                self._db.execute("COMMIT")
            except BaseException:
                journal.retract(seq)
                raise
            self.last_seq = seq
        else:
            self._db.execute("COMMIT")

    def promised_through(self, seq: int) -> bool:
        """Whether the change committed as `seq` was promised to be on stable storage, by
        an fsync() or another sync that asked for it (0: any change from before this
        mount, which starts with a durable checkpoint). Without a journal, only
        `checkpoint` makes changes durable, untracked here: taken to be, to be safe."""
        return self.journal is None or self.journal.promised >= seq

    def checkpoint(self) -> None:
        """Make every committed transaction durable (fsync). Blocking: run it in a thread."""
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA busy_timeout = 5000")
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            db.close()

    # -- reads --------------------------------------------------------------------------

    def get_inode(self, ino: int) -> InodeRow:
        """The inode's row. Raises NotFound."""
        found = self._rows.get(ino)
        if found is not None:
            return found
        row = self._db.execute(
            f"SELECT {_INODE_COLUMNS} FROM inodes WHERE id = ?", (ino,)
        ).fetchone()
        if row is None:
            raise NotFound(f"inode {ino}")
        found = InodeRow(*row)
        _remember(self._rows, ino, found, ROW_CACHE)
        return found

    def lookup(self, parent: int, name: bytes) -> int | None:
        row = self._db.execute(
            "SELECT inode FROM dentries WHERE parent = ? AND name = ?", (parent, name)
        ).fetchone()
        return None if row is None else int(row[0])

    def parent_of(self, dir_ino: int) -> int:
        """The directory holding `dir_ino` (the root is its own parent)."""
        row = self._db.execute(
            "SELECT parent FROM dentries WHERE inode = ? LIMIT 1", (dir_ino,)
        ).fetchone()
        return ROOT_INODE if row is None else int(row[0])

    def readdir(
        self, parent: int, after_cookie: int, limit: int
    ) -> list[tuple[int, bytes, InodeRow]]:
        """Up to `limit` entries of `parent` with cookie > `after_cookie`, by cookie."""
        cols = ", ".join(f"i.{c.strip()}" for c in _INODE_COLUMNS.split(","))
        rows = self._db.execute(
            f"SELECT d.cookie, d.name, {cols} FROM dentries d JOIN inodes i ON i.id = d.inode"
            " WHERE d.parent = ? AND d.cookie > ? ORDER BY d.cookie LIMIT ?",
            (parent, after_cookie, limit),
        ).fetchall()
        return [(r[0], bytes(r[1]), InodeRow(*r[2:])) for r in rows]

    def has_entries(self, dir_ino: int) -> bool:
        row = self._db.execute("SELECT 1 FROM dentries WHERE parent = ? LIMIT 1", (dir_ino,))
        return row.fetchone() is not None

    def readlink(self, ino: int) -> bytes:
        row = self._db.execute("SELECT target FROM symlinks WHERE inode = ?", (ino,)).fetchone()
        if row is None:
            raise Invalid(f"inode {ino} is not a symbolic link")
        return bytes(row[0])

    def get_xattr(self, ino: int, name: bytes) -> bytes:
        """Raises NoData."""
        row = self._db.execute(
            "SELECT value FROM xattrs WHERE inode = ? AND name = ?", (ino, name)
        ).fetchone()
        if row is None:
            raise NoData(name.decode(errors="replace"))
        return bytes(row[0])

    def list_xattrs(self, ino: int) -> list[bytes]:
        rows = self._db.execute("SELECT name FROM xattrs WHERE inode = ? ORDER BY name", (ino,))
        return [bytes(r[0]) for r in rows]

    def block(self, ino: int, index: int) -> BlockRef | None:
        """Where block `index` of `ino` lives; None for a hole."""
        key = (ino, index)
        if key in self._blocks:
            return self._blocks[key]
        row = self._db.execute(
            "SELECT b.blob_id, o.meta, b.length, b.start FROM blocks b JOIN blobs o"
            " USING (blob_id) WHERE b.inode = ? AND b.block_index = ?",
            (ino, index),
        ).fetchone()
        ref = None if row is None else BlockRef(bytes(row[0]), bytes(row[1]), row[2], row[3])
        _remember(self._blocks, key, ref, ROW_CACHE)
        return ref

    def patches(self, ino: int, index: int) -> list[tuple[int, bytes]]:
        """(offset, bytes) changes to block `index` of `ino` over its base, oldest first."""
        if ino not in self._patched:
            return []
        rows = self._db.execute(
            "SELECT offset, data FROM patches WHERE inode = ? AND block_index = ? ORDER BY seq",
            (ino, index),
        )
        return [(r[0], bytes(r[1])) for r in rows]

    def patched_blocks(self) -> list[tuple[int, int]]:
        """(inode, block index) of every block with patches."""
        rows = self._db.execute(
            "SELECT DISTINCT inode, block_index FROM patches ORDER BY inode, block_index"
        )
        return [(r[0], r[1]) for r in rows]

    def stored_bytes(self, ino: int, *, patches: bool = True) -> int:
        """Bytes of the file held in blobs, and with `patches` in patches too (those may
        overlap the blobs' bytes: at most the size counts, see FileSystem); holes and the
        zeros past a block's `length` take no space. A small file, patches only until it
        is packed, must not look all holes to sparse-aware tools. Remembered per file
        (every getattr asks, and the sum over a 100 GiB file's 25,600 blocks takes
        ~2.4 ms) until its blocks change."""
        used = self._stored.get(ino)
        if used is None:
            row = self._db.execute(
                "SELECT COALESCE(SUM(length), 0) FROM blocks WHERE inode = ?", (ino,)
            ).fetchone()
            patched = 0
            if ino in self._patched:
                patched = self._db.execute(
                    "SELECT COALESCE(SUM(length(data)), 0) FROM patches WHERE inode = ?", (ino,)
                ).fetchone()[0]
            used = (int(row[0]), int(patched))
            _remember(self._stored, ino, used, STORED_CACHE)
        return used[0] + used[1] if patches else used[0]

    def block_indexes(self, ino: int) -> list[int]:
        rows = self._db.execute(
            "SELECT block_index FROM blocks WHERE inode = ? ORDER BY block_index", (ino,)
        )
        return [r[0] for r in rows]

    def blob_refcount(self, blob_id: bytes) -> int:
        row = self._db.execute(
            "SELECT refcount FROM blobs WHERE blob_id = ?", (blob_id,)
        ).fetchone()
        return 0 if row is None else int(row[0])

    def blob_blocks(self, blob_id: bytes) -> list[tuple[int, int, BlockRef]]:
        """Every block that names the blob: (inode, block index, reference)."""
        rows = self._db.execute(
            "SELECT b.inode, b.block_index, o.meta, b.length, b.start FROM blocks b"
            " JOIN blobs o USING (blob_id) WHERE b.blob_id = ?",
            (blob_id,),
        )
        return [(r[0], r[1], BlockRef(blob_id, bytes(r[2]), r[3], r[4])) for r in rows]

    def take_thinned(self) -> set[bytes]:
        """The blobs that lost a block since they were last taken; forgotten here."""
        taken, self._thinned = self._thinned, set()
        return taken

    def recheck_packs(self) -> None:
        """Take every pack as thinned (a mount: what was dropped before is not known)."""
        rows = self._db.execute(
            "SELECT DISTINCT blob_id FROM blocks WHERE start > 0 LIMIT ?", (THINNED_MAX,)
        )
        for (blob_id,) in rows:
            self._thin(bytes(blob_id))

    def _thin(self, blob_id: bytes) -> None:
        if len(self._thinned) < THINNED_MAX:
            self._thinned.add(blob_id)

    def blob_count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM blobs").fetchone()[0])

    def inode_count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM inodes").fetchone()[0])

    def orphans(self) -> list[int]:
        """Inodes with no name left (unlinked while open when the volume last stopped)."""
        return [r[0] for r in self._db.execute("SELECT id FROM inodes WHERE nlink = 0")]

    # -- mutations: each one transaction ------------------------------------------------

    def create(
        self,
        parent: int,
        name: bytes,
        *,
        mode: int,
        uid: int,
        gid: int,
        now_ns: int,
        rdev: int = 0,
        target: bytes | None = None,
    ) -> InodeRow:
        """Make a new inode named `name` in `parent` (a symlink if `target` is given)."""
        is_dir = stat.S_ISDIR(mode)
        size = len(target) if target is not None else 0
        with self._transaction(
            "create",
            parent=parent,
            name=name,
            mode=mode,
            uid=uid,
            gid=gid,
            rdev=rdev,
            target=target,
            now_ns=now_ns,
        ) as db:
            cur = db.execute(
                f"INSERT INTO inodes({_INODE_COLUMNS}) VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
                (mode, uid, gid, size, now_ns, now_ns, now_ns, rdev, 2 if is_dir else 1),
            )
            ino = int(cur.lastrowid or 0)
            self._add_name(db, parent, name, ino)
            if target is not None:
                db.execute("INSERT INTO symlinks(inode, target) VALUES (?, ?)", (ino, target))
            self._touch_dir(db, parent, now_ns, nlink_delta=1 if is_dir else 0)
        return self.get_inode(ino)

    def link(self, ino: int, parent: int, name: bytes, *, now_ns: int) -> None:
        """Add the name `name` in `parent` for the existing non-directory `ino`."""
        with self._transaction("link", ino=ino, parent=parent, name=name, now_ns=now_ns) as db:
            self._add_name(db, parent, name, ino)
            db.execute(
                "UPDATE inodes SET nlink = nlink + 1, ctime_ns = ? WHERE id = ?", (now_ns, ino)
            )
            self._touch_dir(db, parent, now_ns)

    def unlink(self, parent: int, name: bytes, *, now_ns: int) -> int:
        """Remove the name (of a file, or of an empty directory); return its inode."""
        with self._transaction("unlink", parent=parent, name=name, now_ns=now_ns) as db:
            ino = self._drop_name(db, parent, name, now_ns)
            self._touch_dir(db, parent, now_ns)
        return ino

    def rename(
        self,
        src_parent: int,
        src_name: bytes,
        dst_parent: int,
        dst_name: bytes,
        *,
        now_ns: int,
        exchange: bool = False,
    ) -> int | None:
        """Move a name, replacing the destination (validated by the caller) or swapping
        with it if `exchange`. Returns the replaced inode, if any."""
        with self._transaction(
            "rename",
            src_parent=src_parent,
            src_name=src_name,
            dst_parent=dst_parent,
            dst_name=dst_name,
            now_ns=now_ns,
            exchange=exchange,
        ) as db:
            src = self._lookup_or_raise(src_parent, src_name)
            dst = self.lookup(dst_parent, dst_name)
            replaced = None
            if exchange:
                if dst is None:
                    raise NotFound(dst_name.decode(errors="replace"))
                for ino, parent, name in ((dst, src_parent, src_name), (src, dst_parent, dst_name)):
                    db.execute(
                        "UPDATE dentries SET inode = ? WHERE parent = ? AND name = ?",
                        (ino, parent, name),
                    )
                moves = [(src, src_parent, dst_parent), (dst, dst_parent, src_parent)]
            else:
                if dst is not None:
                    replaced = self._drop_name(db, dst_parent, dst_name, now_ns)
                # Keep the row (and so its cookie): readdirs in progress stay consistent.
                db.execute(
                    "UPDATE dentries SET parent = ?, name = ? WHERE parent = ? AND name = ?",
                    (dst_parent, dst_name, src_parent, src_name),
                )
                moves = [(src, src_parent, dst_parent)]
            for ino, old_parent, new_parent in moves:
                # Linux updates the ctime of renamed inodes; a moved directory's '..'
                # changes parent, which moves one link between the parents.
                db.execute("UPDATE inodes SET ctime_ns = ? WHERE id = ?", (now_ns, ino))
                if old_parent != new_parent and self._is_dir(ino):
                    self._add_nlink(db, old_parent, -1)
                    self._add_nlink(db, new_parent, +1)
            self._touch_dir(db, src_parent, now_ns)
            if dst_parent != src_parent:
                self._touch_dir(db, dst_parent, now_ns)
        return replaced

    def set_attrs(self, ino: int, **fields: int) -> InodeRow:
        """Set some of mode, uid, gid, atime_ns, mtime_ns, ctime_ns, rdev."""
        unknown = set(fields) - _SETTABLE
        if unknown:
            raise TypeError(f"not settable: {sorted(unknown)}")
        if fields:
            names = sorted(fields)
            with self._transaction("set_attrs", ino=ino, **fields) as db:
                db.execute(
                    f"UPDATE inodes SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ?",
                    [*(fields[n] for n in names), ino],
                )
        return self.get_inode(ino)

    def set_xattr(self, ino: int, name: bytes, value: bytes, *, now_ns: int) -> None:
        with self._transaction("set_xattr", ino=ino, name=name, value=value, now_ns=now_ns) as db:
            db.execute(
                "INSERT OR REPLACE INTO xattrs(inode, name, value) VALUES (?, ?, ?)",
                (ino, name, value),
            )
            db.execute("UPDATE inodes SET ctime_ns = ? WHERE id = ?", (now_ns, ino))

    def remove_xattr(self, ino: int, name: bytes, *, now_ns: int) -> None:
        """Raises NoData."""
        with self._transaction("remove_xattr", ino=ino, name=name, now_ns=now_ns) as db:
            cur = db.execute("DELETE FROM xattrs WHERE inode = ? AND name = ?", (ino, name))
            if cur.rowcount == 0:
                raise NoData(name.decode(errors="replace"))
            db.execute("UPDATE inodes SET ctime_ns = ? WHERE id = ?", (now_ns, ino))

    def truncate(self, ino: int, size: int, *, mtime_ns: int, ctime_ns: int) -> list[FreedBlob]:
        """Set the size; blocks wholly past it go, the block across it is cut short."""
        bs = self.block_size
        freed: list[FreedBlob] = []
        self._stored.pop(ino, None)
        with self._transaction(
            "truncate", ino=ino, size=size, mtime_ns=mtime_ns, ctime_ns=ctime_ns
        ) as db:
            first_gone = -(-size // bs)
            gone = db.execute(
                "DELETE FROM blocks WHERE inode = ? AND block_index >= ? RETURNING blob_id",
                (ino, first_gone),
            ).fetchall()
            for (blob_id,) in gone:
                self._unref(db, bytes(blob_id), freed)
            db.execute(
                "DELETE FROM patches WHERE inode = ? AND block_index >= ?", (ino, first_gone)
            )
            if size % bs:
                # Lowering `length` is enough: bytes past it read as zeros, so the blob
                # needs no rewrite and re-extending the file shows zeros, not old data.
                # Patches are cut the same way.
                cut, index = size % bs, size // bs
                row = db.execute(
                    "UPDATE blocks SET length = MIN(length, ?) WHERE inode = ? AND block_index = ?"
                    " RETURNING blob_id, start",
                    (cut, ino, index),
                ).fetchone()
                if row is not None and row[1] > 0:
                    self._thin(bytes(row[0]))  # a pack: its bytes past the cut are dead
                db.execute(
                    "DELETE FROM patches WHERE inode = ? AND block_index = ? AND offset >= ?",
                    (ino, index, cut),
                )
                db.execute(
                    "UPDATE patches SET data = substr(data, 1, ? - offset)"
                    " WHERE inode = ? AND block_index = ? AND offset + length(data) > ?",
                    (cut, ino, index, cut),
                )
            db.execute(
                "UPDATE inodes SET size = ?, mtime_ns = ?, ctime_ns = ? WHERE id = ?",
                (size, mtime_ns, ctime_ns, ino),
            )
        self._forget_patched(ino)
        return freed

    def set_blocks(
        self,
        ino: int,
        blocks: Mapping[int, BlockRef | None],
        *,
        size: int,
        mtime_ns: int,
        ctime_ns: int,
        clear: bool = False,
    ) -> list[FreedBlob]:
        """Point blocks at new blobs (None: make it a hole) and set size and times. With
        `clear`, every block and patch the file had goes first, in the same transaction
        (a truncate to 0 that waited for the new content, see FileData.truncate)."""
        freed: list[FreedBlob] = []
        with self._transaction(
            "set_blocks",
            ino=ino,
            blocks=dict(blocks),
            size=size,
            mtime_ns=mtime_ns,
            ctime_ns=ctime_ns,
            **_clearing(clear),
        ) as db:
            if clear:
                self._clear_in(db, ino, freed)
            self._set_blocks_in(db, ino, blocks, size, mtime_ns, ctime_ns, freed)
        self._forget_patched(ino)
        return freed

    def set_blocks_many(self, files: list[BlockUpdate]) -> list[FreedBlob]:
        """set_blocks of several files in one transaction and one journal record: a pack's
        files are committed together or not at all."""
        freed: list[FreedBlob] = []
        with self._transaction("set_blocks_many", files=files) as db:
            for u in files:
                self._set_blocks_in(
                    db, u["ino"], u["blocks"], u["size"], u["mtime_ns"], u["ctime_ns"], freed
                )
        for u in files:
            self._forget_patched(u["ino"])
        return freed

    def _set_blocks_in(
        self,
        db: sqlite3.Connection,
        ino: int,
        blocks: Mapping[int, BlockRef | None],
        size: int,
        mtime_ns: int,
        ctime_ns: int,
        freed: list[FreedBlob],
    ) -> None:
        self._stored.pop(ino, None)
        self._set_size_and_times(db, ino, size, mtime_ns, ctime_ns)
        # Take the new references before dropping the old ones, so a block rewritten with
        # identical content never sees its blob's count touch zero.
        for ref in blocks.values():
            if ref is not None:
                db.execute(
                    "INSERT INTO blobs(blob_id, meta, refcount) VALUES (?, ?, 1)"
                    " ON CONFLICT(blob_id) DO UPDATE SET refcount = refcount + 1",
                    (ref.blob_id, ref.meta),
                )
        for index, ref in blocks.items():
            old = db.execute(
                "DELETE FROM blocks WHERE inode = ? AND block_index = ? RETURNING blob_id",
                (ino, index),
            ).fetchone()
            if ref is not None:
                db.execute(
                    "INSERT INTO blocks(inode, block_index, blob_id, length, start)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (ino, index, ref.blob_id, ref.length, ref.start),
                )
            if old is not None:
                self._unref(db, bytes(old[0]), freed)
            if ino in self._patched:  # the new blob holds the block whole
                db.execute("DELETE FROM patches WHERE inode = ? AND block_index = ?", (ino, index))

    def patch_blocks(
        self,
        ino: int,
        patches: list[tuple[int, int, bytes]],
        *,
        size: int,
        mtime_ns: int,
        ctime_ns: int,
        clear: bool = False,
    ) -> list[FreedBlob]:
        """Record (block index, offset, bytes) changes over the blocks' stored bytes, and
        set size and times: a small change to a big block is kept without rewriting its
        blob. A later patch wins where patches overlap; one it covers whole is dropped.
        `clear`: as for set_blocks (the patches are then over zeros)."""
        freed: list[FreedBlob] = []
        self._patched.add(ino)
        self._stored.pop(ino, None)
        with self._transaction(
            "patch_blocks",
            ino=ino,
            patches=[list(p) for p in patches],
            size=size,
            mtime_ns=mtime_ns,
            ctime_ns=ctime_ns,
            **_clearing(clear),
        ) as db:
            if clear:
                self._clear_in(db, ino, freed)
            self._set_size_and_times(db, ino, size, mtime_ns, ctime_ns)
            for index, offset, data in patches:
                db.execute(
                    "DELETE FROM patches WHERE inode = ? AND block_index = ?"
                    " AND offset >= ? AND offset + length(data) <= ?",
                    (ino, index, offset, offset + len(data)),
                )
                db.execute(
                    "INSERT INTO patches(inode, block_index, seq, offset, data)"
                    " SELECT ?, ?, COALESCE(MAX(seq), 0) + 1, ?, ? FROM patches"
                    " WHERE inode = ? AND block_index = ?",
                    (ino, index, offset, bytes(data), ino, index),
                )
        return freed

    def delete_inode(self, ino: int) -> list[FreedBlob]:
        """Remove an inode without names, with its blocks, xattrs and symlink target."""
        freed: list[FreedBlob] = []
        self._stored.pop(ino, None)
        with self._transaction("delete_inode", ino=ino) as db:
            self._clear_in(db, ino, freed)
            db.execute("DELETE FROM xattrs WHERE inode = ?", (ino,))
            db.execute("DELETE FROM symlinks WHERE inode = ?", (ino,))
            db.execute("DELETE FROM inodes WHERE id = ?", (ino,))
        self._patched.discard(ino)
        return freed

    def _clear_in(self, db: sqlite3.Connection, ino: int, freed: list[FreedBlob]) -> None:
        """Drop every block and patch of `ino` (inside its transaction)."""
        gone = db.execute("DELETE FROM blocks WHERE inode = ? RETURNING blob_id", (ino,))
        for (blob_id,) in gone.fetchall():
            self._unref(db, bytes(blob_id), freed)
        db.execute("DELETE FROM patches WHERE inode = ?", (ino,))

    def _forget_patched(self, ino: int) -> None:
        """After a commit (never inside a transaction that may yet roll back)."""
        if (
            ino in self._patched
            and not self._db.execute(
                "SELECT 1 FROM patches WHERE inode = ? LIMIT 1", (ino,)
            ).fetchone()
        ):
            self._patched.discard(ino)

    # -- helpers inside a transaction ---------------------------------------------------

    def _lookup_or_raise(self, parent: int, name: bytes) -> int:
        ino = self.lookup(parent, name)
        if ino is None:
            raise NotFound(name.decode(errors="replace"))
        return ino

    @staticmethod
    def _add_name(db: sqlite3.Connection, parent: int, name: bytes, ino: int) -> None:
        try:
            db.execute(
                "INSERT INTO dentries(parent, name, inode) VALUES (?, ?, ?)", (parent, name, ino)
            )
        except sqlite3.IntegrityError:
            raise Exists(name.decode(errors="replace")) from None

    def _is_dir(self, ino: int) -> bool:
        return stat.S_ISDIR(self.get_inode(ino).mode)

    def _drop_name(self, db: sqlite3.Connection, parent: int, name: bytes, now_ns: int) -> int:
        ino = self._lookup_or_raise(parent, name)
        db.execute("DELETE FROM dentries WHERE parent = ? AND name = ?", (parent, name))
        if self._is_dir(ino):
            # An empty directory loses its name and its '.': nothing links to it any more.
            db.execute("UPDATE inodes SET nlink = 0, ctime_ns = ? WHERE id = ?", (now_ns, ino))
            self._add_nlink(db, parent, -1)
        else:
            db.execute(
                "UPDATE inodes SET nlink = nlink - 1, ctime_ns = ? WHERE id = ?", (now_ns, ino)
            )
        return ino

    @staticmethod
    def _set_size_and_times(
        db: sqlite3.Connection, ino: int, size: int, mtime_ns: int, ctime_ns: int
    ) -> None:
        """Raises NotFound for a missing inode."""
        cur = db.execute(
            "UPDATE inodes SET size = ?, mtime_ns = ?, ctime_ns = ? WHERE id = ?",
            (size, mtime_ns, ctime_ns, ino),
        )
        if cur.rowcount == 0:
            raise NotFound(f"inode {ino}")

    @staticmethod
    def _add_nlink(db: sqlite3.Connection, ino: int, delta: int) -> None:
        db.execute("UPDATE inodes SET nlink = nlink + ? WHERE id = ?", (delta, ino))

    @staticmethod
    def _touch_dir(db: sqlite3.Connection, ino: int, now_ns: int, nlink_delta: int = 0) -> None:
        db.execute(
            "UPDATE inodes SET mtime_ns = ?, ctime_ns = ?, nlink = nlink + ? WHERE id = ?",
            (now_ns, now_ns, nlink_delta, ino),
        )

    def _unref(self, db: sqlite3.Connection, blob_id: bytes, freed: list[FreedBlob]) -> None:
        row = db.execute(
            "UPDATE blobs SET refcount = refcount - 1 WHERE blob_id = ? RETURNING refcount, meta",
            (blob_id,),
        ).fetchone()
        if row is None:
            raise FSError(errno.EIO, f"blob {blob_id.hex()} is named by a block but not counted")
        if row[0] <= 0:
            db.execute("DELETE FROM blobs WHERE blob_id = ?", (blob_id,))
            freed.append(FreedBlob(blob_id, bytes(row[1])))
            self._thinned.discard(blob_id)
        else:
            self._thin(blob_id)
