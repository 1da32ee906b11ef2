"""A real kernel mount served by this process: POSIX behaviour seen through syscalls.

Each test body that touches the mount runs in a worker thread (`in_thread`): the trio
thread must stay free to serve the requests those syscalls make.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import random
import stat
import subprocess
from pathlib import Path

import pytest
import trio

from backends.remote import mount_devices
from tests.walrusfs.conftest import BS, Mounted, in_thread, lazy_unmount, mounted_at
from tests.walrusfs.memblobs import MemBlobStore
from walrusfs.errors import NotFound
from walrusfs.fs import FileSystem
from walrusfs.metadata import ROOT_INODE, TIME_NS_MAX, TIME_NS_MIN, Metadata
from walrusfs.mount import READ_AHEAD_KB

SIZES = [0, 1, 4095, 4096, 4097, BS - 1, BS, BS + 1, 3 * BS, 5 * BS + 3]
_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100


def oserror(code: int, fn: object, *args: object) -> None:
    with pytest.raises(OSError) as info:
        fn(*args)  # type: ignore[operator]
    assert info.value.errno == code, (info.value, errno.errorcode[code])


def renameat2(old: Path, new: Path, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, bytes(old), AT_FDCWD, bytes(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


@pytest.mark.parametrize("size", SIZES)
async def test_cp_cat_roundtrip(size: int, mounted: Mounted, tmp_path: Path) -> None:
    data = random.Random(size).randbytes(size)
    src = tmp_path / "src"
    src.write_bytes(data)
    dst = mounted.path / "copy"
    await trio.run_process(["cp", str(src), str(dst)])
    out = await trio.run_process(["cat", str(dst)], capture_stdout=True)
    assert out.stdout == data
    st = await in_thread(os.stat, dst)
    assert st.st_size == size and st.st_blksize == BS and st.st_blocks == -(-size // 512)
    # cp closed the file: its bytes are committed, not only in page caches (a small
    # file's as patches in the metadata, until it is stored in a pack).
    assert await mounted.fs.data.read(st.st_ino, 0, size + 1) == data
    assert mounted.fs.meta.get_inode(st.st_ino).size == size
    await mounted.fs.data.flush_all()
    assert len(mounted.fs.meta.block_indexes(st.st_ino)) == -(-size // BS)


def random_io(root: Path, plain: Path, seed: int) -> None:
    rng = random.Random(seed)
    limit = 5 * BS
    a = os.open(root / "f", os.O_RDWR | os.O_CREAT, 0o644)
    b = os.open(plain, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for step in range(300):
            op = rng.random()
            if op < 0.5:
                off = rng.randrange(limit)
                data = rng.randbytes(rng.choice([1, 511, 4096, 5000, BS, BS + 17]))
                assert os.pwrite(a, data, off) == os.pwrite(b, data, off) == len(data)
            elif op < 0.6:
                size = 0 if rng.random() < 0.3 else rng.randrange(limit)
                os.ftruncate(a, size)
                os.ftruncate(b, size)
            elif op < 0.65:
                os.fsync(a)
            else:
                off, n = rng.randrange(limit + BS), rng.randrange(3 * BS)
                assert os.pread(a, n, off) == os.pread(b, n, off), step
            assert os.fstat(a).st_size == os.fstat(b).st_size, step
    finally:
        os.close(a)
        os.close(b)
    assert (root / "f").read_bytes() == plain.read_bytes()


@pytest.mark.parametrize("seed", [1, 2])
async def test_random_io_matches_a_plain_file(seed: int, mounted: Mounted, tmp_path: Path) -> None:
    await in_thread(random_io, mounted.path, tmp_path / "plain", seed)
    expected = (tmp_path / "plain").read_bytes()
    ino = (await in_thread(os.stat, mounted.path / "f")).st_ino
    assert await mounted.fs.data.read(ino, 0, len(expected) + 1) == expected


def sparse(root: Path) -> int:
    far = 10 * 2**30
    with open(root / "sparse", "wb") as f:
        f.seek(far)
        f.write(b"end")
        f.seek(7)
        f.write(b"start")
    st = os.stat(root / "sparse")
    assert st.st_size == far + 3
    assert st.st_blocks <= 16  # a page or two stored: du and cp --sparse see the holes
    with open(root / "sparse", "rb") as f:
        assert f.read(16) == bytes(7) + b"start" + bytes(4)
        f.seek(far - 2)
        assert f.read(10) == b"\0\0end"
        f.seek(4 * 2**30 + 12345)  # beyond 4 GiB, inside the hole
        assert f.read(4096) == bytes(4096)
    return st.st_ino


async def test_sparse_file_at_10_gib(mounted: Mounted) -> None:
    ino = await in_thread(sparse, mounted.path)
    await mounted.fs.data.flush_all()
    assert mounted.fs.meta.block_indexes(ino) == [0, 10 * 2**30 // BS]
    assert mounted.store.puts == 1  # holes cost nothing; the two small blocks, one pack


def append_and_truncate(root: Path) -> None:
    p = root / "log"
    p.write_bytes(b"one\n")
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"two\n")
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"three\n")  # O_APPEND: still at the end
    os.close(fd)
    with open(p, "ab") as f:
        f.write(b"four\n")
    assert p.read_bytes() == b"one\ntwo\nthree\nfour\n"
    with open(p, "wb") as f:  # O_TRUNC
        f.write(b"new")
    assert p.read_bytes() == b"new"
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    assert os.fstat(fd).st_size == 0
    os.close(fd)
    assert p.read_bytes() == b""


async def test_append_and_o_trunc(mounted: Mounted) -> None:
    await in_thread(append_and_truncate, mounted.path)


async def test_a_rewrite_in_place_commits_its_truncate_with_the_new_content(
    mounted: Mounted,
) -> None:
    # open(O_TRUNC) through the kernel: until the new bytes are committed, the committed
    # file is the old one (what a crash of every node keeps), never an empty one.
    path = mounted.path / "config"
    old = random.Random(2).randbytes(3 * BS + 5)
    await in_thread(path.write_bytes, old)
    ino = (await in_thread(os.stat, path)).st_ino
    f = await in_thread(open, path, "wb")
    try:
        await in_thread(f.write, b"new content")
        await in_thread(f.flush)
        assert (await in_thread(os.stat, path)).st_size == len(b"new content")
        assert mounted.fs.meta.get_inode(ino).size == len(old)
    finally:
        await in_thread(f.close)
    assert mounted.fs.meta.get_inode(ino).size == len(b"new content")
    assert await in_thread(path.read_bytes) == b"new content"
    # truncate(2) by path has no close to wait for: committed at once, in order.
    await in_thread(os.truncate, path, 0)
    assert mounted.fs.meta.get_inode(ino).size == 0


async def test_appends_are_stored_where_the_kernel_put_them(mounted: Mounted) -> None:
    # Under the writeback cache the kernel places O_APPEND writes and may resend whole
    # pages at their own offsets: the stored bytes must match, not only the page cache.
    lines = [b"%06d appended line\n" % i for i in range(3000)]
    path = mounted.path / "log"
    for start in range(0, len(lines), 500):
        await trio.run_process(
            ["sh", "-c", 'cat >> "$0"', str(path)], stdin=b"".join(lines[start : start + 500])
        )
    expected = b"".join(lines)
    ino = (await in_thread(os.stat, path)).st_ino
    assert await mounted.fs.data.read(ino, 0, len(expected) + 100) == expected
    assert mounted.fs.meta.get_inode(ino).size == len(expected)


def directories(root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "c").mkdir()
    (root / "a" / "file").write_bytes(b"x")
    assert os.stat(root / "a").st_nlink == 4
    assert os.stat(root).st_nlink == 3
    oserror(errno.ENOTEMPTY, os.rmdir, root / "a")
    oserror(errno.EEXIST, os.mkdir, root / "a")
    oserror(errno.ENOTDIR, os.rmdir, root / "a" / "file")
    oserror(errno.EISDIR, os.unlink, root / "a" / "b")
    oserror(errno.ENOENT, os.rmdir, root / "nope")
    oserror(errno.ENAMETOOLONG, os.open, root / ("n" * 256), os.O_CREAT | os.O_WRONLY)
    (root / ("n" * 255)).write_bytes(b"ok")
    os.rmdir(root / "a" / "b")
    assert os.stat(root / "a").st_nlink == 3
    assert sorted(os.listdir(root / "a")) == ["c", "file"]


async def test_mkdir_rmdir_and_link_counts(mounted: Mounted) -> None:
    await in_thread(directories, mounted.path)


def renames(root: Path) -> None:
    for name in ("f1", "f2"):
        (root / name).write_bytes(name.encode())
    for name in ("d1", "d2", "full"):
        (root / name).mkdir()
    (root / "full" / "x").write_bytes(b"")
    (root / "d1" / "sub").mkdir()
    os.rename(root / "f1", root / "f2")  # replaces a file
    assert (root / "f2").read_bytes() == b"f1" and not (root / "f1").exists()
    os.rename(root / "d2", root / "d1" / "sub")  # replaces an empty directory
    oserror(errno.ENOTEMPTY, os.rename, root / "d1", root / "full")
    oserror(errno.EISDIR, os.rename, root / "f2", root / "d1")
    oserror(errno.ENOTDIR, os.rename, root / "d1", root / "f2")
    oserror(errno.EINVAL, os.rename, root / "d1", root / "d1" / "sub" / "inside")
    os.link(root / "f2", root / "f2link")
    os.rename(root / "f2", root / "f2link")  # same inode: nothing happens
    assert (root / "f2").exists() and os.stat(root / "f2").st_nlink == 2
    oserror(errno.EEXIST, renameat2, root / "f2", root / "full", 1)  # RENAME_NOREPLACE
    renameat2(root / "f2", root / "fresh", 1)
    (root / "other").write_bytes(b"other")
    renameat2(root / "fresh", root / "other", 2)  # RENAME_EXCHANGE
    assert (root / "fresh").read_bytes() == b"other"
    assert (root / "other").read_bytes() == b"f1"
    os.rename(root / "full", root / "d1" / "moved")
    assert os.stat(root / "d1").st_nlink == 4 and (root / "d1" / "moved" / "x").exists()


async def test_rename_rules(mounted: Mounted) -> None:
    await in_thread(renames, mounted.path)


def unlinked_open_file(root: Path) -> int:
    p = root / "tmp"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
    os.write(fd, b"x" * (BS + 5))
    os.fsync(fd)
    os.unlink(p)
    assert not p.exists()
    os.pwrite(fd, b"still", 0)
    assert os.pread(fd, 8, 0) == b"stillxxx"
    assert os.fstat(fd).st_nlink == 0 and os.fstat(fd).st_size == BS + 5
    ino = os.fstat(fd).st_ino
    os.close(fd)
    return ino


async def test_unlinked_open_file_stays_readable(mounted: Mounted) -> None:
    ino = await in_thread(unlinked_open_file, mounted.path)

    # After the last close the kernel forgets the inode (when it likes): its row goes,
    # then its blobs.
    def gone() -> bool:
        try:
            mounted.fs.meta.get_inode(ino)
        except NotFound:
            return not mounted.store.blobs
        return False

    with trio.fail_after(10):
        while not gone():  # noqa: ASYNC110 - the kernel's FORGET has no event to wait on
            await trio.sleep(0.01)
    assert mounted.fs.meta.blob_count() == 0


def links_and_symlinks(root: Path) -> None:
    (root / "d").mkdir()
    (root / "a").write_bytes(b"data")
    os.link(root / "a", root / "d" / "b")
    assert os.stat(root / "a").st_nlink == os.stat(root / "d" / "b").st_nlink == 2
    assert os.stat(root / "a").st_ino == os.stat(root / "d" / "b").st_ino
    oserror(errno.EPERM, os.link, root / "d", root / "dlink")
    os.unlink(root / "a")
    assert os.stat(root / "d" / "b").st_nlink == 1
    os.symlink("d/b", root / "ln")
    os.symlink("/nowhere/at/all", root / "dangling")
    assert os.readlink(root / "ln") == "d/b" and (root / "ln").read_bytes() == b"data"
    assert stat.S_ISLNK(os.lstat(root / "ln").st_mode)
    assert os.lstat(root / "ln").st_size == 3
    assert not (root / "dangling").exists() and (root / "dangling").is_symlink()


async def test_hard_links_and_symlinks(mounted: Mounted) -> None:
    await in_thread(links_and_symlinks, mounted.path)


def attributes(root: Path) -> None:
    p = root / "f"
    p.write_bytes(b"abc")
    os.chmod(p, 0o4751)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o4751
    os.chown(p, 1234, 5678)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 5678) and stat.S_IMODE(st.st_mode) == 0o751
    os.utime(p, ns=(1_111_111_111_123_456_789, 1_222_222_222_987_654_321))
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (
        1_111_111_111_123_456_789,
        1_222_222_222_987_654_321,
    )
    ctime = st.st_ctime_ns
    subprocess.run(["touch", "-m", "-d", "@1300000000.5", str(p)], check=True)
    st = os.stat(p)
    assert st.st_mtime_ns == 1_300_000_000_500_000_000
    assert st.st_atime_ns == 1_111_111_111_123_456_789  # touch -m leaves atime alone
    assert st.st_ctime_ns >= ctime


async def test_chmod_chown_utimens(mounted: Mounted) -> None:
    await in_thread(attributes, mounted.path)
    ino = (await in_thread(os.stat, mounted.path / "f")).st_ino
    row = mounted.fs.meta.get_inode(ino)  # what the kernel set is what we stored
    assert (row.mtime_ns, row.atime_ns) == (1_300_000_000_500_000_000, 1_111_111_111_123_456_789)


YEAR_2500_NS = 16_725_225_600 * 10**9
YEAR_1500_NS = -14_831_769_600 * 10**9


def times_out_of_range(root: Path) -> list[int]:
    """Set times past what the inode table stores, on a closed file and on one being
    written (either used to fail with EIO); their inode numbers."""
    closed = root / "closed"
    closed.write_bytes(b"x")
    os.utime(closed, ns=(YEAR_1500_NS, YEAR_2500_NS))
    fd = os.open(root / "open", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"y" * 5000)
        os.utime(fd, ns=(YEAR_2500_NS, YEAR_1500_NS))
    finally:
        os.close(fd)
    return [os.stat(closed).st_ino, os.stat(root / "open").st_ino]


async def test_times_out_of_range_are_clamped_not_refused(mounted: Mounted) -> None:
    closed, opened = await in_thread(times_out_of_range, mounted.path)
    # The kernel shows its own copy of mtime while it has the inode (writeback cache);
    # what is stored, and seen after a remount, is clamped.
    rows = [mounted.fs.meta.get_inode(ino) for ino in (closed, opened)]
    assert [(r.atime_ns, r.mtime_ns) for r in rows] == [
        (TIME_NS_MIN, TIME_NS_MAX),
        (TIME_NS_MAX, TIME_NS_MIN),
    ]
    assert await in_thread((mounted.path / "open").read_bytes) == b"y" * 5000


def stamps_out_of_order(root: Path, elsewhere: Path, rounds: int) -> list[str]:
    """Change things on the mount in orders that make and tar rely on, each change
    stamped by the mount or by the kernel; return every later change that got the older
    time."""
    wrong = []
    elsewhere.write_bytes(b"")
    for i in range(rounds):
        made = root / f"dir{i}"
        made.mkdir()  # stamped by the mount
        before = made.stat().st_mtime_ns
        os.utime(made)  # by the kernel
        if made.stat().st_mtime_ns < before:
            wrong.append(f"dir{i}: touched after mkdir, older")
        # A change to a file whose times were just read gets a fine-grained time (ext4,
        # tmpfs since Linux 6.13), and the kernel's later stamps are never older than it.
        elsewhere.stat()
        elsewhere.write_bytes(b"x")
        (root / f"written{i}").write_bytes(b"w")  # stamped by the kernel
        (root / f"made{i}").touch()  # by the mount
        written = (root / f"written{i}").stat().st_mtime_ns
        if (root / f"made{i}").stat().st_mtime_ns < written:
            wrong.append(f"made{i}: created after written{i}, older")
    return wrong


async def test_times_stamped_by_the_mount_and_the_kernel_keep_their_order(
    mounted: Mounted, tmp_path: Path
) -> None:
    # Stamped from the fine clock, every directory here was older after the touch.
    wrong = await in_thread(stamps_out_of_order, mounted.path, tmp_path / "elsewhere", 100)
    assert wrong == []


def extract_like_tar(path: Path, size: int) -> None:
    """What tar does for each file: write, restore the times and owner through the open
    file, then close."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for pos in range(0, size, 10_240):
            os.write(fd, bytes([pos % 251]) * min(10_240, size - pos))
        os.utime(fd, ns=(1_111_111_111_000_000_000, 1_222_222_222_000_000_000))
        os.fchown(fd, 1234, 5678)
        os.fchmod(fd, 0o644)
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", [13_000, 3 * BS + 5], ids=["small", "blocks"])
async def test_times_restored_before_close_are_committed_by_the_close(
    mounted: Mounted, size: int
) -> None:
    await in_thread(extract_like_tar, mounted.path / "t", size)
    st = await in_thread(os.stat, mounted.path / "t")
    assert (st.st_size, st.st_mtime_ns, st.st_uid) == (size, 1_222_222_222_000_000_000, 1234)
    row = mounted.fs.meta.get_inode(st.st_ino)  # committed when close(2) returned
    assert (row.size, row.mtime_ns, row.uid, stat.S_IMODE(row.mode)) == (
        size,
        1_222_222_222_000_000_000,
        1234,
        0o644,
    )


