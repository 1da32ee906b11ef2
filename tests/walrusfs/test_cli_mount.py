"""The real `walrusfs` command in subprocesses, as a user runs it (tier 3)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backends.remote import mount_devices
from tests.backends.util import fill_up
from tests.walrusfs.clivol import Vol, kill_server, mounted, run, server_pid
from tests.walrusfs.silentmount import silent_mount
from tests.walrusfs.volumes import lose_secondary, sliver_files, tmpfs
from walrusfs.cli import default_state_dir
from walrusfs.control import query, real_mountpoint, socket_path
from walrusfs.mount import tune_read_ahead
from walrusfs.sliverfile import sliver_key

pytestmark = pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs /dev/fuse")
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="only root may mount(2) by hand")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_mkfs_refuses_bad_input(tmp_path: Path) -> None:
    res = run("mkfs", *(tmp_path / f"a{i}" for i in range(3)), check=False)
    assert res.returncode == 1 and "n=3" in res.stderr
    res = run("mkfs", "--faults", "3", *(tmp_path / f"b{i}" for i in range(7)), check=False)
    assert res.returncode == 1 and "f=3" in res.stderr
    busy = tmp_path / "c0"
    busy.mkdir()
    (busy / "keep").write_text("mine")
    res = run("mkfs", busy, *(tmp_path / f"c{i}" for i in range(1, 4)), check=False)
    assert (
        res.returncode == 1 and "not empty" in res.stderr and (busy / "keep").read_text() == "mine"
    )
    res = run("mount", tmp_path / "nope", tmp_path, check=False)
    assert res.returncode == 1 and "missing" in res.stderr
    res = run("mount", "--cache-size", "100K", tmp_path / "nope", tmp_path, check=False)
    assert res.returncode == 1 and "--cache-size must be at least 1M" in res.stderr
    res = run("mount", "--commit", "-1", tmp_path / "nope", tmp_path, check=False)
    assert res.returncode == 1 and "--commit must be 0 or more seconds" in res.stderr


def test_mkfs_leaves_no_state_behind_on_this_machine(tmp_path: Path) -> None:
    """The volume's metadata is on its nodes; each mount makes its own working copy."""
    res = run("mkfs", *(tmp_path / f"n{i}" for i in range(4)))
    volume_id = res.stdout.split()[2].rstrip(":")
    assert re.fullmatch(r"[0-9a-f]{32}", volume_id), res.stdout
    assert not os.path.exists(default_state_dir(volume_id))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for expected in (None, b"kept"):
        run("mount", "--state-dir", tmp_path / "state", tmp_path / "n0", mnt)
        try:
            if expected is None:
                (mnt / "f").write_bytes(b"kept")
            else:
                assert (mnt / "f").read_bytes() == expected
        finally:
            run("umount", mnt)


def test_mount_use_status_umount(vol: Vol, tmp_path: Path) -> None:
    vol.mount()
    assert mounted(vol.mnt)
    data = os.urandom(700_000)
    (vol.mnt / "f.bin").write_bytes(data)
    subprocess.run(["cp", "-r", str(Path(__file__).parent), str(vol.mnt / "tree")], check=True)
    st = json.loads(run("status", vol.mnt, "--json").stdout)
    assert [n["state"] for n in st["nodes"]] == ["up"] * 7
    assert st["files"] >= 3
    # Drained soon, not at once: the kernel releases closed files asynchronously, and
    # the background flush journals the packs it stores.
    deadline = time.monotonic() + 30
    while st["journal_lag"] or st["dirty_bytes"]:
        assert time.monotonic() < deadline, f"never drained: {st}"
        time.sleep(0.1)
        st = json.loads(run("status", vol.mnt, "--json").stdout)
    text = run("status", vol.mnt).stdout
    assert "node 6: up" in text
    (vol.mnt / "gone.bin").write_bytes(os.urandom(300_000))
    found = query(str(vol.mnt), "blobs-of", path="gone.bin")["blobs"]
    blobs = {str(b) for b in found}  # type: ignore[attr-defined]

    def held() -> set[str]:
        return {p.name[:64] for p in sliver_files(str(vol.nodes[0]))} & blobs

    assert held() == blobs
    # Its blobs go in a delete round once the kernel forgets the inode (asynchronously).
    (vol.mnt / "gone.bin").unlink()
    deadline = time.monotonic() + 60
    while held() or json.loads(run("status", vol.mnt, "--json").stdout)["deletes_pending"]:
        assert time.monotonic() < deadline, "the freed blobs were never deleted"
        time.sleep(0.2)
    assert "awaiting deletion 0" in run("status", vol.mnt).stdout
    pid = st["pid"]
    run("umount", vol.mnt)
    assert not mounted(vol.mnt)
    assert (
        not Path(f"/proc/{pid}").exists()
        or "Z" in Path(f"/proc/{pid}/stat").read_text().split(") ")[1][:1]
    )
    vol.mount()
    assert (vol.mnt / "f.bin").read_bytes() == data
    assert sha(vol.mnt / "tree" / Path(__file__).name) == sha(Path(__file__))


