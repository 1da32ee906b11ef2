"""Blocking file operations on one node directory, relative to an open directory fd.

These are the plain synchronous functions that ``LocalStore`` runs in worker threads;
nothing here may be called from a trio task directly (every call can block in the kernel,
e.g. on a hung NFS server or a FIFO).

Symlink safety: every path is resolved one component at a time with ``dir_fd`` and
``O_NOFOLLOW``, starting from the node directory's fd, so a symlink planted anywhere
inside a node (at a key or at a key directory) is refused, never followed, and no race
between a check and a use can redirect us outside the node. The node directory itself
may be a symlink: that is the operator's configuration, not the node's content.

Files are created 0600 and directories 0700 (minus the umask): slivers are private data.

Errors: these functions raise ``NodeError`` where the context decides the class (a
missing node directory is NodeDown, a missing key directory is KeyNotFound, a symlink is
refused) and let any other ``OSError`` propagate for the caller to pass through
``map_os_error``.

Must not import: codec, walrusfs, pyfuse3, trio.

Thread safety: stateless; any number of threads may run these on the same node at once
(temp names are random, renames are atomic, concurrent mkdirs of one directory are fine).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Generator, Iterable

import numpy as np

from backends.errors import KeyExists, KeyNotFound, NodeDown, NodeIOError
from backends.keys import MAX_KEY_BYTES, is_key_component, is_temp_name, new_temp_name

FILE_MODE = 0o600
DIR_MODE = 0o700

_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# No O_NONBLOCK: opening must block exactly as a hung remote filesystem would, and the
# deadline in LocalStore is what bounds it.
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def open_root(node: str) -> int:
    """Open the node directory itself and return its fd.

    Raises NodeDown if it is missing or not a directory; OSError otherwise.
    """
    try:
        return os.open(node, _ROOT_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise NodeDown(
                "node directory is missing or not a directory", path=node, os_errno=exc.errno
            ) from exc
        raise


def _refuse_symlink(node: str, key: str, rel: str) -> NodeIOError:
    return NodeIOError(
        f"refusing to follow the symlink at {rel!r} inside the node directory",
        path=node,
        key=key,
        os_errno=errno.ELOOP,
    )


def _is_symlink(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def open_key_dir(
    root_fd: int, node: str, key: str, parts: tuple[str, ...], *, create: bool, durable: bool
) -> int:
    """Open the directory ``parts`` under the node root (creating it if ``create``); return its fd.

    Raises KeyNotFound (missing, or a file in the way, when not creating), NodeIOError (a
    symlink in the way, or a file in the way when creating), OSError.
    """
    fd = os.dup(root_fd)
    try:
        for depth, name in enumerate(parts):
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise KeyNotFound("no such key directory", path=node, key=key) from None
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, DIR_MODE, dir_fd=fd)
                if durable:
                    # The new entry must be durable before anything inside it is; sync
                    # even if a concurrent writer won the mkdir, as its fsync may be pending.
                    os.fsync(fd)
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except NotADirectoryError:
                rel = "/".join(parts[: depth + 1])
                if _is_symlink(fd, name):
                    raise _refuse_symlink(node, key, rel) from None
                if not create:
                    raise KeyNotFound(f"{rel!r} is not a directory", path=node, key=key) from None
                raise NodeIOError(
                    f"cannot create key directory {rel!r}: a non-directory is in the way",
                    path=node,
                    key=key,
                    os_errno=errno.ENOTDIR,
                ) from None
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


# Files at least this large get their writeback started as soon as they are written.
WRITEBACK_HINT_BYTES = 256 << 10
# Files at least this large are written with O_DIRECT when the caller asks (see
# direct_writes_help): the page cache costs this VM ~2 ms of kernel CPU per MiB written
# (page allocation, copy, writeback), and sliver files are most of a put's work (3.7x
# the data at n=7). Measured, 1.6 GB of 2.3 MB files from 4 threads: 600-1000 MB/s with
# 1.6-3.8 s of system time buffered, 1230-1340 MB/s with 0.4-0.5 s direct.
DIRECT_MIN_BYTES = 256 << 10
_DIRECT_ALIGN = 4096  # of memory, file offsets and lengths: a page satisfies every disk
# Local filesystems on block devices, where O_DIRECT goes straight to the disk. Network
# and FUSE filesystems are left buffered: there O_DIRECT means a synchronous round trip
# per write, or is passed to a server that may not take it.
_DIRECT_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "bcachefs"})
# Aligned bounce buffers kept for reuse (a fresh one costs page faults), up to a size.
_SPARE_BUFFERS = 8
_SPARE_MAX_BYTES = 16 << 20
_spare: list[mmap.mmap] = []
_spare_lock = threading.Lock()


def direct_writes_help(fstype: str | None) -> bool:
    """Whether large files on a filesystem of this type are better written O_DIRECT."""
    return fstype in _DIRECT_FILESYSTEMS


def write_atomic(
    root_fd: int,
    node: str,
    key: str,
    parts: tuple[str, ...],
    data: bytes | memoryview | tuple[bytes | memoryview, ...],
    *,
    durable: bool,
    direct: bool = False,
    replace: bool = True,
) -> bool:
    """Write ``data`` (or its pieces, in order) to a temp file beside the key, fsync,
    rename over the key, fsync the directory. With ``direct``, a large file is written
    with O_DIRECT; returns False if the filesystem refused that (then it was written
    buffered), else True. Without ``replace``, a regular file of the same size at the key
    is left as it is (KeyExists); one of another size is damaged, and replaced.

    On any failure the temp file is removed (best effort) and the key keeps its old value.
    Raises KeyExists, NodeIOError (symlink or file where a key directory belongs), OSError.
    """
    dir_fd = open_key_dir(root_fd, node, key, parts[:-1], create=True, durable=durable)
    try:
        pieces = data if isinstance(data, tuple) else (data,)
        size = sum(memoryview(p).nbytes for p in pieces)
        if not replace and _regular_size(dir_fd, parts[-1]) == size:
            raise KeyExists("already stored", path=node, key=key)
        wanted = direct and size >= DIRECT_MIN_BYTES
        took = wanted and _publish(dir_fd, parts[-1], pieces, size, durable=durable, direct=True)
        if not took:
            _publish(dir_fd, parts[-1], pieces, size, durable=durable, direct=False)
        if durable:
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return took or not wanted


def _regular_size(dir_fd: int, name: str) -> int | None:
    """The size of the regular file `name`; None if there is none (or something else)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _publish(
    dir_fd: int,
    name: str,
    pieces: tuple[bytes | memoryview, ...],
    size: int,
    *,
    durable: bool,
    direct: bool,
) -> bool:
    """Write a temp file and rename it to `name`. False, leaving nothing behind, if
    `direct` and the filesystem refuses O_DIRECT (EINVAL)."""
    tmp = new_temp_name()
    try:
        fd = os.open(tmp, _CREATE_FLAGS | (os.O_DIRECT if direct else 0), FILE_MODE, dir_fd=dir_fd)
    except OSError as exc:
        if direct and exc.errno == errno.EINVAL:
            return False
        raise
    published = False
    try:
        try:
            if direct:
                if not _write_direct(fd, pieces, size):
                    return False
            else:
                _write_all(fd, pieces)
            if durable:
                os.fsync(fd)
            elif size >= WRITEBACK_HINT_BYTES and not direct:
                # Start writeback now, without waiting: a later fsync/syncfs then finds
                # little left to write, and the disk works while the caller computes.
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            # NFS reports deferred write errors at close; they must fail the put.
            os.close(fd)
        # rename() replaces a symlink at the key instead of following it: safe.
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        published = True
    finally:
        if not published:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
    return True


