"""The thin pyfuse3 adapter: kernel requests in, FileSystem calls out.

Role: translate each pyfuse3 handler's arguments into a walrusfs.fs.FileSystem call and
its result into pyfuse3 types (EntryAttributes, FileInfo, StatvfsData, readdir replies).
No filesystem logic lives here. One decorator, `_errno`, wraps every handler: any
exception becomes `pyfuse3.FUSEError(errno_of(exc))`; an unexpected one (a bug) is
logged once, here, at ERROR with its traceback and answered with EIO. Nothing else may
escape a handler: it would take the whole mount down.

The writeback cache is on (`enable_writeback_cache`): the kernel merges small writes and
keeps its own size and mtime until it writes them back; FileSystem.getattr reports the
sizes and times of data it holds but has not flushed, so the two agree.

Only this module and walrusfs.mount import pyfuse3.

Thread/task safety: handlers run as trio tasks in pyfuse3's main loop, concurrently; the
FileSystem is built for that.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
from pyfuse3 import (
    EntryAttributes,
    FileHandleT,
    FileInfo,
    FileNameT,
    FlagT,
    InodeT,
    ModeT,
    ReaddirToken,
    RequestContext,
    SetattrFields,
    StatvfsData,
    XAttrNameT,
)

from walrusfs.errors import PermissionDenied, errno_of, is_known
from walrusfs.fs import Attrs, FileSystem

log = logging.getLogger(__name__)

# Every change goes through this mount, so the kernel may keep names and attributes for
# long: nothing else can make them stale.
ENTRY_TIMEOUT = 300.0
ATTR_TIMEOUT = 300.0

P = ParamSpec("P")
R = TypeVar("R")


def _errno(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Turn every exception of a handler into pyfuse3.FUSEError (unknown: log, EIO)."""

    @functools.wraps(fn)
    async def handler(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            # BaseExceptions (trio's Cancelled, KeyboardInterrupt) are not request errors:
            # they pass, so cancellation and Ctrl-C still work.
            if is_known(exc):
                log.debug("%s: %s", fn.__name__, exc)
            else:
                log.error("%s failed unexpectedly; answering EIO", fn.__name__, exc_info=exc)
            raise pyfuse3.FUSEError(errno_of(exc)) from None

    return handler


def caller_gids(ctx: RequestContext) -> frozenset[int]:
    """The caller's group and supplementary groups (just its group if it has exited)."""
    try:
        groups = pyfuse3.get_sup_groups(ctx.pid)
    except (OSError, ValueError):
        groups = set()
    return frozenset({ctx.gid, *groups})


def _gids_if_unprivileged(ctx: RequestContext) -> frozenset[int]:
    # Only a non-root caller's groups matter (which set-ID bits its writes clear); root
    # is spared reading /proc on every open.
    return frozenset() if ctx.uid == 0 else caller_gids(ctx)


def entry_attributes(a: Attrs) -> EntryAttributes:
    """pyfuse3's view of a FileSystem Attrs."""
    e = EntryAttributes()
    e.st_ino = a.ino
    e.generation = a.generation
    e.entry_timeout = ENTRY_TIMEOUT
    e.attr_timeout = ATTR_TIMEOUT
    e.st_mode = a.mode
    e.st_nlink = a.nlink
    e.st_uid = a.uid
    e.st_gid = a.gid
    e.st_rdev = a.rdev
    e.st_size = a.size
    e.st_blksize = a.blksize
    e.st_blocks = a.blocks
    e.st_atime_ns = a.atime_ns
    e.st_mtime_ns = a.mtime_ns
    e.st_ctime_ns = a.ctime_ns
    return e


class FuseOperations(pyfuse3.Operations):
    """pyfuse3 request handlers over one FileSystem."""

    enable_writeback_cache = True
    supports_dot_lookup = True

    def __init__(self, fs: FileSystem, on_init: Callable[[], object] | None = None) -> None:
        super().__init__()
        self.fs = fs
        self._on_init = on_init
        # The writeback cache places O_APPEND writes itself (and may resend whole pages
        # at their own offsets): the core must take every offset as given.
        fs.kernel_handles_append = self.enable_writeback_cache
        fs.data.stamp_writes = not self.enable_writeback_cache

    def init(self) -> None:
        # The kernel's INIT request: its reply leaves this call and is processed before
        # the next request is read, so a task woken here sees the negotiated mount.
        if self._on_init is not None:
            self._on_init()

    # -- names and attributes -----------------------------------------------------------

    @_errno
    async def lookup(
        self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        return entry_attributes(await self.fs.lookup(parent_inode, name))

    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        # forget has no reply: it may not raise anything, not even FUSEError.
        try:
            await self.fs.forget(inode_list)
        except Exception:
            log.error("forget failed; inodes may linger until the next mount", exc_info=True)

    @_errno
    async def getattr(self, inode: InodeT, ctx: RequestContext) -> EntryAttributes:
        return entry_attributes(await self.fs.getattr(inode))

    @_errno
    async def setattr(
        self,
        inode: InodeT,
        attr: EntryAttributes,
        fields: SetattrFields,
        fh: FileHandleT | None,
        ctx: RequestContext,
    ) -> EntryAttributes:
        changes: dict[str, Any] = {}
        for wanted, name, value in (
            (fields.update_mode, "mode", attr.st_mode),
            (fields.update_uid, "uid", attr.st_uid),
            (fields.update_gid, "gid", attr.st_gid),
            (fields.update_size, "size", attr.st_size),
            (fields.update_atime, "atime_ns", attr.st_atime_ns),
            (fields.update_mtime, "mtime_ns", attr.st_mtime_ns),
            (fields.update_ctime, "ctime_ns", attr.st_ctime_ns),
        ):
            if wanted:
                changes[name] = value
        if fields.update_size or fields.update_uid or fields.update_gid:
            changes["caller_gids"] = _gids_if_unprivileged(ctx)
        if fields.update_size and fh is not None:
            changes["by_handle"] = True  # ftruncate(2): the kernel names the open file
        return entry_attributes(await self.fs.setattr(inode, caller_uid=ctx.uid, **changes))

    @_errno
    async def access(self, inode: InodeT, mode: ModeT, ctx: RequestContext) -> bool:
        # Not called with default_permissions (how walrusfs.mount mounts); kept right
        # for a mount without it.
        try:
            await self.fs.access(inode, mode, ctx.uid, ctx.gid, caller_gids(ctx))
        except PermissionDenied:
            return False
        return True

    @_errno
    async def statfs(self, ctx: RequestContext) -> StatvfsData:
        st = await self.fs.statfs()
        out = StatvfsData()
        out.f_bsize = st.bsize
        out.f_frsize = st.frsize
        out.f_blocks = st.blocks
        out.f_bfree = st.bfree
        out.f_bavail = st.bavail
        out.f_files = st.files
        out.f_ffree = st.ffree
        out.f_favail = st.ffree
        out.f_namemax = st.namemax
        return out

    # -- namespace ----------------------------------------------------------------------

    @_errno
    async def mknod(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, rdev: int, ctx: RequestContext
    ) -> EntryAttributes:
        return entry_attributes(
            await self.fs.mknod(parent_inode, name, mode, rdev, ctx.uid, ctx.gid)
        )

    @_errno
    async def mkdir(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, ctx: RequestContext
    ) -> EntryAttributes:
        return entry_attributes(await self.fs.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid))

    @_errno
    async def symlink(
        self, parent_inode: InodeT, name: FileNameT, target: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        return entry_attributes(await self.fs.symlink(parent_inode, name, target, ctx.uid, ctx.gid))

    @_errno
    async def readlink(self, inode: InodeT, ctx: RequestContext) -> FileNameT:
        return await self.fs.readlink(inode)

    @_errno
    async def link(
        self, inode: InodeT, new_parent_inode: InodeT, new_name: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        return entry_attributes(await self.fs.link(inode, new_parent_inode, new_name))

    @_errno
    async def unlink(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        await self.fs.unlink(parent_inode, name)

    @_errno
    async def rmdir(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        await self.fs.rmdir(parent_inode, name)

    @_errno
    async def rename(
        self,
        parent_inode_old: InodeT,
        name_old: FileNameT,
        parent_inode_new: InodeT,
        name_new: FileNameT,
        flags: FlagT,
        ctx: RequestContext,
    ) -> None:
        await self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @_errno
    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileHandleT:
        return await self.fs.opendir(inode)

    @_errno
    async def readdir(self, fh: FileHandleT, start_id: int, token: ReaddirToken) -> None:
        def reply(name: bytes, attrs: Attrs, next_offset: int) -> bool:
            return pyfuse3.readdir_reply(token, name, entry_attributes(attrs), next_offset)

        await self.fs.readdir(fh, start_id, reply)

    @_errno
    async def releasedir(self, fh: FileHandleT) -> None:
        await self.fs.releasedir(fh)

    @_errno
    async def fsyncdir(self, fh: FileHandleT, datasync: bool) -> None:
        await self.fs.fsyncdir(fh, datasync)

    # -- file content -------------------------------------------------------------------

    @_errno
    async def open(self, inode: InodeT, flags: FlagT, ctx: RequestContext) -> FileInfo:
        # keep_cache: only this mount changes files, so cached pages stay valid.
        fh = await self.fs.open(inode, flags, ctx.uid, _gids_if_unprivileged(ctx))
        return FileInfo(fh=fh, keep_cache=True)

    @_errno
    async def create(
        self,
        parent_inode: InodeT,
        name: FileNameT,
        mode: ModeT,
        flags: FlagT,
        ctx: RequestContext,
    ) -> tuple[FileInfo, EntryAttributes]:
        fh, attrs = await self.fs.create(
            parent_inode, name, mode, flags, ctx.uid, ctx.gid, _gids_if_unprivileged(ctx)
        )
        return FileInfo(fh=fh, keep_cache=True), entry_attributes(attrs)

    @_errno
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        # pyfuse3 takes any contiguous buffer: a view of a cached blob goes out uncopied.
        return await self.fs.read(fh, off, size)  # type: ignore[return-value]

    @_errno
    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        return await self.fs.write(fh, off, buf)

    @_errno
    async def flush(self, fh: FileHandleT) -> None:
        await self.fs.flush(fh)

    @_errno
    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        await self.fs.fsync(fh, datasync)

    @_errno
    async def release(self, fh: FileHandleT) -> None:
        await self.fs.release(fh)

    # -- extended attributes (pyfuse3 applies XATTR_CREATE/REPLACE and the size) ----------

    @_errno
    async def setxattr(
        self, inode: InodeT, name: XAttrNameT, value: bytes, ctx: RequestContext
    ) -> None:
        await self.fs.setxattr(inode, name, value)

    @_errno
    async def getxattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> bytes:
        return await self.fs.getxattr(inode, name)

    @_errno
    async def listxattr(self, inode: InodeT, ctx: RequestContext) -> Sequence[XAttrNameT]:
        return await self.fs.listxattr(inode)

    @_errno
    async def removexattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> None:
        await self.fs.removexattr(inode, name)
