"""The errno table: domain exceptions, OSError and exception groups map to one errno."""

from __future__ import annotations

import errno

import pytest
import trio

from walrusfs import errors
from walrusfs.errors import errno_of, is_known


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.NotFound("x"), errno.ENOENT),
        (errors.Exists(), errno.EEXIST),
        (errors.NotEmpty(), errno.ENOTEMPTY),
        (errors.IsADir(), errno.EISDIR),
        (errors.NotADir(), errno.ENOTDIR),
        (errors.Invalid(), errno.EINVAL),
        (errors.PermissionDenied(), errno.EACCES),
        (errors.NotPermitted(), errno.EPERM),
        (errors.NameTooLong(), errno.ENAMETOOLONG),
        (errors.NoData(), errno.ENODATA),
        (errors.Range(), errno.ERANGE),
        (errors.TooBig(), errno.E2BIG),
        (errors.NotSupported(), errno.EOPNOTSUPP),
        (errors.StorageUnavailable("3 of 7 nodes down"), errno.EIO),
        (errors.NoSpace(), errno.ENOSPC),
        (errors.FSError(errno.EXDEV, "cross"), errno.EXDEV),
        (FileNotFoundError(errno.ENOENT, "gone"), errno.ENOENT),
        (OSError(errno.EROFS, "ro"), errno.EROFS),
        (OSError("no errno"), errno.EIO),
        (ValueError("bug"), errno.EIO),
        (KeyError("bug"), errno.EIO),
    ],
)
def test_errno_of_single_exceptions(exc: BaseException, code: int) -> None:
    assert errno_of(exc) == code


def test_base_class_takes_an_errno_and_a_message() -> None:
    exc = errors.FSError(errno.EXDEV, "across volumes")
    assert exc.errno == errno.EXDEV
    assert "EXDEV" in str(exc) and "across volumes" in str(exc)
    assert errors.NotFound("a/b").errno == errno.ENOENT
    assert "ENOENT" in str(errors.NotFound("a/b"))


def test_groups_pick_the_first_meaningful_errno() -> None:
    group = ExceptionGroup(
        "flush",
        [
            errors.StorageUnavailable("node 3"),
            ExceptionGroup("inner", [ValueError("bug"), errors.NoSpace("node 4 full")]),
            errors.NotFound("later"),
        ],
    )
    # EIO says least; the first specific errno, depth first, wins.
    assert errno_of(group) == errno.ENOSPC
    assert errno_of(ExceptionGroup("g", [errors.StorageUnavailable(), ValueError()])) == errno.EIO
    assert errno_of(ExceptionGroup("g", [RuntimeError(), KeyError()])) == errno.EIO


def test_is_known_flags_unexpected_errors() -> None:
    assert is_known(errors.NotFound())
    assert is_known(OSError(errno.EIO, "disk"))
    assert not is_known(ValueError())
    assert not is_known(ExceptionGroup("g", [errors.NotFound(), ValueError()]))
    assert is_known(ExceptionGroup("g", [errors.NotFound(), OSError(errno.EIO, "x")]))


async def test_trio_nursery_groups_are_unwrapped() -> None:
    async def fail(exc: Exception) -> None:
        raise exc

    with pytest.raises(BaseExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fail, errors.NotEmpty("d"))
    assert errno_of(info.value) == errno.ENOTEMPTY


def test_errors_module_does_not_import_pyfuse3() -> None:
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(errors))
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(name.startswith("pyfuse3") for name in names)
