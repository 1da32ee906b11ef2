"""The identity file every node directory carries, and the checks made when opening one.

Format (a small JSON document, key `walrusfs-node.json` at the top of the node directory):

| field        | meaning                                                          |
|--------------|------------------------------------------------------------------|
| format       | always "walrusfs-node"                                           |
| version      | format version, 1                                                |
| volume_id    | 32 hex digits, random, shared by the volume's n node directories |
| index        | this directory's node index, 0..n-1                              |
| n, f         | code parameters of the volume                                    |
| blob_size    | bytes of file data per blob                                      |
| nodes        | the volume's node paths as last known, by index                  |
| mounts       | per node, the mount point it must live on ("" = none): a node   |
|              | whose mount has dropped is down, never written underneath        |

A directory with no identity is not a node; one with another volume id, index or version,
or unparsable contents, is refused with a message saying which. Pure data + async helpers
over a NodeStore; safe from any task.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, replace

from backends import KeyNotFound, NodeError, NodeStore
from codec import ParameterError, Params

IDENTITY_KEY = "walrusfs-node.json"
FORMAT = "walrusfs-node"
VERSION = 1


class IdentityError(Exception):
    """A node directory is not the node it should be (or not a node at all)."""


class NoIdentity(IdentityError):
    """A directory with no identity file: not a node, or an empty disk put in one's place."""


@dataclass(frozen=True)
class NodeIdentity:
    """What a node directory says about itself and its volume."""

    volume_id: str
    index: int
    n: int
    f: int
    blob_size: int
    nodes: tuple[str, ...]
    mounts: tuple[str, ...]

    @property
    def params(self) -> Params:
        return Params(self.n, self.f)

    def with_nodes(self, nodes: tuple[str, ...], mounts: tuple[str, ...]) -> NodeIdentity:
        return replace(self, nodes=nodes, mounts=mounts)

    def to_bytes(self) -> bytes:
        doc = {"format": FORMAT, "version": VERSION, **asdict(self)}
        doc["nodes"], doc["mounts"] = list(self.nodes), list(self.mounts)
        return json.dumps(doc, indent=1).encode() + b"\n"

    @classmethod
    def from_bytes(cls, raw: bytes, where: str) -> NodeIdentity:
        """Parse an identity file; raises IdentityError naming `where`."""
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IdentityError(f"{where}: identity file is not valid JSON ({exc})") from exc
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise IdentityError(f"{where}: not a walrusfs node identity file")
        if doc.get("version") != VERSION:
            raise IdentityError(
                f"{where}: identity format version {doc.get('version')!r} is not supported "
                f"(this walrusfs reads version {VERSION})"
            )
        try:
            ident = cls(
                volume_id=str(doc["volume_id"]),
                index=int(doc["index"]),
                n=int(doc["n"]),
                f=int(doc["f"]),
                blob_size=int(doc["blob_size"]),
                nodes=tuple(str(p) for p in doc["nodes"]),
                mounts=tuple(str(p) for p in doc["mounts"]),
            )
            ident.params  # noqa: B018 - validates n and f
        except (KeyError, TypeError, ValueError, ParameterError) as exc:
            raise IdentityError(f"{where}: damaged identity file ({exc})") from exc
        if (
            len(ident.nodes) != ident.n
            or len(ident.mounts) != ident.n
            or not 0 <= ident.index < ident.n
            or ident.blob_size <= 0
        ):
            raise IdentityError(f"{where}: identity file is inconsistent (index/n/nodes/blob_size)")
        return ident


def new_volume_id() -> str:
    return secrets.token_hex(16)


async def read_identity(store: NodeStore) -> NodeIdentity:
    """The identity of a node directory; raises IdentityError or NodeError."""
    return (await _read_identity(store))[0]


async def _read_identity(store: NodeStore) -> tuple[NodeIdentity, tuple[int, int] | None]:
    """The identity of whatever directory is at the node's path now, and where it was read
    (NodeStore.get_pinning). Raises IdentityError or NodeError."""
    try:
        raw, where = await store.get_pinning(IDENTITY_KEY)
    except KeyNotFound as exc:
        raise NoIdentity(
            f"{store.path}: not a walrusfs node directory (no {IDENTITY_KEY})"
        ) from exc
    return NodeIdentity.from_bytes(raw, store.path), where


async def write_identity(store: NodeStore, ident: NodeIdentity) -> None:
    """Write (or replace) the identity file durably; raises NodeError."""
    await store.put(IDENTITY_KEY, ident.to_bytes(), durable=True)


async def check_identity(store: NodeStore, volume_id: str, index: int) -> NodeIdentity:
    """Read a node's identity and insist it is node `index` of volume `volume_id`; then
    the store takes no calls on any other directory at its path (NodeStore.pin) until
    the next check passes there.

    Raises IdentityError (foreign volume, wrong index, damaged) or NodeError.
    """
    try:
        ident, where = await _read_identity(store)
    except NoIdentity as exc:
        raise NoIdentity(
            f"{exc}; if node {index}'s disk was replaced by this one, "
            f"`walrusfs replace-node MOUNTPOINT {index} {store.path}` rebuilds the node there"
        ) from exc
    if ident.volume_id != volume_id:
        raise IdentityError(
            f"{store.path}: belongs to another volume ({ident.volume_id}, not {volume_id}); "
            "refusing to use it"
        )
    if ident.index != index:
        raise IdentityError(
            f"{store.path}: is node {ident.index} of this volume, not node {index}; "
            "was it moved? use --node to say where each node is"
        )
    store.pin(where)
    return ident


__all__ = [
    "IDENTITY_KEY",
    "IdentityError",
    "NodeError",
    "NodeIdentity",
    "check_identity",
    "new_volume_id",
    "read_identity",
    "write_identity",
]
