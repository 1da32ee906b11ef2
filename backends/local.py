"""LocalStore: a node store in a directory, every blocking call in a worker thread under a deadline.

Each call validates its key first (InvalidKey never touches disk), then runs one plain
function from ``backends.files`` through ``trio.to_thread.run_sync`` with this store's own
``CapacityLimiter`` inside ``trio.fail_after(timeout)``. A call that overruns is
abandoned and raises NodeTimeout. The abandoned thread keeps its limiter token until the
kernel lets it go, so a hung node fills only its own limiter: later calls on that node
wait for a token under their own deadline and time out too, while calls on other nodes
never notice. ``busy_threads`` shows how many tokens are held, i.e. how stuck a node is.

An abandoned ``put`` may still complete after its caller saw NodeTimeout. That is safe
because the rename is atomic and keys are content-derived (a late rename writes the same
bytes), and because ``put`` hands the thread immutable data: bytes or a read-only view
(promised never to change), else its own copy.

The node directory is never created here: a missing one is NodeDown, because creating it
could paper over a dropped mount or a mistyped path.

Must not import: codec, walrusfs, pyfuse3.

Thread/task safety: any number of trio tasks of one run may call a store concurrently;
the store's only mutable state is its limiter and, on a filesystem without a durable
syncfs, the keys awaiting a flush (guarded by a lock). Do not share a store across runs.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import TypeVar

import trio

from backends import files
from backends.base import Buffer, NodeStore, Payload
from backends.errors import KeyNotFound, NodeDown, NodeTimeout, map_os_error
from backends.keys import check_key, check_prefix

log = logging.getLogger(__name__)

T = TypeVar("T")

# Keys a store on a filesystem without durable syncfs remembers for its next flush; past
# this, writes there are fsynced at once.
UNSYNCED_MAX = 16384  # ~150 bytes each


def _immutable(piece: Buffer) -> bytes | memoryview:
    """The piece itself if nobody can change it (bytes, a read-only view), else a copy."""
    if isinstance(piece, bytes) or (isinstance(piece, memoryview) and piece.readonly):
        return piece
    return bytes(piece)


class LocalStore(NodeStore):
    """A node directory on a local (or already-mounted) filesystem."""

    timeout: float
    max_threads: int

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = 10.0,
        max_threads: int = 4,
        name: str | None = None,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, not {timeout!r}")
        if max_threads < 1:
            raise ValueError(f"max_threads must be >= 1, not {max_threads!r}")
        # abspath does no I/O; a relative path would silently change meaning with the cwd.
        super().__init__(os.path.abspath(os.fspath(path)), name=name)
        self.timeout = timeout
        self.max_threads = max_threads
        self._limiter = trio.CapacityLimiter(max_threads)
        # Where syncfs is not durable: keys written since the last flush (see syncfs).
        # What this node's filesystem is like, for the st_dev it was learnt on: whether
        # syncfs makes writes durable, whether large files are written O_DIRECT.
        self._fs_traits: tuple[int, bool, bool, bool] | None = None
        # (st_dev, st_ino) of the directory a probe last found to be this node: calls
        # refuse any other directory at the path (see pin). None: nothing pinned.
        self._pinned: tuple[int, int] | None = None
        self._sync_lock = threading.Lock()
        self._unsynced: set[str] = set()

    @property
    def busy_threads(self) -> int:
        """How many worker threads hold this node's limiter (abandoned ones included)."""
        return int(self._limiter.borrowed_tokens)

    def _open_root(self) -> int:
        """Open the node directory for one operation (worker thread only).

        Raises NodeDown, OSError. Subclasses add checks here; it runs under the deadline.
        """
        return files.open_root(self.path)

    def run_blocking(self, key: str | None, fn: Callable[[int], T], *, pinned: bool = True) -> T:
        """Run ``fn(root_fd)`` here and now, mapping OSErrors (worker thread only).

        No deadline and no limiter: for callers that bound the thread themselves (see
        backends.batch). Without `pinned`, any directory at the path will do (see pin).
        Raises NodeError.
        """
        try:
            root = self._open_root()
            try:
                if pinned and self._pinned is not None:
                    self._check_pinned(root)
                return fn(root)
            finally:
                os.close(root)
        except OSError as exc:
            raise map_os_error(exc, self.path, key=key) from exc

    def pin(self, where: tuple[int, int] | None) -> None:
        """From now on calls refuse (NodeDown) any directory at the node's path but `where`,
        a place `get_pinning` reported once what it read there was trusted. A disk swapped
        in under a mount then takes no writes before a probe has seen what it is. None
        (also what `get_pinning` reports where inode numbers are not stable) unpins."""
        self._pinned = where

    def _check_pinned(self, root: int) -> None:
        st = os.fstat(root)
        if (st.st_dev, st.st_ino) != self._pinned:
            raise NodeDown(
                "another directory is at this path now (a disk swapped or remounted under "
                "the mount?); it takes nothing until a probe has checked what it is",
                path=self.path,
            )

    async def get_pinning(self, key: str) -> tuple[bytes, tuple[int, int] | None]:
        """The whole of ``key`` from the directory at the path now, pinned or not, and
        where it was read (see pin): None where this filesystem's inode numbers are not
        stable. Raises what get raises."""
        parts = check_key(key)

        def read(root: int) -> tuple[bytes, tuple[int, int] | None]:
            data = files.read_range(root, self.path, key, parts, 0, None)
            st = os.fstat(root)
            stable = self._traits(root)[3]
            return data, (st.st_dev, st.st_ino) if stable else None

        return await self._run("get", key, read, pinned=False)

    async def _run(
        self, op: str, key: str | None, fn: Callable[[int], T], *, pinned: bool = True
    ) -> T:
        """Run ``fn(root_fd)`` in a worker thread under the deadline, mapping OSErrors.

        Raises NodeTimeout, NodeError.
        """
        try:
            with trio.fail_after(self.timeout):
                return await trio.to_thread.run_sync(
                    lambda: self.run_blocking(key, fn, pinned=pinned),
                    abandon_on_cancel=True,
                    limiter=self._limiter,
                )
        except trio.TooSlowError:
            busy = self.busy_threads
            stuck = (
                f"; all {self.max_threads} worker threads of this node are busy, earlier "
                "calls may be hung"
                if busy >= self.max_threads
                else ""
            )
            log.debug(
                "%s: %s timed out after %ss (%d threads busy)", self.name, op, self.timeout, busy
            )
            raise NodeTimeout(
                f"{op} did not finish within {self.timeout:g}s and was abandoned{stuck}",
                path=self.path,
                key=key,
            ) from None

    async def put(
        self, key: str, data: Payload, *, durable: bool = True, replace: bool = True
    ) -> None:
        """Store ``data`` under ``key`` atomically (durably unless ``durable=False``); see
        NodeStore.put for ``replace``.

        Raises InvalidKey, KeyExists, NodeFull, NodePermissionError, NodeDown, NodeTimeout,
        NodeIOError.
        """
        await self._run("put", key, self.put_job(key, data, durable=durable, replace=replace))

    def put_job(
        self, key: str, data: Payload, *, durable: bool, replace: bool = True
    ) -> Callable[[int], None]:
        """The blocking body of a put, for `_run` or `run_blocking`. Raises InvalidKey.

        The thread may outlive its caller (abandoned on timeout); a caller reusing its
        buffer must not be able to change what the late rename publishes. Read-only
        views are taken as a promise that nobody writes the buffer (the blob store
        hands over fresh read-only arrays): copying megabytes here would hold the GIL.
        """
        parts = check_key(key)
        pieces = data if isinstance(data, tuple) else (data,)
        payload = tuple(_immutable(p) for p in pieces)

        def job(root: int) -> None:
            dev, syncfs_durable, direct, stable = self._traits(root)
            if not files.write_atomic(
                root,
                self.path,
                key,
                parts,
                payload,
                durable=durable,
                direct=direct,
                replace=replace,
            ):
                # Refused: buffered from now on.
                self._fs_traits = (dev, syncfs_durable, False, stable)
            if not durable:
                self._note_unsynced(root, key, parts, syncfs_durable)

        return job

    async def append(self, key: str, data: bytes, *, durable: bool = False) -> None:
        """Append ``data`` to ``key`` in one write (see NodeStore.append).

        Raises InvalidKey, NodeFull, NodePermissionError, NodeDown, NodeTimeout, NodeIOError.
        """
        await self._run("append", key, self.append_job(key, data, durable=durable))

    def append_job(self, key: str, data: bytes, *, durable: bool) -> Callable[[int], None]:
        """The blocking body of an append, for `_run` or `run_blocking`. Raises InvalidKey."""
        parts = check_key(key)
        payload = bytes(data)  # immutable: an abandoned thread may append it later

        def job(root: int) -> None:
            files.append_key(root, self.path, key, parts, payload, durable=durable)
            if not durable:
                self._note_unsynced(root, key, parts)

        return job

    async def reserve(self, key: str, size: int) -> bool:
        """See NodeStore.reserve."""
        parts = check_key(key)
        return await self._run(
            "reserve", key, lambda root: files.reserve_key(root, self.path, key, parts, size)
        )

    def _traits(self, root: int) -> tuple[int, bool, bool, bool]:
        """(st_dev, syncfs is durable, write large files O_DIRECT, inode numbers stable)
        of the filesystem the node directory is on now (worker thread; learnt once per
        filesystem)."""
        dev = os.fstat(root).st_dev
        known = self._fs_traits
        if known is None or known[0] != dev:
            try:
                fstype = files.filesystem_type(dev)
            except OSError:
                fstype = None
            known = self._fs_traits = (
                dev,
                files.syncfs_is_durable(fstype),
                files.direct_writes_help(fstype),
                files.inodes_are_stable(fstype),
            )
        return known

    def _syncfs_durable(self, root: int) -> bool:
        """Whether syncfs makes this node's writes durable (worker thread)."""
        return self._traits(root)[1]

    def syncfs_covers_filesystem(self) -> bool:
        known = self._fs_traits
        return known is not None and known[1]

    def _note_unsynced(
        self, root: int, key: str, parts: tuple[str, ...], syncfs_durable: bool | None = None
    ) -> None:
        """After a write that was not made durable (worker thread): where syncfs will not
        reach the storage, remember the key so that `syncfs` fsyncs it; past
        UNSYNCED_MAX remembered keys, fsync it now instead (bounded memory).
        `syncfs_durable`, if the caller has just learnt it, saves an fstat."""
        if self._syncfs_durable(root) if syncfs_durable is None else syncfs_durable:
            return
        with self._sync_lock:
            if len(self._unsynced) < UNSYNCED_MAX:
                self._unsynced.add(key)
                return
        files.fsync_keys(root, self.path, [(key, parts)])

    async def get(
        self,
        key: str,
        offset: int = 0,
        length: int | None = None,
        *,
        check: Callable[[bytes], None] | None = None,
    ) -> bytes:
        """Read a byte range of ``key``; fewer bytes if the file is short.

        Raises InvalidKey, ValueError, KeyNotFound, NodeDown, NodeTimeout,
        NodePermissionError, NodeIOError.
        """
        parts = check_key(key)
        if offset < 0:
            raise ValueError(f"offset must be >= 0, not {offset}")
        if length is not None and length < 0:
            raise ValueError(f"length must be >= 0 or None, not {length}")

        def read(root: int) -> bytes:
            data = files.read_range(root, self.path, key, parts, offset, length)
            if check is not None:
                check(data)
            return data

        return await self._run("get", key, read)

    async def get_into(
        self,
        key: str,
        offset: int,
        into: tuple[memoryview, ...],
        *,
        check: Callable[[int], None] | None = None,
    ) -> int:
        """Read from ``offset`` into the buffers ``into`` (see NodeStore.get_into).

        Raises InvalidKey, ValueError, KeyNotFound, NodeDown, NodeTimeout,
        NodePermissionError, NodeIOError.
        """
        return await self._run("get", key, self.get_into_job(key, offset, into, check=check))

    def get_into_job(
        self,
        key: str,
        offset: int,
        into: tuple[memoryview, ...],
        *,
        check: Callable[[int], None] | None = None,
    ) -> Callable[[int], int]:
        """The blocking body of get_into, for `_run` or `run_blocking` (see put_job).

        Raises InvalidKey, ValueError.
        """
        parts = check_key(key)
        if offset < 0:
            raise ValueError(f"offset must be >= 0, not {offset}")
        if any(b.readonly for b in into):
            raise ValueError("get_into needs writable buffers")

        def read(root: int) -> int:
            got = files.read_into(root, self.path, key, parts, offset, into)
            if check is not None:
                check(got)
            return got

        return read

    async def size(self, key: str) -> int:
        """Return the stored length of ``key``.

        Raises InvalidKey, KeyNotFound, NodeDown, NodeTimeout, NodeIOError.
        """
        parts = check_key(key)
        return await self._run(
            "size", key, lambda root: files.key_size(root, self.path, key, parts)
        )

    async def sizes(self, keys: list[str]) -> dict[str, int]:
        """Return the stored length of each of ``keys`` that exists, in one worker thread
        job (missing keys are left out).

        Raises InvalidKey, NodeDown, NodeTimeout, NodeIOError.
        """
        checked = [(key, check_key(key)) for key in keys]

        def job(root: int) -> dict[str, int]:
            found: dict[str, int] = {}
            for key, parts in checked:
                try:
                    found[key] = files.key_size(root, self.path, key, parts)
                except KeyNotFound:
                    pass
            return found

        return await self._run("size", None, job)

    async def delete(self, key: str) -> None:
        """Remove ``key`` if present.

        Raises InvalidKey, NodePermissionError, NodeDown, NodeTimeout, NodeIOError.
        """
        parts = check_key(key)
        await self._run("delete", key, lambda root: files.delete_key(root, self.path, key, parts))

    async def list_keys(self, prefix: str = "") -> list[str]:
        """Return the sorted keys under the key directory ``prefix``.

        Raises InvalidKey, NodeDown, NodeTimeout, NodePermissionError, NodeIOError.
        """
        parts = check_prefix(prefix)
        return await self._run(
            "list_keys",
            prefix or None,
            lambda root: files.list_tree(root, self.path, prefix, parts),
        )

    async def free_space(self) -> tuple[int, int]:
        """Return (available bytes for an unprivileged writer, total bytes).

        Raises NodeDown, NodeTimeout, NodeIOError.
        """
        return await self._run("free_space", None, files.free_space)

    async def filesystem(self) -> int:
        """Return the device number of the node's filesystem.

        Raises NodeDown, NodeTimeout, NodeIOError.
        """
        return await self._run("filesystem", None, lambda root: os.fstat(root).st_dev)

    async def syncfs(self) -> None:
        """Flush the node's filesystem to stable storage.

        On a filesystem whose syncfs(2) does not reach the storage behind it (FUSE, SMB,
        9p: see files.syncfs_is_durable), fsync every file this store wrote without
        durability since the last flush instead. Raises NodeDown, NodeTimeout, NodeIOError.
        """

        def flush(root: int) -> None:
            if self._syncfs_durable(root):
                files.syncfs(root)
                return
            with self._sync_lock:
                pending, self._unsynced = self._unsynced, set()
            try:
                files.fsync_keys(root, self.path, [(k, check_key(k)) for k in pending])
            except BaseException:
                with self._sync_lock:
                    self._unsynced |= pending
                raise

        await self._run("syncfs", None, flush)

    async def probe(self) -> float:
        """Round-trip a tiny temp file through the node; return the seconds it took.

        The time includes waiting for a worker thread: a node whose threads are all busy
        is slow for its callers too. Raises NodeDown, NodeFull, NodePermissionError,
        NodeTimeout, NodeIOError.
        """
        start = trio.current_time()
        await self._run("probe", None, lambda root: files.probe(root, self.path))
        return trio.current_time() - start

    async def cleanup_temps(
        self, older_than: float = 3600.0, prefix: str = "", *, recursive: bool = True
    ) -> int:
        """Remove temp files older than ``older_than`` seconds; return how many.

        Only in the key directory ``prefix`` ("" = the node directory) and, if
        ``recursive``, below it. Raises InvalidKey, NodeDown, NodeTimeout,
        NodePermissionError, NodeIOError.
        """
        parts = check_prefix(prefix)
        return await self._run(
            "cleanup_temps",
            prefix or None,
            lambda root: files.remove_stale_temps(
                root, self.path, older_than, prefix, parts, recursive=recursive
            ),
        )