def as_nobody(root: Path, script: str) -> None:
    """Run a shell script in `root` as nobody. The child enters `root` as root, before
    dropping privileges: the parents of tmp_path are closed to other users."""
    subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/bin/sh", "-c", script],
        cwd=root,
        check=True,
        capture_output=True,
    )


def setid_after_writes_by_nobody(root: Path) -> dict[str, int]:
    modes = {"suid": 0o4777, "sgid": 0o2777, "lock": 0o2666, "trunc": 0o2666}
    for name, mode in modes.items():
        (root / name).write_bytes(b"x")
        os.chmod(root / name, mode)
    as_nobody(root, "printf y 1<>suid; printf y 1<>sgid; printf y 1<>lock; : >trunc")
    return {name: stat.S_IMODE(os.stat(root / name).st_mode) for name in modes}


@pytest.mark.parametrize("mounted", [{"allow_other": True}], indirect=True)
async def test_writes_by_others_clear_setid_bits_like_linux(mounted: Mounted) -> None:
    if os.getuid() != 0:
        pytest.skip("acting as another user needs root")
    # Set-group-ID without group execute stays only for writers in the file's group.
    assert await in_thread(setid_after_writes_by_nobody, mounted.path) == {
        "suid": 0o777,
        "sgid": 0o777,
        "lock": 0o666,
        "trunc": 0o666,
    }


