"""A pyfuse3 passthrough of a source directory whose every request first passes a Gate.

Enough of POSIX for a node store and the usual tools: lookup, getattr, setattr (mode,
owner, times, truncate), opendir/readdir/fsyncdir, open/create/read/write/flush/fsync/
release, mkdir/rmdir/unlink/rename, statfs, readlink/symlink/link. Errors of the source
directory pass through with their errno; anything unexpected becomes EIO (and is logged),
because an exception escaping a pyfuse3 handler takes the whole mount down.

Why the choices:

* Inode numbers are ours, keyed by the source's (st_dev, st_ino), so a source tree that
  spans filesystems cannot produce clashing inodes. Each inode remembers one path; an
  unlinked inode with open files answers getattr from one of its fds.
* Files are opened with direct_io and attribute/entry timeouts are 0: every read, write
  and lookup reaches the gate, so a fault applies to the next call, never served from
  the kernel's caches. Slower than a real filesystem; faithful for fault injection.
* Blocking calls on the source run in worker threads, so a slow source never blocks
  the loop that also serves the control socket.
* RENAME_NOREPLACE/RENAME_EXCHANGE are answered EINVAL (allowed by rename(2)).

Must not be imported by the product. Runs in the trio loop of pyfuse3.main.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import mmap
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3
import trio

from faultlib.misbehave import FaultError, Gate

log = logging.getLogger("badmount")
T = TypeVar("T")


def _errno_of(exc: BaseException) -> int:
    return exc.errno if isinstance(exc, OSError | FaultError) and exc.errno else errno.EIO


def gated(op: str, size_arg: int | None = None) -> Callable[[Any], Any]:
    """Decorator: pass the gate first, turn every error into FUSEError(errno)."""

    def wrap(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(fn)
        async def handler(self: Passthrough, *args: Any) -> T:
            try:
                nbytes = 0
                if size_arg is not None:
                    value = args[size_arg]
                    nbytes = value if isinstance(value, int) else len(value)
                await self.gate.enter(op, nbytes)
                return await fn(self, *args)
            except pyfuse3.FUSEError:
                raise
            except (OSError, FaultError) as exc:
                raise pyfuse3.FUSEError(_errno_of(exc)) from None
            except Exception:
                self.gate.stats.internal_errors += 1  # a bug here; tests insist on none
                log.exception("%s failed unexpectedly; answering EIO", op)
                raise pyfuse3.FUSEError(errno.EIO) from None

        return handler

    return wrap


def _pwrite(fd: int, buf: bytes, off: int) -> int:
    """pwrite; for an O_DIRECT file from a page-aligned copy, as a server whose request
    buffers are aligned writes it. Whether a write is refused then depends only on its
    offset and length, never on where the bytes happened to land in memory."""
    if not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
        return os.pwrite(fd, buf, off)
    with mmap.mmap(-1, max(len(buf), 1)) as aligned:
        aligned[: len(buf)] = buf
        with memoryview(aligned) as view:
            return os.pwrite(fd, view[: len(buf)], off)


async def _io(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    # abandon_on_cancel: a source call stuck in the kernel must not block shutdown.
    call = functools.partial(fn, *args, **kwargs)
    return await trio.to_thread.run_sync(call, abandon_on_cancel=True)


class Passthrough(pyfuse3.Operations):
    """Mirror `source` (see the module docstring)."""

    def __init__(self, source: str, gate: Gate) -> None:
        super().__init__()
        self.source = os.fsencode(os.path.abspath(source))
        self.gate = gate
        self._paths: dict[int, bytes | None] = {pyfuse3.ROOT_INODE: self.source}
        root = os.lstat(self.source)
        self._inodes: dict[tuple[int, int], int] = {(root.st_dev, root.st_ino): pyfuse3.ROOT_INODE}
        self._keys: dict[int, tuple[int, int]] = {pyfuse3.ROOT_INODE: (root.st_dev, root.st_ino)}
        self._lookups: dict[int, int] = {}
        self._next_inode = pyfuse3.ROOT_INODE + 1
        self._fds: dict[int, int] = {}  # fh (an fd) -> inode
        self._dirs: dict[int, tuple[bytes, list[bytes]]] = {}
        self._next_dir = 1

    # -- inode table --------------------------------------------------------------------

    def _path(self, inode: int) -> bytes:
        path = self._paths.get(inode)
        if path is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return path

    def _child(self, parent: int, name: bytes) -> bytes:
        return os.path.join(self._path(parent), name)

    def _remember(self, path: bytes, st: os.stat_result, count: bool) -> pyfuse3.EntryAttributes:
        key = (st.st_dev, st.st_ino)
        inode = self._inodes.get(key)
        if inode is None:
            inode = self._next_inode
            self._next_inode += 1
            self._inodes[key], self._keys[inode] = inode, key
        self._paths[inode] = path
        if count:
            self._lookups[inode] = self._lookups.get(inode, 0) + 1
        return self._attrs(inode, st)

    def _gone(self, path: bytes) -> None:
        """`path` no longer names its inode (unlinked, or replaced by a rename)."""
        for inode, p in self._paths.items():
            if p == path and inode != pyfuse3.ROOT_INODE:
                self._paths[inode] = None

    def _moved(self, old: bytes, new: bytes) -> None:
        prefix = old + b"/"
        for inode, p in list(self._paths.items()):
            if p == old:
                self._paths[inode] = new
            elif p is not None and p.startswith(prefix):
                self._paths[inode] = new + p[len(old) :]

    @staticmethod
    def _attrs(inode: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        for name in (
            "st_mode",
            "st_nlink",
            "st_uid",
            "st_gid",
            "st_rdev",
            "st_size",
            "st_blksize",
            "st_blocks",
            "st_atime_ns",
            "st_mtime_ns",
            "st_ctime_ns",
        ):
            setattr(attr, name, getattr(st, name))
        attr.st_ino = inode
        attr.generation = 0
        attr.entry_timeout = 0
        attr.attr_timeout = 0
        return attr

    async def _stat(self, inode: int) -> pyfuse3.EntryAttributes:
        path = self._paths.get(inode)
        if path is None:
            fd = next((fd for fd, ino in self._fds.items() if ino == inode), None)
            if fd is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attrs(inode, await _io(os.fstat, fd))
        return self._attrs(inode, await _io(os.lstat, path))

    async def _own(self, path: bytes, ctx: pyfuse3.RequestContext) -> None:
        # As root we create files for the caller, like a real filesystem would.
        if os.geteuid() == 0:
            await _io(os.chown, path, ctx.uid, ctx.gid, follow_symlinks=False)

    # -- names --------------------------------------------------------------------------

    @gated("lookup")
    async def lookup(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext) -> Any:
        if name == b".":
            path = self._path(parent)
        elif name == b"..":
            path = (
                os.path.dirname(self._path(parent)) if parent != pyfuse3.ROOT_INODE else self.source
            )
        else:
            path = self._child(parent, name)
        return self._remember(path, await _io(os.lstat, path), count=True)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, n in inode_list:
            left = self._lookups.get(inode, 0) - n
            if left > 0:
                self._lookups[inode] = left
                continue
            self._lookups.pop(inode, None)
            if inode == pyfuse3.ROOT_INODE or inode in self._fds.values():
                continue
            self._paths.pop(inode, None)
            key = self._keys.pop(inode, None)
            if key is not None and self._inodes.get(key) == inode:
                del self._inodes[key]

    @gated("getattr")
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Any:
        return await self._stat(inode)

    @gated("setattr")
    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: pyfuse3.RequestContext
    ) -> Any:
        target: int | bytes = fh if fh is not None else self._path(inode)
        if fields.update_size:
            await _io(os.truncate, target, attr.st_size)
        if fields.update_mode:
            await _io(os.chmod, target, attr.st_mode & 0o7777)
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            await _io(os.chown, target, uid, gid)
        if fields.update_atime or fields.update_mtime:
            st = (
                await _io(os.stat, target)
                if isinstance(target, int)
                else await _io(os.lstat, target)
            )
            times = (
                attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns,
            )
            if isinstance(target, int):
                await _io(os.utime, target, ns=times)
            else:
                await _io(os.utime, target, ns=times, follow_symlinks=False)
        return await self._stat(inode)

    @gated("mkdir")
    async def mkdir(self, parent: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> Any:
        path = self._child(parent, name)
        await _io(os.mkdir, path, mode & ~ctx.umask)
        await self._own(path, ctx)
        return self._remember(path, await _io(os.lstat, path), count=True)

    @gated("rmdir")
    async def rmdir(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._child(parent, name)
        await _io(os.rmdir, path)
        self._gone(path)

    @gated("unlink")
    async def unlink(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._child(parent, name)
        await _io(os.unlink, path)
        self._gone(path)

    @gated("rename")
    async def rename(
        self, p_old: int, old: bytes, p_new: int, new: bytes, flags: int, ctx: Any
    ) -> None:
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        src, dst = self._child(p_old, old), self._child(p_new, new)
        await _io(os.rename, src, dst)
        if src != dst:
            self._gone(dst)
            self._moved(src, dst)

    @gated("readlink")
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await _io(os.readlink, self._path(inode))

    @gated("symlink")
    async def symlink(self, parent: int, name: bytes, target: bytes, ctx: Any) -> Any:
        path = self._child(parent, name)
        await _io(os.symlink, target, path)
        await self._own(path, ctx)
        return self._remember(path, await _io(os.lstat, path), count=True)

    @gated("link")
    async def link(self, inode: int, new_parent: int, new_name: bytes, ctx: Any) -> Any:
        path = self._child(new_parent, new_name)
        await _io(os.link, self._path(inode), path, follow_symlinks=False)
        return self._remember(path, await _io(os.lstat, path), count=True)

    # -- directories --------------------------------------------------------------------

    @gated("opendir")
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        path = self._path(inode)
        # A snapshot per open: offsets stay valid while entries come and go meanwhile.
        listed: list[bytes] = await _io(os.listdir, path)
        names = [b".", b"..", *sorted(listed)]
        fh, self._next_dir = self._next_dir, self._next_dir + 1
        self._dirs[fh] = (path, names)
        return fh

    @gated("readdir")
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        path, names = self._dirs[fh]

        def stat_all() -> list[tuple[int, bytes, os.stat_result]]:
            found = []
            for i in range(start_id, len(names)):
                try:
                    found.append((i, names[i], os.lstat(os.path.join(path, names[i]))))
                except FileNotFoundError:
                    continue  # removed since opendir: skip it, skip nothing else
            return found

        for i, name, st in await _io(stat_all):
            dots = name in (b".", b"..")
            if dots:
                # "." and ".." take no lookup count; give them numbers we already know.
                key = (st.st_dev, st.st_ino)
                attrs = self._attrs(self._inodes.get(key, pyfuse3.ROOT_INODE), st)
            else:
                attrs = self._remember(os.path.join(path, name), st, count=False)
            if not pyfuse3.readdir_reply(token, name, attrs, i + 1):
                break
            if not dots:
                self._lookups[attrs.st_ino] = self._lookups.get(attrs.st_ino, 0) + 1

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @gated("fsyncdir")
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        def sync(path: bytes) -> None:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        await _io(sync, self._dirs[fh][0])

    # -- files --------------------------------------------------------------------------

    @staticmethod
    def _flags(flags: int) -> int:
        # The kernel already placed O_APPEND writes at the end; pwrite on an O_APPEND fd
        # would ignore the offset.
        return (flags & ~os.O_APPEND) | os.O_CLOEXEC

    @gated("open")
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> Any:
        fd = await _io(os.open, self._path(inode), self._flags(flags) & ~os.O_CREAT)
        self._fds[fd] = inode
        return pyfuse3.FileInfo(fh=fd, direct_io=True)

    @gated("create")
    async def create(
        self, parent: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> Any:
        path = self._child(parent, name)
        fd = await _io(os.open, path, self._flags(flags) | os.O_CREAT, mode & ~ctx.umask)
        try:
            await self._own(path, ctx)
            attrs = self._remember(path, await _io(os.fstat, fd), count=True)
        except BaseException:
            os.close(fd)
            raise
        self._fds[fd] = attrs.st_ino
        return pyfuse3.FileInfo(fh=fd, direct_io=True), attrs

    @gated("read", size_arg=2)
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await _io(os.pread, fh, size, off)

    @gated("write", size_arg=2)
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await _io(_pwrite, fh, buf, off)

    @gated("flush")
    async def flush(self, fh: int) -> None:
        return None

    @gated("fsync")
    async def fsync(self, fh: int, datasync: bool) -> None:
        await _io(os.fdatasync if datasync else os.fsync, fh)

    async def release(self, fh: int) -> None:
        inode = self._fds.pop(fh, None)
        try:
            await _io(os.close, fh)
        except OSError:
            pass  # a deferred write error; nobody is left to hear it
        if inode is not None and self._paths.get(inode) is None and inode not in self._lookups:
            self._paths.pop(inode, None)

    @gated("statfs")
    async def statfs(self, ctx: pyfuse3.RequestContext) -> Any:
        st = await _io(os.statvfs, self.source)
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files"):
            setattr(out, name, getattr(st, name))
        out.f_ffree, out.f_favail, out.f_namemax = st.f_ffree, st.f_favail, st.f_namemax
        if self.gate.behaviour.enospc:
            out.f_bfree = out.f_bavail = 0  # df agrees with the ENOSPC the writes get
        return out
