"""Metadata: schema, namespace rows, link counts, cookies, xattrs and blob refcounts."""

from __future__ import annotations

import errno
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.walrusfs.volumes import tmpfs
from walrusfs import errors
from walrusfs.metadata import ROOT_INODE, BlockRef, Change, FreedBlob, Metadata

BS = 64 * 1024
FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


class Recording(Metadata):
    """Metadata that remembers each committed change (what a journal would see)."""

    def __init__(self, path: Path, **kwargs: int) -> None:
        self.changes: list[Change] = []
        super().__init__(path, **kwargs)

    def _commit(self, change: Change) -> None:
        self.changes.append(change)
        super()._commit(change)


@pytest.fixture
def meta(tmp_path: Path) -> Iterator[Recording]:
    m = Recording(tmp_path / "meta.db", block_size=BS, root_uid=10, root_gid=20, now_ns=7)
    yield m
    m.close()


def mkfile(m: Metadata, parent: int, name: bytes, now: int = 100) -> int:
    return m.create(parent, name, mode=FILE, uid=1, gid=2, now_ns=now).id


def mkdir(m: Metadata, parent: int, name: bytes, now: int = 100) -> int:
    return m.create(parent, name, mode=DIR, uid=1, gid=2, now_ns=now).id


def ref(tag: bytes, length: int = BS) -> BlockRef:
    return BlockRef(tag.ljust(32, b"\0"), b"meta-" + tag, length)


def test_new_volume_has_a_root(meta: Recording) -> None:
    root = meta.get_inode(ROOT_INODE)
    assert stat.S_ISDIR(root.mode) and stat.S_IMODE(root.mode) == 0o755
    assert (root.uid, root.gid, root.nlink, root.mtime_ns) == (10, 20, 2, 7)
    assert meta.block_size == BS
    assert meta.parent_of(ROOT_INODE) == ROOT_INODE
    assert [c.op for c in meta.changes] == ["mkfs"]


