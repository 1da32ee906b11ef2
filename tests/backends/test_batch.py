"""run_batch: puts and appends to several real node directories from one worker thread."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from backends import InvalidKey, LocalStore, NodeDown, NodeError, NodeFull
from backends.base import Payload
from backends.batch import run_batch


async def put_batch(
    puts: list[tuple[LocalStore, str, Payload]], *, durable: bool, deadline: float
) -> dict[int, NodeError | None]:
    """As NodeSet does it: each store's own put job, run in one batch."""
    jobs = [(st, key, st.put_job(key, data, durable=durable)) for st, key, data in puts]
    return await run_batch(jobs, deadline=deadline)


def stores(tmp_path: Path, names: list[str]) -> list[LocalStore]:
    out = []
    for name in names:
        (tmp_path / name).mkdir(exist_ok=True)
        out.append(LocalStore(tmp_path / name, timeout=20.0))
    return out


async def test_every_put_lands_and_is_reported(tmp_path: Path) -> None:
    nodes = stores(tmp_path, ["a", "b", "c"])
    done = await put_batch(
        [(st, f"journal/e1/{i:016d}", (b"seg", bytes([i]))) for i, st in enumerate(nodes)],
        durable=False,
        deadline=20.0,
    )
    assert done == {0: None, 1: None, 2: None}
    for i, name in enumerate(["a", "b", "c"]):
        assert (tmp_path / name / "journal" / "e1" / f"{i:016d}").read_bytes() == b"seg" + bytes(
            [i]
        )


async def test_failures_are_per_node_and_the_batch_goes_on(
    tmp_path: Path, tmpfs: Callable[..., Path]
) -> None:
    good, gone = stores(tmp_path, ["good", "gone"])
    (tmp_path / "gone").rmdir()
    full = LocalStore(tmpfs("full", size="64k"), timeout=20.0)
    big = b"x" * (256 << 10)
    done = await put_batch(
        [(gone, "k", b"small"), (full, "k", big), (good, "k", big)], durable=True, deadline=20.0
    )
    assert isinstance(done[0], NodeDown) and isinstance(done[1], NodeFull) and done[2] is None
    assert (tmp_path / "good" / "k").read_bytes() == big
    assert not [p for p in (tmp_path / "full").iterdir()]  # no temp file left behind


async def test_a_bad_key_is_refused_before_any_disk_access(tmp_path: Path) -> None:
    (node,) = stores(tmp_path, ["a"])
    with pytest.raises(InvalidKey):
        await put_batch([(node, "../escape", b"x")], durable=False, deadline=20.0)
    assert not list((tmp_path / "a").iterdir())


async def test_appends_in_a_batch_extend_each_log(tmp_path: Path) -> None:
    nodes = stores(tmp_path, ["a", "b"])
    for part in (b"one,", b"two"):
        jobs = [
            (st, "journal/e1/log", st.append_job("journal/e1/log", part, durable=False))
            for st in nodes
        ]
        assert await run_batch(jobs, deadline=20.0) == {0: None, 1: None}
    for name in ("a", "b"):
        assert (tmp_path / name / "journal" / "e1" / "log").read_bytes() == b"one,two"
