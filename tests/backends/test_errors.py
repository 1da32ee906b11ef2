"""The OSError -> NodeError table, and what every error carries."""

from __future__ import annotations

import errno
import os
import pickle

import pytest

from backends import (
    InvalidKey,
    KeyNotFound,
    NodeDown,
    NodeError,
    NodeFull,
    NodeIOError,
    NodePermissionError,
    NodeTimeout,
    describe_failures,
    map_os_error,
)

NODE = "/srv/nodes/n3"


def oserror(code: int, filename: str | None = "/srv/nodes/n3/slivers/ab") -> OSError:
    return OSError(code, os.strerror(code), filename)


@pytest.mark.parametrize(
    ("code", "cls", "expected_errno"),
    [
        (errno.ENOENT, KeyNotFound, errno.ENOENT),
        (errno.ENOSPC, NodeFull, errno.ENOSPC),
        (errno.EDQUOT, NodeFull, errno.EDQUOT),
        (errno.EACCES, NodePermissionError, errno.EACCES),
        (errno.EPERM, NodePermissionError, errno.EPERM),
        (errno.EROFS, NodePermissionError, errno.EROFS),
        (errno.ETIMEDOUT, NodeTimeout, errno.ETIMEDOUT),
        (errno.ENODEV, NodeDown, errno.ENODEV),
        (errno.ENOTCONN, NodeDown, errno.ENODEV),
        (errno.ESTALE, NodeDown, errno.ENODEV),
        (errno.EHOSTDOWN, NodeDown, errno.ENODEV),
        (errno.EIO, NodeIOError, errno.EIO),
        (errno.EBADMSG, NodeIOError, errno.EIO),
        (errno.EISDIR, NodeIOError, errno.EIO),
        (errno.ELOOP, NodeIOError, errno.EIO),
    ],
)
def test_map_os_error_table(code: int, cls: type[NodeError], expected_errno: int) -> None:
    err = map_os_error(oserror(code), NODE)
    assert type(err) is cls
    assert err.errno == expected_errno
    assert err.os_errno == code
    assert err.path == NODE
    # The original errno is named in the message even when the class's errno replaced it.
    assert errno.errorcode[code] in str(err)
    assert NODE in str(err)


def test_map_os_error_names_key_and_file() -> None:
    err = map_os_error(oserror(errno.EIO), NODE, key="slivers/ab/cd")
    assert err.key == "slivers/ab/cd"
    assert "'slivers/ab/cd'" in str(err)
    assert "/srv/nodes/n3/slivers/ab" in str(err)


def test_map_os_error_survives_odd_oserrors() -> None:
    no_errno = map_os_error(OSError("weird"), NODE)
    assert type(no_errno) is NodeIOError
    assert no_errno.errno == errno.EIO
    assert no_errno.os_errno is None
    fd_named = map_os_error(OSError(errno.EIO, "I/O error", 7), NODE)
    assert "(7)" in str(fd_named)


def test_map_os_error_handles_subclasses() -> None:
    assert type(map_os_error(FileNotFoundError(errno.ENOENT, "gone"), NODE)) is KeyNotFound
    assert type(map_os_error(PermissionError(errno.EACCES, "no"), NODE)) is NodePermissionError


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (NodeDown, errno.ENODEV),
        (NodeTimeout, errno.ETIMEDOUT),
        (NodeFull, errno.ENOSPC),
        (NodePermissionError, errno.EACCES),
        (NodeIOError, errno.EIO),
        (KeyNotFound, errno.ENOENT),
    ],
)
def test_each_class_has_its_errno_and_pickles(cls: type[NodeError], code: int) -> None:
    err = cls("something broke", path=NODE, key="k")
    assert isinstance(err, NodeError)
    assert err.errno == code
    assert str(err) == f"node {NODE}, key 'k': something broke"
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert (back.errno, back.path, back.key, str(back)) == (err.errno, err.path, err.key, str(err))


def test_invalid_key_is_a_value_error_not_a_node_fault() -> None:
    err = InvalidKey("../x", "component '..' is not allowed")
    assert isinstance(err, ValueError)
    assert not isinstance(err, NodeError)
    assert err.errno == errno.EINVAL
    assert "'../x'" in str(err)
    back = pickle.loads(pickle.dumps(err))
    assert (back.key, back.reason) == (err.key, err.reason)


def test_failures_of_several_nodes_name_alike_ones_together() -> None:
    key = "journal/e2/0000000000000001"
    failures: dict[int, object] = {
        i: map_os_error(
            oserror(errno.ENOENT, f"/srv/nodes/n{i}/{key}"), f"/srv/nodes/n{i}", key=key
        )
        for i in (0, 1, 2, 4)
    }
    failures[3] = NodeTimeout("took over 10s", path="/srv/nodes/n3", key=key)
    failures[6] = "skipped: node is down"
    line = describe_failures(failures)
    assert line == (
        "nodes 0, 1, 2, 4: ENOENT: No such file or directory (<node>/journal/e2/0000000000000001); "
        "node 3: key 'journal/e2/0000000000000001': took over 10s; node 6: skipped: node is down"
    )
    assert describe_failures({}) == ""


def test_nodes_failing_alike_on_their_own_keys_are_named_together() -> None:
    """A blob's pairs have a key each: seven nodes out of space are one clause."""
    failures: dict[int, object] = {
        i: map_os_error(
            oserror(errno.ENOSPC, None), f"/srv/nodes/n{i}", key=f"slivers/ab/cd/x.p{i}"
        )
        for i in range(7)
    }
    failures[2] = NodeTimeout("took over 10s", path="/srv/nodes/n2", key="slivers/ab/cd/x.p2")
    assert describe_failures(failures) == (
        "nodes 0, 1, 3, 4, 5, 6: key 'slivers/ab/cd/x.p0' (and 5 more): ENOSPC: No space left on device; "
        "node 2: key 'slivers/ab/cd/x.p2': took over 10s"
    )