def test_reopen_keeps_data_and_checks_format(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    m = Metadata(path, block_size=BS)
    ino = mkfile(m, ROOT_INODE, b"kept")
    m.close()
    m = Metadata(path)  # the block size comes from the volume
    assert m.block_size == BS and m.lookup(ROOT_INODE, b"kept") == ino
    m.close()
    with pytest.raises(errors.Invalid):
        Metadata(path, block_size=2 * BS)
    with pytest.raises(errors.Invalid):
        Metadata(tmp_path / "new.db")  # a new volume needs a block size
    import sqlite3

    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(errors.Invalid, match="schema version 99"):
        Metadata(path)


def test_create_names_and_link_counts(meta: Recording) -> None:
    d = mkdir(meta, ROOT_INODE, b"d", now=200)
    f = mkfile(meta, d, b"f", now=300)
    s = meta.create(
        d, b"s", mode=stat.S_IFLNK | 0o777, uid=0, gid=0, now_ns=300, target=b"../elsewhere"
    ).id
    assert meta.get_inode(ROOT_INODE).nlink == 3  # 2 + one subdirectory
    assert meta.get_inode(d).nlink == 2 and meta.get_inode(f).nlink == 1
    assert meta.get_inode(d).mtime_ns == 300  # parents' times follow their entries
    assert meta.readlink(s) == b"../elsewhere" and meta.get_inode(s).size == 12
    with pytest.raises(errors.Invalid):
        meta.readlink(f)
    assert meta.parent_of(d) == ROOT_INODE
    before = len(meta.changes)
    with pytest.raises(errors.Exists):
        mkfile(meta, d, b"f")
    assert len(meta.changes) == before  # rolled back, nothing committed
    assert meta.inode_count() == 4


def test_link_and_unlink(meta: Recording) -> None:
    f = mkfile(meta, ROOT_INODE, b"a")
    meta.link(f, ROOT_INODE, b"b", now_ns=500)
    row = meta.get_inode(f)
    assert row.nlink == 2 and row.ctime_ns == 500
    assert meta.unlink(ROOT_INODE, b"a", now_ns=600) == f
    assert meta.get_inode(f).nlink == 1 and meta.lookup(ROOT_INODE, b"a") is None
    meta.unlink(ROOT_INODE, b"b", now_ns=700)
    assert meta.get_inode(f).nlink == 0 and meta.orphans() == [f]
    assert meta.delete_inode(f) == []
    with pytest.raises(errors.NotFound):
        meta.get_inode(f)
    with pytest.raises(errors.NotFound):
        meta.unlink(ROOT_INODE, b"b", now_ns=800)


def test_rmdir_updates_parent_nlink(meta: Recording) -> None:
    d = mkdir(meta, ROOT_INODE, b"d")
    assert meta.has_entries(ROOT_INODE) and not meta.has_entries(d)
    meta.unlink(ROOT_INODE, b"d", now_ns=900)
    assert meta.get_inode(ROOT_INODE).nlink == 2 and meta.get_inode(d).nlink == 0


def test_rename_moves_keep_cookies_and_fix_nlinks(meta: Recording) -> None:
    a = mkdir(meta, ROOT_INODE, b"a")
    b = mkdir(meta, ROOT_INODE, b"b")
    sub = mkdir(meta, a, b"sub")
    cookie = meta.readdir(a, 0, 10)[0][0]
    assert meta.rename(a, b"sub", b, b"moved", now_ns=1000) is None
    [(c2, name, row)] = meta.readdir(b, 0, 10)
    assert (c2, name, row.id) == (cookie, b"moved", sub)
    assert meta.get_inode(a).nlink == 2 and meta.get_inode(b).nlink == 3
    assert meta.parent_of(sub) == b and meta.get_inode(sub).ctime_ns == 1000


def test_rename_replaces_and_returns_the_old_target(meta: Recording) -> None:
    x = mkfile(meta, ROOT_INODE, b"x")
    y = mkfile(meta, ROOT_INODE, b"y")
    assert meta.rename(ROOT_INODE, b"x", ROOT_INODE, b"y", now_ns=5) == y
    assert meta.lookup(ROOT_INODE, b"y") == x and meta.lookup(ROOT_INODE, b"x") is None
    assert meta.get_inode(y).nlink == 0
    d1 = mkdir(meta, ROOT_INODE, b"d1")
    d2 = mkdir(meta, ROOT_INODE, b"d2")
    assert meta.get_inode(ROOT_INODE).nlink == 4
    assert meta.rename(ROOT_INODE, b"d1", ROOT_INODE, b"d2", now_ns=6) == d2
    assert meta.get_inode(ROOT_INODE).nlink == 3 and meta.get_inode(d2).nlink == 0
    assert meta.lookup(ROOT_INODE, b"d2") == d1


def test_rename_exchange_swaps_and_moves_dir_links(meta: Recording) -> None:
    a = mkdir(meta, ROOT_INODE, b"a")
    d = mkdir(meta, a, b"d")
    f = mkfile(meta, ROOT_INODE, b"f")
    meta.rename(a, b"d", ROOT_INODE, b"f", now_ns=9, exchange=True)
    assert meta.lookup(a, b"d") == f and meta.lookup(ROOT_INODE, b"f") == d
    assert meta.get_inode(a).nlink == 2 and meta.get_inode(ROOT_INODE).nlink == 4
    with pytest.raises(errors.NotFound):
        meta.rename(a, b"d", a, b"missing", now_ns=9, exchange=True)


def test_readdir_pages_by_cookie(meta: Recording) -> None:
    names = [b"n%03d" % i for i in range(25)]
    for n in names:
        mkfile(meta, ROOT_INODE, n)
    seen: list[bytes] = []
    cookie = 0
    while page := meta.readdir(ROOT_INODE, cookie, 7):
        seen += [name for _, name, _ in page]
        cookie = page[-1][0]
        if len(seen) == 7:  # entries removed or added mid-listing shift nothing
            meta.unlink(ROOT_INODE, b"n000", now_ns=1)
            meta.unlink(ROOT_INODE, b"n020", now_ns=1)
            mkfile(meta, ROOT_INODE, b"late")
    assert seen == [*names[:7], *[n for n in names[7:] if n != b"n020"], b"late"]


def test_xattrs(meta: Recording) -> None:
    f = mkfile(meta, ROOT_INODE, b"f")
    meta.set_xattr(f, b"user.b", b"2", now_ns=40)
    meta.set_xattr(f, b"user.a", b"\0" * 65536, now_ns=41)
    meta.set_xattr(f, b"user.b", b"3", now_ns=42)
    assert meta.list_xattrs(f) == [b"user.a", b"user.b"]
    assert meta.get_xattr(f, b"user.b") == b"3" and meta.get_inode(f).ctime_ns == 42
    meta.remove_xattr(f, b"user.a", now_ns=43)
    with pytest.raises(errors.NoData):
        meta.get_xattr(f, b"user.a")
    with pytest.raises(errors.NoData):
        meta.remove_xattr(f, b"user.a", now_ns=44)


def test_set_blocks_counts_blob_references(meta: Recording) -> None:
    f = mkfile(meta, ROOT_INODE, b"f")
    g = mkfile(meta, ROOT_INODE, b"g")
    freed = meta.set_blocks(
        f, {0: ref(b"A"), 1: ref(b"B", 10)}, size=BS + 10, mtime_ns=5, ctime_ns=6
    )
    assert freed == []
    assert meta.set_blocks(g, {3: ref(b"A")}, size=4 * BS, mtime_ns=5, ctime_ns=6) == []
    assert meta.blob_refcount(ref(b"A").blob_id) == 2
    assert meta.block(f, 1) == ref(b"B", 10) and meta.block(f, 2) is None
    row = meta.get_inode(f)
    assert (row.size, row.mtime_ns, row.ctime_ns) == (BS + 10, 5, 6)
    # Rewriting a block with the same blob never frees it on the way.
    assert meta.set_blocks(f, {1: ref(b"B", 10)}, size=BS + 10, mtime_ns=7, ctime_ns=7) == []
    assert meta.blob_refcount(ref(b"B").blob_id) == 1
    freed = meta.set_blocks(f, {0: ref(b"C"), 1: None}, size=BS, mtime_ns=8, ctime_ns=8)
    assert freed == [FreedBlob(ref(b"B").blob_id, b"meta-B")]
    assert meta.blob_refcount(ref(b"A").blob_id) == 1 and meta.block_indexes(f) == [0]
    assert meta.delete_inode(g) == [FreedBlob(ref(b"A").blob_id, b"meta-A")]
    assert meta.blob_count() == 1
    with pytest.raises(errors.NotFound):
        meta.set_blocks(g, {0: ref(b"D")}, size=1, mtime_ns=1, ctime_ns=1)
    assert meta.blob_refcount(ref(b"D").blob_id) == 0  # rolled back


def test_truncate_drops_and_trims_blocks(meta: Recording) -> None:
    f = mkfile(meta, ROOT_INODE, b"f")
    meta.set_blocks(f, {i: ref(b"%d" % i) for i in range(4)}, size=4 * BS, mtime_ns=1, ctime_ns=1)
    assert meta.stored_bytes(f) == 4 * BS  # remembered from here on, until blocks change
    freed = meta.truncate(f, BS + 100, mtime_ns=2, ctime_ns=3)
    assert sorted(b.meta for b in freed) == [b"meta-2", b"meta-3"]
    assert meta.block_indexes(f) == [0, 1] and meta.stored_bytes(f) == BS + 100
    meta.set_blocks(f, {1: ref(b"x", 7), 5: ref(b"y", 9)}, size=5 * BS + 9, mtime_ns=2, ctime_ns=2)
    assert meta.stored_bytes(f) == BS + 16
    meta.set_blocks(f, {1: ref(b"1", 100), 5: None}, size=BS + 100, mtime_ns=2, ctime_ns=2)
    assert meta.block(f, 1) == ref(b"1", 100)
    meta.truncate(f, 10 * BS, mtime_ns=4, ctime_ns=4)  # growing never restores bytes
    assert meta.block(f, 1) == ref(b"1", 100) and meta.get_inode(f).size == 10 * BS
    freed = meta.truncate(f, 0, mtime_ns=5, ctime_ns=5)
    assert len(freed) == 2 and meta.blob_count() == 0 and meta.stored_bytes(f) == 0


def test_patches_change_blocks_until_the_block_is_stored_again(
    meta: Recording, tmp_path: Path
) -> None:
    f = mkfile(meta, ROOT_INODE, b"f")
    meta.set_blocks(f, {0: ref(b"A"), 1: ref(b"B", 100)}, size=BS + 100, mtime_ns=1, ctime_ns=1)
    meta.patch_blocks(
        f,
        [(0, 10, b"abc"), (1, 90, b"x" * 20), (0, 10, b"ABCD")],
        size=BS + 110,
        mtime_ns=2,
        ctime_ns=3,
    )
    assert meta.patches(f, 0) == [(10, b"ABCD")]  # a patch covered by a later one goes
    assert meta.patches(f, 1) == [(90, b"x" * 20)] and meta.patches(f, 2) == []
    assert (meta.get_inode(f).size, meta.get_inode(f).ctime_ns) == (BS + 110, 3)
    meta.patch_blocks(f, [(0, 12, b"z")], size=BS + 110, mtime_ns=4, ctime_ns=4)
    assert meta.patches(f, 0) == [(10, b"ABCD"), (12, b"z")]  # in order: the later wins
    assert meta.patched_blocks() == [(f, 0), (f, 1)]
    # The change replays from the journal's record of it, and survives a reopen.
    other = Recording(tmp_path / "replayed.db", block_size=BS, now_ns=7)
    for change in meta.changes[1:]:
        other.apply(change)
    assert other.patches(f, 0) == [(10, b"ABCD"), (12, b"z")]
    other.close()
    meta.truncate(f, BS + 95, mtime_ns=5, ctime_ns=5)  # patches are cut like blocks
    assert meta.patches(f, 1) == [(90, b"xxxxx")]
    meta.truncate(f, BS + 50, mtime_ns=5, ctime_ns=5)
    assert meta.patches(f, 1) == [] and meta.patches(f, 0) == [(10, b"ABCD"), (12, b"z")]
    meta.set_blocks(f, {0: ref(b"C")}, size=BS + 50, mtime_ns=6, ctime_ns=6)
    assert meta.patches(f, 0) == [] and meta.patched_blocks() == []
    meta.patch_blocks(f, [(1, 0, b"q")], size=BS + 50, mtime_ns=7, ctime_ns=7)
    meta.delete_inode(f)
    assert meta.patched_blocks() == []
    with pytest.raises(errors.NotFound):
        meta.patch_blocks(f, [(0, 0, b"gone")], size=1, mtime_ns=8, ctime_ns=8)
    assert meta.patches(f, 0) == []  # rolled back


@pytest.mark.parametrize("how", ["set_blocks", "patch_blocks"])
def test_a_commit_that_clears_drops_every_old_block_and_patch_at_once(
    meta: Recording, tmp_path: Path, how: str
) -> None:
    f = mkfile(meta, ROOT_INODE, b"f")
    meta.set_blocks(f, {0: ref(b"A"), 3: ref(b"B", 9)}, size=3 * BS + 9, mtime_ns=1, ctime_ns=1)
    meta.patch_blocks(f, [(1, 5, b"old")], size=3 * BS + 9, mtime_ns=2, ctime_ns=2)
    before = len(meta.changes)
    if how == "set_blocks":
        freed = meta.set_blocks(f, {0: ref(b"N", 4)}, size=4, mtime_ns=3, ctime_ns=3, clear=True)
        assert meta.block_indexes(f) == [0] and meta.block(f, 0) == ref(b"N", 4)
    else:
        freed = meta.patch_blocks(f, [(0, 0, b"new!")], size=4, mtime_ns=3, ctime_ns=3, clear=True)
        assert meta.block_indexes(f) == [] and meta.patches(f, 0) == [(0, b"new!")]
    assert {b.blob_id[:1] for b in freed} == {b"A", b"B"} and meta.patches(f, 1) == []
    assert meta.get_inode(f).size == 4
    assert len(meta.changes) == before + 1  # one record: a crash keeps both or neither
    other = Recording(tmp_path / "replayed.db", block_size=BS, now_ns=7)
    for change in meta.changes[1:]:
        other.apply(change)
    assert other.block_indexes(f) == meta.block_indexes(f)
    assert other.patched_blocks() == meta.patched_blocks()
    other.close()
    # Records that do not clear are written as they were before `clear` existed.
    meta.set_blocks(f, {}, size=4, mtime_ns=4, ctime_ns=4)
    assert "clear" not in meta.changes[-1].args


def test_a_record_of_a_newer_walrusfs_is_refused_clearly(meta: Recording) -> None:
    f = mkfile(meta, ROOT_INODE, b"f")
    args = {"ino": f, "blocks": {}, "size": 1, "mtime_ns": 1, "ctime_ns": 1, "sparkle": 1}
    with pytest.raises(errors.Invalid, match="newer walrusfs"):
        meta.apply(Change("set_blocks", args))
    with pytest.raises(errors.Invalid, match="newer walrusfs"):
        meta.apply(Change("teleport", {}))
    assert meta.get_inode(f).size == 0


@pytest.mark.parametrize("version", [1, 2])
def test_an_older_database_is_upgraded(tmp_path: Path, version: int) -> None:
    import sqlite3

    path = tmp_path / f"v{version}.db"
    Metadata(path, block_size=BS).close()
    db = sqlite3.connect(path)
    if version == 1:
        db.execute("DROP TABLE patches")  # version 2 added it
    db.execute("ALTER TABLE blocks DROP COLUMN start")  # version 3 added it
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (version,))
    db.commit()
    db.close()
    m = Metadata(path)
    f = mkfile(m, ROOT_INODE, b"f")
    m.patch_blocks(f, [(0, 0, b"p")], size=1, mtime_ns=1, ctime_ns=1)
    assert m.patches(f, 0) == [(0, b"p")]
    ref = BlockRef(b"b" * 32, b"meta", 10, start=20)
    m.set_blocks(f, {1: ref}, size=BS + 10, mtime_ns=2, ctime_ns=2)
    m.close()
    assert Metadata(path).block(f, 1) == ref


