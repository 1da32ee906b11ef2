"""Deadlines: a call stuck in the kernel is abandoned, and only its own node notices.

A FIFO in place of a key file makes open() block in the kernel until a writer appears,
exactly like a read on a hung NFS server. Every test releases its stuck threads before
it ends (by opening the FIFO for writing), so no thread outlives the test.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from backends import LocalStore, NodeTimeout
from tests.backends.util import poke_fifo

DEADLINE = 0.5
# "Well before": generous, because CI machines are noisy; a hang would take forever.
BOUND = 5.0


@asynccontextmanager
async def releasing(store: LocalStore, fifo: Path) -> AsyncIterator[None]:
    """On exit, unblock every thread stuck opening ``fifo`` and wait until they are done."""
    try:
        yield
    finally:
        with trio.fail_after(10):
            while store.busy_threads:
                poke_fifo(fifo)
                await trio.sleep(0.01)


def hung_node(tmp_path: Path, name: str, **kwargs: float) -> tuple[LocalStore, Path]:
    node = tmp_path / name
    node.mkdir()
    fifo = node / "stuck"
    os.mkfifo(fifo)
    return LocalStore(node, timeout=DEADLINE, **kwargs), fifo  # type: ignore[arg-type]


async def test_hung_get_times_out_while_other_nodes_work(tmp_path: Path) -> None:
    hung, fifo = hung_node(tmp_path, "hung")
    (tmp_path / "fine").mkdir()
    fine = LocalStore(tmp_path / "fine", timeout=20.0)
    await fine.put("k", b"served")
    events: list[str] = []

    async def stuck() -> None:
        start = trio.current_time()
        with pytest.raises(NodeTimeout) as info:
            await hung.get("stuck")
        events.append("hung timed out")
        assert trio.current_time() - start < BOUND
        assert info.value.key == "stuck"
        assert hung.path in str(info.value)

    async with releasing(hung, fifo), trio.open_nursery() as nursery:
        nursery.start_soon(stuck)
        # Once every task waits, the stuck task's thread holds the hung node's token.
        await trio.testing.wait_all_tasks_blocked()
        assert hung.busy_threads == 1
        # Full round trips on the other node while the hung node's thread is stuck.
        for i in range(5):
            await fine.put(f"k{i}", b"x" * i)
            assert await fine.get(f"k{i}") == b"x" * i
        assert await fine.get("k") == b"served"
        assert hung.busy_threads == 1  # still stuck: nothing released it yet
    assert events == ["hung timed out"]


async def test_abandoned_thread_keeps_its_token_until_released(tmp_path: Path) -> None:
    hung, fifo = hung_node(tmp_path, "hung", max_threads=2)
    await hung.put("ok", b"still served")
    async with releasing(hung, fifo):
        with pytest.raises(NodeTimeout):
            await hung.get("stuck")
        # The thread is still blocked in open(): it was abandoned, not stopped.
        assert hung.busy_threads == 1
        # One token left: the node still serves other keys meanwhile.
        assert await hung.get("ok") == b"still served"
    assert hung.busy_threads == 0


async def test_a_node_whose_threads_are_all_stuck_times_out_instead_of_hanging(
    tmp_path: Path,
) -> None:
    hung, fifo = hung_node(tmp_path, "hung", max_threads=1)
    await hung.put("ok", b"back again")
    async with releasing(hung, fifo):
        with pytest.raises(NodeTimeout):
            await hung.get("stuck")
        # The only thread is stuck, so even a healthy key waits for it, under the deadline.
        start = trio.current_time()
        with pytest.raises(NodeTimeout, match="all 1 worker threads"):
            await hung.get("ok")
        assert trio.current_time() - start < BOUND
        assert hung.busy_threads == 1
    # Once the kernel lets the thread go, the node recovers by itself.
    assert await hung.get("ok") == b"back again"


async def test_outer_cancellation_abandons_the_thread_too(tmp_path: Path) -> None:
    hung, fifo = hung_node(tmp_path, "hung")
    hung.timeout = 60.0  # the caller's own deadline fires first
    async with releasing(hung, fifo):
        with trio.move_on_after(DEADLINE) as scope:
            await hung.get("stuck")
        assert scope.cancelled_caught
        assert hung.busy_threads == 1
