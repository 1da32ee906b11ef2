"""statfs numbers from the nodes' filesystems: shared space is counted once."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from tests.backends.util import fill_up
from tests.walrusfs.volumes import node_paths, tmpfs
from walrusfs.nodeset import RESERVE_KEY, RESERVE_MIN
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


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
async def test_one_full_node_leaves_the_free_space_writes_still_have(tmp_path: Path) -> None:
    """Writes go on while n-f nodes take them: the (n-f)th roomiest node limits what df
    shows, not the fullest. With f nodes down as well, nothing more can be written."""
    small = tmp_path / "small"
    with tmpfs(str(small), "4m"):
        paths = [*node_paths(tmp_path, 6), str(small / "node6")]
        await create_volume(paths)
        fill_up(small)
        vol = await open_volume(paths[0])
        await vol.nodes.probe_all()
        assert vol.nodes.full_count() == 1
        st = os.statvfs(tmp_path)
        space = await space_of(vol)()
        assert space.total_bytes == st.f_blocks * st.f_frsize * 7 // 6  # the disk's 6 nodes
        assert abs(space.free_bytes - st.f_bavail * st.f_frsize * 7 // 6) < 256 << 20
        r = await vol.blobs.put_blob(os.urandom(1 << 20))  # and writes do go on
        assert r.missed == (6,)

        for i in (1, 2):
            os.rename(paths[i], paths[i] + ".away")
        await vol.nodes.probe_all()
        assert vol.out_of_room()
        assert (await space_of(vol)()).free_bytes == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
async def test_each_node_keeps_a_reserve_that_only_a_full_one_gives_up(tmp_path: Path) -> None:
    """The reserve is space for the metadata once a node is full (walrusfs.nodeset):
    taken at mkfs and by probes, given back in slices by a full node's small writes,
    and wholly only by the nodes taken as full."""
    paths = node_paths(tmp_path, 7)
    with contextlib.ExitStack() as stack:
        for p in paths:
            stack.enter_context(tmpfs(p, "4m"))
        await create_volume(paths)
        reserve = [Path(p, RESERVE_KEY) for p in paths]
        assert all(r.stat().st_blocks * 512 >= RESERVE_MIN for r in reserve)
        vol = await open_volume(paths[0])
        vol.nodes.reserve_extra = 256 << 10  # a checkpoint's room, held too
        await vol.nodes.probe_all()
        want = RESERVE_MIN + (256 << 10)
        assert [n.reserved for n in vol.nodes.nodes] == [want] * 7
        assert all(r.stat().st_size == want for r in reserve)

        for p in paths[:3]:
            fill_up(Path(p))
        await vol.nodes.put_batch([(i, "x", os.urandom(64 << 10)) for i in range(3)])
        assert vol.nodes.full_count() == 3
        record = os.urandom(16 << 10)
        for i in range(3):  # fits in what the reserve gave back, not without it
            await vol.nodes.call_small(i, lambda st: st.append("log", record), len(record))
        assert [r.stat().st_size for r in reserve[:3]] == [want - (64 << 10)] * 3

        assert await vol.nodes.release_reserves() == 3
        assert [r.exists() for r in reserve] == [False] * 3 + [True] * 4
        await vol.nodes.probe_all()  # still full: nothing taken back
        assert [r.exists() for r in reserve] == [False] * 3 + [True] * 4