def test_each_mutation_is_one_committed_change(meta: Recording) -> None:
    meta.changes.clear()
    f = mkfile(meta, ROOT_INODE, b"f")
    meta.link(f, ROOT_INODE, b"g", now_ns=1)
    meta.set_attrs(f, mode=FILE | 0o4000, mtime_ns=3)
    meta.set_attrs(f)  # nothing to change: no transaction
    meta.set_xattr(f, b"user.x", b"1", now_ns=4)
    meta.rename(ROOT_INODE, b"g", ROOT_INODE, b"h", now_ns=5)
    meta.truncate(f, 0, mtime_ns=6, ctime_ns=6)
    meta.unlink(ROOT_INODE, b"h", now_ns=7)
    assert [c.op for c in meta.changes] == [
        "create",
        "link",
        "set_attrs",
        "set_xattr",
        "rename",
        "truncate",
        "unlink",
    ]
    assert meta.changes[2].args == {"ino": f, "mode": FILE | 0o4000, "mtime_ns": 3}
    with pytest.raises(TypeError):
        meta.set_attrs(f, size=3)


def test_checkpoint_runs_on_its_own_connection(meta: Recording) -> None:
    mkfile(meta, ROOT_INODE, b"durable")
    meta.checkpoint()
    assert meta.lookup(ROOT_INODE, b"durable") is not None


