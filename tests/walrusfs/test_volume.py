"""Creating and opening volumes: refusals with clear messages, identity checks, overrides."""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from backends import LocalStore, NodeStore, NodeTimeout
from codec import Params, encode
from tests.walrusfs.volumes import node_paths
from walrusfs.identity import IDENTITY_KEY, IdentityError
from walrusfs.nodeset import NodeSet
from walrusfs.sliverfile import (
    SliverFileError,
    build,
    header_size,
    parse_header,
    parse_key,
    sliver_key,
)
from walrusfs.volume import VolumeError, check_identities, create_volume, open_volume


async def test_create_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="n=3"):
        await create_volume(node_paths(tmp_path / "a", 3))
    with pytest.raises(VolumeError, match="f=3"):
        await create_volume(node_paths(tmp_path / "b", 7), f=3)
    busy = node_paths(tmp_path / "c", 4)
    os.makedirs(busy[2])
    Path(busy[2], "precious.txt").write_text("keep me")
    os.makedirs(busy[0], mode=0o755)
    with pytest.raises(VolumeError, match="not empty"):
        await create_volume(busy)
    assert Path(busy[2], "precious.txt").read_text() == "keep me"
    # Refused as a whole: no directory made, none changed.
    assert sorted(os.listdir(tmp_path / "c")) == sorted(os.path.basename(p) for p in busy[0:3:2])
    assert os.stat(busy[0]).st_mode & 0o777 == 0o755
    taken = node_paths(tmp_path / "d", 4)
    await create_volume(taken)
    with pytest.raises(VolumeError, match="another walrusfs volume"):
        await create_volume(taken)
    with pytest.raises(VolumeError, match="twice"):
        await create_volume([str(tmp_path / "e")] * 4)
    # The same directory by another name (a symlink): the message says which two.
    twins = node_paths(tmp_path / "g", 4)
    os.makedirs(twins[1])
    os.symlink(twins[1], tmp_path / "g" / "alias")
    with pytest.raises(VolumeError, match=f"twice: {twins[1]} and {tmp_path}/g/alias$"):
        await create_volume([*twins[:3], str(tmp_path / "g" / "alias")])
    assert not os.path.exists(twins[0])
    outer = str(tmp_path / "f" / "n0")
    nested = [outer, os.path.join(outer, "n1"), *node_paths(tmp_path / "f", 4)[2:]]
    with pytest.raises(VolumeError, match="inside one another"):
        await create_volume(nested)
    assert not os.path.exists(os.path.join(outer, "walrusfs-node.json"))
    # Nor inside another volume's node: it would go with that node (replaced, its disk
    # lost), all of this volume's nodes there at once.
    inner = node_paths(Path(taken[2]) / "sub", 4)
    with pytest.raises(
        VolumeError,
        match=f"{inner[0]} is inside {taken[2]} \\(a node directory of a walrusfs volume\\)",
    ):
        await create_volume(inner)
    assert not os.path.exists(Path(taken[2]) / "sub")


async def test_node_directories_are_private(tmp_path: Path) -> None:
    paths = node_paths(tmp_path, 4)
    await create_volume(paths)
    vol = await open_volume(paths[0])
    r = await vol.blobs.put_blob(b"secret" * 100)
    for p in paths:
        assert os.stat(p).st_mode & 0o777 == 0o700
        for f in Path(p).rglob("*"):
            assert f.stat().st_mode & 0o077 == 0, f
    assert r.missed == ()


