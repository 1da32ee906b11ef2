"""faults.py as a user runs it: every fault is real (walrusfs sees it) and survived.

Volumes have n=7, f=2 (R=3 systematic primaries). The faulted node is always one a healthy
read would use (it holds a systematic primary of the first blob), so surviving the fault
means routing around it, not luck.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.scripts.util import (
    assert_all_readable,
    blob_data,
    is_mounted,
    make_volume,
    node_of_pair,
    node_paths,
    open_vol,
    put_all,
    puts_touching,
    script,
    sliver_files,
    state_of,
)
from walrusfs.volume import open_volume

NOBODY = 65534


def fault_record(node: Path) -> Path:
    return node.parent / f".walrusfs-fault-{node.name}.json"


async def lose_and_restore(paths: list[Path], how: str) -> None:
    """Take a node away with `how`, check walrusfs sees it and survives, restore, check again."""
    datas = blob_data(3)
    vol = await open_vol(paths)
    puts = await put_all(vol, datas)
    k = node_of_pair(puts[0], 0)
    if k == 0:  # the volume is opened through node 0; fault another systematic node
        k = node_of_pair(puts[0], 1)
    node = paths[k]

    ran = await script("faults.py", "take-away", node, "--how", how, "--json")
    assert ran.json()["ok"] and fault_record(node).exists()
    fresh = await open_vol(paths, node_timeout=5.0)
    await fresh.nodes.probe_all()
    assert state_of(fresh, k) == "down", fresh.nodes.snapshot()[k]
    await assert_all_readable(fresh, puts, datas)
    assert fresh.blobs.stats.degraded_reads >= 1  # blob 0 was read around the lost node
    late = await fresh.blobs.put_blob(b"written while away" * 100)
    assert k in late.missed

    await script("faults.py", "restore", node)
    assert not fault_record(node).exists()
    await fresh.nodes.probe_all()
    assert state_of(fresh, k) == "up", fresh.nodes.snapshot()[k]
    await assert_all_readable(fresh, puts, datas)
    assert (await fresh.blobs.put_blob(b"after restore" * 100)).missed == ()


@pytest.mark.parametrize("how", ["rename", "remove", "ro"])
async def test_take_away_and_restore(tmp_path: Path, how: str) -> None:
    if how == "ro" and os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    paths = node_paths(tmp_path / "vol")
    await make_volume(paths)
    await lose_and_restore(paths, how)
    assert not any(p.name.startswith(".walrusfs-") for p in (tmp_path / "vol").iterdir())
    assert not is_mounted(tmp_path / "vol")


async def mount_node(kind: str, node: Path, tmp_path: Path) -> None:
    """Make `node` its own mount point: a bind mount of a directory, or a loop-mounted ext4."""
    node.mkdir(parents=True)
    if kind == "bind":
        backing = tmp_path / "backing"
        backing.mkdir()
        await trio.run_process(["mount", "--bind", str(backing), str(node)])
        return
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("needs mkfs.ext4 (e2fsprogs) for a loop-mounted node")
    image = tmp_path / "node.img"
    await trio.run_process(["truncate", "-s", "32M", str(image)])
    await trio.run_process(["mkfs.ext4", "-q", "-F", str(image)], capture_stdout=True)
    await trio.run_process(["mount", "-o", "loop", str(image), str(node)])


@pytest.mark.parametrize("kind", ["bind", "loop"])
async def test_take_away_by_unmount_leaves_the_bare_dir_untouched(
    tmp_path: Path, root_only: None, kind: str
) -> None:
    """Node 2 is its own mount; unmount it, write (not underneath), mount it again."""
    k = 2
    paths = node_paths(tmp_path / "vol")
    await mount_node(kind, paths[k], tmp_path)
    await make_volume(paths)
    vol = await open_vol(paths)
    assert vol.identity.mounts[k] == str(paths[k])
    puts, datas = await puts_touching(vol, k, 2)

    await script("faults.py", "take-away", paths[k], "--how", "unmount")
    assert not is_mounted(paths[k]) and os.listdir(paths[k]) == []
    fresh = await open_vol(paths, node_timeout=5.0)
    await fresh.nodes.probe_all()
    assert state_of(fresh, k) == "down"
    await assert_all_readable(fresh, puts, datas)
    late = await fresh.blobs.put_blob(b"written while unmounted" * 100)
    assert k in late.missed
    assert os.listdir(paths[k]) == []  # nothing written into the bare directory

    await script("faults.py", "restore", paths[k])
    assert is_mounted(paths[k]) and (paths[k] / "walrusfs-node.json").exists()
    await fresh.nodes.probe_all()
    assert state_of(fresh, k) == "up"
    await assert_all_readable(fresh, puts, datas)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users may traverse (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="walrusfs-chmod-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


async def as_nobody_can_list(path: Path) -> bool:
    done = await trio.run_process(
        ["ls", str(path)], user=NOBODY, group=NOBODY, capture_stdout=True, capture_stderr=True,
        check=False,
    )  # fmt: skip
    return done.returncode == 0


async def test_take_away_by_chmod(shared_dir: Path) -> None:
    """chmod 000 locks out other users; root ignores it (documented), restore gives it back."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    paths = node_paths(shared_dir / "vol")
    await make_volume(paths)
    (shared_dir / "vol").chmod(0o755)
    datas = blob_data(2)
    vol = await open_vol(paths)
    puts = await put_all(vol, datas)
    k = node_of_pair(puts[0], 0) or node_of_pair(puts[0], 1)
    os.chown(paths[k], NOBODY, NOBODY)
    assert await as_nobody_can_list(paths[k])

    ran = await script("faults.py", "take-away", paths[k], "--how", "chmod")
    assert "root ignores permission bits" in ran.err
    assert stat.S_IMODE(paths[k].stat().st_mode) == 0
    assert not await as_nobody_can_list(paths[k])
    await assert_all_readable(vol, puts, datas)  # root: still readable, as documented

    await script("faults.py", "restore", paths[k])
    assert stat.S_IMODE(paths[k].stat().st_mode) == 0o700
    assert await as_nobody_can_list(paths[k])