def test_remembered_rows_and_blocks_never_go_stale(tmp_path: Path) -> None:
    # get_inode and block answer from memory between mutations: after every kind of
    # mutation (parents, links, renamed-over and deleted files included) they must say
    # what a new connection to the same database reads.
    path = tmp_path / "m.db"
    m = Metadata(path, block_size=BS, now_ns=1)
    try:
        d = mkdir(m, ROOT_INODE, b"d")
        a, b = mkfile(m, d, b"a"), mkfile(m, ROOT_INODE, b"b")

        def view(md: Metadata) -> list[object]:
            out: list[object] = []
            for ino in (ROOT_INODE, d, a, b):
                try:
                    out.append(md.get_inode(ino))
                except errors.NotFound:
                    out.append(None)
                out.extend(md.block(ino, index) for index in range(3))
            return out

        def same() -> None:
            fresh = Metadata(path)
            try:
                assert view(m) == view(fresh)
            finally:
                fresh.close()

        steps = [
            lambda: m.set_blocks(
                a, {0: ref(b"x"), 1: ref(b"y")}, size=BS + 1, mtime_ns=2, ctime_ns=2
            ),
            lambda: m.set_attrs(a, mode=FILE | 0o600, mtime_ns=3),
            lambda: m.patch_blocks(a, [(1, 5, b"zz")], size=BS + 7, mtime_ns=4, ctime_ns=4),
            lambda: m.link(a, ROOT_INODE, b"a2", now_ns=5),
            lambda: m.truncate(a, 10, mtime_ns=6, ctime_ns=6),
            lambda: m.set_blocks(b, {0: ref(b"x", 9)}, size=9, mtime_ns=7, ctime_ns=7),
            lambda: m.rename(ROOT_INODE, b"b", d, b"a", now_ns=8),  # replaces a's first name
            lambda: m.set_xattr(d, b"user.k", b"v", now_ns=9),
            lambda: m.unlink(ROOT_INODE, b"a2", now_ns=10),
            lambda: m.delete_inode(a),
            lambda: m.set_blocks(b, {0: None}, size=0, mtime_ns=11, ctime_ns=11),
        ]
        same()
        for step in steps:
            view(m)  # remember everything, then change it
            step()
            same()
    finally:
        m.close()


def test_a_full_state_disk_is_enospc_and_loses_nothing_committed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with tmpfs(str(state), "512k"):
        m = Metadata(state / "meta.db", block_size=BS, root_uid=0, root_gid=0, now_ns=1)
        try:
            ino = mkfile(m, ROOT_INODE, b"f")
            value = bytes(60_000)
            names = []
            with pytest.raises(errors.StateDiskFull, match="metadata's disk is full") as caught:
                for k in range(100):
                    m.set_xattr(ino, b"user.k%d" % k, value, now_ns=2)
                    names.append(b"user.k%d" % k)
            assert errors.errno_of(caught.value) == errno.ENOSPC
            assert 0 < len(names) < 100
            # What was committed stays, the failed change left nothing, and the
            # database works again once there is room.
            assert sorted(m.list_xattrs(ino)) == sorted(names)
            subprocess.run(["mount", "-o", "remount,size=16m", str(state)], check=True)
            m.set_xattr(ino, b"user.later", b"v", now_ns=3)
            assert m.get_xattr(ino, b"user.later") == b"v"
        finally:
            m.close()
