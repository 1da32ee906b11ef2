"""Creating a volume over n node directories, and opening one from any of its nodes.

create_volume refuses non-empty and foreign directories and records, for each node, the
mount point it lives on (if it is not on the root filesystem), so that a node whose mount
has dropped is treated as down instead of written into the bare directory underneath.

open_volume reads the identity of the given node, finds the others from it (with
overrides for paths that moved), checks every node's identity, and builds the NodeSet and
BlobStore. A node that is missing or foreign is down, with the reason; more than f such
nodes is the caller's decision (the filesystem refuses to mount). With `straggler_grace`
(the mount), a node still silent that long after n-f nodes answered is down too, until a
probe finds it: a hung node costs the mount a moment, not a whole node timeout.

Runs in trio tasks; blocking filesystem checks go through worker threads.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import trio

from backends import LocalStore, NodeError, NodeStore, RemoteMountStore, is_mountpoint
from codec import ParameterError, Params
from walrusfs.blobstore import BlobStore
from walrusfs.identity import (
    IDENTITY_KEY,
    IdentityError,
    NodeIdentity,
    check_identity,
    new_volume_id,
    read_identity,
    write_identity,
)
from walrusfs.nodeset import RESERVE_KEY, NodeSet, NodeState, reserve_bytes
from walrusfs.tuning import tune_malloc

DEFAULT_BLOB_SIZE = 4 << 20


class VolumeError(Exception):
    """The volume cannot be created or opened; the message says why."""


def _mount_of(path: str) -> str:
    """The mount point `path` lives on, or "" for the root filesystem."""
    p = os.path.realpath(path)
    while p != "/" and not is_mountpoint(p):
        p = os.path.dirname(p)
    return "" if p == "/" else p


def placed(a: str, b: str) -> str | None:
    """How absolute path `a` lies to `b`: "is", "inside", "holds", or None (apart)."""
    if a == b:
        return "is"
    common = os.path.commonpath([a, b])
    return "inside" if common == b else "holds" if common == a else None


def nested(paths: list[str]) -> tuple[str, str] | None:
    """Two of `paths` (absolute, resolved) of which the first lies inside the second.

    Nodes must be apart: one inside another would go with it (deleted, replaced, its disk
    lost), two nodes at once, and its files would be foreign entries in the other.
    """
    for inner in paths:
        for outer in paths:
            if placed(inner, outer) == "inside":
                return inner, outer
    return None


def inside_a_node(paths: list[str]) -> tuple[str, str] | None:
    """(path, the node directory it lies inside) for the first of `paths` in one."""
    for p in paths:
        outer = enclosing_node(p)
        if outer is not None:
            return p, f"{outer} (a node directory of a walrusfs volume)"
    return None


def enclosing_node(path: str) -> str | None:
    """The node directory of some volume that `path` (absolute, resolved) lies inside,
    if any (blocking). A node there would go with that one, as in `nested`."""
    parent = os.path.dirname(path)
    while True:
        if os.path.exists(os.path.join(parent, IDENTITY_KEY)):
            return parent
        if parent == os.path.dirname(parent):
            return None
        parent = os.path.dirname(parent)


def _check_empty(path: str) -> None:
    """Refuse a path that is not an empty directory or missing (changes nothing)."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise VolumeError(f"{path}: exists and is not a directory")
    if os.path.isdir(path):
        entries = [e for e in os.listdir(path) if e != "lost+found"]
        if entries:
            what = "another walrusfs volume's node" if IDENTITY_KEY in entries else "not empty"
            raise VolumeError(f"{path}: {what}; refusing to create a node there")