def getxattr_with_buffer(path: Path, name: str, size: int) -> int:
    buf = ctypes.create_string_buffer(max(size, 1))
    n = _libc.getxattr(bytes(path), name.encode(), buf if size else None, size)
    return n if n >= 0 else -ctypes.get_errno()


def xattrs(root: Path) -> None:
    p = root / "f"
    p.write_bytes(b"")
    os.setxattr(p, "user.color", b"blue")
    os.setxattr(p, "user.big", b"\x01" * 65536)
    assert os.getxattr(p, "user.color") == b"blue"
    assert sorted(os.listxattr(p)) == ["user.big", "user.color"]
    oserror(errno.ENODATA, os.getxattr, p, "user.none")
    oserror(errno.EEXIST, os.setxattr, p, "user.color", b"red", os.XATTR_CREATE)
    oserror(errno.ENODATA, os.setxattr, p, "user.new", b"red", os.XATTR_REPLACE)
    os.setxattr(p, "user.color", b"red", os.XATTR_REPLACE)
    assert os.getxattr(p, "user.color") == b"red"
    assert getxattr_with_buffer(p, "user.color", 0) == 3  # size query
    assert getxattr_with_buffer(p, "user.color", 2) == -errno.ERANGE
    oserror(errno.E2BIG, os.setxattr, p, "user.huge", b"x" * 65537)
    oserror(errno.EOPNOTSUPP, os.setxattr, p, "trusted.x", b"1")
    os.removexattr(p, "user.color")
    oserror(errno.ENODATA, os.removexattr, p, "user.color")
    (root / "d").mkdir()
    os.setxattr(root / "d", "user.dir", b"1")
    assert os.listxattr(root / "d") == ["user.dir"]


