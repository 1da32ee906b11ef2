"""Key grammar and temp-file names: what a node store accepts as a key, checked before disk.

A key is a '/'-separated relative path. Each component matches
``[A-Za-z0-9_][A-Za-z0-9_.-]*`` and is at most 255 bytes; the whole key is at most 1024
bytes. So a key has no empty component, no '.' or '..', no leading '/', no NUL, and no
component starting with '.', which leaves every name starting with '.' free for our own
files: temp files are ``.tmp-<hex>`` and can never collide with, or be listed as, a key.

A "prefix" (for listing) is either "" (the whole node) or a key naming a key directory.

Must not import: codec, walrusfs, pyfuse3, trio.

Thread/task safety: stateless; safe from any thread or task.
"""

from __future__ import annotations

import re
import secrets

from backends.errors import InvalidKey

MAX_COMPONENT_BYTES = 255
MAX_KEY_BYTES = 1024

#: Every temp file we create starts with this; a valid key component never can.
TEMP_PREFIX = ".tmp-"

_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_key(key: object) -> tuple[str, ...]:
    """Validate ``key`` and return its components.

    Raises InvalidKey if ``key`` is not a str obeying the key grammar.
    """
    if not isinstance(key, str):
        raise InvalidKey(key, f"a key is a str, not {type(key).__name__}")
    if not key:
        raise InvalidKey(key, "empty key")
    return _check_parts(key)


def check_prefix(prefix: object) -> tuple[str, ...]:
    """Validate a listing prefix ("" or a key directory path) and return its components.

    Raises InvalidKey if ``prefix`` is neither "" nor a valid key.
    """
    if prefix == "":
        return ()
    return check_key(prefix)


def _check_parts(key: str) -> tuple[str, ...]:
    # The grammar is ASCII-only, so once it matches, len() counts bytes; check the
    # grammar first so a non-ASCII key is reported as such, not as "too long".
    parts = tuple(key.split("/"))
    for part in parts:
        if not part:
            raise InvalidKey(key, "empty component (leading, trailing or doubled '/')")
        if _COMPONENT.fullmatch(part) is None:
            raise InvalidKey(key, f"component {part!r} does not match [A-Za-z0-9_][A-Za-z0-9_.-]*")
        if len(part) > MAX_COMPONENT_BYTES:
            raise InvalidKey(key, f"component longer than {MAX_COMPONENT_BYTES} bytes")
    if len(key) > MAX_KEY_BYTES:
        raise InvalidKey(key, f"longer than {MAX_KEY_BYTES} bytes")
    return parts


def is_key_component(name: str) -> bool:
    """Tell whether a directory entry name could be a key component (so is not ours).

    Raises nothing.
    """
    return len(name) <= MAX_COMPONENT_BYTES and _COMPONENT.fullmatch(name) is not None


def is_temp_name(name: str) -> bool:
    """Tell whether a directory entry name is one of our temp files.

    Raises nothing.
    """
    return name.startswith(TEMP_PREFIX)


def new_temp_name(tag: str = "") -> str:
    """Return a fresh temp file name (unique enough to need no coordination).

    Raises nothing.
    """
    # 128 random bits: two writers (even on two hosts sharing a mount) never collide.
    return f"{TEMP_PREFIX}{tag}{secrets.token_hex(16)}"
