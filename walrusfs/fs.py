"""POSIX semantics of walrusfs, with no FUSE in sight.

Role: `FileSystem` has one async method per filesystem operation (lookup, mkdir,
rename, read, ...). It decides what POSIX and Linux allow (errno choices follow Linux),
keeps the kernel's lookup counts and the open handles, and defers removing an unlinked
inode until the last lookup reference and the last open handle are gone. Namespace and
attributes go to walrusfs.metadata; file content to walrusfs.filedata. The FUSE adapter
(walrusfs.fuse_ops) only translates arguments; tests call this class directly.

Permissions: mounts use `default_permissions`, so the kernel checks mode bits, ownership
for chmod/chown/utimens, and sticky directories before a request reaches us (it knows the
caller's supplementary groups, we would have to guess them). `access` implements the same
owner/group/other rule with the root bypass for access(2) calls and for tests; no other
method checks permissions. What the kernel leaves to us (FUSE_HANDLE_KILLPRIV) follows
Linux's setattr_should_drop_suidgid: a write or truncate by a non-root caller clears
set-user-ID, and set-group-ID if the file is group-executable or the caller is not in
its group; chown clears set-user-ID, and set-group-ID on the same condition (root
counting as a member). Callers name their groups (`gids`): unknown means none.

Times: nanoseconds, exact. atime changes only when asked (setattr), as with `noatime`.

Must not import pyfuse3.

Thread/task safety: trio tasks of one thread; metadata calls never yield, so each check
and the mutation that follows it are atomic with respect to other requests.
"""

from __future__ import annotations

import itertools
import logging
import os
import stat
from collections import Counter
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, replace
from typing import Any

import trio

from walrusfs.clock import StampClock
from walrusfs.errors import (
    Exists,
    Invalid,
    IsADir,
    NameTooLong,
    NoData,
    NoSpace,
    NotADir,
    NotEmpty,
    NotFound,
    NotPermitted,
    NotSupported,
    PermissionDenied,
    Range,
    TooBig,
    is_known,
)
from walrusfs.filedata import FileData
from walrusfs.metadata import ROOT_INODE, InodeRow, Metadata, clamp_time_ns
from walrusfs.reclaim import BlobStoreProtocol

log = logging.getLogger(__name__)

NAME_MAX = 255
PATH_MAX = 4096
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 64 * 1024
XATTR_LIST_MAX = 64 * 1024  # the kernel refuses (E2BIG) to list more names than this
XATTR_CREATE, XATTR_REPLACE = 1, 2  # <sys/xattr.h>
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2  # <linux/fs.h>
_NODE_TYPES = (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK)
_TIMES = frozenset({"atime_ns", "mtime_ns", "ctime_ns"})


