#!/usr/bin/env python3
"""Benchmark the blob store (n=7) against one plain file on the same disk, in one run.

64 MiB in 4 MiB blobs are put and read back:
- with node directories on the local disk: put (durable, as walrusfs's fsync() requires:
  on stable storage when the put returns), cold get (page cache dropped where permitted),
  degraded cold get with f nodes down, and get with f nodes hung (a FIFO in place of each
  sliver file blocks open() in the kernel, as a hung NFS mount does);
- with node directories on tmpfs: put.
A reference reads the bytes a healthy get reads (R primary slivers a blob) as plain
unverified byte ranges, cold, as many at once: what the disk gives any reader of one file
per sliver pair, against one sequential file.
The baseline is the same 64 MiB written (then fsynced) and read cold as one plain file in
the same directory tree. Free memory is touched once first (scripts/benchlib.py). The machine is shared and noisy (a plain write of 64 MiB swings
from 300 to 1300 MB/s between runs here), so the whole round, baseline included, runs
--runs times on fresh directories and every figure is the median. Last line:
`blobstore n=7: put X MB/s, get Y MB/s, degraded get Z MB/s, plain write P MB/s, plain read Q MB/s, tmpfs put T MB/s`
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import trio
from benchlib import drop_caches, warm_memory

from walrusfs.blobstore import PutResult
from walrusfs.sliverfile import header_size, parse_key, sliver_key
from walrusfs.volume import Volume, create_volume, open_volume

MIB = 1 << 20


def plain(base: Path, data: list[bytes]) -> tuple[float, float]:
    path = base / "plain.bin"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for chunk in data:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    write = time.perf_counter() - t0
    drop_caches()
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(4 * MIB):
            pass
    read = time.perf_counter() - t0
    path.unlink()
    total = sum(map(len, data))
    return total / write / 1e6, total / read / 1e6


async def put_all(vol: Volume, data: list[bytes], durable: bool) -> tuple[float, list[PutResult]]:
    results: list[PutResult | None] = [None] * len(data)
    t0 = trio.current_time()

    async def one(i: int) -> None:
        results[i] = await vol.blobs.put_blob(data[i], durable=durable)

    async with trio.open_nursery() as nursery:
        # As many blobs in flight as the store admits; it bounds memory itself.
        for i in range(len(data)):
            nursery.start_soon(one, i)
    elapsed = trio.current_time() - t0
    return sum(map(len, data)) / elapsed / 1e6, [r for r in results if r is not None]


READERS = 8  # blobs in flight, as the filesystem's read-ahead keeps them


async def get_all(vol: Volume, results: list[PutResult], data: list[bytes]) -> float:
    t0 = trio.current_time()
    sem = trio.Semaphore(READERS)
    got: list[memoryview | None] = [None] * len(results)

    async def one(i: int) -> None:
        async with sem:
            got[i] = await vol.blobs.get_blob(results[i].blob_id, results[i].meta)

    async with trio.open_nursery() as nursery:
        for i in range(len(results)):
            nursery.start_soon(one, i)
    elapsed = trio.current_time() - t0
    # Checked outside the timing, as bytes: memoryview == bytes compares item by item.
    bad = [i for i, g in enumerate(got) if g is None or g.tobytes() != data[i]]
    if bad:
        raise SystemExit(f"blobs {bad} read back WRONG")
    return sum(map(len, data)) / elapsed / 1e6


def raw_sliver_reads(vol: Volume, paths: list[str], results: list[PutResult]) -> float:
    """MB/s of blob data when the bytes get_blob reads (the R primary slivers of each blob,
    header included) are read cold as plain byte ranges, as many at once as get_all has,
    and not verified: what this disk gives any reader of this layout."""
    jobs = []
    total = 0
    for res in results:
        meta = vol.blobs.metadata(res.blob_id, res.meta)
        total += meta.length
        size = header_size(meta.n) + meta.params.C * meta.symbol_size
        for pair in range(meta.params.R):
            jobs.append(
                (os.path.join(paths[meta.node_of_pair(pair)], sliver_key(res.blob_id, pair)), size)
            )

    def read(job: tuple[str, int]) -> None:
        path, size = job
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # as the store does: no read-ahead
            if os.preadv(fd, [bytearray(size)], 0) != size:
                raise SystemExit(f"{path}: short")
        finally:
            os.close(fd)

    drop_caches()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(READERS * len(jobs) // len(results)) as pool:
        list(pool.map(read, jobs))
    return total / (time.perf_counter() - t0) / 1e6


def hang_node(path: str) -> list[Path]:
    """Replace every sliver file of a node with a FIFO; returns them to unblock later."""
    fifos = []
    for p in Path(path).rglob("*"):
        if p.is_file() and parse_key(str(p.relative_to(path))):
            p.unlink()
            os.mkfifo(p)
            fifos.append(p)
    return fifos


def unhang(fifos: list[Path]) -> None:
    for p in fifos:
        try:
            os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # no reader left waiting on this one


async def run(base: Path, total: int, blob: int) -> dict[str, float]:
    rng = np.random.default_rng(7)
    data = [rng.integers(0, 256, blob, dtype=np.uint8).tobytes() for _ in range(total // blob)]
    res: dict[str, float] = {}
    res["plain_write"], res["plain_read"] = await trio.to_thread.run_sync(plain, base, data)
    paths = [str(base / "disk" / f"node{i}") for i in range(7)]
    await create_volume(paths, blob_size=blob)
    vol = await open_volume(paths[0], node_timeout=10.0, hedge_after=0.3)
    res["put"], results = await put_all(vol, data, durable=True)
    res["put_nosync"], _ = await put_all(vol, data, durable=False)
    await trio.to_thread.run_sync(drop_caches)
    res["get"] = await get_all(await open_volume(paths[0]), results, data)
    res["raw_slivers"] = await trio.to_thread.run_sync(raw_sliver_reads, vol, paths, results)
    meta = vol.blobs.metadata(results[0].blob_id, results[0].meta)
    # The worst case: the two nodes holding systematic slivers of the first blob.
    victims = [meta.node_of_pair(0), meta.node_of_pair(1)]
    survivor = paths[next(i for i in range(7) if i not in victims)]
    for i in victims:
        os.rename(paths[i], paths[i] + ".away")
    await trio.to_thread.run_sync(drop_caches)
    res["degraded_get"] = await get_all(
        await open_volume(survivor, node_timeout=10.0), results, data
    )
    for i in victims:
        os.rename(paths[i] + ".away", paths[i])
    fifos = [f for i in victims for f in hang_node(paths[i])]
    try:
        hung = await open_volume(survivor, node_timeout=10.0, hedge_after=0.3)
        res["hung_get"] = await get_all(hung, results, data)
    finally:
        unhang(fifos)
    tmp = base / "tmpfs"
    tmp.mkdir()
    # Room for the node bytes (56/15 of the data at n=7) and the volume's own files.
    size = total * 4 + (256 << 20)
    mounted = await trio.run_process(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(tmp)],
        check=False,
        capture_stderr=True,
    )
    if mounted.returncode == 0:
        try:
            tpaths = [str(tmp / f"node{i}") for i in range(7)]
            await create_volume(tpaths, blob_size=blob)
            tvol = await open_volume(tpaths[0])
            res["tmpfs_put"], _ = await put_all(tvol, data, durable=True)
        finally:
            await trio.run_process(["umount", "-l", str(tmp)], check=False)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dir",
        default=None,
        help="where to put the node directories (default: a temp dir on the disk)",
    )
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3, help="rounds; figures are medians")
    args = parser.parse_args()
    warmed = warm_memory()
    rounds: list[dict[str, float]] = []
    for _ in range(args.runs):
        base = Path(tempfile.mkdtemp(prefix="walrusfs-bench-", dir=args.dir or "/var/tmp"))
        try:
            rounds.append(trio.run(run, base, args.mib * MIB, 4 * MIB))
        finally:
            shutil.rmtree(base, ignore_errors=True)
    r = {k: statistics.median(rd[k] for rd in rounds if k in rd) for k in rounds[0]}
    cold = "cold" if drop_caches() else "warm (page cache could not be dropped)"
    print(
        f"{args.mib} MiB in 4 MiB blobs, n=7, reads {cold}, {warmed / 2**30:.0f} GiB of memory "
        f"touched first (see benchlib); MB/s, median of {args.runs} rounds"
    )
    for k, v in r.items():
        each = " ".join(f"{rd[k]:.0f}" for rd in rounds if k in rd)
        print(f"  {k:14s} {v:8.0f}   ({each})")
    p, q = r["plain_write"], r["plain_read"]
    print(
        f"  ratios: put/plain write {r['put'] / p:.2f} (target >= 0.2), get/plain read {r['get'] / q:.2f} "
        f"(>= 0.67), degraded {r['degraded_get'] / q:.2f} (>= 0.5), hung {r['hung_get'] / q:.2f}"
    )
    print(
        f"  the same sliver bytes read raw (no verification): {r['raw_slivers'] / q:.2f} of the plain "
        f"read; get reaches {r['get'] / r['raw_slivers']:.2f} of them"
    )
    print(
        f"blobstore n=7: put {r['put']:.0f} MB/s, get {r['get']:.0f} MB/s, degraded get {r['degraded_get']:.0f} MB/s, "
        f"plain write {p:.0f} MB/s, plain read {q:.0f} MB/s, tmpfs put {r.get('tmpfs_put', float('nan')):.0f} MB/s"
    )


if __name__ == "__main__":
    main()
