"""Replacing nodes with new empty directories under a live filesystem's metadata."""

from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path

import pytest
import trio

from tests.walrusfs.test_repair import NO_HANG, OPTS, node_files
from tests.walrusfs.volumes import node_paths
from walrusfs.catalog import Catalog
from walrusfs.checkpoint import SUPERBLOCK_KEY
from walrusfs.healer import RepairService, ReplaceError
from walrusfs.identity import IDENTITY_KEY
from walrusfs.metadata import ROOT_INODE, BlockRef
from walrusfs.metastore import MetaStore, format_metadata
from walrusfs.volume import create_volume, open_volume

FILE = stat.S_IFREG | 0o644


async def test_f_nodes_replaced_at_once_are_rebuilt_while_in_use(tmp_path: Path) -> None:
    paths = node_paths(tmp_path / "nodes", 7)
    await create_volume(paths, blob_size=1 << 16)
    vol = await open_volume(paths[0], **OPTS)  # type: ignore[arg-type]
    await format_metadata(vol, str(tmp_path / "state0"), uid=0, gid=0)
    ms = await MetaStore.open(vol, str(tmp_path / "state1"))
    md = ms.metadata
    rng = random.Random(11)
    files: dict[bytes, bytes] = {}
    inodes: dict[bytes, int] = {}
    for k in range(16):
        data = rng.randbytes(rng.randrange(1, 1 << 16))
        r = await vol.blobs.put_blob(data)
        ino = md.create(ROOT_INODE, b"f%d" % k, mode=FILE, uid=0, gid=0, now_ns=1).id
        md.set_blocks(
            ino, {0: BlockRef(r.blob_id, r.meta, len(data))}, size=len(data), mtime_ns=2, ctime_ns=2
        )
        files[r.blob_id] = data
        inodes[r.blob_id] = ino
    await ms.sync()
    catalog = Catalog(md.path, lambda: ms.superblock)
    svc = RepairService(vol, catalog, rate=None, on_replaced=ms.checkpoint)
    replaced = {1: str(tmp_path / "new1"), 4: str(tmp_path / "new4")}
    old = {i: node_files(paths[i]) for i in replaced}
    # Node 4's disk died: its directory is gone; node 1 is moved while healthy.
    os.rename(paths[4], paths[4] + ".dead")
    await vol.nodes.probe(4)
    assert vol.nodes.state(4).value == "down"

    with pytest.raises(ReplaceError, match="already another node"):
        await svc.replace_node(1, paths[2])
    with pytest.raises(ReplaceError, match="must not be inside one another"):
        await svc.replace_node(1, os.path.join(paths[2], "inside"))
    assert not os.path.exists(os.path.join(paths[2], "inside"))
    other = tmp_path / "other"
    await create_volume(node_paths(other, 4))
    with pytest.raises(ReplaceError, match="a node directory of a walrusfs volume"):
        await svc.replace_node(1, str(other / "node0" / "spare"))
    assert not os.path.exists(other / "node0" / "spare")
    with trio.fail_after(NO_HANG):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: svc.run_forever(
                    first_delay=3600, poll=0.02, task_status=task_status
                )
            )
            # Node 4, still down, cannot learn node 1's new path yet ...
            (warning,) = await svc.replace_node(1, replaced[1])
            assert warning.startswith("node 4: identity not updated")
            # ... and gets it with its own fresh identity when it is replaced in turn.
            assert await svc.replace_node(4, replaced[4]) == []
            assert vol.nodes.nodes[1].store.path == replaced[1]
            # In use while rebuilt: every file reads back, new data goes to the new nodes.
            for blob_id, data in files.items():
                ref = md.block(inodes[blob_id], 0)
                assert ref is not None
                assert bytes(await vol.blobs.get_blob(blob_id, ref.meta)) == data
            fresh = await vol.blobs.put_blob(b"written after the replacement" * 100)
            assert fresh.missed == ()
            while svc.status()["rebuilding_nodes"]:
                await svc.wait_for_pass()
            nursery.cancel_scope.cancel()
    for i, new in replaced.items():
        now = node_files(new)
        kept = {k: v for k, v in old[i].items() if any(b.hex() in k for b in files)}
        assert {k: now[k] for k in kept} == kept
        assert (Path(new) / SUPERBLOCK_KEY).exists()
    assert not Path(paths[4]).exists()  # nothing was written where the dead node was
    for i in range(7):
        where = replaced.get(i, paths[i])
        ident = json.loads((Path(where) / IDENTITY_KEY).read_text())
        assert ident["index"] == i
        assert [ident["nodes"][j] for j in replaced] == list(replaced.values())
    await ms.close()
    catalog.close()
    # Opened afresh from any node, the volume uses the new directories and recovers.
    vol2 = await open_volume(replaced[4], **OPTS)  # type: ignore[arg-type]
    assert [n.state.value for n in vol2.nodes.nodes] == ["up"] * 7
    ms2 = await MetaStore.open(vol2, str(tmp_path / "state2"))
    assert ms2.metadata.blob_count() == len(files)
    await ms2.close()
