"""Repair over real node directories: wiped, corrupt, missed, lost, inconsistent blobs.

Also the helpers the scrub and fsck tests share (no test functions are imported from here).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest
import trio
import trio.testing

from codec import BlobMetadata, encode
from codec.encoder import SliverPair
from tests.walrusfs.volumes import flip_byte, node_paths, sliver_file, sliver_files, zero_range
from walrusfs.catalog import StaticBlobs
from walrusfs.healer import RepairReport, RepairService
from walrusfs.repair import RateLimit
from walrusfs.scrub import verify_file
from walrusfs.sliverfile import build, header_size, sliver_key
from walrusfs.volume import Volume, create_volume, open_volume

N = 7
OPTS = {"node_timeout": 5.0, "hedge_after": 0.3, "grace": 0.3}
NO_HANG = 60  # generous bound: a pass must end, never loop


async def make_volume(root: Path, blob_size: int = 1 << 16) -> tuple[Volume, list[str]]:
    paths = node_paths(root / "nodes", N)
    await create_volume(paths, blob_size=blob_size)
    return await open_volume(paths[0], **OPTS), paths  # type: ignore[arg-type]


async def fill(
    vol: Volume, count: int, seed: int = 1, refs: StaticBlobs | None = None
) -> tuple[StaticBlobs, dict[bytes, bytes]]:
    """`count` random blobs of 1..64 KiB, registered in a StaticBlobs."""
    rng = random.Random(seed)
    refs = refs if refs is not None else StaticBlobs()
    data: dict[bytes, bytes] = {}
    for _ in range(count):
        blob = rng.randbytes(rng.randrange(1, 1 << 16))
        r = await vol.blobs.put_blob(blob)
        assert r.missed == ()
        refs.add(r.blob_id, r.meta)
        data[r.blob_id] = blob
    return refs, data


def node_files(path: str) -> dict[str, bytes]:
    """Every sliver file of a node directory, by key."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sliver_files(path)}


def expected_file(vol: Volume, blob: bytes, node: int) -> tuple[str, bytes]:
    """The sliver file `node` should hold for `blob`, computed from the data."""
    enc = encode(vol.params, blob)
    meta = enc.metadata
    pair = meta.pair_of_node(node)
    return sliver_key(meta.blob_id, pair), b"".join(build(meta, enc.pairs[pair]))


def remove_pair(paths: list[str], meta: BlobMetadata, pair: int) -> None:
    os.unlink(Path(paths[meta.node_of_pair(pair)]) / sliver_key(meta.blob_id, pair))


async def test_a_wiped_node_is_rebuilt_byte_identical_while_in_use(tmp_path: Path) -> None:
    vol, paths = await make_volume(tmp_path)
    refs, data = await fill(vol, 30)
    wiped = 3
    before = node_files(paths[wiped])
    shutil.rmtree(Path(paths[wiped]) / "slivers")
    svc = RepairService(vol, refs, rate=None)
    done = trio.Event()
    checked = {"reads": 0, "writes": 0}
    rng = random.Random(7)

    async def reader() -> None:
        ids = sorted(data)
        while not done.is_set() or checked["reads"] < 20:
            b = rng.choice(ids)
            assert bytes(await vol.blobs.get_blob(b, refs.refs[b].meta)) == data[b]
            checked["reads"] += 1

    async def writer() -> None:
        while not done.is_set() or checked["writes"] < 5:
            blob = rng.randbytes(rng.randrange(1, 50_000))
            r = await vol.blobs.put_blob(blob)
            assert bytes(await vol.blobs.get_blob(r.blob_id, r.meta)) == blob
            checked["writes"] += 1

    with trio.fail_after(NO_HANG):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(writer)
            report = await svc.pass_once()
            done.set()
    after = node_files(paths[wiped])
    assert {k: after[k] for k in before} == before
    assert report.blobs_repaired == len(data) and report.pairs_written == len(data)
    assert not report.unrepairable and not report.inconsistent
    # Whole-node rebuild at n=7: 1 pair in 7 from stored symbols (1.0), the rest decode (15/8).
    assert 1.0 <= report.read_per_rebuilt < 15 / 8
    assert (await svc.pass_once()).pairs_written == 0


