"""Fixtures for backend tests: real directories and real tmpfs mounts (root only)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from backends import LocalStore
from tests.backends.util import mount_tmpfs, unmount_all


@pytest.fixture
def node(tmp_path: Path) -> Path:
    """An empty node directory."""
    path = tmp_path / "node"
    path.mkdir()
    return path


@pytest.fixture
def store(node: Path) -> LocalStore:
    """A LocalStore on ``node`` with a deadline generous enough for a slow CI disk."""
    return LocalStore(node, timeout=20.0)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Factory: mount a tmpfs of a given size on a new dir under tmp_path; always unmounted."""
    mounted: list[Path] = []

    def make(name: str = "tmpfs", size: str = "1m") -> Path:
        where = tmp_path / name
        where.mkdir(exist_ok=True)
        mounted.append(where)
        mount_tmpfs(where, size)
        return where

    yield make
    for where in reversed(mounted):
        unmount_all(where)