def test_status_shows_the_data_and_what_it_takes(vol: Vol) -> None:
    vol.mount()
    (vol.mnt / "big.bin").write_bytes(os.urandom(700_000))  # 256K blocks: 3 blobs
    for i in range(10):
        (vol.mnt / f"small{i}").write_bytes(os.urandom(10_000))  # together: one pack
    with open(vol.mnt / "sparse", "wb") as f:
        f.truncate(5_000_000)  # a hole: no blob
    run("umount", vol.mnt)  # stores the small files' pack
    vol.mount()
    use = json.loads(run("status", vol.mnt, "--json").stdout)["usage"]
    pack = 100_000 + len(b"walrusfs pack 1\n")
    assert use == {
        "file_bytes": 5_800_000,
        "data_bytes": 800_000,
        "blob_bytes": 700_000 + pack,
        "node_bytes": (700_000 + pack) * 7 * (3 + 5) // (3 * 5),
        "pack_bytes": pack,
        "pack_dead_bytes": 0,
    }
    for i in range(4):
        (vol.mnt / f"small{i}").unlink()
    deadline = time.monotonic() + 60
    # Their blocks go once the kernel forgets the inodes (asynchronously); the pack stays,
    # most of it still used.
    while (use := json.loads(run("status", vol.mnt, "--json").stdout)["usage"])[
        "pack_dead_bytes"
    ] < 40_000:
        assert time.monotonic() < deadline, f"deleted files still held: {use}"
        time.sleep(0.2)
    assert use["pack_dead_bytes"] == 40_000 and use["data_bytes"] == 760_000
    text = run("status", vol.mnt).stdout
    assert "data 5.5 MiB in files (742.2 KiB of it in blobs" in text
    assert "packs 97.7 KiB, 39.1 KiB of it no longer used" in text


def test_a_mount_that_would_cover_what_it_uses_is_refused(vol: Vol, tmp_path: Path) -> None:
    """Mounted over a node's directory (a slip of the finger: `mount node0 node1`), the
    server's own I/O to that node would come back through its own mount."""
    before = sorted(p.name for p in vol.nodes[1].iterdir())
    res = run("mount", "--state-dir", vol.state, vol.nodes[0], vol.nodes[1], check=False)
    assert res.returncode == 1 and "the mountpoint" in res.stderr
    assert "is node 1's directory" in res.stderr
    assert not mounted(vol.nodes[1])
    res = run("mount", "--state-dir", vol.state, vol.nodes[0], tmp_path, check=False)
    assert res.returncode == 1 and "is inside the mountpoint" in res.stderr
    assert not mounted(tmp_path)
    inner = vol.nodes[3] / "mnt"
    inner.mkdir()
    res = run("mount", "--state-dir", vol.state, vol.nodes[0], inner, check=False)
    assert res.returncode == 1 and "is inside node 3's directory" in res.stderr
    inner.rmdir()
    res = vol.mount("--state-dir", vol.mnt / "state", check=False)
    assert res.returncode == 1 and "the state directory" in res.stderr
    assert not mounted(vol.mnt)
    assert sorted(p.name for p in vol.nodes[1].iterdir()) == before
    vol.mount()  # and the volume is none the worse
    (vol.mnt / "f").write_bytes(b"fine")
    res = run("replace-node", vol.mnt, "2", vol.mnt / "new2", check=False)
    assert res.returncode == 1 and "is inside the mountpoint" in res.stderr
    assert res.stderr.rstrip().endswith("; choose a directory outside the mount")
    assert (vol.mnt / "f").read_bytes() == b"fine"


def test_mount_without_a_node_says_so(vol: Vol) -> None:
    os.rename(vol.nodes[4], f"{vol.nodes[4]}.away")
    res = vol.mount()
    assert mounted(vol.mnt) and res.returncode == 0
    assert f"warning: node 4 ({vol.nodes[4]}) is down" in res.stderr
    assert "works without it" in res.stderr
    (vol.mnt / "f").write_bytes(b"written with a node away")
    assert (vol.mnt / "f").read_bytes() == b"written with a node away"
    run("umount", vol.mnt)
    os.rename(f"{vol.nodes[4]}.away", vol.nodes[4])
    res = vol.mount()
    assert res.stderr == ""  # all well: nothing to warn about
    assert (vol.mnt / "f").read_bytes() == b"written with a node away"


def test_umount_while_a_file_is_open_says_why_and_keeps_the_mount(vol: Vol) -> None:
    vol.mount()
    with open(vol.mnt / "open", "wb") as f:
        f.write(b"still open")
        res = run("umount", vol.mnt, check=False)
        assert res.returncode == 1 and "busy" in res.stderr and "fuser -vm" in res.stderr
        assert mounted(vol.mnt)
    assert (vol.mnt / "open").read_bytes() == b"still open"
    assert "all data and metadata stored" in run("umount", vol.mnt).stdout


def test_umount_of_what_is_not_mounted_says_so(vol: Vol) -> None:
    res = run("umount", vol.mnt, check=False)
    assert res.returncode == 1 and f"{vol.mnt}: nothing is mounted there" in res.stderr


def test_umount_of_another_filesystem_leaves_it_mounted(vol: Vol, tmp_path: Path) -> None:
    """A mistyped path (here the disk holding a node directory) is refused: as root,
    fusermount3 unmounts any filesystem, and this one took the node with it. So is a
    mount stacked over a walrusfs mount, which an unmount would take away first."""
    disk = tmp_path / "disk"
    with tmpfs(str(disk), "1m"):
        (disk / "node").write_bytes(b"on the other disk")
        res = run("umount", disk, check=False)
        assert res.returncode == 1
        assert f"{disk}: the mount there is tmpfs, not walrusfs; nothing was unmounted" in (
            res.stderr
        )
        assert (disk / "node").read_bytes() == b"on the other disk"
    vol.mount()
    (vol.mnt / "f").write_bytes(b"under the stack")
    with tmpfs(str(vol.mnt), "1m"):
        res = run("umount", vol.mnt, check=False)
        assert res.returncode == 1 and "the mount there is tmpfs" in res.stderr
        assert mounted(vol.mnt) and not (vol.mnt / "f").exists()  # the tmpfs is still on top
    assert (vol.mnt / "f").read_bytes() == b"under the stack"
    assert "all data and metadata stored" in run("umount", vol.mnt).stdout