async def test_remove_for_good(tmp_path: Path) -> None:
    paths = node_paths(tmp_path)
    await make_volume(paths)
    datas = blob_data(2)
    puts = await put_all(await open_vol(paths), datas)
    k = node_of_pair(puts[0], 0) or node_of_pair(puts[0], 1)
    await script("faults.py", "take-away", paths[k], "--how", "remove", "--for-good")
    assert not paths[k].exists() and not fault_record(paths[k]).exists()
    assert not any(p.name.startswith(".walrusfs-") for p in tmp_path.iterdir())
    vol = await open_vol(paths)
    assert state_of(vol, k) == "down"
    await assert_all_readable(vol, puts, datas)
    ran = await script("faults.py", "restore", paths[k], ok=False)
    assert ran.rc == 1 and "no fault recorded" in ran.err


async def test_wipe(tmp_path: Path) -> None:
    paths = node_paths(tmp_path)
    await make_volume(paths)
    datas = blob_data(3)
    puts = await put_all(await open_vol(paths), datas)
    k = node_of_pair(puts[0], 0) or node_of_pair(puts[0], 1)
    assert len(sliver_files(paths[k])) == 3

    ran = await script("faults.py", "wipe", paths[k], "--json")
    assert ran.json()["slivers_removed"] == 3
    assert sliver_files(paths[k]) == [] and (paths[k] / "walrusfs-node.json").exists()
    vol = await open_vol(paths)
    await vol.nodes.probe_all()
    assert state_of(vol, k) == "up"  # a replaced disk with its identity: up, but empty
    await assert_all_readable(vol, puts, datas)
    assert vol.blobs.stats.degraded_reads >= 1

    await script("faults.py", "wipe", paths[k], "--identity-too")
    assert os.listdir(paths[k]) == ["space-reserve"]  # not asked for --everything
    vol = await open_vol(paths)
    assert state_of(vol, k) == "down"
    assert "not a walrusfs node directory" in str(vol.nodes.snapshot()[k]["reason"])
    await assert_all_readable(vol, puts, datas)