async def test_xattrs(mounted: Mounted) -> None:
    await in_thread(xattrs, mounted.path)


def readdir_while_changing(root: Path) -> None:
    d = root / "many"
    d.mkdir()
    names = [f"{i:05d}-" + "x" * 120 for i in range(1500)]  # several getdents calls
    for n in names:
        (d / n).write_bytes(b"")
    seen: list[str] = []
    removed: set[str] = set()
    with os.scandir(d) as it:
        for i, entry in enumerate(it):
            seen.append(entry.name)
            if i == 100:
                for n in names[1000:1010] + names[5:10]:
                    os.unlink(d / n)
                    removed.add(n)
                for k in range(20):
                    (d / f"new-{k}").write_bytes(b"")
    assert len(seen) == len(set(seen)), "an entry came twice"
    missing = set(names) - removed - set(seen)
    assert not missing, f"{len(missing)} entries skipped"
    assert not (set(names[1000:1010]) & set(seen)), "removed entries not yet read came back"


async def test_readdir_while_entries_change(mounted: Mounted) -> None:
    await in_thread(readdir_while_changing, mounted.path)


async def test_statfs(mounted: Mounted) -> None:
    st = await in_thread(os.statvfs, mounted.path)
    assert st.f_frsize == 4096 and st.f_namemax == 255 and st.f_bsize == BS
    assert st.f_blocks == int(7 * 2**40 / 3.5) // 4096 == 2 * st.f_bfree
    assert st.f_bavail == st.f_bfree and st.f_files > st.f_ffree
    out = await trio.run_process(["df", "-k", str(mounted.path)], capture_stdout=True)
    assert b"walrusfs" in out.stdout
    with open("/proc/self/mountinfo") as f:  # noqa: ASYNC230 - procfs, not the mount
        line = next(ln for ln in f if f" {mounted.path} " in ln)
    assert "fuse.walrusfs" in line and "default_permissions" in line


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may set a mount's read-ahead")
async def test_kernel_read_ahead_is_raised(mounted: Mounted) -> None:
    dev = mount_devices()[str(mounted.path)]
    ra = await in_thread(Path(f"/sys/class/bdi/{dev}/read_ahead_kb").read_text)
    assert int(ra) == READ_AHEAD_KB > 128