def test_second_mount_is_refused(vol: Vol, tmp_path: Path) -> None:
    vol.mount()
    other = tmp_path / "mnt2"
    other.mkdir()
    res = run("mount", "--state-dir", tmp_path / "s2", vol.nodes[4], other, check=False)
    assert res.returncode == 1 and "already mounted by pid" in res.stderr
    assert not mounted(other)


def test_mount_over_a_live_walrusfs_mount_is_refused(vol: Vol, tmp_path: Path) -> None:
    """Another volume mounted over this one's mountpoint would hide it and take its
    control socket: `status` and `umount` would find only the new one."""
    vol.mount()
    (vol.mnt / "f").write_bytes(b"first")
    others = [tmp_path / "other" / f"node{i}" for i in range(4)]
    run("mkfs", *others)
    res = run("mount", "--state-dir", tmp_path / "s2", others[0], vol.mnt, check=False)
    assert res.returncode == 1
    assert f"{vol.mnt}: a walrusfs mount is there already and answering (volume " in res.stderr
    assert f"server pid {server_pid(vol.mnt)}); nothing was mounted" in res.stderr
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    assert sum(line.split()[1] == str(vol.mnt) for line in mounts) == 1  # nothing stacked
    assert (vol.mnt / "f").read_bytes() == b"first"
    assert "all data and metadata stored" in run("umount", vol.mnt).stdout
    assert not mounted(vol.mnt)


def test_a_state_directory_among_the_nodes_is_refused(vol: Vol) -> None:
    """In a node's directory, the working copy of the metadata would go with that node
    (lost, replaced, wiped), and be foreign files among its slivers."""
    for state, says in (
        (vol.nodes[1], f"the state directory {vol.nodes[1]} is node 1's directory;"),
        (vol.nodes[2] / "state", f"is inside node 2's directory ({vol.nodes[2]});"),
    ):
        res = vol.mount("--state-dir", state, check=False)
        assert res.returncode == 1 and says in res.stderr, res.stderr
        assert "give --state-dir a directory apart from the node directories" in res.stderr
        assert not mounted(vol.mnt)
    assert not (vol.nodes[1] / "metadata.db").exists()
    assert not (vol.nodes[2] / "state").exists()
    vol.mount()
    assert "all data and metadata stored" in run("umount", vol.mnt).stdout


def test_two_mounts_cannot_share_a_state_directory(vol: Vol, tmp_path: Path) -> None:
    """Another volume mounted with this mount's --state-dir replaced its database under
    it, and this volume's next checkpoint then stored the other's tree as its own: on
    remount it showed the other volume's files. The second mount is refused now."""
    vol.mount()
    (vol.mnt / "mine").write_bytes(b"A")
    others = [tmp_path / "other" / f"node{i}" for i in range(4)]
    run("mkfs", *others)
    mnt2 = tmp_path / "mnt2"
    mnt2.mkdir()
    res = run("mount", "--state-dir", vol.state, others[0], mnt2, check=False)
    if mounted(mnt2):  # the defect: leave no mount behind
        subprocess.run(["fusermount3", "-u", "-z", str(mnt2)], check=False)
    assert res.returncode == 1 and not mounted(mnt2)
    pid = server_pid(vol.mnt)
    assert (
        f"state directory {vol.state} is in use by another walrusfs mount (server pid {pid})"
        in (res.stderr)
    )
    assert "give each mount its own --state-dir" in res.stderr
    (vol.mnt / "later").write_bytes(b"A2")
    assert "all data and metadata stored" in run("umount", vol.mnt).stdout
    fresh = tmp_path / "fresh-state"
    vol.mount("--state-dir", fresh)  # from the nodes alone: this volume's own tree
    assert sorted(p.name for p in vol.mnt.iterdir()) == ["later", "mine"]
    assert "all data and metadata stored" in run("umount", vol.mnt).stdout
    vol.mount()  # the state directory is free again once its mount has ended
    assert (vol.mnt / "mine").read_bytes() == b"A"


def test_remount_with_empty_local_state(vol: Vol, tmp_path: Path) -> None:
    vol.mount()
    files = {f"d{i}/f{j}": os.urandom(1000 * i + j) for i in range(3) for j in range(4)}
    for name, data in files.items():
        (vol.mnt / name).parent.mkdir(exist_ok=True)
        (vol.mnt / name).write_bytes(data)
    os.symlink("d0/f1", vol.mnt / "link")
    run("umount", vol.mnt)
    vol.state = tmp_path / "brand-new-machine"
    vol.mount(node=5)
    assert {str(p.relative_to(vol.mnt)): p.read_bytes() for p in vol.mnt.glob("d*/*")} == files
    assert os.readlink(vol.mnt / "link") == "d0/f1"


