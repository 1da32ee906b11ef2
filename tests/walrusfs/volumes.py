"""Helpers for tests that need real volumes over temporary node directories."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from walrusfs.metastore import MetaStore, format_metadata
from walrusfs.sliverfile import header_size, parse_key
from walrusfs.volume import Volume, create_volume, open_volume


def node_paths(root: Path, n: int) -> list[str]:
    return [str(root / f"node{i}") for i in range(n)]


def sliver_files(node_dir: str) -> list[Path]:
    """Every sliver file in a node directory (temp files excluded)."""
    base = Path(node_dir)
    return sorted(
        p
        for p in base.rglob("*.p*")
        if p.is_file() and parse_key(str(p.relative_to(base))) is not None
    )


def sliver_file(node_dir: str, blob_id: bytes) -> Path:
    (found,) = [p for p in sliver_files(node_dir) if p.name.startswith(blob_id.hex())]
    return found


def flip_byte(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset % len(raw)] ^= 0x5A
    path.write_bytes(bytes(raw))


def zero_range(path: Path, start: int, stop: int) -> None:
    """Zeros over bytes [start, stop) of a file, its size kept: what a power loss leaves
    of pages that never reached the disk."""
    raw = bytearray(path.read_bytes())
    raw[start:stop] = bytes(len(raw[start:stop]))
    path.write_bytes(bytes(raw))


def secondary_start(path: Path, n: int = 7, r: int = 3, c: int = 5) -> int:
    """Where a sliver file's secondary sliver begins: after its header and its primary (C
    symbols; the secondary has R)."""
    h = header_size(n)
    return h + (path.stat().st_size - h) // (r + c) * c


def lose_secondary(path: Path) -> None:
    """Zeros over the secondary sliver, the size kept: a power loss that kept the file's
    first pages only."""
    zero_range(path, secondary_start(path), path.stat().st_size)


@contextlib.contextmanager
def hung_file(path: Path) -> Iterator[None]:
    """A FIFO in place of `path` while inside: open() of it blocks in the kernel, as on a
    hung mount. On the way out the FIFO is opened for writing, which lets a reader stuck
    in open() go on (and find no regular file)."""
    path.unlink()
    os.mkfifo(path)
    try:
        yield
    finally:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@contextlib.contextmanager
def tmpfs(path: str, size: str) -> Iterator[None]:
    """A small real tmpfs at `path` (root only); always lazily unmounted afterwards."""
    os.makedirs(path, exist_ok=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path], capture_output=True
    )
    if res.returncode:
        import pytest

        pytest.skip(f"cannot mount tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", path], check=False)


async def formatted_volume(root: Path) -> tuple[Volume, MetaStore, list[str]]:
    """A real 7-node volume (64 KiB blobs) under `root`, formatted, with its metadata
    open from `root/state` (the caller closes it)."""
    paths = node_paths(root / "nodes", 7)
    await create_volume(paths, blob_size=1 << 16)
    vol = await open_volume(paths[0], node_timeout=10.0)
    await format_metadata(vol, str(root / "state0"), uid=0, gid=0)
    return vol, await MetaStore.open(vol, str(root / "state")), paths


async def back_unseen_others_gone(
    vol: Volume, paths: list[str], back: tuple[int, ...], gone: tuple[int, ...]
) -> None:
    """Nodes `back` go away and a probe takes them as down; they return with no probe
    since, and then nodes `gone` leave (moved to PATH.away): only len(gone) nodes are
    gone, while twice as many look unusable to the volume."""
    for i in back:
        os.rename(paths[i], paths[i] + ".away")
    await vol.nodes.probe_all()
    for i in back:
        os.rename(paths[i] + ".away", paths[i])
    for i in gone:
        os.rename(paths[i], paths[i] + ".away")
