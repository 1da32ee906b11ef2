"""walrusfs: the filesystem on top of the codec and the node backends.

Only walrusfs.fuse_ops (the thin FUSE adapter) and walrusfs.mount import pyfuse3; the
core runs without a mount.
"""

__version__ = "0.1.0"