async def test_stored_symbols_read_exactly_what_they_rebuild(tmp_path: Path) -> None:
    vol, paths = await make_volume(tmp_path)
    refs, data = await fill(vol, 1, seed=3)
    (blob_id,) = data
    meta = refs.refs[blob_id].meta
    p, s = vol.params, meta.symbol_size
    svc = RepairService(vol, refs, rate=None)
    eng = svc.engine
    for pair in range(N):
        for mode in ("auto", "decode"):
            node = meta.node_of_pair(pair)
            original = sliver_file(paths[node], blob_id).read_bytes()
            remove_pair(paths, meta, pair)
            read0, rebuilt0 = eng.counters.bytes_read, eng.counters.bytes_rebuilt
            out = await eng.repair(meta, [pair], mode=mode)
            assert out.written == {pair} and not out.failed
            assert sliver_file(paths[node], blob_id).read_bytes() == original
            read = eng.counters.bytes_read - read0
            assert eng.counters.bytes_rebuilt - rebuilt0 == (p.R + p.C) * s
            if mode == "auto" and p.f <= pair < p.R:
                assert read == (p.R + p.C) * s  # one symbol per source sliver: 1.0
            else:
                assert read == p.R * p.C * s  # R primary slivers: the whole blob


async def test_a_corrupt_source_symbol_is_found_and_repaired_too(tmp_path: Path) -> None:
    vol, paths = await make_volume(tmp_path)
    refs, data = await fill(vol, 1, seed=4)
    (blob_id,) = data
    meta = refs.refs[blob_id].meta
    p, s = vol.params, meta.symbol_size
    target = p.f  # rebuilt from stored symbols
    before = {i: node_files(paths[i]) for i in range(N)}
    remove_pair(paths, meta, target)
    # Corrupt the very symbol pair q contributes: symbol `target` of secondary n-1-q.
    q = next(x for x in range(N) if x != target)
    victim = sliver_file(paths[meta.node_of_pair(q)], blob_id)
    flip_byte(victim, header_size(N) + p.C * s + target * s + 5)
    svc = RepairService(vol, refs, rate=None)
    report = await svc.pass_once([])  # hints only: none; so name the missing pair
    assert report.pairs_written == 0
    svc.note_bad(blob_id, target, "test")
    report = await svc.pass_once([])
    assert report.blobs_repaired == 1 and report.pairs_written == 2
    assert {i: node_files(paths[i]) for i in range(N)} == before
    assert vol.nodes.nodes[meta.node_of_pair(q)].corrupt >= 1


async def one_blob(root: Path, seed: int) -> tuple[Volume, list[str], StaticBlobs, BlobMetadata]:
    vol, paths = await make_volume(root)
    refs, data = await fill(vol, 1, seed=seed)
    (blob_id,) = data
    return vol, paths, refs, refs.refs[blob_id].meta


async def repair_every_pair(vol: Volume, refs: StaticBlobs, meta: BlobMetadata) -> RepairReport:
    """A repair pass told that every pair of the blob is corrupt, as a scrub would."""
    svc = RepairService(vol, refs, rate=None)
    for pair in range(N):
        svc.note_bad(meta.blob_id, pair, "corrupt (test)")
    with trio.fail_after(NO_HANG):
        return await svc.pass_once([])


@pytest.mark.parametrize("torn", ["secondary", "primary"])
async def test_files_torn_on_every_node_are_rebuilt_from_the_slivers_they_kept(
    tmp_path: Path, torn: str
) -> None:
    # A power loss can keep every sliver file of a blob at its size with some pages never
    # written: no pair verifies whole, yet R primaries (or C secondaries) still do.
    vol, paths, refs, meta = await one_blob(tmp_path, seed=5)
    p, s, h = vol.params, meta.symbol_size, header_size(N)
    before = {i: node_files(paths[i]) for i in range(N)}
    start = h + p.C * s if torn == "secondary" else h + (p.C - 1) * s
    for i in range(N):
        zero_range(sliver_file(paths[i], meta.blob_id), start, start + s)
    report = await repair_every_pair(vol, refs, meta)
    assert report.blobs_repaired == 1 and report.pairs_written == N, report.summary()
    assert not report.lost and not report.unrepairable
    assert {i: node_files(paths[i]) for i in range(N)} == before


