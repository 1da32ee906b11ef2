"""Scrub over real node directories: corruption found and repaired, orphans and their grace."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import trio

from tests.walrusfs.test_repair import NO_HANG, fill, make_volume, node_files
from tests.walrusfs.volumes import flip_byte, sliver_file, sliver_files
from walrusfs.catalog import BlobRef, StaticBlobs, list_slivers
from walrusfs.healer import RepairService
from walrusfs.scrub import Scrubber
from walrusfs.sliverfile import header_size, parse_key, sliver_key
from walrusfs.volume import Volume

N = 7


def corrupt(path: Path, how: int, rng: random.Random) -> None:
    """Damage a sliver file one of four ways: header, primary, secondary, truncation."""
    size = path.stat().st_size
    h = header_size(N)
    if how == 0:
        flip_byte(path, rng.randrange(0, h - 64))  # metadata, leaves or fixed fields
    elif how == 1:
        flip_byte(path, h + rng.randrange(0, (size - h) // 2))
    elif how == 2:
        flip_byte(path, size - 1 - rng.randrange(0, (size - h) // 4))
    else:
        with open(path, "r+b") as f:
            f.truncate(size - 64)


async def test_a_node_is_listed_one_fan_out_directory_per_call(tmp_path: Path) -> None:
    vol, paths = await make_volume(tmp_path)
    await fill(vol, 12, seed=5)
    expect = sorted(str(p.relative_to(paths[4])) for p in sliver_files(paths[4]))
    calls = vol.nodes.nodes[4].calls
    assert await list_slivers(vol.nodes, 4) == expect and len(expect) == 12
    # Bounded calls, each well inside the node deadline however many slivers a node holds.
    assert vol.nodes.nodes[4].calls - calls == 256


async def test_scrub_removes_temp_files_that_writes_left_behind(tmp_path: Path) -> None:
    vol, paths = await make_volume(tmp_path)
    refs, _ = await fill(vol, 3, seed=6)
    node = Path(paths[1])
    key_dir = next(p.parent for p in sliver_files(paths[1]))
    (node / "journal" / "e9").mkdir(parents=True)
    stale = [node / ".tmp-a", node / "journal" / "e9" / ".tmp-b", key_dir / ".tmp-c"]
    fresh = key_dir / ".tmp-d"  # a write that may still be under way
    for path in [*stale, fresh]:
        path.write_bytes(b"half a sliver")
    for path in stale:
        os.utime(path, (1e9, 1e9))
    report = await Scrubber(vol, refs, rate=None).scrub_pass()
    assert report.temps_removed == 3 and "3 stale temp files" in report.summary()
    assert fresh.exists() and not any(p.exists() for p in stale)


async def test_ten_percent_corrupt_slivers_are_all_found_and_repaired(tmp_path: Path) -> None:
    vol, paths = await make_volume(tmp_path)
    refs, _ = await fill(vol, 40, seed=21)
    node = 2
    before = {i: node_files(paths[i]) for i in range(N)}
    rng = random.Random(21)
    victims = rng.sample(sliver_files(paths[node]), 4)  # 10% of the node's 40 files
    for k, path in enumerate(victims):
        corrupt(path, k, rng)
    bad_keys = {str(p.relative_to(paths[node])) for p in victims}
    repair = RepairService(vol, refs, rate=None)
    scrubber = Scrubber(vol, refs, repair, rate=None)
    with trio.fail_after(NO_HANG):
        report = await scrubber.scrub_pass()
    found = {line.split(": ")[1] for line in report.corrupt}
    assert found == bad_keys and report.missing == 0 and report.orphans == 0
    assert report.files == 40 * N and not report.incomplete
    assert vol.nodes.nodes[node].corrupt == len(victims)
    fixed = await repair.pass_once([])  # hints only: exactly what scrub handed over
    assert fixed.pairs_written == len(victims) and not fixed.unrepairable
    assert {i: node_files(paths[i]) for i in range(N)} == before
    again = await scrubber.scrub_pass()
    assert not again.corrupt and again.files == 40 * N
    assert scrubber.status()["errors_found"] == len(victims)


async def test_scrub_and_repair_in_the_background_heal_a_damaged_node(tmp_path: Path) -> None:
    vol, paths = await make_volume(tmp_path)
    refs, _ = await fill(vol, 12, seed=22)
    before = {i: node_files(paths[i]) for i in range(N)}
    rng = random.Random(22)
    for k, path in enumerate(rng.sample(sliver_files(paths[5]), 3)):
        corrupt(path, k, rng)
    os.unlink(sliver_files(paths[6])[0])
    repair = RepairService(vol, refs, rate=None)
    scrubber = Scrubber(vol, refs, repair, rate=None)
    with trio.fail_after(NO_HANG):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: repair.run_forever(
                    first_delay=3600, poll=0.02, task_status=task_status
                )
            )
            await nursery.start(
                lambda task_status: scrubber.run_forever(first_delay=0, task_status=task_status)
            )
            while {i: node_files(paths[i]) for i in range(N)} != before:
                await repair.wait_for_pass()
            nursery.cancel_scope.cancel()
    assert scrubber.passes >= 1 and scrubber.status()["errors_found"] == 4


async def test_a_pass_asked_for_is_not_followed_at_once_by_a_scheduled_one(
    tmp_path: Path,
) -> None:
    vol, _ = await make_volume(tmp_path)
    refs, _ = await fill(vol, 4, seed=23)
    scrubber = Scrubber(vol, refs, rate=None, rest=2.0)
    with trio.fail_after(NO_HANG):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: scrubber.run_forever(first_delay=0.2, task_status=task_status)
            )
            await scrubber.scrub_pass()  # `walrusfs scrub`, before the first one was due
            await trio.sleep(0.4)  # past first_delay, inside the rest after that pass
            assert scrubber.passes == 1 and not scrubber.status()["running"]
            while scrubber.passes < 2:  # noqa: ASYNC110 - the rest over, the schedule goes on
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()


async def test_orphans_go_only_after_their_grace_and_checkpoints_stay(tmp_path: Path) -> None:
    vol, paths = await make_volume(tmp_path)
    refs, data = await fill(vol, 4, seed=23)
    rng = random.Random(23)
    orphan = await vol.blobs.put_blob(rng.randbytes(5000))  # referenced by nothing
    checkpoint = await vol.blobs.put_blob(rng.randbytes(5000))  # a previous checkpoint's
    protected = StaticBlobs(refs.refs.values(), protected=[checkpoint.blob_id])
    # A referenced blob's pair copied onto a node where it does not belong.
    b = sorted(data)[0]
    meta = refs.refs[b].meta
    wrong = (meta.node_of_pair(0) + 1) % N
    stray = Path(paths[wrong]) / sliver_key(b, 0)
    shutil.copyfile(sliver_file(paths[meta.node_of_pair(0)], b), stray)
    scrubber = Scrubber(vol, protected, rate=None, grace=3600)
    for _ in range(2):
        report = await scrubber.scrub_pass()
        assert report.orphans == N + 1 and report.orphans_removed == 0
    assert stray.exists()
    scrubber.grace = 0.0
    report = await scrubber.scrub_pass()
    assert report.orphans_removed == N + 1 and not report.corrupt and report.missing == 0
    assert not stray.exists()
    for i in range(N):
        keys = {parse_key(str(p.relative_to(paths[i])))[0] for p in sliver_files(paths[i])}  # type: ignore[index]
        assert orphan.blob_id not in keys
        assert checkpoint.blob_id in keys
        assert set(data) <= keys
    assert (await scrubber.scrub_pass()).orphans == 0


class _DeletesAfterLoad(StaticBlobs):
    """The filesystem freeing blobs right after a pass took its list: their metadata is
    gone first, then their files, as a delete does."""

    def __init__(self, vol: Volume, refs: StaticBlobs, doomed: list[bytes]) -> None:
        super().__init__(refs.refs.values())
        self.vol = vol
        self.doomed = doomed

    async def load(self) -> dict[bytes, BlobRef]:
        snapshot = await super().load()
        for blob_id in self.doomed:
            ref = self.refs.pop(blob_id)
            assert not await self.vol.blobs.delete_blob(blob_id, ref.meta)
        self.doomed = []
        return snapshot


async def test_blobs_deleted_during_a_pass_are_not_reported_missing(tmp_path: Path) -> None:
    vol, paths = await make_volume(tmp_path)
    refs, data = await fill(vol, 12, seed=24)
    doomed = sorted(data)[-4:]
    lost = sliver_files(paths[3])[0]  # really missing: its blob is still referenced
    lost_blob = parse_key(str(lost.relative_to(paths[3])))
    assert lost_blob is not None and lost_blob[0] not in doomed
    lost.unlink()
    blobs = _DeletesAfterLoad(vol, refs, doomed)
    repair = RepairService(vol, blobs, rate=None)
    scrubber = Scrubber(vol, blobs, repair, rate=None)
    with trio.fail_after(NO_HANG):
        report = await scrubber.scrub_pass()
    assert report.missing == 1 and not report.corrupt and not report.incomplete
    assert scrubber.status()["errors_found"] == 1
    assert f"{report.missing} missing" in report.summary()
    # Only the real loss went to repair, which puts it back.
    fixed = await repair.pass_once([])
    assert fixed.pairs_written == 1 and not fixed.unrepairable
    assert lost.exists()
    for i in range(N):
        held = {parse_key(str(p.relative_to(paths[i])))[0] for p in sliver_files(paths[i])}  # type: ignore[index]
        assert not held & set(doomed)


async def test_the_check_after_a_crash_skips_blobs_freed_since(tmp_path: Path) -> None:
    vol, paths = await make_volume(tmp_path)
    refs, data = await fill(vol, 3, seed=25)
    freed, kept, whole = sorted(data)
    kept_meta = refs.refs[kept].meta
    lost = Path(paths[kept_meta.node_of_pair(2)]) / sliver_key(kept, 2)
    lost.unlink()
    recovered = {b: refs.refs[b].meta.to_bytes() for b in (freed, kept, whole)}
    ref = refs.refs.pop(freed)  # deleted by a user once the mount was up
    assert not await vol.blobs.delete_blob(freed, ref.meta)
    repair = RepairService(vol, refs, rate=None)
    scrubber = Scrubber(vol, refs, repair, rate=None)
    with trio.fail_after(NO_HANG):
        found = await scrubber.check_blobs(recovered, {})
    assert [(f.blob_id, f.pair, f.kind) for f in found] == [(kept, 2, "missing")]
    assert scrubber.status()["errors_found"] == 1 and scrubber.after_crash_left == 0
    assert (await repair.pass_once([])).pairs_written == 1 and lost.exists()
