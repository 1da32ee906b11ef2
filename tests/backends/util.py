"""Helpers for backend tests: tree snapshots, tmpfs mounts, FIFOs that unblock stuck threads.

Everything here is synchronous and quick (or bounded), so async tests may call it directly.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path

import pytest

from backends.remote import mount_points


def snapshot(root: Path) -> dict[str, object]:
    """Map every entry under ``root`` (hidden ones too, symlinks not followed) to its content.

    Files map to their bytes, directories to "<dir>", symlinks to ("->", target).
    """
    tree: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            if full.is_symlink():
                tree[rel] = ("->", os.readlink(full))
            elif full.is_dir():
                tree[rel] = "<dir>"
            elif full.is_file():
                tree[rel] = full.read_bytes()
            else:
                tree[rel] = "<special>"
    return tree


def files_in(root: Path) -> list[str]:
    """Return the relative paths of all non-directories under ``root``, sorted."""
    return sorted(k for k, v in snapshot(root).items() if v != "<dir>")


def is_mounted(where: Path) -> bool:
    return str(where) in mount_points()


def mount_tmpfs(where: Path, size: str) -> None:
    """Mount a fresh tmpfs of ``size`` on ``where``; skip the test if we may not mount."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def unmount_all(where: Path) -> None:
    """Lazily unmount everything stacked on ``where`` (a no-op if nothing is mounted)."""
    for _ in range(10):
        if not is_mounted(where):
            return
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)
    raise AssertionError(f"{where} is still mounted after 10 lazy unmounts")


def fill_up(directory: Path) -> None:
    """Write a filler file into ``directory`` until its filesystem is full."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        block = b"\0" * 4096
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, block)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0")
    finally:
        os.close(fd)


def poke_fifo(path: Path) -> bool:
    """Open ``path`` for writing without blocking, which releases readers stuck in open().

    Returns False if no reader was waiting (ENXIO).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return False
        raise
    os.close(fd)
    return True
