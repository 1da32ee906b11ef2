"""blake3 Merkle trees with domain-separated leaves and inner nodes.

leaf = blake3(0x00 || data); inner = blake3(0x01 || left || right). A level with an odd
number of nodes is padded with 32 zero bytes (used as is, not hashed). One leaf: the root is
that leaf's hash. These rules are part of the on-disk format.

Pure; thread-safe. blake3 releases the GIL on large inputs.
"""

from __future__ import annotations

from blake3 import blake3

DIGEST = 32
EMPTY = bytes(DIGEST)
_LEAF = b"\x00"
_INNER = b"\x01"


def leaf_hash(data: bytes | bytearray | memoryview) -> bytes:
    """The leaf hash of one symbol (or any byte string)."""
    h = blake3(_LEAF)
    h.update(data)
    return h.digest()


def inner_hash(left: bytes, right: bytes) -> bytes:
    """The hash of an inner node."""
    return blake3(_INNER + left + right).digest()


def root_of_leaves(leaves: list[bytes]) -> bytes:
    """The Merkle root over already-hashed leaves; 32 zero bytes for none."""
    if not leaves:
        return EMPTY
    level = leaves
    while len(level) > 1:
        if len(level) % 2:
            level = [*level, EMPTY]
        level = [inner_hash(level[i], level[i + 1]) for i in range(0, len(level), 2)]
    return level[0]


def split_leaves(packed: bytes | memoryview) -> list[bytes]:
    """Cut concatenated 32-byte leaf hashes into a list."""
    mv = memoryview(packed)
    return [bytes(mv[i : i + DIGEST]) for i in range(0, len(mv), DIGEST)]


def proof(leaves: list[bytes], index: int) -> list[bytes]:
    """The sibling path from leaf `index` to the root."""
    path = []
    level = leaves
    while len(level) > 1:
        if len(level) % 2:
            level = [*level, EMPTY]
        path.append(level[index ^ 1])
        level = [inner_hash(level[i], level[i + 1]) for i in range(0, len(level), 2)]
        index //= 2
    return path


def verify_proof(root: bytes, data: bytes | memoryview, index: int, path: list[bytes]) -> bool:
    """True if `data` is leaf `index` of the tree with `root`."""
    node = leaf_hash(data)
    for sibling in path:
        node = inner_hash(sibling, node) if index & 1 else inner_hash(node, sibling)
        index //= 2
    return node == root