async def test_open_finds_the_other_nodes_and_checks_them(tmp_path: Path) -> None:
    paths = node_paths(tmp_path, 5)
    vol_id = await create_volume(paths, f=1, blob_size=1 << 16)
    vol = await open_volume(paths[3])
    assert vol.identity.volume_id == vol_id and vol.identity.index == 3
    assert (vol.params.n, vol.params.f, vol.identity.blob_size) == (5, 1, 1 << 16)
    assert [n["state"] for n in vol.nodes.snapshot()] == ["up"] * 5
    # A node that moved is found again with an override; without it, it is down.
    os.rename(paths[1], str(tmp_path / "moved"))
    vol = await open_volume(paths[0])
    assert vol.nodes.snapshot()[1]["state"] == "down"
    vol = await open_volume(paths[0], {1: str(tmp_path / "moved")})
    assert vol.nodes.snapshot()[1]["state"] == "up"
    # Pointing an override at the wrong node is refused with the reason.
    vol = await open_volume(paths[0], {1: paths[2]})
    assert "is node 2 of this volume, not node 1" in str(vol.nodes.snapshot()[1]["reason"])


async def test_a_node_swapped_under_a_mount_takes_no_writes_until_it_is_itself(
    tmp_path: Path,
) -> None:
    """Node 1's path made to lead to node 2's directory (disks remounted in each
    other's places). New blobs must not put two of their pairs in one directory, whose
    loss would then cost two: from the first call the store refuses a directory other
    than the one the last identity check found, before any probe has looked; the probe
    then says what it found. Where inode numbers prove nothing (unpinned), a call that
    succeeds there (repair lists every node) must not bring a down node back up either:
    only a probe does, which checks the identity first."""
    paths = node_paths(tmp_path, 7)
    await create_volume(paths)
    vol = await open_volume(paths[0])
    os.rename(paths[1], paths[1] + ".real")
    os.symlink(paths[2], paths[1])
    put = await vol.blobs.put_blob(os.urandom(100_000))
    assert put.missed == (1,)
    assert len(list(Path(paths[2]).rglob("*.p*"))) == 1  # node 2's own pair only
    assert "another directory is at this path now" in vol.nodes.nodes[1].reason
    await vol.nodes.probe(1)
    assert vol.nodes.state(1).value == "down"
    assert "is node 2 of this volume, not node 1" in vol.nodes.nodes[1].reason

    vol.nodes.nodes[1].store.pin(None)
    await vol.nodes.call(1, lambda st: st.list_keys())  # answers: it is a directory
    assert vol.nodes.state(1).value == "down"
    assert (await vol.blobs.put_blob(os.urandom(100_000))).missed == (1,)
    assert len(list(Path(paths[2]).rglob("*.p*"))) == 2

    os.unlink(paths[1])
    os.rename(paths[1] + ".real", paths[1])
    await vol.nodes.probe(1)
    assert vol.nodes.state(1).value == "up"
    assert (await vol.blobs.put_blob(os.urandom(100_000))).missed == ()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x00\xffgarbage", "not valid JSON"),
        (b'{"format": "something-else"}', "not a walrusfs node"),
        (b'{"format": "walrusfs-node", "version": 99}', "version 99 is not supported"),
        (b'{"format": "walrusfs-node", "version": 1, "index": 0}', "damaged identity"),
    ],
)
async def test_open_refuses_damaged_identity(tmp_path: Path, content: bytes, message: str) -> None:
    paths = node_paths(tmp_path, 4)
    await create_volume(paths)
    Path(paths[0], IDENTITY_KEY).write_bytes(content)
    with pytest.raises(VolumeError, match=message):
        await open_volume(paths[0])


async def test_open_refuses_a_plain_directory(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="not a walrusfs node directory"):
        await open_volume(str(tmp_path))
    with pytest.raises(VolumeError, match=r"missing.*any of its node directories"):
        await open_volume(str(tmp_path / "nope"))


async def test_identity_file_format(tmp_path: Path) -> None:
    paths = node_paths(tmp_path, 4)
    await create_volume(paths)
    doc = json.loads(Path(paths[2], IDENTITY_KEY).read_text())
    assert doc["format"] == "walrusfs-node" and doc["version"] == 1
    assert doc["index"] == 2 and doc["nodes"] == paths and doc["mounts"] == [""] * 4