async def test_torn_files_keeping_too_few_whole_slivers_are_lost(tmp_path: Path) -> None:
    vol, paths, refs, meta = await one_blob(tmp_path, seed=6)
    p, s, h = vol.params, meta.symbol_size, header_size(N)
    # R-1 whole primaries and C-1 whole secondaries are left: neither decodes.
    for pair in range(N):
        f = sliver_file(paths[meta.node_of_pair(pair)], meta.blob_id)
        if pair >= p.R - 1:
            zero_range(f, h, h + s)
        if pair < N - (p.C - 1):
            zero_range(f, h + p.C * s, h + (p.C + 1) * s)
    report = await repair_every_pair(vol, refs, meta)
    key = meta.blob_id.hex()
    assert report.lost == [key] and report.pairs_written == 0
    assert f"no {p.R} primary or {p.C} secondary slivers verify" in report.unrepairable[key]


async def test_a_node_down_during_writes_gets_its_pairs_when_back(tmp_path: Path) -> None:
    vol, paths = await make_volume(tmp_path)
    refs, _ = await fill(vol, 3, seed=5)
    down = 5
    os.rename(paths[down], paths[down] + ".away")
    await vol.nodes.probe(down)
    assert vol.nodes.state(down).value == "down"
    missed: dict[bytes, tuple[int, ...]] = {}
    rng = random.Random(5)
    blobs = {}
    for _ in range(8):
        blob = rng.randbytes(rng.randrange(1, 60_000))
        r = await vol.blobs.put_blob(blob)
        assert r.missed == (down,)
        missed[r.blob_id] = r.missed
        refs.add(r.blob_id, r.meta)
        blobs[r.blob_id] = blob
    svc = RepairService(vol, refs, missed=missed, rate=None)
    with trio.fail_after(NO_HANG):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: svc.run_forever(
                    first_delay=3600, poll=0.02, task_status=task_status
                )
            )
            await trio.sleep(0.2)
            assert svc.passes == 0  # nothing to do while the node is down: no busy loop
            os.rename(paths[down] + ".away", paths[down])
            await vol.nodes.probe(down)
            while missed:
                await svc.wait_for_pass()
            nursery.cancel_scope.cancel()
    have = node_files(paths[down])
    for blob in blobs.values():
        key, raw = expected_file(vol, blob, down)
        assert have[key] == raw
    assert svc.last_report is not None and not svc.last_report.unrepairable


async def test_a_cancelled_pass_is_resumed_by_the_next(tmp_path: Path) -> None:
    vol, paths = await make_volume(tmp_path)
    refs, _ = await fill(vol, 24, seed=6)
    wiped = 1
    before = node_files(paths[wiped])
    shutil.rmtree(Path(paths[wiped]) / "slivers")
    svc = RepairService(vol, refs, rate=1 << 20, parallel=1)
    three = trio.Event()
    mid: list[dict[str, object]] = []

    def written(blob_id: bytes, pair: int) -> None:
        if svc.engine.counters.pairs_written >= 3 and not three.is_set():
            mid.append(svc.status())
            three.set()

    svc.engine.on_write = written
    with trio.fail_after(NO_HANG):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(svc.pass_once)
            await three.wait()
            nursery.cancel_scope.cancel()
    assert svc.last_report is not None and svc.last_report.cancelled
    (status,) = mid  # progress as `walrusfs status` shows it, mid-pass
    assert status["running"] is True and status["queue"] == 24 - 2  # this one still counts
    assert isinstance(status["eta_s"], float) and status["eta_s"] > 0
    assert isinstance(status["rate"], int) and status["rate"] > 0
    partial = len(node_files(paths[wiped]))
    assert 3 <= partial < len(before)
    svc.rate_limit = None
    report = await svc.pass_once()
    assert report.pairs_written == len(before) - partial and not report.unrepairable
    assert node_files(paths[wiped]) == before


