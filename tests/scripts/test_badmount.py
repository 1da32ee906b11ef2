"""badmount.py: one node of a volume lives on a misbehaving FUSE mount, changed while it runs.

The badmount server is its own process (started with --daemon, as a user would), so the
test process never serves FUSE requests and may block on the mount in worker threads.
Every test ends with `set --ok` (so no thread stays stuck) and a clean `unmount`.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from backends import files, local
from tests.scripts.util import (
    BOUND,
    assert_all_readable,
    blob_data,
    eventually,
    is_mounted,
    make_volume,
    node_paths,
    open_vol,
    process_gone,
    put_all,
    puts_touching,
    script,
    sliver_files,
    state_of,
)
from walrusfs.blobstore import PutResult
from walrusfs.metastore import format_metadata
from walrusfs.volume import Volume, identity_of

K = 3  # the node on the badmount


@dataclass
class BadVolume:
    paths: list[Path]
    backing: Path

    @property
    def mountpoint(self) -> Path:
        return self.paths[K]

    async def set(self, *flags: str) -> dict[str, Any]:
        return (await script("badmount.py", "set", self.mountpoint, *flags, "--json")).json()

    async def status(self) -> dict[str, Any]:
        return (await script("badmount.py", "status", self.mountpoint, "--json")).json()

    async def something_hung(self) -> bool:
        return bool((await self.status())["stats"]["hung_now"])

    async def nothing_hung(self) -> bool:
        return not await self.something_hung()


@pytest.fixture
async def bad(tmp_path: Path, root_only: None) -> AsyncIterator[BadVolume]:
    paths = node_paths(tmp_path / "vol")
    backing = tmp_path / "backing"
    backing.mkdir()
    paths[K].mkdir(parents=True)
    ran = await script("badmount.py", "mount", backing, paths[K], "--daemon", "--json")
    assert ran.json()["ok"] and is_mounted(paths[K])
    await make_volume(paths)
    try:
        yield BadVolume(paths, backing)
    finally:
        # Release anything still hung before unmounting, so no worker thread stays stuck.
        if is_mounted(paths[K]):
            reply = await script("badmount.py", "set", paths[K], "--ok", "--json", ok=False)
            await script("badmount.py", "unmount", paths[K])
            assert reply.json()["stats"]["internal_errors"] == 0
        assert not is_mounted(paths[K])


async def puts_touching_k(vol: Volume, count: int) -> tuple[list[PutResult], list[bytes]]:
    return await puts_touching(vol, K, count)


async def test_passthrough_holds_a_node(bad: BadVolume) -> None:
    vol = await open_vol(bad.paths)
    assert vol.identity.mounts[K] == str(bad.mountpoint)  # known to be a mount
    datas = blob_data(3)
    puts = await put_all(vol, datas)
    assert all(r.missed == () for r in puts)
    # The slivers went through FUSE into the source directory.
    assert len(sliver_files(bad.backing)) == 3
    assert (bad.backing / "walrusfs-node.json").exists()
    listed = await script("faults.py", "list", bad.mountpoint, "--json")
    assert len(listed.json()["files"]) == 3
    await vol.nodes.probe_all()
    assert state_of(vol, K) == "up"
    await assert_all_readable(await open_vol(bad.paths), puts, datas)
    status = await bad.status()
    assert status["describe"] == "ok" and status["stats"]["requests"] > 0


async def test_latency_and_throughput_slow_but_correct(bad: BadVolume) -> None:
    vol = await open_vol(bad.paths)
    puts, datas = await puts_touching_k(vol, 2)
    reply = await bad.set("--latency", "150", "--throughput", "2048")
    assert reply["behaviour"]["latency_ms"] == 150
    before = (await bad.status())["stats"]["by_op"].get("read", 0)
    fresh = await open_vol(bad.paths, hedge_after=5.0)  # patient: wait for the slow node
    await assert_all_readable(fresh, puts, datas)
    after = (await bad.status())["stats"]["by_op"]["read"]
    assert after > before  # the slow node did serve the reads
    # A put does not wait long for a slow node (it may be left for repair), and never fails.
    late = await fresh.blobs.put_blob(b"slow but stored" * 100)
    assert set(late.missed) <= {K}
    assert bytes(await fresh.blobs.get_blob(late.blob_id, late.meta)) == b"slow but stored" * 100
    assert state_of(fresh, K) in ("up", "suspect")  # slow is not dead
    assert (await bad.set("--ok"))["describe"] == "ok"


async def test_eio_takes_the_node_down(bad: BadVolume) -> None:
    vol = await open_vol(bad.paths, node_timeout=5.0)
    puts, datas = await puts_touching_k(vol, 2)
    await bad.set("--eio", "1.0", "--seed", "9")
    late = await vol.blobs.put_blob(b"put while the node fails" * 100)
    assert K in late.missed
    await vol.nodes.probe_all()
    assert state_of(vol, K) == "down"
    await assert_all_readable(await open_vol(bad.paths, node_timeout=5.0), puts, datas)
    assert (await bad.status())["stats"]["eio_injected"] > 0

    await bad.set("--ok")
    await vol.nodes.probe_all()
    assert state_of(vol, K) == "up"
    assert (await vol.blobs.put_blob(b"healthy again" * 100)).missed == ()


async def test_enospc_makes_the_node_full(bad: BadVolume) -> None:
    vol = await open_vol(bad.paths, node_timeout=5.0)
    puts, datas = await puts_touching_k(vol, 1)
    await bad.set("--enospc")
    late = await vol.blobs.put_blob(b"no room on K" * 100)
    assert K in late.missed
    assert state_of(vol, K) == "full"
    await vol.nodes.probe_all()
    assert state_of(vol, K) == "full"
    await assert_all_readable(vol, puts, datas)  # a full node still serves reads
    assert (await bad.status())["stats"]["enospc_injected"] > 0
    df = await trio.run_process(["df", "--output=avail", str(bad.mountpoint)], capture_stdout=True)
    assert df.stdout.split()[-1] == b"0"  # statfs agrees with the ENOSPC writes get


async def test_full_node_comes_back_once_space_returns(bad: BadVolume) -> None:
    vol = await open_vol(bad.paths, node_timeout=5.0)
    await bad.set("--enospc")
    assert K in (await vol.blobs.put_blob(b"no room on K" * 100)).missed
    assert state_of(vol, K) == "full"
    await bad.set("--ok")
    await vol.nodes.probe_all()
    assert state_of(vol, K) == "up"


async def test_hang_is_routed_around_then_released(bad: BadVolume) -> None:
    vol = await open_vol(bad.paths, node_timeout=2.0, hedge_after=0.3)
    puts, datas = await puts_touching_k(vol, 2)
    await bad.set("--hang")

    start = trio.current_time()
    await assert_all_readable(vol, puts, datas)
    assert trio.current_time() - start < BOUND
    status = await bad.status()  # the control path answers while requests hang
    assert status["stats"]["hung_now"] >= 1
    late = await vol.blobs.put_blob(b"put past a hung node" * 100)
    assert K in late.missed

    await bad.set("--ok")
    await eventually(bad.nothing_hung)  # every hung request completes once released
    await vol.nodes.probe_all()
    assert state_of(vol, K) == "up"
    await script("badmount.py", "unmount", bad.mountpoint)
    assert not is_mounted(bad.mountpoint)


async def test_the_mount_names_its_state_directory_without_calling_a_hung_node(
    bad: BadVolume,
) -> None:
    # `walrusfs mount` reads one identity file for the volume id before the server opens
    # the volume: reading all of them cost a second wait on a hung node.
    await bad.set("--hang")
    with trio.fail_after(BOUND):
        ident = await identity_of(str(bad.paths[0]), node_timeout=2.0)
    assert ident.index == 0 and len(ident.nodes) == len(bad.paths)
    assert await bad.nothing_hung()
    await bad.set("--ok")


async def test_opening_for_a_mount_goes_on_without_a_node_that_does_not_answer(
    bad: BadVolume,
) -> None:
    await bad.set("--hang")
    # The node timeout is ten minutes: only the grace can end the wait.
    with trio.fail_after(BOUND):
        vol = await open_vol(bad.paths, node_timeout=600.0, straggler_grace=0.5)
    assert state_of(vol, K) == "down" and "did not answer" in vol.nodes.nodes[K].reason
    assert all(state_of(vol, i) == "up" for i in range(len(bad.paths)) if i != K)
    data = b"stored without K" * 100
    put = await vol.blobs.put_blob(data)
    assert set(put.missed) == {K}
    assert bytes(await vol.blobs.get_blob(put.blob_id, put.meta)) == data
    await bad.set("--ok")
    await eventually(bad.nothing_hung)
    await vol.nodes.probe(K)
    assert state_of(vol, K) == "up"  # a straggler is down only until it answers


async def test_a_hung_node_holds_up_no_news_of_the_others(bad: BadVolume) -> None:
    vol = await open_vol(bad.paths, node_timeout=600.0)
    await bad.set("--hang")  # K's probes now wait ten minutes
    away = bad.paths[1].with_name("n1.away")

    def state_is(i: int, state: str) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return state_of(vol, i) == state

        return check

    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(vol.nodes.probe_forever, interval=0.2, soon=0.05))
        await eventually(bad.something_hung)
        os.rename(bad.paths[1], away)
        await eventually(state_is(1, "down"))
        os.rename(away, bad.paths[1])
        await eventually(state_is(1, "up"))
        assert await bad.something_hung()  # K's probe was still waiting all along
        nursery.cancel_scope.cancel()
    await bad.set("--ok")


async def test_walrusfs_mounts_beside_a_hung_node_without_waiting_out_its_timeout(
    bad: BadVolume, tmp_path: Path
) -> None:
    await format_metadata(await open_vol(bad.paths), str(tmp_path / "mkfs"), uid=0, gid=0)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli = [sys.executable, "-m", "walrusfs.cli"]
    state = tmp_path / "state"
    await bad.set("--hang")
    try:
        with trio.fail_after(2 * BOUND):  # the node timeout is ten minutes
            done = await trio.run_process(
                [*cli, "mount", "--node-timeout", "600", "--state-dir", state, bad.paths[0], mnt],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        said = (done.stdout + done.stderr).decode()
        assert done.returncode == 0, said
        assert f"node {K} " in said and "did not answer" in said
        data = os.urandom(300_000)
        await trio.to_thread.run_sync((mnt / "f").write_bytes, data)
        assert await trio.to_thread.run_sync((mnt / "f").read_bytes) == data
    finally:
        await bad.set("--ok")
        await trio.run_process([*cli, "umount", mnt], check=False, capture_stdout=True)
    assert not is_mounted(mnt)


async def test_a_hung_read_released_late_cannot_change_a_blob_already_returned(
    bad: BadVolume,
) -> None:
    """get_blob reads healthy slivers straight into the blob's buffer; a read it gave up
    on may still land there later, so that buffer must not be the one returned."""
    vol = await open_vol(bad.paths, node_timeout=5.0, hedge_after=0.3)
    puts, datas = await puts_touching_k(vol, 1)
    fresh = await open_vol(bad.paths, node_timeout=5.0, hedge_after=0.3)
    await bad.set("--hang", "--ops", "read")
    got = await fresh.blobs.get_blob(puts[0].blob_id, puts[0].meta)
    assert bytes(got) == datas[0]
    assert await bad.something_hung()  # K's read was tried, and given up on

    # What the hung read will now deliver: other bytes, in the files it already opened.
    def scramble() -> None:
        for f in sliver_files(bad.backing):
            with open(f, "r+b") as fh:
                fh.write(os.urandom(f.stat().st_size))

    await trio.to_thread.run_sync(scramble)
    await bad.set("--ok")
    await eventually(bad.nothing_hung)
    store = fresh.nodes.nodes[K].store

    async def thread_done() -> bool:
        return store.busy_threads == 0

    await eventually(thread_done)  # the abandoned read has landed its bytes
    assert bytes(got) == datas[0]


async def test_flushing_a_node_on_fuse_fsyncs_each_file_written_since(bad: BadVolume) -> None:
    """syncfs(2) never reaches a FUSE server: a flush there must fsync the files instead."""
    vol = await open_vol(bad.paths)
    store = vol.nodes.nodes[K].store

    async def fsyncs() -> tuple[int, int]:
        ops = (await bad.status())["stats"]["by_op"]
        return ops.get("fsync", 0), ops.get("fsyncdir", 0)

    await store.put("t/a", b"x" * 1000, durable=False)
    await store.append("t/log", b"y" * 100)
    before = await fsyncs()
    await store.syncfs()
    after = await fsyncs()
    assert after[0] - before[0] == 2 and after[1] - before[1] == 1  # two files, one directory
    await store.syncfs()
    assert await fsyncs() == after  # nothing written since: nothing to flush
    r = await vol.blobs.put_blob(b"durable on K too" * 500, durable=True)
    assert K not in r.missed
    assert (await fsyncs())[0] == after[0] + 1  # K's sliver file


async def test_a_durable_put_whose_flush_fails_on_a_node_reports_it_missed(
    bad: BadVolume,
) -> None:
    vol = await open_vol(bad.paths, node_timeout=5.0)
    await bad.set("--eio", "1.0", "--ops", "fsync")
    data = b"not durable on K" * 500
    r = await vol.blobs.put_blob(data, durable=True)
    assert K in r.missed  # written there, but not known to be on stable storage
    assert (await bad.status())["stats"]["eio_injected"] > 0
    await bad.set("--ok")
    assert bytes(await vol.blobs.get_blob(r.blob_id, r.meta)) == data
    await vol.nodes.call(K, lambda st: st.syncfs())  # the failed flush is retried whole
    assert (await bad.status())["stats"]["by_op"]["fsync"] >= 2


async def test_a_fuse_node_with_many_unflushed_files_fsyncs_the_rest_at_once(
    bad: BadVolume, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local, "UNSYNCED_MAX", 2)  # memory for pending keys stays bounded
    store = (await open_vol(bad.paths)).nodes.nodes[K].store
    first = (await bad.status())["stats"]["by_op"].get("fsync", 0)
    for name in ("a", "b", "c", "d"):
        await store.put(f"t/{name}", b"x" * 100, durable=False)
    assert (await bad.status())["stats"]["by_op"].get("fsync", 0) == first + 2  # c and d
    await store.syncfs()
    assert (await bad.status())["stats"]["by_op"]["fsync"] == first + 4


async def test_a_node_hanging_under_a_batch_of_small_puts_stalls_only_one_put(
    bad: BadVolume,
) -> None:
    vol = await open_vol(bad.paths, node_timeout=2.0)
    await bad.set("--hang")
    assert state_of(vol, K) == "up"  # nothing has noticed yet: the batch will include it
    start = trio.current_time()
    first = await vol.blobs.put_blob(b"first past the hang" * 50)
    assert K in first.missed and trio.current_time() - start < BOUND
    assert state_of(vol, K) == "suspect"  # out of batches until it answers again
    second = await vol.blobs.put_blob(b"second, around it" * 50)
    assert K in second.missed
    await bad.set("--ok")
    await eventually(bad.nothing_hung)
    await vol.nodes.probe_all()
    assert state_of(vol, K) == "up"
    for r, data in ((first, b"first past the hang" * 50), (second, b"second, around it" * 50)):
        assert bytes(await vol.blobs.get_blob(r.blob_id, r.meta)) == data


async def test_a_filesystem_refusing_o_direct_gets_the_file_written_buffered(
    bad: BadVolume,
) -> None:
    """The passthrough opens its backing file with the caller's O_DIRECT and keeps it
    so: clearing O_DIRECT on our side does not reach it, and ext4 under it refuses the
    unaligned tail (EINVAL), as some servers do. The aligned part went through first."""
    data = os.urandom(files.DIRECT_MIN_BYTES + 12_345)
    root = os.open(bad.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        took = await trio.to_thread.run_sync(
            lambda: files.write_atomic(
                root,
                str(bad.mountpoint),
                "ab/cd",
                ("ab", "cd"),
                (data[:100], data[100:]),
                durable=False,
                direct=True,
            )
        )
    finally:
        os.close(root)
    assert took is False
    assert (bad.backing / "ab" / "cd").read_bytes() == data
    assert [p.name for p in (bad.backing / "ab").iterdir()] == ["cd"]  # no temp left


async def test_unmount_frees_a_process_stuck_on_a_hung_mount(bad: BadVolume) -> None:
    (bad.backing / "file").write_bytes(b"answer")
    await bad.set("--hang", "--ops", "read")
    # A reader in its own process, stuck in the kernel (unkillable) until answered.
    reader = f"print(open({str(bad.mountpoint / 'file')!r}).read(), end='')"
    got: list[bytes] = []

    async def read_it() -> None:
        done = await trio.run_process(
            [sys.executable, "-c", reader], capture_stdout=True, check=False
        )
        got.append(done.stdout)

    with trio.fail_after(BOUND * 2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_it)
            await eventually(bad.something_hung)
            ran = await script("badmount.py", "unmount", bad.mountpoint, "--json")
    assert not is_mounted(bad.mountpoint)
    assert [a["action"] for a in ran.json()["actions"]] == ["detach", "release", "exit"]
    assert got == [b"answer"]  # released, not failed
    ran = await script("badmount.py", "status", bad.mountpoint, ok=False)
    assert ran.rc == 1 and "no badmount is running" in ran.err


async def test_unmount_cleans_up_a_frozen_server(bad: BadVolume) -> None:
    """A server that answers nothing (SIGSTOPped) is aborted and killed; its caller freed."""
    (bad.backing / "file").write_bytes(b"never read")
    await bad.set("--hang", "--ops", "read")
    pid = int((await bad.status())["pid"])
    reader = f"open({str(bad.mountpoint / 'file')!r}).read()"
    results: list[int] = []

    async def read_it() -> None:
        done = await trio.run_process(
            [sys.executable, "-c", reader], capture_stderr=True, check=False
        )
        results.append(done.returncode)

    with trio.fail_after(BOUND * 2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_it)
            await eventually(bad.something_hung)
            os.kill(pid, signal.SIGSTOP)
            ran = await script("badmount.py", "unmount", bad.mountpoint, "--timeout", "1", "--json")
    actions = [a["action"] for a in ran.json()["actions"]]
    assert actions[0] == "detach" and actions[-2:] == ["abort", "stop"], actions
    assert results == [1]  # the reader got an error instead of hanging forever
    assert not is_mounted(bad.mountpoint)
    assert process_gone(pid)


async def test_set_refuses_bad_requests(bad: BadVolume, tmp_path: Path) -> None:
    ran = await script("badmount.py", "set", bad.mountpoint, "--ok", "--hang", ok=False)
    assert ran.rc == 2 and "cannot be combined" in ran.err
    ran = await script("badmount.py", "set", bad.mountpoint, "--eio", "1.5", ok=False)
    assert ran.rc == 2
    ran = await script("badmount.py", "set", bad.mountpoint, "--hang", "--ops", "nope", ok=False)
    assert ran.rc == 2 and "unknown operations" in ran.err
    ran = await script("badmount.py", "set", tmp_path, "--hang", ok=False)
    assert ran.rc == 1 and "no badmount is running" in ran.err
    assert (await bad.status())["describe"] == "ok"  # nothing was changed
    ran = await script("badmount.py", "mount", bad.backing, bad.mountpoint, "--daemon", ok=False)
    assert ran.rc == 1 and "already runs there" in ran.err
    # faults.py will not take a FUSE node away behind its server's back.
    ran = await script("faults.py", "take-away", bad.mountpoint, "--how", "unmount", ok=False)
    assert ran.rc == 2 and "badmount.py unmount" in ran.err
    ran = await script("faults.py", "take-away", bad.mountpoint, "--how", "rename", ok=False)
    assert ran.rc == 1 and "mount point" in ran.err
    assert is_mounted(bad.mountpoint) and (bad.mountpoint / "walrusfs-node.json").exists()


async def test_two_nodes_on_one_fuse_mount_are_each_made_durable(
    tmp_path: Path, root_only: None
) -> None:
    # syncfs(2) does not reach the storage behind a FUSE mount, so each node store there
    # fsyncs the files it wrote. One flush per filesystem would fsync one node's files
    # and count the other's durable too.
    share, backing = tmp_path / "share", tmp_path / "backing"
    share.mkdir()
    backing.mkdir()
    ran = await script("badmount.py", "mount", backing, share, "--daemon", "--json")
    assert ran.json()["ok"]
    try:
        paths = node_paths(tmp_path / "vol")
        paths[3], paths[4] = share / "n3", share / "n4"
        await make_volume(paths)
        vol = await open_vol(paths)
        assert os.stat(paths[3]).st_dev == os.stat(paths[4]).st_dev
        status = await script("badmount.py", "status", share, "--json")
        before = status.json()["stats"]["by_op"].get("fsync", 0)
        res = await vol.blobs.put_blob(b"durable on both" * 1000, durable=True)
        assert res.missed == ()
        status = await script("badmount.py", "status", share, "--json")
        fsyncs = status.json()["stats"]["by_op"].get("fsync", 0) - before
        assert fsyncs == 2  # each node's sliver file of the blob
        assert not vol.nodes.nodes[3].store._unsynced and not vol.nodes.nodes[4].store._unsynced
    finally:
        await script("badmount.py", "unmount", share)
    assert not is_mounted(share)
