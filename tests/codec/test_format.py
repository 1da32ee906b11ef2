"""Parameters, metadata serialization, Merkle trees, and golden vectors pinning the format."""

from __future__ import annotations

import dataclasses

import pytest
from blake3 import blake3

from codec import BlobMetadata, FormatError, ParameterError, Params, encode
from codec.merkle import leaf_hash, proof, root_of_leaves, verify_proof


@pytest.mark.parametrize(("n", "f"), [(3, 1), (257, 1), (7, 0), (7, 3), (10, 4)])
def test_parameters_out_of_range(n: int, f: int) -> None:
    with pytest.raises(ParameterError):
        Params(n, f)


def test_default_parameters_and_symbol_size() -> None:
    p = Params.for_nodes(7)
    assert (p.f, p.R, p.C) == (2, 3, 5)
    assert (Params.for_nodes(10).R, Params.for_nodes(10).C) == (4, 7)
    assert p.symbol_size(0) == 64
    assert p.symbol_size(15 * 64) == 64
    assert p.symbol_size(15 * 64 + 1) == 128
    assert p.symbol_size(16 << 20) % 64 == 0
    assert (p.primary_of_pair(2), p.secondary_of_pair(2)) == (2, 4)


def test_metadata_roundtrip_and_rejects_garbage() -> None:
    enc = encode(Params.for_nodes(7), b"hello walrus")
    raw = enc.metadata.to_bytes()
    back = BlobMetadata.from_bytes(raw)
    assert back == enc.metadata and back.blob_id == enc.blob_id
    with pytest.raises(FormatError, match="magic"):
        BlobMetadata.from_bytes(b"XXXX" + raw[4:])
    with pytest.raises(FormatError, match="version"):
        BlobMetadata.from_bytes(raw[:4] + b"\x09" + raw[5:])
    with pytest.raises(FormatError):
        BlobMetadata.from_bytes(raw[:-1])
    with pytest.raises(FormatError, match="parameters"):
        BlobMetadata.from_bytes(raw[:5] + (3).to_bytes(2, "little") + raw[7:])
    assert BlobMetadata.length_of(raw) == len(b"hello walrus")
    for bad in (b"XXXX" + raw[4:], raw[:4] + b"\x09" + raw[5:], raw[:8]):
        with pytest.raises(FormatError):
            BlobMetadata.length_of(bad)


def test_blob_id_commits_to_length_and_every_root() -> None:
    meta = encode(Params.for_nodes(7), b"x" * 100).metadata
    ids = {meta.blob_id, dataclasses.replace(meta, length=99).blob_id}
    for p in range(7):
        roots = list(meta.secondary_roots)
        roots[p] = bytes(32)
        ids.add(dataclasses.replace(meta, secondary_roots=tuple(roots)).blob_id)
    assert len(ids) == 9


def test_pairs_rotate_over_nodes_by_blob_id() -> None:
    params = Params.for_nodes(7)
    offsets = set()
    for i in range(40):
        meta = encode(params, i.to_bytes(2, "little")).metadata
        assert sorted(meta.node_of_pair(p) for p in range(7)) == list(range(7))
        assert all(meta.pair_of_node(meta.node_of_pair(p)) == p for p in range(7))
        offsets.add(meta.node_of_pair(0))
    assert len(offsets) > 3


def test_merkle_proofs_and_domain_separation() -> None:
    leaves = [leaf_hash(bytes([i])) for i in range(5)]
    root = root_of_leaves(leaves)
    for i in range(5):
        assert verify_proof(root, bytes([i]), i, proof(leaves, i))
        assert not verify_proof(root, bytes([i + 1]), i, proof(leaves, i))
    assert root_of_leaves([]) == bytes(32)
    assert root_of_leaves(leaves[:1]) == leaves[0]
    assert leaf_hash(b"") != blake3(b"").digest()


# Golden vectors: changing any of these is a format change and must be deliberate.


def _fingerprint(n: int, blob: bytes) -> tuple[str, str]:
    enc = encode(Params.for_nodes(n), blob)
    h = blake3()
    for pair in enc.pairs:
        h.update(pair.primary.data)
        h.update(pair.secondary.data)
        h.update(pair.primary.leaves + pair.secondary.leaves)
    return enc.blob_id.hex(), h.hexdigest()


@pytest.mark.parametrize(
    ("n", "blob", "blob_id", "slivers"),
    [
        (
            4,
            b"walrusfs golden vector",
            "026ee418c16b72720f64fdf40555ef33decc919aa06f6518f6cb99422a139786",
            "aca51d04d240e1edcdb156b73f5b2aa4ef80c3c582ae48fc8b7760efd7d49451",
        ),
        (
            7,
            bytes(range(256)) * 40,
            "92dcd7f1d7c5c41d87d8c70ed3cb61f4751899eb00f9ffa39d7d4a1c4d28f6ea",
            "5098f3f03b169b4b8cf7abae1c0cd9d79ab753fa67dcd8f9edab9572c3d45926",
        ),
        (
            10,
            b"\xff" * 5000,
            "fc51e020768906998a848865305b3d051f5e4246483efab2077f4f00a2ed8374",
            "3149c1a16ff8371f30e15d1181da1e3ddb2fae021f6924b1bce707f72af6ccfa",
        ),
    ],
)
def test_golden_vectors(n: int, blob: bytes, blob_id: str, slivers: str) -> None:
    assert _fingerprint(n, blob) == (blob_id, slivers)