async def test_lost_blobs_are_listed_and_the_pass_ends(tmp_path: Path) -> None:
    vol, paths = await make_volume(tmp_path)
    refs, data = await fill(vol, 3, seed=8)
    x, y, z = sorted(data)
    metas = {b: refs.refs[b].meta for b in data}
    before = {i: node_files(paths[i]) for i in range(N)}
    p = vol.params
    for pair in range(2 * p.f + 1):  # R-1 pairs left: not decodable
        remove_pair(paths, metas[x], pair)
    for pair in (0, 3, 6):  # f+1 > f pairs gone: still R good primaries, so repairable
        remove_pair(paths, metas[y], pair)
    remove_pair(paths, metas[z], 4)
    svc = RepairService(vol, refs, rate=None)
    for _ in range(2):
        with trio.fail_after(NO_HANG):
            report = await svc.pass_once()
        assert list(report.unrepairable) == [x.hex()] and report.lost == [x.hex()]
        assert "needed to decode" in report.unrepairable[x.hex()]
    after = {i: node_files(paths[i]) for i in range(N)}
    for i in range(N):
        for key, raw in before[i].items():
            if key.startswith(f"slivers/{x.hex()[:2]}/{x.hex()[2:4]}/{x.hex()}"):
                continue
            assert after[i][key] == raw
    assert sum(1 for i in range(N) for k in after[i] if x.hex() in k) == p.R - 1
    assert report.pairs_written == 0  # the second pass had nothing it could do


async def test_more_than_f_nodes_down_defers_without_looping(tmp_path: Path) -> None:
    vol, paths = await make_volume(tmp_path)
    refs, data = await fill(vol, 12, seed=9)
    before = {i: node_files(paths[i]) for i in range(N)}
    gone = [0, 2, 4]  # f+1 nodes down
    for i in gone:
        os.rename(paths[i], paths[i] + ".away")
        await vol.nodes.probe(i)
    shutil.rmtree(Path(paths[6]) / "slivers")  # and one more node wiped
    svc = RepairService(vol, refs, rate=None)
    with trio.fail_after(NO_HANG):
        report = await svc.pass_once()
    # Three pairs readable = R: node 6 is rebuilt by decoding; down nodes must wait.
    assert node_files(paths[6]) == before[6]
    assert report.pairs_written == len(data) and not report.lost
    assert all("is down" in why for why in report.unrepairable.values())
    for i in gone:
        os.rename(paths[i] + ".away", paths[i])
        await vol.nodes.probe(i)
    report = await svc.pass_once()
    assert not report.unrepairable and report.pairs_written == 0
    assert {i: node_files(paths[i]) for i in range(N)} == before


async def _plant(vol: Volume, meta: BlobMetadata, pairs: list[SliverPair]) -> None:
    for pair in pairs:
        raw = b"".join(build(meta, pair))
        node = meta.node_of_pair(pair.pair)
        await vol.nodes.nodes[node].store.put(sliver_key(meta.blob_id, pair.pair), raw)


async def test_an_inconsistently_encoded_blob_is_reported_and_nothing_written(
    tmp_path: Path,
) -> None:
    vol, paths = await make_volume(tmp_path)
    p = vol.params
    rng = random.Random(10)
    refs = StaticBlobs()
    crafted = []
    for lost_pair in (p.f, 0):  # one rebuilt from symbols, one by decoding
        a = rng.randbytes(60_000)
        s = p.symbol_size(len(a))
        b = bytearray(a)
        b[2 * p.C * s + 3] ^= 0xFF  # row 2, column 0 differs
        enc_a, enc_b = encode(p, a), encode(p, bytes(b))
        # Rows committed from one blob, columns from another: every sliver verifies alone.
        meta = BlobMetadata(p, len(a), enc_a.metadata.primary_roots, enc_b.metadata.secondary_roots)
        pairs = [SliverPair(q, enc_a.pairs[q].primary, enc_b.pairs[q].secondary) for q in range(N)]
        await _plant(vol, meta, pairs)
        for q in range(N):
            raw = sliver_file(paths[meta.node_of_pair(q)], meta.blob_id).read_bytes()
            verify_file(meta, q, raw, "crafted")
        refs.add(meta.blob_id, meta)
        remove_pair(paths, meta, lost_pair)
        crafted.append((meta, lost_pair))
    svc = RepairService(vol, refs, rate=None)
    with trio.fail_after(NO_HANG):
        report = await svc.pass_once()
    assert sorted(report.inconsistent) == sorted(m.blob_id.hex() for m, _ in crafted)
    assert report.pairs_written == 0 and report.blobs_repaired == 0
    for meta, lost_pair in crafted:
        node = meta.node_of_pair(lost_pair)
        assert not (Path(paths[node]) / sliver_key(meta.blob_id, lost_pair)).exists()