def _write_direct(fd: int, pieces: tuple[bytes | memoryview, ...], size: int) -> bool:
    """Write the pieces through an aligned bounce buffer: its aligned part with O_DIRECT,
    the last partial page buffered (cutting a padded file instead would make the kernel
    read that page back from the disk). False if the filesystem refuses (EINVAL, also for
    the tail, or a short write that leaves the next one unaligned)."""
    aligned = size // _DIRECT_ALIGN * _DIRECT_ALIGN
    buf = _take_buffer(size)
    try:
        _gather_into(buf, pieces)
        with memoryview(buf) as view:
            done = 0
            while done < aligned:
                if done % _DIRECT_ALIGN:
                    return False
                try:
                    done += os.pwrite(fd, view[done:aligned], done)
                except OSError as exc:
                    if exc.errno == errno.EINVAL:
                        return False
                    raise
            if done < size:
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                try:
                    while done < size:
                        done += os.pwrite(fd, view[done:size], done)
                except OSError as exc:
                    # A FUSE or network server keeps its own file O_DIRECT whatever we
                    # clear here, and then refuses the unaligned tail.
                    if exc.errno == errno.EINVAL:
                        return False
                    raise
        return True
    finally:
        _give_buffer(buf)


def _gather_into(buf: mmap.mmap, pieces: tuple[bytes | memoryview, ...]) -> None:
    """Copy the pieces to the start of `buf`. numpy's copy lets go of the GIL (a
    memoryview assignment holds it: 2.3 MB per sliver file, while the FUSE loop waits)."""
    dst = np.frombuffer(buf, dtype=np.uint8)
    pos = 0
    for piece in pieces:
        src = np.frombuffer(piece, dtype=np.uint8)
        dst[pos : pos + src.size] = src
        pos += src.size


