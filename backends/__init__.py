"""Per-node storage of opaque bytes by key: a local directory, or a remote mount.

Knows nothing of slivers, the codec or FUSE (import-linter enforces it).
"""
