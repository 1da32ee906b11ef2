#!/usr/bin/env python3
"""memfuse.py - the least a pyfuse3 filesystem can cost: one that keeps everything in memory.

    memfuse.py MOUNTPOINT      # serves until unmounted (fusermount3 -u MOUNTPOINT)

A benchmark reference, not a filesystem to use: bench_fs.py extracts its small files
through it to show what the kernel round trips and pyfuse3's dispatch alone cost here,
with no storage behind them. It answers what `tar -x`, `cp` and `cat` ask (lookup,
create, write, read, setattr, mkdir, readdir, getxattr) with the same mount options and
writeback cache as walrusfs, and nothing more: no permissions, no links, no persistence.
Its memory grows with what is written into it.

Nothing imports this script; it runs with the project's .venv/bin/python.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import time

import pyfuse3
import trio
from pyfuse3 import EntryAttributes, FileInfo, FUSEError

TIMEOUT = 300.0  # as walrusfs.fuse_ops: nothing else changes the tree


class MemOperations(pyfuse3.Operations):
    """Inodes, names and bytes in dicts."""

    enable_writeback_cache = True

    def __init__(self) -> None:
        super().__init__()
        self.attrs: dict[int, EntryAttributes] = {}
        self.children: dict[int, dict[bytes, int]] = {}
        self.data: dict[int, bytearray] = {}
        self.next_inode = pyfuse3.ROOT_INODE + 1
        self._new(pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o755)
        self.children[pyfuse3.ROOT_INODE] = {}

    def _new(self, ino: int, mode: int) -> EntryAttributes:
        e = EntryAttributes()
        e.st_ino = ino
        e.st_mode = mode
        e.st_nlink = 2 if stat.S_ISDIR(mode) else 1
        e.st_uid, e.st_gid = os.getuid(), os.getgid()
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = time.time_ns()
        e.st_blksize = 1 << 20
        e.entry_timeout = e.attr_timeout = TIMEOUT
        self.attrs[ino] = e
        return e

    def _add(self, parent: int, name: bytes, mode: int) -> EntryAttributes:
        if name in self.children[parent]:
            raise FUSEError(errno.EEXIST)
        ino, self.next_inode = self.next_inode, self.next_inode + 1
        self.children[parent][name] = ino
        return self._new(ino, mode)

    async def lookup(self, parent_inode, name, ctx):  # type: ignore[no-untyped-def]
        ino = self.children[parent_inode].get(name)
        if ino is None:
            e = EntryAttributes()  # st_ino 0: a negative entry the kernel may cache
            e.entry_timeout = TIMEOUT
            return e
        return self.attrs[ino]

    async def getattr(self, inode, ctx):  # type: ignore[no-untyped-def]
        return self.attrs[inode]

    async def setattr(self, inode, attr, fields, fh, ctx):  # type: ignore[no-untyped-def]
        e = self.attrs[inode]
        if fields.update_size:
            del self.data[inode][attr.st_size :]
            e.st_size = attr.st_size
        for wanted, name in (
            (fields.update_mode, "st_mode"),
            (fields.update_uid, "st_uid"),
            (fields.update_gid, "st_gid"),
            (fields.update_atime, "st_atime_ns"),
            (fields.update_mtime, "st_mtime_ns"),
        ):
            if wanted:
                setattr(e, name, getattr(attr, name))
        return e

    async def mkdir(self, parent_inode, name, mode, ctx):  # type: ignore[no-untyped-def]
        e = self._add(parent_inode, name, stat.S_IFDIR | mode)
        self.children[e.st_ino] = {}
        return e

    async def create(self, parent_inode, name, mode, flags, ctx):  # type: ignore[no-untyped-def]
        e = self._add(parent_inode, name, stat.S_IFREG | mode)
        self.data[e.st_ino] = bytearray()
        return FileInfo(fh=e.st_ino), e

    async def open(self, inode, flags, ctx):  # type: ignore[no-untyped-def]
        return FileInfo(fh=inode)

    async def read(self, fh, off, size):  # type: ignore[no-untyped-def]
        return bytes(self.data[fh][off : off + size])

    async def write(self, fh, off, buf):  # type: ignore[no-untyped-def]
        data = self.data[fh]
        if len(data) < off:
            data.extend(bytes(off - len(data)))
        data[off : off + len(buf)] = buf
        self.attrs[fh].st_size = len(data)
        return len(buf)

    async def getxattr(self, inode, name, ctx):  # type: ignore[no-untyped-def]
        raise FUSEError(pyfuse3.ENOATTR)

    async def opendir(self, inode, ctx):  # type: ignore[no-untyped-def]
        return inode

    async def readdir(self, fh, start_id, token):  # type: ignore[no-untyped-def]
        entries = list(self.children[fh].items())
        for i, (name, ino) in enumerate(entries[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self.attrs[ino], i):
                break


async def serve(mountpoint: str) -> None:
    options = set(pyfuse3.default_options) | {"fsname=memfuse", "noatime"}
    pyfuse3.init(MemOperations(), mountpoint, options)
    try:
        await pyfuse3.main()
    finally:
        pyfuse3.close(unmount=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mountpoint")
    trio.run(serve, parser.parse_args().mountpoint)


if __name__ == "__main__":
    main()