def test_sliver_file_roundtrip_and_tampering() -> None:
    params = Params.for_nodes(7)
    enc = encode(params, b"sliver file" * 500)
    meta = enc.metadata
    pair = enc.pairs[2]
    raw = b"".join(build(meta, pair))
    head = parse_header(raw, meta.blob_id, 2)
    assert head.meta == meta and head.primary_offset == header_size(7)
    assert raw[head.primary_offset : head.secondary_offset] == bytes(pair.primary.data)
    assert raw[head.secondary_offset : head.file_size] == bytes(pair.secondary.data)
    assert head.file_size == len(raw)
    with pytest.raises(SliverFileError, match="not the one asked for"):
        parse_header(raw, meta.blob_id, 3)
    with pytest.raises(SliverFileError, match="not a sliver file"):
        parse_header(b"XXXX" + raw[4:], meta.blob_id, 2)
    with pytest.raises(SliverFileError, match="version"):
        parse_header(raw[:4] + b"\x07" + raw[5:], meta.blob_id, 2)
    for offset in (50, 44 + 17 + 5, 44 + 17 + 7 * 64 + 3, 44 + 17 + 7 * 64 + 7 * 32 + 1):
        bad = bytearray(raw)
        bad[offset] ^= 1
        with pytest.raises(SliverFileError):
            parse_header(bytes(bad), meta.blob_id, 2)
    with pytest.raises(SliverFileError, match="truncated"):
        parse_header(raw[:100], meta.blob_id, 2)


def test_sliver_keys() -> None:
    blob_id = bytes(range(32))
    key = sliver_key(blob_id, 5)
    assert key == f"slivers/00/01/{blob_id.hex()}.p5"
    assert parse_key(key) == (blob_id, 5)
    for other in (
        "walrusfs-node.json",
        "slivers/00/01/xyz.p1",
        f"slivers/00/01/{blob_id.hex()}.q1",
    ):
        assert parse_key(other) is None


def _node_set(
    tmp_path: Path, n: int, check: Callable[[int, NodeStore], Awaitable[None]]
) -> NodeSet:
    return NodeSet([LocalStore(tmp_path / f"n{i}") for i in range(n)], check)


async def test_opening_with_a_grace_gives_up_on_a_silent_node_only_after_a_quorum(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def check(i: int, store: NodeStore) -> None:
        if i == 4:
            raise IdentityError("another volume's node")
        if i == 5:
            await trio.sleep_forever()  # hung, with a node timeout longer than any grace
        await trio.sleep(1.5 if i == 6 else 0.01)  # node 6 slow: it makes the quorum of 5

    nodes = _node_set(tmp_path, 7, check)
    started = trio.current_time()
    await check_identities(nodes, quorum_size=5, grace=2.0)
    # The quorum came at 1.5 s, and the wait after it is 4x that slowest answer.
    assert trio.current_time() - started == pytest.approx(1.5 + 6.0)
    assert [nodes.state(i).value for i in range(7)] == ["up"] * 4 + ["down", "down", "up"]
    assert "another volume" in nodes.nodes[4].reason
    assert "did not answer within 7.5 s" in nodes.nodes[5].reason


async def test_without_a_quorum_or_a_grace_every_node_is_waited_for(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async def check(i: int, store: NodeStore) -> None:
        if i >= 4:  # f+1 nodes hung until their own timeout
            await trio.sleep(10.0)
            raise NodeTimeout("read did not finish within 10s", path=f"n{i}")

    for grace in (2.0, None):
        nodes = _node_set(tmp_path, 7, check)
        started = trio.current_time()
        await check_identities(nodes, quorum_size=5, grace=grace)
        assert trio.current_time() - started == pytest.approx(10.0)
        assert [nodes.state(i).value for i in range(7)] == ["up"] * 4 + ["down"] * 3
        assert all("within 10s" in nodes.nodes[i].reason for i in (4, 5, 6))
