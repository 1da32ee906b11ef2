"""Errors raised by the codec. Each says what was wrong with which sliver or parameter.

Imports nothing; safe everywhere.
"""

from __future__ import annotations


class CodecError(Exception):
    """Base of every error the codec raises."""


class ParameterError(CodecError, ValueError):
    """n, f, a size or an index is out of range."""


class FormatError(CodecError, ValueError):
    """Serialized metadata or a sliver header is malformed or of an unknown version."""


class NotEnoughSlivers(CodecError):
    """Fewer slivers or symbols were given than decoding or recovery needs."""


class VerificationError(CodecError):
    """Bytes do not match their commitment. `sliver` names the offending sliver, if known."""

    def __init__(self, message: str, sliver: tuple[str, int] | None = None) -> None:
        super().__init__(message)
        self.sliver = sliver


class InconsistentEncoding(CodecError):
    """A rebuilt sliver does not match its root: the blob was not encoded consistently."""
