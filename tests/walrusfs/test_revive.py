"""NodeSet.revive: a write short of nodes looks again at those taken as down, once.

Real node directories and real time (a mock clock would time out the stores' worker
threads); the identity check, which every probe runs first, counts the probes, takes
0.1 s, and plays a hung node.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import trio

from backends import LocalStore, NodeStore
from walrusfs.nodeset import REVIVE_WAIT_S, NodeSet, NodeState


def node_set(tmp_path: Path, probes: Counter[int], hung: set[int]) -> NodeSet:
    async def check(i: int, store: NodeStore) -> None:
        probes[i] += 1
        if i in hung:
            await trio.sleep_forever()
        await trio.sleep(0.1)

    stores = []
    for i in range(7):
        (tmp_path / f"n{i}").mkdir()
        stores.append(LocalStore(tmp_path / f"n{i}"))
    nodes = NodeSet(stores, check)
    for i in (4, 5, 6):
        nodes.set_state(i, NodeState.DOWN, "gone a while ago")
    return nodes


async def test_writes_failing_together_share_one_round_and_each_gets_one(tmp_path: Path) -> None:
    probes: Counter[int] = Counter()
    nodes = node_set(tmp_path, probes, hung={6})
    began = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(nodes.revive, began)
    # One round for all five, which gave up on the hung node's probe after REVIVE_WAIT_S.
    assert trio.current_time() - began >= REVIVE_WAIT_S
    assert probes == {4: 1, 5: 1, 6: 1}
    assert [nodes.state(i) for i in (4, 5, 6)] == [NodeState.UP, NodeState.UP, NodeState.DOWN]
    # A write that began before that round has been served by it.
    await nodes.revive(began)
    assert probes == {4: 1, 5: 1, 6: 1}
    # One that began after it gets a round of its own, of the nodes still down only.
    await trio.sleep(0.01)
    await nodes.revive(trio.current_time())
    assert probes == {4: 1, 5: 1, 6: 2}


async def test_a_write_that_began_before_a_round_under_way_waits_for_it(tmp_path: Path) -> None:
    probes: Counter[int] = Counter()
    nodes = node_set(tmp_path, probes, hung=set())
    early = trio.current_time()
    await trio.sleep(0.01)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(nodes.revive, trio.current_time())
        await trio.sleep(0.01)  # that round is under way: each probe takes 0.1 s
        await nodes.revive(early)
        assert [nodes.state(i) for i in (4, 5, 6)] == [NodeState.UP] * 3
    assert probes == {4: 1, 5: 1, 6: 1}