def test_kill_9_during_writes_keeps_fsynced_files(vol: Vol) -> None:
    vol.mount()
    safe = os.urandom(600_000)
    with open(vol.mnt / "safe.bin", "wb") as f:
        f.write(safe)
        f.flush()
        os.fsync(f.fileno())
    closed = os.urandom(300_000)
    (vol.mnt / "closed.bin").write_bytes(closed)
    pid = server_pid(vol.mnt)
    # Chunk k is 100,000 bytes of value k % 251, appended and closed one at a time, so
    # whatever survives can be checked exactly.
    appender = (
        "import itertools, sys\n"
        "for k in itertools.count():\n"
        "    with open(sys.argv[1], 'ab') as f:\n"
        "        f.write(bytes([k % 251]) * 100_000)\n"
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", appender, str(vol.mnt / "busy.bin")], stderr=subprocess.DEVNULL
    )
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    writer.kill()
    writer.wait()
    # A crash leaves a dead mount, not an empty folder in its place.
    assert mounted(vol.mnt)
    with pytest.raises(OSError) as err:
        os.listdir(vol.mnt)
    # ECONNABORTED if the request was queued while the kernel tore the connection down.
    assert err.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    subprocess.run(["fusermount3", "-u", "-z", str(vol.mnt)], check=True)
    vol.mount()  # the dead mount's lock is taken over at once on this machine
    assert (vol.mnt / "safe.bin").read_bytes() == safe
    assert (vol.mnt / "closed.bin").read_bytes() == closed
    busy = vol.mnt / "busy.bin"
    if busy.exists():  # a crash may lose recent appends, never leaves garbage or holes
        got = busy.read_bytes()
        expected = b"".join(bytes([k % 251]) * 100_000 for k in range(len(got) // 100_000 + 1))
        assert got == expected[: len(got)]


def test_files_a_crash_spoilt_are_repaired_soon_after_the_remount(vol: Vol) -> None:
    # Sizes kept and pages lost (the secondary slivers of a blob written just before the
    # crash): nothing that reading the file touches. The mount checks the files of what
    # was written since the last durable sync, instead of leaving them to a scrub pass.
    vol.mount()
    before = {p for node in vol.nodes for p in sliver_files(str(node))}
    data = os.urandom(512 << 10)  # two blocks: two blobs, 14 sliver files
    (vol.mnt / "f.bin").write_bytes(data)
    kill_server(vol.mnt)
    new = sorted({p for node in vol.nodes for p in sliver_files(str(node))} - before)
    assert len(new) == 14
    intact = {p: p.read_bytes() for p in new}
    for p in new:
        lose_secondary(p)
    subprocess.run(["fusermount3", "-u", "-z", str(vol.mnt)], check=True)
    vol.mount()
    assert (vol.mnt / "f.bin").read_bytes() == data
    deadline = time.monotonic() + 30  # the first scrub pass starts after 60 s
    while {p: p.read_bytes() for p in new} != intact:
        assert time.monotonic() < deadline, json.loads(run("status", vol.mnt, "--json").stdout)
        time.sleep(0.2)
    st = json.loads(run("status", vol.mnt, "--json").stdout)
    assert st["repair"]["pairs_written"] == 14


def test_kill_9_after_fsyncs_of_small_changes_keeps_them(vol: Vol, tmp_path: Path) -> None:
    """A database's pattern: pages rewritten in place and a log appended, each fsynced.
    Those commit as patches to the stored blocks; the crash must lose none of them, also
    on a machine that has only the nodes."""
    vol.mount()
    path = vol.mnt / "db"
    data = bytearray(os.urandom(3_000_000))
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    try:
        for k in range(30):
            page = os.urandom(4096)
            offset = k * 97_003 % len(data)
            os.pwrite(fd, page, offset)
            data[offset : offset + 4096] = page
            os.fsync(fd)
            record = os.urandom(300)
            os.pwrite(fd, record, len(data))
            data += record
            os.fsync(fd)
        os.kill(server_pid(vol.mnt), signal.SIGKILL)
    finally:
        with contextlib.suppress(OSError):  # the mount is dead: ENOTCONN
            os.close(fd)
    subprocess.run(["fusermount3", "-u", "-z", str(vol.mnt)], check=True)
    vol.state = tmp_path / "another-machine"
    vol.mount()
    assert path.read_bytes() == data
    run("umount", vol.mnt)  # stores the patched blocks whole
    db = sqlite3.connect(vol.state / "metadata.db")
    assert db.execute("SELECT COUNT(*) FROM patches").fetchone() == (0,)
    db.close()
    vol.mount()
    assert path.read_bytes() == data


def test_kill_9_after_closing_small_files_keeps_them(vol: Vol, tmp_path: Path) -> None:
    """Small files are committed at close and stored in packs later: a crash in between,
    on a machine that has only the nodes afterwards, loses none of them."""
    vol.mount()
    rng = random.Random(4)
    files = {f"f{i}": rng.randbytes(rng.randint(1, 60_000)) for i in range(60)}
    for name, data in files.items():
        (vol.mnt / name).write_bytes(data)
    os.kill(server_pid(vol.mnt), signal.SIGKILL)
    subprocess.run(["fusermount3", "-u", "-z", str(vol.mnt)], check=True)
    vol.state = tmp_path / "another-machine"
    vol.mount()
    assert {name: (vol.mnt / name).read_bytes() for name in files} == files
    run("umount", vol.mnt)  # stores them in packs
    db = sqlite3.connect(vol.state / "metadata.db")
    assert db.execute("SELECT COUNT(*) FROM patches").fetchone() == (0,)
    packs = db.execute("SELECT COUNT(DISTINCT blob_id) FROM blocks").fetchone()[0]
    assert packs <= sum(map(len, files.values())) // (256 << 10) + 2  # blobs of 256 KiB
    db.close()
    vol.mount()
    assert {name: (vol.mnt / name).read_bytes() for name in files} == files


def test_deleting_most_small_files_frees_their_packs(vol: Vol) -> None:
    """Deleted just before an unmount, so the next mount finds the thinned packs and
    stores what lives in them again (after COMPACT_QUIET), and the old packs go."""
    vol.mount()
    rng = random.Random(5)
    files = {f"f{i}": rng.randbytes(rng.randint(1, 16_000)) for i in range(60)}
    for name, data in files.items():
        (vol.mnt / name).write_bytes(data)
    run("umount", vol.mnt)  # stores them in packs
    db = sqlite3.connect(vol.state / "metadata.db")
    packs = [bytes(r[0]) for r in db.execute("SELECT DISTINCT blob_id FROM blocks")]
    db.close()
    assert 2 <= len(packs) < 10
    node = str(vol.nodes[0])
    before = len(sliver_files(node))
    vol.mount()
    kept = {name: data for i, (name, data) in enumerate(files.items()) if i % 10 == 0}
    for name in files.keys() - kept.keys():
        (vol.mnt / name).unlink()
    run("umount", vol.mnt)
    assert len(sliver_files(node)) == before  # nothing freed yet: every pack lives
    vol.mount()
    deadline = time.monotonic() + 120
    while any(p.name[:64] in {b.hex() for b in packs} for p in sliver_files(node)):
        assert time.monotonic() < deadline, "the thinned packs were not freed"
        time.sleep(0.5)
    assert {name: (vol.mnt / name).read_bytes() for name in kept} == kept
    run("umount", vol.mnt)
    assert len(sliver_files(node)) < before


def test_f_nodes_lost_during_io_and_f_plus_one_fails_fast(vol: Vol) -> None:
    vol.mount()
    data = os.urandom(2_000_000)
    (vol.mnt / "a.bin").write_bytes(data)
    (vol.mnt / "b.bin").write_bytes(data[::-1])
    run("umount", vol.mnt)
    vol.mount()  # nothing cached: every read below goes to the nodes
    for i in (1, 4):
        vol.nodes[i].rename(str(vol.nodes[i]) + ".away")
    assert (vol.mnt / "a.bin").read_bytes() == data
    (vol.mnt / "during.bin").write_bytes(data[:1000])
    st = json.loads(run("status", vol.mnt, "--json").stdout)
    assert [n["state"] for n in st["nodes"]].count("down") == 2
    # Every blob now survives n - 2 - R = 2 more node losses: all degraded, none at risk.
    assert st["health"]["healthy"] == 0 and st["health"]["at_risk"] == 0
    assert st["health"]["survives"] == {"2": st["blobs"]}
    for i in (2, 5, 6):  # now 5 of 7 gone: fewer than R=3 slivers of anything
        vol.nodes[i].rename(str(vol.nodes[i]) + ".away")
    t0 = time.monotonic()
    with pytest.raises(OSError) as err:
        (vol.mnt / "b.bin").read_bytes()
    assert err.value.errno == errno.EIO
    assert time.monotonic() - t0 < 60  # a clean error, not a hang
    assert mounted(vol.mnt) and "a.bin" in os.listdir(vol.mnt)  # the mount stays up
    for i in (1, 2, 4, 5, 6):
        Path(str(vol.nodes[i]) + ".away").rename(vol.nodes[i])
    deadline = time.monotonic() + 30
    while True:  # recovers by itself once the nodes are back (probes run every few seconds)
        try:
            assert (vol.mnt / "b.bin").read_bytes() == data[::-1]
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.5)
    assert (vol.mnt / "during.bin").read_bytes() == data[:1000]


def test_nodes_back_unseen_and_others_gone_still_make_f(vol: Vol) -> None:
    vol.mount()
    away = [Path(str(vol.nodes[i]) + ".away") for i in range(7)]
    for i in (3, 4):
        vol.nodes[i].rename(away[i])
    (vol.mnt / "first.bin").write_bytes(b"1" * 300_000)  # finds 3 and 4 down
    st = json.loads(run("status", vol.mnt, "--json").stdout)
    assert [n["state"] for n in st["nodes"]][3:5] == ["down", "down"]
    # 3 and 4 come back and, before the prober looks (every 5 s), 1 and 5 leave: only f
    # nodes are gone, so close() and fsync() must go on.
    for i in (3, 4):
        away[i].rename(vol.nodes[i])
    for i in (1, 5):
        vol.nodes[i].rename(away[i])
    data = os.urandom(500_000)
    with open(vol.mnt / "second.bin", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    st = json.loads(run("status", vol.mnt, "--json").stdout)
    assert [n["state"] for n in st["nodes"]][1:6] == ["down", "up", "up", "up", "down"]
    run("umount", vol.mnt)
    vol.mount(node=3)
    assert (vol.mnt / "second.bin").read_bytes() == data
    assert (vol.mnt / "first.bin").read_bytes() == b"1" * 300_000


def test_mount_refused_with_more_than_f_nodes_missing(vol: Vol) -> None:
    for i in (1, 2, 3):
        vol.nodes[i].rename(str(vol.nodes[i]) + ".away")
    res = vol.mount(check=False)
    assert res.returncode == 1 and "3 of 7 nodes are unusable" in res.stderr
    assert not mounted(vol.mnt)


def test_mount_helper_for_mount_8(vol: Vol) -> None:
    moved = vol.root / "moved2"
    vol.nodes[2].rename(moved)
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from walrusfs.cli import mount_helper; sys.exit(mount_helper())",
            str(vol.nodes[0]),
            str(vol.mnt),
            "-o",
            f"rw,node=2={moved},state_dir={vol.state},node_timeout=3,cache_size=2M,commit=0.5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    st = json.loads(run("status", vol.mnt, "--json").stdout)
    assert st["nodes"][2]["state"] == "up" and st["nodes"][2]["path"] == str(moved)
    assert st["read_cache"]["size"] == 2 << 20 and st["commit_s"] == 0.5
    data = os.urandom(600_000)
    (vol.mnt / "f").write_bytes(data)
    assert (vol.mnt / "f").read_bytes() == data
    assert "read cache" in run("status", vol.mnt).stdout


def test_umount_says_when_not_everything_was_stored(vol: Vol) -> None:
    """A close() that could not store its file (f+1 nodes away) leaves its bytes to the
    final flush, which cannot store them either: `umount` must say so, not that all was
    stored. What earlier closes committed is there at the next mount."""
    vol.mount()
    (vol.mnt / "kept").write_bytes(b"committed by its close")
    away = vol.nodes[4:]  # f+1 = 3 of 7
    for node in away:
        node.rename(node.with_suffix(".away"))
    try:
        with pytest.raises(OSError) as err:
            (vol.mnt / "late").write_bytes(os.urandom(1 << 20))
        assert err.value.errno == errno.EIO
        res = run("umount", vol.mnt, check=False)
        assert res.returncode == 1 and "not everything may be stored" in res.stderr
        assert not mounted(vol.mnt)
    finally:
        for node in away:
            node.with_suffix(".away").rename(node)
    vol.mount()
    assert (vol.mnt / "kept").read_bytes() == b"committed by its close"
    assert "all data and metadata stored" in run("umount", vol.mnt).stdout


def test_umount_with_the_state_disk_full_but_all_committed(vol: Vol) -> None:
    """Every close committed, then another program fills this machine's disk: the
    checkpoint at unmount does not fit, yet nothing is lost (the journal on the nodes
    holds it all), so the server ends cleanly and `umount` says all was stored."""
    with tmpfs(str(vol.state), "8m"):
        vol.mount()
        files = {f"f{i}": os.urandom(30_000) for i in range(20)}
        for name, data in files.items():
            (vol.mnt / name).write_bytes(data)
        fill_up(vol.state)
        res = run("umount", vol.mnt, check=False)
        assert res.returncode == 0 and "all data and metadata stored" in res.stdout
        (vol.state / "filler").unlink()
        vol.mount()
        assert {name: (vol.mnt / name).read_bytes() for name in files} == files
        assert "all data and metadata stored" in run("umount", vol.mnt).stdout


def test_status_answers_when_the_metadata_cannot_be_read(vol: Vol, tmp_path: Path) -> None:
    """`status` with the state database moved away from under the mount says what it
    cannot know and shows the rest; `repair` fails with a message; the mount goes on
    serving files and answering. The log says it in a line: an expected trouble of this
    machine's, not a bug's traceback."""
    log = tmp_path / "server.log"
    server = vol.serve(log)
    (vol.mnt / "f").write_bytes(b"still here")
    db = vol.state / "metadata.db"
    db.rename(vol.state / "moved.db")
    try:
        out = run("status", vol.mnt).stdout
        assert "data: not known now" in out and "unable to open database file" in out
        assert "node 0: up" in out
        # A request that cannot go on fails alone: the control server is part of the mount.
        res = run("repair", vol.mnt, check=False)
        assert res.returncode == 1 and "unable to open database file" in res.stderr
        assert "was the state directory moved or deleted?" in res.stderr
        assert (vol.mnt / "f").read_bytes() == b"still here"
        assert not (vol.state / "metadata.db").exists()  # nothing made in its place
    finally:
        (vol.state / "moved.db").replace(db)
    assert "data: not known" not in run("status", vol.mnt).stdout
    assert (vol.mnt / "f").read_bytes() == b"still here"
    assert "all data and metadata stored" in run("umount", vol.mnt).stdout
    assert server.wait(timeout=60) == 0
    said = log.read_text()
    assert "control request 'repair' failed: [EIO] the metadata database" in said
    assert "Traceback" not in said


def test_unmount_without_the_state_database_loses_nothing(vol: Vol, tmp_path: Path) -> None:
    """The state database deleted under the mount: no checkpoint can be taken at
    unmount, but the journal on the nodes holds every change, so nothing is lost and
    umount says so, as does the log, in a line; the next mount replays the journal."""
    log = tmp_path / "server.log"
    server = vol.serve(log)
    (vol.mnt / "before").write_bytes(b"1")
    (vol.state / "metadata.db").unlink()
    (vol.mnt / "after").write_bytes(b"2")
    assert "all data and metadata stored" in run("umount", vol.mnt).stdout
    assert server.wait(timeout=60) == 0
    said = log.read_text()
    assert "no checkpoint at unmount ([EIO] the metadata database" in said
    assert "Traceback" not in said
    assert not (vol.state / "metadata.db").exists()  # no empty database made there
    vol.mount()
    assert [(vol.mnt / n).read_bytes() for n in ("before", "after")] == [b"1", b"2"]
    assert "all data and metadata stored" in run("umount", vol.mnt).stdout


def test_mount_with_a_file_as_state_directory_says_so(vol: Vol) -> None:
    vol.state.write_bytes(b"not a directory")
    res = vol.mount(check=False)
    assert res.returncode == 1
    assert f"state directory {vol.state}: exists and is not a directory" in res.stderr
    assert vol.state.read_bytes() == b"not a directory"
    assert not mounted(vol.mnt)


def test_mount_with_the_state_disk_full_names_it(vol: Vol) -> None:
    """The state directory is a cache of what the nodes hold; a full disk there is this
    machine's to fix, and the mount says which disk, leaving nothing half written."""
    vol.mount()
    (vol.mnt / "f").write_bytes(b"on the nodes")
    run("umount", vol.mnt)
    shutil.rmtree(vol.state)
    with tmpfs(str(vol.state), "64k"):
        fill_up(vol.state)
        res = vol.mount(check=False)
        assert res.returncode == 1
        assert f"the metadata's disk is full ({vol.state}" in res.stderr
        assert os.listdir(vol.state) == ["filler"]
        assert not mounted(vol.mnt)
    vol.mount()
    assert (vol.mnt / "f").read_bytes() == b"on the nodes"


def test_umount_of_a_dead_mount_does_not_claim_it_stored_everything(vol: Vol) -> None:
    vol.mount()
    (vol.mnt / "f").write_bytes(b"closed, so in the journal")
    kill_server(vol.mnt)
    res = run("umount", vol.mnt, check=False)
    assert res.returncode == 1 and "no walrusfs server answered" in res.stderr
    assert not mounted(vol.mnt)
    vol.mount()
    assert (vol.mnt / "f").read_bytes() == b"closed, so in the journal"
    assert "all data and metadata stored" in run("umount", vol.mnt).stdout


def test_mount_after_a_crash_clears_the_dead_mount_left_behind(vol: Vol) -> None:
    """After the server is killed, its mount stays, answering ENOTCONN (a plain stat() of
    it may still succeed from cached attributes). Mounting again there just works."""
    vol.mount()
    (vol.mnt / "f").write_bytes(b"closed, so in the journal")
    kill_server(vol.mnt)
    with pytest.raises(OSError) as dead:
        os.listdir(vol.mnt)
    assert dead.value.errno == errno.ENOTCONN
    res = vol.mount()
    assert "cleared the dead mount" in res.stderr
    stacked = [
        line
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4] == str(vol.mnt)
    ]
    assert len(stacked) == 1  # the new mount, not one on top of the dead one
    assert (vol.mnt / "f").read_bytes() == b"closed, so in the journal"
    assert "all data and metadata stored" in run("umount", vol.mnt).stdout
    assert not mounted(vol.mnt)


def test_after_a_power_loss_data_whose_blob_no_disk_kept_is_left_out(vol: Vol) -> None:
    """Every node loses power: the journal's record of a new file's data reached a disk,
    its blob did not (close() flushes neither). The next mount leaves that record out and
    says so, instead of showing a file whose data is nowhere."""
    vol.mount()
    kept = os.urandom(300_000)
    with open(vol.mnt / "kept", "wb") as f:
        f.write(kept)
        os.fsync(f.fileno())
    before = {p for node in vol.nodes for p in sliver_files(str(node))}
    (vol.mnt / "lost").write_bytes(os.urandom(300_000))  # big: its own blob, not a patch
    lost = {p for node in vol.nodes for p in sliver_files(str(node))} - before
    assert lost
    kill_server(vol.mnt)
    for path in lost:  # never flushed: gone with the power
        path.unlink()
    res = vol.mount()
    assert "changes before a crash name data that never reached the nodes' disks" in res.stderr
    # As the crash found it: created, its bytes not yet committed.
    assert {name: (vol.mnt / name).read_bytes() for name in os.listdir(vol.mnt)} == {
        "kept": kept,
        "lost": b"",
    }
    assert "all data and metadata stored" in run("umount", vol.mnt).stdout


def test_a_blob_a_crash_left_short_on_some_nodes_is_repaired_after_the_remount(
    vol: Vol,
) -> None:
    """A power loss that took 2 of a new blob's 7 sliver files (f=2): the change is kept,
    and the mount hands the blob to repair at once instead of waiting for a scrub."""
    vol.mount()
    # One block (256K blobs), too big for a patch: exactly one blob at close. With
    # 300,000 bytes the tail block was sometimes a second blob (1 run in 6).
    data = os.urandom(200_000)
    before = {p for node in vol.nodes for p in sliver_files(str(node))}
    (vol.mnt / "f").write_bytes(data)
    new = sorted({p for node in vol.nodes for p in sliver_files(str(node))} - before)
    assert len(new) == 7  # one blob, a sliver file on each node
    kill_server(vol.mnt)
    for path in new[:2]:
        path.unlink()
    res = vol.mount()
    assert "changes before a crash" not in res.stderr
    # Known degraded from the start, and rebuilt by the background with nobody asking.
    deadline = time.monotonic() + 60
    while not all(path.exists() for path in new):
        assert time.monotonic() < deadline, run("status", vol.mnt).stdout
        time.sleep(0.2)
    assert (vol.mnt / "f").read_bytes() == data
    run("umount", vol.mnt)


def test_sigterm_unmounts_and_stores_like_umount(vol: Vol) -> None:
    """A system shutting down sends SIGTERM: the mount must store what it holds (here a
    rename the journal has not synced yet) and unmount, not leave a dead mount."""
    vol.mount()
    (vol.mnt / "a").write_bytes(b"content")
    (vol.mnt / "a").rename(vol.mnt / "b")
    pid = server_pid(vol.mnt)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while os.path.exists(f"/proc/{pid}") or mounted(vol.mnt):
        assert time.monotonic() < deadline, "the server did not unmount on SIGTERM"
        time.sleep(0.05)
    vol.mount()
    assert sorted(os.listdir(vol.mnt)) == ["b"] and (vol.mnt / "b").read_bytes() == b"content"
    run("umount", vol.mnt)


@ROOT_ONLY
def test_mount_refuses_a_walrusfs_mount_that_does_not_answer_instead_of_hanging(
    vol: Vol,
) -> None:
    """A walrusfs mount whose server is stuck (here: one that never reads a request) is
    at the mountpoint. `walrusfs mount` says so and gives up, mounting nothing; `status`
    and `umount` answer too. None of them may wait on the stuck mount."""
    with silent_mount(vol.mnt):
        res = vol.mount(check=False)
        assert res.returncode == 1
        assert "a walrusfs mount is there and does not answer" in res.stderr
        assert "umount -l" in res.stderr
        stacked = [
            line
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4] == str(vol.mnt)
        ]
        assert len(stacked) == 1  # still only the stuck one: nothing mounted on top
        status = run("status", vol.mnt, check=False, timeout=60)
        assert status.returncode == 1 and "no walrusfs mount answers there" in status.stderr
        res = run("umount", vol.mnt, check=False, timeout=60)
        assert "no walrusfs server answered there" in res.stderr
        assert not mounted(vol.mnt)


