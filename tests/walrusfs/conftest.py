"""Fixtures for the filesystem tests: an in-memory blob store, a volume, and a mount.

Tier 1 uses `fs` (a FileSystem called directly). Tier 2 uses `mounted`: a real kernel
mount served by this test process (pyfuse3 allows one session per process, so mount
tests run one at a time). Syscalls on the mount must run in a worker thread
(`in_thread`), or the test would block the trio loop that serves them.
"""

from __future__ import annotations

import functools
import os
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from tests.walrusfs.memblobs import MemBlobStore
from walrusfs.fs import FileSystem, Space
from walrusfs.metadata import Metadata

BS = 64 * 1024  # a small block size keeps multi-block tests fast
WATCHDOG_SECONDS = 120.0
T = TypeVar("T")


class FakeClock:
    """Nanosecond clock that ticks 1000 ns per reading: every change gets a new time."""

    def __init__(self, start: int = 1_700_000_000_123_456_789) -> None:
        self.now = start

    def __call__(self) -> int:
        self.now += 1000
        return self.now


async def fake_space() -> Space:
    return Space(total_bytes=7 * 2**40, free_bytes=7 * 2**39, overhead=3.5)


@pytest.fixture
def store() -> MemBlobStore:
    return MemBlobStore()


@pytest.fixture
def meta(tmp_path: Path) -> Iterator[Metadata]:
    m = Metadata(
        tmp_path / "meta.db", block_size=BS, root_uid=0, root_gid=0, root_mode=0o755, now_ns=1
    )
    yield m
    m.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fs(meta: Metadata, store: MemBlobStore, clock: FakeClock) -> FileSystem:
    return FileSystem(
        meta, store, space=fake_space, clock_ns=clock, cache_bytes=8 * BS, dirty_limit=16 * BS
    )


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking call (a syscall on the mount) in a worker thread."""
    return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


def mounted_at(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def lazy_unmount(path: str) -> None:
    subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True, check=False)


def _abort_connection(path: str) -> None:
    """Fail every request pending on the mount at `path` (fusectl), if possible.

    A test that makes a syscall on the mount from the trio thread deadlocks against its
    own server; aborting the FUSE connection turns that hang into ENOTCONN errors.
    """
    with open("/proc/self/mountinfo") as f:
        devs = [line.split()[2] for line in f if line.split()[4] == path]
    if devs:
        abort = Path("/sys/fs/fuse/connections") / devs[0].split(":")[1] / "abort"
        if abort.exists():
            abort.write_text("1")


@dataclass
class Mounted:
    path: Path
    fs: FileSystem
    store: MemBlobStore


@pytest.fixture
async def mounted(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Mounted]:
    """A walrusfs volume mounted at tmp_path/mnt for the duration of one test.

    Options by indirect parametrization: `{"allow_other": True}` lets other users in.
    """
    from walrusfs.mount import serve  # pyfuse3 only for mount tests

    if not await in_thread(os.path.exists, "/dev/fuse"):
        pytest.skip("no /dev/fuse")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    store = MemBlobStore()
    meta = Metadata(
        tmp_path / "meta.db", block_size=BS, root_uid=os.getuid(), root_gid=os.getgid(), now_ns=1
    )
    fs = FileSystem(meta, store, space=fake_space, cache_bytes=32 * BS, dirty_limit=64 * BS)
    server_done, ready = trio.Event(), trio.Event()
    failure: list[BaseException] = []

    async def run_server() -> None:
        try:
            allow_other = getattr(request, "param", {}).get("allow_other", False)
            await serve(fs, str(mnt), allow_other=allow_other, ready=ready.set)
        except BaseException as exc:
            failure.append(exc)
            raise
        finally:
            server_done.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_server)
            # Poll mountinfo (os.path.ismount says False for a dead mount); stop at once
            # if the server died.
            with trio.fail_after(10):
                while not (ready.is_set() and await in_thread(mounted_at, str(mnt))):
                    if server_done.is_set():
                        pytest.fail(f"server exited before mounting: {failure!r}")
                    await trio.sleep(0.01)
            # A watchdog thread breaks a test that deadlocked against its own server.
            watchdog = threading.Timer(WATCHDOG_SECONDS, _abort_connection, [str(mnt)])
            watchdog.start()
            try:
                yield Mounted(mnt, fs, store)
            finally:
                watchdog.cancel()
            # Unmount the way a user does; the server then flushes and returns.
            await trio.run_process(["fusermount3", "-u", str(mnt)], capture_stderr=True)
            with trio.fail_after(30):
                await server_done.wait()
    finally:
        await in_thread(lazy_unmount, str(mnt))
        meta.close()
