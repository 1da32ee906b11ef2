"""On a real volume: a blob is put durably exactly when it replaces patches that are
durable, so fsync() keeps its promise and closing small files costs no flush a pack."""

from __future__ import annotations

import os
from pathlib import Path

from tests.walrusfs.volumes import formatted_volume
from walrusfs.blobstore import BlobStore
from walrusfs.errors import StorageUnavailable
from walrusfs.fs import FileSystem
from walrusfs.metadata import ROOT_INODE
from walrusfs.metastore import MetaStore
from walrusfs.service import FsBlobs


class NotedBlobs(FsBlobs):
    """The real FsBlobs, noting whether each put was durable."""

    def __init__(self, blobs: BlobStore, ms: MetaStore) -> None:
        super().__init__(blobs, ms)
        self.puts: list[bool] = []
        self.failing = 0  # puts to refuse, as with more than f nodes away

    async def put_blob(
        self, data: bytes | bytearray | memoryview, *, durable: bool = False
    ) -> tuple[bytes, bytes]:
        self.puts.append(durable)
        if self.failing:
            self.failing -= 1
            raise StorageUnavailable("blob stored on only 4 of 7 nodes, need 5")
        return await super().put_blob(data, durable=durable)


async def small_file(fs: FileSystem, name: bytes, data: bytes, *, fsync: bool) -> int:
    fh, attrs = await fs.create(ROOT_INODE, name, 0o644, os.O_RDWR, 0, 0)
    await fs.write(fh, 0, data)
    if fsync:
        await fs.fsync(fh)
    await fs.flush(fh)  # close(): committed as patches on a quorum of nodes
    await fs.release(fh)
    return attrs.ino


async def test_packs_and_blobs_are_durable_when_the_patches_they_replace_are(
    tmp_path: Path,
) -> None:
    vol, ms, _ = await formatted_volume(tmp_path)
    try:
        blobs = NotedBlobs(vol.blobs, ms)
        fs = FileSystem(ms.metadata, blobs, commit=lambda durable: ms.sync(durable=durable))
        await small_file(fs, b"closed", b"only closed" * 100, fsync=False)
        await fs.data.flush_all()
        assert blobs.puts == [False]  # a pack of patches nothing made durable
        await small_file(fs, b"synced", b"fsynced" * 100, fsync=True)
        await fs.data.flush_all()
        assert blobs.puts == [False, True]  # it replaces what fsync() promised
        await small_file(fs, b"later", b"closed, then a sync" * 100, fsync=False)
        await ms.sync(durable=True)  # as a delete round or another file's fsync does
        await fs.data.flush_all()
        assert blobs.puts == [False, True, True]
    finally:
        await ms.close()
    ms = await MetaStore.open(vol, str(tmp_path / "state"))  # all there after a remount
    try:
        fs = FileSystem(ms.metadata, FsBlobs(vol.blobs, ms))
        got = {}
        for name in (b"closed", b"synced", b"later"):
            attrs = await fs.lookup(ROOT_INODE, name)
            fh = await fs.open(attrs.ino, os.O_RDONLY, 0)
            got[name] = bytes(await fs.read(fh, 0, 1 << 16))
            await fs.release(fh)
        assert got == {
            b"closed": b"only closed" * 100,
            b"synced": b"fsynced" * 100,
            b"later": b"closed, then a sync" * 100,
        }
    finally:
        await ms.close()


async def test_a_block_whose_put_failed_is_put_again_as_durably_as_its_patches(
    tmp_path: Path,
) -> None:
    vol, ms, _ = await formatted_volume(tmp_path)
    data = bytearray(os.urandom(2 << 16))  # two 64 KiB blocks: no pack takes them
    try:
        blobs = NotedBlobs(vol.blobs, ms)
        fs = FileSystem(ms.metadata, blobs, commit=lambda durable: ms.sync(durable=durable))
        ino = await small_file(fs, b"big", bytes(data), fsync=False)
        assert blobs.puts == [False, False]
        fh = await fs.open(ino, os.O_RDWR, 0)
        await fs.write(fh, 100, b"fsynced")
        data[100:107] = b"fsynced"
        await fs.fsync(fh)  # a patch, durable: fsync() promised these bytes
        await fs.flush(fh)
        await fs.release(fh)
        blobs.failing = 1
        await fs.data.flush_all()  # fails, and says nothing: the patch is committed
        assert blobs.puts == [False, False, True]
        await fs.data.flush_all()  # the retry replaces the same durable patch
        assert blobs.puts == [False, False, True, True]
    finally:
        await ms.close()
    ms = await MetaStore.open(vol, str(tmp_path / "state"))
    try:
        fs = FileSystem(ms.metadata, FsBlobs(vol.blobs, ms))
        fh = await fs.open(ino, os.O_RDONLY, 0)
        assert bytes(await fs.read(fh, 0, 3 << 16)) == data
        await fs.release(fh)
    finally:
        await ms.close()
