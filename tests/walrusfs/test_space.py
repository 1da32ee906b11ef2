"""statfs numbers from the nodes' filesystems: shared space is counted once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.walrusfs.volumes import node_paths, tmpfs
from walrusfs.service import space_of
from walrusfs.volume import create_volume, open_volume


async def test_nodes_on_one_disk_share_its_space(tmp_path: Path) -> None:
    paths = node_paths(tmp_path, 7)
    await create_volume(paths)
    vol = await open_volume(paths[0])
    await vol.nodes.probe_all()
    space = await space_of(vol)()
    st = os.statvfs(tmp_path)
    assert space.total_bytes == st.f_blocks * st.f_frsize  # not seven times the disk
    assert abs(space.free_bytes - st.f_bavail * st.f_frsize) < 256 << 20
    assert space.overhead == pytest.approx(7 * 8 / 15)


async def test_nodes_down_since_the_mount_are_assumed_to_share_the_disk(tmp_path: Path) -> None:
    paths = node_paths(tmp_path, 7)
    await create_volume(paths)
    for i in (2, 5):
        os.rename(paths[i], paths[i] + ".away")
    vol = await open_volume(paths[0])
    await vol.nodes.probe_all()
    st = os.statvfs(tmp_path)
    assert (await space_of(vol)()).total_bytes == st.f_blocks * st.f_frsize  # not 7/5 of it


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
async def test_the_filesystem_that_fills_first_limits(tmp_path: Path) -> None:
    small = tmp_path / "small"
    with tmpfs(str(small), "64m"):
        paths = [*node_paths(tmp_path, 3), *(str(small / f"node{i}") for i in range(3, 7))]
        await create_volume(paths)
        vol = await open_volume(paths[0])
        await vol.nodes.probe_all()
        space = await space_of(vol)()
        st = os.statvfs(small)
        # The tmpfs holds 4 of the 7 nodes, so 4/7 of every blob's bytes: it fills first.
        assert space.total_bytes == st.f_blocks * st.f_frsize * 7 // 4
        assert space.free_bytes <= st.f_bavail * st.f_frsize * 7 // 4