def _take_buffer(size: int) -> mmap.mmap:
    """A page-aligned buffer of at least `size` bytes (anonymous maps are page-aligned)."""
    with _spare_lock:
        for i, buf in enumerate(_spare):
            if len(buf) >= size:
                return _spare.pop(i)
    return mmap.mmap(-1, size)


def _give_buffer(buf: mmap.mmap) -> None:
    """Keep `buf` for reuse, preferring the larger buffers; close what is not kept."""
    if len(buf) > _SPARE_MAX_BYTES:
        buf.close()
        return
    with _spare_lock:
        if len(_spare) < _SPARE_BUFFERS:
            _spare.append(buf)
            return
        smallest = min(range(len(_spare)), key=lambda i: len(_spare[i]))
        if len(_spare[smallest]) < len(buf):
            buf, _spare[smallest] = _spare[smallest], buf
    buf.close()


_APPEND_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


def append_key(
    root_fd: int, node: str, key: str, parts: tuple[str, ...], data: bytes, *, durable: bool
) -> None:
    """Append ``data`` to the key's file (created 0600 if missing), fdatasync if durable.

    One write call where the kernel takes it all, so concurrent appenders do not
    interleave on a local filesystem. Raises NodeIOError (a symlink at the key or a
    key directory), OSError.
    """
    dir_fd = open_key_dir(root_fd, node, key, parts[:-1], create=True, durable=durable)
    try:
        fd, st = _open_for_writing(dir_fd, node, key, parts[-1], _APPEND_FLAGS)
        try:
            try:
                _write_all(fd, (data,))
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    _cut_torn_tail(fd, st.st_size, len(data))
                raise
            if durable:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        if durable:
            os.fsync(dir_fd)  # a new key's name must survive too
    finally:
        os.close(dir_fd)


def reserve_key(root_fd: int, node: str, key: str, parts: tuple[str, ...], size: int) -> bool:
    """Make the key's file (created 0600) hold ``size`` bytes of allocated space, grown
    or cut (which gives the rest back); returns False if it held that already.

    Space is allocated (posix_fallocate), not merely addressed: a sparse file would
    give nothing back when deleted. Where fallocate is unsupported the bytes are
    written, and not as zeros, which a compressing filesystem would store in nothing.
    A failed call leaves the file as it was, or no file. Raises NodeIOError (a symlink
    or something else than a regular file at the key), OSError.
    """
    dir_fd = open_key_dir(root_fd, node, key, parts[:-1], create=True, durable=False)
    try:
        fd, st = _open_for_writing(dir_fd, node, key, parts[-1], _RESERVE_FLAGS)
        try:
            if st.st_size > size:
                os.ftruncate(fd, size)
                return True
            if st.st_size == size and st.st_blocks * 512 >= size:
                return False
            try:
                _allocate(fd, size)
            except BaseException:
                with contextlib.suppress(OSError):
                    if st.st_size:
                        os.ftruncate(fd, st.st_size)
                    else:
                        os.unlink(parts[-1], dir_fd=dir_fd)
                raise
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)
    return True


_RESERVE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
_FILLER = b"walrusfs space reserve\n" * 2731  # 64 KiB give or take; not zeros


def _allocate(fd: int, size: int) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
        return
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    os.lseek(fd, 0, os.SEEK_SET)
    left = size
    while left > 0:
        left -= os.write(fd, _FILLER[: min(left, len(_FILLER))])


