"""Real tools on a real CLI mount: git, and reads that must not hang behind hung nodes."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.walrusfs.clivol import Vol, run
from walrusfs.sliverfile import parse_key

pytestmark = pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs /dev/fuse")


def git(*args: str, cwd: Path) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    res = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_clone_and_fsck_on_the_mount(vol: Vol, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    git("init", "-q", cwd=src)
    for i in range(30):
        (src / f"file{i}.txt").write_text(f"line {i}\n" * (i * 50 + 1))
        if i % 10 == 9:
            git("add", ".", cwd=src)
            git("commit", "-q", "-m", f"commit {i}", cwd=src)
    vol.mount()
    git("clone", "-q", str(src), str(vol.mnt / "clone"), cwd=tmp_path)
    git("fsck", "--full", "--strict", cwd=vol.mnt / "clone")
    assert git("log", "--oneline", cwd=vol.mnt / "clone").count("\n") == 3
    (vol.mnt / "clone" / "new.txt").write_text("made on walrusfs\n")
    git("add", "new.txt", cwd=vol.mnt / "clone")
    git("commit", "-q", "-m", "on the mount", cwd=vol.mnt / "clone")
    run("umount", vol.mnt)
    vol.mount(node=6)
    git("fsck", "--full", "--strict", cwd=vol.mnt / "clone")
    assert "on the mount" in git("log", "-1", "--format=%s", cwd=vol.mnt / "clone")


def _hang(node: Path) -> list[Path]:
    """Replace every sliver file of a node by a FIFO: open() then blocks in the kernel."""
    fifos = []
    for p in node.rglob("*"):
        if p.is_file() and parse_key(str(p.relative_to(node))):
            p.unlink()
            os.mkfifo(p)
            fifos.append(p)
    return fifos


def test_reads_go_on_with_f_nodes_hung(vol: Vol) -> None:
    vol.mount()
    data = os.urandom(1_500_000)
    (vol.mnt / "f.bin").write_bytes(data)
    run("umount", vol.mnt)
    fifos = _hang(vol.nodes[1]) + _hang(vol.nodes[4])
    try:
        vol.mount()  # node calls time out after 3 s (--node-timeout 3)
        t0 = time.monotonic()
        assert (vol.mnt / "f.bin").read_bytes() == data
        assert time.monotonic() - t0 < 30  # hedged reads: never the node timeout per block
        (vol.mnt / "g.bin").write_bytes(data[:300_000])
        assert (vol.mnt / "g.bin").read_bytes() == data[:300_000]
        assert "f.bin" in os.listdir(vol.mnt)
    finally:
        for p in fifos:  # unblock the abandoned reader threads
            try:
                os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
