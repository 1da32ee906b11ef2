"""Red Stuff, the two-dimensional erasure code of Walrus, over GF(2^8) with blake3 commitments.

Pure and synchronous: imports numpy, blake3 and the standard library only; no I/O, no trio,
nothing else of walrusfs. Every function is safe to call from any thread; none keeps
global mutable state except read-only caches of coding matrices and XOR schedules.
"""

from codec.config import Params
from codec.decoder import RangePiece, decode_primaries, decode_secondaries, range_plan
from codec.encoder import EncodedBlob, SliverPair, Workspace, encode, expand
from codec.errors import (
    CodecError,
    FormatError,
    InconsistentEncoding,
    NotEnoughSlivers,
    ParameterError,
    VerificationError,
)
from codec.metadata import BlobMetadata
from codec.recovery import expand_sliver, is_stored, rebuild, recovery_symbol
from codec.sliver import (
    PRIMARY,
    SECONDARY,
    Sliver,
    sliver_size,
    verify_leaves,
    verify_sliver,
    verify_symbol,
)

__all__ = [
    "PRIMARY",
    "SECONDARY",
    "BlobMetadata",
    "CodecError",
    "EncodedBlob",
    "FormatError",
    "InconsistentEncoding",
    "NotEnoughSlivers",
    "ParameterError",
    "Params",
    "RangePiece",
    "Sliver",
    "SliverPair",
    "VerificationError",
    "Workspace",
    "decode_primaries",
    "decode_secondaries",
    "encode",
    "expand",
    "expand_sliver",
    "is_stored",
    "range_plan",
    "rebuild",
    "recovery_symbol",
    "sliver_size",
    "verify_leaves",
    "verify_sliver",
    "verify_symbol",
]
