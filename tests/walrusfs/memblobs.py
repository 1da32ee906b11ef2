"""An honest in-memory blob store implementing walrusfs.reclaim.BlobStoreProtocol.

Content addressed with blake3 like the real store, so identical blocks share a blob; it
counts puts, gets and deletes, and can fail or hold operations so tests can prove blobs
are freed, errors surface as EIO and races between flushes are handled. Tests only: the
lead's walrusfs.blobstore replaces it.
"""

from __future__ import annotations

import blake3
import trio

from walrusfs.errors import StorageUnavailable


class MemBlobStore:
    def __init__(self) -> None:
        self.blobs: dict[bytes, bytes] = {}
        self.puts = 0
        self.durable_puts = 0  # of them, on stable storage
        self.gets = 0
        self.got: list[tuple[int, int]] = []  # (offset, bytes) of each get
        self.deletes = 0
        self.events: list[str] = []  # "settle" and "delete", in order
        self.fail_puts = False
        self.fail_prefix: bytes | None = None  # puts of content starting with it fail
        self.fail_settles = False
        self.fail_gets = False
        # While set, operations wait for the event: lets a test interleave tasks.
        self.put_gate: trio.Event | None = None
        self.gate_prefix = b""  # only puts of content starting with this wait
        self.delete_gate: trio.Event | None = None
        self.puts_waiting = 0
        self.unit = 4096  # read_unit: what the real store's symbol size stands for

    @staticmethod
    def _meta(blob_id: bytes, length: int) -> bytes:
        return b"mem1" + length.to_bytes(8, "big") + blob_id[:4]

    async def put_blob(
        self, data: bytes | bytearray | memoryview, *, durable: bool = False
    ) -> tuple[bytes, bytes]:
        content = bytes(data)  # copy now: the caller's buffer is only borrowed
        await trio.lowlevel.checkpoint()
        if self.fail_prefix is not None and content.startswith(self.fail_prefix):
            await trio.sleep(0.01)  # late, as when nodes fill up: puts started with it land
            raise StorageUnavailable("memblobs: puts of this content are failing")
        if self.fail_puts:
            raise StorageUnavailable("memblobs: puts are failing")
        blob_id = blake3.blake3(content).digest()
        self.blobs[blob_id] = content
        self.puts += 1
        self.durable_puts += durable
        if self.put_gate is not None and content.startswith(self.gate_prefix):
            # Stored but not yet acknowledged, like slivers written before the reply.
            self.puts_waiting += 1
            try:
                await self.put_gate.wait()
            finally:
                self.puts_waiting -= 1
        return blob_id, self._meta(blob_id, len(content))

    async def settle(self) -> None:
        await trio.lowlevel.checkpoint()
        if self.fail_settles:
            raise StorageUnavailable("memblobs: too few nodes to flush")
        self.events.append("settle")

    def blob_length(self, blob_id: bytes, meta: bytes) -> int:
        assert meta[:4] == b"mem1" and meta[12:] == blob_id[:4], "not this blob's metadata"
        return int.from_bytes(meta[4:12], "big")

    def read_unit(self, blob_id: bytes, meta: bytes) -> int:
        self.blob_length(blob_id, meta)  # checks the metadata
        return self.unit

    async def get_range(self, blob_id: bytes, meta: bytes, offset: int, length: int) -> bytes:
        await trio.lowlevel.checkpoint()
        self.gets += 1
        if self.fail_gets:
            raise StorageUnavailable("memblobs: gets are failing")
        content = self.blobs.get(blob_id)
        if content is None:
            raise StorageUnavailable(f"memblobs: blob {blob_id.hex()[:16]} is gone")
        assert meta == self._meta(blob_id, len(content)), "metadata does not match the blob"
        assert 0 <= offset < len(content), "range outside the blob"
        data = content[offset : offset + length]  # clipped to the blob, as the real one
        self.got.append((offset, len(data)))
        return data

    async def delete_blob(self, blob_id: bytes, meta: bytes) -> None:
        await trio.lowlevel.checkpoint()
        if self.delete_gate is not None:
            await self.delete_gate.wait()
        self.deletes += 1
        self.events.append("delete")
        self.blobs.pop(blob_id, None)
