"""Small JSON state files that let a later process undo what an earlier one did.

A fault on node directory ``/a/b/node3`` is recorded in ``/a/b/.walrusfs-<kind>-node3.json``:
next to the node, not inside it (the node may be renamed away, unmounted or read-only),
on the same filesystem as the node's parent, and easy for a user to find and read.

Blocking; for scripts. Files are replaced atomically (temp + rename) so a crash leaves the
old record or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from typing import Any

from faultlib.mounts import mount_path


def node_path(node: str) -> str:
    """The node directory as an absolute path, without statting it (it may be hung)."""
    path = mount_path(node.rstrip("/") or "/")
    if path == "/":
        raise ValueError("the root directory cannot be a node directory")
    return path


def sibling(node: str, prefix: str, suffix: str = "") -> str:
    """``<parent>/<prefix><name><suffix>`` for node directory `node`."""
    path = node_path(node)
    return os.path.join(os.path.dirname(path), f"{prefix}{os.path.basename(path)}{suffix}")


def state_file(node: str, kind: str) -> str:
    return sibling(node, f".walrusfs-{kind}-", ".json")


def load(path: str) -> dict[str, Any] | None:
    """The record at `path`, or None if there is none. Raises ValueError if unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the fault record: {exc}") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a fault record")
    return doc


def save(path: str, doc: dict[str, Any]) -> None:
    """Write the record atomically."""
    tmp = os.path.join(os.path.dirname(path), f".tmp-{secrets.token_hex(8)}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
