"""The node error family and THE table from OSError errno to it.

Every failure of a node store surfaces as one of these classes, each carrying an ``errno``
(so the FUSE adapter can turn it into an errno without knowing backends) and the node
directory ``path`` (so a log line says which node failed). ``map_os_error`` is the only
place that decides which OSError means which class; stores never pick classes by hand
for an OSError.

Must not import: codec, walrusfs, pyfuse3, trio (the table is pure data and used from
worker threads).

Thread/task safety: stateless; safe from any thread or task.
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Mapping
from typing import Any, ClassVar


class NodeError(Exception):
    """A node could not do what was asked; ``errno`` says how, ``path`` says which node."""

    #: The errno a caller should report when it has nothing better; subclasses override.
    default_errno: ClassVar[int] = _errno.EIO

    errno: int
    path: str
    key: str | None
    message: str
    #: The errno of the OSError this came from, if any (may differ from ``errno``:
    #: a NodeIOError made from EBADMSG has errno EIO and os_errno EBADMSG).
    os_errno: int | None

    def __init__(
        self,
        message: str,
        *,
        path: str,
        key: str | None = None,
        errno: int | None = None,
        os_errno: int | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.key = key
        self.errno = self.default_errno if errno is None else errno
        self.os_errno = os_errno
        where = f"node {path}" if key is None else f"node {path}, key {key!r}"
        super().__init__(f"{where}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments defeat the default exception pickling, which replays
        # ``args``; errors may cross a process boundary (e.g. a scrub worker pool).
        return (
            _rebuild,
            (type(self), self.message, self.path, self.key, self.errno, self.os_errno),
        )


def _rebuild(
    cls: type[NodeError],
    message: str,
    path: str,
    key: str | None,
    errno: int,
    os_errno: int | None,
) -> NodeError:
    return cls(message, path=path, key=key, errno=errno, os_errno=os_errno)


class NodeDown(NodeError):
    """The node directory is missing, its mount dropped, or it is not usable as a node."""

    default_errno = _errno.ENODEV


class NodeTimeout(NodeError):
    """The call overran its deadline; its worker thread was abandoned and may still run."""

    default_errno = _errno.ETIMEDOUT


class NodeFull(NodeError):
    """The node's filesystem is out of space (ENOSPC) or its quota is exhausted (EDQUOT)."""

    default_errno = _errno.ENOSPC


class NodePermissionError(NodeError):
    """The node refused the operation: EACCES, EPERM, or a read-only filesystem (EROFS)."""

    default_errno = _errno.EACCES


class NodeIOError(NodeError):
    """EIO, any other unexpected OSError, or a node whose layout we refuse to trust."""

    default_errno = _errno.EIO


class KeyNotFound(NodeError):
    """The key does not exist on this node."""

    default_errno = _errno.ENOENT


class KeyExists(NodeError):
    """A put that may not replace its key found it there (nothing was written)."""

    default_errno = _errno.EEXIST


class InvalidKey(ValueError):
    """A malformed key: a programming error of the caller, not a fault of any node."""

    errno: int = _errno.EINVAL

    def __init__(self, key: object, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"invalid key {key!r}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key, self.reason))


# Errnos that mean "this node as a whole is gone", not "this operation failed": a dropped
# NFS handle (ESTALE), a dead FUSE/sshfs connection (ENOTCONN), a vanished device.
_DOWN = frozenset(
    {
        _errno.ENODEV,
        _errno.ENXIO,
        _errno.ENOTCONN,
        _errno.ESTALE,
        _errno.EHOSTDOWN,
        _errno.EHOSTUNREACH,
        _errno.ENETDOWN,
        _errno.ENETUNREACH,
        _errno.ECONNABORTED,
        _errno.ECONNRESET,
    }
)
_FULL = frozenset({_errno.ENOSPC, _errno.EDQUOT})
# EROFS is grouped with permissions: the node can still serve reads, it refuses writes.
_PERMISSION = frozenset({_errno.EACCES, _errno.EPERM, _errno.EROFS})
_TIMEOUT = frozenset({_errno.ETIMEDOUT})
_NOT_FOUND = frozenset({_errno.ENOENT})


def map_os_error(exc: OSError, path: str, *, key: str | None = None) -> NodeError:
    """Turn an OSError from node ``path`` into the matching NodeError (returned, not raised).

    Raises nothing. The result keeps the original errno in ``os_errno`` and in its message;
    its ``errno`` is the original one where the class admits several (EDQUOT stays EDQUOT),
    and the class's own errno otherwise (any unexpected errno becomes EIO).
    """
    code = exc.errno
    detail = _describe(exc)
    cls: type[NodeError]
    keep = False
    if code in _NOT_FOUND:
        cls = KeyNotFound
    elif code in _FULL:
        cls, keep = NodeFull, True
    elif code in _PERMISSION:
        cls, keep = NodePermissionError, True
    elif code in _TIMEOUT:
        cls = NodeTimeout
    elif code in _DOWN:
        cls = NodeDown
    else:
        cls = NodeIOError
    return cls(detail, path=path, key=key, errno=code if keep else None, os_errno=code)


def _describe(exc: OSError) -> str:
    """Say what failed with the errno's symbolic name, so logs are greppable."""
    code = exc.errno
    name = _errno.errorcode.get(code, f"errno {code}") if code is not None else "no errno"
    text = exc.strerror or (os.strerror(code) if code is not None else str(exc))
    filename = exc.filename
    if isinstance(filename, str | bytes):
        target = f" ({os.fsdecode(filename)})"
    else:
        target = "" if filename is None else f" ({filename})"
    return f"{name}: {text}{target}"


def describe_failures(failures: Mapping[int, object]) -> str:
    """One line for the failures of several nodes (index -> error or text), as a quorum
    error gives them: nodes that failed alike are named together, once.

    A NodeError names its node directory twice (its path, and again in the file an
    OSError names); seven nodes failing alike made a line of 1.5 KB that said one thing.
    """
    groups: dict[str, list[int]] = {}
    keys: dict[str, list[str]] = {}  # by text: the keys it failed on, where not in the text
    for index in sorted(failures):
        error = failures[index]
        if isinstance(error, NodeError):
            text = error.message.replace(error.path, "<node>")
            if error.key is not None and error.key not in text:
                # Each node's key of one blob differs (its own pair): grouped by the error
                # alone, or seven nodes out of space made seven clauses.
                seen = keys.setdefault(text, [])
                if error.key not in seen:
                    seen.append(error.key)
        else:
            text = str(error)
        groups.setdefault(text, []).append(index)
    return "; ".join(
        f"node{'s' if len(nodes) > 1 else ''} {', '.join(map(str, nodes))}: "
        f"{_keys_named(keys.get(text, []))}{text}"
        for text, nodes in groups.items()
    )


def _keys_named(keys: list[str]) -> str:
    if not keys:
        return ""
    more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
    return f"key {keys[0]!r}{more}: "
