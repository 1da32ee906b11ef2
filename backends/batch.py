"""Calls on several node stores from one worker thread, under a short deadline.

Why: a trio worker-thread round trip costs about 0.2 ms on the machines we run on, and
seven of them in parallel, for seven tiny files, cost more than writing the files (the
threads hand the GIL to each other at every syscall). Closing a small file writes a small
blob and a journal segment to every node; one thread job over all the healthy nodes in
turn does that several times faster. Reads of a blob's systematic slivers go the same
way: in a busy mount the event loop's thread is the bottleneck, and one job instead of
one per sliver (each with its own task, deadline and wake-up) leaves it more time.

The price is isolation: a node that hangs holds up the calls after it in the batch. So a
batch runs under a short deadline, and whatever it has not finished by then is reported
as pending. The thread is abandoned and may still finish those calls later, which is
safe: puts are atomic, keys are content-derived and the payloads immutable (see
LocalStore.put), appends go to framed, verified logs that tolerate a repeat, and a reader
gives up the buffers of reads it did not see finish. The caller sends the pending ones
through each store's own per-node, deadline-bounded path, where a hung node only ever
stalls itself.

Must not import: codec, walrusfs, pyfuse3.

Thread/task safety: call from trio tasks; the worker thread only appends to the
outcome dict, which the task snapshots.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import trio

from backends.errors import NodeError
from backends.local import LocalStore


async def run_batch(
    jobs: Sequence[tuple[LocalStore, str, Callable[[int], object]]],
    *,
    deadline: float,
    on_exit: Callable[[dict[int, NodeError | None]], None] | None = None,
) -> dict[int, NodeError | None]:
    """Run each (store, key, job) in turn from one thread; outcomes by position.

    A job is a store's blocking body of one call (LocalStore.put_job, append_job,
    get_into_job). None means done, a NodeError that it failed; positions missing from
    the result were not done within `deadline` seconds. `on_exit` is called from the
    thread as it ends, also when it was left behind, with every outcome by then: what
    the calls left pending came to. Raises nothing else.
    """
    outcomes: dict[int, NodeError | None] = {}

    def work() -> None:
        try:
            for pos, (store, key, job) in enumerate(jobs):
                try:
                    store.run_blocking(key, job)
                except NodeError as exc:
                    outcomes[pos] = exc
                else:
                    outcomes[pos] = None
        finally:
            if on_exit is not None:
                on_exit(dict(outcomes))

    with trio.move_on_after(deadline):
        await trio.to_thread.run_sync(work, abandon_on_cancel=True)
    return dict(outcomes)  # a copy: an abandoned thread may still add to the original
