"""FileSystem without a mount: names, links, rename rules, attributes, xattrs, readdir."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from tests.walrusfs.conftest import BS, FakeClock
from tests.walrusfs.memblobs import MemBlobStore
from walrusfs import errors
from walrusfs.errors import errno_of
from walrusfs.fs import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    XATTR_CREATE,
    XATTR_REPLACE,
    Attrs,
    FileSystem,
)
from walrusfs.metadata import ROOT_INODE, Metadata

R = ROOT_INODE


async def expect(code: int, coro: object) -> None:
    with pytest.raises(Exception) as info:
        await coro  # type: ignore[misc]
    assert errno_of(info.value) == code, info.value


async def touch(fs: FileSystem, parent: int, name: bytes, mode: int = 0o644) -> Attrs:
    return await fs.mknod(parent, name, stat.S_IFREG | mode, 0, 1000, 1000)


async def names(fs: FileSystem, ino: int) -> list[bytes]:
    out: list[bytes] = []
    fh = await fs.opendir(ino)
    await fs.readdir(fh, 0, lambda name, attrs, off: out.append(name) is None)
    await fs.releasedir(fh)
    return out


async def test_root_and_lookup(fs: FileSystem) -> None:
    root = await fs.getattr(R)
    assert stat.S_ISDIR(root.mode) and root.nlink == 2 and root.blksize == BS
    f = await touch(fs, R, b"f")
    assert (await fs.lookup(R, b"f")).ino == f.ino
    assert (await fs.lookup(R, b".")).ino == R and (await fs.lookup(R, b"..")).ino == R
    await expect(errno.ENOENT, fs.lookup(R, b"nope"))
    await expect(errno.ENOTDIR, fs.lookup(f.ino, b"x"))
    await expect(errno.ENAMETOOLONG, fs.lookup(R, b"x" * 256))
    await expect(errno.ENAMETOOLONG, touch(fs, R, b"y" * 256))
    assert (await touch(fs, R, b"z" * 255)).ino > f.ino
    await expect(errno.EEXIST, touch(fs, R, b"f"))
    await expect(errno.EINVAL, touch(fs, R, b"a/b"))


async def test_names_are_bytes(fs: FileSystem) -> None:
    weird = b"\xff\xfe caf\xc3\xa9 \n\t"
    await touch(fs, R, weird)
    assert weird in await names(fs, R)
    assert (await fs.lookup(R, weird)).nlink == 1


async def test_mkdir_rmdir_and_dir_nlink(fs: FileSystem) -> None:
    d = await fs.mkdir(R, b"d", 0o750, 1000, 1000)
    assert stat.S_IMODE(d.mode) == 0o750 and d.nlink == 2 and d.uid == 1000
    await fs.mkdir(d.ino, b"s1", 0o755, 0, 0)
    await fs.mkdir(d.ino, b"s2", 0o755, 0, 0)
    await touch(fs, d.ino, b"file")
    assert (await fs.getattr(d.ino)).nlink == 4  # 2 + two subdirectories, files don't count
    assert (await fs.getattr(R)).nlink == 3
    await expect(errno.ENOTEMPTY, fs.rmdir(R, b"d"))
    await expect(errno.ENOTDIR, fs.rmdir(d.ino, b"file"))
    await expect(errno.EISDIR, fs.unlink(d.ino, b"s1"))
    await expect(errno.EINVAL, fs.rmdir(d.ino, b"."))
    await expect(errno.ENOTEMPTY, fs.rmdir(d.ino, b".."))
    await fs.rmdir(d.ino, b"s1")
    assert (await fs.getattr(d.ino)).nlink == 3
    await expect(errno.ENOENT, fs.rmdir(d.ino, b"s1"))


async def test_removed_directory_refuses_new_entries(fs: FileSystem) -> None:
    d = await fs.mkdir(R, b"d", 0o755, 0, 0)  # the lookup reference keeps it alive
    await fs.rmdir(R, b"d")
    assert (await fs.getattr(d.ino)).nlink == 0
    await expect(errno.ENOENT, touch(fs, d.ino, b"x"))
    await fs.forget([(d.ino, 1)])
    await expect(errno.ENOENT, fs.getattr(d.ino))


async def test_setgid_directory_passes_its_group_on(fs: FileSystem) -> None:
    d = await fs.mkdir(R, b"shared", 0o2775, 0, 50)
    f = await touch(fs, d.ino, b"f")
    sub = await fs.mkdir(d.ino, b"sub", 0o755, 1000, 1000)
    assert f.gid == 50 and sub.gid == 50 and sub.mode & stat.S_ISGID


async def test_special_files_and_symlinks(fs: FileSystem) -> None:
    fifo = await fs.mknod(R, b"fifo", stat.S_IFIFO | 0o600, 0, 0, 0)
    dev = await fs.mknod(R, b"null", stat.S_IFCHR | 0o666, os.makedev(1, 3), 0, 0)
    assert stat.S_ISFIFO(fifo.mode) and dev.rdev == os.makedev(1, 3)
    await expect(errno.EINVAL, fs.mknod(R, b"dir", stat.S_IFDIR | 0o755, 0, 0, 0))
    link = await fs.symlink(R, b"ln", b"../target with space", 0, 0)
    assert stat.S_ISLNK(link.mode) and link.size == len(b"../target with space")
    assert await fs.readlink(link.ino) == b"../target with space"
    await expect(errno.EINVAL, fs.readlink(fifo.ino))
    await expect(errno.ENOENT, fs.symlink(R, b"empty", b"", 0, 0))
    await expect(errno.ENAMETOOLONG, fs.symlink(R, b"long", b"x" * 4096, 0, 0))
    await expect(errno.EINVAL, fs.open(fifo.ino, os.O_RDONLY, 0))


async def test_hard_links_count_names(fs: FileSystem) -> None:
    f = await touch(fs, R, b"a")
    d = await fs.mkdir(R, b"d", 0o755, 0, 0)
    assert (await fs.link(f.ino, d.ino, b"b")).nlink == 2
    assert (await fs.lookup(d.ino, b"b")).nlink == 2
    await expect(errno.EPERM, fs.link(d.ino, R, b"dirlink"))
    await expect(errno.EEXIST, fs.link(f.ino, R, b"d"))
    await fs.unlink(R, b"a")
    assert (await fs.getattr(f.ino)).nlink == 1
    assert (await fs.lookup(d.ino, b"b")).ino == f.ino


async def test_unlinked_inode_lives_until_forget_and_release(fs: FileSystem) -> None:
    f = await touch(fs, R, b"f")  # one lookup reference
    fh = await fs.open(f.ino, os.O_RDWR, 0)
    await fs.write(fh, 0, b"still here")
    await fs.flush(fh)
    await fs.unlink(R, b"f")
    await fs.forget([(f.ino, 1)])
    assert await fs.read(fh, 0, 100) == b"still here"  # open: still readable
    assert (await fs.getattr(f.ino)).nlink == 0
    await expect(errno.ENOENT, fs.link(f.ino, R, b"back"))
    await fs.release(fh)
    await expect(errno.ENOENT, fs.getattr(f.ino))
    assert fs.meta.blob_count() == 0


async def test_rename_replaces_files_atomically(fs: FileSystem) -> None:
    a = await touch(fs, R, b"a")
    b = await touch(fs, R, b"b")
    await fs.rename(R, b"a", R, b"b")
    assert (await fs.lookup(R, b"b")).ino == a.ino
    await expect(errno.ENOENT, fs.lookup(R, b"a"))
    assert (await fs.getattr(b.ino)).nlink == 0  # kept while the kernel knows it
    await fs.forget([(b.ino, 1)])
    await expect(errno.ENOENT, fs.getattr(b.ino))


async def test_rename_directory_rules(fs: FileSystem) -> None:
    d1 = await fs.mkdir(R, b"d1", 0o755, 0, 0)
    await fs.mkdir(R, b"d2", 0o755, 0, 0)
    inner = await fs.mkdir(d1.ino, b"inner", 0o755, 0, 0)
    await touch(fs, R, b"file")
    await expect(errno.EINVAL, fs.rename(R, b"d1", inner.ino, b"x"))
    await expect(errno.EINVAL, fs.rename(R, b"d1", d1.ino, b"x"))
    await expect(errno.ENOTDIR, fs.rename(R, b"d2", R, b"file"))
    await expect(errno.EISDIR, fs.rename(R, b"file", R, b"d2"))
    await expect(errno.ENOTEMPTY, fs.rename(R, b"d2", R, b"d1"))
    await expect(errno.EEXIST, fs.rename(R, b"file", R, b"d1", RENAME_NOREPLACE))
    await expect(errno.EINVAL, fs.rename(R, b"file", R, b"x", RENAME_NOREPLACE | RENAME_EXCHANGE))
    await expect(errno.EINVAL, fs.rename(R, b"file", R, b"x", 0x100))
    await expect(errno.ENOENT, fs.rename(R, b"nope", R, b"x"))
    # An empty directory is replaced by a directory; link counts move with it.
    await fs.rename(d1.ino, b"inner", R, b"d2")
    assert (await fs.lookup(R, b"d2")).ino == inner.ino
    assert (await fs.getattr(d1.ino)).nlink == 2
    assert (await fs.getattr(R)).nlink == 4  # d1 and d2 (now inner)
    assert (await fs.lookup(inner.ino, b"..")).ino == R


async def test_rename_same_inode_is_a_noop(fs: FileSystem, clock: FakeClock) -> None:
    f = await touch(fs, R, b"a")
    await fs.link(f.ino, R, b"b")
    before = await fs.getattr(R)
    await fs.rename(R, b"a", R, b"b")
    await fs.rename(R, b"a", R, b"a")
    assert sorted(await names(fs, R)) == [b".", b"..", b"a", b"b"]
    assert (await fs.getattr(R)).mtime_ns == before.mtime_ns
    assert (await fs.getattr(f.ino)).nlink == 2


async def test_rename_exchange(fs: FileSystem) -> None:
    d = await fs.mkdir(R, b"d", 0o755, 0, 0)
    sub = await fs.mkdir(d.ino, b"sub", 0o755, 0, 0)
    f = await touch(fs, R, b"f")
    await fs.rename(R, b"f", d.ino, b"sub", RENAME_EXCHANGE)
    assert (await fs.lookup(R, b"f")).ino == sub.ino
    assert (await fs.lookup(d.ino, b"sub")).ino == f.ino
    assert (await fs.getattr(d.ino)).nlink == 2 and (await fs.getattr(R)).nlink == 4
    await expect(errno.ENOENT, fs.rename(R, b"f", R, b"missing", RENAME_EXCHANGE))
    await expect(errno.EINVAL, fs.rename(R, b"d", d.ino, b"sub", RENAME_EXCHANGE))


async def test_setattr_changes_exactly_the_fields_asked(fs: FileSystem) -> None:
    f = await touch(fs, R, b"f", 0o644)
    t = 1_234_567_890_123_456_789
    after = await fs.setattr(f.ino, mtime_ns=t)  # touch -m
    assert after.mtime_ns == t and after.atime_ns == f.atime_ns
    assert after.ctime_ns > f.ctime_ns and after.mode == f.mode and after.uid == f.uid
    after2 = await fs.setattr(f.ino, atime_ns=t + 1)
    assert (after2.atime_ns, after2.mtime_ns) == (t + 1, t)
    after3 = await fs.setattr(f.ino, mode=0o600)
    assert after3.mode == stat.S_IFREG | 0o600 and after3.mtime_ns == t
    after4 = await fs.setattr(f.ino, ctime_ns=5)  # the writeback cache sends its ctime
    assert after4.ctime_ns == 5
    assert (await fs.setattr(f.ino)) == after4  # nothing asked, nothing changed


async def test_chown_clears_setid_bits_like_linux(fs: FileSystem) -> None:
    f = await touch(fs, R, b"prog", 0o6755)
    after = await fs.setattr(f.ino, uid=5, gid=6)
    assert (after.uid, after.gid) == (5, 6)
    assert stat.S_IMODE(after.mode) == 0o755
    g = await touch(fs, R, b"locky", 0o2644)  # setgid without group exec: kept (Linux)
    assert (await fs.setattr(g.ino, uid=5)).mode & stat.S_ISGID
    d = await fs.mkdir(R, b"d", 0o2755, 0, 0)
    assert (await fs.setattr(d.ino, gid=9)).mode & stat.S_ISGID  # directories keep it


async def test_unprivileged_write_and_truncate_clear_setid(fs: FileSystem) -> None:
    f = await touch(fs, R, b"f", 0o4755)
    fh = await fs.open(f.ino, os.O_WRONLY, 0)
    await fs.write(fh, 0, b"root keeps it")
    assert (await fs.getattr(f.ino)).mode & stat.S_ISUID
    fh2 = await fs.open(f.ino, os.O_WRONLY, 1000)
    await fs.write(fh2, 0, b"user drops it")
    assert not (await fs.getattr(f.ino)).mode & stat.S_ISUID
    await fs.setattr(f.ino, mode=0o4755)
    await fs.setattr(f.ino, size=3, caller_uid=1000)
    assert not (await fs.getattr(f.ino)).mode & stat.S_ISUID
    for h in (fh, fh2):
        await fs.release(h)


async def test_setgid_without_group_exec_goes_unless_the_writer_is_in_the_group(
    fs: FileSystem,
) -> None:
    # Linux (setattr_should_drop_suidgid): without group execute, set-group-ID survives
    # a write or truncate by root or a member of the file's group, no one else's.
    f = await touch(fs, R, b"f", 0o2666)  # group 1000

    async def write_as(uid: int, gids: set[int]) -> bool:
        fh = await fs.open(f.ino, os.O_WRONLY, uid, gids)
        await fs.write(fh, 0, b"x")
        await fs.release(fh)
        kept = bool((await fs.getattr(f.ino)).mode & stat.S_ISGID)
        await fs.setattr(f.ino, mode=0o2666)
        return kept

    assert await write_as(0, set())
    assert await write_as(2000, {2000, 1000})  # a supplementary member
    assert not await write_as(2000, {2000})
    await fs.setattr(f.ino, size=0, caller_uid=2000, caller_gids={1000})
    assert (await fs.getattr(f.ino)).mode & stat.S_ISGID
    await fs.setattr(f.ino, size=5, caller_uid=2000, caller_gids={2000})
    assert not (await fs.getattr(f.ino)).mode & stat.S_ISGID
    fh, g = await fs.create(R, b"g", 0o666, os.O_WRONLY, 3000, 3000)
    await fs.setattr(g.ino, mode=0o2666, gid=1000)
    await fs.write(fh, 0, b"not a member of group 1000")
    assert not (await fs.getattr(g.ino)).mode & stat.S_ISGID
    await fs.release(fh)
    # chown by its non-root owner, who is not in the file's group, drops it too.
    await fs.setattr(f.ino, mode=0o2666)
    await fs.setattr(f.ino, uid=1000, caller_uid=1000, caller_gids={1000})
    assert (await fs.getattr(f.ino)).mode & stat.S_ISGID
    await fs.setattr(f.ino, gid=1000, caller_uid=1000, caller_gids={2000})
    assert not (await fs.getattr(f.ino)).mode & stat.S_ISGID


async def test_ctime_changes_on_every_metadata_change(fs: FileSystem) -> None:
    f = await touch(fs, R, b"f")
    seen = [f.ctime_ns]

    async def ctime() -> int:
        return (await fs.getattr(f.ino)).ctime_ns

    await fs.link(f.ino, R, b"g")
    seen.append(await ctime())
    await fs.rename(R, b"g", R, b"h")
    seen.append(await ctime())
    await fs.setxattr(f.ino, b"user.k", b"v")
    seen.append(await ctime())
    await fs.unlink(R, b"h")
    seen.append(await ctime())
    await fs.setattr(f.ino, size=10)
    seen.append(await ctime())
    assert seen == sorted(seen) and len(set(seen)) == len(seen)


async def test_st_blocks_count_stored_bytes_not_holes(fs: FileSystem) -> None:
    fh, f = await fs.create(R, b"sparse", 0o644, os.O_RDWR, 0, 0)
    far = 10 * 2**30
    await fs.write(fh, far, b"tail")
    await fs.write(fh, 0, b"x" * 1000)
    await fs.write(fh, BS, bytes(BS))  # an all-zero block is stored as a hole
    dirty = await fs.getattr(f.ino)
    assert 0 < dirty.blocks <= -(-dirty.size // 512)  # unflushed bytes count
    await fs.flush(fh)
    st = await fs.getattr(f.ino)
    assert st.size == far + 4 and st.blocks == -(-1004 // 512)  # du: 1 KiB, not 10 GiB
    await fs.setattr(f.ino, size=100)
    assert (await fs.getattr(f.ino)).blocks == 1
    await fs.setattr(f.ino, size=3 * BS)  # truncate up: a hole
    assert (await fs.getattr(f.ino)).blocks == 1
    await fs.release(fh)
    d = await fs.mkdir(R, b"d", 0o755, 0, 0)
    assert (await fs.getattr(d.ino)).blocks == 0


async def test_access_checks_owner_group_other_and_root(fs: FileSystem) -> None:
    f = await touch(fs, R, b"f", 0o640)
    await fs.setattr(f.ino, uid=10, gid=20)
    await fs.access(f.ino, os.R_OK | os.W_OK, 10, 99)  # owner
    await fs.access(f.ino, os.R_OK, 11, 20)  # group
    await fs.access(f.ino, os.R_OK, 11, 99, groups=[20])  # supplementary group
    await expect(errno.EACCES, fs.access(f.ino, os.W_OK, 11, 20))
    await expect(errno.EACCES, fs.access(f.ino, os.R_OK, 11, 99))  # other
    await fs.access(f.ino, os.F_OK, 11, 99)
    await fs.access(f.ino, os.R_OK | os.W_OK, 0, 0)  # root reads and writes anything
    await expect(errno.EACCES, fs.access(f.ino, os.X_OK, 0, 0))  # but runs no non-program
    await fs.access(R, os.X_OK, 0, 0)
    # Owner bits apply to the owner even when group bits would allow more.
    await fs.setattr(f.ino, mode=0o070)
    await expect(errno.EACCES, fs.access(f.ino, os.R_OK, 10, 20))


async def test_xattrs_follow_linux_rules(fs: FileSystem) -> None:
    f = await touch(fs, R, b"f")
    await fs.setxattr(f.ino, b"user.a", b"1")
    await fs.setxattr(f.ino, b"user.big", b"\x00" * 65536)
    assert await fs.getxattr(f.ino, b"user.a") == b"1"
    assert await fs.listxattr(f.ino) == [b"user.a", b"user.big"]
    await expect(errno.E2BIG, fs.setxattr(f.ino, b"user.huge", b"x" * 65537))
    await expect(errno.EEXIST, fs.setxattr(f.ino, b"user.a", b"2", XATTR_CREATE))
    await expect(errno.ENODATA, fs.setxattr(f.ino, b"user.new", b"2", XATTR_REPLACE))
    await fs.setxattr(f.ino, b"user.a", b"2", XATTR_REPLACE)
    await fs.setxattr(f.ino, b"user.new", b"3", XATTR_CREATE)
    assert await fs.getxattr(f.ino, b"user.a") == b"2"
    await expect(errno.ENODATA, fs.getxattr(f.ino, b"user.missing"))
    await expect(errno.EOPNOTSUPP, fs.setxattr(f.ino, b"trusted.x", b"1"))
    await expect(errno.EOPNOTSUPP, fs.getxattr(f.ino, b"security.selinux"))
    await expect(errno.ERANGE, fs.setxattr(f.ino, b"user." + b"n" * 251, b"1"))
    await fs.removexattr(f.ino, b"user.a")
    await expect(errno.ENODATA, fs.removexattr(f.ino, b"user.a"))
    link = await fs.symlink(R, b"ln", b"f", 0, 0)
    await expect(errno.EPERM, fs.setxattr(link.ino, b"user.a", b"1"))
    await expect(errno.ENODATA, fs.getxattr(link.ino, b"user.a"))
    assert await fs.listxattr(link.ino) == []


async def test_xattr_names_stay_listable(fs: FileSystem) -> None:
    # listxattr(2) returns at most 64 KiB of names (E2BIG beyond): refuse the name that
    # would make them unlistable (ENOSPC, as a full ext4 inode), not the listing.
    f = await touch(fs, R, b"f")
    name = b"user." + b"n" * 250  # 256 bytes with its NUL: 256 of them fill 64 KiB
    for i in range(256):
        await fs.setxattr(f.ino, name[:-3] + b"%03d" % i, b"v")
    assert sum(len(n) + 1 for n in await fs.listxattr(f.ino)) == 65536
    await expect(errno.ENOSPC, fs.setxattr(f.ino, b"user.x", b"v"))
    await fs.setxattr(f.ino, name[:-3] + b"000", b"a new value for a present name")
    await fs.removexattr(f.ino, name[:-3] + b"000")
    await fs.setxattr(f.ino, b"user.x", b"v")


async def test_readdir_offsets_survive_changes(fs: FileSystem) -> None:
    d = await fs.mkdir(R, b"d", 0o755, 0, 0)
    initial = [b"e%04d" % i for i in range(300)]
    for n in initial:
        await touch(fs, d.ino, n)
    fh = await fs.opendir(d.ino)
    seen: list[bytes] = []
    removed_late: set[bytes] = set()
    offset = 0
    rounds = 0
    while True:
        page: list[tuple[bytes, int]] = []

        def reply(
            name: bytes, attrs: Attrs, nxt: int, page: list[tuple[bytes, int]] = page
        ) -> bool:
            if len(page) == 37:  # a small buffer: the kernel comes back for more
                return False
            page.append((name, nxt))
            return True

        await fs.readdir(fh, offset, reply)
        if not page:
            break
        seen += [n for n, _ in page]
        offset = page[-1][1]
        # Between calls: remove some not-yet-listed and listed entries, add new ones.
        rounds += 1
        if rounds * 25 + 20 < len(initial):
            removed_late.add(initial[rounds * 25 + 20])
            await fs.unlink(d.ino, initial[rounds * 25 + 20])
            await fs.unlink(d.ino, initial[rounds * 2])  # already listed
            await touch(fs, d.ino, b"new%02d" % rounds)  # may or may not be listed
    await fs.releasedir(fh)
    assert rounds > 5
    assert seen[:2] == [b".", b".."]
    assert len(seen) == len(set(seen))  # nothing twice
    for name in initial:  # nothing that stayed is skipped
        if name not in removed_late:
            assert name in seen, name


async def test_readdir_counts_lookups_except_dots(fs: FileSystem) -> None:
    d = await fs.mkdir(R, b"d", 0o755, 0, 0)
    f = await touch(fs, d.ino, b"f")
    await fs.forget([(f.ino, 1)])  # the kernel forgot it...
    fh = await fs.opendir(d.ino)
    await fs.readdir(fh, 0, lambda name, attrs, off: True)  # ...and met it again
    await fs.unlink(d.ino, b"f")
    assert (await fs.getattr(f.ino)).nlink == 0  # readdirplus reference keeps it
    await fs.forget([(f.ino, 1)])
    await expect(errno.ENOENT, fs.getattr(f.ino))
    await fs.forget([(d.ino, 1)])  # still named: forgetting does not remove
    assert (await fs.getattr(d.ino)).nlink == 2


async def test_statfs_reports_usable_space(fs: FileSystem) -> None:
    await touch(fs, R, b"f")
    st = await fs.statfs()
    assert st.frsize == 4096 and st.bsize == BS and st.namemax == 255
    assert st.blocks == int(7 * 2**40 / 3.5) // 4096 == 2 * st.bfree
    assert st.bavail == st.bfree
    assert st.files - st.ffree == 2


async def test_errors_carry_errnos_not_strings(fs: FileSystem) -> None:
    with pytest.raises(errors.NotFound):
        await fs.getattr(999)


async def test_a_volume_out_of_room_refuses_new_names_and_takes_deletes(
    meta: Metadata, store: MemBlobStore
) -> None:
    """While too many nodes are full, the space they keep is for the deletes that free
    them: every new name or xattr would take some, as on a full disk."""
    room = True
    fs = FileSystem(meta, store, room_for_data=lambda: room)
    d = await fs.mkdir(R, b"d", 0o755, 0, 0)
    f = await touch(fs, d.ino, b"f")
    await fs.setxattr(f.ino, b"user.a", b"1")
    room = False
    for call in (
        fs.mkdir(R, b"d2", 0o755, 0, 0),
        touch(fs, R, b"g"),
        fs.create(R, b"h", 0o644, os.O_WRONLY, 0, 0),
        fs.symlink(R, b"s", b"d/f", 0, 0),
        fs.link(f.ino, R, b"hard"),
        fs.setxattr(f.ino, b"user.b", b"2"),
    ):
        await expect(errno.ENOSPC, call)
    await fs.rename(d.ino, b"f", R, b"moved")
    await fs.setattr(f.ino, mode=stat.S_IFREG | 0o600)
    await fs.removexattr(f.ino, b"user.a")
    await fs.unlink(R, b"moved")
    await fs.rmdir(R, b"d")
    assert await names(fs, R) == [b".", b".."]
    room = True
    await touch(fs, R, b"g")
