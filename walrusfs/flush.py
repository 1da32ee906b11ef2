"""Waiting for a quorum of nodes, and making what they hold durable with few flushes.

Node directories often share a filesystem (all seven on one disk in a small setup), and
one syncfs(2) makes everything written to that filesystem durable: the files, their
directory entries, the renames. So a durable write is written without fsyncs and then
flushed once per filesystem, instead of an fsync per file and per directory. The journal
(fsync() of a file) and the blob store (durable puts) both flush this way. (On a FUSE or
SMB mount, where syncfs never reaches the server, the node store fsyncs the files it wrote
instead: see LocalStore.syncfs.)

Runs in trio tasks of one run.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Awaitable, Callable, Iterable

import trio

from backends import NodeError
from walrusfs.nodeset import NodeSet

# After the quorum answered, how long slower nodes may still finish before being left behind.
QUORUM_GRACE_S = 0.2


async def quorum_of(jobs: list[Callable[[], Awaitable[int]]], quorum: int, *, have: int = 0) -> int:
    """Run `jobs` at once, each returning how many nodes it covered; return the total.

    Returns once the total (starting at `have`) reaches `quorum` and the other jobs have
    had QUORUM_GRACE_S more, or once all have ended; stragglers are then cancelled, so a
    hung node never stalls every close() or fsync().
    """
    total, left = have, len(jobs)
    enough, all_done = trio.Event(), trio.Event()

    async def run(job: Callable[[], Awaitable[int]]) -> None:
        nonlocal total, left
        got = await job()  # not `total += await job()`: that reads total before the await
        total += got
        left -= 1
        if total >= quorum or left == 0:
            enough.set()
        if left == 0:
            all_done.set()

    if jobs:
        async with trio.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(run, job)
            if total >= quorum:
                enough.set()
            await enough.wait()
            with trio.move_on_after(QUORUM_GRACE_S):
                await all_done.wait()
            nursery.cancel_scope.cancel()
    return total


async def flush_filesystems(
    nodes: NodeSet, nodes_written: Iterable[int], quorum: int
) -> tuple[set[int], dict[int, NodeError]]:
    """syncfs once per filesystem holding any of `nodes_written`; returns (those nodes now
    durable, errors by node). Returns once `quorum` members are durable (plus the grace)
    or every flush has ended.

    A flush that fails on one node of a filesystem is tried through the next node on it.
    """
    members = sorted(set(nodes_written))
    await _learn_filesystems(nodes, members)
    groups: dict[object, list[int]] = {}
    for i in members:
        fs = nodes.nodes[i].filesystem
        # One flush serves every node on a filesystem only where it is syncfs(2). On a
        # FUSE or SMB mount each store fsyncs the files it wrote itself: two node
        # directories on one such mount need a flush each.
        shared = fs is not None and nodes.nodes[i].store.syncfs_covers_filesystem()
        groups.setdefault(("fs", fs) if shared else i, []).append(i)
    errors: dict[int, NodeError] = {}
    durable: set[int] = set()

    async def flush(group: list[int]) -> int:
        for i in group:
            try:
                await nodes.call(i, lambda st: st.syncfs())
            except NodeError as exc:
                errors[i] = exc
            else:
                done = [j for j in group if j not in errors]
                durable.update(done)
                return len(done)
        return 0

    await quorum_of([functools.partial(flush, g) for g in groups.values()], quorum)
    return durable, errors


async def _learn_filesystems(nodes: NodeSet, members: list[int]) -> None:
    """Ask the nodes whose filesystem is not known yet (probes record it too).

    Bounded by QUORUM_GRACE_S: a node that does not answer in time is flushed on its own.
    """
    unknown = [i for i in members if nodes.nodes[i].filesystem is None]

    async def ask(i: int) -> None:
        with contextlib.suppress(NodeError):
            nodes.nodes[i].filesystem = await nodes.call(i, lambda st: st.filesystem())

    if unknown:
        with trio.move_on_after(QUORUM_GRACE_S):
            async with trio.open_nursery() as nursery:
                for i in unknown:
                    nursery.start_soon(ask, i)