def _open_for_writing(
    dir_fd: int, node: str, key: str, name: str, flags: int
) -> tuple[int, os.stat_result]:
    """Open (creating 0600) the regular file of a key; returns (fd, its stat). Raises
    NodeIOError (a symlink or something else at the key), OSError."""
    try:
        fd = os.open(name, flags, FILE_MODE, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refuse_symlink(node, key, key) from None
        raise
    return fd, _stat_regular(fd, node, key)


def _stat_regular(fd: int, node: str, key: str) -> os.stat_result:
    """fstat an opened key's file, which must be a regular one; closes it if not."""
    try:
        st = os.fstat(fd)
        _check_regular(st.st_mode, node, key)
    except BaseException:
        os.close(fd)
        raise
    return st


def _cut_torn_tail(fd: int, size: int, most: int) -> None:
    """Cut what an append that ran out of space wrote past `size` (at most `most`
    bytes), best effort: readers would skip it, but on a full filesystem it is the space
    the next, smaller append (a delete's record) needs."""
    with contextlib.suppress(OSError):
        if size < os.fstat(fd).st_size <= size + most:
            os.ftruncate(fd, size)


def _write_all(fd: int, pieces: tuple[bytes | memoryview, ...]) -> int:
    """Write every piece in order (one writev where the kernel takes it all); return the size."""
    views = [memoryview(p).cast("B") for p in pieces if len(p)]
    total = sum(len(v) for v in views)
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]
    return total


def _open_key_file(root_fd: int, node: str, key: str, parts: tuple[str, ...]) -> int:
    dir_fd = open_key_dir(root_fd, node, key, parts[:-1], create=False, durable=False)
    try:
        return os.open(parts[-1], _READ_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise KeyNotFound("no such key", path=node, key=key) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refuse_symlink(node, key, key) from None
        raise
    finally:
        os.close(dir_fd)


def _check_regular(mode: int, node: str, key: str) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise KeyNotFound("is a key directory, not a key", path=node, key=key)
    if stat.S_ISLNK(mode):
        raise _refuse_symlink(node, key, key)
    raise NodeIOError("not a regular file", path=node, key=key)


def _open_regular(root_fd: int, node: str, key: str, parts: tuple[str, ...]) -> tuple[int, int]:
    """Open the key's file for reading; return (fd, size). Raises as read_range."""
    fd = _open_key_file(root_fd, node, key, parts)
    return fd, _stat_regular(fd, node, key).st_size


def _advise_range(fd: int, offset: int, want: int, size: int) -> None:
    """Ask for no read-ahead when reading less than the whole file.

    A range read wants exactly this range (a sliver file is read a sliver or a symbol at a
    time): kernel read-ahead would also fetch the bytes after it, measured here as 30-40%
    slower cold reads of primary slivers.
    """
    if offset > 0 or want < size:
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)


