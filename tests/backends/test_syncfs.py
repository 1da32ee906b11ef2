"""syncfs: what durable=False left in the page cache reaches stable storage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from backends import LocalStore, NodeDown


async def test_syncfs_after_page_cache_puts(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path), timeout=10)
    await store.put("a/b", b"x" * 100_000, durable=False)
    await store.syncfs()
    assert await store.get("a/b") == b"x" * 100_000


async def test_syncfs_on_a_vanished_node(tmp_path: Path) -> None:
    node = tmp_path / "node"
    node.mkdir()
    store = LocalStore(str(node), timeout=10)
    shutil.rmtree(node)
    with pytest.raises(NodeDown):
        await store.syncfs()
