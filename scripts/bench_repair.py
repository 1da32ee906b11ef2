#!/usr/bin/env python3
"""Benchmark node repair at n=7: rebuild a wiped node, against decoding every blob.

1 GiB of random data is stored as 4 MiB blobs (BlobStore directly, no mount), then one
node directory is wiped and rebuilt three times in the same run:
- by the repair engine as the mount runs it (stored symbols where the layout allows,
  decode elsewhere), alone: the rebuild time and bytes read per byte rebuilt;
- by decoding every blob and re-encoding it (how Reed-Solomon systems heal): the same
  figures for comparison;
- by the repair engine again while a user reads and writes blobs: user throughput during
  the rebuild against the same workload idle for as long (target: at least 50%).
The page cache is dropped before each rebuild where permitted (root), so reads are cold.
Every rebuilt sliver file is compared with the original. Last line:
`repair n=7: rebuilt X MiB in T s, read/rebuilt R, full-decode read/rebuilt D`
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import trio
from benchlib import drop_caches
from blake3 import blake3

from codec import BlobMetadata
from walrusfs.catalog import StaticBlobs
from walrusfs.healer import DEFAULT_RATE, RepairService
from walrusfs.repair import RepairEngine
from walrusfs.sliverfile import PREFIX
from walrusfs.volume import Volume, create_volume, open_volume

MIB = 1 << 20
N = 7
WIPED = 3


def digests(node: str) -> dict[str, tuple[str, int]]:
    """(blake3, size) of every sliver file under a node directory, by relative path."""
    base = Path(node)
    found = {}
    for p in (base / PREFIX).rglob("*"):
        if p.is_file() and not p.name.startswith("."):
            raw = p.read_bytes()
            found[str(p.relative_to(base))] = (blake3(raw).hexdigest(), len(raw))
    return found


async def check_rebuilt(node: str, original: dict[str, tuple[str, int]], what: str) -> None:
    """Every original sliver file is back, byte for byte (new blobs may be there too)."""
    now = await trio.to_thread.run_sync(digests, node)
    wrong = [k for k in original if now.get(k) != original[k]]
    if wrong:
        raise SystemExit(
            f"bench_repair: {what}: {len(wrong)} rebuilt files differ, e.g. {wrong[0]}"
        )


def wipe(node: str) -> bool:
    """Delete every sliver file of a node, then drop the page cache; True if it was."""
    shutil.rmtree(Path(node) / PREFIX, ignore_errors=True)
    return drop_caches()


async def sync_all(vol: Volume) -> None:
    async with trio.open_nursery() as nursery:
        for n in vol.nodes.nodes:
            nursery.start_soon(n.store.syncfs)


async def fill(vol: Volume, total: int, blob: int, seed: int) -> StaticBlobs:
    rng = np.random.default_rng(seed)
    refs = StaticBlobs()
    for _ in range(total // blob):
        r = await vol.blobs.put_blob(rng.bytes(blob), durable=False)
        refs.add(r.blob_id, r.meta)
    await sync_all(vol)
    return refs


class Workload:
    """One reader (whole random blobs) and one writer (new 4 MiB blobs, deleted again)."""

    def __init__(self, vol: Volume, refs: StaticBlobs, blob: int) -> None:
        self.vol, self.refs, self.blob = vol, refs, blob
        self.read = self.written = 0
        self._rng = random.Random(1)
        self._data = np.random.default_rng(2).bytes(blob)

    async def reader(self) -> None:
        ids = sorted(self.refs.refs)
        while True:
            b = self._rng.choice(ids)
            got = await self.vol.blobs.get_blob(b, self.refs.refs[b].meta)
            self.read += len(got)

    async def writer(self) -> None:
        k = 0
        while True:
            k += 1
            data = k.to_bytes(8, "little") + self._data[8:]
            r = await self.vol.blobs.put_blob(data, durable=False)
            self.written += len(data)
            await self.vol.blobs.delete_blob(r.blob_id, r.meta)

    async def measure(self, body: trio.Event | float) -> tuple[float, float, float]:
        """(read MB/s, write MB/s, seconds) while `body` runs (an event to wait for, or a
        number of seconds)."""
        self.read = self.written = 0
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.reader)
            nursery.start_soon(self.writer)
            if isinstance(body, trio.Event):
                await body.wait()
            else:
                await trio.sleep(body)
            nursery.cancel_scope.cancel()
        dt = time.perf_counter() - t0
        return self.read / dt / 1e6, self.written / dt / 1e6, dt


async def rebuild_auto(svc: RepairService) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    report = await svc.pass_once([WIPED])
    dt = time.perf_counter() - t0
    assert not report.unrepairable and not report.inconsistent, report.summary()
    return dt, report.bytes_read, report.bytes_rebuilt


async def rebuild_decode(vol: Volume, refs: StaticBlobs) -> tuple[float, int, int]:
    engine = RepairEngine(vol, rate=None)
    slots = trio.Semaphore(4)
    t0 = time.perf_counter()

    async def one(meta: BlobMetadata) -> None:
        try:
            out = await engine.repair(meta, [meta.pair_of_node(WIPED)], mode="decode")
            assert out.written and not out.failed
        finally:
            slots.release()

    async with trio.open_nursery() as nursery:
        for ref in refs.refs.values():
            await slots.acquire()
            nursery.start_soon(one, ref.meta)
    await engine.sync_touched()
    dt = time.perf_counter() - t0
    return dt, engine.counters.bytes_read, engine.counters.bytes_rebuilt


async def main(args: argparse.Namespace) -> None:
    base = Path(tempfile.mkdtemp(prefix="bench-repair-", dir=args.dir))
    try:
        paths = [str(base / f"node{i}") for i in range(N)]
        await create_volume(paths, blob_size=args.blob_mib * MIB)
        vol = await open_volume(paths[0], node_timeout=60.0)
        blob = args.blob_mib * MIB
        t0 = time.perf_counter()
        refs = await fill(vol, args.mib * MIB, blob, seed=1)
        print(
            f"stored {args.mib} MiB as {len(refs.refs)} blobs of {args.blob_mib} MiB "
            f"in {time.perf_counter() - t0:.1f}s"
        )
        original = await trio.to_thread.run_sync(digests, paths[WIPED])
        node_mib = sum(size for _, size in original.values()) / MIB
        print(f"node {WIPED} holds {len(original)} sliver files, {node_mib:.0f} MiB")
        rate = DEFAULT_RATE if args.rate is None else args.rate * MIB or None
        svc = RepairService(vol, refs, rate=rate)
        print(f"repair rate limit: {f'{rate / MIB:.0f} MiB/s of node I/O' if rate else 'none'}")
        load = Workload(vol, refs, blob)

        cold = await trio.to_thread.run_sync(wipe, paths[WIPED])
        dt, read, rebuilt = await rebuild_auto(svc)
        await check_rebuilt(paths[WIPED], original, "repair")
        r = read / rebuilt
        print(
            f"repair ({'cold' if cold else 'warm'} cache): {rebuilt / MIB:.0f} MiB rebuilt in "
            f"{dt:.2f}s = {rebuilt / dt / 1e6:.0f} MB/s of node data, read {read / MIB:.0f} "
            f"MiB from the other nodes, read/rebuilt {r:.3f}"
        )

        await trio.to_thread.run_sync(wipe, paths[WIPED])
        ddt, dread, drebuilt = await rebuild_decode(vol, refs)
        await check_rebuilt(paths[WIPED], original, "full decode")
        d = dread / drebuilt
        print(
            f"full decode + re-encode: {drebuilt / MIB:.0f} MiB rebuilt in {ddt:.2f}s = "
            f"{drebuilt / ddt / 1e6:.0f} MB/s, read {dread / MIB:.0f} MiB, read/rebuilt {d:.3f}"
        )

        # The same workload, from the same cold cache, during the rebuild and then idle
        # for as long.
        await trio.to_thread.run_sync(wipe, paths[WIPED])
        done = trio.Event()
        result: list[tuple[float, int, int]] = []

        async def rebuild() -> None:
            result.append(await rebuild_auto(svc))
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(rebuild)
            busy_r, busy_w, busy_t = await load.measure(done)
        await check_rebuilt(paths[WIPED], original, "repair under load")
        await trio.to_thread.run_sync(drop_caches)
        idle_r, idle_w, _ = await load.measure(max(busy_t, args.idle))
        ldt, _, lrebuilt = result[0]
        print(
            f"user I/O idle: read {idle_r:.0f} MB/s, write {idle_w:.0f} MB/s; during the "
            f"rebuild ({lrebuilt / ldt / 1e6:.0f} MB/s, {ldt:.1f}s): read {busy_r:.0f} MB/s "
            f"({100 * busy_r / idle_r:.0f}%), write {busy_w:.0f} MB/s "
            f"({100 * busy_w / idle_w:.0f}%)"
        )
        print(
            f"repair n={N}: rebuilt {rebuilt / MIB:.0f} MiB in {dt:.2f} s, "
            f"read/rebuilt {r:.3f}, full-decode read/rebuilt {d:.3f}"
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024, help="data stored (MiB)")
    ap.add_argument("--blob-mib", type=int, default=4, help="blob size (MiB)")
    ap.add_argument(
        "--rate", type=int, default=None, help="repair rate limit, MiB/s (default: the service's)"
    )
    ap.add_argument(
        "--idle", type=float, default=2.0, help="least seconds of idle user I/O measured"
    )
    ap.add_argument("--dir", default=None, help="where the node directories go (default: $TMPDIR)")
    trio.run(main, ap.parse_args())
