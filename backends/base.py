"""NodeStore: the interface every node backend implements (opaque bytes by key).

A node store keeps immutable byte strings under keys (see ``backends.keys`` for the
grammar) in one node directory. It promises:

* ``put`` is atomic: a reader sees the old value or the new one, never a mix or a prefix;
  with ``durable=True`` the new value survives a crash once ``put`` returns.
* ``append`` adds bytes at the end of a key in one write. It is not atomic as a whole:
  a crash or a full disk may leave a torn tail, so readers of an appended key frame and
  verify what they read (the metadata journal does).
* Readers and listings never see temp files.
* Every failure is a ``NodeError`` (or ``InvalidKey`` for a malformed key, raised before
  any disk access). What to do about a failing node (retry, mark down, repair) is the
  caller's policy (nodeset/blobstore), never the store's.

Must not import: codec, walrusfs, pyfuse3.

Thread/task safety: implementations must allow any number of concurrent calls from tasks
of one trio run; a store is not shared across trio runs.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

from backends.errors import KeyNotFound

Buffer = bytes | bytearray | memoryview
#: What a put stores: one buffer, or pieces written one after another (no join needed).
Payload = Buffer | tuple[Buffer, ...]


class NodeStore(abc.ABC):
    """One node directory seen as a key -> bytes store; all I/O methods are trio-async."""

    #: The node directory.
    path: str
    #: A short name for logs (defaults to the path).
    name: str

    def __init__(self, path: str, *, name: str | None = None) -> None:
        self.path = path
        self.name = path if name is None else name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"

    @abc.abstractmethod
    async def put(
        self, key: str, data: Payload, *, durable: bool = True, replace: bool = True
    ) -> None:
        """Store ``data`` (a buffer, or a tuple of pieces) under ``key`` atomically.

        Replaces any old value; without ``replace``, raises KeyExists instead, having
        written nothing (for content-addressed keys: what is there is the same bytes, and
        a caller undoing its put must not delete what it did not write).

        Raises InvalidKey, KeyExists, NodeFull, NodePermissionError, NodeDown, NodeTimeout,
        NodeIOError.
        """

    @abc.abstractmethod
    async def append(self, key: str, data: bytes, *, durable: bool = False) -> None:
        """Append ``data`` to ``key`` (created if missing), in one write call.

        With ``durable=True`` it is on stable storage when this returns. Raises
        InvalidKey, NodeFull, NodePermissionError, NodeDown, NodeTimeout, NodeIOError.
        """

    @abc.abstractmethod
    async def reserve(self, key: str, size: int) -> bool:
        """Make ``key`` a file holding ``size`` bytes of allocated space, kept for a
        moment the node is full: a smaller ``size``, or deleting it, gives them back.
        Returns False if it held that already. Raises InvalidKey, NodeFull (it is left as
        it was then), NodePermissionError, NodeDown, NodeTimeout, NodeIOError.
        """

    @abc.abstractmethod
    async def get(
        self,
        key: str,
        offset: int = 0,
        length: int | None = None,
        *,
        check: Callable[[bytes], None] | None = None,
    ) -> bytes:
        """Read ``length`` bytes (default: to the end) from ``offset``; fewer if the file is short.

        ``check``, if given, is called on the bytes in the same worker thread before they
        are returned (callers verify there instead of paying a second thread hand-off);
        whatever it raises propagates unchanged.

        Raises InvalidKey, ValueError (negative offset/length), KeyNotFound, NodeDown,
        NodeTimeout, NodePermissionError, NodeIOError.
        """

    @abc.abstractmethod
    async def get_into(
        self,
        key: str,
        offset: int,
        into: tuple[memoryview, ...],
        *,
        check: Callable[[int], None] | None = None,
    ) -> int:
        """Read from ``offset`` straight into the writable buffers ``into``, filling one
        after another; return the bytes read (fewer if the file is short).

        ``check(count)`` runs in the worker thread as for ``get``. A call abandoned at its
        deadline (NodeTimeout) or by cancellation may still write into ``into`` later:
        the caller must then treat those buffers as lost.

        Raises InvalidKey, ValueError (negative offset, read-only buffer), KeyNotFound,
        NodeDown, NodeTimeout, NodePermissionError, NodeIOError.
        """

    @abc.abstractmethod
    async def size(self, key: str) -> int:
        """Return the stored length of ``key`` in bytes.

        Raises InvalidKey, KeyNotFound, NodeDown, NodeTimeout, NodeIOError.
        """

    async def sizes(self, keys: list[str]) -> dict[str, int]:
        """Return the stored length of each of ``keys`` that exists (missing keys are left
        out); a store may answer in one call where it can.

        Raises InvalidKey, NodeDown, NodeTimeout, NodeIOError.
        """
        found: dict[str, int] = {}
        for key in keys:
            try:
                found[key] = await self.size(key)
            except KeyNotFound:
                pass
        return found

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error.

        Raises InvalidKey, NodePermissionError, NodeDown, NodeTimeout, NodeIOError.
        """

    @abc.abstractmethod
    async def list_keys(self, prefix: str = "") -> list[str]:
        """Return every key under the key directory ``prefix`` ("" = all), sorted.

        Raises InvalidKey, NodeDown, NodeTimeout, NodePermissionError, NodeIOError.
        """

    @abc.abstractmethod
    async def free_space(self) -> tuple[int, int]:
        """Return (bytes available to an unprivileged writer, total bytes) of the node.

        Raises NodeDown, NodeTimeout, NodeIOError.
        """

    @abc.abstractmethod
    async def filesystem(self) -> int:
        """Return an id of the filesystem holding the node (its device number).

        Nodes on one filesystem share its free space. Raises NodeDown, NodeTimeout,
        NodeIOError.
        """

    def syncfs_covers_filesystem(self) -> bool:
        """Whether `syncfs` is known to flush the whole filesystem (syncfs(2)), and so also
        what other nodes on it wrote; False where it fsyncs this store's own files, or
        where that is not known yet. Never blocks."""
        return False

    @abc.abstractmethod
    async def syncfs(self) -> None:
        """Flush everything written to the node's filesystem to stable storage (syncfs(2)).

        What `put(..., durable=False)` and `append` left in the page cache becomes
        durable; where syncfs(2) does not reach the storage (a FUSE or SMB mount), by
        fsyncing each file this store wrote since the last flush. Raises
        NodeDown, NodeTimeout, NodeIOError.
        """

    async def get_pinning(self, key: str) -> tuple[bytes, tuple[int, int] | None]:
        """The whole of ``key`` and where it was read, for `pin` once it is trusted; a
        store that cannot tell one directory from another at its path says None. Raises
        what get raises."""
        return await self.get(key), None

    def pin(self, where: tuple[int, int] | None) -> None:  # noqa: B027 (optional: a no-op)
        """Refuse calls on any directory at the path but `where` (None: any); see
        LocalStore.pin."""

    @abc.abstractmethod
    async def probe(self) -> float:
        """Write, read back and delete a tiny probe file; return the seconds it took.

        Raises NodeDown, NodeFull, NodePermissionError, NodeTimeout, NodeIOError.
        """

    @abc.abstractmethod
    async def cleanup_temps(
        self, older_than: float = 3600.0, prefix: str = "", *, recursive: bool = True
    ) -> int:
        """Remove temp files older than ``older_than`` seconds; return how many went.

        Only in the key directory ``prefix`` ("" = the whole node) and, if ``recursive``,
        below it. Raises InvalidKey, NodeDown, NodeTimeout, NodePermissionError,
        NodeIOError.
        """