def read_range(
    root_fd: int, node: str, key: str, parts: tuple[str, ...], offset: int, length: int | None
) -> bytes:
    """Read up to ``length`` bytes at ``offset`` (to EOF if None); short if the file is.

    Raises KeyNotFound, NodeIOError (symlink, not a regular file), OSError.
    """
    fd, size = _open_regular(root_fd, node, key, parts)
    try:
        # Clamp to the file size: a caller asking for "a lot" must not make us allocate it.
        want = max(0, size - offset)
        if length is not None:
            want = min(want, length)
        if want == 0:
            return b""
        _advise_range(fd, offset, want, size)
        first = os.pread(fd, want, offset)
        if len(first) == want or not first:
            return first
        # Short reads happen on network filesystems; keep going until EOF.
        chunks = [first]
        got = len(first)
        while got < want:
            chunk = os.pread(fd, want - got, offset + got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_into(
    root_fd: int,
    node: str,
    key: str,
    parts: tuple[str, ...],
    offset: int,
    buffers: tuple[memoryview, ...],
) -> int:
    """Fill ``buffers``, one after another, from ``offset`` with vectored reads; return
    how many bytes arrived (fewer at EOF). No intermediate copy: the kernel writes the
    caller's memory directly.

    Raises KeyNotFound, NodeIOError (symlink, not a regular file), OSError.
    """
    fd, size = _open_regular(root_fd, node, key, parts)
    try:
        _advise_range(fd, offset, sum(len(b) for b in buffers), size)
        got = 0
        rest = [b for b in buffers if len(b)]
        while rest:
            n = os.preadv(fd, rest, offset + got)
            if n == 0:
                break
            got += n
            # Short reads happen on network filesystems: continue where this one ended.
            while rest and n >= len(rest[0]):
                n -= len(rest.pop(0))
            if rest and n:
                rest[0] = rest[0][n:]
        return got
    finally:
        os.close(fd)


def key_size(root_fd: int, node: str, key: str, parts: tuple[str, ...]) -> int:
    """Return the size of the key's file without opening it.

    Raises KeyNotFound, NodeIOError (symlink, not a regular file), OSError.
    """
    dir_fd = open_key_dir(root_fd, node, key, parts[:-1], create=False, durable=False)
    try:
        st = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        raise KeyNotFound("no such key", path=node, key=key) from None
    finally:
        os.close(dir_fd)
    _check_regular(st.st_mode, node, key)
    return st.st_size


def delete_key(root_fd: int, node: str, key: str, parts: tuple[str, ...]) -> None:
    """Unlink the key's file (a symlink there is unlinked, not followed); missing is fine.

    Raises NodeIOError (symlinked key directory), OSError.
    """
    try:
        dir_fd = open_key_dir(root_fd, node, key, parts[:-1], create=False, durable=False)
    except KeyNotFound:
        return
    try:
        os.unlink(parts[-1], dir_fd=dir_fd)
    except (FileNotFoundError, IsADirectoryError):
        # A key directory is not a key, so there is no key to delete.
        return
    finally:
        os.close(dir_fd)


def _scan(
    dir_fd: int, rel: str, *, recursive: bool = True
) -> Generator[tuple[int, str, os.DirEntry[str]], None, None]:
    """Yield (fd of the entry's directory, key-relative dir path, entry) for a whole subtree
    (or for the directory alone if not `recursive`).

    Only descends into real directories named like key components; takes ownership of
    ``dir_fd`` and closes every fd it opens, even if the consumer stops early.
    """
    stack = [(dir_fd, rel)]
    try:
        while stack:
            fd, here = stack.pop()
            try:
                with os.scandir(fd) as entries:
                    subdirs: list[str] = []
                    for entry in entries:
                        yield fd, here, entry
                        if (
                            recursive
                            and is_key_component(entry.name)
                            and entry.is_dir(follow_symlinks=False)
                        ):
                            subdirs.append(entry.name)
                for name in subdirs:
                    child_rel = f"{here}/{name}" if here else name
                    if len(child_rel) >= MAX_KEY_BYTES:
                        continue  # nothing below could be a valid key
                    try:
                        child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    except (FileNotFoundError, NotADirectoryError):
                        continue  # removed or swapped for a symlink since listed
                    stack.append((child, child_rel))
            finally:
                os.close(fd)
    finally:
        for fd, _ in stack:
            os.close(fd)


def list_tree(root_fd: int, node: str, prefix: str, parts: tuple[str, ...]) -> list[str]:
    """Return all keys (regular files with key names) under ``parts``, sorted.

    Raises NodeIOError (symlinked prefix directory), OSError.
    """
    try:
        fd = open_key_dir(root_fd, node, prefix, parts, create=False, durable=False)
    except KeyNotFound:
        return []
    keys: list[str] = []
    with contextlib.closing(_scan(fd, prefix)) as walk:
        for _, here, entry in walk:
            if is_key_component(entry.name) and entry.is_file(follow_symlinks=False):
                key = f"{here}/{entry.name}" if here else entry.name
                if len(key) <= MAX_KEY_BYTES:
                    keys.append(key)
    keys.sort()
    return keys


def remove_stale_temps(
    root_fd: int,
    node: str,
    older_than: float,
    prefix: str = "",
    parts: tuple[str, ...] = (),
    *,
    recursive: bool = True,
) -> int:
    """Unlink temp files whose mtime is more than ``older_than`` seconds ago; return the count.

    Looks in the key directory ``parts`` (the node directory if empty), and below it if
    ``recursive``. Raises NodeIOError (a symlinked prefix directory), OSError.
    """
    # mtime is wall-clock time stamped by the (maybe remote) filesystem, so compare with
    # the wall clock, not a monotonic one.
    cutoff = time.time() - older_than
    try:
        top = open_key_dir(root_fd, node, prefix, parts, create=False, durable=False)
    except KeyNotFound:
        return 0
    removed = 0
    with contextlib.closing(_scan(top, prefix, recursive=recursive)) as walk:
        for fd, _, entry in walk:
            if not is_temp_name(entry.name) or not entry.is_file(follow_symlinks=False):
                continue
            try:
                if entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                    continue
                os.unlink(entry.name, dir_fd=fd)
            except FileNotFoundError:
                continue  # its writer renamed or removed it meanwhile
            removed += 1
    return removed


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn: Callable[[int], int] = libc.syncfs
    except (OSError, AttributeError):
        return None
    return fn


_SYNCFS = _load_syncfs()


def syncfs(root_fd: int) -> None:
    """syncfs(2) on the node directory's filesystem; os.sync() where unavailable."""
    if _SYNCFS is None:
        os.sync()
        return
    if _SYNCFS(root_fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# Filesystem types whose syncfs(2) does not reach the storage behind them: the kernel sends
# no sync request to a FUSE server (FUSE_SYNCFS goes to virtiofs only), nor to an SMB or
# 9p server. Data written there is durable only once each file is fsynced.
_SYNCFS_BLIND = ("fuse", "fuseblk", "cifs", "smb3", "9p")


# Filesystem types that keep a directory's inode number for its life: one found at a path
# under another number is another directory. Network and FUSE filesystems may number
# inodes afresh (sshfs without use_ino, SMB with noserverino).
_STABLE_INODES = ("ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs", "zfs", "bcachefs")


def inodes_are_stable(fstype: str | None) -> bool:
    """Whether a directory on a filesystem of this type keeps its inode number."""
    return fstype in _STABLE_INODES


def filesystem_type(dev: int, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The type (ext4, nfs4, fuse.sshfs, ...) of the mounted filesystem whose device number
    is ``dev`` (an ``st_dev``), or None if no mount has it.

    Blocking: reads procfs. Raises OSError if ``mountinfo`` cannot be read.
    """
    want = f"{os.major(dev)}:{os.minor(dev)}".encode()
    with open(mountinfo, "rb") as f:
        text = f.read()
    for line in text.splitlines():
        fields = line.split(b" ")
        # id parent major:minor root mountpoint options [optional...] - type source ...
        if len(fields) > 7 and fields[2] == want and b"-" in fields[6:]:
            sep = fields.index(b"-", 6)
            if sep + 1 < len(fields):
                return os.fsdecode(fields[sep + 1])
    return None


def syncfs_is_durable(fstype: str | None) -> bool:
    """Whether syncfs on a filesystem of this type puts its data on stable storage."""
    if fstype is None:
        return False  # unknown: take the safe road (fsync the files)
    return not (fstype.startswith("fuse.") or fstype in _SYNCFS_BLIND)


def fsync_keys(root_fd: int, node: str, keys: Iterable[tuple[str, tuple[str, ...]]]) -> None:
    """fsync each (key, parts) file and, once each, the key directories holding them.

    Keys deleted meanwhile are skipped. Raises NodeIOError (a symlink in the way), OSError.
    """
    dirs: dict[tuple[str, ...], str] = {}
    for key, parts in keys:
        try:
            fd = _open_key_file(root_fd, node, key, parts)
        except KeyNotFound:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        dirs.setdefault(parts[:-1], key)
    for parent, key in dirs.items():
        try:
            fd = open_key_dir(root_fd, node, key, parent, create=False, durable=False)
        except KeyNotFound:
            continue
        try:
            os.fsync(fd)  # the renames that published the files
        finally:
            os.close(fd)


def free_space(root_fd: int) -> tuple[int, int]:
    """Return (bytes available to unprivileged writers, total bytes) of the node's filesystem.

    Raises OSError.
    """
    st = os.fstatvfs(root_fd)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def probe(root_fd: int, node: str) -> None:
    """Check the node really stores bytes: statvfs, write+fsync, read back, delete a temp.

    Raises NodeIOError (read back differs), OSError (ENOSPC, EROFS, EACCES, ...).
    """
    os.fstatvfs(root_fd)
    name = new_temp_name("probe-")
    payload = secrets.token_bytes(32)
    fd = os.open(name, _CREATE_FLAGS, FILE_MODE, dir_fd=root_fd)
    try:
        try:
            _write_all(fd, (payload,))
            os.fsync(fd)
        finally:
            os.close(fd)
        fd = os.open(name, _READ_FLAGS, dir_fd=root_fd)
        try:
            echoed = os.pread(fd, len(payload) + 1, 0)
        finally:
            os.close(fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=root_fd)
    if echoed != payload:
        raise NodeIOError(
            f"probe file read back {len(echoed)} bytes that differ from the {len(payload)} written",
            path=node,
        )