def _prepare(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


def make_store(path: str, mount: str, *, timeout: float = 10.0) -> NodeStore:
    """The right store for a node: remote-mount checking if it must live on a mount."""
    if mount:
        return RemoteMountStore(path, mountpoint=mount, timeout=timeout)
    return LocalStore(path, timeout=timeout)


async def create_volume(
    paths: list[str], f: int | None = None, blob_size: int = DEFAULT_BLOB_SIZE
) -> str:
    """Create a volume over `paths`; returns its volume id. Raises VolumeError."""
    try:
        params = Params.for_nodes(len(paths), f)
    except ParameterError as exc:
        raise VolumeError(str(exc)) from exc
    if blob_size < 4096 or blob_size > 256 << 20:
        raise VolumeError(f"blob size {blob_size}: must be between 4 KiB and 256 MiB")
    paths = await trio.to_thread.run_sync(lambda: [os.path.abspath(p) for p in paths])
    reals = await trio.to_thread.run_sync(lambda: [os.path.realpath(p) for p in paths])
    real = set(reals)
    if len(real) != len(paths):
        twice = next(r for r in reals if reals.count(r) > 1)
        names = [p for p, r in zip(paths, reals, strict=True) if r == twice]
        raise VolumeError(f"the same directory is named twice: {' and '.join(names[:2])}")
    pair = nested(sorted(real)) or await trio.to_thread.run_sync(inside_a_node, reals)
    if pair is not None:
        raise VolumeError(
            f"{pair[0]} is inside {pair[1]}: node directories must not be inside one another"
        )
    # Every path is checked before any is touched: a refused mkfs leaves nothing behind.
    for prepare in (_check_empty, _prepare):
        for p in paths:
            try:
                await trio.to_thread.run_sync(prepare, p)
            except OSError as exc:
                raise VolumeError(
                    f"{p}: cannot prepare the node directory: {exc.strerror}"
                ) from exc
    mounts = tuple([await trio.to_thread.run_sync(_mount_of, p) for p in paths])
    volume_id = new_volume_id()
    for i, p in enumerate(paths):
        ident = NodeIdentity(volume_id, i, params.n, params.f, blob_size, tuple(paths), mounts)
        store = make_store(p, mounts[i])
        try:
            await write_identity(store, ident)
        except NodeError as exc:
            raise VolumeError(f"{p}: cannot write the node identity: {exc}") from exc
        with contextlib.suppress(NodeError):  # else a mount's first probe takes it
            await store.reserve(RESERVE_KEY, reserve_bytes((await store.free_space())[1]))
    return volume_id


@dataclass
class Volume:
    """An opened volume: its identity, node set and blob store."""

    identity: NodeIdentity
    nodes: NodeSet
    blobs: BlobStore

    @property
    def params(self) -> Params:
        return self.identity.params

    def out_of_room(self) -> bool:
        """NodeSet.out_of_room for this volume's write quorum, n-f."""
        return self.nodes.out_of_room(self.params.n - self.params.f)


async def identity_of(path: str, *, node_timeout: float = 10.0) -> NodeIdentity:
    """The identity file of one node directory, read without opening the volume (no call
    to the other nodes, which may be hung). Raises VolumeError."""
    try:
        return await read_identity(LocalStore(path, timeout=node_timeout))
    except IdentityError as exc:
        raise VolumeError(str(exc)) from exc
    except NodeError as exc:  # missing, hung, unreadable: another node may well answer
        raise VolumeError(
            f"{exc} (a volume opens from any of its node directories: name one that answers)"
        ) from exc


async def open_volume(
    path: str,
    overrides: dict[int, str] | None = None,
    *,
    node_timeout: float = 10.0,
    straggler_grace: float | None = None,
    **blobstore_opts: float,
) -> Volume:
    """Open the volume that node directory `path` belongs to. Raises VolumeError.

    `node_timeout` is the deadline of every node call; `blobstore_opts` go to BlobStore.
    `straggler_grace`: once n-f nodes have shown their identity, wait for the others this
    long, or four times the slowest of those answers if longer, then take the silent ones
    as down. None waits for every node, up to its timeout (fsck must see every node).
    """
    tune_malloc()
    overrides = overrides or {}
    path, moved = await trio.to_thread.run_sync(
        lambda: (os.path.abspath(path), {i: os.path.abspath(p) for i, p in overrides.items()})
    )
    ident = await identity_of(path, node_timeout=node_timeout)
    paths = list(ident.nodes)
    paths[ident.index] = path
    for i, p in moved.items():
        if not 0 <= i < ident.n:
            raise VolumeError(f"--node {i}: no such node (n={ident.n})")
        paths[i] = p
    stores = [make_store(p, ident.mounts[i], timeout=node_timeout) for i, p in enumerate(paths)]

    async def identity_check(i: int, store: NodeStore) -> None:
        await check_identity(store, ident.volume_id, i)

    nodes = NodeSet(stores, identity_check)

    await check_identities(nodes, ident.n - ident.params.f, straggler_grace)
    ident = ident.with_nodes(tuple(paths), ident.mounts)
    blobs = BlobStore(nodes, ident.params, **blobstore_opts)  # type: ignore[arg-type]
    return Volume(ident, nodes, blobs)


async def check_identities(nodes: NodeSet, quorum_size: int, grace: float | None) -> None:
    """Check every node's identity at once (NodeSet.check_identity); a node that fails it
    is down, with the reason.

    With `grace`, nodes still silent max(grace, 4 x the slowest answer) after
    `quorum_size` nodes passed are down too; their checks are abandoned, not waited for.
    """
    started = trio.current_time()
    silent = set(range(len(nodes)))
    answered: list[float] = []  # seconds each node that passed took
    quorum = trio.Event()

    async def check(i: int) -> None:
        try:
            await nodes.check_identity(i)
        except (IdentityError, NodeError) as exc:
            nodes.set_state(i, NodeState.DOWN, str(exc))
        else:
            answered.append(trio.current_time() - started)
            if len(answered) >= quorum_size:
                quorum.set()
        silent.discard(i)

    async def stop_waiting(scope: trio.CancelScope, grace: float) -> None:
        await quorum.wait()
        await trio.sleep(max(grace, 4 * max(answered)))
        scope.cancel()

    async with trio.open_nursery() as waiting:
        if grace is not None:
            waiting.start_soon(stop_waiting, waiting.cancel_scope, grace)
        async with trio.open_nursery() as checks:
            for i in range(len(nodes)):
                checks.start_soon(check, i)
        waiting.cancel_scope.cancel()  # every node answered: nothing left to wait for
    waited = trio.current_time() - started
    for i in sorted(silent):
        nodes.set_state(
            i,
            NodeState.DOWN,
            f"did not answer within {waited:.1f} s, when enough other nodes had; "
            "down until it answers a probe",
        )