async def test_blobs_closest_to_loss_are_repaired_first(tmp_path: Path) -> None:
    vol, paths = await make_volume(tmp_path)
    refs, data = await fill(vol, 6, seed=12)
    lost_pairs = dict(zip(sorted(data), (1, 4, 2, 3, 1, 2), strict=True))
    for b, k in lost_pairs.items():
        for pair in range(k):
            remove_pair(paths, refs.refs[b].meta, pair)
    svc = RepairService(vol, refs, rate=None, parallel=1)
    order: list[bytes] = []
    svc.engine.on_write = lambda b, p: order.append(b)
    report = await svc.pass_once()
    assert report.blobs_repaired == 6 and report.pairs_written == sum(lost_pairs.values())
    repaired = list(dict.fromkeys(order))
    assert [lost_pairs[b] for b in repaired] == sorted(lost_pairs.values(), reverse=True)


async def test_the_rate_limit_paces_node_io(autojump_clock: trio.testing.MockClock) -> None:
    limit = RateLimit(1000.0)
    t0 = trio.current_time()
    for _ in range(10):
        await limit.take(500)
    assert trio.current_time() - t0 == pytest.approx(4.5)  # virtual time: 500 B at 1000 B/s
    limit.rate = None
    t1 = trio.current_time()
    await limit.take(1 << 30)
    assert trio.current_time() == t1


async def test_a_triggered_pass_runs_now_and_shows_in_status(tmp_path: Path) -> None:
    vol, paths = await make_volume(tmp_path)
    refs, _ = await fill(vol, 8, seed=13)
    before = node_files(paths[0])
    shutil.rmtree(Path(paths[0]) / "slivers")
    svc = RepairService(vol, refs, rate=None)
    assert svc.status()["last_pass"] is None
    with trio.fail_after(NO_HANG):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: svc.run_forever(first_delay=3600, task_status=task_status)
            )
            svc.trigger()
            report = await svc.wait_for_pass()
            nursery.cancel_scope.cancel()
    assert report.pairs_written == 8 and node_files(paths[0]) == before
    status = svc.status()
    assert status["running"] is False and status["queue"] == 0 and status["passes"] == 1
    assert status["bytes_rebuilt"] == report.bytes_rebuilt > 0
    last = status["last_pass"]
    assert isinstance(last, dict) and last["blobs_repaired"] == 8


async def test_a_corrupt_sliver_under_a_decode_is_found_and_repaired_too(tmp_path: Path) -> None:
    vol, paths = await make_volume(tmp_path)
    refs, data = await fill(vol, 1, seed=14)
    (blob_id,) = data
    meta = refs.refs[blob_id].meta
    p, s = vol.params, meta.symbol_size
    before = {i: node_files(paths[i]) for i in range(N)}
    for symbol_check, where in ((False, 3 * s + 1), (True, p.C * s - 1)):
        remove_pair(paths, meta, 0)  # holds parity secondary n-1: rebuilt by decoding
        # Primary 1 is one of the systematic rows the decode reads first.
        flip_byte(sliver_file(paths[meta.node_of_pair(1)], blob_id), header_size(N) + where)
        svc = RepairService(vol, refs, rate=None, symbol_check=symbol_check)
        out = await svc.engine.repair(meta, [0])
        assert out.written == {0, 1} and out.found_bad == {1} and not out.failed
        assert {i: node_files(paths[i]) for i in range(N)} == before


async def test_checking_every_symbol_first_costs_one_header_per_source(tmp_path: Path) -> None:
    vol, paths = await make_volume(tmp_path)
    refs, data = await fill(vol, 1, seed=15)
    (blob_id,) = data
    meta = refs.refs[blob_id].meta
    p, s = vol.params, meta.symbol_size
    original = sliver_file(paths[meta.node_of_pair(p.f)], blob_id).read_bytes()
    remove_pair(paths, meta, p.f)
    svc = RepairService(vol, refs, rate=None, symbol_check=True)
    out = await svc.engine.repair(meta, [p.f])
    assert out.written == {p.f}
    assert sliver_file(paths[meta.node_of_pair(p.f)], blob_id).read_bytes() == original
    assert svc.engine.counters.bytes_read == (p.R + p.C) * (s + header_size(N))
