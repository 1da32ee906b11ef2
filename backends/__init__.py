"""Per-node storage of opaque bytes by key: a local directory, or a remote mount.

Knows nothing of slivers, the codec or FUSE (import-linter enforces it).
"""

from backends.base import NodeStore
from backends.errors import (
    InvalidKey,
    KeyExists,
    KeyNotFound,
    NodeDown,
    NodeError,
    NodeFull,
    NodeIOError,
    NodePermissionError,
    NodeTimeout,
    describe_failures,
    map_os_error,
)
from backends.local import LocalStore
from backends.remote import RemoteMountStore, is_mountpoint

__all__ = [
    "InvalidKey",
    "KeyExists",
    "KeyNotFound",
    "LocalStore",
    "NodeDown",
    "NodeError",
    "NodeFull",
    "NodeIOError",
    "NodePermissionError",
    "NodeStore",
    "NodeTimeout",
    "RemoteMountStore",
    "describe_failures",
    "is_mountpoint",
    "map_os_error",
]
