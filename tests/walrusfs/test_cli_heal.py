"""Self-healing through the real CLI: repair, scrub, replace-node, fsck (tier 3)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.walrusfs.clivol import Vol, run
from tests.walrusfs.volumes import flip_byte, sliver_files
from walrusfs.sliverfile import header_size

pytestmark = pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs /dev/fuse")
ROOT = Path(__file__).parents[2]


def snapshot(node: Path) -> dict[str, bytes]:
    return {str(p.relative_to(node)): p.read_bytes() for p in sliver_files(str(node))}


def write_files(vol: Vol, count: int = 6) -> dict[str, bytes]:
    files = {f"f{i}.bin": os.urandom(150_000 * (i + 1)) for i in range(count)}
    for name, data in files.items():
        (vol.mnt / name).write_bytes(data)
    return files


def test_a_wiped_node_is_rebuilt_byte_identically(vol: Vol) -> None:
    vol.mount()
    files = write_files(vol)
    before = snapshot(vol.nodes[3])
    assert before
    shutil.rmtree(vol.nodes[3] / "slivers")
    out = run("repair", vol.mnt)
    assert "blobs_repaired" in out.stdout
    assert snapshot(vol.nodes[3]) == before
    st = json.loads(run("status", vol.mnt, "--json").stdout)
    assert st["repair"]["last_pass"]["unrepairable"] == {}
    assert all((vol.mnt / name).read_bytes() == data for name, data in files.items())


def test_scrub_finds_and_repairs_corrupt_slivers(vol: Vol) -> None:
    vol.mount()
    write_files(vol)
    victims = sliver_files(str(vol.nodes[5]))[:3]
    originals = {p: p.read_bytes() for p in victims}
    for p in victims:
        flip_byte(p, header_size(7) + 1000)
    assert "no pass yet" in run("status", vol.mnt).stdout
    out = run("scrub", vol.mnt)
    assert "corrupt" in out.stdout
    run("repair", vol.mnt)
    assert {p: p.read_bytes() for p in victims} == originals
    text = run("status", vol.mnt).stdout
    assert "scrub: idle" in text and "errors found 3" in text and ", 3 corrupt, 0 missing" in text


def test_replace_node_then_fsck_is_clean(vol: Vol, tmp_path: Path) -> None:
    vol.mount()
    files = write_files(vol)
    before = snapshot(vol.nodes[1])
    shutil.rmtree(vol.nodes[1])  # the disk died
    fresh = tmp_path / "new-disk"
    fresh.mkdir()
    run("replace-node", vol.mnt, "1", fresh)
    run("repair", vol.mnt)
    rebuilt = snapshot(fresh)
    assert {k: rebuilt.get(k) for k in before} == before  # (plus the checkpoint written since)
    run("umount", vol.mnt)
    res = run("fsck", vol.nodes[0], check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    vol.nodes[1] = fresh
    vol.mount(node=1)  # the new directory is a full member of the volume
    assert all((vol.mnt / name).read_bytes() == data for name, data in files.items())


def test_a_new_empty_disk_in_a_nodes_place_is_named_and_taken(vol: Vol) -> None:
    """A node's disk swapped for an empty one at the same path, under the mount: status
    says what to run. What the mount wrote there before its probe found no identity (a
    lock, say) makes replace-node refuse the directory, saying what it holds and why."""
    vol.mount()
    files = write_files(vol, 3)
    before = snapshot(vol.nodes[4])
    shutil.rmtree(vol.nodes[4])
    vol.nodes[4].mkdir(mode=0o700)
    (vol.nodes[4] / "mount.lock").write_bytes(b"{}")  # what the heartbeat may write there
    hint = (
        f"if node 4's disk was replaced by this one, `walrusfs replace-node MOUNTPOINT 4 "
        f"{vol.nodes[4]}` rebuilds the node there"
    )
    deadline = time.monotonic() + 30
    while hint not in (text := run("status", vol.mnt).stdout):  # once a probe has looked
        assert time.monotonic() < deadline, text
        time.sleep(0.2)
    assert "node 4: down" in text
    # What else the mount wrote there before the probe: named, and left to the user.
    res = run("replace-node", vol.mnt, "4", vol.nodes[4], check=False)
    assert res.returncode == 1 and f"{vol.nodes[4]}: not empty (" in res.stderr
    assert "if this mount wrote them there before it noticed the new disk, remove" in res.stderr
    for entry in vol.nodes[4].iterdir():
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    run("replace-node", vol.mnt, "4", vol.nodes[4])
    run("repair", vol.mnt)
    rebuilt = snapshot(vol.nodes[4])
    assert {k: rebuilt.get(k) for k in before} == before
    assert "node 4: up" in run("status", vol.mnt).stdout
    assert all((vol.mnt / name).read_bytes() == data for name, data in files.items())


def test_corrupting_a_file_by_path_is_caught_and_repaired(vol: Vol) -> None:
    vol.mount()
    files = write_files(vol, 3)
    before = {i: snapshot(node) for i, node in enumerate(vol.nodes)}
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "faults.py"), "corrupt", "--path", str(vol.mnt / "f2.bin"),
         "--mode", "flip", "--seed", "5", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    hit = [Path(h["path"]) for h in json.loads(res.stdout)["files"]]
    assert hit
    changed = {i for i, node in enumerate(vol.nodes) if snapshot(node) != before[i]}
    assert len(changed) == 1  # one node of the volume, only that file's slivers
    (i,) = changed
    originals = {p: before[i][str(p.relative_to(vol.nodes[i]))] for p in hit}
    run("umount", vol.mnt)
    vol.mount()  # nothing cached: the read must go around the damage
    assert all((vol.mnt / name).read_bytes() == data for name, data in files.items())
    # A read that met the damage has queued it for repair already; otherwise the scrub finds it.
    run("scrub", vol.mnt)
    run("repair", vol.mnt)
    assert {p: p.read_bytes() for p in hit} == originals