@ROOT_ONLY
@pytest.mark.parametrize("how", ["server gone", "aborted"])
def test_mount_clears_a_dead_walrusfs_mount_however_it_died(vol: Vol, how: str) -> None:
    """The server exited (requests fail with ENOTCONN), or the connection was aborted
    through fusectl: either way the next mount clears it and mounts."""
    with silent_mount(vol.mnt) as silent:
        if how == "aborted":
            (silent.connection() / "abort").write_text("1")
        else:
            silent.end()
        res = vol.mount()
        assert "cleared the dead mount" in res.stderr
        (vol.mnt / "f").write_bytes(b"written through the new mount")
        assert run("umount", vol.mnt).returncode == 0
    assert not mounted(vol.mnt)


@ROOT_ONLY
def test_the_mountpoint_is_found_through_symlinks_without_a_stat_of_itself(
    tmp_path: Path,
) -> None:
    """real_mountpoint resolves the parent and follows a symlink at the last component,
    as realpath does, but never stats the last directory itself (a stuck mount's root)."""
    real = tmp_path / "a" / "mnt"
    real.mkdir(parents=True)
    (tmp_path / "hop").symlink_to("a")
    (tmp_path / "link").symlink_to("hop/mnt")
    (tmp_path / "link2").symlink_to(tmp_path / "link")
    for given in (real, tmp_path / "hop" / "mnt", tmp_path / "link", tmp_path / "link2"):
        assert real_mountpoint(str(given)) == os.path.realpath(real)
    assert real_mountpoint(str(tmp_path / "hop" / "gone")) == str(tmp_path / "a" / "gone")
    (tmp_path / "loop").symlink_to("loop")
    assert real_mountpoint(str(tmp_path / "loop")) == os.path.realpath(tmp_path / "loop")
    with silent_mount(real):
        assert real_mountpoint(str(tmp_path / "link2")) == str(real)
        assert socket_path(str(tmp_path / "link")) == socket_path(str(real))


