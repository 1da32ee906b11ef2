"""Node directories that fill up, through the real `walrusfs` command (tier 3)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.backends.util import fill_up
from tests.walrusfs.clivol import Vol, run
from tests.walrusfs.volumes import tmpfs

pytestmark = pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs /dev/fuse")


def node_status(vol: Vol) -> list[dict[str, object]]:
    return json.loads(run("status", vol.mnt, "--json").stdout)["nodes"]  # type: ignore[no-any-return]


def node_states(vol: Vol) -> list[str]:
    return [str(n["state"]) for n in node_status(vol)]


def write_when_there_is_room(path: Path, data: bytes, within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            path.write_bytes(data)
            return
        except OSError as exc:
            assert exc.errno == errno.ENOSPC and time.monotonic() < deadline, exc
            time.sleep(0.5)


def write_past_full(path: Path) -> None:
    """Write 16 MiB, about twice what a small_volume holds: ENOSPC, by close() at last."""
    with pytest.raises(OSError) as err, open(path, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(256 << 10))
    assert err.value.errno == errno.ENOSPC


@contextlib.contextmanager
def small_volume(tmp_path: Path) -> Iterator[Vol]:
    """A volume of 7 nodes of 4 MiB (tmpfs) and 256 KiB blobs; unmounted afterwards."""
    vol = Vol(tmp_path)
    with contextlib.ExitStack() as stack:
        for node in vol.nodes:
            stack.enter_context(tmpfs(str(node), "4m"))
        run("mkfs", "--blob-size", "256K", *vol.nodes)
        try:
            yield vol
        finally:
            vol.cleanup()


def test_deleting_files_gives_a_full_volume_its_space_back(tmp_path: Path) -> None:
    """Every node full: a write fails with ENOSPC, and `rm` makes room again. The delete
    used to wait for full nodes to take its journal record, and they took none until
    64 MiB were free, which only the delete could give back."""
    with small_volume(tmp_path) as vol:
        vol.mount()
        kept = os.urandom(300_000)
        (vol.mnt / "kept").write_bytes(kept)
        write_past_full(vol.mnt / "big")
        assert node_states(vol).count("full") > 2

        (vol.mnt / "big").unlink()
        after = os.urandom(1 << 20)
        write_when_there_is_room(vol.mnt / "after", after, within=60)
        assert node_states(vol) == ["up"] * 7

        assert "all data and metadata stored" in run("umount", vol.mnt).stdout
        vol.mount()
        assert sorted(p.name for p in vol.mnt.iterdir()) == ["after", "kept"]
        assert (vol.mnt / "kept").read_bytes() == kept
        assert (vol.mnt / "after").read_bytes() == after


def test_a_volume_filled_with_small_files_mounts_again_and_gives_its_space_back(
    tmp_path: Path,
) -> None:
    """Small files wait in the journal, on every node, until they are packed: they can
    fill the nodes to the last byte. Then the delete that would free them could not be
    committed, nor could a mount write its first checkpoint: the volume stayed full for
    good. The nodes keep a reserve for the metadata, new data is refused once they use
    it, and a mount too full for a checkpoint carries the journal on."""
    with small_volume(tmp_path) as vol:
        vol.mount()
        deadline = time.monotonic() + 10
        while not all(n["reserve"] for n in node_status(vol)):  # known after a probe
            assert time.monotonic() < deadline, node_status(vol)
            time.sleep(0.1)
        assert all(n["reserve"] >= 128 << 10 for n in node_status(vol))
        assert all(os.path.getsize(node / "space-reserve") >= 128 << 10 for node in vol.nodes)
        written: dict[str, bytes] = {}
        for k in range(1000):  # 20 MB: five times what the nodes hold
            data = os.urandom(20_000)
            try:
                (vol.mnt / f"f{k}").write_bytes(data)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
            written[f"f{k}"] = data
        else:
            pytest.fail("the volume never filled up")
        assert len(written) > 50
        run("umount", vol.mnt, check=False)  # the last file's bytes stay unstored

        vol.mount()
        for name, data in written.items():
            assert (vol.mnt / name).read_bytes() == data
        for path in vol.mnt.iterdir():
            path.unlink()
        after = os.urandom(1 << 20)
        write_when_there_is_room(vol.mnt / "after", after, within=60)
        assert "all data and metadata stored" in run("umount", vol.mnt).stdout

        vol.mount()
        assert [p.name for p in vol.mnt.iterdir()] == ["after"]
        assert (vol.mnt / "after").read_bytes() == after


def test_with_f_nodes_down_one_full_node_keeps_its_reserve_for_deletes(tmp_path: Path) -> None:
    """With f nodes down, every commit needs the one full node: its reserve is what takes
    the journal records of deletes. New files and new bytes must not go there. They did,
    as patches (fewer than f+1 nodes were full), until the reserve was gone and writes
    failed with EIO."""
    vol = Vol(tmp_path)
    full, down = vol.nodes[6], vol.nodes[1:3]
    with tmpfs(str(full), "4m"):
        run("mkfs", "--blob-size", "256K", *vol.nodes)
        try:
            vol.mount()
            old = {f"old{k}": os.urandom(20_000) for k in range(10)}
            for name, data in old.items():
                (vol.mnt / name).write_bytes(data)
            (vol.mnt / "kept").write_bytes(b"kept")
            run("umount", vol.mnt)
            for node in down:
                node.rename(node.with_suffix(".away"))
            fill_up(full)
            vol.mount()  # its checkpoint leaves no changes for another to spend the reserve on
            deadline = time.monotonic() + 30
            while node_states(vol) != ["up", "down", "down", "up", "up", "up", "full"]:
                assert time.monotonic() < deadline, node_states(vol)
                time.sleep(0.2)
            reserve = full / "space-reserve"
            left = reserve.stat().st_size
            assert left >= 128 << 10
            for k in range(20):
                with pytest.raises(OSError) as err:
                    (vol.mnt / f"new{k}").write_bytes(os.urandom(20_000))
                assert err.value.errno == errno.ENOSPC
            # An existing file's new bytes are refused at close, not put into the journal.
            changed = os.urandom(20_000)
            fd = os.open(vol.mnt / "kept", os.O_WRONLY)
            os.write(fd, changed)
            with pytest.raises(OSError) as err:
                os.close(fd)
            assert err.value.errno == errno.ENOSPC
            assert reserve.stat().st_size == left  # none of it spent on data
            assert "out of room: too few nodes have space" in run("status", vol.mnt).stdout
            for name in old:
                (vol.mnt / name).unlink()  # committed through the reserve
            assert [p.name for p in vol.mnt.iterdir()] == ["kept"]

            for node in down:
                node.with_suffix(".away").rename(node)
            after = os.urandom(1 << 20)
            write_when_there_is_room(vol.mnt / "after", after, within=60)
            assert "out of room" not in run("status", vol.mnt).stdout
            assert "all data and metadata stored" in run("umount", vol.mnt).stdout
            vol.mount()
            assert sorted(p.name for p in vol.mnt.iterdir()) == ["after", "kept"]
            assert (vol.mnt / "after").read_bytes() == after
            assert (vol.mnt / "kept").read_bytes() == changed  # stored once there was room
        finally:
            vol.cleanup()


def test_a_full_volume_at_unmount_ends_the_server_with_one_error_line(tmp_path: Path) -> None:
    """A file whose close() failed for want of space is still dirty at unmount, and the
    final flush fails the same way: the server says so in one line and exits 1. The
    error came up through two nurseries and the server died with a traceback."""
    log = tmp_path / "server.log"
    with small_volume(tmp_path) as vol:
        server = vol.serve(log)
        kept = os.urandom(300_000)
        (vol.mnt / "kept").write_bytes(kept)
        write_past_full(vol.mnt / "big")

        res = run("umount", vol.mnt, check=False)
        assert res.returncode == 1 and "not everything may be stored" in res.stderr
        assert server.wait(timeout=60) == 1
        stderr = log.read_text()
        assert "Traceback" not in stderr
        assert stderr.splitlines()[-1].startswith("walrusfs: error: [ENOSPC] "), stderr

        vol.mount()
        assert (vol.mnt / "kept").read_bytes() == kept
