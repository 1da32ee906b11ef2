"""sshfs_node.py: a node on a real remote mount (private sshd + sshfs), dropped and back.

The property that matters: while the mount is gone, walrusfs must not write into the bare
directory underneath (it would be lost, and the node would look healthy but empty); the
node is reported missed/down instead, and comes back once remounted.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.scripts.util import (
    assert_all_readable,
    blob_data,
    is_mounted,
    make_volume,
    node_paths,
    open_vol,
    process_gone,
    put_all,
    script,
    sliver_files,
    state_of,
)

K = 4  # the node on sshfs

pytestmark = pytest.mark.skipif(
    shutil.which("sshfs") is None or not os.access("/usr/sbin/sshd", os.X_OK) or os.geteuid() != 0,
    reason="needs root and the Debian packages openssh-server and sshfs",
)


@dataclass
class SshNode:
    paths: list[Path]
    backing: Path
    up: dict[str, Any]

    @property
    def node(self) -> Path:
        return self.paths[K]


@pytest.fixture
async def ssh(tmp_path: Path) -> AsyncIterator[SshNode]:
    paths = node_paths(tmp_path / "vol")
    backing = tmp_path / "remote"
    backing.mkdir()
    ran = await script("sshfs_node.py", "up", backing, paths[K], "--json")
    up = ran.json()
    assert up["ok"] and is_mounted(paths[K])
    await make_volume(paths)
    try:
        yield SshNode(paths, backing, up)
    finally:
        await script("sshfs_node.py", "down", paths[K])
        assert not is_mounted(paths[K])
        assert not (tmp_path / "vol" / f".walrusfs-sshfs-n{K}.json").exists()
        assert not Path(up["tmpdir"]).exists()  # throwaway keys removed
        assert process_gone(up["sshd_pid"])


async def test_drop_does_not_write_into_the_bare_dir(ssh: SshNode) -> None:
    vol = await open_vol(ssh.paths, node_timeout=10.0)
    assert vol.identity.mounts[K] == str(ssh.node)
    datas = blob_data(3)
    puts = await put_all(vol, datas)
    assert all(r.missed == () for r in puts)
    assert len(sliver_files(ssh.backing)) == 3  # went over ssh into the remote directory

    await script("sshfs_node.py", "drop", ssh.node)
    assert not is_mounted(ssh.node) and os.listdir(ssh.node) == []
    late = await vol.blobs.put_blob(b"put while the mount is gone" * 100)
    assert K in late.missed
    await vol.nodes.probe_all()
    assert state_of(vol, K) == "down"
    await assert_all_readable(vol, puts, datas)
    assert os.listdir(ssh.node) == []  # nothing, not even a temp file, went underneath

    await script("sshfs_node.py", "reconnect", ssh.node)
    assert is_mounted(ssh.node)
    await vol.nodes.probe_all()
    assert state_of(vol, K) == "up"
    await assert_all_readable(await open_vol(ssh.paths), puts, datas)
    assert (await vol.blobs.put_blob(b"back again" * 100)).missed == ()
    assert len(sliver_files(ssh.backing)) == 4  # 3 + "back again"; the dropped put missed K


async def test_killed_client_leaves_a_dead_mount(ssh: SshNode) -> None:
    vol = await open_vol(ssh.paths, node_timeout=10.0)
    datas = blob_data(2)
    puts = await put_all(vol, datas)

    await script("sshfs_node.py", "drop", ssh.node, "--how", "kill")
    assert is_mounted(ssh.node)  # still listed: a dead mount, not a dropped one
    with pytest.raises(OSError) as info:
        os.listdir(ssh.node)
    assert info.value.errno in (107, 103)  # ENOTCONN / ECONNABORTED
    status = (await script("sshfs_node.py", "status", ssh.node, "--json")).json()
    assert status["mounted"] and not status["client_alive"] and status["sshd_alive"]

    late = await vol.blobs.put_blob(b"put past a dead mount" * 100)
    assert K in late.missed
    await vol.nodes.probe_all()
    assert state_of(vol, K) == "down"
    await assert_all_readable(vol, puts, datas)

    await script("sshfs_node.py", "reconnect", ssh.node)
    await vol.nodes.probe_all()
    assert state_of(vol, K) == "up"
    await assert_all_readable(await open_vol(ssh.paths), puts, datas)


async def test_refusals(tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "precious").write_text("keep")
    ran = await script("sshfs_node.py", "up", tmp_path, busy, ok=False)
    assert ran.rc == 2 and "not empty" in ran.err
    assert (busy / "precious").read_text() == "keep"
    ran = await script("sshfs_node.py", "drop", tmp_path / "nowhere", ok=False)
    assert ran.rc == 1 and "not an sshfs node" in ran.err