@dataclass(frozen=True, slots=True)
class Attrs:
    """What stat(2) shows for an inode."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int  # 512-byte units of stored bytes: holes take none
    blksize: int  # preferred I/O size: the volume's block size
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    generation: int


@dataclass(frozen=True, slots=True)
class Space:
    """Raw capacity of the nodes and the bytes stored per byte of file data."""

    total_bytes: int
    free_bytes: int
    overhead: float  # e.g. 3.7 for Red Stuff at n=7


@dataclass(frozen=True, slots=True)
class StatFs:
    """statvfs(3) of the volume; block counts in units of `frsize`."""

    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    namemax: int


SpaceFn = Callable[[], Awaitable[Space]]
# Called after close/fsync: returns once committed metadata is stored beyond this machine
# (durable: also on stable storage there). walrusfs.metastore.MetaStore.sync fits.
CommitFn = Callable[..., Awaitable[None]]
# readdir calls it per entry: (name, attributes, offset of the next entry) -> accepted?
ReplyFn = Callable[[bytes, Attrs, int], bool]


@dataclass(slots=True)
class _Handle:
    inode: int
    flags: int
    uid: int  # opener: writes by non-root clear set-ID bits
    gids: frozenset[int]  # opener's group and supplementary groups (set-group-ID rule)
    next_read: int = 0  # where a sequential reader reads next (read-ahead)
    read_bytes: int = 0  # read through it so far (read-ahead grows with it)


def _read_only(h: _Handle) -> bool:
    return h.flags & os.O_ACCMODE == os.O_RDONLY


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise NameTooLong(repr(name[:40]))
    if not name or b"/" in name or b"\0" in name:
        raise Invalid(f"bad name {name!r}")


def _drop_setid(row: InodeRow, mode: int, uid: int, gids: Collection[int]) -> int:
    """`mode` after a write, truncate or chown of `row` by `uid` in groups `gids`.

    Set-user-ID goes; set-group-ID goes if the file is group-executable or the caller is
    neither root nor in its group (without group execute it marks mandatory locking,
    which the file's group may keep).
    """
    mode &= ~stat.S_ISUID
    if mode & stat.S_IXGRP or not (uid == 0 or row.gid in gids):
        mode &= ~stat.S_ISGID
    return mode


class FileSystem:
    """A walrusfs volume: metadata plus file content through a blob store."""

    def __init__(
        self,
        meta: Metadata,
        store: BlobStoreProtocol,
        *,
        space: SpaceFn | None = None,
        commit: CommitFn | None = None,
        clock_ns: Callable[[], int] | None = None,
        room_for_data: Callable[[], bool] = lambda: True,
        **filedata_options: Any,
    ) -> None:
        """`clock_ns`: the time to stamp (tests); by default a StampClock, which keeps
        in step with the kernel's stamps (see walrusfs.clock)."""
        self.meta = meta
        stamps = StampClock()
        self._stamps = stamps if clock_ns is None else None
        self._now = stamps if clock_ns is None else clock_ns
        self._commit = commit
        # With the FUSE writeback cache the kernel places O_APPEND writes itself and may
        # resend whole pages at explicit offsets; appending those again at our EOF would
        # misplace data. The mount sets this; direct callers keep O_APPEND semantics.
        self.kernel_handles_append = False
        self.data = FileData(
            meta,
            store,
            clock_ns=self._now,
            is_open=self._is_open,
            room_for_data=room_for_data,
            **filedata_options,
        )
        # False while too few nodes have room to store data (see FileData): new names and
        # xattrs are refused then too, as a full disk refuses them, so that what space the
        # full nodes keep goes to the deletes that free them.
        self._room = room_for_data
        self.block_size = meta.block_size
        self._space = space
        self._lookups: Counter[int] = Counter()
        self._opens: Counter[int] = Counter()
        self._handles: dict[int, _Handle] = {}
        self._dirs: dict[int, int] = {}
        self._fh = itertools.count(1)

    def _is_open(self, ino: int) -> bool:
        return ino in self._opens

    # -- lifecycle ----------------------------------------------------------------------

    async def run_background(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Remove orphans of an unclean stop, then run the flusher until cancelled."""
        for ino in self.meta.orphans():
            await self._maybe_delete(ino)
        await self.data.run_flusher(task_status=task_status)

    async def shutdown(self) -> None:
        """After the kernel is gone: drop its references, remove orphans, flush all."""
        self._lookups.clear()
        self._opens.clear()
        self._handles.clear()
        self._dirs.clear()
        for ino in self.meta.orphans():
            await self._maybe_delete(ino)
        await self.data.flush_all()

    # -- attributes ---------------------------------------------------------------------

    def _attrs(self, row: InodeRow) -> Attrs:
        size, mtime, ctime = row.size, row.mtime_ns, row.ctime_ns
        used = size
        if stat.S_ISREG(row.mode):
            # st_blocks counts what is stored, so du and sparse-aware copies (cp, tar -S,
            # rsync -S) see holes; unflushed bytes count too, bounded by all dirty memory.
            live = self.data.live(row.id)
            if live is None:
                used = min(size, self.meta.stored_bytes(row.id))
            else:  # its patches are (mostly) its dirty blocks, counted below
                size, mtime, ctime = live.size, live.mtime_ns, live.ctime_ns
                used = 0 if live.cleared else self.meta.stored_bytes(row.id, patches=False)
                used = min(size, used + self.data.dirty_bytes)
        return Attrs(
            row.id,
            row.mode,
            row.nlink,
            row.uid,
            row.gid,
            row.rdev,
            size,
            -(-used // 512),
            self.block_size,
            row.atime_ns,
            mtime,
            ctime,
            row.generation,
        )

    async def getattr(self, ino: int) -> Attrs:
        return self._attrs(self.meta.get_inode(ino))

    async def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int | None = None,
        caller_uid: int = 0,
        caller_gids: Collection[int] = (),
        by_handle: bool = False,
    ) -> Attrs:
        """Change exactly the given fields; ctime becomes now unless given (a ctime is
        the kernel's own stamp: no call sets it to a chosen time).

        `caller_uid` and `caller_gids` (group and supplementary groups) decide which
        set-ID bits a truncate or chown clears. `by_handle`: the truncate comes through
        an open file (ftruncate, O_TRUNC), whose close commits it (see FileData.truncate)."""
        row = self.meta.get_inode(ino)
        if ctime_ns is not None and self._stamps is not None:
            self._stamps.kernel_stamped(ctime_ns)
        now = self._now()
        atime_ns, mtime_ns, ctime_ns = (
            None if t is None else clamp_time_ns(t) for t in (atime_ns, mtime_ns, ctime_ns)
        )
        fields: dict[str, int] = {}
        new_mode = row.mode
        if size is not None:
            if stat.S_ISDIR(row.mode):
                raise IsADir(f"inode {ino}")
            if not stat.S_ISREG(row.mode) or size < 0:
                raise Invalid(f"cannot truncate inode {ino} to {size}")
            await self.data.truncate(ino, size, now_ns=now, by_handle=by_handle)
            if caller_uid != 0:  # root keeps set-ID bits (CAP_FSETID)
                new_mode = _drop_setid(row, new_mode, caller_uid, caller_gids)
        if (uid is not None or gid is not None) and not stat.S_ISDIR(row.mode):
            new_mode = _drop_setid(row, new_mode, caller_uid, caller_gids)
        if mode is not None:
            new_mode = stat.S_IFMT(row.mode) | stat.S_IMODE(mode)
        for name, value in (
            ("uid", uid),
            ("gid", gid),
            ("atime_ns", atime_ns),
            ("mtime_ns", mtime_ns),
        ):
            if value is not None:
                fields[name] = value
        if new_mode != row.mode:
            fields["mode"] = new_mode
        # A truncate sets the times itself (FileData keeps them while it is in memory).
        if fields or ctime_ns is not None:
            fields["ctime_ns"] = now if ctime_ns is None else ctime_ns
            if row.nlink == 0 and not self._is_open(ino) and fields.keys() <= _TIMES:
                # With the writeback cache the kernel stores the times of each file it
                # has just unlinked, before it forgets it: a transaction and a journal
                # record apiece (one in three of rm -rf's) for times that nobody can see
                # (no name, no open file) and that go when the forget deletes the inode.
                return replace(self._attrs(row), **fields)
            held = fields.keys() == {"mtime_ns", "ctime_ns"} and self.data.hold_times(
                ino, mtime_ns=fields["mtime_ns"], ctime_ns=fields["ctime_ns"]
            )
            if not held:
                self.meta.set_attrs(ino, **fields)
                self.data.set_times(ino, mtime_ns=mtime_ns, ctime_ns=fields["ctime_ns"])
        return await self.getattr(ino)

    async def access(
        self, ino: int, mode: int, uid: int, gid: int, groups: Collection[int] = ()
    ) -> None:
        """Check R_OK/W_OK/X_OK as the kernel does. Raises PermissionDenied."""
        row = self.meta.get_inode(ino)
        want = mode & (os.R_OK | os.W_OK | os.X_OK)
        if uid == 0:
            # Root reads and writes anything; executes only what someone may execute.
            if want & os.X_OK and not stat.S_ISDIR(row.mode) and not row.mode & 0o111:
                raise PermissionDenied(f"inode {ino} is not executable")
            return
        if uid == row.uid:
            bits = (row.mode >> 6) & 7
        elif gid == row.gid or row.gid in groups:
            bits = (row.mode >> 3) & 7
        else:
            bits = row.mode & 7
        if want & ~bits:
            raise PermissionDenied(f"inode {ino}: mode {stat.filemode(row.mode)}")

    async def statfs(self) -> StatFs:
        space = await self._space() if self._space is not None else Space(0, 0, 1.0)
        frsize = 4096
        overhead = max(space.overhead, 1.0)
        blocks = int(space.total_bytes / overhead) // frsize
        bfree = min(blocks, int(space.free_bytes / overhead) // frsize)
        files = self.meta.inode_count()
        ffree = max(0, 2**32 - files)  # inodes are rows: limited by space, not a table
        return StatFs(self.block_size, frsize, blocks, bfree, bfree, files + ffree, ffree, NAME_MAX)

    # -- names --------------------------------------------------------------------------

    def _dir(self, ino: int) -> InodeRow:
        row = self.meta.get_inode(ino)
        if not stat.S_ISDIR(row.mode):
            raise NotADir(f"inode {ino}")
        return row

    def _new_entry_parent(self, parent: int, name: bytes) -> InodeRow:
        _check_name(name)
        row = self._dir(parent)
        if row.nlink == 0:
            raise NotFound(f"directory {parent} was removed")
        if name in (b".", b"..") or self.meta.lookup(parent, name) is not None:
            raise Exists(repr(name))
        return row

    def _child(self, parent: int, name: bytes) -> int:
        _check_name(name)
        self._dir(parent)
        if name == b".":
            return parent
        if name == b"..":
            return self.meta.parent_of(parent)
        ino = self.meta.lookup(parent, name)
        if ino is None:
            raise NotFound(repr(name))
        return ino

    def _remember(self, row: InodeRow) -> Attrs:
        """Hand the kernel a reference to `row` (returned by forget)."""
        self._lookups[row.id] += 1
        return self._attrs(row)

    async def lookup(self, parent: int, name: bytes) -> Attrs:
        """Attributes of `name` in `parent`; adds a lookup reference. Raises NotFound."""
        return self._remember(self.meta.get_inode(self._child(parent, name)))

    async def forget(self, items: Collection[tuple[int, int]]) -> None:
        """The kernel dropped `n` references to each inode."""
        for ino, n in items:
            left = self._lookups[ino] - n
            if left > 0:
                self._lookups[ino] = left
            else:
                self._lookups.pop(ino, None)
                await self._maybe_delete(ino)

    async def _maybe_delete(self, ino: int) -> None:
        """Remove an inode once it has no name, no lookup reference and no open handle."""
        if ino == ROOT_INODE or self._lookups[ino] or self._opens[ino]:
            return
        try:
            row = self.meta.get_inode(ino)
        except NotFound:
            return
        if row.nlink > 0:
            return
        await self.data.discard(ino)
        await self.data.free(self.meta.delete_inode(ino))

    async def _create(
        self,
        parent: int,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        rdev: int = 0,
        target: bytes | None = None,
    ) -> InodeRow:
        prow = self._new_entry_parent(parent, name)
        self._need_room()
        if prow.mode & stat.S_ISGID:
            # BSD group semantics in a set-group-ID directory, inherited by subdirectories.
            gid = prow.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        return self.meta.create(
            parent, name, mode=mode, uid=uid, gid=gid, rdev=rdev, target=target, now_ns=self._now()
        )

    async def mknod(
        self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int
    ) -> Attrs:
        """Create a regular file, FIFO, socket or device node."""
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        if kind not in _NODE_TYPES:
            raise Invalid(f"mknod of file type {kind:o}")
        keep_rdev = rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0
        row = await self._create(parent, name, kind | stat.S_IMODE(mode), uid, gid, keep_rdev)
        return self._remember(row)

    async def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attrs:
        row = await self._create(parent, name, stat.S_IFDIR | stat.S_IMODE(mode), uid, gid)
        return self._remember(row)

    async def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Attrs:
        if not target:
            raise NotFound("empty symlink target")
        if len(target) >= PATH_MAX:
            raise NameTooLong("symlink target")
        if b"\0" in target:
            raise Invalid("NUL in symlink target")
        row = await self._create(parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target)
        return self._remember(row)

    async def readlink(self, ino: int) -> bytes:
        return self.meta.readlink(ino)

    async def link(self, ino: int, new_parent: int, new_name: bytes) -> Attrs:
        """Another name for a non-directory. Raises NotPermitted for directories."""
        row = self.meta.get_inode(ino)
        if stat.S_ISDIR(row.mode):
            raise NotPermitted("hard link to a directory")
        if row.nlink == 0:
            raise NotFound(f"inode {ino} has been removed")
        self._new_entry_parent(new_parent, new_name)
        self._need_room()
        now = self._now()
        self.meta.link(ino, new_parent, new_name, now_ns=now)
        self.data.set_times(ino, ctime_ns=now)
        return self._remember(self.meta.get_inode(ino))

    async def unlink(self, parent: int, name: bytes) -> None:
        """Remove a non-directory name. Raises IsADir for directories."""
        ino = self._child(parent, name)
        if stat.S_ISDIR(self.meta.get_inode(ino).mode):
            raise IsADir(repr(name))
        now = self._now()
        self.meta.unlink(parent, name, now_ns=now)
        self.data.set_times(ino, ctime_ns=now)
        await self._maybe_delete(ino)

    async def rmdir(self, parent: int, name: bytes) -> None:
        if name == b".":
            raise Invalid("rmdir of '.'")
        if name == b"..":
            raise NotEmpty("rmdir of '..'")
        ino = self._child(parent, name)
        self._dir(ino)
        if self.meta.has_entries(ino):
            raise NotEmpty(repr(name))
        self.meta.unlink(parent, name, now_ns=self._now())
        await self._maybe_delete(ino)

    def _is_ancestor(self, anc: int, ino: int) -> bool:
        """Is `anc` the directory `ino` or one above it?"""
        while True:
            if ino == anc:
                return True
            if ino == ROOT_INODE:
                return False
            ino = self.meta.parent_of(ino)

    async def rename(
        self, src_parent: int, src_name: bytes, dst_parent: int, dst_name: bytes, flags: int = 0
    ) -> None:
        """rename(2)/renameat2(2) with RENAME_NOREPLACE and RENAME_EXCHANGE."""
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (
            RENAME_NOREPLACE | RENAME_EXCHANGE
        ):
            raise Invalid(f"rename flags {flags:#x}")
        for name in (src_name, dst_name):
            _check_name(name)
            if name in (b".", b".."):
                raise Invalid("rename of '.' or '..'")
        src = self._child(src_parent, src_name)
        dst_dir = self._dir(dst_parent)
        dst = self.meta.lookup(dst_parent, dst_name)
        src_is_dir = stat.S_ISDIR(self.meta.get_inode(src).mode)
        dst_is_dir = dst is not None and stat.S_ISDIR(self.meta.get_inode(dst).mode)
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise NotFound(repr(dst_name))
            if src == dst:
                return
            if (src_is_dir and self._is_ancestor(src, dst_parent)) or (
                dst_is_dir and self._is_ancestor(dst, src_parent)
            ):
                raise Invalid("a directory cannot move into itself")
        else:
            if dst is not None and flags & RENAME_NOREPLACE:
                raise Exists(repr(dst_name))
            if src == dst:
                return  # two names of one inode (or the same name): nothing to do
            if dst_dir.nlink == 0:
                raise NotFound(f"directory {dst_parent} was removed")
            if src_is_dir:
                if self._is_ancestor(src, dst_parent):
                    raise Invalid("a directory cannot move into itself")
                if dst is not None and not dst_is_dir:
                    raise NotADir(repr(dst_name))
                if dst is not None and self.meta.has_entries(dst):
                    raise NotEmpty(repr(dst_name))
            elif dst_is_dir:
                raise IsADir(repr(dst_name))
        now = self._now()
        replaced = self.meta.rename(
            src_parent,
            src_name,
            dst_parent,
            dst_name,
            now_ns=now,
            exchange=bool(flags & RENAME_EXCHANGE),
        )
        for ino in (src, dst):
            if ino is not None:
                self.data.set_times(ino, ctime_ns=now)
        if replaced is not None:
            await self._maybe_delete(replaced)

    async def opendir(self, ino: int) -> int:
        self._dir(ino)
        fh = next(self._fh)
        self._dirs[fh] = ino
        return fh

    async def readdir(self, fh: int, offset: int, reply: ReplyFn) -> None:
        """Entries from `offset` (0: the start) while `reply` accepts them.

        Offsets: 1 after '.', 2 after '..', cookie + 2 after an entry; cookies are stable,
        so a listing stays right while entries come and go. Accepted entries other than
        '.' and '..' add a lookup reference (READDIRPLUS).
        """
        ino = self._dirs[fh]
        if offset < 1 and not reply(b".", await self.getattr(ino), 1):
            return
        if offset < 2 and not reply(b"..", await self.getattr(self.meta.parent_of(ino)), 2):
            return
        after = max(0, offset - 2)
        while batch := self.meta.readdir(ino, after, 128):
            for cookie, name, row in batch:
                if not reply(name, self._attrs(row), cookie + 2):
                    return
                self._lookups[row.id] += 1
                after = cookie

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # -- file content -------------------------------------------------------------------

    async def open(self, ino: int, flags: int, uid: int, gids: Collection[int] = ()) -> int:
        """Open a regular file; O_TRUNC truncates. Returns a handle.

        `uid` and `gids` (group and supplementary groups) of the opener decide which
        set-ID bits its writes clear."""
        row = self.meta.get_inode(ino)
        if stat.S_ISDIR(row.mode):
            raise IsADir(f"inode {ino}")
        if not stat.S_ISREG(row.mode):
            raise Invalid(f"inode {ino} is not a regular file")
        fh = next(self._fh)
        self._handles[fh] = _Handle(ino, flags, uid, frozenset(gids))
        self._opens[ino] += 1
        if flags & os.O_TRUNC:
            try:
                await self.setattr(ino, size=0, caller_uid=uid, caller_gids=gids, by_handle=True)
            except BaseException:
                await self.release(fh)
                raise
        return fh

    async def create(
        self,
        parent: int,
        name: bytes,
        mode: int,
        flags: int,
        uid: int,
        gid: int,
        gids: Collection[int] = (),
    ) -> tuple[int, Attrs]:
        """Create and open a regular file; adds a lookup reference. `gids`: see open."""
        row = await self._create(parent, name, stat.S_IFREG | stat.S_IMODE(mode), uid, gid)
        attrs = self._remember(row)
        return await self.open(row.id, flags & ~os.O_TRUNC, uid, {gid, *gids}), attrs

    def _need_room(self) -> None:
        if not self._room():
            raise NoSpace("too few nodes have room: only deletes, renames and attributes now")

    def _handle(self, fh: int) -> _Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise Invalid(f"no open file handle {fh}") from None

    async def read(self, fh: int, offset: int, length: int) -> bytes | memoryview:
        """Bytes of the file; a read-only view where they come from an immutable blob."""
        h = self._handle(fh)
        data = await self.data.read(
            h.inode, offset, length, readahead=offset == h.next_read, done=h.read_bytes
        )
        h.next_read = offset + len(data)
        h.read_bytes += len(data)
        return data

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        """Write all of `data`; O_APPEND handles write at the end. Returns len(data)."""
        h = self._handle(fh)
        if h.flags & os.O_APPEND and not self.kernel_handles_append:
            offset = (await self.getattr(h.inode)).size
        if h.uid != 0:  # root keeps set-ID bits (CAP_FSETID)
            row = self.meta.get_inode(h.inode)
            mode = _drop_setid(row, row.mode, h.uid, h.gids)
            if mode != row.mode:
                await self.setattr(h.inode, mode=mode)
        await self.data.write(h.inode, offset, data)
        return len(data)

    async def _committed(self, durable: bool) -> None:
        """Wait until committed metadata survives this machine (the `commit` hook)."""
        if self._commit is not None:
            await self._commit(durable)
        elif durable:
            await trio.to_thread.run_sync(self.meta.checkpoint)

    async def flush(self, fh: int) -> None:
        """close(2) of one descriptor: store the file's dirty data and its metadata
        (what fsync committed as patches is committed already, see FileData).

        A descriptor opened read-only wrote nothing: its close stores no data (another
        writer's), and commits the metadata (an fchmod through it) only as far as the
        nodes take it. Its close must not fail for what others wrote: `cat` of a file
        that reads fine would exit 1 on a volume with too many nodes full."""
        h = self._handle(fh)
        if _read_only(h):
            try:
                await self._committed(False)
            except Exception as exc:
                if not is_known(exc):
                    raise
                log.debug("close of a reader of inode %d: not committed now: %s", h.inode, exc)
            return
        await self.data.flush(h.inode, fold=False)
        await self._committed(False)

    async def fsync(self, fh: int, datasync: bool = False) -> None:
        """Commit the file's data and make the metadata durable."""
        await self.data.sync(self._handle(fh).inode)
        await self._committed(True)

    async def fsyncdir(self, fh: int, datasync: bool = False) -> None:
        await self._committed(True)

    async def release(self, fh: int) -> None:
        """Last close of an open: flush a writable one (writes may follow flush under
        mmap), then drop."""
        h = self._handles.pop(fh, None)
        if h is None:
            return
        try:
            if not _read_only(h):
                await self.data.flush(h.inode, fold=False)
        finally:
            self._opens[h.inode] -= 1
            if self._opens[h.inode] <= 0:
                del self._opens[h.inode]
                await self._maybe_delete(h.inode)

    # -- extended attributes ------------------------------------------------------------

    def _xattr_target(self, ino: int, name: bytes, *, write: bool) -> None:
        if not name.startswith(b"user."):
            # First, without a lookup: the kernel asks for security.capability before
            # every write(2), so this answer is on the write path.
            raise NotSupported(f"xattr namespace of {name!r}")
        row = self.meta.get_inode(ino)
        if len(name) > XATTR_NAME_MAX:
            raise Range("xattr name longer than 255 bytes")
        if name == b"user.":
            raise Invalid("empty xattr name")
        if not (stat.S_ISREG(row.mode) or stat.S_ISDIR(row.mode)):
            # Linux keeps user.* to files and directories (see xattr(7)).
            raise NotPermitted("user xattr on a special file") if write else NoData(repr(name))

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        """Raises NoData if missing, NotSupported outside the user namespace."""
        self._xattr_target(ino, name, write=False)
        return self.meta.get_xattr(ino, name)

    async def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        """XATTR_CREATE: Exists if present; XATTR_REPLACE: NoData if missing.

        Raises NoSpace for a new name that would make the list of names longer than
        listxattr(2) can return (so cp -a and rsync -X could copy none of them)."""
        self._xattr_target(ino, name, write=True)
        if len(value) > XATTR_SIZE_MAX:
            raise TooBig("xattr value over 64 KiB")
        self._need_room()
        names = self.meta.list_xattrs(ino)
        present = name in names
        if flags & XATTR_CREATE and present:
            raise Exists(repr(name))
        if flags & XATTR_REPLACE and not present:
            raise NoData(repr(name))
        if not present and sum(len(n) + 1 for n in names) + len(name) + 1 > XATTR_LIST_MAX:
            raise NoSpace(f"inode {ino}: xattr names would not fit a listxattr reply")
        now = self._now()
        self.meta.set_xattr(ino, name, value, now_ns=now)
        self.data.set_times(ino, ctime_ns=now)

    async def listxattr(self, ino: int) -> list[bytes]:
        self.meta.get_inode(ino)
        return self.meta.list_xattrs(ino)

    async def removexattr(self, ino: int, name: bytes) -> None:
        self._xattr_target(ino, name, write=True)
        now = self._now()
        self.meta.remove_xattr(ino, name, now_ns=now)
        self.data.set_times(ino, ctime_ns=now)
