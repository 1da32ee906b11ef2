"""fsck on unmounted volumes: healthy, damaged and repaired, lost (naming the files)."""

from __future__ import annotations

import io
import os
import random
import shutil
import stat
import sys
from pathlib import Path

import trio

from codec import BlobMetadata
from tests.walrusfs.test_repair import OPTS, node_files, remove_pair
from tests.walrusfs.volumes import flip_byte, node_paths, sliver_file, sliver_files, zero_range
from walrusfs.checkpoint import SUPERBLOCK_KEY, Superblock
from walrusfs.fsck import EXIT_DAMAGED, EXIT_LOST, EXIT_OK, fsck
from walrusfs.metadata import ROOT_INODE, BlockRef
from walrusfs.metastore import MetaStore, format_metadata
from walrusfs.volume import create_volume, open_volume

N = 7
FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


async def make_fs(root: Path) -> tuple[list[str], dict[str, tuple[bytes, bytes]]]:
    """A formatted, unmounted volume holding /docs/a.bin (also linked as /a-link), /b.bin
    and /docs/c.bin; returns the node paths and path -> (blob id, meta)."""
    paths = node_paths(root / "nodes", N)
    await create_volume(paths, blob_size=1 << 16)
    vol = await open_volume(paths[0], **OPTS)  # type: ignore[arg-type]
    await format_metadata(vol, str(root / "state0"), uid=0, gid=0)
    ms = await MetaStore.open(vol, str(root / "state1"))
    md = ms.metadata
    rng = random.Random(31)
    docs = md.create(ROOT_INODE, b"docs", mode=DIR, uid=0, gid=0, now_ns=1).id
    blobs = {}
    for parent, name in ((docs, b"a.bin"), (ROOT_INODE, b"b.bin"), (docs, b"c.bin")):
        data = rng.randbytes(rng.randrange(1000, 1 << 16))
        r = await vol.blobs.put_blob(data)
        ino = md.create(parent, name, mode=FILE, uid=0, gid=0, now_ns=2).id
        md.set_blocks(
            ino, {0: BlockRef(r.blob_id, r.meta, len(data))}, size=len(data), mtime_ns=3, ctime_ns=3
        )
        prefix = "/docs/" if parent == docs else "/"
        blobs[prefix + name.decode()] = (r.blob_id, r.meta)
        if name == b"a.bin":
            md.link(ino, ROOT_INODE, b"a-link", now_ns=4)
    await ms.close()  # an unmount: journal synced, final checkpoint
    return paths, blobs


async def run_fsck(node_dir: str, repair: bool = False) -> tuple[int, str]:
    out = io.StringIO()
    code = await fsck(node_dir, repair=repair, out=out, node_timeout=5.0)
    return code, out.getvalue()


async def test_a_healthy_volume_passes(tmp_path: Path) -> None:
    paths, _ = await make_fs(tmp_path)
    code, text = await run_fsck(paths[3])
    assert code == EXIT_OK, text
    assert "refcounts: ok" in text and "all whole" in text and "volume is healthy" in text
    assert "orphans: 0" in text


async def test_a_lost_blob_exits_non_zero_naming_its_files(tmp_path: Path) -> None:
    paths, blobs = await make_fs(tmp_path)
    blob_id, meta = blobs["/docs/a.bin"]
    parsed = BlobMetadata.from_bytes(meta)
    for pair in range(2 * parsed.params.f + 1):  # R-1 pairs left
        remove_pair(paths, parsed, pair)
    code, text = await run_fsck(paths[0])
    assert code == EXIT_LOST, text
    lost = [line for line in text.splitlines() if line.startswith("LOST")]
    assert len(lost) == 1 and blob_id.hex()[:16] in lost[0]
    assert "/docs/a.bin" in lost[0] and "/a-link" in lost[0]
    assert "/b.bin" not in text
    # --repair cannot bring it back, but heals nothing else wrongly and still says so.
    code, text = await run_fsck(paths[0], repair=True)
    assert code == EXIT_LOST and "/docs/a.bin" in text


async def test_repair_heals_wiped_corrupt_and_orphaned_nodes(tmp_path: Path) -> None:
    paths, blobs = await make_fs(tmp_path)
    before = {i: node_files(paths[i]) for i in range(N)}
    shutil.rmtree(Path(paths[4]) / "slivers")  # a wiped node (checkpoint blobs too)
    blob_id, _ = blobs["/b.bin"]
    flip_byte(sliver_file(paths[1], blob_id), 5000)
    orphan = Path(paths[2]) / "slivers" / "ab" / "cd" / ("abcd" + "0" * 60 + ".p3")
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"left by a crashed put")
    code, text = await run_fsck(paths[0])
    assert code == EXIT_DAMAGED, text
    assert "1 corrupt" in text and "orphans: 1 sliver files" in text
    code, text = await run_fsck(paths[0], repair=True)
    assert code == EXIT_OK, text
    assert "1 removed" in text and "repaired" in text
    assert not orphan.exists()
    # Both checkpoints are rebuilt too: the previous one is the fallback recovery point.
    sb = Superblock.from_bytes((Path(paths[0]) / SUPERBLOCK_KEY).read_bytes())
    assert sb.previous
    assert {i: node_files(paths[i]) for i in range(N)} == before
    code, text = await run_fsck(paths[6])
    assert code == EXIT_OK, text


async def test_files_torn_on_every_node_are_damaged_not_lost_and_repaired(
    tmp_path: Path,
) -> None:
    # A power loss kept every sliver file of /b.bin at its size but not a page of its
    # secondary sliver: every pair fails, every primary verifies. The data is all there.
    paths, blobs = await make_fs(tmp_path)
    before = {i: node_files(paths[i]) for i in range(N)}
    blob_id, meta = blobs["/b.bin"]
    parsed = BlobMetadata.from_bytes(meta)
    secondary = parsed.params.R * parsed.symbol_size
    for i in range(N):
        f = sliver_file(paths[i], blob_id)
        start = f.stat().st_size - secondary  # its first symbol: row 0, never padding
        zero_range(f, start, start + 100)
    code, text = await run_fsck(paths[0])
    assert code == EXIT_DAMAGED, text
    assert f"{N} corrupt" in text and "LOST" not in text and "1 damaged" in text
    torn3 = sliver_file(paths[3], blob_id).relative_to(paths[3])
    assert f"corrupt: node 3: {torn3}: secondary sliver" in text
    code, text = await run_fsck(paths[0], repair=True)
    assert code == EXIT_OK, text
    assert {i: node_files(paths[i]) for i in range(N)} == before


async def test_the_cli_entry_point_runs_as_a_user_runs_it(tmp_path: Path) -> None:
    paths, _ = await make_fs(tmp_path)
    with trio.fail_after(120):
        res = await trio.run_process(
            [sys.executable, "-m", "walrusfs.fsck", paths[5]],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
        )
    stdout = res.stdout.decode()
    assert res.returncode == EXIT_OK, stdout + res.stderr.decode()
    assert "volume is healthy" in stdout and "\r" not in stdout  # no bar in a pipe
    assert len(sliver_files(paths[5])) > 0
