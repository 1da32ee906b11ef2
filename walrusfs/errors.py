"""The one exception -> errno table of walrusfs.

Role: every layer of the filesystem (metadata, file data, POSIX semantics, and the blob
store below them) raises the domain exceptions defined here. Each carries the errno the
calling process should see. The FUSE adapter turns any exception into an errno with one
call, `errno_of`, so the mapping lives in exactly one place.

Must not import pyfuse3 (or anything of ours): the core and the CLI use it without a mount.

Thread/task safety: pure functions and immutable exception classes; safe everywhere.
"""

from __future__ import annotations

import errno as _errno
import sqlite3


class FSError(Exception):
    """An error with a definite errno. Subclasses fix the errno; the base takes any."""

    errno: int = _errno.EIO

    def __init__(self, *args: object) -> None:
        # Accept both FSError(errno, msg) on the base class and Subclass(msg): the
        # subclasses are the readable spelling, the base the escape hatch for rare errnos.
        if type(self) is FSError and args and isinstance(args[0], int):
            self.errno = args[0]
            args = args[1:]
        super().__init__(*args)

    def __str__(self) -> str:
        text = super().__str__()
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return f"[{name}] {text}" if text else f"[{name}]"


class NotFound(FSError):
    errno = _errno.ENOENT


class Exists(FSError):
    errno = _errno.EEXIST


class NotEmpty(FSError):
    errno = _errno.ENOTEMPTY


class IsADir(FSError):
    errno = _errno.EISDIR


class NotADir(FSError):
    errno = _errno.ENOTDIR


class Invalid(FSError):
    errno = _errno.EINVAL


class PermissionDenied(FSError):
    """The mode bits refuse the access (EACCES)."""

    errno = _errno.EACCES


class NotPermitted(FSError):
    """The operation is never allowed on this object, whatever the mode bits (EPERM)."""

    errno = _errno.EPERM


class NameTooLong(FSError):
    errno = _errno.ENAMETOOLONG


class NoData(FSError):
    """No such extended attribute (ENODATA, which Linux also spells ENOATTR)."""

    errno = _errno.ENODATA


class Range(FSError):
    """A result does not fit the caller's buffer (ERANGE)."""

    errno = _errno.ERANGE


class TooBig(FSError):
    """An argument exceeds a hard limit, e.g. an xattr value over 64 KiB (E2BIG)."""

    errno = _errno.E2BIG


class NotSupported(FSError):
    """The filesystem does not implement this, e.g. a non-user xattr namespace."""

    errno = _errno.EOPNOTSUPP


class StorageUnavailable(FSError):
    """Data cannot be read or written: too many nodes are bad (EIO)."""

    errno = _errno.EIO


class NoSpace(FSError):
    errno = _errno.ENOSPC


class StateDiskFull(FSError):
    """The disk of the local state directory (the metadata database) is full. ENOSPC,
    but not NoSpace, which means the nodes: what makes room on them (giving up their
    reserves, carrying the journal past a checkpoint) makes none on this disk."""

    errno = _errno.ENOSPC

    @classmethod
    def of(cls, path: str, exc: BaseException) -> StateDiskFull:
        return cls(f"the metadata's disk is full ({path}): {exc}")


class StateUnavailable(FSError):
    """The metadata database of the local state directory cannot be opened: moved or
    deleted from under the mount, or unreadable. The nodes still hold every committed
    change (the journal), so this is the state directory's trouble, not the data's."""

    errno = _errno.EIO

    @classmethod
    def of(cls, path: str, exc: BaseException) -> StateUnavailable:
        return cls(
            f"the metadata database {path} cannot be opened ({exc}): was the state "
            "directory moved or deleted?"
        )


class StateInUse(FSError):
    """Another mount holds the local state directory (walrusfs.statelock)."""

    errno = _errno.EBUSY


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` (sqlite3 or OS) says the disk it wrote to is full."""
    if isinstance(exc, OSError):
        return exc.errno in (_errno.ENOSPC, _errno.EDQUOT)
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


def leaves_of(exc: BaseException) -> list[BaseException]:
    """The non-group exceptions inside `exc`, depth first, in their group order."""
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for sub in exc.exceptions:
            out.extend(leaves_of(sub))
        return out
    return [exc]


def _known_errno(exc: BaseException) -> int | None:
    if isinstance(exc, FSError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    # pyfuse3.FUSEError has an .errno too; matched by duck typing so we need no import.
    code = getattr(exc, "errno", None)
    if type(exc).__name__ == "FUSEError" and isinstance(code, int) and code > 0:
        return code
    return None


def errno_of(exc: BaseException) -> int:
    """The errno a caller should see for `exc`; EIO for anything unknown.

    In an exception group, the first leaf with a known errno other than EIO wins (EIO
    says least), then EIO if some leaf is known, else EIO.
    """
    codes = [c for c in map(_known_errno, leaves_of(exc)) if c is not None]
    for code in codes:
        if code != _errno.EIO:
            return code
    return _errno.EIO


def message_of(exc: BaseException) -> str:
    """What to tell a user of `exc`: its first leaf's message (or its type's name)."""
    leaf = leaves_of(exc)[0] if isinstance(exc, BaseExceptionGroup) and exc.exceptions else exc
    return str(leaf) or type(leaf).__name__


def is_known(exc: BaseException) -> bool:
    """True if every leaf of `exc` is an error we expect (so it needs no traceback)."""
    return all(_known_errno(leaf) is not None for leaf in leaves_of(exc))
