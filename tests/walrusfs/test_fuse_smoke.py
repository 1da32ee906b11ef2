"""Smoke: a mount comes up, serves a file, and goes away."""

from __future__ import annotations

from pathlib import Path

from tests.walrusfs.conftest import Mounted, in_thread


async def test_mount_roundtrip(mounted: Mounted) -> None:
    p = mounted.path / "hello"
    await in_thread(p.write_bytes, b"hello world")
    assert await in_thread(p.read_bytes) == b"hello world"
    assert await in_thread(lambda: sorted(x.name for x in Path(mounted.path).iterdir())) == [
        "hello"
    ]