def unflushed_size(root: Path) -> None:
    fd = os.open(root / "f", os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"z" * (2 * BS + 1))
    assert os.fstat(fd).st_size == 2 * BS + 1
    os.close(fd)


async def test_storage_errors_surface_as_eio(mounted: Mounted) -> None:
    mounted.store.fail_puts = True

    def write_and_close() -> None:
        fd = os.open(mounted.path / "doomed", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"data" * 5000)  # not a small file (those wait for a pack)
        oserror(errno.EIO, os.close, fd)  # the flush at close could not store it

    await in_thread(write_and_close)
    mounted.store.fail_puts = False
    assert await in_thread((mounted.path / "doomed").read_bytes) == b"data" * 5000  # kept


async def test_unexpected_errors_are_logged_and_eio(
    mounted: Mounted, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(ino: int) -> list[bytes]:
        raise ValueError("a bug")

    mounted.fs.listxattr = broken  # type: ignore[method-assign]
    await in_thread((mounted.path / "f").touch)
    with caplog.at_level(logging.ERROR, logger="walrusfs.fuse_ops"):
        await in_thread(oserror, errno.EIO, os.listxattr, mounted.path / "f")
    assert any("unexpectedly" in r.message and r.exc_info for r in caplog.records)
    assert await in_thread(os.listdir, mounted.path) == ["f"]  # the mount lives on


async def test_sizes_the_kernel_holds_match_ours(mounted: Mounted) -> None:
    await in_thread(unflushed_size, mounted.path)
    st = await in_thread(os.stat, mounted.path / "f")
    assert (await mounted.fs.getattr(st.st_ino)).size == st.st_size == 2 * BS + 1
    assert (await mounted.fs.getattr(st.st_ino)).mtime_ns == st.st_mtime_ns


async def test_cancelled_serve_flushes_then_unmounts(tmp_path: Path) -> None:
    from walrusfs.mount import serve

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    meta = Metadata(tmp_path / "meta.db", block_size=BS)
    store = MemBlobStore()
    fs = FileSystem(meta, store)
    try:
        async with trio.open_nursery() as nursery:
            ready = trio.Event()
            nursery.start_soon(functools.partial(serve, fs, str(mnt), ready=ready.set))
            await ready.wait()
            assert await in_thread(mounted_at, str(mnt))
            fh, attrs = await fs.create(ROOT_INODE, b"late", 0o644, os.O_RDWR, 0, 0)
            await fs.write(fh, 0, b"not flushed yet")
            assert meta.get_inode(attrs.ino).size == 0
            nursery.cancel_scope.cancel()  # the forced stop
        assert meta.get_inode(attrs.ino).size == 15 and len(store.blobs) == 1
        assert not await in_thread(mounted_at, str(mnt))
    finally:
        await in_thread(lazy_unmount, str(mnt))
        meta.close()
