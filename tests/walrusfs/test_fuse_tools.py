"""Real tools on a real mount: tar, rsync, sqlite3, mmap, git.

The trees carry what such tools trip over: holes, hard links across directories,
relative and dangling symlinks, FIFOs, odd names, set-ID bits, nanosecond mtimes and
user xattrs. Every round trip is compared entry by entry.

The sqlite3 and mmap clients run in a child process, as they would in real life: in the
serving process they deadlock against the server (a page fault holds the process's mmap
lock, SQLite a process-wide mutex, while waiting for a reply the server then cannot
produce because it needs the same lock).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import shutil
import sqlite3
import stat
import sys
from pathlib import Path

import pytest
import trio

from tests.walrusfs.conftest import BS, Mounted, in_thread

MTIME = 1_650_000_000_123_456_789
ROOT = Path(__file__).resolve().parents[2]  # the repository, for child processes


def build_tree(root: Path) -> None:
    """A small tree with every kind of entry tools must preserve."""
    rng = random.Random(42)
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    for name, size in [
        ("empty", 0),
        ("one", 1),
        ("page", 4096),
        ("block+1", BS + 1),
        ("dir/multi", 3 * BS + 11),
        ("dir/sub/odd name \u00e9", 777),
    ]:
        (root / name).write_bytes(rng.randbytes(size))
    with open(root / "holey", "wb") as f:  # a file with a hole
        f.seek(5 * BS)
        f.write(b"after the hole")
    os.link(root / "one", root / "dir" / "one-hardlink")
    os.link(root / "dir" / "multi", root / "dir" / "sub" / "multi-hardlink")
    os.symlink("../one", root / "dir" / "rel-link")
    os.symlink("/does/not/exist", root / "dangling")
    os.mkfifo(root / "fifo", 0o640)
    os.chmod(root / "page", 0o4755)
    os.chmod(root / "one", 0o600)
    os.setxattr(root / "block+1", "user.origin", b"walrus")
    for p in sorted(root.rglob("*"), reverse=True):
        os.utime(p, ns=(MTIME, MTIME), follow_symlinks=False)


def manifest(root: Path, *, mtimes: bool = True) -> dict[str, tuple[object, ...]]:
    """Everything a faithful copy must keep, per path, with hard links as groups."""
    out: dict[str, tuple[object, ...]] = {}
    first_name: dict[int, str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        st = os.lstat(p)
        kind = stat.S_IFMT(st.st_mode)
        entry: list[object] = [kind, stat.S_IMODE(st.st_mode)]
        if stat.S_ISREG(kind):
            entry += [
                st.st_size,
                hashlib.sha256(p.read_bytes()).hexdigest(),
                first_name.setdefault(st.st_ino, rel),
                st.st_nlink,
                sorted((n, os.getxattr(p, n)) for n in os.listxattr(p)),
            ]
        elif stat.S_ISLNK(kind):
            entry.append(os.readlink(p))
        if mtimes and not stat.S_ISLNK(kind) and not stat.S_ISDIR(kind):
            entry.append(st.st_mtime_ns)
        out[rel] = tuple(entry)
    return out


@pytest.fixture
async def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    await in_thread(build_tree, src)
    return src


async def sh(cmd: str) -> None:
    await trio.run_process(["sh", "-ec", cmd])


async def test_tar_roundtrip(mounted: Mounted, tree: Path, tmp_path: Path) -> None:
    dst, back = mounted.path / "dst", tmp_path / "back"
    await in_thread(dst.mkdir)
    await in_thread(back.mkdir)
    opts = "--format=posix --xattrs --xattrs-include='user.*' --sparse"
    await sh(f"tar -C {tree} {opts} -cf - . | tar -C {dst} {opts} -xpf -")
    expected = await in_thread(manifest, tree)
    assert await in_thread(manifest, dst) == expected
    await sh(f"tar -C {dst} {opts} -cf - . | tar -C {back} {opts} -xpf -")
    assert await in_thread(manifest, back) == expected
    holey = await in_thread(os.stat, dst / "holey")
    await mounted.fs.data.flush_all()
    assert mounted.fs.meta.block_indexes(holey.st_ino) == [5]  # the hole stayed a hole


async def test_rsync_roundtrip(mounted: Mounted, tree: Path, tmp_path: Path) -> None:
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed (apt-get install rsync)")
    dst, back = mounted.path / "dst", tmp_path / "back"
    await sh(f"rsync -aHSX {tree}/ {dst}/")
    expected = await in_thread(manifest, tree)
    assert await in_thread(manifest, dst) == expected
    # A second run finds nothing to do: sizes, mtimes and links all match.
    out = await trio.run_process(
        ["rsync", "-aHSX", "--itemize-changes", f"{tree}/", f"{dst}/"], capture_stdout=True
    )
    assert out.stdout == b""
    await sh(f"rsync -aHSX {dst}/ {back}/")
    assert await in_thread(manifest, back) == expected
    # rsync writes to a temporary name and renames it over the old file.
    await in_thread((tree / "dir" / "multi").write_bytes, b"changed")
    await sh(f"rsync -aHSX {tree}/ {dst}/")
    assert await in_thread((dst / "dir" / "multi").read_bytes) == b"changed"
    assert await in_thread((dst / "dir" / "sub" / "multi-hardlink").read_bytes) == b"changed"


def sqlite_workload(path: str, journal_mode: str) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        assert db.execute(f"PRAGMA journal_mode={journal_mode}").fetchone()[0] == journal_mode
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB, n INTEGER)")
        rng = random.Random(9)
        for batch in range(20):
            db.execute("BEGIN")
            db.executemany(
                "INSERT INTO t(body, n) VALUES (?, ?)",
                [(rng.randbytes(rng.randrange(10, 3000)), batch) for _ in range(50)],
            )
            if batch % 5 == 4:
                db.execute("ROLLBACK")
            else:
                db.execute("COMMIT")
        db.execute("BEGIN")
        db.execute("UPDATE t SET n = n + 100 WHERE id % 3 = 0")
        db.execute("DELETE FROM t WHERE id % 7 = 0")
        db.execute("COMMIT")
        db.execute("CREATE INDEX t_n ON t(n)")
        db.execute("VACUUM")
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        count = db.execute("SELECT COUNT(*) FROM t").fetchone()[0]
    finally:
        db.close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT COUNT(*) FROM t").fetchone()[0] == count
        assert db.execute("SELECT COUNT(DISTINCT n) FROM t WHERE n < 100").fetchone()[0] == 16
    finally:
        db.close()


async def in_child(function: str, *args: object) -> None:
    """Run `function` of this module with `args` in a separate Python process."""
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
        f"from tests.walrusfs.test_fuse_tools import {function} as f; f(*sys.argv[1:])"
    )
    await trio.run_process([sys.executable, "-c", code, *map(str, args)])


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
async def test_sqlite_database(mounted: Mounted, journal_mode: str) -> None:
    await in_child("sqlite_workload", mounted.path / "app.db", journal_mode)
    ino = (await in_thread(os.stat, mounted.path / "app.db")).st_ino
    size = mounted.fs.meta.get_inode(ino).size
    copy = bytes(await mounted.fs.data.read(ino, 0, size))  # what the store holds
    assert copy[:16] == b"SQLite format 3\0"


def mmap_workload(path: str) -> None:
    size = 3 * BS + 100
    expected = bytearray(size)
    with open(path, "w+b") as f:
        f.truncate(size)
        with mmap.mmap(f.fileno(), size) as m:
            rng = random.Random(5)
            for _ in range(200):
                off = rng.randrange(size - 64)
                chunk = rng.randbytes(rng.randrange(1, 64))
                m[off : off + len(chunk)] = chunk
                expected[off : off + len(chunk)] = chunk
            m.flush()
            assert m[:] == expected
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        assert m[:] == expected
    with open(path, "rb") as f:
        assert f.read() == expected


async def test_mmap_write_and_read(mounted: Mounted) -> None:
    path = mounted.path / "mapped"
    await in_child("mmap_workload", path)
    expected = await in_thread(path.read_bytes)
    rng = random.Random(5)  # the same edits the child made
    model = bytearray(3 * BS + 100)
    for _ in range(200):
        off = rng.randrange(len(model) - 64)
        chunk = rng.randbytes(rng.randrange(1, 64))
        model[off : off + len(chunk)] = chunk
    assert expected == model
    ino = (await in_thread(os.stat, path)).st_ino
    await mounted.fs.data.flush(ino)  # writes may follow the close under mmap
    assert await mounted.fs.data.read(ino, 0, len(expected) + 1) == expected


async def test_git_repository(mounted: Mounted) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = mounted.path / "repo"
    git = "git -c user.name=t -c user.email=t@example.com -c init.defaultBranch=main"
    await sh(
        f"mkdir {repo} && cd {repo} && {git} init -q && "
        f"for i in 1 2 3; do seq 1 $((i * 5000)) > f$i; {git} add f$i; "
        f"{git} commit -qm c$i; done && {git} mv f1 g1 && {git} commit -qm mv && "
        f"{git} gc -q && {git} fsck --full --strict"
    )
    out = await trio.run_process(["git", "-C", str(repo), "log", "--oneline"], capture_stdout=True)
    assert len(out.stdout.splitlines()) == 4