async def test_wipe_of_a_node_that_is_being_written(tmp_path: Path) -> None:
    """As in a chaos run: the mount keeps writing slivers while the disk is wiped."""
    paths = node_paths(tmp_path)
    await make_volume(paths)
    puts = await put_all(await open_vol(paths), blob_data(3))
    k = node_of_pair(puts[0], 0)
    before = sliver_files(paths[k])
    stop = threading.Event()

    def writer() -> None:  # recreates key directories and files as fast as it can
        i = 0
        while not stop.is_set():
            d = paths[k] / "slivers" / f"{i % 4:02x}" / "00"
            with contextlib.suppress(OSError):
                d.mkdir(parents=True, exist_ok=True)
                (d / f"f{i}.p0").write_bytes(b"x")
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        ran = await script("faults.py", "wipe", paths[k], "--json")
    finally:
        stop.set()
        thread.join()
    assert ran.json()["slivers_removed"] == 3
    assert not set(before) & set(sliver_files(paths[k]))
    assert not [p for p in paths[k].iterdir() if p.name.startswith(".tmp-wiped")]


@pytest.mark.parametrize("mode", ["flip", "truncate", "zero", "swap", "foreign"])
async def test_corruption_is_detected_and_survived(tmp_path: Path, mode: str) -> None:
    """Damage the pairs 0 and 1 of a blob (f=2 nodes): reads detect both and still succeed."""
    paths = node_paths(tmp_path)
    await make_volume(paths)
    datas = blob_data(4)
    puts = await put_all(await open_vol(paths), datas)
    target = puts[0]
    for pair in (0, 1):
        node = paths[node_of_pair(target, pair)]
        before = {p: p.stat().st_ino for p in sliver_files(node)}
        ran = await script(
            "faults.py", "corrupt", node, "--mode", mode, "--blob", target.blob_id.hex(),
            "--seed", "7", "--json",
        )  # fmt: skip
        hits = ran.json()["files"]
        assert [h["blob_id"] for h in hits] == [target.blob_id.hex()]
        assert all(h["changed"] for h in hits)
        # Replaced by rename (atomic), never rewritten in place; no temp file left behind.
        hit = Path(hits[0]["path"])
        assert hit.stat().st_ino != before[hit]
        assert not list(node.rglob(".tmp-*"))

    vol = await open_vol(paths)  # fresh: no header cached from before the damage
    await assert_all_readable(vol, puts, datas)
    assert vol.blobs.stats.corrupt_slivers >= 2
    flagged = {n["index"] for n in vol.nodes.snapshot() if int(n["corrupt"]) > 0}  # type: ignore[call-overload]
    assert flagged == {node_of_pair(target, 0), node_of_pair(target, 1)}


async def test_corrupt_is_reproducible_with_a_seed(tmp_path: Path) -> None:
    paths = node_paths(tmp_path / "vol")
    await make_volume(paths)
    await put_all(await open_vol(paths), blob_data(5))
    copies = [tmp_path / "a", tmp_path / "b"]
    for c in copies:
        shutil.copytree(paths[3], c)
    reports = []
    for c in copies:
        ran = await script("faults.py", "corrupt", c, "--mode", "flip", "--count", "2",
                           "--region", "primary", "--bits", "3", "--seed", "42", "--json")  # fmt: skip
        reports.append([(Path(h["path"]).name, h["detail"]) for h in ran.json()["files"]])
    assert reports[0] == reports[1] and len(reports[0]) == 2
    for a, b in zip(sliver_files(copies[0]), sliver_files(copies[1]), strict=True):
        assert a.read_bytes() == b.read_bytes()
    untouched = sliver_files(paths[3])
    assert [p.read_bytes() for p in untouched] != [p.read_bytes() for p in sliver_files(copies[0])]


