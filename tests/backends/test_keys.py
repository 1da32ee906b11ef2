"""Key grammar: what is accepted, what is refused, and that temp names are never keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends import InvalidKey, LocalStore
from backends.keys import check_key, check_prefix, is_temp_name, new_temp_name

VALID = [
    "a",
    "0",
    "_",
    "slivers/ab/0123abcd.primary",
    "A-b_c.d",
    "x" * 255,
    "/".join(["y" * 204] * 5),  # exactly 1024 bytes
]

BAD = [
    ("", "empty"),
    ("/abs", "leading slash"),
    ("a//b", "empty component"),
    ("a/", "trailing slash"),
    (".", "dot"),
    ("..", "dotdot"),
    ("a/../b", "dotdot inside"),
    ("a/./b", "dot inside"),
    (".tmp-0123", "temp name"),
    ("a/.tmp-0123", "temp name in a dir"),
    (".hidden", "hidden"),
    ("-x", "leading dash"),
    ("x" * 256, "component too long"),
    ("/".join(["y" * 205] + ["y" * 204] * 4), "key of 1025 bytes"),
    ("a\0b", "NUL"),
    ("a b", "space"),
    ("a\\b", "backslash"),
    ("caf\u00e9", "non-ascii"),
    ("a\n", "trailing newline"),
]


@pytest.mark.parametrize("key", VALID)
def test_valid_keys_are_accepted(key: str) -> None:
    assert len(key) <= 1024
    assert len(VALID[-1]) == 1024
    assert check_key(key) == tuple(key.split("/"))


@pytest.mark.parametrize(("key", "why"), BAD)
def test_bad_keys_are_refused(key: str, why: str) -> None:
    with pytest.raises(InvalidKey) as info:
        check_key(key)
    assert info.value.key == key, why


@pytest.mark.parametrize("key", [b"abc", None, 3, ["a"]])
def test_non_str_keys_are_refused(key: object) -> None:
    with pytest.raises(InvalidKey):
        check_key(key)


def test_prefix_may_be_empty_but_not_malformed() -> None:
    assert check_prefix("") == ()
    assert check_prefix("slivers/ab") == ("slivers", "ab")
    with pytest.raises(InvalidKey):
        check_prefix("slivers/")
    with pytest.raises(InvalidKey):
        check_prefix("/")


def test_temp_names_are_never_keys_and_are_unique() -> None:
    names = {new_temp_name() for _ in range(1000)} | {new_temp_name("probe-")}
    assert len(names) == 1001
    for name in names:
        assert is_temp_name(name)
        with pytest.raises(InvalidKey):
            check_key(name)


_component = st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]{0,40}\Z")


@given(st.lists(_component, min_size=1, max_size=8))
def test_generated_keys_roundtrip_their_components(parts: list[str]) -> None:
    assert check_key("/".join(parts)) == tuple(parts)


@given(st.lists(_component, min_size=0, max_size=3), st.text(min_size=1, max_size=5))
def test_a_dot_component_is_always_refused(parts: list[str], rest: str) -> None:
    with pytest.raises(InvalidKey):
        check_key("/".join([*parts, "." + rest]))


@pytest.mark.parametrize(("key", "why"), BAD)
async def test_bad_keys_are_refused_before_touching_disk(
    tmp_path: Path, key: str, why: str
) -> None:
    # The node directory does not exist: any disk access would raise NodeDown instead.
    store = LocalStore(tmp_path / "missing")
    with pytest.raises(InvalidKey):
        await store.put(key, b"x")
    with pytest.raises(InvalidKey):
        await store.get(key)
    with pytest.raises(InvalidKey):
        await store.size(key)
    with pytest.raises(InvalidKey):
        await store.delete(key)
    if key:  # "" is the whole-node prefix, a valid listing
        with pytest.raises(InvalidKey):
            await store.list_keys(key)