@ROOT_ONLY
def test_read_ahead_is_raised_for_a_mountpoint_given_through_a_symlink(tmp_path: Path) -> None:
    """The kernel lists a mount under its real path; tune_read_ahead resolves the
    mountpoint it is given (here a symlink to it) without a stat of the mount."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with silent_mount(real):
        ra = Path("/sys/class/bdi") / mount_devices()[str(real)] / "read_ahead_kb"
        assert tune_read_ahead(str(tmp_path / "link"), kib=4096)
        assert int(ra.read_text()) == 4096


def test_a_volume_of_big_blobs_reads_each_byte_once(tmp_path: Path) -> None:
    """128 MiB blobs do not fit the 64 MiB read cache whole: a cold read of a 72 MiB file
    used to fetch all of its blob again for every 1 MiB the kernel asked (5 GB read)."""
    v = Vol(tmp_path)
    run("mkfs", "--blob-size", "128M", *v.nodes)
    try:
        v.mount()
        data = os.urandom(72 << 20)
        (v.mnt / "big").write_bytes(data)
        run("umount", v.mnt)
        v.mount()  # nothing cached

        def bytes_read() -> int:
            return int(json.loads(run("status", v.mnt, "--json").stdout)["stats"]["get_bytes"])

        before = bytes_read()
        assert (v.mnt / "big").read_bytes() == data
        assert len(data) <= bytes_read() - before < 1.1 * len(data)
    finally:
        v.cleanup()


def test_reads_at_random_offsets_fetch_symbols_not_blobs(tmp_path: Path) -> None:
    """A reader jumping about a file bigger than the read cache (a database, a VM image)
    used to fetch a whole 4 MiB blob for each 4 KiB read. It now fetches the symbols
    around the read (280 KiB at n=7), healthy and with f nodes away."""
    v = Vol(tmp_path)
    run("mkfs", *v.nodes)
    try:
        v.mount()
        data = os.urandom(32 << 20)
        (v.mnt / "db").write_bytes(data)
        first = bytes.fromhex(str(query(str(v.mnt), "blobs-of", path="db")["blobs"][0]))
        run("umount", v.mnt)
        rng = random.Random(11)
        offsets = [0] + [rng.randrange(len(data) - 4096) for _ in range(39)]
        # Away: the node with the first blob's row 0 (which offset 0 reads: where the
        # rows are is rotated by the blob id) and one more, f in all.
        (row0,) = [k for k, d in enumerate(v.nodes) if (d / sliver_key(first, 0)).exists()]
        gone = [v.nodes[row0], v.nodes[(row0 + 3) % len(v.nodes)]]
        through = next(k for k, d in enumerate(v.nodes) if d not in gone)  # to mount from

        def stats() -> dict[str, int]:
            return json.loads(run("status", v.mnt, "--json").stdout)["stats"]

        for away in ([], gone):
            for node in away:
                node.rename(f"{node}.away")
            v.mount("--cache-size", "20M", node=through)  # 5 of the file's 8 blobs
            before = stats()
            fd = os.open(v.mnt / "db", os.O_RDONLY)
            try:
                for off in offsets:
                    assert os.pread(fd, 4096, off) == data[off : off + 4096]
            finally:
                os.close(fd)
            after = stats()
            # Whole blobs would be about 40 x 4 MiB; two symbols a read at the most.
            assert after["get_bytes"] - before["get_bytes"] < len(offsets) * (600 << 10)
            if away:
                # Some rows were on the missing nodes: read from their columns' copies.
                assert after["degraded_reads"] > before["degraded_reads"]
            run("umount", v.mnt)
            for node in away:
                Path(f"{node}.away").rename(node)
    finally:
        v.cleanup()