async def test_corrupt_fraction_and_a_path_off_walrusfs(tmp_path: Path) -> None:
    paths = node_paths(tmp_path)
    await make_volume(paths)
    await put_all(await open_vol(paths), blob_data(4))
    ran = await script("faults.py", "corrupt", paths[2], "--mode", "zero", "--fraction", "0.5",
                       "--seed", "3", "--json")  # fmt: skip
    assert len(ran.json()["files"]) == 2
    ran = await script("faults.py", "corrupt", "--path", tmp_path / "mnt/file", "--mode", "flip",
                       ok=False)  # fmt: skip
    assert ran.rc == 2 and "not on a mounted walrusfs" in ran.err
    ran = await script("faults.py", "corrupt", paths[2], "--mode", "flip", "--count", "9", ok=False)
    assert ran.rc == 1 and "only 4" in ran.err


async def test_a_file_damaged_before_can_be_damaged_again(tmp_path: Path) -> None:
    """A truncated file is shorter than its header says: flips land within it."""
    paths = node_paths(tmp_path)
    await make_volume(paths)
    await put_all(await open_vol(paths), blob_data(2))
    await script("faults.py", "corrupt", paths[4], "--mode", "truncate", "--region", "secondary",
                 "--fraction", "1", "--seed", "1")  # fmt: skip
    before = [p.read_bytes() for p in sliver_files(paths[4])]
    for seed in range(4):
        await script("faults.py", "corrupt", paths[4], "--mode", "flip", "--fraction", "1",
                     "--seed", seed)  # fmt: skip
    after = [p.read_bytes() for p in sliver_files(paths[4])]
    assert [len(b) for b in after] == [len(b) for b in before]
    assert all(a != b for a, b in zip(after, before, strict=True))


async def test_list_shows_what_the_node_holds(tmp_path: Path) -> None:
    paths = node_paths(tmp_path)
    await make_volume(paths)
    puts = await put_all(await open_vol(paths), blob_data(3))
    ran = await script("faults.py", "list", paths[5], "--json")
    files = ran.json()["files"]
    assert sorted(f["blob_id"] for f in files) == sorted(r.blob_id.hex() for r in puts)
    for f in files:
        r = next(r for r in puts if r.blob_id.hex() == f["blob_id"])
        assert node_of_pair(r, f["pair"]) == 5
        assert f["size"] == (paths[5] / f["key"]).stat().st_size
    text = await script("faults.py", "list", paths[5])
    assert text.out.strip().splitlines()[-1].startswith("3 sliver files")


async def test_refusals_are_clear(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "precious").write_text("keep")
    for args in (["take-away", plain, "--how", "rename"], ["wipe", plain]):
        ran = await script("faults.py", *args, ok=False)
        assert ran.rc == 2 and "not a walrusfs node directory" in ran.err
    assert (plain / "precious").read_text() == "keep"

    paths = node_paths(tmp_path / "vol")
    await make_volume(paths)
    ran = await script("faults.py", "restore", paths[1], ok=False)
    assert ran.rc == 1 and "no fault recorded" in ran.err
    ran = await script("faults.py", "take-away", paths[1], "--how", "unmount", ok=False)
    assert ran.rc == 2 and "not a mount point" in ran.err
    await script("faults.py", "take-away", paths[1], "--how", "rename")
    ran = await script("faults.py", "take-away", paths[1], "--how", "rename", ok=False)
    assert ran.rc == 2 and "restore first" in ran.err
    await script("faults.py", "restore", paths[1])
    vol = await open_volume(str(paths[1]))
    assert vol.identity.index == 1
    for name in ("faults.py", "badmount.py", "sshfs_node.py"):
        ran = await script(name, "--help")
        assert "usage:" in ran.out and "Exit codes" in ran.out
