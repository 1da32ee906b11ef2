"""A power loss of every node as a user provokes it (scripts/powerloss.py): a short,
seeded run is part of the test suite. Whether recovery has changes to leave out depends
on the kernel's writeback timing; what must hold every time is checked by the script."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.walrusfs.soakrun import run_soak


@pytest.mark.skipif(
    os.geteuid() != 0
    or not Path("/dev/fuse").exists()
    or not Path("/dev/loop-control").exists()
    or not shutil.which("mkfs.ext4"),
    reason="needs root and loop devices (a loop-mounted ext4 image), /dev/fuse, mkfs.ext4",
)
def test_a_power_loss_of_every_node_loses_nothing_fsynced_and_leaves_nothing_unreadable(
    tmp_path: Path,
) -> None:
    rc, stdout, stderr = run_soak("powerloss.py", "--seconds", "6", "--seed", "7", workdir=tmp_path)
    out = stdout + stderr
    assert "WRONG" not in out and "LOST" not in out, out[-3000:]
    last = stdout.strip().splitlines()[-1]
    m = re.match(r"powerloss: files (\d+), fsynced intact (\d+), ", last)
    assert m, out[-3000:]
    # Slivers a power loss tore are damage the mount repairs; only lost data is wrong.
    assert int(m.group(1)) > 20 and int(m.group(2)) > 0
    assert rc == 0, out[-3000:]
